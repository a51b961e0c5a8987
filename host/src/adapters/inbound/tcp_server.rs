//! The accept loop of one listener. It only accepts, applies PROXY protocol and hands the
//! connection to the proxy service on its own task; it survives every per-connection error,
//! backs off on descriptor exhaustion instead of exiting, and pauses (without spinning) while
//! the POP holds `max_connections`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{proxy_protocol, tls_hello};
use crate::adapters::net::downstream::{Downstream, Prefixed, Terminated, TlsSession};
use crate::adapters::net::{is_local_resource_error, set_keepalive};
use crate::application::client_limits::Refused;
use crate::application::proxy_service::{Inbound, ProxyService};
use crate::application::telemetry::ListenerStats;
use crate::config::{ListenerConfig, SendVersion, TlsMode};
use crate::domain::server_names::{ServerNames, TlsHello};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Pending connections the kernel queues per listening socket.
const BACKLOG: i32 = 4096;

/// Binds `addr` `copies` times with SO_REUSEPORT (where there is one), so each worker
/// thread can run its own accept loop and the kernel spreads new connections across
/// them instead of one loop accepting for all. With port 0 every copy gets the port the
/// first one was given.
pub fn bind(addr: SocketAddr, copies: usize) -> std::io::Result<Vec<TcpListener>> {
    let copies = if cfg!(unix) { copies.max(1) } else { 1 };
    bind_copies(addr, copies, copies > 1)
}

/// `copies` more listeners beside ones already bound to `addr` with SO_REUSEPORT.
pub fn bind_shared(addr: SocketAddr, copies: usize) -> std::io::Result<Vec<TcpListener>> {
    bind_copies(addr, copies, true)
}

fn bind_copies(
    addr: SocketAddr,
    copies: usize,
    reuse_port: bool,
) -> std::io::Result<Vec<TcpListener>> {
    use socket2::{Domain, Socket, Type};
    let mut bound = Vec::with_capacity(copies);
    let mut at = addr;
    for _ in 0..copies {
        let socket = Socket::new(Domain::for_address(at), Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        #[cfg(unix)]
        if reuse_port {
            socket.set_reuse_port(true)?;
        }
        socket.set_nonblocking(true)?;
        socket.bind(&at.into())?;
        socket.listen(BACKLOG)?;
        let listener = TcpListener::from_std(socket.into())?;
        at = listener.local_addr()?;
        bound.push(listener);
    }
    Ok(bound)
}
/// A listener's settings as its connections read them.
struct Listener {
    config: ListenerConfig,
    tls: Option<TlsListener>,
}

/// What a listener that reads TLS routes and terminates with.
struct TlsListener {
    mode: TlsMode,
    names: ServerNames,
    /// Where any name is terminated.
    terminator: Option<TlsAcceptor>,
    /// TLS to the backends of terminated connections, where the listener re-encrypts.
    reencrypt: Option<TlsConnector>,
}

const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// After any other accept error: enough to stop a tight loop, too short to notice.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(1);

/// What every accept loop of a POP shares.
#[derive(Clone)]
pub struct Acceptor {
    pub service: Arc<ProxyService>,
    /// Stops accepting.
    pub shutdown: CancellationToken,
    /// Tracks connection tasks, for the drain.
    pub connections: TaskTracker,
    /// Fires only when a drain times out: ends the connections left.
    pub kill: CancellationToken,
}

pub async fn serve(
    listener: TcpListener,
    config: ListenerConfig,
    stats: Arc<ListenerStats>,
    acceptor: Acceptor,
    (terminator, reencrypt): (Option<TlsAcceptor>, Option<TlsConnector>),
) {
    let Acceptor {
        service,
        shutdown,
        connections,
        kill,
    } = acceptor;
    let tls = config.tls.map(|mode| TlsListener {
        mode,
        // Checked when the config was resolved.
        names: config.names().unwrap_or_default(),
        terminator,
        reencrypt,
    });
    let app: Option<Arc<str>> = config.app.as_deref().map(Arc::from);
    let addr = config.addr;
    let config = Arc::new(Listener { config, tls });
    let keepalive = service.settings.keepalive;
    let inherited = set_inherited_options(&listener, keepalive);
    loop {
        // At the cap the loop waits here, not in accept(2): new clients queue in the
        // kernel's backlog until a connection closes.
        if !stats.slot(&shutdown).await {
            return;
        }
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => {
                stats.unused_slot();
                return;
            }
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                let (service, config, app) =
                    (Arc::clone(&service), Arc::clone(&config), app.clone());
                let kill = kill.clone();
                let open = stats.opened();
                if !inherited {
                    let _ = stream.set_nodelay(true);
                    if let Some(idle) = keepalive {
                        set_keepalive(&stream, idle);
                    }
                }
                let stats = Arc::clone(&stats);
                connections.spawn(async move {
                    let _open = open;
                    tokio::select! {
                        _ = connection(stream, peer, &config, app, &service, &stats) => {}
                        _ = kill.cancelled() => {}
                    }
                });
            }
            Err(e) => {
                stats.unused_slot();
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(accept_pause(addr, &e)) => {}
                }
            }
        }
    }
}

