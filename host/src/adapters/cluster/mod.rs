//! The fleet: every POP's routing table kept the same by SWIM membership (foca) and row
//! exchange over QUIC (quinn), mutually authenticated with the cluster CA.
//!
//! - `membership`: foca in one task, SWIM packets as QUIC datagrams (gossip endpoint).
//! - `sync`: fresh writes pushed to every member, anti-entropy rounds (transport endpoint).
//! - `tasks`: what runs in the background (local writes, rounds, purging); `store`: the
//!   routing file from blocking threads.
//! - `fleet`: policy deployments, POP reports and components (`PolicyFleet`).
//! - `wire`: every message, versioned; `tls`: credentials and the mTLS configs.
//! - `transport`: what carries messages (a trait), and an in-memory network with faults for
//!   tests and simulations; `quic`: the real one.
//!
//! The merge rule and clock are the domain's (`domain::replication`); the versions and the
//! capture of local writes live in the routing file (`sqlite_replica`). The proxy itself
//! knows nothing of this: it reloads the file when it changes, as for any other writer.

pub mod fleet;
pub mod membership;
pub mod pops;
pub mod quic;
mod store;
pub mod sync;
mod tasks;
pub mod tls;
pub mod transport;
pub mod wire;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use self::membership::{Identity, Input, Member};
use self::quic::{QuicEndpoint, QuicTransport};
use self::transport::{Inbox, Transport};
use crate::adapters::outbound::sqlite_fleet::SqliteFleet;
use crate::adapters::outbound::sqlite_replica::SqliteReplica;
use crate::adapters::outbound::sqlite_replica::{WallClock, wall_ms};
use crate::domain::ports::{ClusterStatus, ClusterView, MemberStatus};
use crate::domain::replication::{Head, NodeId, Seen, VersionedRow};
use crate::log_throttle::LogThrottle;

pub use self::store::{Store, Summary};
pub use self::tls::TlsFiles;

#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub node_name: String,
    pub cluster: String,
    pub gossip_addr: SocketAddr,
    pub transport_addr: SocketAddr,
    pub advertise_ip: Option<std::net::IpAddr>,
    pub bootstrap: Vec<String>,
    pub gossip_interval: Duration,
    pub sync_interval: Duration,
    pub max_skew: Duration,
    pub tombstone_ttl: Duration,
    /// None: plaintext mode (no authentication; chosen explicitly).
    pub tls: Option<TlsFiles>,
    pub db: PathBuf,
}

#[derive(Default)]
pub struct Stats {
    pub changes_sent: AtomicU64,
    pub changes_received: AtomicU64,
    pub changes_applied: AtomicU64,
    pub changes_rejected: AtomicU64,
    pub changes_ahead: AtomicU64,
    pub changes_superseded: AtomicU64,
    pub sync_rounds: AtomicU64,
    pub sync_failures: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub protocol_refused: AtomicU64,
}

/// At most ten items of a list, for a log line, with how many more there were.
fn capped<T: std::fmt::Debug>(items: &[T]) -> String {
    match items.len() {
        0..=10 => format!("{items:?}"),
        n => format!("{:?} and {} more", &items[..10], n - 10),
    }
}

/// A member reachable for rows.
#[derive(Debug, Clone)]
pub struct Peer {
    pub node: NodeId,
    pub name: String,
    pub transport: SocketAddr,
}

pub struct Inner {
    identity: Identity,
    /// Itself, for the inbox, which is called through `&self`.
    me: Weak<Inner>,
    store: Store,
    fleet: fleet::FleetStore,
    transport: Arc<dyn Transport>,
    swim: mpsc::Sender<Input>,
    members: watch::Receiver<Vec<Member>>,
    pub stats: Stats,
    last_sync: Mutex<HashMap<NodeId, SystemTime>>,
    /// Each peer's wall clock less this POP's, as last reported in a sync (ms).
    clocks: Mutex<HashMap<NodeId, i64>>,
    /// Whether each peer's table digest equalled this POP's at its last sync request.
    same_table: Mutex<HashMap<NodeId, bool>>,
    /// The runtime the cluster's tasks and connections run on: work asked for from the
    /// proxy's runtime (deploys, fetches, reports) is handed to it.
    runtime: tokio::runtime::Handle,
    /// When this POP last saw each POP name in the membership (to forget reports).
    members_seen: Mutex<HashMap<String, tokio::time::Instant>>,
    wall: WallClock,
    reject_log: LogThrottle,
    refusal_log: LogThrottle,
}

