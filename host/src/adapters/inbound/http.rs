//! What the admin and registration listeners share: the HTTP/1.1 (hyper) accept loop,
//! bounded, with graceful shutdown; bearer-token checks; and JSON replies.
//!
//! Bounds, so no client of these listeners takes what the data path needs: at most
//! [`MAX_CONNECTIONS`] connections per listener and [`MAX_PER_CLIENT`] from one address
//! (more are closed at once); request headers within [`HEADER_TIMEOUT`]; a connection that
//! moves no byte for the idle timeout (`http_idle_timeout_secs`) while no request of it is
//! being handled (an idle keep-alive, a client that pipelines requests and never reads the
//! answers) is closed; a body must keep arriving (the idle timeout without a byte ends it),
//! however long it is.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::{BodyExt as _, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{ALLOW, AUTHORIZATION, CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use ipnet::IpNet;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::log_throttle::LogThrottle;

/// A client has this long to send its request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections one listener serves at once, and from one client address.
pub const MAX_CONNECTIONS: usize = 256;
pub const MAX_PER_CLIENT: usize = 16;

pub type Reply = Response<Full<Bytes>>;

/// Connections held, in all and per client address.
#[derive(Default)]
struct Held {
    all: AtomicUsize,
    by_ip: Mutex<HashMap<IpNet, usize>>,
}

/// One connection's share of [`Held`], given back when dropped.
struct Slot {
    held: Arc<Held>,
    ip: IpNet,
}

impl Held {
    fn take(self: &Arc<Self>, ip: IpNet) -> Option<Slot> {
        let mut by_ip = self.by_ip.lock().unwrap_or_else(|e| e.into_inner());
        let mine = by_ip.entry(ip).or_default();
        if *mine >= MAX_PER_CLIENT || self.all.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
            if *mine == 0 {
                by_ip.remove(&ip);
            }
            return None;
        }
        *mine += 1;
        self.all.fetch_add(1, Ordering::Relaxed);
        Some(Slot {
            held: Arc::clone(self),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut by_ip = self.held.by_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = by_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                by_ip.remove(&self.ip);
            }
        }
        self.held.all.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A stream that notes when it last moved a byte.
struct Watched {
    stream: TcpStream,
    since: Instant,
    /// Milliseconds after `since` of the last byte read or written.
    last: Arc<AtomicU64>,
}

impl Watched {
    fn moved(&self) {
        let ms = self.since.elapsed().as_millis() as u64;
        self.last.store(ms, Ordering::Relaxed);
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.moved();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.stream).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.moved();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Serves `handle` on `listener` until `shutdown`; `what` names the listener in logs.
pub async fn serve<F, Fut>(
    listener: TcpListener,
    what: &'static str,
    idle: Duration,
    shutdown: CancellationToken,
    handle: F,
) where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Reply> + Send + 'static,
{
    let held = Arc::new(Held::default());
    let refusals = LogThrottle::new(Duration::from_secs(60));
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, listener = what, "accept failed");
                    // Out of descriptors: let the proxy's own connections close first.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // One IPv6 host holds a /64: counted as one client, or it could take every slot.
        let client = crate::application::client_limits::client_prefix(peer.ip(), 32, 64);
        let Some(slot) = held.take(client) else {
            if let Some(more) = refusals.allow() {
                tracing::warn!(
                    %peer, listener = what,
                    "connection refused: {MAX_PER_CLIENT} from this address or \
                     {MAX_CONNECTIONS} in all are open ({more} more refusals held back)"
                );
            }
            drop(stream);
            continue;
        };
        let (handle, shutdown) = (handle.clone(), shutdown.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let last = Arc::new(AtomicU64::new(0));
            let busy = Arc::new(AtomicUsize::new(0));
            let io = Watched {
                stream,
                since: Instant::now(),
                last: Arc::clone(&last),
            };
            let since = io.since;
            let in_handler = Arc::clone(&busy);
            let service = hyper::service::service_fn(move |req| {
                let (reply, busy) = (handle(req), Arc::clone(&in_handler));
                busy.fetch_add(1, Ordering::Relaxed);
                async move {
                    let out = reply.await;
                    busy.fetch_sub(1, Ordering::Relaxed);
                    Ok::<_, Infallible>(out)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(io), service);
            tokio::pin!(conn);
            let mut check = Instant::now() + idle;
            let result = loop {
                tokio::select! {
                    r = conn.as_mut() => break r,
                    _ = shutdown.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        break conn.await;
                    }
                    _ = tokio::time::sleep_until(check) => {
                        let moved = since + Duration::from_millis(last.load(Ordering::Relaxed));
                        if busy.load(Ordering::Relaxed) == 0 && moved + idle <= Instant::now() {
                            tracing::debug!(%peer, listener = what, "connection idle for {idle:?}; closed");
                            return;
                        }
                        check = moved.max(Instant::now()) + idle;
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, listener = what, "connection ended");
            }
        });
    }
}

/// True when no token is set, or the request carries `Authorization: Bearer <token>`
/// (the scheme in any case, RFC 7235).
pub fn bearer_ok(req: &Request<Incoming>, token: Option<&str>) -> bool {
    let Some(token) = token else {
        return true;
    };
    let given = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim());
    // Digests compared in full: neither where they first differ nor the token's length
    // shows in the time taken.
    given.is_some_and(|g| {
        use sha2::Digest as _;
        let (a, b) = (sha2::Sha256::digest(g), sha2::Sha256::digest(token));
        a.iter()
            .zip(b.iter())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
    })
}

/// The request body, at most `max` bytes, or the reply that refuses it. It may take as
/// long as it needs while it moves: `stall` without a byte ends it.
pub async fn body(req: Request<Incoming>, max: usize, stall: Duration) -> Result<Bytes, Reply> {
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("the body is over {max} bytes"),
        )
    };
    let mut body = req.into_body();
    if hyper::body::Body::size_hint(&body).lower() > max as u64 {
        return Err(too_large());
    }
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout(stall, body.frame()).await {
            Err(_) => {
                return Err(error(
                    StatusCode::REQUEST_TIMEOUT,
                    &format!(
                        "the body stopped arriving ({} bytes in, none for {stall:?})",
                        out.len()
                    ),
                ));
            }
            Ok(None) => return Ok(Bytes::from(out)),
            Ok(Some(Err(e))) => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    &format!("reading the body: {e}"),
                ));
            }
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    if out.len() + data.len() > max {
                        return Err(too_large());
                    }
                    out.extend_from_slice(&data);
                }
            }
        }
    }
}

pub fn unauthorized() -> Reply {
    let mut r = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
    r.headers_mut()
        .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

pub fn reply(code: StatusCode, content_type: &'static str, body: String) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

pub fn json(code: StatusCode, value: &impl Serialize) -> Reply {
    match serde_json::to_string_pretty(value) {
        Ok(mut body) => {
            body.push('\n');
            reply(code, "application/json", body)
        }
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("encoding the answer: {e}"),
        ),
    }
}

pub fn error(code: StatusCode, message: &str) -> Reply {
    let body = serde_json::json!({ "error": message }).to_string() + "\n";
    reply(code, "application/json", body)
}

pub fn not_allowed(allow: &'static str) -> Reply {
    let mut r = error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    r.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    r
}