/// Sets on a listener what the sockets it accepts inherit on Linux, TCP_NODELAY and
/// keepalive: setsockopt calls once here instead of per connection. Whether they are
/// inherited (elsewhere each connection sets them).
pub fn set_inherited_options(
    listener: &impl std::os::fd::AsFd,
    keepalive: Option<Duration>,
) -> bool {
    let sock = socket2::SockRef::from(listener);
    let inherited = cfg!(target_os = "linux") && sock.set_tcp_nodelay(true).is_ok();
    if let (true, Some(idle)) = (inherited, keepalive) {
        set_keepalive(listener, idle);
    }
    inherited
}

/// How long an accept loop waits after a failed accept, logged. Out of descriptors (or
/// buffers): nothing to do but wait for some to free. Anything else (an aborted
/// handshake) concerns one client, but a loop of them must not spin a core either.
pub fn accept_pause(listener: SocketAddr, e: &std::io::Error) -> Duration {
    match is_local_resource_error(e) {
        true => {
            tracing::error!(%listener, error = %e, "accept failed: out of resources; backing off");
            ACCEPT_BACKOFF
        }
        false => {
            tracing::debug!(%listener, error = %e, "accept failed");
            ACCEPT_ERROR_PAUSE
        }
    }
}

async fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    listener: &Listener,
    app: Option<Arc<str>>,
    service: &ProxyService,
    stats: &ListenerStats,
) {
    let config = &listener.config;
    let Some(Admitted {
        mut inbound,
        source,
        destination,
        limit: _limit,
    }) = admit(&mut stream, peer, config, app, service, stats).await
    else {
        return;
    };
    match &listener.tls {
        None => {
            if let Some(version) = config.send_proxy_protocol {
                let header = proxy_header(version, &stream, source, destination, None);
                inbound.set_proxy_header(header);
            }
            service.handle(stream, inbound).await
        }
        // Boxed: rustls's state is kilobytes, and plain connections' tasks should not
        // carry room for it.
        Some(tls) => {
            let addrs = (source, destination);
            Box::pin(tls_connection(
                stream, inbound, addrs, config, tls, service, stats,
            ))
            .await
        }
    }
}

/// A connection past its PROXY header and the per-client limits.
pub struct Admitted {
    pub inbound: Inbound,
    /// The client's address, the PROXY header's where trusted.
    pub source: SocketAddr,
    /// The address the client connected to, as a PROXY header said.
    pub destination: Option<SocketAddr>,
    /// Held for the connection's life: counts it against its client's open limit.
    pub limit: Option<crate::application::client_limits::Admitted>,
}

/// What every data path does first with an accepted connection: read a PROXY header from
/// a trusted source, then apply the per-client limits on the client's address. None:
/// closed, logged and counted.
pub async fn admit(
    stream: &mut impl proxy_protocol::ReadSome,
    peer: SocketAddr,
    config: &ListenerConfig,
    app: Option<Arc<str>>,
    service: &ProxyService,
    stats: &ListenerStats,
) -> Option<Admitted> {
    let mut inbound = Inbound {
        client_ip: peer.ip().to_canonical(),
        via_proxy_protocol: false,
        app,
        early_data: Vec::new(),
        tls: None,
        proxy_header_len: 0,
    };
    let (mut source, mut destination) = (peer, None);
    if config.proxy_protocol && config.trusts(inbound.client_ip) {
        match proxy_protocol::read_header(stream, PROXY_HEADER_TIMEOUT).await {
            Ok(header) => {
                if let Some(src) = header.source {
                    inbound.client_ip = src.ip().to_canonical();
                    inbound.via_proxy_protocol = true;
                    source = src;
                    destination = header.destination;
                }
                inbound.early_data = header.rest;
            }
            Err(e) => {
                if let Some(suppressed) = service.telemetry.connection_log.allow() {
                    tracing::warn!(listener = %config.addr, peer = %service.shown(peer.ip()), error = %e, suppressed, "closing connection: bad PROXY header");
                }
                return None;
            }
        }
    }
    // Per-client limits, on the client's address (the PROXY header's, where trusted),
    // before any decision: a refused connection costs an accept and a close.
    let limit = match &stats.limiter {
        None => None,
        Some(l) => match l.admit(inbound.client_ip, tokio::time::Instant::now()) {
            Ok(a) => a,
            Err(why) => {
                let counter = match why {
                    Refused::Rate => &stats.refused_rate,
                    Refused::Open => &stats.refused_open,
                };
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if let Some(suppressed) = service.telemetry.connection_log.allow() {
                    tracing::warn!(listener = %config.addr, client = %service.shown(inbound.client_ip), ?why, suppressed, "connection refused: over the client's limit");
                }
                return None;
            }
        },
    };
    Some(Admitted {
        inbound,
        source,
        destination,
        limit,
    })
}

