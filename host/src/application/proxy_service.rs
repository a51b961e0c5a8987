//! One connection, start to end: locate the client, follow its binding or ask the policy,
//! connect (failing over to the next best backend), then copy bytes both ways until both
//! sides are done. Every outcome ends here with one tracing event; nothing propagates to
//! the accept loop.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::domain::model::ActiveGuard;
use crate::domain::ports::{
    BindingKey, BindingRepository, GeoResolver, PickRequest, ScoringPolicy,
};
use crate::domain::services::{NativeScorer, RegionMap};
use crate::domain::{Client, Region, RoutedBackend};

use super::health_monitor::Suspects;
use super::routing::Routing;
use super::telemetry::{Decision, Telemetry};
use crate::adapters::net::downstream::Downstream;
use crate::adapters::net::{BufferPool, is_local_resource_error};

#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub pop_region: Region,
    pub connect_timeout: Duration,
    pub connect_attempts: u32,
    pub idle_timeout: Option<Duration>,
    /// TCP keepalive idle time on both sockets; None: off.
    pub keepalive: Option<Duration>,
    /// Client addresses in log lines truncated as in the decision log.
    pub truncate_clients: bool,
}

pub struct ProxyService {
    pub routing: Arc<Routing>,
    /// None when bindings are off (TTL 0).
    pub bindings: Option<Arc<dyn BindingRepository>>,
    pub geo: Arc<dyn GeoResolver>,
    pub regions: RegionMap,
    pub policy: Arc<dyn ScoringPolicy>,
    pub settings: ProxySettings,
    pub buffers: BufferPool,
    pub telemetry: Arc<Telemetry>,
    /// A policy deciding beside the live one, only for the record.
    pub shadow: Option<Arc<super::shadow::Shadow>>,
    /// Recent decisions, sampled, for `GET /decisions` and replay.
    pub decisions: Option<Arc<super::decision_log::DecisionLog>>,
    /// Where backends failing in a row are reported for ejection, and after how many
    /// (again at each multiple, in case the first was refused by the cap); None: off.
    pub suspects: Option<(Arc<Suspects>, u32)>,
}

/// Where a connection came from, after PROXY protocol.
#[derive(Debug, Clone)]
pub struct Inbound {
    pub client_ip: IpAddr,
    pub via_proxy_protocol: bool,
    pub app: Option<Arc<str>>,
    /// Payload bytes already read (past a PROXY header, a ClientHello), sent to the
    /// backend first.
    pub early_data: Vec<u8>,
    /// The ClientHello, on listeners that read it.
    pub tls: Option<Arc<crate::domain::server_names::TlsHello>>,
    /// How many of `early_data`'s first bytes are a PROXY header for the backend (the
    /// proxy's bytes, not the client's).
    pub proxy_header_len: u16,
}

