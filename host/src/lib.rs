//! edgeproxy: a geo- and load-aware L4 (TCP) proxy for one edge POP.
//!
//! [`Host::build`] wires the adapters to the domain from a [`config::Config`];
//! [`Host::run`] serves already-bound listeners until a shutdown token fires, then drains.
//! Tests drive it exactly like `main` does, with listeners bound to `127.0.0.1:0`.

// One exception, allowed where it is: loading a compiled policy from the compile cache.
#![deny(unsafe_code)]

pub mod adapters;
pub mod application;
pub mod config;
pub mod demo;
#[cfg(target_os = "linux")]
pub mod demo_cluster;
pub mod domain;
pub mod log_throttle;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use adapters::outbound::binding_table::BindingTable;
use adapters::outbound::maxmind_geo::MaxMindGeo;
use adapters::outbound::sqlite_routing::SqliteBackendRepository;
use adapters::outbound::wasm_policy::runtime::{Limits, Runtime};
use adapters::outbound::wasm_policy::{self as wasm, WasmPolicy};
use application::admin::Admin;
use application::proxy_service::{ProxyService, ProxySettings};
use application::routing::Routing;
use application::telemetry::{ListenerStats, Telemetry};
use config::{Config, ListenerConfig, PolicySource};
use domain::ports::{BindingRepository, GeoResolver, PolicyControl, ScoringPolicy};
use domain::services::NativeScorer;

/// Pipes for splice(2) that may exist at once (two descriptors each). Idle connections
/// hold none, so this only bounds chunks in flight; past it, chunks go through buffers.
const MAX_PIPES: usize = 1024;

/// The parts of one running POP, shared by the listeners and the background tasks.
pub struct Host {
    pub service: Arc<ProxyService>,
    pub routing: Arc<Routing>,
    pub bindings: Option<Arc<BindingTable>>,
    pub metrics: Arc<domain::live_stats::LiveStats>,
    /// Backends the proxy saw failing, for the health monitor.
    suspects: Arc<application::health_monitor::Suspects>,
    pub health_counters: Arc<application::health_monitor::HealthCounters>,
    /// The shadow policy's component, when one is configured.
    pub shadow_policy: Option<Arc<WasmPolicy>>,
    /// The WebAssembly policy, unless the native scorer was configured.
    pub wasm_policy: Option<Arc<WasmPolicy>>,
    /// Where fleet deployments run (live and shadow), when the live policy is a component.
    slots: Option<Arc<dyn domain::ports::PolicySlots>>,
    pub telemetry: Arc<Telemetry>,
    pub admin: Arc<Admin>,
    /// This POP's membership of the fleet, when replication is on.
    pub cluster: Option<adapters::cluster::Cluster>,
    /// Stops the cluster after the drain (it keeps the table current until then).
    cluster_stop: CancellationToken,
    /// Admin and registration API connections' idle timeout.
    http_idle: Duration,
    /// The POP's per-client limits, whether they are on, and their window.
    client_limits: (application::client_limits::ClientLimits, bool, Duration),
    /// Ends a drain at once (a second SIGTERM/SIGINT): the connections left are closed.
    pub abort: CancellationToken,
    /// What terminating listeners present, when certificates are configured.
    pub certificates: Option<Arc<adapters::inbound::tls_certs::Certificates>>,
    admin_token: Option<String>,
    /// Self-registration and heartbeats, when the registration API is on.
    pub registry: Option<Arc<application::registry::Registry>>,
    api_token: Option<String>,
    db_path: std::path::PathBuf,
    /// The routing table's PostgreSQL database, when it is not the file.
    pg: Option<adapters::outbound::postgres::PgSettings>,
    db_reload: Duration,
    binding_gc_interval: Duration,
    drain_timeout: Duration,
    /// Plain listeners accept and relay on io_uring rings (`data_path = "io_uring"`).
    io_uring: bool,
    /// The internal DNS server's answers, when it is on.
    pub dns: Option<Arc<application::dns::Dns>>,
    dns_front: DnsFront,
    /// Where the metrics are served; None: `metrics_enabled = false`.
    metrics_path: Option<String>,
    /// What the metrics listener asks for (`admin_token`, even with the admin API off).
    metrics_token: Option<String>,
}

/// What the DNS server needs besides its answers: its response rate limit, and this POP's
/// front-name addresses with the fleet's directory they are published in.
#[derive(Default)]
struct DnsFront {
    limiter: Option<Arc<application::client_limits::ClientLimiter>>,
    pops: Option<Arc<adapters::cluster::pops::ClusterPops>>,
    addrs: Vec<std::net::IpAddr>,
    /// How long a draining POP keeps accepting after leaving the front name's answers:
    /// resolvers may hold it for one TTL.
    leave: Duration,
}

/// The sockets [`Host::run`] serves, bound beforehand.
#[derive(Default)]
pub struct Sockets {
    pub listeners: Vec<(TcpListener, ListenerConfig)>,
    pub admin: Option<TcpListener>,
    pub api: Option<TcpListener>,
    pub dns: Option<adapters::inbound::dns_server::DnsSockets>,
    /// The metrics alone (`metrics_listen_addr`).
    pub metrics: Option<TcpListener>,
    /// Where a successor takes these sockets over (`handover_socket`), and the process
    /// they were taken from, told once these accept.
    #[cfg(target_os = "linux")]
    pub handover: Option<Handover>,
}

#[cfg(target_os = "linux")]
pub struct Handover {
    pub endpoint: adapters::inbound::handover::Endpoint,
    pub shared: adapters::inbound::handover::Shared,
    pub inherited: Option<adapters::inbound::handover::Inherited>,
}