/// A TLS listener's connection: routed by its hello, then passed through or terminated.
async fn tls_connection(
    mut stream: TcpStream,
    mut inbound: Inbound,
    (source, destination): (SocketAddr, Option<SocketAddr>),
    config: &ListenerConfig,
    tls: &TlsListener,
    service: &ProxyService,
    stats: &ListenerStats,
) {
    let (mode, names) = (tls.mode, &tls.names);
    let Some(terminate) = tls_route(&mut stream, &mut inbound, mode, names, service, stats).await
    else {
        return;
    };
    if !terminate {
        if let Some(version) = config.send_proxy_protocol {
            let hello = inbound.tls.as_deref();
            let header = proxy_header(version, &stream, source, destination, hello);
            inbound.set_proxy_header(header);
        }
        return service.handle(stream, inbound).await;
    }
    // Every terminating listener has one (see `Host::run`).
    let Some(terminator) = &tls.terminator else {
        return;
    };
    let header = config
        .send_proxy_protocol
        .map(|v| (v, proxy_header_addrs(&stream, source, destination)));
    if let Some(session) = handshake(stream, &mut inbound, terminator, service, stats).await {
        // After the handshake: the protocol agreed goes in the header too.
        if let Some((version, Some((src, dst)))) = header {
            let hello = inbound.tls.as_deref();
            let header = proxy_protocol::outbound_header(version, src, dst, hello);
            inbound.set_proxy_header(header);
        }
        let terminated = Terminated {
            session,
            reencrypt: tls.reencrypt.clone(),
            connect_timeout: service.settings.connect_timeout,
        };
        service
            .serve(Downstream::Tls(Box::new(terminated)), inbound)
            .await;
    }
}

/// The addresses a PROXY header to the backend carries: the client's, and the one it
/// connected to (the inbound header's, else this socket's: one getsockname, only where
/// a header is sent).
fn proxy_header_addrs(
    stream: &impl std::os::fd::AsFd,
    source: SocketAddr,
    destination: Option<SocketAddr>,
) -> Option<(SocketAddr, SocketAddr)> {
    let local = || {
        socket2::SockRef::from(stream)
            .local_addr()
            .ok()?
            .as_socket()
    };
    let destination = destination.or_else(local)?;
    Some((source, destination))
}

pub fn proxy_header(
    version: SendVersion,
    stream: &impl std::os::fd::AsFd,
    source: SocketAddr,
    destination: Option<SocketAddr>,
    hello: Option<&TlsHello>,
) -> Vec<u8> {
    match proxy_header_addrs(stream, source, destination) {
        Some((src, dst)) => proxy_protocol::outbound_header(version, src, dst, hello),
        // No local address: the socket is gone, and the connect that follows fails alike.
        None => Vec::new(),
    }
}