impl Inbound {
    /// Sends `header` to the backend before anything else (in the same write).
    pub fn set_proxy_header(&mut self, header: Vec<u8>) {
        let len = u16::try_from(header.len()).unwrap_or(u16::MAX);
        self.early_data.splice(0..0, header);
        self.proxy_header_len = len;
    }
}

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("no eligible backend")]
    NoBackend,
    #[error("all {0} connect attempts failed")]
    ConnectFailed(u32),
    #[error("this POP is out of resources: {0}")]
    Local(std::io::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl ProxyService {
    pub fn locate(&self, ip: IpAddr, via_proxy_protocol: bool) -> Client {
        let country = self.geo.country(ip);
        Client {
            ip,
            country,
            region: country.map(|c| self.regions.region_of(c)),
            via_proxy_protocol,
            tls: None,
        }
    }

    /// A client address as log lines show it (truncated when `truncate_clients`).
    pub fn shown(&self, ip: std::net::IpAddr) -> std::net::IpAddr {
        match self.settings.truncate_clients {
            true => super::decision_log::truncated(ip),
            false => ip,
        }
    }

    /// A plain fn, not another async layer: an async fn's arguments stay in its future
    /// beside the one it awaits, and this future is an idle connection's memory.
    pub fn handle(
        &self,
        stream: TcpStream,
        inbound: Inbound,
    ) -> impl std::future::Future<Output = ()> + Send + '_ {
        self.serve(Downstream::Plain(stream), inbound)
    }

    /// A client's connection, on the data path `downstream` belongs to.
    pub async fn serve<P: DataPath>(&self, mut downstream: P, mut inbound: Inbound) {
        let client = Client {
            tls: inbound.tls.take(),
            ..self.locate(inbound.client_ip, inbound.via_proxy_protocol)
        };
        match self.proxy(&mut downstream, &client, &mut inbound).await {
            Ok((backend, up, down)) => tracing::debug!(
                client = %self.shown(client.ip), %backend, bytes_up = up, bytes_down = down, "connection closed"
            ),
            Err(e) => {
                if let Some(suppressed) = self.telemetry.connection_log.allow() {
                    tracing::warn!(client = %self.shown(client.ip), app = ?inbound.app, error = %e, suppressed, "connection failed");
                }
            }
        }
    }

    /// The backend a new connection goes to: the client's binding if it may still be
    /// followed, else the policy's pick, which then becomes the binding (TTL from now). A
    /// binding to a backend that is gone, unhealthy, deleted or full is dropped.
    pub fn choose(
        &self,
        req: &PickRequest<'_>,
        key: &BindingKey,
        candidates: &[RoutedBackend],
    ) -> Option<usize> {
        let started = Instant::now();
        let choice = self.follow_or_pick(req, key, candidates, started);
        self.telemetry.decision_time.observe(started.elapsed());
        choice
    }

    fn follow_or_pick(
        &self,
        req: &PickRequest<'_>,
        key: &BindingKey,
        candidates: &[RoutedBackend],
        now: Instant,
    ) -> Option<usize> {
        let Some(bindings) = &self.bindings else {
            return self.pick(req, candidates);
        };
        let generation = bindings.generation();
        if let Some(id) = bindings.get(key, now) {
            match candidates.binary_search_by(|c| c.backend.id.cmp(&id)) {
                Ok(i) if candidates[i].is_eligible() => {
                    self.telemetry.binding_hits.fetch_add(1, Relaxed);
                    return Some(i);
                }
                _ => bindings.remove(key),
            }
        }
        self.telemetry.binding_misses.fetch_add(1, Relaxed);
        let i = self.pick(req, candidates)?;
        bind(&**bindings, key, &candidates[i], now, generation);
        Some(i)
    }

    /// The policy's pick, checked: an answer naming an ineligible or unknown candidate is
    /// replaced by the native scorer's.
    fn pick(&self, req: &PickRequest<'_>, candidates: &[RoutedBackend]) -> Option<usize> {
        let choice = self.live_pick(req, candidates);
        if let Some(log) = &self.decisions {
            log.record(req, candidates, choice);
        }
        if let Some(shadow) = &self.shadow {
            shadow.submit(req, candidates, choice);
        }
        choice
    }

    /// For each request, the policy's pick, then its next picks with the earlier ones left
    /// out (the order a connection fails over in), `n` at most: what a DNS lookup answers.
    /// The requests differ only in their client (see [`ScoringPolicy::rank`]). No binding
    /// is read or made and nothing is logged: a lookup is not a connection.
    pub fn ranked(
        &self,
        requests: &[PickRequest<'_>],
        candidates: &[RoutedBackend],
        n: usize,
    ) -> Vec<Vec<usize>> {
        let mut rankings = self.policy.rank(requests, candidates, n);
        // A ranking missing is an empty one, a refusal: policies' answers are checked here.
        rankings.resize_with(requests.len(), Vec::new);
        rankings.truncate(requests.len());
        for (req, out) in requests.iter().zip(&mut rankings) {
            self.checked(req, candidates, n, out);
        }
        rankings
    }

    /// A ranking checked like a pick: from its first ineligible, unknown or repeated answer
    /// on, the native scorer ranks.
    fn checked(
        &self,
        req: &PickRequest<'_>,
        candidates: &[RoutedBackend],
        n: usize,
        out: &mut Vec<usize>,
    ) {
        out.truncate(n);
        let bad = (0..out.len()).find(|&k| {
            out[..k].contains(&out[k])
                || !candidates
                    .get(out[k])
                    .is_some_and(RoutedBackend::is_eligible)
        });
        for _ in 0..bad.unwrap_or(out.len()) {
            self.telemetry.decided(Decision::Picked);
        }
        if let Some(k) = bad {
            self.overridden(out[k]);
            out.truncate(k);
            while out.len() < n
                && let Some(i) = NativeScorer.pick_leaving_out(req, candidates, out)
            {
                out.push(i);
            }
        }
        if out.is_empty() {
            self.telemetry.decided(Decision::Refused);
        }
    }

    fn live_pick(&self, req: &PickRequest<'_>, candidates: &[RoutedBackend]) -> Option<usize> {
        match self.policy.pick(req, candidates) {
            Some(i) if candidates.get(i).is_some_and(RoutedBackend::is_eligible) => {
                self.telemetry.decided(Decision::Picked);
                Some(i)
            }
            None => {
                self.telemetry.decided(Decision::Refused);
                None
            }
            Some(bad) => {
                self.overridden(bad);
                NativeScorer.pick(req, candidates)
            }
        }
    }

    /// The policy answered `bad` (ineligible, unknown, or repeated in a ranking): counted
    /// and logged; the native scorer decides instead.
    fn overridden(&self, bad: usize) {
        self.telemetry.decided(Decision::Overridden);
        if let Some(suppressed) = self.telemetry.override_log.allow() {
            tracing::warn!(
                policy = self.policy.name(),
                answer = bad,
                suppressed,
                "policy chose an ineligible backend; using the native scorer"
            );
        }
    }

    async fn proxy<P: DataPath>(
        &self,
        downstream: &mut P,
        client: &Client,
        inbound: &mut Inbound,
    ) -> Result<(String, u64, u64), ConnError> {
        // Boxed: the decision and connect state exists only until connected, and the
        // connection's task then holds just what the relay needs, for as long as it lasts.
        let (mut upstream, target, _guard) =
            Box::pin(self.connect(&*downstream, client, inbound)).await?;
        // Taken, so the connection does not hold it (a ClientHello's buffer) while it
        // lasts; in a block, so the relay's future does not sit beside it.
        if !inbound.early_data.is_empty() {
            let early = std::mem::take(&mut inbound.early_data);
            let client_bytes = early.len() - usize::from(inbound.proxy_header_len);
            // PROXY header and client bytes in one write (and segment).
            // Boxed: only some connections have early bytes; the rest carry no room for it.
            Box::pin(downstream.send_early(&mut upstream, early)).await?;
            target
                .stats
                .traffic
                .up
                .fetch_add(client_bytes as u64, Relaxed);
        }
        let traffic = &target.stats.traffic;
        let idle = self.settings.idle_timeout;
        let (up, down) = downstream
            .relay(upstream, &self.buffers, idle, traffic)
            .await?;
        Ok((target.backend.id.to_string(), up, down))
    }

    /// Decides and connects, failing over to the next best backend: the upstream stream,
    /// the backend, and its active-connection count held for the connection's life.
    async fn connect<P: DataPath>(
        &self,
        path: &P,
        client: &Client,
        inbound: &Inbound,
    ) -> Result<(P::Upstream, RoutedBackend, ActiveGuard), ConnError> {
        let table = self.routing.current();
        let all = table.candidates(inbound.app.as_deref());
        let key = BindingKey {
            client: client.ip,
            app: inbound.app.clone(),
        };
        let req = PickRequest {
            table: &table,
            pop_region: &self.settings.pop_region,
            app: inbound.app.as_deref(),
            client,
        };

        let generation = self.bindings.as_ref().map_or(0, |b| b.generation());
        // Failed backends are left out of later attempts; the copy is only made on failure.
        let mut remaining: Option<Vec<RoutedBackend>> = None;
        let mut attempts = 0;
        let mut connected = None;
        while attempts < self.settings.connect_attempts {
            // The first decision may follow the binding; after a failure, the policy picks
            // among the backends left.
            let first = remaining.is_none();
            let candidates = remaining.as_deref().unwrap_or(all);
            let choice = match first {
                true => self.choose(&req, &key, candidates),
                false => self.pick(&req, candidates),
            };
            let Some(i) = choice else { break };
            let target = candidates[i].clone();
            // The slot is taken in one atomic step: another connection may have taken the
            // last one since the decision, and then the next best backend is tried.
            let Some(guard) = target.stats.try_acquire(target.backend.hard_limit) else {
                if let Some(b) = &self.bindings {
                    b.remove(&key);
                }
                exclude(&mut remaining, all, &target);
                continue;
            };
            attempts += 1;
            target.stats.record_connect_attempt();
            let started = Instant::now();
            let result = tokio::time::timeout(
                self.settings.connect_timeout,
                path.dial(target.backend.addr, self.settings.keepalive),
            )
            .await;
            match result {
                Ok(Ok(stream)) => {
                    let took = started.elapsed();
                    self.telemetry.connect_time.observe(took);
                    target.stats.record_connect_ok();
                    target
                        .stats
                        .record_rtt(took.as_micros().try_into().unwrap_or(u64::MAX));
                    if let (Some(b), false) = (&self.bindings, first) {
                        bind(&**b, &key, &target, Instant::now(), generation);
                    }
                    connected = Some((stream, target, guard));
                    break;
                }
                // Out of descriptors or ports here: the backend is not to blame, its
                // binding stands, and another backend would fail the same way.
                Ok(Err(e)) if is_local_resource_error(&e) => {
                    self.telemetry.local_connect_failures.fetch_add(1, Relaxed);
                    return Err(ConnError::Local(e));
                }
                failed => {
                    let error = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("timed out after {:?}", self.settings.connect_timeout),
                    };
                    if let Some(suppressed) = self.telemetry.connection_log.allow() {
                        tracing::warn!(backend = %target.backend.id, addr = %target.backend.addr, %error, attempts, suppressed, "connect failed");
                    }
                    let in_row = target.stats.record_connect_failure();
                    if let Some((suspects, after)) = &self.suspects
                        && in_row.is_multiple_of(*after)
                    {
                        suspects.report(target.backend.id.clone(), in_row);
                    }
                    if let Some(b) = &self.bindings {
                        b.remove(&key);
                    }
                    exclude(&mut remaining, all, &target);
                }
            }
        }
        connected.ok_or_else(|| {
            self.telemetry.no_backend.fetch_add(1, Relaxed);
            match attempts {
                0 => ConnError::NoBackend,
                n => ConnError::ConnectFailed(n),
            }
        })
    }
}