/// The process a new one takes over from (see `adapters::inbound::handover`).
pub trait TakeOver {
    /// Stops its replication, so this process can start its own on the gossip and
    /// transport sockets returned (none: it ran no cluster). Asked last of the start-up:
    /// a failure after it leaves the old process serving without replication.
    fn release_cluster(&self) -> anyhow::Result<Option<[std::net::UdpSocket; 2]>>;
}

#[cfg(target_os = "linux")]
impl TakeOver for adapters::inbound::handover::Inherited {
    fn release_cluster(&self) -> anyhow::Result<Option<[std::net::UdpSocket; 2]>> {
        adapters::inbound::handover::Inherited::release_cluster(self)
    }
}

/// The shadow policy's component and its record, when one is configured.
type Shadowing = Option<(Arc<WasmPolicy>, Arc<application::shadow::Shadow>)>;

/// The certificates of `tls_cert`/`tls_key` and `tls_cert_dir`, when set; any that does
/// not load stops the start, naming its file.
fn load_certificates(
    s: &config::Settings,
) -> anyhow::Result<Option<Arc<adapters::inbound::tls_certs::Certificates>>> {
    use adapters::inbound::tls_certs::{CertFiles, Certificates};
    let files = CertFiles {
        default: s.tls_cert.clone().zip(s.tls_key.clone()),
        dir: s.tls_cert_dir.clone(),
    };
    if files == CertFiles::default() {
        return Ok(None);
    }
    let certs = Certificates::load(files, adapters::net::tls::provider())
        .map_err(|e| anyhow::anyhow!("TLS certificates: {e}"))?;
    Ok(Some(Arc::new(certs)))
}

/// How a drain ended.
#[derive(Debug, PartialEq, Eq)]
pub struct Drained {
    /// Connections still open when the drain timeout cut them off.
    pub cut_off: usize,
}

impl Host {
    /// Opens the inputs (creating the routing database if missing), loads the routing table
    /// and the policy once, and builds the proxy service.
    pub async fn build(config: &Config) -> anyhow::Result<Self> {
        Self::build_taking_over(config, None).await
    }

    /// [`Self::build`] in a process taking over from `from`: every start-up check passes
    /// before `from` is asked to stop replicating (one process at a time holds the
    /// cluster port and writes the replica).
    pub async fn build_taking_over(
        config: &Config,
        from: Option<&dyn TakeOver>,
    ) -> anyhow::Result<Self> {
        let wasm_policy = load_policy(config).await?;
        let policy: Arc<dyn ScoringPolicy> = match &wasm_policy {
            Some(w) => w.clone(),
            None => Arc::new(NativeScorer),
        };
        let control: Arc<dyn PolicyControl> = match &wasm_policy {
            Some(w) => w.clone(),
            None => Arc::new(NativeScorer),
        };
        let mut shadow = Self::load_shadow(config, wasm_policy.as_ref()).await?;
        let configured_shadow = shadow.is_some();
        // In a fleet, a shadow may be deployed later: an idle one waits for it.
        if config.settings.cluster_enabled
            && shadow.is_none()
            && let Some(live) = &wasm_policy
        {
            let idle = Arc::new(WasmPolicy::serving(
                Arc::clone(live.runtime()),
                config.regions.client_regions(),
                live.current(),
            ));
            idle.set_enabled(false);
            let record = application::shadow::Shadow::new(
                Arc::clone(&idle) as Arc<dyn domain::ports::ShadowPolicy>,
                config.policy.shadow_sample_percent,
            );
            shadow = Some((idle, Arc::new(record)));
        }
        let slots = match (&wasm_policy, &shadow) {
            (Some(live), Some((shadow, _))) => Some(Arc::new(wasm::Slots {
                live: Arc::clone(live),
                shadow: Arc::clone(shadow),
                configured_shadow,
            })
                as Arc<dyn domain::ports::PolicySlots>),
            _ => None,
        };
        let promotion = match (&wasm_policy, &shadow) {
            (Some(live), Some((shadow, _))) => Some(Arc::new(wasm::Promotion {
                live: Arc::clone(live),
                shadow: Arc::clone(shadow),
            })
                as Arc<dyn domain::ports::PolicyPromotion>),
            _ => None,
        };
        let mut host = Self::assemble(config, policy, control, shadow, promotion, from).await?;
        host.wasm_policy = wasm_policy;
        host.slots = slots;
        Ok(host)
    }

    /// The configured shadow policy, loaded and self-tested (by the live policy's engine
    /// when it is a component); start-up stops if it fails.
    async fn load_shadow(
        config: &Config,
        live: Option<&Arc<WasmPolicy>>,
    ) -> anyhow::Result<Shadowing> {
        let Some(path) = config.policy.shadow.clone() else {
            return Ok(None);
        };
        let policy = load_wasm(config, Some(path), live.map(|l| Arc::clone(l.runtime())))
            .await
            .context("loading the shadow policy (shadow_policy_path)")?;
        let shadow = Arc::new(application::shadow::Shadow::new(
            Arc::clone(&policy) as Arc<dyn domain::ports::ShadowPolicy>,
            config.policy.shadow_sample_percent,
        ));
        Ok(Some((policy, shadow)))
    }

    /// A host deciding with `policy`, which is not reloaded.
    pub async fn with_policy(
        config: &Config,
        policy: Arc<dyn ScoringPolicy>,
    ) -> anyhow::Result<Self> {
        let shadow = Self::load_shadow(config, None).await?;
        Self::assemble(config, policy, Arc::new(NativeScorer), shadow, None, None).await
    }

