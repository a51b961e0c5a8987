//! The cluster over QUIC (quinn): an endpoint that both listens and dials, with a
//! connection per peer address reused in both directions and the count of peers refused at
//! the handshake; two of them (gossip, rows) make the `Transport`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::tls::SERVER_NAME;
use super::transport::{BoxFuture, Inbox, Transport};
use super::wire;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A sync answer is one read of the table: a peer that takes longer is as good as gone.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const REFUSAL_LOG_PERIOD: Duration = Duration::from_secs(60);

type Slot = Arc<tokio::sync::Mutex<Option<quinn::Connection>>>;

pub struct QuicEndpoint {
    pub role: &'static str,
    endpoint: quinn::Endpoint,
    conns: Mutex<HashMap<SocketAddr, Slot>>,
    pub refused: AtomicU64,
    refusal_logged: Mutex<HashMap<IpAddr, Instant>>,
    /// UDP bytes (in, out) of connections no longer held.
    retired: Mutex<(u64, u64)>,
    /// What a peer must speak (protocol version and cluster), for the refusal message.
    alpn: Vec<u8>,
}

impl QuicEndpoint {
    pub fn bind(
        role: &'static str,
        addr: SocketAddr,
        server: quinn::ServerConfig,
        client: quinn::ClientConfig,
        alpn: Vec<u8>,
    ) -> std::io::Result<Self> {
        let mut endpoint = quinn::Endpoint::server(server, addr)?;
        endpoint.set_default_client_config(client);
        Ok(Self {
            role,
            endpoint,
            conns: Mutex::default(),
            refused: AtomicU64::new(0),
            refusal_logged: Mutex::default(),
            retired: Mutex::default(),
            alpn,
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
        self.hold(&mut held, conn.clone());
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
                        this.hold(&mut *slot.lock().await, conn.clone());
                        on_peer(conn);
                    }
                    Err(e) => this.refuse(from, &e.to_string()),
                }
            });
        }
    }

    /// Puts `conn` in a peer's slot, keeping the traffic count of the one it replaces.
    fn hold(&self, slot: &mut Option<quinn::Connection>, conn: quinn::Connection) {
        if let Some(old) = slot.replace(conn) {
            let s = old.stats();
            let mut r = self.retired.lock().expect("retired lock");
            r.0 += s.udp_rx.bytes;
            r.1 += s.udp_tx.bytes;
        }
    }

    /// UDP bytes (in, out) this endpoint has carried: QUIC, TLS and payload.
    pub fn wire_bytes(&self) -> (u64, u64) {
        let mut total = *self.retired.lock().expect("retired lock");
        let slots: Vec<Slot> = self
            .conns
            .lock()
            .expect("connection map lock")
            .values()
            .cloned()
            .collect();
        for slot in slots {
            if let Ok(held) = slot.try_lock()
                && let Some(c) = held.as_ref()
            {
                let s = c.stats();
                total.0 += s.udp_rx.bytes;
                total.1 += s.udp_tx.bytes;
            }
        }
        total
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
                 it needs a certificate from this cluster's CA, the same cluster name and the \
                 same protocol version ({}) (logged once a minute per address)",
                String::from_utf8_lossy(&self.alpn)
            );
        }
    }

    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"shutting down");
    }
}

/// The real network: SWIM datagrams on the gossip endpoint, rows on the transport
/// endpoint (a uni stream per one-way frame, a bi stream per call).
pub struct QuicTransport {
    pub gossip: Arc<QuicEndpoint>,
    pub rows: Arc<QuicEndpoint>,
    inbox: std::sync::OnceLock<Weak<dyn Inbox>>,
}

impl QuicTransport {
    pub fn new(gossip: QuicEndpoint, rows: QuicEndpoint) -> Arc<Self> {
        Arc::new(Self {
            gossip: Arc::new(gossip),
            rows: Arc::new(rows),
            inbox: std::sync::OnceLock::new(),
        })
    }

    /// Starts accepting peers and delivering what they send to `inbox`.
    pub fn serve(self: &Arc<Self>, inbox: Weak<dyn Inbox>) {
        let _ = self.inbox.set(inbox);
        let this = self.clone();
        tokio::spawn(
            self.gossip
                .clone()
                .listen(move |conn| this.read_datagrams(conn)),
        );
        let this = self.clone();
        tokio::spawn(
            self.rows
                .clone()
                .listen(move |conn| this.serve_streams(conn)),
        );
    }