impl Inner {
    fn alive_peers(&self) -> Vec<Peer> {
        self.members
            .borrow()
            .iter()
            .filter(|m| m.state != foca::State::Down)
            .map(|m| Peer {
                node: m.id.node,
                name: m.id.name.clone(),
                transport: m.id.transport,
            })
            .collect()
    }

    fn peer_clock(&self, node: NodeId, wall: u64) {
        let offset = wall as i64 - (self.wall)() as i64;
        self.clocks
            .lock()
            .expect("clocks lock")
            .insert(node, offset);
    }

    /// The lower median of this POP's clock and its live peers' (as an offset from this
    /// POP's): with three POPs or more, no single peer's clock can move it past the others'.
    /// With two, it is the earlier of the two, so a peer ahead is never followed.
    fn fleet_offset(&self) -> i64 {
        let clocks = self.clocks.lock().expect("clocks lock");
        let mut offsets: Vec<i64> = self
            .alive_peers()
            .iter()
            .filter_map(|p| clocks.get(&p.node).copied())
            .chain([0])
            .collect();
        offsets.sort_unstable();
        offsets[(offsets.len() - 1) / 2]
    }

    fn synced_with(&self, node: NodeId) {
        self.last_sync
            .lock()
            .expect("sync times lock")
            .insert(node, SystemTime::now());
    }

    /// Why the POP `peer` (proved by its certificate) may not speak for `node`: the id is
    /// this POP's, or a member of another name holds it.
    fn impersonates(&self, node: NodeId, peer: &str) -> Option<String> {
        let holder = match node == self.identity.node {
            true => Some(self.identity.name.clone()),
            // A down member's id is free again: a POP renamed (a new certificate on the
            // same routing file) keeps its id.
            false => self
                .members
                .borrow()
                .iter()
                .find(|m| m.id.node == node && m.state != foca::State::Down)
                .map(|m| m.id.name.clone()),
        };
        holder.filter(|h| h != peer).map(|h| {
            format!("the certificate of {peer:?} speaks for node {node}, which is {h:?}'s")
        })
    }

    /// A peer that authenticated but spoke another schema or garbage, or for another POP.
    fn protocol_refusal(&self, from: impl std::fmt::Display, reason: &str) {
        self.stats.protocol_refused.fetch_add(1, Ordering::Relaxed);
        if let Some(held) = self.refusal_log.allow() {
            tracing::warn!(
                peer = %from,
                "cluster: refused a message from {from}: {reason} ({held} earlier held back)"
            );
        }
    }

    /// Merges rows from `origin` (and marks `cleared` seen), counting and reporting what
    /// was refused; an error (the file could not take them) fails the caller's round.
    async fn apply(
        self: &Arc<Self>,
        origin: NodeId,
        rows: Vec<VersionedRow>,
        cleared: Seen,
    ) -> Result<(), String> {
        if rows.is_empty() && cleared.is_empty() {
            return Ok(());
        }
        let offset = self.fleet_offset();
        let out = self
            .store
            .run(move |r| {
                r.set_fleet_offset(offset);
                r.apply(rows, &cleared)
            })
            .await
            .map_err(|e| e.to_string())?;
        tracing::debug!(
            "cluster: from {origin}: {} applied, {} stale",
            out.applied.len(),
            out.stale
        );
        let s = &self.stats;
        s.changes_applied
            .fetch_add(out.applied.len() as u64, Ordering::Relaxed);
        s.changes_rejected
            .fetch_add(out.rejected.len() as u64, Ordering::Relaxed);
        s.changes_ahead
            .fetch_add(out.ahead.len() as u64, Ordering::Relaxed);
        if (!out.rejected.is_empty() || !out.ahead.is_empty())
            && let Some(held) = self.reject_log.allow()
        {
            let ahead: Vec<String> = out
                .ahead
                .iter()
                .map(|(id, a)| format!("{id}: {a}"))
                .collect();
            tracing::warn!(
                origin = %origin,
                "cluster: refused rows from node {origin}: {} invalid {}; {} clock ahead {} \
                 (the fleet's median clock is {offset} ms from this POP's; {held} earlier \
                 reports held back)",
                out.rejected.len(),
                capped(&out.rejected),
                ahead.len(),
                capped(&ahead),
            );
        }
        if !out.stamped.is_empty() {
            self.broadcast(out.stamped);
        }
        Ok(())
    }