    async fn assemble(
        config: &Config,
        policy: Arc<dyn ScoringPolicy>,
        control: Arc<dyn PolicyControl>,
        shadow_policy: Shadowing,
        promotion: Option<Arc<dyn domain::ports::PolicyPromotion>>,
        from: Option<&dyn TakeOver>,
    ) -> anyhow::Result<Self> {
        let s = &config.settings;
        let certificates = load_certificates(s)?;
        for listener in &config.listeners {
            listener_tls(listener, certificates.as_ref())?;
        }
        let geo: Arc<dyn GeoResolver> = Arc::new(match &s.geoip_path {
            Some(path) => MaxMindGeo::open(path)?,
            None => MaxMindGeo::embedded()?,
        });
        let pg = pg_settings(config);
        let repo: Arc<dyn domain::ports::BackendRepository> = match &pg {
            Some(pg) => Arc::new(adapters::outbound::postgres::PgBackendRepository::new(
                pg.clone(),
            )),
            None => {
                let repo = SqliteBackendRepository::new(&s.db_path);
                if repo.create_if_missing()? {
                    tracing::info!(path = %s.db_path.display(), "created empty routing database");
                }
                Arc::new(repo)
            }
        };
        let shadow = shadow_policy.as_ref().map(|(_, s)| Arc::clone(s));
        let decisions = (s.decision_log_size > 0).then(|| {
            Arc::new(application::decision_log::DecisionLog::new(
                s.decision_log_size,
                s.decision_log_max_bytes,
                s.decision_log_sample_percent,
                s.decision_log_truncate_clients,
            ))
        });
        let metrics = Arc::new(domain::live_stats::LiveStats::default());
        let health = Arc::new(domain::health::LocalHealth::new(config.health.clone()));
        let suspects = Arc::new(application::health_monitor::Suspects::default());
        let health_counters = Arc::new(application::health_monitor::HealthCounters::default());
        let routing = Arc::new(
            Routing::new(repo, metrics.clone(), s.reload_drop_warn_percent)
                .with_health(Arc::clone(&health)),
        );
        routing
            .reload()
            .await
            .with_context(|| "loading the routing table at start-up")?;
        if let Some(shadow) = &shadow {
            shadow.start(Arc::clone(&routing), config.region.clone());
        }
        let bindings = config
            .binding_ttl()
            .map(|ttl| Arc::new(BindingTable::with_cap(ttl, s.max_bindings)));
        let telemetry = Arc::new(Telemetry::with_connection_limit(
            Some(s.max_connections).filter(|n| *n > 0),
        ));
        let registry = match &config.api {
            Some(api) => {
                let store: Arc<dyn domain::ports::RegistrationStore> = match &pg {
                    // The blocking client runs on blocking threads only.
                    Some(pg) => {
                        let (pg, pop) = (
                            pg.clone(),
                            s.cluster_node_id.clone().unwrap_or_else(host_name),
                        );
                        Arc::new(
                            tokio::task::spawn_blocking(move || {
                                adapters::outbound::postgres::PgRegistrations::open(&pg, pop)
                            })
                            .await?
                            .context("opening the routing table for registrations (api_enabled)")?,
                        )
                    }
                    None => Arc::new(
                        adapters::outbound::sqlite_editor::registrations::SqliteRegistrations::open(
                            &s.db_path,
                        )
                        .context("opening the routing table for registrations (api_enabled)")?,
                    ),
                };
                let (routing, geo, regions, ttl) = (
                    Arc::clone(&routing),
                    Arc::clone(&geo),
                    config.regions.clone(),
                    api.heartbeat_ttl,
                );
                let limits = application::registry::Limits {
                    destinations: api.destinations.clone(),
                    max_registrations: api.max_registrations,
                    max_per_app: api.max_per_app,
                    remove_after: api.remove_after,
                };
                let registry = tokio::task::spawn_blocking(move || {
                    application::registry::Registry::new(store, routing, geo, regions, ttl, limits)
                })
                .await?
                .context("reading this POP's registrations")?;
                Some(Arc::new(registry))
            }
            None => None,
        };
        let cluster_stop = CancellationToken::new();
        let cluster = match cluster_config(config) {
            Some(cfg) => Some({
                // Last of the start-up: from here a failure leaves the process taken over
                // from serving without replication.
                adapters::cluster::Cluster::check(&cfg)
                    .context("starting replication (cluster_enabled)")?;
                let sockets = match from {
                    Some(from) => from.release_cluster()?,
                    None => None,
                };
                adapters::cluster::Cluster::start(cfg, sockets, cluster_stop.clone())
                    .await
                    .context("starting replication (cluster_enabled)")?
            }),
            None => None,
        };
        let service = Arc::new(ProxyService {
            routing: Arc::clone(&routing),
            bindings: bindings.clone().map(|b| b as Arc<dyn BindingRepository>),
            geo: Arc::clone(&geo),
            regions: config.regions.clone(),
            policy,
            settings: ProxySettings {
                pop_region: config.region.clone(),
                connect_timeout: Duration::from_millis(s.connect_timeout_ms),
                connect_attempts: s.connect_attempts,
                idle_timeout: config.idle_timeout(),
                keepalive: Some(s.tcp_keepalive_secs)
                    .filter(|t| *t > 0)
                    .map(Duration::from_secs),
                truncate_clients: s.decision_log_truncate_clients,
            },
            buffers: adapters::net::BufferPool::new(64, MAX_PIPES),
            telemetry: Arc::clone(&telemetry),
            shadow: shadow.clone(),
            decisions: decisions.clone(),
            suspects: config
                .health
                .ejection
                .enabled
                .then(|| (Arc::clone(&suspects), config.health.ejection.after)),
        });
        let (dns, dns_front) = dns_service(config, &service, cluster.as_ref());
        let admin = Arc::new(Admin {
            health_counters: Arc::clone(&health_counters),
            registry: registry.clone(),
            decisions: decisions.clone(),
            shadow: shadow.clone(),
            promotion,
            region: config.region.clone(),
            routing: Arc::clone(&routing),
            bindings: bindings.clone().map(|b| b as Arc<dyn BindingRepository>),
            geo: Arc::clone(&geo),
            policy: control,
            telemetry: Arc::clone(&telemetry),
            cluster: cluster
                .clone()
                .map(|c| Arc::new(c) as Arc<dyn domain::ports::ClusterView>),
            fleet: cluster
                .clone()
                .map(|c| Arc::new(c) as Arc<dyn domain::ports::PolicyFleet>),
            policy_max_bytes: config.policy.max_bytes,
            dns: dns.clone(),
            certificates: certificates
                .clone()
                .map(|c| c as Arc<dyn domain::ports::CertificateExpiries>),
        });
        // Policies copy each new table in before it serves, so no connection waits for it.
        {
            let mut ready: Vec<Arc<dyn ScoringPolicy>> = vec![Arc::clone(&service.policy)];
            if let Some((shadow, _)) = &shadow_policy {
                ready.push(Arc::clone(shadow) as Arc<dyn ScoringPolicy>);
            }
            let pop = config.region.clone();
            routing.prepare_with(move |table| {
                for policy in &ready {
                    policy.prepare(table, &pop);
                }
            });
        }
        Ok(Self {
            service,
            routing,
            bindings,
            metrics,
            suspects,
            health_counters,
            shadow_policy: shadow_policy.map(|(p, _)| p),
            wasm_policy: None,
            slots: None,
            telemetry,
            admin,
            cluster,
            cluster_stop,
            http_idle: Duration::from_secs(s.http_idle_timeout_secs),
            client_limits: (
                config.client_limits(),
                s.rate_limit_enabled,
                Duration::from_secs(s.rate_limit_window_secs),
            ),
            abort: CancellationToken::new(),
            certificates,
            admin_token: config.admin.as_ref().and_then(|a| a.token.clone()),
            registry,
            api_token: config.api.as_ref().and_then(|a| a.token.clone()),
            db_path: s.db_path.clone(),
            pg,
            db_reload: Duration::from_secs(s.db_reload_secs),
            binding_gc_interval: Duration::from_secs(s.binding_gc_interval_secs),
            drain_timeout: Duration::from_secs(s.drain_timeout_secs),
            io_uring: s.data_path == "io_uring",
            dns,
            dns_front,
            metrics_path: config.metrics.as_ref().map(|m| m.path.clone()),
            metrics_token: config.metrics.as_ref().and_then(|m| m.token.clone()),
        })
    }

