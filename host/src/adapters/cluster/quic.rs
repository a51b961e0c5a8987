//! One QUIC endpoint (quinn) that both listens and dials, with a connection per peer
//! address reused in both directions, and the count of peers refused at the handshake.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::tls::SERVER_NAME;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const REFUSAL_LOG_PERIOD: Duration = Duration::from_secs(60);

type Slot = Arc<tokio::sync::Mutex<Option<quinn::Connection>>>;

pub struct QuicEndpoint {
    pub role: &'static str,
    endpoint: quinn::Endpoint,
    conns: Mutex<HashMap<SocketAddr, Slot>>,
    pub refused: AtomicU64,
    refusal_logged: Mutex<HashMap<IpAddr, Instant>>,
}

impl QuicEndpoint {
    pub fn bind(
        role: &'static str,
        addr: SocketAddr,
        server: quinn::ServerConfig,
        client: quinn::ClientConfig,
    ) -> std::io::Result<Self> {
        let mut endpoint = quinn::Endpoint::server(server, addr)?;
        endpoint.set_default_client_config(client);
        Ok(Self {
            role,
            endpoint,
            conns: Mutex::default(),
            refused: AtomicU64::new(0),
            refusal_logged: Mutex::default(),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint
            .local_addr()
            .expect("a bound endpoint has an address")
    }

    fn slot(&self, addr: SocketAddr) -> Slot {
        self.conns
            .lock()
            .expect("connection map lock")
            .entry(addr)
            .or_default()
            .clone()
    }

    /// The live connection to `addr`, dialling one if there is none. Concurrent callers for
    /// one address share one dial; other addresses are not held up by a slow one.
    /// Returns the connection and whether it is new (its reader must be started).
    pub async fn connection(&self, addr: SocketAddr) -> Result<(quinn::Connection, bool), String> {
        let slot = self.slot(addr);
        let mut held = slot.lock().await;
        if let Some(c) = held.as_ref().filter(|c| c.close_reason().is_none()) {
            return Ok((c.clone(), false));
        }
        let connecting = self
            .endpoint
            .connect(addr, SERVER_NAME)
            .map_err(|e| e.to_string())?;
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| format!("no answer within {CONNECT_TIMEOUT:?}"))?
            .map_err(|e| e.to_string())?;
        *held = Some(conn.clone());
        Ok((conn, true))
    }

    /// Accepts peers until the endpoint closes, handing each one that completes the
    /// handshake to `on_peer`. Handshakes run concurrently, so a slow or hostile one holds
    /// up no other; peers that fail (no or another CA, another cluster or protocol) are
    /// counted and logged once a minute per address.
    pub async fn listen(
        self: Arc<Self>,
        on_peer: impl Fn(quinn::Connection) + Send + Sync + 'static,
    ) {
        let on_peer = Arc::new(on_peer);
        while let Some(incoming) = self.endpoint.accept().await {
            let (this, on_peer) = (self.clone(), on_peer.clone());
            tokio::spawn(async move {
                let from = incoming.remote_address();
                match incoming.await {
                    Ok(conn) => {
                        let slot = this.slot(conn.remote_address());
                        *slot.lock().await = Some(conn.clone());
                        on_peer(conn);
                    }
                    Err(e) => this.refuse(from, &e.to_string()),
                }
            });
        }
    }

    pub fn refuse(&self, from: SocketAddr, reason: &str) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut logged = self.refusal_logged.lock().expect("refusal log lock");
        logged.retain(|_, at| now.duration_since(*at) < REFUSAL_LOG_PERIOD);
        if logged.len() < 1024 && !logged.contains_key(&from.ip()) {
            logged.insert(from.ip(), now);
            tracing::warn!(
                peer = %from,
                endpoint = self.role,
                "cluster: refused a peer that failed authentication ({reason}); \
                 it needs a certificate from this cluster's CA and the same cluster name \
                 (logged once a minute per address)"
            );
        }
    }

    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"shutting down");
    }
}