    /// Drops the live rows `peer`'s head shows it saw superseded.
    async fn drop_superseded(self: &Arc<Self>, peer: &Peer, head: Arc<Head>) -> Result<(), String> {
        let out = self
            .store
            .run(move |r| r.drop_superseded(&head))
            .await
            .map_err(|e| e.to_string())?;
        if !out.superseded.is_empty() {
            self.stats
                .changes_superseded
                .fetch_add(out.superseded.len() as u64, Ordering::Relaxed);
            tracing::info!(
                "cluster: dropped {} row(s) that {} saw superseded (deleted while this POP was \
                 away, their tombstones since purged): {}",
                out.superseded.len(),
                peer.name,
                capped(&out.superseded)
            );
        }
        if !out.stamped.is_empty() {
            self.broadcast(out.stamped);
        }
        Ok(())
    }

    fn broadcast(self: &Arc<Self>, rows: Vec<VersionedRow>) {
        self.stats
            .changes_sent
            .fetch_add(rows.len() as u64, Ordering::Relaxed);
        sync::push(self, self.identity.node, rows, self.alive_peers());
    }
}

/// A running cluster member; dropping it does not stop it, `stop` (the token) does.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
    /// The thread the cluster runs on (none for an in-memory node).
    thread: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
    /// Copies of the gossip and transport sockets, for a process taking this POP over.
    udp: Arc<Vec<std::os::fd::OwnedFd>>,
}

/// The fleet file beside the routing file, for the same node.
fn open_fleet(replica: &SqliteReplica, max_skew: Duration) -> anyhow::Result<SqliteFleet> {
    let path = crate::adapters::outbound::sqlite_fleet::path_for(replica.path());
    Ok(SqliteFleet::open(&path, replica.node(), max_skew)?)
}

/// Resolves `host:port` entries; a name that does not resolve now is tried again later.
async fn resolve(entries: &[String]) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for e in entries {
        match tokio::net::lookup_host(e.as_str()).await {
            Ok(addrs) => out.extend(addrs),
            Err(err) => tracing::debug!("cluster: bootstrap peer {e}: {err}"),
        }
    }
    out
}

impl ClusterView for Cluster {
    fn status(&self) -> ClusterStatus {
        Cluster::status(self)
    }
}

/// One node's part in the cluster, whatever carries its messages.
#[derive(Clone)]
pub struct Node {
    pub name: String,
    /// Where peers reach it for SWIM and for rows.
    pub gossip: SocketAddr,
    pub transport: SocketAddr,
    pub seeds: Vec<String>,
    pub gossip_interval: Duration,
    pub sync_interval: Duration,
    pub tombstone_ttl: Duration,
    /// Longest time between two looks for tombstones to purge (an hour in production).
    pub purge_every: Duration,
    /// This POP's wall clock (tests drive their own).
    pub wall: WallClock,
}

