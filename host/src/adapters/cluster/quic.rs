//! The cluster over QUIC (quinn): an endpoint that both listens and dials, with a
//! connection per peer address reused in both directions and the count of peers refused at
//! the handshake; two of them (gossip, rows) make the `Transport`.
//!
//! Budgets, so no peer (nor anyone who can send a packet) holds more than its share:
//! - an address must answer a QUIC Retry before it costs a handshake, at most
//!   [`MAX_HANDSHAKES`] run at once, each within [`HANDSHAKE_TIMEOUT`];
//! - at most [`MAX_CONNECTIONS`] connections in all and [`MAX_PER_IP`] from one address;
//! - the gossip endpoint takes no streams (datagrams only); the rows endpoint takes a few,
//!   with bounded flow-control windows ([`RECEIVE_WINDOW`] a connection);
//! - frames peers send are read within a deadline, at most `wire::MAX_INBOUND` each and
//!   [`CONNECTION_BUDGET`] bytes at once per connection.
//!
//! So one peer address holds at most `MAX_PER_IP * (CONNECTION_BUDGET + RECEIVE_WINDOW)`
//! (48 MiB) of this POP's memory, and cannot take what other peers' connections use.

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
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
pub const MAX_HANDSHAKES: usize = 32;
pub const MAX_CONNECTIONS: usize = 512;
/// A POP needs one connection from a peer's endpoint, two while both dial at once.
pub const MAX_PER_IP: usize = 4;
/// Bytes of frames one connection's streams hold at once.
pub const CONNECTION_BUDGET: usize = 8 << 20;
/// Unread bytes quinn holds for one connection (its flow-control window).
pub const RECEIVE_WINDOW: u32 = 4 << 20;

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
    /// Streams that failed or timed out, and connections refused over a cap (apart from
    /// authentication refusals).
    pub stream_errors: AtomicU64,
    handshakes: Arc<tokio::sync::Semaphore>,
    /// The cluster a peer's certificate must name (None in plaintext mode: no certificates).
    cluster: Option<String>,
    /// What dialling uses; replaced, as the server side is, when certificates rotate.
    client: Mutex<quinn::ClientConfig>,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// Flow control and stream limits for an endpoint's role.
fn transport(role: &str) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    // Idle links are kept open by SWIM itself; a dead peer's connection goes after 30 s.
    t.max_idle_timeout(Some(Duration::from_secs(30).try_into().expect("30 s fits")));
    t.keep_alive_interval(Some(Duration::from_secs(10)));
    if role == "gossip" {
        t.max_concurrent_bidi_streams(0u32.into());
        t.max_concurrent_uni_streams(0u32.into());
        t.datagram_receive_buffer_size(Some(256 << 10));
    } else {
        t.max_concurrent_bidi_streams(16u32.into());
        t.max_concurrent_uni_streams(32u32.into());
        t.stream_receive_window((1u32 << 20).into());
        t.receive_window(RECEIVE_WINDOW.into());
        t.datagram_receive_buffer_size(None);
    }
    Arc::new(t)
}

