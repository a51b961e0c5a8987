//! Copies bytes both ways between the client and the backend over the ring, with the same
//! rules as the epoll relay (`net::relay`): a direction waiting for bytes holds no buffer
//! (its receive takes a provided buffer only when bytes arrive), bulk moves through a
//! pooled pipe with splice(2) once a direction's reads fill half a buffer, an end of stream
//! on one side shuts the other side's write half, and the idle timer restarts whenever
//! bytes move.
//!
//! Bulk waits for readiness through the ring (a poll operation) and then splices with
//! system calls until the socket is read out: an `IORING_OP_SPLICE` always runs on the
//! kernel's worker threads (splice has no non-blocking path inside io_uring), a thread
//! hop per chunk, and blocks a worker on an idle socket.

use std::cell::Cell;
use std::future::{Future, poll_fn};
use std::io::{self, ErrorKind};
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use super::{BUFFER_SIZE, Driver, Op};

const ENOBUFS: i32 = 105;
use crate::adapters::net::BufferPool;
use crate::adapters::net::pool::Pipe;
use crate::adapters::net::relay::IdleTimer;
use crate::domain::model::Traffic;

/// Bytes copied client -> backend and backend -> client; `traffic` sees them as they go.
pub async fn relay(
    driver: &Driver,
    client: &OwnedFd,
    backend: &OwnedFd,
    pool: &BufferPool,
    idle: Option<Duration>,
    traffic: &Traffic,
) -> io::Result<(u64, u64)> {
    let moved = Cell::new(false);
    let ctx = |from, to, counted| Ends {
        driver,
        from,
        to,
        pool,
        counted,
        moved: &moved,
    };
    let (up_ends, down_ends) = (
        ctx(client, backend, &traffic.up),
        ctx(backend, client, &traffic.down),
    );
    let (mut up, mut down) = (Direction::default(), Direction::default());
    let mut idle = IdleTimer::new(idle);
    poll_fn(|cx| {
        let up_done = up.poll(cx, &up_ends, down.is_ended())?;
        let down_done = down.poll(cx, &down_ends, up.is_ended())?;
        if up_done.is_ready() && down_done.is_ready() {
            return Poll::Ready(Ok((up.total, down.total)));
        }
        idle.poll(cx, moved.take()).map(Err)
    })
    .await
}

/// What one direction moves bytes between, and where it reports them.
struct Ends<'a> {
    driver: &'a Driver,
    from: &'a OwnedFd,
    to: &'a OwnedFd,
    pool: &'a BufferPool,
    counted: &'a AtomicU64,
    /// Bytes moved since the idle timer last looked (both directions).
    moved: &'a Cell<bool>,
}

/// One direction, a small state machine (not an `async fn`: an idle connection's task is
/// its memory, and nested futures for both directions were over a kilobyte).
#[derive(Default)]
struct Direction<'a> {
    step: Step<'a>,
    total: u64,
    /// Switched on for good at the first bulk read.
    spliced: bool,
}

#[derive(Default)]
enum Step<'a> {
    /// Nothing in flight.
    #[default]
    Start,
    /// A receive into a provided buffer.
    Receiving(Op),
    /// Sending bytes `sent..len` of a provided buffer (which travels with the operation).
    Sending {
        op: Op,
        sent: usize,
        len: usize,
    },
    /// The rare paths, boxed: a burst through a pipe, or a receive that found the
    /// provided buffers all out. Bytes moved (0: the end of the stream).
    Other(Pin<Box<dyn Future<Output = io::Result<Burst>> + 'a>>),
    /// `to`'s write half being shut after `from` ended.
    Ending(Op),
    Ended,
}

impl<'a> Direction<'a> {
    /// Whether `from` ended (its FIN may still be on its way to `to`).
    fn is_ended(&self) -> bool {
        matches!(self.step, Step::Ending(_) | Step::Ended)
    }

