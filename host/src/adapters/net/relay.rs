//! Copies bytes both ways between the client and the backend.
//!
//! A connection holds no buffer while it is idle: each direction waits for readability
//! with no memory of its own, then borrows what it needs for one chunk from a shared pool
//! and gives it back once the chunk is written. On Linux the chunk moves through a pipe
//! with splice(2), so the bytes never enter user space; elsewhere, or when no pipe can be
//! had (the pool is at its cap, or descriptors ran out), through a 64 KiB buffer. Idle
//! connections thus cost only their task and two sockets, never a pipe's descriptors.
//!
//! The copy is one hand-written poll loop over two small direction states rather than
//! nested async functions: an idle connection's task is its memory, and the state machine
//! of `async` code holding readiness futures for both directions was over a kilobyte.
//!
//! Half-close: when one side ends its sending (EOF), the other side's write half is shut
//! down, and the opposite direction keeps flowing until it ends too.

use std::future::{Future, poll_fn};
use std::io::{self, ErrorKind};
use std::net::Shutdown;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use socket2::SockRef;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::pool::{BUFFER_SIZE, BufferPool};

/// Whether this platform moves bulk with splice(2).
const SPLICE: bool = cfg!(target_os = "linux");
use crate::domain::model::Traffic;

/// Bytes copied client -> backend and backend -> client; `traffic` sees them as they go.
pub async fn relay(
    client: &TcpStream,
    backend: &TcpStream,
    pool: &BufferPool,
    idle: Option<Duration>,
    traffic: &Traffic,
) -> io::Result<(u64, u64)> {
    let mut dirs = Directions {
        up: Direction::default(),
        down: Direction::default(),
        pool,
    };
    let mut idle = IdleTimer::new(idle);
    poll_fn(|cx| {
        let Directions { up, down, pool } = &mut dirs;
        let up_done = up.poll(cx, client, backend, pool, &traffic.up, down.is_done())?;
        let down_done = down.poll(cx, backend, client, pool, &traffic.down, up.is_done())?;
        if up_done.is_ready() && down_done.is_ready() {
            return Poll::Ready(Ok((up.total, down.total)));
        }
        idle.poll(cx, up.take_moved() | down.take_moved()).map(Err)
    })
    .await
}

/// A relay's idle timeout, restarted whenever bytes move; a timer only with a timeout,
/// boxed so connections without one carry none. Both data paths' relays use it.
pub(super) struct IdleTimer(Option<(Duration, Pin<Box<tokio::time::Sleep>>)>);

impl IdleTimer {
    pub(super) fn new(limit: Option<Duration>) -> Self {
        Self(limit.map(|limit| (limit, Box::pin(tokio::time::sleep(limit)))))
    }

    /// The timeout's error once nothing moved for the limit; `moved`: bytes moved since
    /// the last call.
    pub(super) fn poll(&mut self, cx: &mut Context<'_>, moved: bool) -> Poll<io::Error> {
        let Some((limit, timer)) = &mut self.0 else {
            return Poll::Pending;
        };
        if moved {
            timer.as_mut().reset(Instant::now() + *limit);
        }
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(io::Error::new(
                ErrorKind::TimedOut,
                format!("idle for {limit:?}"),
            )),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Both directions and the pool their chunks come from; a chunk still in flight when
/// the relay is dropped (an error, or a drain cut-off) goes back or is accounted for.
struct Directions<'a> {
    up: Direction,
    down: Direction,
    pool: &'a BufferPool,
}

impl Drop for Directions<'_> {
    fn drop(&mut self) {
        for d in [&mut self.up, &mut self.down] {
            if let State::Writing(chunk) = std::mem::take(&mut d.state) {
                chunk.discard(self.pool);
            }
        }
    }
}

#[derive(Default)]
struct Direction {
    state: State,
    total: u64,
    /// Switched on for good at the first bulk read: small exchanges are cheaper with
    /// read/write, bulk with splice.
    spliced: bool,
    /// Bytes moved since the idle timer last looked.
    moved: bool,
}

#[derive(Default)]
enum State {
    #[default]
    Reading,
    Writing(Chunk),
    Done,
}

/// Bytes read and not yet written.
enum Chunk {
    Buffer {
        buf: Box<[u8]>,
        start: usize,
        end: usize,
    },
    #[cfg(target_os = "linux")]
    Pipe {
        pipe: super::pool::Pipe,
        left: usize,
    },
}

impl Direction {
    fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn take_moved(&mut self) -> bool {
        std::mem::take(&mut self.moved)
    }