/// The TLS handshake, over the hello already read; the protocol agreed goes into
/// `inbound`. None: failed, counted by reason.
async fn handshake(
    stream: TcpStream,
    inbound: &mut Inbound,
    terminator: &TlsAcceptor,
    service: &ProxyService,
    stats: &ListenerStats,
) -> Option<TlsSession> {
    let hello = std::mem::take(&mut inbound.early_data);
    let accept = terminator.accept(Prefixed::new(hello, stream));
    let failed = match tokio::time::timeout(tls_hello::HELLO_TIMEOUT, accept).await {
        Ok(Ok(session)) => {
            if let (Some(tls), Some(agreed)) =
                (&mut inbound.tls, session.get_ref().1.alpn_protocol())
            {
                Arc::make_mut(tls).negotiated = Some(String::from_utf8_lossy(agreed).into());
            }
            return Some(session);
        }
        Ok(Err(e)) => (handshake_failure(&e), e.to_string()),
        Err(_) => (
            "handshake_timeout",
            "no handshake within the deadline".to_owned(),
        ),
    };
    if let Some(t) = &stats.tls {
        t.reject(failed.0);
    }
    if let Some(suppressed) = service.telemetry.connection_log.allow() {
        tracing::warn!(listener = %stats.addr, client = %service.shown(inbound.client_ip), reason = failed.0, error = %failed.1, suppressed, "TLS handshake failed");
    }
    None
}

/// A failed handshake's reason, as counted.
fn handshake_failure(e: &std::io::Error) -> &'static str {
    match e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::AlertReceived(_)) => "peer_alert",
        Some(rustls::Error::PeerIncompatible(_) | rustls::Error::NoApplicationProtocol) => {
            "incompatible"
        }
        Some(rustls::Error::General(m)) if m.contains("certificate") => "no_certificate",
        _ => "handshake",
    }
}

/// Reads the ClientHello and routes by its server name: the app goes into `inbound`,
/// the bytes read become its early data. Whether to terminate; None: closed, counted.
async fn tls_route(
    stream: &mut TcpStream,
    inbound: &mut Inbound,
    mode: TlsMode,
    names: &ServerNames,
    service: &ProxyService,
    stats: &ListenerStats,
) -> Option<bool> {
    let reject = |reason: &str, detail: &dyn std::fmt::Display| {
        if let Some(t) = &stats.tls {
            t.reject(reason);
        }
        if let Some(suppressed) = service.telemetry.connection_log.allow() {
            tracing::warn!(listener = %stats.addr, client = %service.shown(inbound.client_ip), error = %detail, suppressed, "closing TLS connection");
        }
    };
    let read = std::mem::take(&mut inbound.early_data);
    let (hello, bytes) = match tls_hello::read(stream, read).await {
        Ok(r) => r,
        Err(e) => {
            reject(e.label(), &e);
            return None;
        }
    };
    let route = hello.sni.as_deref().and_then(|n| names.route(n));
    let terminate = match route {
        Some(r) => {
            inbound.app = Some(Arc::clone(&r.app));
            r.terminate
        }
        // Unlisted names (and hellos without one) go to the listener's app; with none,
        // a listener that routes by name refuses them.
        None if inbound.app.is_some() || names.is_empty() => mode == TlsMode::Terminate,
        None => {
            let name = hello.sni.as_deref().unwrap_or("(none)");
            reject(
                "unknown_name",
                &format_args!("no route for server name {name}"),
            );
            return None;
        }
    };
    inbound.early_data = bytes;
    inbound.tls = Some(Arc::new(hello));
    Some(terminate)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    /// The accept path relies on it (see `serve`).
    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay_from_the_listener() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        socket2::SockRef::from(&listener)
            .set_tcp_nodelay(true)
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap());
    }

    /// So is keepalive (`serve` sets it on the listener only).
    #[tokio::test]
    async fn accepted_sockets_inherit_keepalive_from_the_listener() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        crate::adapters::net::set_keepalive(&listener, std::time::Duration::from_secs(42));
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let sock = socket2::SockRef::from(&accepted);
        assert!(sock.keepalive().unwrap());
        assert_eq!(
            sock.tcp_keepalive_time().unwrap(),
            std::time::Duration::from_secs(42)
        );
    }

    #[tokio::test]
    async fn reuseport_copies_share_one_port_and_all_accept() {
        let copies = super::bind("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        let addr = copies[0].local_addr().unwrap();
        assert_eq!(copies[1].local_addr().unwrap(), addr);
        // The kernel spreads connections by their source port: with 64 both get some.
        let mut clients = Vec::new();
        for _ in 0..64 {
            clients.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let mut accepted = [0; 2];
        let all = async {
            for _ in 0..64 {
                tokio::select! {
                    r = copies[0].accept() => { r.unwrap(); accepted[0] += 1 }
                    r = copies[1].accept() => { r.unwrap(); accepted[1] += 1 }
                }
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), all)
            .await
            .expect("64 accepts");
        assert_eq!(accepted[0] + accepted[1], 64);
        assert!(accepted[0] > 0 && accepted[1] > 0, "{accepted:?}");
    }
}