    /// Serves `listeners` (the admin API on `admin`, the registration API on `api`) and runs the reload and GC tasks
    /// until `shutdown` is cancelled; then stops accepting and lets open connections
    /// finish for up to the drain timeout, or until [`Self::abort`] fires. The admin API
    /// (and `/metrics`) answers until the drain ends.
    pub async fn run(
        &self,
        sockets: Sockets,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Drained> {
        let Sockets {
            listeners,
            admin,
            api,
            dns,
            metrics,
            #[cfg(target_os = "linux")]
            handover,
        } = sockets;
        let background = TaskTracker::new();
        // Not a child of `shutdown`: reloads and the admin API go on during the drain.
        let stop_background = CancellationToken::new();
        // The HTTP and DNS servers and registrations' expiry: also stopped once a new
        // process took the sockets over (it answers there; this one only drains).
        let stop_serving = stop_background.child_token();

        let db_changed = Arc::new(Notify::new());
        // PostgreSQL announces its changes; a file is watched.
        let stop_listening = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let _watch = match &self.pg {
            Some(pg) => {
                adapters::outbound::postgres::listen(
                    pg.clone(),
                    Arc::clone(&db_changed),
                    Arc::clone(&stop_listening),
                );
                None
            }
            None => {
                match adapters::inbound::file_watch::watch(&self.db_path, Arc::clone(&db_changed)) {
                    Ok(w) => Some(w),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot watch the routing database; reloading on the timer only");
                        None
                    }
                }
            }
        };
        let routing = Arc::clone(&self.routing);
        let (every, stop) = (self.db_reload, stop_background.clone());
        background.spawn(async move { routing.run(every, db_changed, stop).await });
        let rules = &self.routing.health().rules;
        if rules.any_checks() || rules.ejection.enabled {
            let monitor = application::health_monitor::HealthMonitor {
                routing: Arc::clone(&self.routing),
                health: Arc::clone(self.routing.health()),
                metrics: Arc::clone(&self.metrics),
                suspects: Arc::clone(&self.suspects),
                counters: Arc::clone(&self.health_counters),
            };
            background.spawn(monitor.run(stop_background.clone()));
        }
        if let Some(bindings) = &self.bindings {
            let bindings: Arc<dyn BindingRepository> = bindings.clone();
            let (every, stop) = (self.binding_gc_interval, stop_background.clone());
            background.spawn(application::bindings_gc::run(bindings, every, stop));
        }

        if let Some(policy) = &self.wasm_policy
            && let Some(path) = policy.path()
        {
            background.spawn(wasm::reload::run(
                Arc::clone(policy),
                path.to_owned(),
                stop_background.clone(),
            ));
        }
        if let Some(shadow) = &self.shadow_policy
            && let Some(path) = shadow.path()
        {
            background.spawn(wasm::reload::run(
                Arc::clone(shadow),
                path.to_owned(),
                stop_background.clone(),
            ));
        }
        if let Some(cluster) = &self.cluster {
            let rollout = application::rollout::Rollout {
                fleet: Arc::new(cluster.clone()),
                slots: self.slots.clone(),
                shadow: self.service.shadow.clone(),
                region: self.admin.region.to_string(),
                max_bytes: self.admin.policy_max_bytes,
            };
            background.spawn(rollout.run(stop_background.clone()));
        }
        let bound: Vec<std::net::SocketAddr> = listeners
            .iter()
            .map(|(l, _)| l.local_addr())
            .chain(admin.iter().map(TcpListener::local_addr))
            .chain(api.iter().map(TcpListener::local_addr))
            .chain(metrics.iter().map(TcpListener::local_addr))
            .chain(dns.iter().map(|d| d.tcp.local_addr()))
            .filter_map(Result::ok)
            .collect();
        // A row pointing at this POP (registered elsewhere, or by mistake) is skipped, and
        // the registration API refuses one.
        self.routing.listening_at(bound);
        if let Err(e) = self.routing.reload().await {
            tracing::warn!(error = %e, "routing reload once listening");
        }
        if let Some(listener) = admin {
            tracing::info!(addr = %listener.local_addr()?, "admin API listening");
            background.spawn(adapters::inbound::admin_http::serve(
                listener,
                Arc::clone(&self.admin),
                adapters::inbound::admin_http::Serving {
                    token: self.admin_token.clone(),
                    idle: self.http_idle,
                    metrics: self.metrics_path.clone(),
                    metrics_only: false,
                },
                stop_serving.clone(),
            ));
        }
        if let Some(listener) = metrics {
            tracing::info!(addr = %listener.local_addr()?, path = ?self.metrics_path, "metrics listening");
            background.spawn(adapters::inbound::admin_http::serve(
                listener,
                Arc::clone(&self.admin),
                adapters::inbound::admin_http::Serving {
                    token: self.metrics_token.clone(),
                    idle: self.http_idle,
                    metrics: self.metrics_path.clone(),
                    metrics_only: true,
                },
                stop_serving.clone(),
            ));
        }

        if let Some(registry) = &self.registry {
            background.spawn(Arc::clone(registry).run_expiry(stop_serving.clone()));
            if let Some(listener) = api {
                tracing::info!(addr = %listener.local_addr()?, ttl = ?registry.ttl, "registration API listening");
                background.spawn(adapters::inbound::registration_http::serve(
                    listener,
                    Arc::clone(registry),
                    self.api_token.clone(),
                    self.http_idle,
                    stop_serving.clone(),
                ));
            }
        }

        if let Some(certs) = &self.certificates {
            background.spawn(adapters::inbound::tls_certs::watch(
                Arc::clone(certs),
                stop_background.clone(),
            ));
        }
        if let (Some(sockets), Some(answers)) = (dns, &self.dns) {
            tracing::info!(addr = %sockets.local_addr()?, domain = answers.zone().apex(), front = ?answers.zone().front(), "DNS listening (UDP and TCP)");
            background.spawn(adapters::inbound::dns_server::serve(
                sockets,
                Arc::clone(answers),
                self.dns_front.limiter.clone(),
                stop_serving.clone(),
            ));
        }
        let front = self
            .dns_front
            .pops
            .as_ref()
            .filter(|_| !self.dns_front.addrs.is_empty());
        if let Some(pops) = front
            && let Err(e) = pops
                .publish_front(self.dns_front.addrs.clone(), false)
                .await
        {
            tracing::warn!(error = %e, "cannot publish this POP's front-name addresses");
        }
        // A front name turned off since: the fleet stops giving this POP out under it.
        if let (None, Some(cluster)) = (front, &self.cluster)
            && let Err(e) = cluster.withdraw_front().await
        {
            tracing::warn!(error = %e, "cannot withdraw this POP's front-name addresses");
        }
        // Stops the accept loops: at once on shutdown, or once a front POP has left the
        // front name's answers and resolvers' caches.
        let stop_accepting = CancellationToken::new();
        let connections = TaskTracker::new();
        let kill = CancellationToken::new();
        let acceptors = TaskTracker::new();
        let acceptor = adapters::inbound::tcp_server::Acceptor {
            service: Arc::clone(&self.service),
            shutdown: stop_accepting.clone(),
            connections: connections.clone(),
            kill: kill.clone(),
        };
        #[cfg(target_os = "linux")]
        let mut handover = handover;
        #[cfg(target_os = "linux")]
        if let Some(h) = &mut handover {
            self.take_bindings(h).await?;
        }
        let mut shared = None;
        // The io_uring data path's threads, and what each accepts on; they stop when
        // this function returns (or its future is dropped).
        let mut uring_jobs: Vec<Vec<adapters::inbound::uring_server::Job>> = Vec::new();
        let uring_gone = CancellationToken::new();
        let _uring_gone = uring_gone.clone().drop_guard();
        let io_uring = self.io_uring && data_path_available();
        for (listener, config) in listeners {
            let addr = listener.local_addr()?;
            // SO_REUSEPORT copies of one listener share its counts.
            let known = self
                .telemetry
                .listeners()
                .into_iter()
                .find(|l| l.addr == addr);
            let stats = known.unwrap_or_else(|| {
                tracing::info!(%addr, app = ?config.app, proxy_protocol = config.proxy_protocol, "listening");
                let (base, enabled, window) = &self.client_limits;
                let limiter = match config.client_limits(base, *enabled, *window) {
                    // Listeners without their own limits share the POP's.
                    Some(l) if l == *base => Some(Arc::clone(shared.get_or_insert_with(|| {
                        application::client_limits::ClientLimiter::new(l.clone())
                    }))),
                    Some(l) => Some(application::client_limits::ClientLimiter::new(l)),
                    None => None,
                };
                let s = Arc::new(
                    ListenerStats::new(
                        addr,
                        config.app.clone(),
                        config.proxy_protocol,
                        self.telemetry.slots.clone(),
                    )
                    .with_limiter(limiter)
                    .with_tls(config.tls.is_some()),
                );
                self.telemetry.add_listener(Arc::clone(&s));
                s
            });
            #[cfg(target_os = "linux")]
            if io_uring && config.tls.is_none() {
                // The n-th copy of a listener goes to the n-th thread.
                let copy = uring_jobs
                    .iter()
                    .position(|jobs| jobs.iter().all(|j| j.config.addr != config.addr));
                let job = adapters::inbound::uring_server::Job {
                    listener: listener.into_std()?,
                    config,
                    stats,
                };
                match copy {
                    Some(i) => uring_jobs[i].push(job),
                    None => uring_jobs.push(vec![job]),
                }
                continue;
            }
            let tls = listener_tls(&config, self.certificates.as_ref())?;
            acceptors.spawn(adapters::inbound::tcp_server::serve(
                listener,
                config,
                stats,
                acceptor.clone(),
                tls,
            ));
        }
        #[cfg(target_os = "linux")]
        if !uring_jobs.is_empty() {
            adapters::inbound::uring_server::start(uring_jobs, &acceptor, &acceptors, &uring_gone)?;
        }
        acceptors.close();
        let handed_over = CancellationToken::new();
        // Cancelled once the process this one took over from (if any) is gone.
        let predecessor = CancellationToken::new();
        #[cfg(target_os = "linux")]
        match handover {
            Some(handover) => {
                let stops = (&stop_accepting, &stop_background);
                // Among the acceptors: its copies of the listening sockets are closed
                // before the drain says no new connection gets in.
                self.hand_over(handover, (&handed_over, &predecessor), &acceptors, stops)
                    .await;
            }
            None => {
                adapters::inbound::handover::notify_ready();
                predecessor.cancel();
            }
        }
        #[cfg(not(target_os = "linux"))]
        predecessor.cancel();
        let handed_over = tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = handed_over.cancelled() => true,
        };
        if handed_over {
            stop_serving.cancel();
        }
        // A successor publishes its own front record; this one's is no longer ours to change.
        if let Some(pops) = front.filter(|_| !handed_over) {
            match pops.publish_front(self.dns_front.addrs.clone(), true).await {
                Ok(()) => {
                    tracing::info!(accepting_for = ?self.dns_front.leave, "left the front name's answers; still accepting while resolvers forget this POP");
                    tokio::select! {
                        _ = tokio::time::sleep(self.dns_front.leave) => {}
                        _ = self.abort.cancelled() => {}
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot tell the fleet this POP is draining"),
            }
        }
        stop_accepting.cancel();
        acceptors.wait().await; // listeners closed: no new connections from here on
        connections.close();
        let open = connections.len();
        if open > 0 {
            tracing::info!(open, timeout = ?self.drain_timeout, "draining connections");
        }
        let drain_ends = tokio::time::Instant::now() + self.drain_timeout;
        let drained = tokio::select! {
            r = tokio::time::timeout_at(drain_ends, connections.wait()) => r.is_ok(),
            _ = self.abort.cancelled() => false,
        };
        if drained && handed_over && !predecessor.is_cancelled() {
            // The successor counts the connections of the process before this one through
            // this one's reports (hard limits, load): they must not vanish with it.
            tracing::info!(
                "drained; staying until the process this one took over from has drained too, whose connections the successor counts through this one"
            );
            tokio::select! {
                // Within this process's own drain time: a stop is not held up twice.
                _ = tokio::time::timeout_at(drain_ends, predecessor.cancelled()) => {}
                _ = self.abort.cancelled() => {}
            }
        }
        let cut_off = match drained {
            true => 0,
            false => {
                let left = connections.len();
                tracing::warn!(left, "drain cut short; closing the remaining connections");
                kill.cancel();
                connections.wait().await;
                left
            }
        };
        stop_background.cancel();
        stop_listening.store(true, std::sync::atomic::Ordering::Relaxed);
        self.cluster_stop.cancel();
        if let Some(cluster) = self.cluster.clone() {
            let _ = tokio::task::spawn_blocking(move || cluster.join()).await;
        }
        background.close();
        background.wait().await;
        Ok(Drained { cut_off })
    }
}

#[cfg(target_os = "linux")]
impl Host {
    /// The sticky bindings of the process taken over from, taken in just before this one
    /// accepts (a client keeps its backend across the handover).
    async fn take_bindings(&self, handover: &mut Handover) -> anyhow::Result<()> {
        let (Some(from), Some(table)) = (handover.inherited.take(), self.bindings.clone()) else {
            return Ok(());
        };
        let taken = tokio::task::spawn_blocking(move || {
            let n = from.bindings(table.as_ref());
            (from, n)
        })
        .await;
        match taken {
            Ok((from, n)) => {
                handover.inherited = Some(from);
                match n {
                    Ok(n) => tracing::info!(bindings = n, "took the bindings over"),
                    Err(e) => {
                        tracing::warn!("handover: the bindings: {e:#}; clients are decided anew")
                    }
                }
            }
            // The connection to the old process went with it: this one cannot tell it to
            // stop accepting, so it must not start (the old one serves on).
            Err(e) => anyhow::bail!(
                "handover: taking the bindings over failed ({e}); the old process serves on"
            ),
        }
        Ok(())
    }