    /// Moves chunks from `from` to `to` until both would block (Pending) or `from` ends
    /// (Ready, after shutting down `to`'s write half unless the other direction already
    /// ended: the close that follows then sends the FIN).
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        from: &TcpStream,
        to: &TcpStream,
        pool: &BufferPool,
        counted: &AtomicU64,
        other_done: bool,
    ) -> io::Result<Poll<()>> {
        loop {
            match &mut self.state {
                State::Done => return Ok(Poll::Ready(())),
                State::Reading => {
                    if ready_or_pending(from.poll_read_ready(cx))?.is_pending() {
                        return Ok(Poll::Pending);
                    }
                    match self.read(from, pool) {
                        Ok(Some(chunk)) => self.state = State::Writing(chunk),
                        Ok(None) => {
                            self.state = State::Done;
                            if !other_done {
                                shutdown_write(to)?;
                            }
                            return Ok(Poll::Ready(()));
                        }
                        // Readiness was cleared; polling again registers for the next.
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                }
                State::Writing(chunk) => {
                    if ready_or_pending(to.poll_write_ready(cx))?.is_pending() {
                        return Ok(Poll::Pending);
                    }
                    match chunk.write_to(to) {
                        Ok(0) => {
                            let State::Writing(chunk) = std::mem::take(&mut self.state) else {
                                unreachable!("matched Writing above");
                            };
                            chunk.release(pool);
                        }
                        Ok(n) => {
                            self.total += n as u64;
                            counted.fetch_add(n as u64, Ordering::Relaxed);
                            self.moved = true;
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    }

    /// One read into a pooled pipe (splicing) or buffer. None at EOF.
    fn read(&mut self, from: &TcpStream, pool: &BufferPool) -> io::Result<Option<Chunk>> {
        #[cfg(target_os = "linux")]
        if self.spliced
            && let Some(pipe) = pool.pipes.take()
        {
            return match from.try_io(tokio::io::Interest::READABLE, || pipe.fill(from)) {
                Ok(0) => {
                    pool.pipes.put(pipe);
                    Ok(None)
                }
                // No readiness clearing here: a splice can stop short of what is queued
                // (the pipe runs out of slots), so only EAGAIN tells the socket is read out.
                Ok(n) => Ok(Some(Chunk::Pipe { pipe, left: n })),
                Err(e) => {
                    pool.pipes.put(pipe); // nothing entered it
                    Err(e)
                }
            };
        }
        let mut buf = pool.take();
        // A short read means TCP handed over everything queued, so the next read would only
        // say EAGAIN: readiness is cleared instead (one syscall saved per burst, per
        // direction). As tokio's own `poll_read` does, the readiness event is taken before
        // the read and only that one is cleared: the outer `try_io` snapshots it, the read
        // runs inside, and a short read reports WouldBlock to make it clear. An event that
        // arrives during the read has a newer tick and survives, so no wake-up is lost.
        let mut got = None;
        let result = from.try_io(tokio::io::Interest::READABLE, || {
            let n = from.try_read(&mut buf)?;
            got = Some(n);
            match n > 0 && n < buf.len() {
                true => Err(ErrorKind::WouldBlock.into()),
                false => Ok(()),
            }
        });
        match (got, result) {
            (Some(0), _) => {
                pool.put(buf);
                Ok(None)
            }
            (Some(n), _) => {
                self.spliced |= SPLICE && n >= BUFFER_SIZE / 4;
                Ok(Some(Chunk::Buffer {
                    buf,
                    start: 0,
                    end: n,
                }))
            }
            (None, Err(e)) => {
                pool.put(buf);
                Err(e)
            }
            (None, Ok(())) => unreachable!("the closure sets `got` before returning Ok"),
        }
    }
}

impl Chunk {
    /// Writes what it can: the bytes written, 0 once nothing is left.
    fn write_to(&mut self, to: &TcpStream) -> io::Result<usize> {
        match self {
            Chunk::Buffer { buf, start, end } => {
                if start == end {
                    return Ok(0);
                }
                let n = to.try_write(&buf[*start..*end])?;
                if n == 0 {
                    return Err(ErrorKind::WriteZero.into());
                }
                *start += n;
                Ok(n)
            }
            #[cfg(target_os = "linux")]
            Chunk::Pipe { pipe, left } => {
                if *left == 0 {
                    return Ok(0);
                }
                let n = to.try_io(tokio::io::Interest::WRITABLE, || pipe.drain(to, *left))?;
                if n == 0 {
                    return Err(ErrorKind::WriteZero.into());
                }
                *left -= n;
                Ok(n)
            }
        }
    }

    /// Back to the pool, written out.
    fn release(self, pool: &BufferPool) {
        match self {
            Chunk::Buffer { buf, .. } => pool.put(buf),
            #[cfg(target_os = "linux")]
            Chunk::Pipe { pipe, .. } => pool.pipes.put(pipe),
        }
    }

    /// Given up half-written: a pipe that may hold bytes is never reused.
    fn discard(self, pool: &BufferPool) {
        match self {
            Chunk::Buffer { buf, .. } => pool.put(buf),
            #[cfg(target_os = "linux")]
            Chunk::Pipe { pipe, .. } => pool.pipes.discard(pipe),
        }
    }
}

fn ready_or_pending(p: Poll<io::Result<()>>) -> io::Result<Poll<()>> {
    match p {
        Poll::Ready(r) => r.map(Poll::Ready),
        Poll::Pending => Ok(Poll::Pending),
    }
}

fn shutdown_write(to: &TcpStream) -> io::Result<()> {
    match SockRef::from(to).shutdown(Shutdown::Write) {
        // The peer may have closed already; nothing is left to tell it.
        Err(e) if e.kind() != ErrorKind::NotConnected => Err(e),
        _ => Ok(()),
    }
}
