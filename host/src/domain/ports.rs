//! The ports: what the domain and the proxy service need from the outside world.
//!
//! In-memory ports are synchronous; `BackendRepository::load` does blocking I/O and is
//! called from a blocking thread by the reloader, never from the accept path.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;

use tokio::time::Instant;

use super::model::{Backend, BackendId, Client, CountryCode, Region};
use super::routing_table::{RoutedBackend, RoutingTable};

/// A row that could not become a `Backend`, with the reason, for the reload log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SkippedRow {
    pub id: String,
    pub reason: String,
}

#[derive(Debug, Default)]
pub struct LoadedBackends {
    pub backends: Vec<Backend>,
    pub skipped: Vec<SkippedRow>,
}

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("cannot read routing table {location}: {reason}")]
    Unreadable { location: String, reason: String },
    #[error("routing table {location} has the wrong schema: {reason}")]
    Schema { location: String, reason: String },
}

/// Source of the routing table.
pub trait BackendRepository: Send + Sync {
    /// Reads the whole table (blocking). Bad rows are skipped and reported; an unreadable
    /// source is an error and the caller keeps its last good snapshot.
    fn load(&self) -> Result<LoadedBackends, RoutingError>;
    /// Something that changes whenever the source is written (cheap, no load): a reload
    /// after a change notification waits until it stops changing, so a file copied in
    /// place is not read half-written. None: the source cannot tell.
    fn marker(&self) -> Option<String> {
        None
    }
}

/// Who a binding belongs to: one client IP on one app.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BindingKey {
    pub client: IpAddr,
    pub app: Option<Arc<str>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BindingEntry {
    pub key: BindingKey,
    pub backend: BackendId,
    pub expires_in: std::time::Duration,
}