    /// Once this process accepts: tells the process it took over from (which then stops
    /// accepting), and serves the next successor from here on, until `stop_accepting`
    /// (the copies of the sockets must not outlive this process's accepting). One whose
    /// predecessor does not confirm stops at once: two processes never go on accepting.
    async fn hand_over(
        &self,
        handover: Handover,
        (handed_over, predecessor): (&CancellationToken, &CancellationToken),
        acceptors: &TaskTracker,
        (stop_accepting, drained): (&CancellationToken, &CancellationToken),
    ) {
        if let Some(from) = handover.inherited {
            // The old process's connections count here, per backend, while it drains.
            let stats = Arc::clone(&self.metrics);
            let mut counted: Vec<domain::BackendId> = Vec::new();
            // The new counts first, then the backends no longer held zeroed: no moment
            // in which a backend counts none of them.
            let on_held = move |held: Vec<(String, u32)>| {
                let now: Vec<domain::BackendId> = held
                    .into_iter()
                    .map(|(id, n)| {
                        let id = domain::BackendId::new(&id);
                        stats.backend_stats(&id).set_inherited(n);
                        id
                    })
                    .collect();
                for gone in counted.iter().filter(|id| !now.contains(id)) {
                    stats.backend_stats(gone).set_inherited(0);
                }
                counted = now;
            };
            let gone = predecessor.clone();
            let why = match tokio::task::spawn_blocking(move || from.ready(on_held, gone)).await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("{e:#}")),
                Err(e) => Some(e.to_string()),
            };
            if let Some(why) = why {
                predecessor.cancel();
                tracing::error!(
                    "handover: the old process did not confirm it stopped accepting ({why}); \
                     this one stops and drains, so that one process accepts"
                );
                handed_over.cancel();
                return;
            }
            tracing::info!("took over; the old process stopped accepting and drains");
        } else {
            predecessor.cancel();
        }
        if let Err(e) = handover.endpoint.publish() {
            tracing::error!(error = %e, "cannot take the handover socket's path; a later process cannot take over from this one");
        }
        adapters::inbound::handover::notify_ready();
        let (cluster, cluster_stop) = (self.cluster.clone(), self.cluster_stop.clone());
        let release = Box::new(move || {
            cluster_stop.cancel();
            match &cluster {
                Some(c) => {
                    c.join();
                    c.release()
                }
                None => Vec::new(),
            }
        });
        let handing = adapters::inbound::handover::Handing {
            sockets: handover.shared,
            release,
            bindings: self
                .bindings
                .clone()
                .map(|b| b as Arc<dyn BindingRepository>),
            held: {
                let stats = Arc::clone(&self.metrics);
                Arc::new(move || {
                    let held = stats.held().into_iter();
                    held.map(|(id, n)| (id.as_str().to_owned(), n)).collect()
                })
            },
            drained: drained.clone(),
        };
        acceptors.spawn(adapters::inbound::handover::serve(
            handover.endpoint,
            handing,
            handed_over.clone(),
            stop_accepting.clone(),
        ));
    }
}