impl QuicEndpoint {
    pub fn bind(
        role: &'static str,
        socket: std::net::UdpSocket,
        mut server: quinn::ServerConfig,
        mut client: quinn::ClientConfig,
        alpn: Vec<u8>,
        cluster: Option<String>,
    ) -> std::io::Result<Self> {
        Self::limit(role, &mut server, &mut client);
        let runtime = quinn::default_runtime()
            .ok_or_else(|| std::io::Error::other("no async runtime for QUIC"))?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server),
            socket,
            runtime,
        )?;
        Ok(Self {
            client: Mutex::new(client),
            role,
            endpoint,
            conns: Mutex::default(),
            refused: AtomicU64::new(0),
            refusal_logged: Mutex::default(),
            retired: Mutex::default(),
            alpn,
            stream_errors: AtomicU64::new(0),
            handshakes: Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES)),
            cluster,
            per_ip: Arc::default(),
        })
    }

    fn limit(role: &str, server: &mut quinn::ServerConfig, client: &mut quinn::ClientConfig) {
        server.transport_config(transport(role));
        client.transport_config(transport(role));
        server.max_incoming(MAX_HANDSHAKES * 4);
    }

    /// New credentials (rotated certificate files): new handshakes use them at once,
    /// established connections go on until they end.
    pub fn reconfigure(&self, mut server: quinn::ServerConfig, mut client: quinn::ClientConfig) {
        Self::limit(self.role, &mut server, &mut client);
        self.endpoint.set_server_config(Some(server));
        *self.client.lock().expect("client config lock") = client;
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
        let config = self.client.lock().expect("client config lock").clone();
        let connecting = self
            .endpoint
            .connect_with(config, addr, SERVER_NAME)
            .map_err(|e| e.to_string())?;
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| format!("no answer within {CONNECT_TIMEOUT:?}"))?
            .map_err(|e| e.to_string())?;
        if let Some(reason) = self.foreign(&conn) {
            self.refuse(addr, &reason);
            return Err(reason);
        }
        close_at_expiry(&conn);
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
            let from = incoming.remote_address();
            // A spoofed source never answers the Retry, so it never costs a handshake.
            if !incoming.remote_address_validated() && incoming.may_retry() {
                let _ = incoming.retry();
                continue;
            }
            let over = self.endpoint.open_connections() > MAX_CONNECTIONS
                || self
                    .per_ip
                    .lock()
                    .expect("per-ip lock")
                    .get(&from.ip())
                    .copied()
                    .unwrap_or(0)
                    >= MAX_PER_IP;
            let permit = match over {
                true => None,
                false => self.handshakes.clone().try_acquire_owned().ok(),
            };
            let Some(permit) = permit else {
                self.stream_errors.fetch_add(1, Ordering::Relaxed);
                incoming.refuse();
                continue;
            };
            let (this, on_peer) = (self.clone(), on_peer.clone());
            tokio::spawn(async move {
                let done = tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await;
                drop(permit);
                match done {
                    Ok(Ok(conn)) => {
                        if let Some(reason) = this.foreign(&conn) {
                            return this.refuse(from, &reason);
                        }
                        close_at_expiry(&conn);
                        this.count_ip(&conn);
                        let slot = this.slot(conn.remote_address());
                        this.hold(&mut *slot.lock().await, conn.clone());
                        on_peer(conn);
                    }
                    Ok(Err(e)) => this.refuse(from, &e.to_string()),
                    Err(_) => this.refuse(from, "handshake not done in time"),
                }
            });
        }
    }

    /// Why a peer that completed the handshake is not of this cluster (its certificate
    /// names another, or none); the connection is closed.
    fn foreign(&self, conn: &quinn::Connection) -> Option<String> {
        let reason = super::tls::wrong_cluster(conn.peer_identity(), self.cluster.as_deref()?)?;
        conn.close(1u32.into(), b"certificate of another cluster");
        Some(reason)
    }

    /// The POP `conn`'s certificate names (None in plaintext mode, where nothing is
    /// checked).
    pub fn peer_name(&self, conn: &quinn::Connection) -> Option<Arc<str>> {
        self.cluster.as_ref()?;
        Some(
            super::tls::peer_name(conn.peer_identity())
                .unwrap_or_default()
                .into(),
        )
    }

    /// Counts an accepted connection against its address until it closes.
    fn count_ip(&self, conn: &quinn::Connection) {
        let ip = conn.remote_address().ip();
        *self
            .per_ip
            .lock()
            .expect("per-ip lock")
            .entry(ip)
            .or_default() += 1;
        let (per_ip, conn) = (self.per_ip.clone(), conn.clone());
        tokio::spawn(async move {
            conn.closed().await;
            let mut m = per_ip.lock().expect("per-ip lock");
            if let Some(n) = m.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&ip);
                }
            }
        });
    }

    /// A stream that failed, or a connection over a cap: counted, logged at debug.
    pub fn stream_error(&self, from: SocketAddr, reason: &str) {
        self.stream_errors.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(peer = %from, endpoint = self.role, "cluster: stream from {from}: {reason}");
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
            let peer = this.gossip.peer_name(&conn);
            while let Ok(data) = conn.read_datagram().await {
                match this.inbox() {
                    Some(inbox) => inbox.datagram(conn.remote_address(), data, peer.as_deref()),
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
            let peer = this.rows.peer_name(&conn);
            let budget = Arc::new(tokio::sync::Semaphore::new(CONNECTION_BUDGET));
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
                let (this, budget, peer) = (this.clone(), budget.clone(), peer.clone());
                tokio::spawn(async move {
                    let rows = &this.rows;
                    let len = match wire::read_len(&mut recv, wire::MAX_INBOUND).await {
                        Ok(n) => n,
                        Err(e) => return rows.stream_error(from, &e.to_string()),
                    };
                    // The frame's bytes come out of its connection's budget while it is
                    // read and handled; waiting for budget counts against the deadline.
                    let read = async {
                        let permit = budget
                            .acquire_many_owned(len.max(1) as u32)
                            .await
                            .map_err(|e| e.to_string())?;
                        let frame = wire::read_body(&mut recv, len)
                            .await
                            .map_err(|e| e.to_string())?;
                        Ok::<_, String>((permit, frame))
                    };
                    let (_permit, frame) = match tokio::time::timeout(wire::FRAME_TIMEOUT, read)
                        .await
                        .unwrap_or_else(|_| {
                            Err(format!("frame not done within {:?}", wire::FRAME_TIMEOUT))
                        }) {
                        Ok(read) => read,
                        Err(e) => return rows.stream_error(from, &e),
                    };
                    let Some(inbox) = this.inbox() else { return };
                    let reply = inbox.frame(from, peer, frame).await;
                    if let (Some(mut send), Some(reply)) = (send, reply) {
                        if let Err(e) = wire::write_frame(&mut send, &reply).await {
                            return rows.stream_error(from, &e.to_string());
                        }
                        let _ = send.finish();
                        let _ = tokio::time::timeout(wire::FRAME_TIMEOUT, send.stopped()).await;
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
            let mut send = tokio::time::timeout(wire::FRAME_TIMEOUT, conn.open_uni())
                .await
                .map_err(|_| "the peer grants no stream".to_owned())?
                .map_err(|e| e.to_string())?;
            wire::write_frame(&mut send, &frame)
                .await
                .map_err(|e| e.to_string())?;
            send.finish().map_err(|e| e.to_string())
        })
    }

    fn call(
        &self,
        to: SocketAddr,
        name: &str,
        frame: Vec<u8>,
    ) -> BoxFuture<Result<Vec<u8>, String>> {
        let (this, name) = (self.clone(), name.to_owned());
        Box::pin(async move {
            let conn = this.rows_conn(to).await?;
            // An answer speaks for the POP asked only if its certificate names that POP.
            if let Some(presented) = this.rows.peer_name(&conn)
                && *presented != *name
            {
                return Err(format!(
                    "{to} presents the certificate of POP {presented:?}, not of {name:?}"
                ));
            }
            let (mut send, mut recv) = tokio::time::timeout(wire::FRAME_TIMEOUT, conn.open_bi())
                .await
                .map_err(|_| "the peer grants no stream".to_owned())?
                .map_err(|e| e.to_string())?;
            wire::write_frame(&mut send, &frame)
                .await
                .map_err(|e| e.to_string())?;
            send.finish().map_err(|e| e.to_string())?;
            tokio::time::timeout(CALL_TIMEOUT, wire::read_frame(&mut recv, wire::MAX_FRAME))
                .await
                .map_err(|_| format!("no answer within {CALL_TIMEOUT:?}"))?
                .map_err(|e| e.to_string())
        })
    }

    fn refused(&self) -> u64 {
        self.gossip.refused.load(Ordering::Relaxed) + self.rows.refused.load(Ordering::Relaxed)
    }

    fn stream_errors(&self) -> u64 {
        self.gossip.stream_errors.load(Ordering::Relaxed)
            + self.rows.stream_errors.load(Ordering::Relaxed)
    }

    fn wire_bytes(&self) -> Option<(u64, u64)> {
        let (g, r) = (self.gossip.wire_bytes(), self.rows.wire_bytes());
        Some((g.0 + r.0, g.1 + r.1))
    }
}

/// Closes `conn` when the peer's certificate expires: a handshake checked it once, and a
/// connection must not outlive it (the peer reconnects with a valid one, or not at all).
fn close_at_expiry(conn: &quinn::Connection) {
    let Some(left) = super::tls::expires_in(conn.peer_identity()) else {
        return;
    };
    // tokio's timer reaches about two years: a connection a year old is closed and dialled
    // anew, which costs one handshake.
    let left = left.min(Duration::from_secs(365 * 86_400));
    let conn = conn.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::time::sleep(left) => conn.close(2u32.into(), b"certificate expired"),
            _ = conn.closed() => {}
        }
    });
}

