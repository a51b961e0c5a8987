//! The accept loop of one listener. It only accepts, applies PROXY protocol and hands the
//! connection to the proxy service on its own task; it survives every per-connection error
//! and backs off on descriptor exhaustion instead of exiting.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::proxy_protocol;
use crate::adapters::net::is_local_resource_error;
use crate::application::proxy_service::{Inbound, ProxyService};
use crate::application::telemetry::ListenerStats;
use crate::config::ListenerConfig;

const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Pending connections the kernel queues per listening socket.
const BACKLOG: i32 = 4096;

/// Binds `addr` `copies` times with SO_REUSEPORT (where there is one), so each worker
/// thread can run its own accept loop and the kernel spreads new connections across
/// them instead of one loop accepting for all. With port 0 every copy gets the port the
/// first one was given.
pub fn bind(addr: SocketAddr, copies: usize) -> std::io::Result<Vec<TcpListener>> {
    use socket2::{Domain, Socket, Type};
    let copies = if cfg!(unix) { copies.max(1) } else { 1 };
    let mut bound = Vec::with_capacity(copies);
    let mut at = addr;
    for _ in 0..copies {
        let socket = Socket::new(Domain::for_address(at), Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        #[cfg(unix)]
        if copies > 1 {
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
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

pub async fn serve(
    listener: TcpListener,
    config: ListenerConfig,
    service: Arc<ProxyService>,
    shutdown: CancellationToken,
    connections: TaskTracker,
    kill: CancellationToken,
    stats: Arc<ListenerStats>,
) {
    let config = Arc::new(config);
    let app: Option<Arc<str>> = config.app.as_deref().map(Arc::from);
    // Accepted sockets inherit TCP_NODELAY from the listener on Linux: one setsockopt
    // here instead of one per connection. Elsewhere each connection sets it.
    let inherited_nodelay = cfg!(target_os = "linux")
        && socket2::SockRef::from(&listener)
            .set_tcp_nodelay(true)
            .is_ok();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                let (service, config, app) =
                    (Arc::clone(&service), Arc::clone(&config), app.clone());
                let kill = kill.clone();
                let open = stats.opened();
                connections.spawn(async move {
                    let _open = open;
                    // `kill` fires only when a drain times out.
                    if !inherited_nodelay {
                        let _ = stream.set_nodelay(true);
                    }
                    tokio::select! {
                        _ = connection(stream, peer, &config, app, &service) => {}
                        _ = kill.cancelled() => {}
                    }
                });
            }
            Err(e) if is_local_resource_error(&e) => {
                tracing::error!(listener = %config.addr, error = %e, "accept failed: out of resources; backing off");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
            // Aborted handshakes and the like concern one client only.
            Err(e) => tracing::debug!(listener = %config.addr, error = %e, "accept failed"),
        }
    }
}

async fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    config: &ListenerConfig,
    app: Option<Arc<str>>,
    service: &ProxyService,
) {
    let mut inbound = Inbound {
        client_ip: peer.ip().to_canonical(),
        via_proxy_protocol: false,
        app,
        early_data: Vec::new(),
    };
    if config.proxy_protocol && config.trusts(inbound.client_ip) {
        match proxy_protocol::read_header(&mut stream, PROXY_HEADER_TIMEOUT).await {
            Ok(header) => {
                if let Some(src) = header.source {
                    inbound.client_ip = src.ip().to_canonical();
                    inbound.via_proxy_protocol = true;
                }
                inbound.early_data = header.rest;
            }
            Err(e) => {
                if let Some(suppressed) = service.telemetry.connection_log.allow() {
                    tracing::warn!(listener = %config.addr, %peer, error = %e, suppressed, "closing connection: bad PROXY header");
                }
                return;
            }
        }
    }
    service.handle(stream, inbound).await;
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