impl Cluster {
    /// Opens the routing file for replication, binds both QUIC endpoints and starts the
    /// tasks; they end with `stop`. Errors (credentials, addresses, database) come back here.
    ///
    /// The cluster runs on a thread of its own: TLS handshakes (which anyone who can send
    /// a packet may start), SWIM and sync rounds never queue on the proxy's workers, nor
    /// connections behind them.
    ///
    /// `sockets` (gossip, transport) are those of the process this one takes over from;
    /// none: bound here.
    pub async fn start(
        cfg: ClusterConfig,
        sockets: Option<[std::net::UdpSocket; 2]>,
        stop: CancellationToken,
    ) -> anyhow::Result<Self> {
        let (started, result) = tokio::sync::oneshot::channel();
        let until = stop.clone();
        let thread = std::thread::Builder::new()
            .name("edgeproxy-cluster".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = started.send(Err(anyhow::Error::new(e).context("its runtime")));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let cluster = Self::start_here(cfg, sockets, until.clone()).await;
                    let up = cluster.is_ok();
                    if started.send(cluster).is_err() || !up {
                        return;
                    }
                    until.cancelled().await;
                    // The SWIM leave message and the endpoints' close go out first.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                })
            })
            .context("the cluster's thread")?;
        let cluster = result.await.context("the cluster's thread ended")??;
        *cluster.thread.lock().expect("thread lock") = Some(thread);
        Ok(cluster)
    }

    /// Waits for the cluster's thread to end, once `stop` was cancelled (a blocking call).
    pub fn join(&self) {
        if let Some(t) = self.thread.lock().expect("thread lock").take() {
            let _ = t.join();
        }
    }

    /// Once joined: leaves the routing file to another process's replicator (the one
    /// taking this POP over), and returns copies of the gossip and transport sockets for
    /// it. Nothing reads them here any more (their tasks ended with the thread), so the
    /// datagrams that arrive meanwhile wait for the new process.
    pub fn release(&self) -> Vec<std::os::fd::OwnedFd> {
        self.inner.store.release();
        self.udp
            .iter()
            .filter_map(|fd| fd.try_clone().ok())
            .collect()
    }

    /// What [`Self::start`] reads before it binds: the credentials.
    pub fn check(cfg: &ClusterConfig) -> anyhow::Result<()> {
        match &cfg.tls {
            Some(files) => tls::quic_configs(files, &cfg.cluster, &cfg.node_name).map(drop),
            None => tls::plaintext_configs(&cfg.cluster).map(drop),
        }
    }

    async fn start_here(
        cfg: ClusterConfig,
        sockets: Option<[std::net::UdpSocket; 2]>,
        stop: CancellationToken,
    ) -> anyhow::Result<Self> {
        let (server, client) = match &cfg.tls {
            Some(files) => tls::quic_configs(files, &cfg.cluster, &cfg.node_name)?,
            None => {
                tracing::warn!(
                    "cluster: PLAINTEXT MODE (cluster_plaintext): POPs do not authenticate each \
                     other; any process that reaches {} or {} and knows the cluster name can read \
                     and write the routing table. Use it only where WireGuard authenticates every peer.",
                    cfg.gossip_addr,
                    cfg.transport_addr
                );
                tls::plaintext_configs(&cfg.cluster)?
            }
        };
        let replica = SqliteReplica::open(&cfg.db, cfg.max_skew)?;
        let fleet = open_fleet(&replica, cfg.max_skew)?;
        // Handed over only where this process is configured alike.
        let sockets = sockets.filter(|[g, r]| {
            g.local_addr().ok() == Some(cfg.gossip_addr)
                && r.local_addr().ok() == Some(cfg.transport_addr)
        });
        let [gossip, rows] = match sockets {
            Some(s) => s,
            None => [
                std::net::UdpSocket::bind(cfg.gossip_addr)
                    .with_context(|| format!("cluster gossip address {}", cfg.gossip_addr))?,
                std::net::UdpSocket::bind(cfg.transport_addr)
                    .with_context(|| format!("cluster transport address {}", cfg.transport_addr))?,
            ],
        };
        let udp = vec![gossip.try_clone()?.into(), rows.try_clone()?.into()];
        let gossip = QuicEndpoint::bind(
            "gossip",
            gossip,
            server.clone(),
            client.clone(),
            wire::alpn(&cfg.cluster),
            cfg.tls.as_ref().map(|_| cfg.cluster.clone()),
        )
        .with_context(|| format!("cluster gossip address {}", cfg.gossip_addr))?;
        let rows = QuicEndpoint::bind(
            "transport",
            rows,
            server,
            client,
            wire::alpn(&cfg.cluster),
            cfg.tls.as_ref().map(|_| cfg.cluster.clone()),
        )
        .with_context(|| format!("cluster transport address {}", cfg.transport_addr))?;
        let seeds = resolve(&cfg.bootstrap).await;
        let node = Node {
            name: cfg.node_name.clone(),
            gossip: advertised(gossip.local_addr(), cfg.advertise_ip, &seeds)?,
            transport: advertised(rows.local_addr(), cfg.advertise_ip, &seeds)?,
            seeds: cfg.bootstrap.clone(),
            gossip_interval: cfg.gossip_interval,
            sync_interval: cfg.sync_interval,
            tombstone_ttl: cfg.tombstone_ttl,
            purge_every: Duration::from_secs(3600),
            wall: crate::adapters::outbound::sqlite_replica::system_clock(),
        };
        tracing::info!(
            node = %replica.node(),
            "cluster: {} joining cluster {:?} (gossip {}, transport {})",
            node.name,
            cfg.cluster,
            node.gossip,
            node.transport
        );
        let quic = QuicTransport::new(gossip, rows);
        if let Some(files) = cfg.tls.clone() {
            tokio::spawn(quic::follow_credentials(
                quic.clone(),
                files,
                cfg.cluster.clone(),
                cfg.node_name.clone(),
                stop.clone(),
            ));
        }
        let serving = quic.clone();
        let mut cluster = Self::launch(
            node,
            replica,
            fleet,
            move |inbox| {
                serving.serve(inbox);
                Arc::new(serving)
            },
            stop.clone(),
        );
        cluster.udp = Arc::new(udp);
        tokio::spawn(async move {
            stop.cancelled().await;
            // Let the SWIM leave message go out first.
            tokio::time::sleep(Duration::from_millis(100)).await;
            quic.gossip.close();
            quic.rows.close();
        });
        Ok(cluster)
    }

    /// A node on an in-memory network (tests, simulations): real membership, merge and
    /// routing file, no sockets. Its gossip and transport addresses are `addr` and the next
    /// port.
    pub fn in_memory(
        net: &Arc<transport::MemoryNetwork>,
        node: Node,
        db: &std::path::Path,
        stop: CancellationToken,
    ) -> anyhow::Result<(Self, Arc<transport::MemoryTransport>)> {
        let replica = SqliteReplica::open_with(db, Duration::from_secs(60), node.wall.clone())?;
        let fleet = open_fleet(&replica, Duration::from_secs(60))?;
        let (addrs, name) = ([node.gossip, node.transport], node.name.clone());
        let slot = Arc::new(Mutex::new(None));
        let keep = slot.clone();
        let cluster = Self::launch(
            node,
            replica,
            fleet,
            move |inbox| {
                let t = net.attach(&addrs, &name, inbox);
                *keep.lock().expect("slot") = Some(t.clone());
                t
            },
            stop,
        );
        let t = slot.lock().expect("slot").take().expect("attached");
        Ok((cluster, t))
    }

    /// Starts a node on `replica` over the transport `connect` makes (given where to
    /// deliver what arrives); the tasks end with `stop`.
    pub fn launch(
        node: Node,
        replica: SqliteReplica,
        fleet: SqliteFleet,
        connect: impl FnOnce(Weak<dyn Inbox>) -> Arc<dyn Transport>,
        stop: CancellationToken,
    ) -> Self {
        let identity = Identity {
            node: replica.node(),
            name: node.name.clone(),
            gossip: node.gossip,
            transport: node.transport,
            bump: wall_ms(),
        };
        let seeds = [node.seeds.clone(), replica.known_peers()].concat();
        let inner = Arc::new_cyclic(|me: &Weak<Inner>| {
            let transport = connect(me.clone() as Weak<dyn Inbox>);
            let membership = membership::start(
                identity.clone(),
                node.gossip_interval,
                transport.clone(),
                stop.clone(),
            );
            Inner {
                identity,
                me: me.clone(),
                store: Store::new(replica),
                fleet: fleet::FleetStore::new(fleet),
                transport,
                swim: membership.inputs,
                members: membership.members,
                stats: Stats::default(),
                last_sync: Mutex::default(),
                clocks: Mutex::default(),
                same_table: Mutex::default(),
                runtime: tokio::runtime::Handle::current(),
                members_seen: Mutex::default(),
                wall: node.wall.clone(),
                reject_log: LogThrottle::new(Duration::from_secs(60)),
                refusal_log: LogThrottle::new(Duration::from_secs(60)),
            }
        });
        tokio::spawn(tasks::watch_local_writes(inner.clone(), stop.clone()));
        tokio::spawn(tasks::anti_entropy(
            inner.clone(),
            seeds,
            node.sync_interval,
            stop.clone(),
        ));
        tokio::spawn(tasks::purge_tombstones(
            inner.clone(),
            node.tombstone_ttl,
            node.purge_every,
            stop,
        ));
        Self {
            inner,
            thread: Arc::default(),
            udp: Arc::default(),
        }
    }

    /// Where peers reach this POP's transport (its cluster address).
    pub fn advertised(&self) -> SocketAddr {
        self.inner.identity.transport
    }

    pub fn status(&self) -> ClusterStatus {
        let inner = &self.inner;
        let last_sync = inner.last_sync.lock().expect("sync times lock").clone();
        let same_table = inner.same_table.lock().expect("digests lock").clone();
        let now = SystemTime::now();
        let members = inner
            .members
            .borrow()
            .iter()
            .map(|m| MemberStatus {
                name: m.id.name.clone(),
                node: m.id.node.to_string(),
                gossip: m.id.gossip,
                transport: m.id.transport,
                state: format!("{:?}", m.state).to_lowercase(),
                last_sync_secs_ago: last_sync
                    .get(&m.id.node)
                    .and_then(|t| now.duration_since(*t).ok())
                    .map(|d| d.as_secs_f64()),
                // A member not alive holds what it held: not compared any more.
                same_table: same_table
                    .get(&m.id.node)
                    .copied()
                    .filter(|_| m.state == foca::State::Alive),
            })
            .collect();
        let Summary {
            rows,
            tombstones,
            digest,
            clock,
        } = (*inner.store.summary()).clone();
        let s = &inner.stats;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let wire = inner.transport.wire_bytes();
        let records = inner.fleet.records();
        ClusterStatus {
            node: inner.identity.node.to_string(),
            name: inner.identity.name.clone(),
            gossip: inner.identity.gossip,
            transport: inner.identity.transport,
            members,
            rows,
            tombstones,
            digest,
            clock,
            last_sync_secs_ago: last_sync
                .values()
                .max()
                .and_then(|t| now.duration_since(*t).ok())
                .map(|d| d.as_secs_f64()),
            changes_sent: load(&s.changes_sent),
            changes_received: load(&s.changes_received),
            changes_applied: load(&s.changes_applied),
            changes_rejected: load(&s.changes_rejected),
            changes_clock_ahead: load(&s.changes_ahead),
            changes_superseded: load(&s.changes_superseded),
            stream_errors: inner.transport.stream_errors(),
            sync_rounds: load(&s.sync_rounds),
            sync_failures: load(&s.sync_failures),
            bytes_in: load(&s.bytes_in),
            bytes_out: load(&s.bytes_out),
            wire_bytes_in: wire.map(|w| w.0),
            wire_bytes_out: wire.map(|w| w.1),
            peers_refused: inner.transport.refused() + load(&s.protocol_refused),
            deployments: crate::domain::rollout::deployments(records.records.iter())
                .into_iter()
                .cloned()
                .collect(),
            policies: records
                .records
                .iter()
                .filter_map(|r| match &r.value {
                    crate::domain::rollout::FleetValue::Pop(p) => Some(p.clone()),
                    _ => None,
                })
                .collect(),
        }
    }
}

/// The address peers reach `bound` at: its own IP unless that is a wildcard, then the
/// configured one, or the one this host routes to the first bootstrap peer from (no packet
/// is sent: connecting a UDP socket only picks the route).
fn advertised(
    bound: SocketAddr,
    ip: Option<std::net::IpAddr>,
    seeds: &[SocketAddr],
) -> anyhow::Result<SocketAddr> {
    if !bound.ip().is_unspecified() {
        return Ok(bound);
    }
    let ip = match (ip, seeds.first()) {
        (Some(ip), _) => ip,
        (None, Some(seed)) => {
            let probe = std::net::UdpSocket::bind(SocketAddr::new(bound.ip(), 0))?;
            probe.connect(seed)?;
            probe.local_addr()?.ip()
        }
        (None, None) => anyhow::bail!(
            "cluster addresses are bound to {} and there is no bootstrap peer to find this POP's \
             address from; set cluster advertise_ip (EDGEPROXY_REPLICATION_ADVERTISE_IP) to the \
             address other POPs reach this one at",
            bound.ip()
        ),
    };
    Ok(SocketAddr::new(ip, bound.port()))
}