/// Sticky client -> backend bindings with a TTL refreshed on use.
pub trait BindingRepository: Send + Sync {
    /// The bound backend if the binding has not expired; refreshes its TTL.
    fn get(&self, key: &BindingKey, now: Instant) -> Option<BackendId>;
    fn put(&self, key: BindingKey, backend: BackendId, now: Instant);
    fn remove(&self, key: &BindingKey);
    /// Drops expired bindings; returns how many.
    fn purge_expired(&self, now: Instant) -> usize;
    /// Live bindings ordered by client then app, `limit` of them from `offset`, and how
    /// many there are in all.
    fn page(&self, offset: usize, limit: usize, now: Instant) -> (usize, Vec<BindingEntry>);
    /// Every live binding, in no order (handed to a process taking over).
    fn export(&self, now: Instant) -> Vec<BindingEntry>;
    /// Puts a binding another process held, with what was left of its lifetime (at most
    /// this table's TTL).
    fn restore(&self, entry: BindingEntry, now: Instant);
    /// Drops every binding of `client` (all apps); returns how many.
    fn remove_client(&self, client: IpAddr) -> usize;
    /// Drops every binding; returns how many. Bumps `generation` first.
    fn clear(&self) -> usize;
    /// How many `clear`s so far. A pick made before a clear must not stay bound after
    /// it: a caller reads this before deciding and binds with `put_unless_cleared`.
    fn generation(&self) -> u64;
    /// `put`, unless a `clear` came since `generation` was read, checked atomically with
    /// the put: put-then-undo would let another connection of the client see the binding
    /// in between (and refresh it for good).
    fn put_unless_cleared(
        &self,
        key: BindingKey,
        backend: BackendId,
        now: Instant,
        generation: u64,
    );
    fn len(&self) -> usize;
    /// Bindings evicted because the table was full.
    fn evicted(&self) -> u64 {
        0
    }
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Client IP -> country.
pub trait GeoResolver: Send + Sync {
    fn country(&self, ip: IpAddr) -> Option<CountryCode>;
    /// Lookups so far, by outcome.
    fn lookups(&self) -> GeoLookups;
    /// Which database answers, for status pages.
    fn describe(&self) -> String;
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct GeoLookups {
    pub found: u64,
    /// No record, or a record without a country (private and reserved ranges).
    pub not_found: u64,
    /// A record that would not decode or named no valid country code.
    pub failed: u64,
}

/// What a policy knows about the decision besides the candidates.
#[derive(Debug)]
pub struct PickRequest<'a> {
    /// The snapshot the candidates come from (policies may look at every backend).
    pub table: &'a RoutingTable,
    pub pop_region: &'a Region,
    pub app: Option<&'a str>,
    pub client: &'a Client,
}

/// Chooses the backend for a new client.
pub trait ScoringPolicy: Send + Sync {
    fn name(&self) -> &str;
    /// Index into `candidates` of the chosen backend, or None to refuse the connection.
    /// Must never choose an ineligible candidate (unhealthy or at its hard limit).
    fn pick(&self, request: &PickRequest<'_>, candidates: &[RoutedBackend]) -> Option<usize>;
    /// As [`ScoringPolicy::pick`], among the candidates whose positions are not in
    /// `left_out`: the next pick of a connection failing over, or a DNS answer's next
    /// alternate. The default copies the rest; policies that can skip do.
    fn pick_leaving_out(
        &self,
        request: &PickRequest<'_>,
        candidates: &[RoutedBackend],
        left_out: &[usize],
    ) -> Option<usize> {
        if left_out.is_empty() {
            return self.pick(request, candidates);
        }
        let rest: Vec<usize> = (0..candidates.len())
            .filter(|i| !left_out.contains(i))
            .collect();
        let copy: Vec<RoutedBackend> = rest.iter().map(|&i| candidates[i].clone()).collect();
        // An answer out of range stays out of range, for the caller to refuse.
        self.pick(request, &copy)
            .map(|i| rest.get(i).copied().unwrap_or(candidates.len()))
    }
    /// For each request, up to `n` picks, best first, in the order a connection fails
    /// over through them: what a DNS answer gives. The requests differ only in their
    /// client (one app, one table: the DNS queries for an app one read took in), so a
    /// policy can rank them all in one step. Unchecked (the caller checks each); the
    /// default picks again with the earlier picks left out.
    fn rank(
        &self,
        requests: &[PickRequest<'_>],
        candidates: &[RoutedBackend],
        n: usize,
    ) -> Vec<Vec<usize>> {
        rank_by_picks(self, requests, candidates, n)
    }
    /// Gets ready for `table` before it serves, off the data path (a wasm policy copies
    /// it into its idle instances, 70 ms at 100,000 backends), so no connection waits.
    fn prepare(&self, _table: &RoutingTable, _pop_region: &Region) {}
}

/// [`ScoringPolicy::rank`] by picking again with the earlier picks left out, for each
/// request.
pub fn rank_by_picks<P: ScoringPolicy + ?Sized>(
    policy: &P,
    requests: &[PickRequest<'_>],
    candidates: &[RoutedBackend],
    n: usize,
) -> Vec<Vec<usize>> {
    let ranking = |request| {
        let mut out: Vec<usize> = Vec::with_capacity(n.min(candidates.len()));
        while out.len() < n
            && let Some(i) = policy.pick_leaving_out(request, candidates, &out)
        {
            // A repeated answer would be asked again forever: the caller sees it.
            let again = out.contains(&i);
            out.push(i);
            if again {
                break;
            }
        }
        out
    };
    requests.iter().map(ranking).collect()
}

/// A policy run beside the live one, whose answers are only recorded: it never routes,
/// and its faults never reach traffic.
pub trait ShadowPolicy: Send + Sync {
    /// Its answer, or what went wrong (counted by the policy).
    fn shadow_pick(
        &self,
        request: &PickRequest<'_>,
        candidates: &[RoutedBackend],
    ) -> Result<Option<usize>, String>;
    fn status(&self) -> PolicyStatus;
    /// False while there is no shadow to ask (none configured or deployed).
    fn active(&self) -> bool {
        true
    }
}

/// Making the shadow policy live, and undoing it.
pub trait PolicyPromotion: Send + Sync {
    /// The shadow's policy serves from the next decision on (after a fresh self-test);
    /// what served before is kept for `rollback`. Blocking.
    fn promote(&self) -> Result<Promoted, String>;
    /// What served before the last promotion serves again.
    fn rollback(&self) -> Result<Promoted, String>;
}

/// What a promotion or rollback swapped.
#[derive(Debug, Clone, Serialize)]
pub struct Promoted {
    /// Name and hash of the policy serving now.
    pub live: String,
    /// Of the one it replaced.
    pub replaced: String,
    /// Bindings dropped with it (when asked to).
    pub bindings_dropped: usize,
}

/// The policy side of the admin API: what is deciding, and a way to re-read it.
pub trait PolicyControl: Send + Sync {
    fn status(&self) -> PolicyStatus;
    /// Re-reads the policy from its source now (blocking). Ok(true) when a different
    /// policy was swapped in, Ok(false) when nothing changed or there is nothing to read.
    fn reload(&self) -> Result<bool, String>;
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PolicyStatus {
    /// "wasm" or "native".
    pub kind: &'static str,
    pub name: String,
    pub hash: Option<String>,
    /// The version of the WIT contract (`wit/`) the component was built against.
    pub contract: Option<&'static str>,
    pub path: Option<String>,
    pub loaded_at: Option<String>,
    pub reloads: u64,
    pub reload_failures: u64,
    pub last_error: Option<ErrorAt>,
    pub faults: PolicyFaults,
    /// Decisions the serving policy made since it was loaded.
    pub decisions: u64,
    /// Some: the policy faulted repeatedly and is suspended for this long yet (the
    /// native scorer decides meanwhile).
    pub suspended_for_ms: Option<u64>,
    /// Times the policy was suspended.
    pub suspensions: u64,
    /// Decisions the native scorer made while the policy was suspended.
    pub suspended_decisions: u64,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct PolicyFaults {
    pub traps: u64,
    pub timeouts: u64,
    pub bad_answers: u64,
    pub instantiate_failures: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ErrorAt {
    pub at: String,
    pub message: String,
}

impl ErrorAt {
    pub fn new(at: SystemTime, message: String) -> Self {
        Self {
            at: timestamp(at),
            message,
        }
    }
}

/// RFC 3339, UTC, whole seconds.
pub fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// What the fleet looks like from this POP (`GET /cluster`, `edgeproxy cluster status`).
/// The certificates TLS listeners present: each one's file and expiry (seconds since
/// the epoch), for alerts before a renewal is missed.
pub trait CertificateExpiries: Send + Sync {
    fn expiries(&self) -> Vec<(String, i64)>;
}

/// The POPs of the fleet as DNS answers them (`<region>.pops`, the front name): this one
/// and every member SWIM knows, with its region and addresses.
pub trait PopDirectory: Send + Sync {
    fn pops(&self) -> Arc<Vec<super::dns::Pop>>;
}

pub trait ClusterView: Send + Sync {
    fn status(&self) -> ClusterStatus;
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MemberStatus {
    pub name: String,
    pub node: String,
    pub gossip: std::net::SocketAddr,
    pub transport: std::net::SocketAddr,
    pub state: String,
    pub last_sync_secs_ago: Option<f64>,
    /// Whether its table's digest equalled this POP's at its last sync request (none
    /// before one).
    #[serde(default)]
    pub same_table: Option<bool>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ClusterStatus {
    pub node: String,
    pub name: String,
    pub gossip: std::net::SocketAddr,
    pub transport: std::net::SocketAddr,
    pub members: Vec<MemberStatus>,
    pub rows: usize,
    pub tombstones: usize,
    /// Equal on two POPs exactly when their live rows (with their versions) are equal;
    /// tombstones are left out, each POP purges them at its own pace.
    pub digest: String,
    pub clock: u64,
    pub last_sync_secs_ago: Option<f64>,
    pub changes_sent: u64,
    pub changes_received: u64,
    pub changes_applied: u64,
    pub changes_rejected: u64,
    pub changes_clock_ahead: u64,
    /// Live rows dropped because a peer had seen their write superseded.
    pub changes_superseded: u64,
    /// Streams from peers that failed or timed out, connections refused over a cap.
    pub stream_errors: u64,
    pub sync_rounds: u64,
    pub sync_failures: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// UDP bytes on the wire (SWIM, rows, QUIC and TLS overhead), where measured.
    pub wire_bytes_in: Option<u64>,
    pub wire_bytes_out: Option<u64>,
    pub peers_refused: u64,
    /// Fleet policy deployments, oldest first (revoked ones included).
    #[serde(default)]
    pub deployments: Vec<super::rollout::Deployment>,
    /// What each POP reports it runs.
    #[serde(default)]
    pub policies: Vec<super::rollout::PopPolicies>,
}

/// What a registration did to the routing table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Registered {
    Created,
    Updated,
    /// The row already said exactly this: nothing was written.
    Unchanged,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    /// The request names a problem with the row (bad value, another app's id).
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    /// A cap on registrations is reached.
    #[error("{0}")]
    Limit(String),
    /// The table could not be read or written.
    #[error("{0}")]
    Store(String),
}

/// Where self-registered backends are written: rows of the routing table (so they
/// replicate like any row), plus this POP's own record of which ids it registered or
/// adopted, which survives restarts and is never replicated.
pub trait RegistrationStore: Send + Sync {
    /// Writes `row` (live, healthy) unless it is already exactly so; refuses an id whose
    /// live row belongs to another app. Records the id as registered here.
    fn register(
        &self,
        row: &crate::domain::replication::BackendRow,
    ) -> Result<Registered, RegistrationError>;
    /// Sets `healthy` when it differs; true when something was written.
    fn set_healthy(&self, id: &str, healthy: bool) -> Result<bool, RegistrationError>;
    /// Records a live row registered elsewhere as registered here; false when no live
    /// row has this id.
    fn adopt(&self, id: &str) -> Result<bool, RegistrationError>;
    /// Removes (soft-deletes) a backend registered here; false when it was not.
    fn deregister(&self, id: &str) -> Result<bool, RegistrationError>;
    /// The ids registered or adopted here.
    fn registered(&self) -> Result<Vec<String>, RegistrationError>;
    fn get(
        &self,
        id: &str,
    ) -> Result<Option<crate::domain::replication::BackendRow>, RegistrationError>;
}

pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// A deployment to make: what the component is called, the role, the POPs it is for.
#[derive(Debug, Clone)]
pub struct DeployRequest {
    pub role: super::rollout::Role,
    pub name: String,
    pub targets: super::rollout::Targets,
}

/// Why a component could not be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    /// No reachable POP holds it now: tried again later.
    #[error("{0}")]
    Unavailable(String),
    /// What was found is not the component (hash mismatch, over the size cap): refused.
    #[error("{0}")]
    Corrupt(String),
}

/// The fleet's policy records (deployments, POP reports) and the components they name:
/// replicated between POPs (the cluster adapter).
pub trait PolicyFleet: Send + Sync {
    /// This POP's name in the cluster.
    fn pop(&self) -> String;
    /// Every record held here.
    fn records(&self) -> Vec<super::rollout::FleetRecord>;
    /// Changes whenever a record is written here or arrives.
    fn changes(&self) -> tokio::sync::watch::Receiver<u64>;
    /// Stores `bytes` (at most `max_bytes`) and a deployment of them, and sends both on.
    fn deploy(
        &self,
        request: DeployRequest,
        bytes: Vec<u8>,
        max_bytes: u64,
    ) -> BoxFuture<'_, Result<super::rollout::Deployment, String>>;
    /// Revokes the latest standing deployment of `role`.
    fn revoke_latest(
        &self,
        role: super::rollout::Role,
    ) -> BoxFuture<'_, Result<super::rollout::Deployment, String>>;
    /// The component `deployment` names, from this POP's store or from a peer (the
    /// deploying POP first), checked against its hash and kept here.
    fn component<'a>(
        &'a self,
        deployment: &'a super::rollout::Deployment,
        max_bytes: u64,
    ) -> BoxFuture<'a, Result<Vec<u8>, FetchError>>;
    /// Publishes this POP's report, when it differs from the last one.
    fn report(&self, report: super::rollout::PopPolicies) -> BoxFuture<'_, Result<(), String>>;
}

/// Where deployed components run on this POP: the live policy and the shadow.
pub trait PolicySlots: Send + Sync {
    /// Compiles and self-tests `bytes` and makes them serve as `role` (blocking); on an
    /// error what served keeps serving.
    fn install(
        &self,
        role: super::rollout::Role,
        name: &str,
        bytes: &[u8],
        deployment: &str,
    ) -> Result<(), String>;
    /// Back to this POP's own configuration for `role` (blocking).
    fn restore(&self, role: super::rollout::Role) -> Result<(), String>;
    /// What serves as `role` now (None: no shadow).
    fn running(&self, role: super::rollout::Role) -> Option<super::rollout::Running>;
}

#[derive(Debug, thiserror::Error)]
pub enum EditError {
    /// The store failed (`path`: the file, or the database described without credentials).
    #[error("routing table {path}: {message}")]
    Db { path: String, message: String },
    /// The write was refused: the message says why.
    #[error("{0}")]
    Rejected(String),
}

/// Changes `update` makes; unset fields stay as they are.
#[derive(Debug, Clone, Default)]
pub struct RowChanges {
    pub app: Option<String>,
    pub region: Option<String>,
    pub country: Option<String>,
    pub wg_ip: Option<String>,
    pub port: Option<u16>,
    pub healthy: Option<bool>,
    pub weight: Option<u32>,
    pub soft_limit: Option<u32>,
    pub hard_limit: Option<u32>,
}

impl RowChanges {
    pub fn is_empty(&self) -> bool {
        self.app.is_none()
            && self.region.is_none()
            && self.country.is_none()
            && self.wg_ip.is_none()
            && self.port.is_none()
            && self.healthy.is_none()
            && self.weight.is_none()
            && self.soft_limit.is_none()
            && self.hard_limit.is_none()
    }

    /// `row` with the changes made.
    pub fn applied_to(self, row: super::replication::BackendRow) -> super::replication::BackendRow {
        super::replication::BackendRow {
            app: self.app.unwrap_or(row.app),
            region: self.region.unwrap_or(row.region),
            country: self.country.unwrap_or(row.country),
            wg_ip: self.wg_ip.unwrap_or(row.wg_ip),
            port: self.port.unwrap_or(row.port),
            healthy: self.healthy.unwrap_or(row.healthy),
            weight: self.weight.unwrap_or(row.weight),
            soft_limit: self.soft_limit.unwrap_or(row.soft_limit),
            hard_limit: self.hard_limit.unwrap_or(row.hard_limit),
            ..row
        }
    }
}

/// What an import did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Imported {
    /// Rows the file wrote (inserted or replaced).
    pub rows: usize,
    /// Live (not deleted) backends before and after.
    pub before: usize,
    pub after: usize,
}

/// Operators' writes to the routing table (`edgeproxy backend …`, `edgeproxy db import`),
/// blocking. Every row written passes the loader's checks, so nothing the proxy would
/// skip is written; each command is one transaction.
pub trait BackendEditor {
    /// Every row ordered by id; soft-deleted ones only with `deleted`.
    fn list(
        &self,
        app: Option<&str>,
        deleted: bool,
    ) -> Result<Vec<super::replication::BackendRow>, EditError>;
    fn get(&self, id: &str) -> Result<Option<super::replication::BackendRow>, EditError>;
    /// Adds a backend; a live id is refused, a removed one replaced.
    fn add(
        &mut self,
        row: &super::replication::BackendRow,
    ) -> Result<super::replication::BackendRow, EditError>;
    fn update(
        &mut self,
        id: &str,
        changes: &RowChanges,
    ) -> Result<super::replication::BackendRow, EditError>;
    /// Soft-deletes (`deleted = 1`).
    fn remove(&mut self, id: &str) -> Result<super::replication::BackendRow, EditError>;
    fn set_healthy(
        &mut self,
        id: &str,
        healthy: bool,
    ) -> Result<super::replication::BackendRow, EditError>;
    /// Rows from a `.sql` or `.csv` file, all of them or none.
    fn import(&mut self, file: &std::path::Path) -> Result<Imported, EditError>;
    /// Each row's replication version, where the store keeps them.
    fn versions(
        &self,
    ) -> Result<std::collections::HashMap<String, super::replication::Version>, EditError> {
        Ok(Default::default())
    }
}
