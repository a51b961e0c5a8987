//! The accept loop of one listener. It only accepts, applies PROXY protocol and hands the
//! connection to the proxy service on its own task; it survives every per-connection error
//! and backs off on descriptor exhaustion instead of exiting.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::proxy_protocol;
use crate::application::proxy_service::{Inbound, ProxyService};
use crate::application::telemetry::ListenerStats;
use crate::config::ListenerConfig;

const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
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
                    tokio::select! {
                        _ = connection(stream, peer, &config, app, &service) => {}
                        _ = kill.cancelled() => {}
                    }
                });
            }
            Err(e) if is_resource_exhaustion(&e) => {
                tracing::error!(listener = %config.addr, error = %e, "accept failed: out of resources; backing off");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
            // Aborted handshakes and the like concern one client only.
            Err(e) => tracing::debug!(listener = %config.addr, error = %e, "accept failed"),
        }
    }
}

fn is_resource_exhaustion(e: &std::io::Error) -> bool {
    // EMFILE, ENFILE, ENOBUFS, ENOMEM on Linux.
    matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12))
}

async fn connection(
    mut stream: TcpStream,
    peer: std::net::SocketAddr,
    config: &ListenerConfig,
    app: Option<Arc<str>>,
    service: &ProxyService,
) {
    let _ = stream.set_nodelay(true);
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
                return tracing::warn!(listener = %config.addr, %peer, error = %e, "closing connection: bad PROXY header");
            }
        }
    }
    service.handle(stream, inbound).await;
}
