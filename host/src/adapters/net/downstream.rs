//! The client's side of a connection: its socket, or a TLS session this POP terminated
//! over it. A socket relays with splice (`relay`); a TLS session's plaintext goes through
//! user space, copied with tokio's `copy_bidirectional` (half-close included), counted and
//! timed as it goes.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::either::Either;

use super::BufferPool;
use crate::application::proxy_service::DataPath;
use crate::domain::model::Traffic;
use tokio::io::AsyncWriteExt;

pub type TlsSession = tokio_rustls::server::TlsStream<Prefixed>;

pub enum Downstream {
    Plain(TcpStream),
    /// Boxed: a TLS session is kilobytes, and plain connections should not carry its size.
    Tls(Box<Terminated>),
}

/// A TLS session this POP terminated, and how it reaches the backend.
pub struct Terminated {
    pub session: TlsSession,
    /// Some: TLS to the backend too (the client's server name, else the backend's
    /// address, is what its certificate must name).
    pub reencrypt: Option<tokio_rustls::TlsConnector>,
    /// The backend's TLS handshake is part of connecting to it: bounded alike.
    pub connect_timeout: Duration,
}

impl Downstream {
    pub fn socket(&self) -> &TcpStream {
        match self {
            Downstream::Plain(s) => s,
            Downstream::Tls(t) => &t.session.get_ref().0.inner,
        }
    }

    /// Bytes client -> backend and backend -> client until both sides are done. (Not an
    /// async fn: that would be one more layer holding its arguments.)
    pub fn relay<'a>(
        &'a mut self,
        backend: &'a mut TcpStream,
        pool: &'a BufferPool,
        idle: Option<Duration>,
        traffic: &'a Traffic,
    ) -> impl Future<Output = io::Result<(u64, u64)>> + Send + 'a {
        match self {
            Downstream::Plain(s) => {
                Either::Left(super::relay::relay(s, backend, pool, idle, traffic))
            }
            // Boxed, so a plain connection's future is not the size of this one's.
            Downstream::Tls(t) => Either::Right(Box::pin(t.relay(backend, idle, traffic))),
        }
    }
}

impl Terminated {
    async fn relay(
        &mut self,
        backend: &mut TcpStream,
        idle: Option<Duration>,
        traffic: &Traffic,
    ) -> io::Result<(u64, u64)> {
        let Some(connector) = &self.reencrypt else {
            return copy(&mut self.session, backend, idle, traffic).await;
        };
        let name = match self.session.get_ref().1.server_name() {
            Some(sni) => rustls::pki_types::ServerName::try_from(sni.to_owned())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
            None => rustls::pki_types::ServerName::IpAddress(backend.peer_addr()?.ip().into()),
        };
        // Bounded: a backend that accepts and never answers must not hold the client.
        let handshake = connector.connect(name, &mut *backend);
        let mut upstream = tokio::time::timeout(self.connect_timeout, handshake)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "backend TLS handshake"))??;
        copy(&mut self.session, &mut upstream, idle, traffic).await
    }
}

/// The epoll data path: tokio's sockets, readiness from epoll.
impl DataPath for Downstream {
    type Upstream = TcpStream;

    async fn dial(
        &self,
        addr: std::net::SocketAddr,
        keepalive: Option<Duration>,
    ) -> std::io::Result<TcpStream> {
        let stream = TcpStream::connect(addr).await?;
        let _ = stream.set_nodelay(true);
        if let Some(idle) = keepalive {
            super::set_backend_keepalive(&stream, idle);
        }
        Ok(stream)
    }

    async fn send_early(
        &mut self,
        upstream: &mut TcpStream,
        bytes: Vec<u8>,
    ) -> std::io::Result<()> {
        upstream.write_all(&bytes).await
    }

    async fn relay(
        &mut self,
        mut upstream: TcpStream,
        pool: &BufferPool,
        idle: Option<Duration>,
        traffic: &Traffic,
    ) -> std::io::Result<(u64, u64)> {
        let relayed = Downstream::relay(self, &mut upstream, pool, idle, traffic).await;
        if relayed.is_err() {
            super::reset_on_close(self.socket());
            super::reset_on_close(&upstream);
        }
        relayed
    }
}

/// A socket whose first bytes were already read (a ClientHello): they are read again
/// first, then the socket.
pub struct Prefixed {
    prefix: Vec<u8>,
    at: usize,
    pub inner: TcpStream,
}

impl Prefixed {
    pub fn new(prefix: Vec<u8>, inner: TcpStream) -> Self {
        Self {
            prefix,
            at: 0,
            inner,
        }
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.at < this.prefix.len() {
            let n = buf.remaining().min(this.prefix.len() - this.at);
            buf.put_slice(&this.prefix[this.at..this.at + n]);
            this.at += n;
            if this.at == this.prefix.len() {
                // Not held for the connection's life.
                this.prefix = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    // rustls writes a flight's records at once: one writev, not one write per record.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Each direction's buffer: a TLS record's worth of plaintext, so one read of the session
/// is one write to the backend (tokio's default, 8 KiB, took two).
const BUF: usize = 16 * 1024;

/// Copies both ways through user-space buffers; `traffic` sees the bytes as they are
/// read, and a connection silent both ways for `idle` ends with `TimedOut`.
async fn copy<S: AsyncRead + AsyncWrite + Unpin, B: AsyncRead + AsyncWrite + Unpin>(
    client: &mut S,
    backend: &mut B,
    idle: Option<Duration>,
    traffic: &Traffic,
) -> io::Result<(u64, u64)> {
    let start = Instant::now();
    let last = AtomicU64::new(0);
    let mut client = Counted {
        inner: client,
        read: &traffic.up,
        last: &last,
        start,
        // Many TLS clients close without close_notify: an end, not an abort to reset.
        unclean_eof_is_eof: true,
    };
    let mut backend = Counted {
        inner: backend,
        read: &traffic.down,
        last: &last,
        start,
        unclean_eof_is_eof: false,
    };
    let copy = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut backend, BUF, BUF);
    let Some(limit) = idle else {
        return copy.await;
    };
    let watchdog = async {
        loop {
            let seen = start + Duration::from_millis(last.load(Relaxed));
            if seen.elapsed() >= limit {
                return io::Error::new(io::ErrorKind::TimedOut, format!("idle for {limit:?}"));
            }
            tokio::time::sleep_until(seen + limit).await;
        }
    };
    tokio::select! {
        r = copy => r,
        e = watchdog => Err(e),
    }
}

/// Counts what is read from `inner` and when.
struct Counted<'a, S> {
    inner: &'a mut S,
    read: &'a AtomicU64,
    last: &'a AtomicU64,
    start: Instant,
    unclean_eof_is_eof: bool,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = match Pin::new(&mut *this.inner).poll_read(cx, buf) {
            Poll::Ready(Err(e))
                if this.unclean_eof_is_eof && e.kind() == io::ErrorKind::UnexpectedEof =>
            {
                Poll::Ready(Ok(()))
            }
            r => r,
        };
        let n = buf.filled().len() - before;
        if n > 0 {
            this.read.fetch_add(n as u64, Relaxed);
            let ms = this.start.elapsed().as_millis();
            this.last
                .store(u64::try_from(ms).unwrap_or(u64::MAX), Relaxed);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_shutdown(cx)
    }
}