/// What a listener terminates TLS with and re-encrypts to its backends with, where it does.
type ListenerTls = (
    Option<tokio_rustls::TlsAcceptor>,
    Option<tokio_rustls::TlsConnector>,
);

fn listener_tls(
    config: &ListenerConfig,
    certs: Option<&Arc<adapters::inbound::tls_certs::Certificates>>,
) -> anyhow::Result<ListenerTls> {
    let addr = config.addr;
    let terminator = match (config.terminates(), &certs) {
        (false, _) => None,
        (true, Some(certs)) => Some(tokio_rustls::TlsAcceptor::from(
            adapters::inbound::tls_certs::server_config(Arc::clone(certs), &config.alpn)?,
        )),
        (true, None) => anyhow::bail!(
            "listener {addr} terminates TLS but no certificate is configured (tls_cert and tls_key, or tls_cert_dir)"
        ),
    };
    let reencrypt = match (&config.backend_ca, config.backend_tls) {
        (Some(ca), true) => Some(
            adapters::inbound::tls_certs::backend_client(ca)
                .map_err(|e| anyhow::anyhow!("listener {addr}: backend_ca {e}"))?,
        ),
        _ => None,
    };
    Ok((terminator, reencrypt))
}

/// The DNS server's answers and front, when `[dns]` is on: its name server address is
/// its own when bound to one, else its front addresses, else the cluster's advertised one.
fn dns_service(
    config: &Config,
    service: &Arc<ProxyService>,
    cluster: Option<&adapters::cluster::Cluster>,
) -> (Option<Arc<application::dns::Dns>>, DnsFront) {
    use application::dns::{Dns, DnsSettings, LonePop};
    let Some(d) = &config.dns else {
        return (None, DnsFront::default());
    };
    let advertised = cluster.map(|c| c.advertised().ip());
    let front_addrs = match (d.front_addrs.is_empty(), advertised) {
        (true, Some(ip)) => vec![ip],
        _ => d.front_addrs.clone(),
    };
    let name_server = match d.addr.ip() {
        ip if !ip.is_unspecified() => vec![ip],
        _ if !d.front_addrs.is_empty() => d.front_addrs.clone(),
        _ => advertised.into_iter().collect(),
    };
    let region = config.region.to_string();
    let (directory, pops): (Arc<dyn domain::ports::PopDirectory>, _) = match cluster {
        Some(c) => {
            let pops = Arc::new(adapters::cluster::pops::ClusterPops::new(c.clone(), region));
            (pops.clone(), Some(pops))
        }
        None => {
            let me = name_server.first().map(|ip| domain::dns::Pop {
                name: host_name(),
                region,
                overlay: *ip,
                public: front_addrs.clone(),
                alive: true,
                draining: false,
            });
            (Arc::new(LonePop(Arc::new(me.into_iter().collect()))), None)
        }
    };
    let settings = DnsSettings {
        zone: d.zone.clone(),
        ttl: d.ttl,
        alternates: d.alternates,
        front_answers: d.front_answers,
        name_server,
    };
    let limiter = d
        .rate_limit
        .map(|rate| application::dns::prefix_limiter(Some(f64::from(rate)), None, 100_000));
    let front = DnsFront {
        limiter,
        pops,
        addrs: match d.zone.front() {
            Some(_) => front_addrs,
            None => Vec::new(),
        },
        leave: Duration::from_secs(u64::from(d.ttl))
            .min(Duration::from_secs(config.settings.drain_timeout_secs)),
    };
    (
        Some(Arc::new(Dns::new(Arc::clone(service), directory, settings))),
        front,
    )
}