/// A data path: how a connection reaches its backend and moves its bytes. The epoll
/// path (`net::downstream`) and the io_uring path (`net::uring`) are its adapters; what a
/// connection means (decide, connect, fail over, count) is the same on both.
pub trait DataPath {
    type Upstream;

    /// A connection to `addr`, with TCP_NODELAY and TCP keepalive after `keepalive` idle.
    fn dial(
        &self,
        addr: std::net::SocketAddr,
        keepalive: Option<Duration>,
    ) -> impl std::future::Future<Output = std::io::Result<Self::Upstream>>;

    /// The backend's first bytes (a PROXY header, bytes already read from the client), in
    /// one write.
    fn send_early(
        &mut self,
        upstream: &mut Self::Upstream,
        bytes: Vec<u8>,
    ) -> impl std::future::Future<Output = std::io::Result<()>>;

    /// Bytes client -> backend and backend -> client until both sides are done; an abort
    /// on one side (or the idle timeout) resets both.
    fn relay(
        &mut self,
        upstream: Self::Upstream,
        pool: &BufferPool,
        idle: Option<Duration>,
        traffic: &crate::domain::model::Traffic,
    ) -> impl std::future::Future<Output = std::io::Result<(u64, u64)>>;
}

/// Leaves `target` out of later attempts; the candidates are copied only on a failure.
fn exclude(
    remaining: &mut Option<Vec<RoutedBackend>>,
    all: &[RoutedBackend],
    target: &RoutedBackend,
) {
    remaining
        .get_or_insert_with(|| all.to_vec())
        .retain(|c| c.backend.id != target.backend.id);
}

