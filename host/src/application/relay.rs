//! Copies bytes both ways between the client and the backend.
//!
//! A connection holds no buffer while it is idle: each direction waits for readability
//! with no memory of its own, then borrows what it needs for one chunk from a shared pool
//! and gives it back once the chunk is written. On Linux the chunk moves through a pipe
//! with splice(2), so the bytes never enter user space; elsewhere, or when no pipe can be
//! had (the pool is at its cap, or descriptors ran out), through a 64 KiB buffer. Idle
//! connections thus cost only their task and two sockets, never a pipe's descriptors.
//!
//! Half-close: when one side ends its sending (EOF), the other side's write half is shut
//! down, and the opposite direction keeps flowing until it ends too.

use std::io::{self, ErrorKind};
use std::net::Shutdown;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use socket2::SockRef;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::domain::model::Traffic;

pub const BUFFER_SIZE: usize = 64 * 1024;

/// Whether this platform moves bulk with splice(2).
const SPLICE: bool = cfg!(target_os = "linux");

/// Buffers (and on Linux pipes) shared by every connection; only those in use exist
/// beyond `keep` of each.
pub struct BufferPool {
    free: Mutex<Vec<Box<[u8]>>>,
    keep: usize,
    #[cfg(target_os = "linux")]
    pipes: pipes::PipePool,
}

impl BufferPool {
    /// Keeps up to `keep` free buffers and pipes for reuse (about one per concurrently
    /// busy direction); more are made on demand, up to `max_pipes` pipes at once.
    pub fn new(keep: usize, max_pipes: usize) -> Self {
        #[cfg(not(target_os = "linux"))]
        let _ = max_pipes;
        Self {
            free: Mutex::new(Vec::new()),
            keep,
            #[cfg(target_os = "linux")]
            pipes: pipes::PipePool::new(keep, max_pipes),
        }
    }

    fn take(&self) -> Box<[u8]> {
        let reused = self.free.lock().expect("buffer pool lock").pop();
        reused.unwrap_or_else(|| vec![0; BUFFER_SIZE].into_boxed_slice())
    }

    fn put(&self, buf: Box<[u8]>) {
        let mut free = self.free.lock().expect("buffer pool lock");
        if free.len() < self.keep {
            free.push(buf);
        }
    }
}

/// Bytes copied client -> backend and backend -> client; `traffic` sees them as they go.
pub async fn relay(
    client: &TcpStream,
    backend: &TcpStream,
    pool: &BufferPool,
    idle: Option<Duration>,
    traffic: &Traffic,
) -> io::Result<(u64, u64)> {
    let start = Instant::now();
    let last = AtomicU64::new(0);
    let one_done = AtomicBool::new(false);
    let both = async {
        tokio::try_join!(
            pump(client, backend, pool, start, &last, &one_done, &traffic.up),
            pump(
                backend,
                client,
                pool,
                start,
                &last,
                &one_done,
                &traffic.down
            )
        )
    };
    let Some(idle) = idle else {
        return both.await;
    };
    tokio::pin!(both);
    let mut seen = 0;
    loop {
        let deadline = start + Duration::from_millis(seen) + idle;
        tokio::select! {
            r = &mut both => return r,
            _ = tokio::time::sleep_until(deadline) => {
                let now = last.load(Ordering::Relaxed);
                if now == seen {
                    return Err(io::Error::new(ErrorKind::TimedOut, format!("idle for {idle:?}")));
                }
                seen = now;
            }
        }
    }
}

/// One direction until EOF, then a shutdown of `to`'s write half.
///
/// Small exchanges are cheaper with read/write; splice pays off once a direction carries
/// bulk (a read that fills a quarter of a buffer). So a direction starts buffered and
/// switches to splice for good at its first bulk read.
async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    pool: &BufferPool,
    start: Instant,
    last: &AtomicU64,
    one_done: &AtomicBool,
    counted: &AtomicU64,
) -> io::Result<u64> {
    let mut total = 0u64;
    let mut spliced = false;
    loop {
        from.readable().await?;
        let spliced_chunk = if spliced {
            chunk_spliced(from, to, pool).await
        } else {
            None
        };
        let moved = match spliced_chunk {
            Some(r) => r?,
            None => chunk_buffered(from, to, pool).await?,
        };
        match moved {
            Moved::WouldBlock => continue,
            Moved::Eof => break,
            Moved::Bytes(n) => {
                touch(start, last);
                total += n as u64;
                counted.fetch_add(n as u64, Ordering::Relaxed);
                spliced |= SPLICE && n >= BUFFER_SIZE / 4;
            }
        }
    }
    // The second direction to finish leaves the shutdown to the close that follows at
    // once (both sockets are read to EOF, so the close sends a FIN, not a reset).
    if one_done.swap(true, Ordering::AcqRel) {
        return Ok(total);
    }
    match SockRef::from(to).shutdown(Shutdown::Write) {
        // The peer may have closed already; nothing is left to tell it.
        Err(e) if e.kind() != ErrorKind::NotConnected => Err(e),
        _ => Ok(total),
    }
}