/// The cluster's settings when replication is on (credentials are checked by the config).
fn cluster_config(config: &Config) -> Option<adapters::cluster::ClusterConfig> {
    let s = &config.settings;
    if !s.cluster_enabled {
        return None;
    }
    Some(adapters::cluster::ClusterConfig {
        node_name: s.cluster_node_id.clone().unwrap_or_else(host_name),
        cluster: s.cluster_name.clone(),
        gossip_addr: s.cluster_gossip_addr,
        transport_addr: s.cluster_transport_addr,
        advertise_ip: s.cluster_advertise_ip,
        bootstrap: s
            .cluster_bootstrap_peers
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(String::from)
            .collect(),
        gossip_interval: Duration::from_millis(s.cluster_gossip_interval_ms),
        sync_interval: Duration::from_millis(s.cluster_sync_interval_ms),
        max_skew: Duration::from_millis(s.cluster_max_clock_skew_ms),
        tombstone_ttl: Duration::from_secs(s.cluster_tombstone_ttl_secs),
        tls: match s.cluster_plaintext {
            true => None,
            false => Some(adapters::cluster::TlsFiles {
                ca: s.cluster_ca_file.clone()?,
                cert: s.cluster_cert_file.clone()?,
                key: s.cluster_key_file.clone()?,
            }),
        },
        db: s.db_path.clone(),
    })
}