/// Follows the credential files: when the CA, certificate or key changes (looked at every
/// second), both endpoints take the new ones for every new handshake, without a restart. A
/// set that does not load (half written, a key that does not match) is logged and the
/// running one kept; it is tried again at the next change.
pub async fn follow_credentials(
    transport: Arc<QuicTransport>,
    files: super::TlsFiles,
    cluster: String,
    node: String,
    stop: tokio_util::sync::CancellationToken,
) {
    let stamp = |files: &super::TlsFiles| {
        [&files.ca, &files.cert, &files.key].map(|p| {
            std::fs::metadata(p)
                .and_then(|m| Ok((m.modified()?, m.len())))
                .ok()
        })
    };
    let mut seen = stamp(&files);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = stamp(&files);
        if now == seen {
            continue;
        }
        seen = now;
        match super::tls::quic_configs(&files, &cluster, &node) {
            Ok((server, client)) => {
                transport.gossip.reconfigure(server.clone(), client.clone());
                transport.rows.reconfigure(server, client);
                tracing::info!(
                    "cluster: credentials reloaded from {} (new connections use them)",
                    files.cert.display()
                );
            }
            Err(e) => {
                tracing::error!("cluster: new credentials not taken, the running ones kept: {e:#}")
            }
        }
    }
}