/// Records activity for the idle timeout: milliseconds since `start`, never 0 (which
/// stands for "no activity yet").
fn touch(start: Instant, last: &AtomicU64) {
    let ms = u64::try_from(start.elapsed().as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    last.store(ms, Ordering::Relaxed);
}

/// One read from `from` written whole to `to`, through a pooled buffer.
async fn chunk_buffered(from: &TcpStream, to: &TcpStream, pool: &BufferPool) -> io::Result<Moved> {
    let mut buf = pool.take();
    let result = match from.try_read(&mut buf) {
        Ok(0) => Ok(Moved::Eof),
        Ok(n) => write_all(to, &buf[..n]).await.map(|()| Moved::Bytes(n)),
        Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(Moved::WouldBlock),
        Err(e) => Err(e),
    };
    pool.put(buf);
    result
}

enum Moved {
    Bytes(usize),
    Eof,
    WouldBlock,
}

/// One splice from `from` into a pooled pipe and out to `to` until the pipe is empty.
/// None when no pipe is available: the caller copies this chunk through a buffer.
#[cfg(target_os = "linux")]
async fn chunk_spliced(
    from: &TcpStream,
    to: &TcpStream,
    pool: &BufferPool,
) -> Option<io::Result<Moved>> {
    let pipe = pool.pipes.take()?;
    let n = match from.try_io(tokio::io::Interest::READABLE, || pipe.fill(from)) {
        Ok(0) => {
            pool.pipes.put(pipe);
            return Some(Ok(Moved::Eof));
        }
        Ok(n) => n,
        Err(e) => {
            pool.pipes.put(pipe); // nothing entered it
            return Some(if e.kind() == ErrorKind::WouldBlock {
                Ok(Moved::WouldBlock)
            } else {
                Err(e)
            });
        }
    };
    let mut left = n;
    while left > 0 {
        match to.try_io(tokio::io::Interest::WRITABLE, || pipe.drain(to, left)) {
            Ok(k) => left -= k,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if let Err(e) = to.writable().await {
                    pool.pipes.discard(pipe);
                    return Some(Err(e));
                }
            }
            Err(e) => {
                pool.pipes.discard(pipe);
                return Some(Err(e));
            }
        }
    }
    pool.pipes.put(pipe);
    Some(Ok(Moved::Bytes(n)))
}

#[cfg(not(target_os = "linux"))]
async fn chunk_spliced(_: &TcpStream, _: &TcpStream, _: &BufferPool) -> Option<io::Result<Moved>> {
    None
}

async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match to.try_write(data) {
            Ok(k) => data = &data[k..],
            Err(e) if e.kind() == ErrorKind::WouldBlock => to.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Pipes for splice(2), pooled: a pipe is two descriptors, so only chunks in flight
/// hold one, and at most `max` exist at once.
#[cfg(target_os = "linux")]
mod pipes {
    use std::io;
    use std::os::fd::{AsFd, OwnedFd};
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use rustix::pipe::{PipeFlags, SpliceFlags, pipe_with, splice};

    /// What one splice moves at most: the default pipe capacity.
    const CHUNK: usize = 64 * 1024;

    pub struct Pipe {
        read: OwnedFd,
        write: OwnedFd,
    }

    impl Pipe {
        /// Socket -> pipe (the pipe is empty when taken from the pool).
        pub fn fill(&self, from: &impl AsFd) -> io::Result<usize> {
            splice(
                from,
                None,
                &self.write,
                None,
                CHUNK,
                SpliceFlags::NONBLOCK | SpliceFlags::MOVE,
            )
            .map_err(io::Error::from)
        }

        /// Pipe -> socket, at most `len` bytes.
        pub fn drain(&self, to: &impl AsFd, len: usize) -> io::Result<usize> {
            splice(
                &self.read,
                None,
                to,
                None,
                len,
                SpliceFlags::NONBLOCK | SpliceFlags::MOVE,
            )
            .map_err(io::Error::from)
        }
    }

    pub struct PipePool {
        free: Mutex<Vec<Pipe>>,
        keep: usize,
        max: usize,
        /// Pipes that exist (free or in use).
        live: AtomicUsize,
    }

    impl PipePool {
        pub fn new(keep: usize, max: usize) -> Self {
            Self {
                free: Mutex::new(Vec::new()),
                keep,
                max,
                live: AtomicUsize::new(0),
            }
        }

        /// An empty pipe, or None at the cap or when the system has no descriptors left.
        pub fn take(&self) -> Option<Pipe> {
            if let Some(p) = self.free.lock().expect("pipe pool lock").pop() {
                return Some(p);
            }
            if self.live.fetch_add(1, Ordering::Relaxed) >= self.max {
                self.live.fetch_sub(1, Ordering::Relaxed);
                return None;
            }
            match pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK) {
                Ok((read, write)) => Some(Pipe { read, write }),
                Err(_) => {
                    self.live.fetch_sub(1, Ordering::Relaxed);
                    None
                }
            }
        }

        /// Returns an empty pipe for reuse.
        pub fn put(&self, pipe: Pipe) {
            let mut free = self.free.lock().expect("pipe pool lock");
            if free.len() < self.keep {
                free.push(pipe);
            } else {
                drop(free);
                self.discard(pipe);
            }
        }

        /// Closes a pipe (one that may still hold data must never be reused).
        pub fn discard(&self, pipe: Pipe) {
            drop(pipe);
            self.live.fetch_sub(1, Ordering::Relaxed);
        }
    }
}
