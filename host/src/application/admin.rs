//! What an operator can ask a running POP and tell it: status, the routing table joined
//! with live state, bindings, and reloads. The admin HTTP adapter and the Prometheus
//! collector both read through here, so `/status`, `/backends` and `/metrics` agree.
//! Answers are plain serializable values; formats belong to the adapters.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde::Serialize;
use tokio::time::Instant;

use crate::domain::health::HealthReport;
use crate::domain::ports::{
    BindingRepository, ErrorAt, GeoLookups, GeoResolver, PolicyControl, PolicyStatus, SkippedRow,
    timestamp,
};
use crate::domain::{Region, RoutedBackend};

use super::routing::{Reloaded, Routing};
use super::telemetry::{Decision, Telemetry};

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub version: &'static str,
    pub region: String,
    pub started_at: String,
    pub uptime_seconds: u64,
    pub listeners: Vec<ListenerStatus>,
    pub policy: PolicyStatus,
    pub routing: RoutingStatus,
    pub geoip: GeoStatus,
    pub bindings: BindingsStatus,
    /// The internal DNS server, when it is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DnsStatus {
    pub domain: String,
    pub front_name: Option<String>,
    pub ttl: u32,
    pub queries: u64,
    /// By type and response code, those seen.
    pub by_type: Vec<DnsCount>,
    pub truncated: u64,
    pub malformed: u64,
    pub rate_limited: DnsLimited,
    pub tcp_connections: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DnsCount {
    #[serde(rename = "type")]
    pub qtype: &'static str,
    pub rcode: &'static str,
    pub count: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DnsLimited {
    pub dropped: u64,
    pub slipped: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ListenerStatus {
    pub addr: SocketAddr,
    pub app: Option<String>,
    pub proxy_protocol: bool,
    pub accepted: u64,
    pub active: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RoutingStatus {
    pub version: u64,
    pub backends: usize,
    pub loaded_at: Option<String>,
    pub skipped_rows: Vec<SkippedRow>,
    pub reloads: ReloadCounts,
    /// Reloads that removed more than `reload_drop_warn_percent` of the backends.
    pub mass_drops: u64,
    pub last_error: Option<ErrorAt>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct ReloadCounts {
    pub changed: u64,
    pub unchanged: u64,
    pub failed: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct GeoStatus {
    pub database: String,
    pub lookups: GeoLookups,
}

#[derive(Debug, Clone, Serialize)]
pub struct BindingsStatus {
    pub enabled: bool,
    pub count: usize,
    pub hits: u64,
    pub misses: u64,
    /// Evicted because the table held `max_bindings`.
    pub evicted: u64,
}

/// One routing-table row with its live state.
#[derive(Debug, Clone, Serialize)]
pub struct BackendStatus {
    pub id: String,
    pub app: String,
    pub region: String,
    pub country: String,
    pub addr: SocketAddr,
    pub healthy: bool,
    pub weight: u32,
    pub soft_limit: u32,
    pub hard_limit: u32,
    /// This POP's checks and ejections let it route here (or its app is in panic).
    pub up_here: bool,
    /// Healthy in the table, up here, and under its hard limit right now.
    pub eligible: bool,
    /// This POP's checks and ejection of the backend.
    #[serde(flatten)]
    pub local: HealthReport,
    /// Its app has nothing up here, so local verdicts are set aside.
    pub app_in_panic: bool,
    /// Seconds since the last heartbeat, for backends registered through this POP's API.
    pub heartbeat_age_secs: Option<f64>,
    pub active: u32,
    pub connect_attempts: u64,
    pub connect_failures: u64,
    /// Connect round-trip time, moving average; None before the first connect.
    pub rtt_us: Option<u64>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// DNS answers that named it.
    pub dns_answers: u64,
}

impl From<&RoutedBackend> for BackendStatus {
    fn from(rb: &RoutedBackend) -> Self {
        let (b, s) = (&rb.backend, &rb.stats);
        Self {
            id: b.id.to_string(),
            app: b.app.to_string(),
            region: b.region.to_string(),
            country: b.country.to_string(),
            addr: b.addr,
            healthy: b.healthy,
            weight: b.weight,
            soft_limit: b.soft_limit,
            hard_limit: b.hard_limit,
            up_here: rb.up(),
            eligible: rb.is_eligible(),
            local: HealthReport::default(),
            app_in_panic: false,
            heartbeat_age_secs: None,
            active: s.active(),
            connect_attempts: s.connect_attempts(),
            connect_failures: s.connect_failures(),
            rtt_us: Some(s.rtt_us()).filter(|&r| r > 0),
            bytes_up: s.traffic.up.load(std::sync::atomic::Ordering::Relaxed),
            bytes_down: s.traffic.down.load(std::sync::atomic::Ordering::Relaxed),
            dns_answers: s.dns_answers.load(std::sync::atomic::Ordering::Relaxed),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BindingsPage {
    pub total: usize,
    pub offset: usize,
    pub limit: usize,
    pub bindings: Vec<BindingStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BindingStatus {
    pub client: IpAddr,
    pub app: Option<String>,
    pub backend: String,
    pub expires_in_seconds: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReloadReport {
    pub routing: ReloadResult,
    pub policy: ReloadResult,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReloadResult {
    Changed,
    Unchanged,
    Failed(String),
}

impl ReloadReport {
    pub fn ok(&self) -> bool {
        !matches!(self.routing, ReloadResult::Failed(_))
            && !matches!(self.policy, ReloadResult::Failed(_))
    }
}

/// The most bindings one page returns.
pub const MAX_PAGE: usize = 1000;

pub struct Admin {
    pub region: Region,
    pub routing: Arc<Routing>,
    pub bindings: Option<Arc<dyn BindingRepository>>,
    pub geo: Arc<dyn GeoResolver>,
    pub policy: Arc<dyn PolicyControl>,
    pub telemetry: Arc<Telemetry>,
    pub cluster: Option<Arc<dyn crate::domain::ports::ClusterView>>,
    pub health_counters: Arc<super::health_monitor::HealthCounters>,
    /// The registration API's state, when it is served.
    pub registry: Option<Arc<super::registry::Registry>>,
    /// The shadow policy's record, when one is configured.
    pub shadow: Option<Arc<super::shadow::Shadow>>,
    /// Recent decisions, sampled (None: `decision_log_size = 0`).
    pub decisions: Option<Arc<super::decision_log::DecisionLog>>,
    /// Promotion of the shadow and rollback, when both policies are components.
    pub promotion: Option<Arc<dyn crate::domain::ports::PolicyPromotion>>,
    /// Fleet deployments, when replication is on.
    pub fleet: Option<Arc<dyn crate::domain::ports::PolicyFleet>>,
    /// Largest component a deployment may carry.
    pub policy_max_bytes: u64,
    /// The internal DNS server, when it is on.
    pub dns: Option<Arc<super::dns::Dns>>,
    /// The certificates TLS listeners present, when any are configured.
    pub certificates: Option<Arc<dyn crate::domain::ports::CertificateExpiries>>,
}

/// Why a deployment or a fleet rollback was not made.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("replication is off on this POP (cluster_enabled): fleet deployments need it")]
    Off,
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Refused(String),
}

impl Admin {
    /// Stores `bytes` in the fleet and deploys them (`expect_hash`: the SHA-256 the
    /// operator means to deploy; bytes that differ are refused).
    pub async fn deploy(
        &self,
        request: crate::domain::ports::DeployRequest,
        bytes: Vec<u8>,
        expect_hash: Option<&str>,
    ) -> Result<crate::domain::rollout::Deployment, FleetError> {
        let fleet = self.fleet.as_ref().ok_or(FleetError::Off)?;
        if bytes.is_empty() {
            return Err(FleetError::Invalid(
                "the body is empty: send the component's bytes".into(),
            ));
        }
        let mut bytes = bytes;
        if let Some(want) = expect_hash {
            // Megabytes: hashed off the proxy's worker threads.
            let got;
            (got, bytes) = tokio::task::spawn_blocking(move || {
                (crate::domain::rollout::content_hash(&bytes), bytes)
            })
            .await
            .map_err(|e| FleetError::Refused(e.to_string()))?;
            if got != want {
                return Err(FleetError::Invalid(format!(
                    "the component's SHA-256 is {got}, not the {want} given: refusing to deploy it"
                )));
            }
        }
        fleet
            .deploy(request, bytes, self.policy_max_bytes)
            .await
            .map_err(FleetError::Refused)
    }

    /// Revokes the latest fleet deployment of `role`: the POPs it selected go back to
    /// what they ran before it.
    pub async fn fleet_rollback(
        &self,
        role: crate::domain::rollout::Role,
    ) -> Result<crate::domain::rollout::Deployment, FleetError> {
        let fleet = self.fleet.as_ref().ok_or(FleetError::Off)?;
        fleet.revoke_latest(role).await.map_err(FleetError::Refused)
    }

    /// The fleet as this POP sees it; None when replication is off.
    pub fn cluster(&self) -> Option<crate::domain::ports::ClusterStatus> {
        self.cluster.as_ref().map(|c| c.status())
    }

    pub fn status(&self) -> Status {
        let table = self.routing.current();
        let history = self.routing.history();
        let [changed, unchanged, failed] = self.routing.reload_counts();
        Status {
            version: env!("CARGO_PKG_VERSION"),
            region: self.region.to_string(),
            started_at: timestamp(self.telemetry.started),
            uptime_seconds: self.telemetry.uptime().as_secs(),
            listeners: self
                .telemetry
                .listeners()
                .iter()
                .map(|l| ListenerStatus {
                    addr: l.addr,
                    app: l.app.clone(),
                    proxy_protocol: l.proxy_protocol,
                    accepted: l.accepted(),
                    active: l.active(),
                })
                .collect(),
            policy: {
                let mut p = self.policy.status();
                if p.kind == "native" {
                    p.decisions = [Decision::Picked, Decision::Refused, Decision::Overridden]
                        .map(|d| self.telemetry.decisions(d))
                        .iter()
                        .sum();
                }
                p
            },
            routing: RoutingStatus {
                version: table.version(),
                backends: table.backends().len(),
                loaded_at: history.loaded_at.map(timestamp),
                skipped_rows: self.routing.skipped(),
                reloads: ReloadCounts {
                    changed,
                    unchanged,
                    failed,
                },
                mass_drops: self
                    .routing
                    .mass_drops
                    .load(std::sync::atomic::Ordering::Relaxed),
                last_error: history.last_error.map(|(at, m)| ErrorAt::new(at, m)),
            },
            geoip: GeoStatus {
                database: self.geo.describe(),
                lookups: self.geo.lookups(),
            },
            bindings: BindingsStatus {
                enabled: self.bindings.is_some(),
                count: self.bindings.as_ref().map_or(0, |b| b.len()),
                hits: self
                    .telemetry
                    .binding_hits
                    .load(std::sync::atomic::Ordering::Relaxed),
                misses: self
                    .telemetry
                    .binding_misses
                    .load(std::sync::atomic::Ordering::Relaxed),
                evicted: self.bindings.as_ref().map_or(0, |b| b.evicted()),
            },
            dns: self.dns.as_ref().map(|d| {
                let load =
                    |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::Relaxed);
                let st = &d.stats;
                DnsStatus {
                    domain: d.zone().apex().to_owned(),
                    front_name: d.zone().front().map(str::to_owned),
                    ttl: d.settings.ttl,
                    queries: st.total(),
                    by_type: st
                        .queries()
                        .into_iter()
                        .map(|(qtype, rcode, count)| DnsCount {
                            qtype,
                            rcode,
                            count,
                        })
                        .collect(),
                    truncated: load(&st.truncated),
                    malformed: load(&st.malformed),
                    rate_limited: DnsLimited {
                        dropped: load(&st.rate_dropped),
                        slipped: load(&st.rate_slipped),
                    },
                    tcp_connections: load(&st.tcp_connections),
                }
            }),
        }
    }

    pub fn backends(&self) -> Vec<BackendStatus> {
        let table = self.routing.current();
        let now = Instant::now();
        let health = self.routing.health();
        table
            .backends()
            .iter()
            .map(|rb| BackendStatus {
                local: health.report(&rb.backend.id, now),
                app_in_panic: table.panicking().contains(&rb.backend.app),
                heartbeat_age_secs: self
                    .registry
                    .as_ref()
                    .and_then(|r| r.heartbeat_age(&rb.backend.id))
                    .map(|d| d.as_secs_f64()),
                ..BackendStatus::from(rb)
            })
            .collect()
    }

    /// Up to `limit` (at most [`MAX_PAGE`]) bindings from `offset`, ordered by client.
    pub fn bindings(&self, offset: usize, limit: usize) -> BindingsPage {
        let limit = limit.min(MAX_PAGE);
        let (total, entries) = match &self.bindings {
            Some(b) => b.page(offset, limit, Instant::now()),
            None => (0, Vec::new()),
        };
        BindingsPage {
            total,
            offset,
            limit,
            bindings: entries
                .into_iter()
                .map(|e| BindingStatus {
                    client: e.key.client,
                    app: e.key.app.map(|a| a.to_string()),
                    backend: e.backend.to_string(),
                    expires_in_seconds: e.expires_in.as_secs(),
                })
                .collect(),
        }
    }

    /// Forgets every binding of `client`, so its next connection is decided afresh.
    pub fn unbind(&self, client: IpAddr) -> usize {
        self.bindings
            .as_ref()
            .map_or(0, |b| b.remove_client(client.to_canonical()))
    }

    /// Makes the shadow live (`promote`) or brings back what served before (rollback);
    /// with `drop_bindings`, every client's next connection is decided afresh by the
    /// policy serving now (otherwise bindings made before run out by their TTL).
    pub async fn promote(
        &self,
        promote: bool,
        drop_bindings: bool,
    ) -> Result<crate::domain::ports::Promoted, String> {
        let Some(p) = self.promotion.clone() else {
            return Err(match self.shadow {
                None => "no shadow policy on this POP (shadow_policy_path)".into(),
                Some(_) => "the live policy is the native scorer (native_policy); only a component can be replaced by the shadow".into(),
            });
        };
        let mut done = tokio::task::spawn_blocking(move || match promote {
            true => p.promote(),
            false => p.rollback(),
        })
        .await
        .map_err(|e| format!("promotion failed: {e}"))??;
        if drop_bindings {
            done.bindings_dropped = self.bindings.as_ref().map_or(0, |b| b.clear());
        }
        Ok(done)
    }

    /// Reloads the routing table and the policy now, whatever the timers say.
    pub async fn reload(&self) -> ReloadReport {
        let routing = match self.routing.reload().await {
            Ok(Reloaded::Changed { .. }) => ReloadResult::Changed,
            Ok(Reloaded::Unchanged) => ReloadResult::Unchanged,
            Err(e) => ReloadResult::Failed(e.to_string()),
        };
        let policy = Arc::clone(&self.policy);
        let policy = match tokio::task::spawn_blocking(move || policy.reload()).await {
            Ok(Ok(true)) => ReloadResult::Changed,
            Ok(Ok(false)) => ReloadResult::Unchanged,
            Ok(Err(e)) => ReloadResult::Failed(e),
            Err(e) => ReloadResult::Failed(format!("policy loader failed: {e}")),
        };
        ReloadReport { routing, policy }
    }
}