    /// Moves bytes until something is in flight (Pending) or `from` ended and `to` was
    /// told (Ready): its write half is shut unless the other direction ended first (the
    /// close that follows sends the FIN).
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        ends: &Ends<'a>,
        other_ended: bool,
    ) -> io::Result<Poll<()>> {
        let driver = ends.driver;
        loop {
            match &mut self.step {
                Step::Ended => return Ok(Poll::Ready(())),
                Step::Start if self.spliced => {
                    let burst = splice_burst(
                        driver,
                        (ends.from, ends.to),
                        ends.pool,
                        ends.counted,
                        ends.moved,
                    );
                    self.step = Step::Other(Box::pin(burst));
                }
                Step::Start => {
                    self.step = Step::Receiving(driver.start_recv(ends.from.as_raw_fd()))
                }
                Step::Receiving(op) => {
                    let Poll::Ready(done) = Pin::new(op).poll(cx) else {
                        return Ok(Poll::Pending);
                    };
                    let buffer = done.buffer();
                    match (done.result(), buffer) {
                        (Ok(n), Some(id)) if n > 0 => {
                            let len = n as usize;
                            self.spliced |= len >= BUFFER_SIZE / 2;
                            let op = driver.start_send(ends.to.as_raw_fd(), id, 0, len);
                            self.step = Step::Sending { op, sent: 0, len };
                        }
                        (Ok(_), id) => {
                            if let Some(id) = id {
                                driver.give_back(id);
                            }
                            self.end(ends, other_ended);
                        }
                        (Err(e), id) => {
                            if let Some(id) = id {
                                driver.give_back(id);
                            }
                            if e.raw_os_error() != Some(ENOBUFS) {
                                return Err(e);
                            }
                            // Every provided buffer is out (peers that stopped reading
                            // hold them): wait for bytes holding nothing, then receive
                            // (into a buffer of its own if the ring is still dry).
                            let (from, to) = (ends.from.as_raw_fd(), ends.to.as_raw_fd());
                            self.step = Step::Other(Box::pin(async move {
                                let got = driver.recv(from).await?;
                                driver.send_all(to, got.bytes()).await?;
                                Ok(match got.len() {
                                    0 => Burst::End,
                                    n => Burst::Received(n),
                                })
                            }));
                        }
                    }
                }
                Step::Sending { op, sent, len } => {
                    let Poll::Ready(done) = Pin::new(&mut *op).poll(cx) else {
                        return Ok(Poll::Pending);
                    };
                    let Some(id) = op.take_buffer() else {
                        unreachable!("a send's slot keeps its buffer");
                    };
                    let n = match done.result() {
                        Ok(0) => Err(ErrorKind::WriteZero.into()),
                        r => r,
                    };
                    let n = match n {
                        Ok(n) => n as usize,
                        Err(e) => {
                            driver.give_back(id);
                            return Err(e);
                        }
                    };
                    *sent += n;
                    self.total += n as u64;
                    ends.counted.fetch_add(n as u64, Ordering::Relaxed);
                    ends.moved.set(true);
                    self.step = match *sent < *len {
                        true => {
                            let op =
                                driver.start_send(ends.to.as_raw_fd(), id, *sent, *len - *sent);
                            Step::Sending {
                                op,
                                sent: *sent,
                                len: *len,
                            }
                        }
                        false => {
                            driver.give_back(id);
                            Step::Start
                        }
                    };
                }
                Step::Other(future) => {
                    let Poll::Ready(burst) = future.as_mut().poll(cx) else {
                        return Ok(Poll::Pending);
                    };
                    match burst? {
                        // Counted as it went.
                        Burst::Moved(n) => {
                            self.total += n as u64;
                            self.step = Step::Start;
                        }
                        Burst::Received(n) => {
                            self.total += n as u64;
                            ends.counted.fetch_add(n as u64, Ordering::Relaxed);
                            ends.moved.set(true);
                            self.step = Step::Start;
                        }
                        Burst::NoPipe => {
                            self.step = Step::Receiving(driver.start_recv(ends.from.as_raw_fd()))
                        }
                        Burst::End => self.end(ends, other_ended),
                    }
                }
                Step::Ending(op) => {
                    let Poll::Ready(done) = Pin::new(op).poll(cx) else {
                        return Ok(Poll::Pending);
                    };
                    match done.result() {
                        // The peer may have closed already; nothing is left to tell it.
                        Err(e) if e.kind() != ErrorKind::NotConnected => return Err(e),
                        _ => self.step = Step::Ended,
                    }
                }
            }
        }
    }

    fn end(&mut self, ends: &Ends<'a>, other_ended: bool) {
        self.step = match other_ended {
            true => Step::Ended,
            false => Step::Ending(ends.driver.start_shutdown(ends.to.as_raw_fd())),
        };
    }
}

enum Burst {
    /// Bytes moved (counted as they went).
    Moved(usize),
    /// Bytes received into a buffer of their own and sent (not counted yet).
    Received(usize),
    /// `from` ended.
    End,
    /// No pipe could be had, or nothing could be spliced: the caller receives into a
    /// buffer instead.
    NoPipe,
}

/// Waits for `from` to be readable, then splices until it is read out (or a burst's
/// worth moved), counting each write as it lands.
async fn splice_burst(
    driver: &Driver,
    (from, to): (&OwnedFd, &OwnedFd),
    pool: &BufferPool,
    counted: &AtomicU64,
    moved_flag: &Cell<bool>,
) -> io::Result<Burst> {
    driver.poll(from.as_raw_fd(), true).await?;
    let Some(pipe) = pool.pipes.take() else {
        return Ok(Burst::NoPipe);
    };
    // A pipe that may hold bytes is never reused: discarded unless drained.
    let mut pipe = Held {
        pipe: Some(pipe),
        pool,
    };
    let mut moved = 0;
    loop {
        let n = match pipe.get().fill(from) {
            // The end of the stream: told by the receive that follows.
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        };
        let mut left = n;
        while left > 0 {
            match pipe.get().drain(to, left) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(m) => {
                    left -= m;
                    moved += m;
                    counted.fetch_add(m as u64, Ordering::Relaxed);
                    moved_flag.set(true);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    driver.poll(to.as_raw_fd(), false).await?
                }
                Err(e) => return Err(e),
            }
        }
        // Not forever on a fast sender: the next burst waits its turn in the ring.
        if moved >= BURST {
            break;
        }
    }
    pipe.release();
    Ok(match moved {
        // Readable yet nothing spliced: an end of stream, an error-queue event, or
        // urgent data (splice stops at it, poll keeps saying readable). A plain
        // receive tells which, and steps over urgent data, where waiting again would
        // spin.
        0 => Burst::NoPipe,
        // An end after bytes is seen by the next burst.
        n => Burst::Moved(n),
    })
}

/// What one burst moves at most before the direction yields.
const BURST: usize = 1 << 20;

struct Held<'a> {
    pipe: Option<Pipe>,
    pool: &'a BufferPool,
}

impl Held<'_> {
    fn get(&self) -> &Pipe {
        self.pipe.as_ref().expect("held until released")
    }

    /// Back to the pool, empty.
    fn release(&mut self) {
        if let Some(p) = self.pipe.take() {
            self.pool.pipes.put(p);
        }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.pipe.take() {
            self.pool.pipes.discard(p);
        }
    }
}
