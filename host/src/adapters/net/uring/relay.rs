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
use std::future::poll_fn;
use std::io::{self, ErrorKind};
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use tokio::time::Instant;

use super::{BUFFER_SIZE, Driver};
use crate::adapters::net::BufferPool;
use crate::adapters::net::pool::Pipe;
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
    let shared = Shared::default();
    let mut up = pin!(direction(
        driver,
        (client, backend),
        pool,
        &traffic.up,
        &shared,
        0
    ));
    let mut down = pin!(direction(
        driver,
        (backend, client),
        pool,
        &traffic.down,
        &shared,
        1
    ));
    let (mut up_total, mut down_total) = (None, None);
    let mut idle = idle.map(|limit| (limit, Box::pin(tokio::time::sleep(limit))));
    poll_fn(|cx| {
        if up_total.is_none()
            && let Poll::Ready(r) = up.as_mut().poll(cx)
        {
            up_total = Some(r?);
        }
        if down_total.is_none()
            && let Poll::Ready(r) = down.as_mut().poll(cx)
        {
            down_total = Some(r?);
        }
        if let (Some(up), Some(down)) = (up_total, down_total) {
            return Poll::Ready(Ok((up, down)));
        }
        if let Some((limit, timer)) = &mut idle {
            if shared.moved.take() {
                timer.as_mut().reset(Instant::now() + *limit);
            }
            if timer.as_mut().poll(cx).is_ready() {
                let e = io::Error::new(ErrorKind::TimedOut, format!("idle for {limit:?}"));
                return Poll::Ready(Err(e));
            }
        }
        Poll::Pending
    })
    .await
}

#[derive(Default)]
struct Shared {
    /// Bytes moved since the idle timer last looked.
    moved: Cell<bool>,
    /// Which directions reached their end.
    done: [Cell<bool>; 2],
}

/// One direction until `from` ends (then `to`'s write half is shut, unless the other
/// direction ended first: the close that follows sends the FIN).
async fn direction(
    driver: &Driver,
    (from, to): (&OwnedFd, &OwnedFd),
    pool: &BufferPool,
    counted: &AtomicU64,
    shared: &Shared,
    me: usize,
) -> io::Result<u64> {
    let mut total = 0;
    // Switched on for good at the first bulk read.
    let mut spliced = false;
    loop {
        if spliced {
            match splice_burst(driver, (from, to), pool, counted, &shared.moved).await? {
                Burst::Moved(n) => {
                    total += n as u64;
                    continue;
                }
                Burst::End => break,
                Burst::NoPipe => {}
            }
        }
        let got = driver.recv(from.as_raw_fd()).await?;
        if got.is_empty() {
            break;
        }
        spliced |= got.len() >= BUFFER_SIZE / 2;
        let n = driver.send_received(to.as_raw_fd(), got).await?;
        total += n as u64;
        counted.fetch_add(n as u64, Ordering::Relaxed);
        shared.moved.set(true);
    }
    shared.done[me].set(true);
    if !shared.done[1 - me].get() {
        match driver.shutdown_write(to.as_raw_fd()).await {
            // The peer may have closed already; nothing is left to tell it.
            Err(e) if e.kind() != ErrorKind::NotConnected => return Err(e),
            _ => {}
        }
    }
    Ok(total)
}

enum Burst {
    /// Bytes moved (counted as they went).
    Moved(usize),
    /// `from` ended.
    End,
    /// No pipe could be had: the caller receives into a buffer instead.
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
    loop {
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
        let ended = loop {
            let n = match pipe.get().fill(from) {
                Ok(0) => break true,
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break false,
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
                break false;
            }
        };
        pipe.release();
        match (moved, ended) {
            (0, true) => return Ok(Burst::End),
            // Readiness with nothing to read (an error-queue event): wait again.
            (0, false) => {}
            // An end after bytes is seen by the next burst.
            (n, _) => return Ok(Burst::Moved(n)),
        }
    }
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