/// The routing table's PostgreSQL database, when `db_url` is set.
pub fn pg_settings(config: &Config) -> Option<adapters::outbound::postgres::PgSettings> {
    let s = &config.settings;
    Some(adapters::outbound::postgres::PgSettings {
        url: s.db_url.clone()?,
        ca_file: s.db_ca_file.clone(),
        password_file: s.db_password_file.clone(),
    })
}

/// edgeProxy's default node id.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "edgeproxy".to_owned())
}

/// The bounds every policy call and instance gets, from the configuration.
pub fn policy_limits(config: &Config) -> Limits {
    Limits {
        timeout: config.policy.timeout,
        memory_bytes: config.policy.memory_bytes,
    }
}

/// The engine policies run on, with the configured bounds and compile cache.
/// Whether the io_uring data path can run here; logs once why not (the epoll path
/// serves instead).
fn data_path_available() -> bool {
    #[cfg(target_os = "linux")]
    match adapters::net::uring::probe() {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "data_path = \"io_uring\" is not available here; serving on epoll");
            false
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        tracing::warn!("data_path = \"io_uring\" needs Linux; serving on epoll");
        false
    }
}

pub fn policy_runtime(config: &Config) -> anyhow::Result<Runtime> {
    Ok(Runtime::new(policy_limits(config))?.with_cache(config.policy.cache_dir.as_deref()))
}

/// A policy compiled and self-tested on a blocking thread: the file at `path` (watched
/// and reloaded from there), or the embedded default when None. With `runtime`, compiled
/// by that engine (a shadow shares the live policy's, so it can be promoted).
async fn load_wasm(
    config: &Config,
    path: Option<std::path::PathBuf>,
    runtime: Option<Arc<Runtime>>,
) -> anyhow::Result<Arc<WasmPolicy>> {
    let client_regions = config.regions.client_regions();
    let config = config.clone();
    let policy = tokio::task::spawn_blocking(move || -> anyhow::Result<WasmPolicy> {
        let runtime = match runtime {
            Some(r) => r,
            None => Arc::new(policy_runtime(&config)?),
        };
        let loaded = wasm::load_configured(&runtime, path.as_deref())?;
        tracing::info!(policy = %loaded.name, hash = %loaded.hash, "policy loaded");
        let policy = WasmPolicy::new(runtime, client_regions, loaded);
        Ok(match path {
            Some(path) => policy.with_path(path),
            None => policy,
        })
    })
    .await??;
    Ok(Arc::new(policy))
}

/// The configured WebAssembly policy; None for the native scorer. A policy that fails to
/// load stops start-up.
async fn load_policy(config: &Config) -> anyhow::Result<Option<Arc<WasmPolicy>>> {
    match config.policy.source.clone() {
        PolicySource::Native => Ok(None),
        PolicySource::File(path) => load_wasm(config, Some(path), None).await.map(Some),
        PolicySource::Embedded => load_wasm(config, None, None).await.map(Some),
    }
}
