//! Copies bytes both ways between the client and the backend.
//!
//! A connection holds no buffer while it is idle: each direction waits for readability
//! with no memory of its own, borrows a buffer from a shared pool for one read and the
//! writes that drain it, and gives it back. Idle connections thus cost only their task
//! and sockets, and busy ones get large (64 KiB) buffers for few syscalls per byte.
//!
//! Half-close: when one side ends its sending (EOF), the other side's write half is shut
//! down, and the opposite direction keeps flowing until it ends too.

use std::io::{self, ErrorKind};
use std::net::Shutdown;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use socket2::SockRef;
use tokio::net::TcpStream;
use tokio::time::Instant;

pub const BUFFER_SIZE: usize = 64 * 1024;

/// Buffers shared by every connection; only buffers in use exist beyond `keep`.
pub struct BufferPool {
    free: Mutex<Vec<Box<[u8]>>>,
    keep: usize,
}

impl BufferPool {
    /// Keeps up to `keep` free buffers for reuse (about one per concurrently busy
    /// direction); more are allocated on demand and freed when returned.
    pub fn new(keep: usize) -> Self {
        Self {
            free: Mutex::new(Vec::new()),
            keep,
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

/// Bytes copied client -> backend and backend -> client.
pub async fn relay(
    client: &TcpStream,
    backend: &TcpStream,
    pool: &BufferPool,
    idle: Option<Duration>,
) -> io::Result<(u64, u64)> {
    let start = Instant::now();
    let last = AtomicU64::new(0);
    let both = async {
        tokio::try_join!(
            pump(client, backend, pool, start, &last),
            pump(backend, client, pool, start, &last)
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
async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    pool: &BufferPool,
    start: Instant,
    last: &AtomicU64,
) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        from.readable().await?;
        let mut buf = pool.take();
        let n = match from.try_read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                pool.put(buf);
                continue;
            }
            Err(e) => {
                pool.put(buf);
                return Err(e);
            }
        };
        if n == 0 {
            pool.put(buf);
            break;
        }
        // Milliseconds since start, never 0 (0 stands for "no activity yet").
        let ms = u64::try_from(start.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        last.store(ms, Ordering::Relaxed);
        let written = write_all(to, &buf[..n]).await;
        pool.put(buf);
        written?;
        total += n as u64;
    }
    match SockRef::from(to).shutdown(Shutdown::Write) {
        // The peer may have closed already; nothing is left to tell it.
        Err(e) if e.kind() != ErrorKind::NotConnected => Err(e),
        _ => Ok(total),
    }
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
