//! `/metrics` in the Prometheus text format (0.0.4), written by `prometheus-client` from
//! the live counters at scrape time: the hot path only bumps atomics, and every number
//! here is read through [`Admin`], the same source as `/status` and `/backends`.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::application::admin::{Admin, BackendStatus};
use crate::application::telemetry::{Decision, HistogramSnapshot, ListenerStats};
use crate::domain::health::CheckVerdict;
use crate::domain::ports::ClusterStatus;

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

pub fn registry(admin: Arc<Admin>) -> Registry {
    let mut registry = Registry::with_prefix("edgeproxy");
    registry.register_collector(Box::new(HostCollector(admin)));
    registry
}

pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    prometheus_client::encoding::prometheus_text::encode(&mut out, registry)
        .expect("encoding into a String");
    out
}

struct HostCollector(Arc<Admin>);

impl std::fmt::Debug for HostCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HostCollector")
    }
}

type Labels<'a> = Vec<(&'static str, &'a str)>;

/// One metric family: a descriptor, then a sample per label set.
fn family<'l, M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels<'l>, M)>,
) -> std::fmt::Result {
    let mut samples = samples.into_iter().peekable();
    let Some((_, first)) = samples.peek() else {
        return Ok(());
    };
    let mut m = enc.encode_descriptor(name, help, None, first.metric_type())?;
    for (labels, value) in samples {
        value.encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn counter(v: u64) -> ConstCounter<u64> {
    ConstCounter::new(v)
}

fn gauge(v: i64) -> ConstGauge<i64> {
    ConstGauge::new(v)
}

fn histogram(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    h: &HistogramSnapshot,
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
    m.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
        h.sum_seconds,
        h.count,
        &h.buckets,
        None,
    )
}

fn gauges(v: Vec<(Labels<'_>, u64)>) -> impl Iterator<Item = (Labels<'_>, ConstGauge<i64>)> {
    v.into_iter().map(|(l, v)| (l, gauge(int(v))))
}

fn counters(v: Vec<(Labels<'_>, u64)>) -> impl Iterator<Item = (Labels<'_>, ConstCounter<u64>)> {
    v.into_iter().map(|(l, v)| (l, counter(v)))
}

fn int(v: impl TryInto<i64>) -> i64 {
    v.try_into().unwrap_or(i64::MAX)
}

impl Collector for HostCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let admin = &self.0;
        let status = admin.status();
        let telemetry = &admin.telemetry;
        let e = &mut enc;

        family(
            e,
            "build_info",
            "Build information (always 1)",
            [(vec![("version", status.version)], gauge(1))],
        )?;
        family(
            e,
            "uptime_seconds",
            "Seconds since start",
            [(vec![], gauge(int(status.uptime_seconds)))],
        )?;

        let listeners = telemetry.listeners();
        let addrs: Vec<String> = listeners.iter().map(|l| l.addr.to_string()).collect();
        let per_listener = |f: fn(&ListenerStats) -> u64| {
            listeners
                .iter()
                .zip(&addrs)
                .map(|(l, a)| (vec![("listener", a.as_str())], f(l)))
                .collect::<Vec<_>>()
        };
        family(
            e,
            "connections_accepted",
            "Client connections accepted",
            counters(per_listener(ListenerStats::accepted)),
        )?;
        family(
            e,
            "connections_closed",
            "Client connections closed",
            counters(per_listener(ListenerStats::closed)),
        )?;
        family(
            e,
            "connections_active",
            "Client connections open now",
            gauges(per_listener(ListenerStats::active)),
        )?;
        let tls: Vec<_> = listeners
            .iter()
            .zip(&addrs)
            .filter_map(|(l, a)| Some((l.tls.as_ref()?, a)))
            .collect();
        if !tls.is_empty() {
            family(
                e,
                "tls_rejected",
                "Connections a TLS listener closed before routing, by reason",
                tls.iter()
                    .flat_map(|(t, a)| {
                        t.rejected().map(|(why, n)| {
                            (vec![("listener", a.as_str()), ("reason", why)], counter(n))
                        })
                    })
                    .collect::<Vec<_>>(),
            )?;
        }
        let limited: Vec<_> = listeners
            .iter()
            .zip(&addrs)
            .filter(|(l, _)| l.limiter.is_some())
            .collect();
        if !limited.is_empty() {
            family(
                e,
                "connections_refused",
                "Client connections refused by the per-client limits (rate: new connections, open: connections at once)",
                limited
                    .iter()
                    .flat_map(|(l, a)| {
                        [
                            ("rate", l.refused_rate.load(Relaxed)),
                            ("open", l.refused_open.load(Relaxed)),
                        ]
                        .map(|(why, n)| {
                            (vec![("listener", a.as_str()), ("reason", why)], counter(n))
                        })
                    })
                    .collect::<Vec<_>>(),
            )?;
            family(
                e,
                "client_limit_untracked",
                "Connections admitted untracked: the per-client table was full of active clients",
                limited
                    .iter()
                    .map(|(l, a)| {
                        let n = l
                            .limiter
                            .as_ref()
                            .map_or(0, |x| x.counters.untracked.load(Relaxed));
                        (vec![("listener", a.as_str())], counter(n))
                    })
                    .collect::<Vec<_>>(),
            )?;
            family(
                e,
                "client_limit_tracked",
                "Client prefixes the per-client limits track now",
                limited
                    .iter()
                    .map(|(l, a)| {
                        let n = l.limiter.as_ref().map_or(0, |x| x.tracked());
                        (vec![("listener", a.as_str())], gauge(int(n as u64)))
                    })
                    .collect::<Vec<_>>(),
            )?;
        }
        family(
            e,
            "connections_no_backend",
            "Client connections closed because no backend was eligible or every connect failed",
            [(vec![], counter(telemetry.no_backend.load(Relaxed)))],
        )?;
        family(
            e,
            "connect_local_failures",
            "Backend connects that failed for this POP's own want of descriptors, buffers or ports (no backend blamed)",
            [(
                vec![],
                counter(telemetry.local_connect_failures.load(Relaxed)),
            )],
        )?;
        if let Some(slots) = &telemetry.slots {
            family(
                e,
                "accept_pauses",
                "Times an accept loop paused because the POP held max_connections",
                [(vec![], counter(slots.pauses.load(Relaxed)))],
            )?;
            family(
                e,
                "connections_limit",
                "max_connections: client connections this POP holds at most",
                [(
                    vec![],
                    gauge(i64::try_from(slots.max()).unwrap_or(i64::MAX)),
                )],
            )?;
        }

        let backends = admin.backends();
        let per_backend = |f: fn(&BackendStatus) -> u64| {
            backends
                .iter()
                .map(|b| {
                    let labels = vec![
                        ("backend", b.id.as_str()),
                        ("app", b.app.as_str()),
                        ("region", b.region.as_str()),
                    ];
                    (labels, f(b))
                })
                .collect::<Vec<_>>()
        };
        family(
            e,
            "backend_active_connections",
            "Connections open to the backend now",
            gauges(per_backend(|b| u64::from(b.active))),
        )?;
        family(
            e,
            "backend_healthy",
            "1 when the routing table marks the backend healthy (the fleet's intent; see backend_up for this POP's view)",
            gauges(per_backend(|b| u64::from(b.healthy))),
        )?;
        family(
            e,
            "backend_up",
            "1 when this POP's health checks and ejections let it route to the backend (or its app is in panic)",
            gauges(per_backend(|b| u64::from(b.up_here))),
        )?;
        family(
            e,
            "backend_check_up",
            "Health check state: 1 up, 0 down (absent when the backend's app is not checked or not checked yet)",
            gauges(
                per_backend(|b| match b.local.check.as_ref().map(|c| c.state) {
                    Some(CheckVerdict::Up) => 1,
                    Some(CheckVerdict::Down) => 0,
                    _ => u64::MAX,
                })
                .into_iter()
                .filter(|(_, v)| *v != u64::MAX)
                .collect(),
            ),
        )?;
        family(
            e,
            "backend_ejected",
            "1 while the backend is ejected from this POP after consecutive connect failures",
            gauges(per_backend(|b| u64::from(b.local.ejection.is_some()))),
        )?;
        family(
            e,
            "backend_heartbeat_age_seconds",
            "Seconds since the last heartbeat of a backend registered through this POP",
            backends.iter().filter_map(|b| {
                let age = b.heartbeat_age_secs?;
                Some((vec![("backend", b.id.as_str())], ConstGauge::new(age)))
            }),
        )?;
        let h = &admin.health_counters;
        family(
            e,
            "health_checks",
            "Health checks by result (local_error: this POP was out of descriptors or ports, nobody blamed)",
            [
                ("passed", h.checks_passed.load(Relaxed)),
                ("failed", h.checks_failed.load(Relaxed)),
                ("local_error", h.checks_local_errors.load(Relaxed)),
            ]
            .map(|(result, n)| (vec![("result", result)], counter(n))),
        )?;
        family(
            e,
            "ejections",
            "Passive ejections (capped: refused by ejection_max_percent)",
            [
                ("ejected", h.ejections.load(Relaxed)),
                ("capped", h.ejections_capped.load(Relaxed)),
            ]
            .map(|(outcome, n)| (vec![("outcome", outcome)], counter(n))),
        )?;
        // Every app, 0 or 1: a dashboard tells "not in panic" from "not scraped".
        let panicking: std::collections::BTreeMap<&str, bool> = backends
            .iter()
            .map(|b| (b.app.as_str(), b.app_in_panic))
            .collect();
        family(
            e,
            "app_health_panic",
            "1 for an app with nothing up from this POP: local verdicts are set aside and it is routed by the table alone",
            panicking
                .into_iter()
                .map(|(app, on)| (vec![("app", app)], gauge(i64::from(on)))),
        )?;
        if let Some(s) = &admin.shadow {
            let (compared, agreed) = s.counts();
            family(
                e,
                "shadow_decisions",
                "Shadow policy decisions against the live one (fault: the shadow faulted; dropped, stale, suspended: not asked, as its queue was full, the table changed, or its breaker was open; traffic unaffected)",
                [
                    ("agree", agreed),
                    ("disagree", compared - agreed),
                    ("fault", s.faults.load(Relaxed)),
                    ("dropped", s.dropped.load(Relaxed)),
                    ("stale", s.stale.load(Relaxed)),
                    ("suspended", s.suspended.load(Relaxed)),
                ]
                .map(|(result, n)| (vec![("result", result)], counter(n))),
            )?;
        }
        if let Some(r) = &admin.registry {
            let c = &r.counters;
            family(
                e,
                "registrations",
                "Registration API events (rejected: a 4xx, nothing written)",
                [
                    ("registered", c.registrations.load(Relaxed)),
                    ("heartbeat", c.heartbeats.load(Relaxed)),
                    ("expired", c.expirations.load(Relaxed)),
                    ("revived", c.revivals.load(Relaxed)),
                    ("deregistered", c.deregistrations.load(Relaxed)),
                    ("removed", c.removals.load(Relaxed)),
                    ("rejected", c.rejected.load(Relaxed)),
                ]
                .map(|(event, n)| (vec![("event", event)], counter(n))),
            )?;
        }
        family(
            e,
            "backend_connect_attempts",
            "Connects tried to the backend",
            counters(per_backend(|b| b.connect_attempts)),
        )?;
        family(
            e,
            "backend_connect_failures",
            "Connects to the backend that failed or timed out",
            counters(per_backend(|b| b.connect_failures)),
        )?;
        enc_rtt(e, &backends)?;
        family(
            e,
            "backend_bytes_up",
            "Bytes relayed from clients to the backend",
            counters(per_backend(|b| b.bytes_up)),
        )?;
        family(
            e,
            "backend_bytes_down",
            "Bytes relayed from the backend to clients",
            counters(per_backend(|b| b.bytes_down)),
        )?;
        if let Some(certs) = &admin.certificates {
            let expiries = certs.expiries();
            family(
                e,
                "tls_certificate_expiry_timestamp_seconds",
                "When each certificate serving now expires (its notAfter, Unix time)",
                expiries
                    .iter()
                    .map(|(file, at)| (vec![("file", file.as_str())], gauge(*at))),
            )?;
        }
        if let (Some(dns), Some(answers)) = (&status.dns, &admin.dns) {
            family(
                e,
                "dns_queries",
                "DNS queries by type and response code",
                dns.by_type.iter().map(|c| {
                    (
                        vec![("type", c.qtype), ("rcode", c.rcode)],
                        counter(c.count),
                    )
                }),
            )?;
            family(
                e,
                "dns_answers",
                "DNS answers naming the backend (the pick or an alternate)",
                counters(per_backend(|b| b.dns_answers)),
            )?;
            family(
                e,
                "dns_rate_limited",
                "UDP DNS answers over a client prefix's rate: dropped, or sent truncated (slipped)",
                [
                    (
                        vec![("action", "dropped")],
                        counter(dns.rate_limited.dropped),
                    ),
                    (
                        vec![("action", "slipped")],
                        counter(dns.rate_limited.slipped),
                    ),
                ],
            )?;
            family(
                e,
                "dns_truncated",
                "UDP DNS answers that did not fit and were sent truncated",
                [(vec![], counter(dns.truncated))],
            )?;
            family(
                e,
                "dns_malformed",
                "Packets to the DNS server that were no query (not answered)",
                [(vec![], counter(dns.malformed))],
            )?;
            histogram(
                e,
                "dns_query_seconds",
                "Time to answer a DNS query (parse, decide, encode)",
                &answers.stats.time.snapshot(),
            )?;
        }
        histogram(
            e,
            "backend_connect_seconds",
            "Time to connect to the chosen backend",
            &telemetry.connect_time.snapshot(),
        )?;

        family(
            e,
            "bindings",
            "Sticky client bindings held",
            [(vec![], gauge(int(status.bindings.count)))],
        )?;
        family(
            e,
            "binding_lookups",
            "New connections by whether a live binding decided them",
            [
                (vec![("result", "hit")], counter(status.bindings.hits)),
                (vec![("result", "miss")], counter(status.bindings.misses)),
            ],
        )?;
        family(
            e,
            "bindings_evicted",
            "Bindings evicted because the table held max_bindings (the least recently used)",
            [(vec![], counter(status.bindings.evicted))],
        )?;

        histogram(
            e,
            "decision_seconds",
            "Time to choose a backend for a new connection (binding or policy)",
            &telemetry.decision_time.snapshot(),
        )?;
        family(
            e,
            "decisions",
            "Policy decisions by outcome (overridden: the policy named an ineligible backend)",
            [
                ("picked", Decision::Picked),
                ("refused", Decision::Refused),
                ("overridden", Decision::Overridden),
            ]
            .map(|(name, d)| (vec![("outcome", name)], counter(telemetry.decisions(d)))),
        )?;
        let p = &status.policy;
        let hash = p.hash.as_deref().unwrap_or("");
        family(
            e,
            "policy_info",
            "The policy deciding now (always 1)",
            [(
                vec![("kind", p.kind), ("name", p.name.as_str()), ("hash", hash)],
                gauge(1),
            )],
        )?;
        family(
            e,
            "policy_decisions",
            "Decisions made by the policy serving now, since it was loaded",
            [(
                vec![("name", p.name.as_str()), ("hash", hash)],
                counter(p.decisions),
            )],
        )?;
        let f = p.faults;
        family(
            e,
            "policy_faults",
            "Policy calls that failed; the native scorer decided each of them",
            [
                ("trap", f.traps),
                ("timeout", f.timeouts),
                ("bad_answer", f.bad_answers),
                ("instantiate", f.instantiate_failures),
            ]
            .map(|(kind, n)| (vec![("kind", kind)], counter(n))),
        )?;
        let fallbacks = f.traps
            + f.timeouts
            + f.bad_answers
            + f.instantiate_failures
            + p.suspended_decisions
            + telemetry.decisions(Decision::Overridden);
        family(
            e,
            "policy_suspensions",
            "Times the policy faulted repeatedly and was suspended (the native scorer decided)",
            [(vec![], counter(p.suspensions))],
        )?;
        family(
            e,
            "policy_suspended",
            "1 while the policy is suspended after repeated faults",
            [(vec![], gauge(i64::from(p.suspended_for_ms.is_some())))],
        )?;
        family(
            e,
            "policy_fallbacks",
            "Decisions the native scorer made in the policy's place",
            [(vec![], counter(fallbacks))],
        )?;
        family(
            e,
            "policy_reloads",
            "Policy file reloads by result",
            [
                (vec![("result", "ok")], counter(p.reloads)),
                (vec![("result", "failed")], counter(p.reload_failures)),
            ],
        )?;

        let r = &status.routing;
        family(
            e,
            "routing_reloads",
            "Routing table loads by result",
            [
                (vec![("result", "changed")], counter(r.reloads.changed)),
                (vec![("result", "unchanged")], counter(r.reloads.unchanged)),
                (vec![("result", "failed")], counter(r.reloads.failed)),
            ],
        )?;
        family(
            e,
            "routing_mass_drops",
            "Routing reloads that removed more than reload_drop_warn_percent of the backends at once",
            [(vec![], counter(r.mass_drops))],
        )?;
        family(
            e,
            "routing_table_version",
            "Version of the routing table serving now (bumped on every change)",
            [(vec![], gauge(int(r.version)))],
        )?;
        family(
            e,
            "routing_backends",
            "Backends in the routing table serving now",
            [(vec![], gauge(int(r.backends)))],
        )?;
        family(
            e,
            "routing_skipped_rows",
            "Rows of the last load skipped as invalid",
            [(vec![], gauge(int(r.skipped_rows.len())))],
        )?;

        let g = status.geoip.lookups;
        family(
            e,
            "geoip_lookups",
            "Client GeoIP lookups by result",
            [
                ("found", g.found),
                ("not_found", g.not_found),
                ("failed", g.failed),
            ]
            .map(|(result, n)| (vec![("result", result)], counter(n))),
        )?;
        match admin.cluster() {
            Some(c) => enc_cluster(e, &c),
            None => Ok(()),
        }
    }
}

/// The fleet as this POP sees it (present only with replication on).
fn enc_cluster(e: &mut DescriptorEncoder, c: &ClusterStatus) -> std::fmt::Result {
    let states = ["alive", "suspect", "down"].map(|state| {
        let n = c.members.iter().filter(|m| m.state == state).count();
        (vec![("state", state)], gauge(int(n)))
    });
    family(e, "cluster_members", "Other POPs by SWIM state", states)?;
    family(
        e,
        "cluster_changes",
        "Replicated row changes: sent (local writes pushed), received, applied (won the merge), rejected (failed validation), clock_ahead (held back: stamped beyond the allowed skew), superseded (live rows dropped: a peer saw their write superseded)",
        [
            ("sent", c.changes_sent),
            ("received", c.changes_received),
            ("applied", c.changes_applied),
            ("rejected", c.changes_rejected),
            ("clock_ahead", c.changes_clock_ahead),
            ("superseded", c.changes_superseded),
        ]
        .map(|(kind, n)| (vec![("kind", kind)], counter(n))),
    )?;
    family(
        e,
        "cluster_sync_rounds",
        "Anti-entropy rounds this POP started, by result",
        [("ok", c.sync_rounds), ("failed", c.sync_failures)]
            .map(|(result, n)| (vec![("result", result)], counter(n))),
    )?;
    family(
        e,
        "cluster_bytes",
        "Row traffic (pushes and sync rounds, framing included; not QUIC's own overhead)",
        [("in", c.bytes_in), ("out", c.bytes_out)]
            .map(|(dir, n)| (vec![("direction", dir)], counter(n))),
    )?;
    if let (Some(i), Some(o)) = (c.wire_bytes_in, c.wire_bytes_out) {
        family(
            e,
            "cluster_wire_bytes",
            "UDP bytes of all cluster traffic (SWIM, rows, QUIC and TLS overhead)",
            [("in", i), ("out", o)].map(|(dir, n)| (vec![("direction", dir)], counter(n))),
        )?;
    }
    family(
        e,
        "cluster_peers_refused",
        "Connections refused: failed mutual TLS (other CA, other cluster name) or spoke another schema",
        [(vec![], counter(c.peers_refused))],
    )?;
    family(
        e,
        "cluster_stream_errors",
        "Streams from peers that failed, were too large or timed out, and connections refused over a cap (apart from authentication refusals)",
        [(vec![], counter(c.stream_errors))],
    )?;
    family(
        e,
        "cluster_rows",
        "Rows in the replicated table",
        [
            (vec![("kind", "live")], gauge(int(c.rows))),
            (vec![("kind", "tombstone")], gauge(int(c.tombstones))),
        ],
    )?;
    // Absent until the first sync: no number is the honest answer for "never".
    family(
        e,
        "cluster_replication_lag_seconds",
        "Seconds since this POP last completed a sync round with any peer",
        c.last_sync_secs_ago.map(|s| (vec![], ConstGauge::new(s))),
    )
}

/// The connect RTT moving average per backend, for backends connected at least once.
fn enc_rtt(e: &mut DescriptorEncoder, backends: &[BackendStatus]) -> std::fmt::Result {
    family(
        e,
        "backend_connect_rtt_seconds",
        "Connect round-trip time to the backend, moving average",
        backends.iter().filter_map(|b| {
            let rtt = b.rtt_us? as f64 / 1e6;
            Some((vec![("backend", b.id.as_str())], ConstGauge::new(rtt)))
        }),
    )
}