    fn inbox(&self) -> Option<Arc<dyn Inbox>> {
        self.inbox.get()?.upgrade()
    }

    fn read_datagrams(self: &Arc<Self>, conn: quinn::Connection) {
        let this = self.clone();
        tokio::spawn(async move {
            while let Ok(data) = conn.read_datagram().await {
                match this.inbox() {
                    Some(inbox) => inbox.datagram(data),
                    None => break,
                }
            }
        });
    }

    /// Serves the streams a peer opens on `conn` until it closes.
    fn serve_streams(self: &Arc<Self>, conn: quinn::Connection) {
        let this = self.clone();
        tokio::spawn(async move {
            let from = conn.remote_address();
            loop {
                let (send, mut recv) = tokio::select! {
                    uni = conn.accept_uni() => match uni {
                        Ok(recv) => (None, recv),
                        Err(_) => break,
                    },
                    bi = conn.accept_bi() => match bi {
                        Ok((send, recv)) => (Some(send), recv),
                        Err(_) => break,
                    },
                };
                let this = this.clone();
                tokio::spawn(async move {
                    let frame = match wire::read_frame(&mut recv).await {
                        Ok(f) => f,
                        Err(e) => return this.rows.refuse(from, &e.to_string()),
                    };
                    let Some(inbox) = this.inbox() else { return };
                    let reply = inbox.frame(from, frame).await;
                    if let (Some(mut send), Some(reply)) = (send, reply) {
                        let _ = wire::write_frame(&mut send, &reply).await;
                        let _ = send.finish();
                        let _ = send.stopped().await;
                    }
                });
            }
        });
    }

    async fn rows_conn(self: &Arc<Self>, to: SocketAddr) -> Result<quinn::Connection, String> {
        let (conn, new) = self.rows.connection(to).await?;
        if new {
            self.serve_streams(conn.clone());
        }
        Ok(conn)
    }
}

impl Transport for Arc<QuicTransport> {
    fn datagram(&self, to: SocketAddr, data: Bytes) {
        let this = self.clone();
        tokio::spawn(async move {
            match this.gossip.connection(to).await {
                Ok((conn, new)) => {
                    if new {
                        this.read_datagrams(conn.clone());
                    }
                    if let Err(e) = conn.send_datagram(data) {
                        tracing::debug!("cluster: SWIM packet to {to}: {e}");
                    }
                }
                Err(e) => tracing::debug!("cluster: SWIM cannot reach {to}: {e}"),
            }
        });
    }

    fn send(&self, to: SocketAddr, frame: Vec<u8>) -> BoxFuture<Result<(), String>> {
        let this = self.clone();
        Box::pin(async move {
            let conn = this.rows_conn(to).await?;
            let mut send = conn.open_uni().await.map_err(|e| e.to_string())?;
            wire::write_frame(&mut send, &frame)
                .await
                .map_err(|e| e.to_string())?;
            send.finish().map_err(|e| e.to_string())
        })
    }

    fn call(&self, to: SocketAddr, frame: Vec<u8>) -> BoxFuture<Result<Vec<u8>, String>> {
        let this = self.clone();
        Box::pin(async move {
            let conn = this.rows_conn(to).await?;
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            wire::write_frame(&mut send, &frame)
                .await
                .map_err(|e| e.to_string())?;
            send.finish().map_err(|e| e.to_string())?;
            tokio::time::timeout(CALL_TIMEOUT, wire::read_frame(&mut recv))
                .await
                .map_err(|_| format!("no answer within {CALL_TIMEOUT:?}"))?
                .map_err(|e| e.to_string())
        })
    }

    fn refused(&self) -> u64 {
        self.gossip.refused.load(Ordering::Relaxed) + self.rows.refused.load(Ordering::Relaxed)
    }

    fn wire_bytes(&self) -> Option<(u64, u64)> {
        let (g, r) = (self.gossip.wire_bytes(), self.rows.wire_bytes());
        Some((g.0 + r.0, g.1 + r.1))
    }
}