/// Binds `key` to `target` unless the bindings were cleared since `generation` was read:
/// a pick made by the policy a promotion replaced does not outlive the promotion's
/// `drop_bindings`.
fn bind(
    bindings: &dyn BindingRepository,
    key: &BindingKey,
    target: &RoutedBackend,
    now: Instant,
    generation: u64,
) {
    bindings.put_unless_cleared(key.clone(), target.backend.id.clone(), now, generation);
}

/// A service over `routing` in region "eu", with the embedded GeoIP database, one connect
/// attempt and nothing else on: for unit tests here and in the adapters.
#[cfg(test)]
impl ProxyService {
    pub(crate) fn for_tests(
        routing: Arc<Routing>,
        policy: Arc<dyn ScoringPolicy>,
        bindings: Option<Arc<dyn BindingRepository>>,
    ) -> Self {
        ProxyService {
            routing,
            bindings,
            geo: Arc::new(crate::adapters::outbound::maxmind_geo::MaxMindGeo::embedded().unwrap()),
            regions: RegionMap::default(),
            policy,
            settings: ProxySettings {
                pop_region: Region::new("eu"),
                connect_timeout: Duration::from_secs(1),
                connect_attempts: 1,
                idle_timeout: None,
                keepalive: None,
                truncate_clients: false,
            },
            buffers: BufferPool::new(1, 1),
            telemetry: Arc::default(),
            shadow: None,
            decisions: None,
            suspects: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use super::*;
    use crate::adapters::outbound::binding_table::BindingTable;
    use crate::domain::ports::{BackendRepository, LoadedBackends, RoutingError};
    use crate::domain::{RoutingTable, sample};

    struct NoRows;
    impl BackendRepository for NoRows {
        fn load(&self) -> Result<LoadedBackends, RoutingError> {
            Ok(LoadedBackends {
                backends: Vec::new(),
                skipped: Vec::new(),
            })
        }
    }

    /// A promotion with `drop_bindings` landing while this policy decides: the
    /// bindings are cleared between its pick and the binding of that pick.
    struct PromotedMidPick(OnceLock<Arc<BindingTable>>);
    impl ScoringPolicy for PromotedMidPick {
        fn name(&self) -> &str {
            "promoted-mid-pick"
        }
        fn pick(&self, _: &PickRequest<'_>, _: &[RoutedBackend]) -> Option<usize> {
            self.0.get().unwrap().clear();
            Some(0)
        }
    }

    #[tokio::test]
    async fn a_pick_made_before_bindings_are_dropped_is_not_bound_after() {
        let bindings = Arc::new(BindingTable::new(Duration::from_secs(600)));
        let policy = Arc::new(PromotedMidPick(OnceLock::new()));
        let _ = policy.0.set(Arc::clone(&bindings));
        let service = service(policy, Some(bindings.clone() as Arc<dyn BindingRepository>));
        let table = RoutingTable::new(1, sample::backends("app"), |_| Arc::default());
        let client = sample::client_in_brazil();
        let req = PickRequest {
            table: &table,
            pop_region: &service.settings.pop_region,
            app: Some("app"),
            client: &client,
        };
        let key = BindingKey {
            client: client.ip,
            app: Some("app".into()),
        };
        let candidates = table.candidates(Some("app"));
        assert_eq!(service.choose(&req, &key, candidates), Some(0));
        assert_eq!(bindings.get(&key, Instant::now()), None);
    }

    fn service(
        policy: Arc<dyn ScoringPolicy>,
        bindings: Option<Arc<dyn BindingRepository>>,
    ) -> ProxyService {
        let routing = Arc::new(Routing::new(Arc::new(NoRows), Arc::default(), 50));
        ProxyService::for_tests(routing, policy, bindings)
    }

    /// Always the first candidate offered, or one past the last.
    struct Fixed(bool);
    impl ScoringPolicy for Fixed {
        fn name(&self) -> &str {
            "fixed"
        }
        fn pick(&self, _: &PickRequest<'_>, candidates: &[RoutedBackend]) -> Option<usize> {
            match self.0 {
                true => (!candidates.is_empty()).then_some(0),
                false => Some(candidates.len()),
            }
        }
    }

    #[test]
    fn ranked_picks_leave_each_earlier_pick_out_and_a_bad_answer_goes_native() {
        let table = RoutingTable::new(1, sample::backends("app"), |_| Arc::default());
        let client = sample::client_in_brazil();
        let candidates = table.candidates(Some("app"));
        for (policy, n, want) in [
            // A policy that cannot skip is offered the rest, each pick in its own place.
            (Fixed(true), 3, vec![0, 1, 2]),
            (Fixed(true), 9, vec![0, 1, 2, 3]),
            // Out of range every time: the native scorer's order (Brazil's first).
            (Fixed(false), 2, {
                let req = PickRequest {
                    table: &table,
                    pop_region: &Region::new("eu"),
                    app: Some("app"),
                    client: &client,
                };
                let first = NativeScorer.pick(&req, candidates).unwrap();
                let second = NativeScorer
                    .pick_leaving_out(&req, candidates, &[first])
                    .unwrap();
                vec![first, second]
            }),
        ] {
            let service = service(Arc::new(policy), None);
            let req = PickRequest {
                table: &table,
                pop_region: &service.settings.pop_region,
                app: Some("app"),
                client: &client,
            };
            assert_eq!(service.ranked(&[req], candidates, n), [want]);
        }
    }
}
