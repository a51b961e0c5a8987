//! Configuration: a TOML file, `EDGEPROXY_*` environment variables and CLI flags, merged
//! into one validated [`Config`].
//!
//! Precedence, highest first: flags > environment > file > defaults. Each scalar setting is
//! declared once in `settings.rs` (file key, variable, flag, default, check, help); `layer`
//! holds the generic machinery (sources, typing, merge with origins); this module adds
//! what spans several settings: `[[listener]]` and `[regions]` (file only), the policy
//! source, the admin listener's guard. The variables and defaults are edgeProxy's, so a
//! deployment that only sets `EDGEPROXY_*` runs unchanged.

mod layer;
mod settings;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::domain::health::{CheckSpec, EjectionRules, HealthRules, Probe};
use crate::domain::services::RegionMap;
use crate::domain::{CountryCode, Region};

#[doc(hidden)]
pub use layer::pick;
pub use layer::{
    AppCheck, Flags, Info, Layer, LogFormat, Origin, Seconds, SettingValue, markdown_table,
};
pub use settings::{SETTINGS, Settings};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// Every problem found in one resolve, one per line.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
pub struct ConfigErrors(pub Vec<ConfigError>);

/// One `[[listener]]` table of the file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub addr: SocketAddr,
    /// Serve only backends of this app; unset serves every app.
    #[serde(default)]
    pub app: Option<String>,
    /// Expect a PROXY protocol v1/v2 header from peers in `trusted_proxies`.
    #[serde(default)]
    pub proxy_protocol: bool,
    #[serde(default)]
    pub trusted_proxies: Vec<IpNet>,
    /// Lets `trusted_proxies` hold `0.0.0.0/0` or `::/0` (any peer may then claim any
    /// client address); refused otherwise.
    #[serde(default)]
    pub trust_any_peer: bool,
    /// This listener's own per-client limits, where they differ from `[rate_limit]`
    /// (setting any of them limits this listener even with `rate_limit_enabled` off).
    #[serde(default)]
    pub rate_limit_max_requests: Option<u32>,
    #[serde(default)]
    pub rate_limit_burst: Option<u32>,
    #[serde(default)]
    pub rate_limit_max_open: Option<u32>,
    /// Read each connection's TLS ClientHello: `passthrough` relays TLS unchanged,
    /// `terminate` ends it here; either way SNI and ALPN route and reach the policy.
    #[serde(default)]
    pub tls: Option<TlsMode>,
    /// TLS server name (exact, or a `*.` wildcard) to the app serving it, or to
    /// `{ app = "...", tls = "terminate" | "passthrough" }` where its mode differs from the
    /// listener's. Names not listed go to `app`; refused when it is unset.
    #[serde(default)]
    pub server_names: BTreeMap<String, NameEntry>,
    /// Send backends a PROXY protocol header (`v1` or `v2`, the latter with the TLS
    /// server name and ALPN) carrying the client's address.
    #[serde(default)]
    pub send_proxy_protocol: Option<SendVersion>,
    /// The application protocols a terminating listener agrees to (ALPN), in its order of
    /// preference; empty: none asked for (clients that offer some go on without).
    #[serde(default)]
    pub alpn: Vec<String>,
    /// Re-encrypt what this listener terminates: TLS to the backend too, verified against
    /// `backend_ca` (the overlay is WireGuard-encrypted already; this is for backends
    /// that require TLS).
    #[serde(default)]
    pub backend_tls: bool,
    /// CA certificates (PEM) a re-encrypting listener's backends must chain to.
    #[serde(default)]
    pub backend_ca: Option<PathBuf>,
}

/// Which PROXY protocol version a listener sends its backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SendVersion {
    V1,
    V2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    Passthrough,
    Terminate,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum NameEntry {
    App(String),
    Route {
        app: String,
        #[serde(default)]
        tls: Option<TlsMode>,
    },
}

impl ListenerConfig {
    pub fn plain(addr: SocketAddr) -> Self {
        Self {
            addr,
            app: None,
            proxy_protocol: false,
            trusted_proxies: Vec::new(),
            trust_any_peer: false,
            rate_limit_max_requests: None,
            rate_limit_burst: None,
            rate_limit_max_open: None,
            tls: None,
            server_names: BTreeMap::new(),
            send_proxy_protocol: None,
            alpn: Vec::new(),
            backend_tls: false,
            backend_ca: None,
        }
    }

    /// `server_names`, checked and ready to look up; each name's mode is its own or the
    /// listener's.
    pub fn names(
        &self,
    ) -> Result<crate::domain::server_names::ServerNames, crate::domain::server_names::NameError>
    {
        use crate::domain::server_names::{NameRoute, ServerNames};
        let mut names = ServerNames::default();
        for (name, entry) in &self.server_names {
            let (app, mode) = match entry {
                NameEntry::App(app) => (app, self.tls),
                NameEntry::Route { app, tls } => (app, tls.or(self.tls)),
            };
            let route = NameRoute {
                app: app.as_str().into(),
                terminate: mode == Some(TlsMode::Terminate),
            };
            names.insert(name, route)?;
        }
        Ok(names)
    }

    /// Whether any connection of this listener may be terminated here.
    pub fn terminates(&self) -> bool {
        self.tls == Some(TlsMode::Terminate) || self.names().is_ok_and(|n| n.terminates())
    }

    /// The per-client limits of this listener: its overrides over `base` (the POP's),
    /// None where nothing is limited.
    pub fn client_limits(
        &self,
        base: &crate::application::client_limits::ClientLimits,
        enabled: bool,
        window: Duration,
    ) -> Option<crate::application::client_limits::ClientLimits> {
        let own = self.rate_limit_max_requests.is_some()
            || self.rate_limit_burst.is_some()
            || self.rate_limit_max_open.is_some();
        if !enabled && !own {
            return None;
        }
        let mut l = base.clone();
        if let Some(n) = self.rate_limit_max_requests {
            let burst = l.rate.map(|(_, b)| b).unwrap_or(f64::from(n));
            l.rate = (n > 0).then(|| (f64::from(n) / window.as_secs_f64(), burst));
        }
        if let Some(b) = self.rate_limit_burst {
            l.rate = l.rate.map(|(r, _)| (r, f64::from(b.max(1))));
        }
        if let Some(n) = self.rate_limit_max_open {
            l.max_open = (n > 0).then_some(n);
        }
        l.any().then_some(l)
    }

    pub fn trusts(&self, peer: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(&peer))
    }
}

/// The validated settings the host runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Every scalar setting, merged and checked.
    pub settings: Settings,
    /// Where each setting came from, in [`SETTINGS`] order.
    pub origins: Vec<Origin>,
    pub listeners: Vec<ListenerConfig>,
    pub region: Region,
    pub regions: RegionMap,
    /// `[regions]` as the file wrote it.
    pub region_overrides: BTreeMap<String, Vec<String>>,
    pub policy: PolicyConfig,
    /// None: no admin listener.
    pub admin: Option<AdminConfig>,
    /// Checks, ejection and the panic rule.
    pub health: HealthRules,
    /// None: no registration API.
    pub api: Option<ApiConfig>,
    /// None: no DNS server.
    pub dns: Option<DnsConfig>,
    /// None: no metrics served.
    pub metrics: Option<MetricsConfig>,
}

/// The internal DNS server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    pub addr: SocketAddr,
    pub zone: crate::domain::dns::Zone,
    pub ttl: u32,
    pub alternates: usize,
    /// UDP answers per second per client prefix; None: no limit.
    pub rate_limit: Option<u32>,
    /// This POP's addresses under the front name (empty: the cluster's advertised one).
    pub front_addrs: Vec<IpAddr>,
    pub front_answers: usize,
}

/// The registration API (edgeProxy's auto-discovery).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiConfig {
    pub addr: SocketAddr,
    /// The address asked for, when it was not loopback and no token was set.
    pub narrowed_from: Option<SocketAddr>,
    pub token: Option<String>,
    pub heartbeat_ttl: Duration,
    /// Where registered backends may be (this POP's own listeners are added at start).
    pub destinations: crate::domain::registration::Destinations,
    pub max_registrations: usize,
    pub max_per_app: usize,
    /// Silent this long, a registration is removed; None: kept.
    pub remove_after: Option<Duration>,
}

/// The admin HTTP listener (JSON API and `/metrics`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub addr: SocketAddr,
    /// Required as `Authorization: Bearer <token>` on every request when set.
    pub token: Option<String>,
}

/// Prometheus metrics: their path on the admin listener, and a listener of their own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    pub path: String,
    pub listen: Option<SocketAddr>,
    /// `admin_token`, which the metrics listener asks for even with the admin API off.
    pub token: Option<String>,
    /// The address asked for, when it was not loopback and nothing allowed it.
    pub narrowed_from: Option<SocketAddr>,
}

/// Which scoring policy decides, and its bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyConfig {
    pub source: PolicySource,
    /// A component deciding beside the live policy, only for the record.
    pub shadow: Option<PathBuf>,
    /// Percentage of decisions the shadow also makes.
    pub shadow_sample_percent: u32,
    pub timeout: Duration,
    pub memory_bytes: usize,
    /// Largest component a fleet deployment may carry.
    pub max_bytes: u64,
    /// Where compiled components are kept; None: compiled at every load.
    pub cache_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicySource {
    /// The default component compiled into the binary.
    Embedded,
    /// A component file, watched and swapped in live when it changes.
    File(PathBuf),
    /// The host's native scorer; no WebAssembly.
    Native,
}

/// What a command needs of the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Running the proxy: everything must be valid.
    Serve,
    /// The routing-table and policy tools: only the settings they read must be valid, so
    /// a bad listener or admin setting does not block `edgeproxy backend list`.
    Tools,
}

/// The settings the tools read (besides `[regions]`, checked for them too).
const TOOL_KEYS: &[&str] = &[
    "db_path",
    "db_url",
    "db_ca_file",
    "db_password_file",
    "region",
    "default_region",
    "geoip_path",
    "policy_path",
    "native_policy",
    "policy_timeout_ms",
    "policy_memory_mib",
    "policy_max_mib",
    "policy_cache_dir",
    "log_format",
    "debug",
];

impl Config {
    /// Merges the sources by precedence and validates the result for running the proxy.
    pub fn resolve(file: Layer, env: Layer, flags: Layer) -> Result<Self, ConfigErrors> {
        Self::resolve_for(Scope::Serve, file, env, flags)
    }

    pub fn resolve_for(
        scope: Scope,
        file: Layer,
        env: Layer,
        flags: Layer,
    ) -> Result<Self, ConfigErrors> {
        let mut setting_errors = Vec::new();
        let (s, origins) = Settings::merge(&[&flags, &env, &file], &mut setting_errors);
        // The tools are stopped only by the settings they read.
        let mut errors: Vec<ConfigError> = setting_errors
            .into_iter()
            .filter(|(key, _)| scope == Scope::Serve || TOOL_KEYS.contains(key))
            .map(|(_, e)| e)
            .collect();
        let l = flags.over(env).over(file);
        // Listeners and the admin API concern the proxy, not the tools.
        let serving = scope == Scope::Serve;
        let listeners = match l.listener {
            Some(list) if list.is_empty() && serving => {
                errors.push(invalid("listener", "at least one [[listener]] is needed"));
                Vec::new()
            }
            Some(list) => list,
            None => vec![ListenerConfig::plain(s.listen_addr)],
        };
        let mut listeners = listeners;
        if s.tls_enabled {
            listeners.push(ListenerConfig {
                tls: Some(TlsMode::Terminate),
                ..ListenerConfig::plain(s.tls_listen_addr)
            });
        }
        if serving {
            if listeners.iter().any(ListenerConfig::terminates)
                && s.tls_cert.is_none()
                && s.tls_cert_dir.is_none()
            {
                errors.push(invalid(
                    "tls_cert",
                    "a listener terminates TLS: set tls_cert and tls_key, or tls_cert_dir",
                ));
            }
            if s.tls_cert.is_some() != s.tls_key.is_some() {
                errors.push(invalid("tls_key", "tls_cert and tls_key go together"));
            }
            for (i, lc) in listeners.iter().enumerate() {
                if lc.proxy_protocol && lc.trusted_proxies.is_empty() {
                    errors.push(invalid(
                        format!("listener[{i}].trusted_proxies"),
                        "proxy_protocol = true needs at least one trusted CIDR",
                    ));
                }
                if let Some(any) = lc.trusted_proxies.iter().find(|n| n.prefix_len() == 0)
                    && !lc.trust_any_peer
                {
                    errors.push(invalid(
                        format!("listener[{i}].trusted_proxies"),
                        format!("{any} lets any peer claim any client address; list the load balancers' networks, or set trust_any_peer = true"),
                    ));
                }
                if !lc.server_names.is_empty() && lc.tls.is_none() {
                    errors.push(invalid(
                        format!("listener[{i}].server_names"),
                        "routing by server name needs tls = \"passthrough\" or \"terminate\" on the listener",
                    ));
                }
                if let Err(e) = lc.names() {
                    errors.push(invalid(
                        format!("listener[{i}].server_names"),
                        e.to_string(),
                    ));
                }
                if let Some((name, _)) = lc.server_names.iter().find(|(_, e)| {
                    matches!(e, NameEntry::App(a) | NameEntry::Route { app: a, .. } if a.trim().is_empty())
                }) {
                    errors.push(invalid(
                        format!("listener[{i}].server_names"),
                        format!("{name:?} names an empty app"),
                    ));
                }
                if lc.backend_tls && !lc.terminates() {
                    errors.push(invalid(
                        format!("listener[{i}].backend_tls"),
                        "re-encrypts what the listener terminates: it needs tls = \"terminate\" (or a terminated name)",
                    ));
                }
                if lc.backend_tls && lc.backend_ca.is_none() {
                    errors.push(invalid(
                        format!("listener[{i}].backend_ca"),
                        "backend_tls needs the CA certificates (PEM) the backends' certificates chain to",
                    ));
                }
                if listeners[..i].iter().any(|o| o.addr == lc.addr) {
                    errors.push(invalid(
                        format!("listener[{i}].addr"),
                        format!("{} is listed twice", lc.addr),
                    ));
                }
            }
        }
        let region_overrides = l.regions.unwrap_or_default();
        let mut overrides = Vec::new();
        for (name, countries) in &region_overrides {
            if name.trim().is_empty() {
                errors.push(invalid("regions", "a region name must not be empty"));
                continue;
            }
            match countries.iter().map(|c| c.parse::<CountryCode>()).collect() {
                Ok(codes) => overrides.push((Region::new(name), codes)),
                Err(e) => errors.push(invalid(format!("regions.{name}"), e.to_string())),
            }
        }
        let regions = RegionMap::with_overrides(
            overrides
                .iter()
                .map(|(r, c): &(Region, Vec<CountryCode>)| (r, &c[..])),
            Some(Region::new(&s.default_region)),
        );
        let policy = PolicyConfig {
            source: match (s.native_policy, &s.policy_path) {
                (true, Some(_)) => {
                    errors.push(invalid(
                        "native_policy",
                        "cannot be combined with policy_path",
                    ));
                    PolicySource::Native
                }
                (true, None) => PolicySource::Native,
                (false, Some(p)) => PolicySource::File(p.clone()),
                (false, None) => PolicySource::Embedded,
            },
            shadow: s.shadow_policy_path.clone(),
            shadow_sample_percent: s.shadow_sample_percent,
            timeout: Duration::from_millis(s.policy_timeout_ms),
            // Checked: at most 4096 MiB.
            memory_bytes: (s.policy_memory_mib as usize) << 20,
            max_bytes: s.policy_max_mib << 20,
            cache_dir: s.policy_cache_dir.clone(),
        };
        let admin = match admin_config(&s) {
            Ok(a) => a,
            Err(e) => {
                if serving {
                    errors.push(e);
                }
                None
            }
        };
        if serving && s.cluster_enabled && s.db_url.is_some() {
            errors.push(invalid(
                "db_url",
                "cannot be combined with cluster_enabled: replication shares the SQLite file \
                 between POPs, and a PostgreSQL table is shared by the database's own \
                 replication (docs/OPERATING.md says when to choose which)",
            ));
        }
        if s.db_url.is_none() && (s.db_ca_file.is_some() || s.db_password_file.is_some()) {
            errors.push(invalid(
                if s.db_ca_file.is_some() {
                    "db_ca_file"
                } else {
                    "db_password_file"
                },
                "is for PostgreSQL and db_url is unset",
            ));
        }
        if serving && s.cluster_enabled && !s.cluster_plaintext {
            let missing: Vec<&str> = [
                ("cluster_ca_file", s.cluster_ca_file.is_none()),
                ("cluster_cert_file", s.cluster_cert_file.is_none()),
                ("cluster_key_file", s.cluster_key_file.is_none()),
            ]
            .into_iter()
            .filter_map(|(k, missing)| missing.then_some(k))
            .collect();
            if !missing.is_empty() {
                errors.push(invalid(
                    "cluster_enabled",
                    format!(
                        "replication needs the cluster's credentials, and {} unset: make them with \
                         `edgeproxy cluster ca` and `edgeproxy cluster cert NODE` (docs/CLUSTER.md); \
                         POPs authenticate each other with them, so no process without them can \
                         read or write the routing table (or, on a WireGuard-only network, choose \
                         cluster_plaintext = true)",
                        missing.join(", ")
                    ),
                ));
            }
        }
        if let Err(e) = crate::domain::registration::parse_networks(&s.rate_limit_exempt) {
            errors.push(invalid("rate_limit_exempt", e));
        }
        let health = health_rules(&s, l.app_checks.unwrap_or_default(), &mut errors);
        let api = s.api_enabled.then(|| {
            let token = s.api_token.clone().filter(|t| !t.is_empty());
            let wanted = s.api_listen_addr;
            // Anyone who reaches the API can put backends in rotation: without a token it
            // stays on loopback, whatever address was asked for.
            let addr = match (&token, wanted.ip().is_loopback()) {
                (None, false) => SocketAddr::new(
                    match wanted {
                        SocketAddr::V4(_) => IpAddr::from([127, 0, 0, 1]),
                        SocketAddr::V6(_) => IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
                    },
                    wanted.port(),
                ),
                _ => wanted,
            };
            use crate::domain::registration::{Destinations, parse_networks, parse_ports};
            let networks = parse_networks(&s.api_allowed_networks)
                .map_err(|e| errors.push(invalid("api_allowed_networks", e)))
                .unwrap_or_default();
            let ports = parse_ports(&s.api_allowed_ports)
                .map_err(|e| errors.push(invalid("api_allowed_ports", e)))
                .unwrap_or_default();
            let destinations = Destinations {
                networks,
                ports,
                own: Vec::new(),
            };
            let ttl = Duration::from_secs(s.api_heartbeat_ttl_secs);
            ApiConfig {
                addr,
                narrowed_from: (addr != wanted).then_some(wanted),
                token,
                heartbeat_ttl: ttl,
                destinations,
                max_registrations: s.api_max_registrations,
                max_per_app: s.api_max_per_app,
                remove_after: (s.api_remove_after_ttls > 0).then(|| ttl * s.api_remove_after_ttls),
            }
        });
        let dns = s.dns_enabled.then(|| {
            let zone = crate::domain::dns::Zone::new(&s.dns_domain, s.dns_front_name.as_deref())
                .map_err(|e| errors.push(invalid("dns_domain", e)))
                .ok()?;
            let mut front_addrs = Vec::new();
            for a in s.dns_front_addrs.split(',').map(str::trim).filter(|a| !a.is_empty()) {
                match a.parse::<IpAddr>() {
                    Ok(ip) if !ip.is_unspecified() => front_addrs.push(ip),
                    _ => errors.push(invalid(
                        "dns_front_addrs",
                        format!("{a:?} is not an IP address (comma-separated, like 203.0.113.10, 2001:db8::10)"),
                    )),
                }
            }
            let most = crate::domain::rollout::FRONT_ADDRS;
            if front_addrs.len() > most {
                errors.push(invalid(
                    "dns_front_addrs",
                    format!("{} addresses; a POP may give at most {most}", front_addrs.len()),
                ));
            }
            Some(DnsConfig {
                addr: s.dns_listen_addr,
                zone,
                ttl: s.dns_ttl_secs,
                alternates: s.dns_alternates as usize,
                rate_limit: Some(s.dns_rate_limit).filter(|r| *r > 0),
                front_addrs,
                front_answers: s.dns_front_answers as usize,
            })
        }).flatten();
        let metrics = s.metrics_enabled.then(|| {
            let wanted = s.metrics_listen_addr;
            let token = s.admin_token.clone().filter(|t| !t.is_empty());
            let trusted = token.is_some() || s.admin_allow_remote;
            // As the registration API: off loopback only with a token or the operator's say.
            let listen = wanted.map(|w| match (trusted, w.ip().is_loopback()) {
                (false, false) => SocketAddr::new(
                    match w {
                        SocketAddr::V4(_) => IpAddr::from([127, 0, 0, 1]),
                        SocketAddr::V6(_) => IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
                    },
                    w.port(),
                ),
                _ => w,
            });
            MetricsConfig {
                path: s.metrics_path.clone(),
                listen,
                token,
                narrowed_from: wanted.filter(|w| Some(*w) != listen),
            }
        });
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        Ok(Self {
            health,
            api,
            dns,
            metrics,
            region: Region::new(&s.region),
            settings: s,
            origins,
            listeners,
            regions,
            region_overrides,
            policy,
            admin,
        }
        .with_own_addresses())
    }

    /// Registered backends must never be this POP's own listeners.
    fn with_own_addresses(mut self) -> Self {
        let s = &self.settings;
        let mut own: Vec<SocketAddr> = self.listeners.iter().map(|l| l.addr).collect();
        own.extend(self.admin.as_ref().map(|a| a.addr));
        own.extend(self.metrics.as_ref().and_then(|m| m.listen));
        own.extend(self.dns.as_ref().map(|d| d.addr));
        if s.cluster_enabled {
            own.extend([s.cluster_gossip_addr, s.cluster_transport_addr]);
        }
        if let Some(api) = &mut self.api {
            own.push(api.addr);
            api.destinations.own = own;
        }
        self
    }

    /// The POP's per-client limits (`[rate_limit]`), as each listener starts from.
    pub fn client_limits(&self) -> crate::application::client_limits::ClientLimits {
        let s = &self.settings;
        let per_sec = f64::from(s.rate_limit_max_requests) / s.rate_limit_window_secs as f64;
        let burst = match s.rate_limit_burst {
            0 => s.rate_limit_max_requests,
            b => b,
        };
        crate::application::client_limits::ClientLimits {
            rate: Some((per_sec, f64::from(burst))),
            max_open: (s.rate_limit_max_open > 0).then_some(s.rate_limit_max_open),
            v4_prefix: s.rate_limit_ipv4_prefix as u8,
            v6_prefix: s.rate_limit_ipv6_prefix as u8,
            exempt: crate::domain::registration::parse_networks(&s.rate_limit_exempt)
                .unwrap_or_default(),
            max_tracked: s.rate_limit_max_tracked,
        }
    }

    /// None: bindings off, every connection is a fresh decision.
    pub fn binding_ttl(&self) -> Option<Duration> {
        Some(self.settings.binding_ttl_secs)
            .filter(|s| *s > 0)
            .map(Duration::from_secs)
    }

    pub fn idle_timeout(&self) -> Option<Duration> {
        Some(self.settings.idle_timeout_secs)
            .filter(|s| *s > 0)
            .map(Duration::from_secs)
    }

    /// Each setting with its value (secrets masked) and origin, in declaration order.
    pub fn show(&self) -> Vec<(&'static Info, serde_json::Value, Origin)> {
        SETTINGS
            .iter()
            .zip(self.settings.values())
            .zip(&self.origins)
            .map(|((info, value), origin)| {
                let value = match (info.secret, &value) {
                    (true, v) if !v.is_null() => serde_json::json!("********"),
                    _ => value,
                };
                (info, value, *origin)
            })
            .collect()
    }
}

/// The check of `[health_check]`, and of each `[health_check.app.NAME]` over it.
fn health_rules(
    s: &Settings,
    apps: BTreeMap<String, AppCheck>,
    errors: &mut Vec<ConfigError>,
) -> HealthRules {
    let base = AppCheck {
        enabled: Some(s.health_check_enabled),
        interval_secs: Some(s.health_check_interval_secs),
        timeout_secs: Some(s.health_check_timeout_secs),
        kind: Some(s.health_check_type.clone()),
        path: Some(s.health_check_path.clone()),
        send: Some(s.health_check_send.clone()),
        expect: Some(s.health_check_expect.clone()),
        rise: Some(s.health_check_rise),
        fall: Some(s.health_check_fall),
    };
    fn pick<T: Clone + Default>(o: &Option<T>, d: &Option<T>) -> T {
        o.clone().or_else(|| d.clone()).unwrap_or_default()
    }
    let spec = |key: &str, c: &AppCheck, errors: &mut Vec<ConfigError>| {
        let (kind, path): (String, String) = (pick(&c.kind, &base.kind), pick(&c.path, &base.path));
        let (send, expect): (String, String) =
            (pick(&c.send, &base.send), pick(&c.expect, &base.expect));
        let probe = match kind.as_str() {
            "http" if path.starts_with('/') => Probe::Http { path },
            "http" => {
                errors.push(invalid(format!("{key}.path"), "must start with /"));
                Probe::Connect
            }
            "tcp" if send.is_empty() && expect.is_empty() => Probe::Connect,
            "tcp" => Probe::Expect {
                send: send.into_bytes().into(),
                expect: expect.into_bytes().into(),
            },
            other => {
                errors.push(invalid(
                    format!("{key}.type"),
                    format!("{other:?}: must be tcp or http"),
                ));
                Probe::Connect
            }
        };
        let (rise, fall): (u32, u32) = (pick(&c.rise, &base.rise), pick(&c.fall, &base.fall));
        for (name, v) in [("rise", rise), ("fall", fall)] {
            if !(1..=100).contains(&v) {
                errors.push(invalid(
                    format!("{key}.{name}"),
                    "must be between 1 and 100",
                ));
            }
        }
        let interval: Seconds = pick(&c.interval_secs, &base.interval_secs);
        let timeout: Seconds = pick(&c.timeout_secs, &base.timeout_secs);
        if interval.0 < Duration::from_millis(50) || timeout.0 < Duration::from_millis(10) {
            errors.push(invalid(
                key,
                "interval_secs must be at least 0.05 and timeout_secs at least 0.01",
            ));
        }
        CheckSpec {
            enabled: pick(&c.enabled, &base.enabled),
            interval: interval.0,
            timeout: timeout.0,
            jitter_percent: s.health_check_jitter_percent,
            probe,
            rise,
            fall,
        }
    };
    let check = spec("health_check", &base, errors);
    let app_checks = apps
        .iter()
        .map(|(app, c)| {
            (
                app.clone(),
                spec(&format!("health_check.app.{app}"), c, errors),
            )
        })
        .collect();
    HealthRules {
        check,
        app_checks,
        ejection: EjectionRules {
            enabled: s.ejection_enabled,
            after: s.ejection_consecutive_failures,
            base: s.ejection_base_secs.0,
            max: s.ejection_max_secs.0,
            max_percent: s.ejection_max_percent,
        },
        panic_percent: s.health_check_panic_percent,
    }
}

fn admin_config(s: &Settings) -> Result<Option<AdminConfig>, ConfigError> {
    let Some(addr) = s.admin_addr else {
        return Ok(None);
    };
    let token = s.admin_token.clone().filter(|t| !t.is_empty());
    // The admin API can drop bindings and trigger reloads: off loopback it needs a token
    // unless the operator says the network is trusted.
    if !addr.ip().is_loopback() && token.is_none() && !s.admin_allow_remote {
        return Err(invalid(
            "admin_addr",
            format!(
                "{addr} is not a loopback address; set admin_token, or admin_allow_remote = true to serve it without one"
            ),
        ));
    }
    Ok(Some(AdminConfig { addr, token }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Layer {
        let vars = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Layer::from_env(vars).0
    }

    fn resolve(file: &str, e: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
        Config::resolve(Layer::from_toml(file).unwrap(), env(e), Layer::default())
    }

    #[test]
    fn defaults_are_edgeproxys_and_pass_their_checks() {
        assert_eq!(Settings::check_defaults(), Vec::<String>::new());
        let c = resolve("", &[]).unwrap();
        assert_eq!(
            c.listeners,
            vec![ListenerConfig::plain("0.0.0.0:8080".parse().unwrap())]
        );
        assert_eq!(c.settings.db_path, PathBuf::from("routing.db"));
        assert_eq!(c.region.as_str(), "sa");
        assert_eq!(c.settings.db_reload_secs, 5);
        assert_eq!(c.binding_ttl(), Some(Duration::from_secs(600)));
        assert_eq!(c.settings.binding_gc_interval_secs, 60);
        assert_eq!(c.settings.connect_timeout_ms, 3000);
        assert_eq!(c.settings.geoip_path, None);
        assert!(!c.settings.debug);
        assert_eq!(c.policy.source, PolicySource::Embedded);
        assert_eq!(c.policy.timeout, Duration::from_millis(1));
        assert_eq!(c.policy.memory_bytes, 32 << 20);
        // What a production proxy ships with: no connection lives forever by default.
        assert_eq!(c.idle_timeout(), Some(Duration::from_secs(600)));
        assert_eq!(c.settings.tcp_keepalive_secs, 60);
        assert_eq!(c.settings.max_connections, 50_000);
        assert!(c.origins.iter().all(|o| *o == Origin::Default));
    }

    /// The registration API refuses every address this POP serves on, the metrics-only
    /// and DNS listeners included.
    #[test]
    fn the_apis_own_addresses_are_every_listener() {
        let c = resolve(
            "metrics_listen_addr = \"127.0.0.1:9091\"\n[api]\nenabled = true\nlisten_addr = \"127.0.0.1:8081\"\n[dns]\nenabled = true\nlisten_addr = \"127.0.0.1:5354\"",
            &[],
        )
        .unwrap();
        let own = &c.api.as_ref().unwrap().destinations.own;
        for addr in ["127.0.0.1:8081", "127.0.0.1:9091", "127.0.0.1:5354"] {
            assert!(
                own.contains(&addr.parse().unwrap()),
                "{addr} not in {own:?}"
            );
        }
        assert!(own.contains(&c.listeners[0].addr));
    }

    #[test]
    fn flags_beat_env_beat_file_beat_defaults() {
        let file = Layer::from_toml(
            "region = \"eu\"\ndb_path = \"file.db\"\nbinding_ttl_secs = 10\ndb_reload_secs = 7",
        )
        .unwrap();
        let env = env(&[
            ("EDGEPROXY_REGION", "us"),
            ("EDGEPROXY_DB_PATH", "env.db"),
            ("DEBUG", "1"),
        ]);
        let flags = {
            use clap::{Args, Command, FromArgMatches};
            let cmd = Flags::augment_args(Command::new("t"));
            let m = cmd.get_matches_from(["t", "--region", "ap"]);
            Flags::from_arg_matches(&m).unwrap().0
        };
        let c = Config::resolve(file, env, flags).unwrap();
        assert_eq!(c.region.as_str(), "ap"); // flag
        assert_eq!(c.settings.db_path, PathBuf::from("env.db")); // env over file
        assert_eq!(c.binding_ttl(), Some(Duration::from_secs(10))); // file over default
        assert_eq!(c.settings.db_reload_secs, 7);
        assert_eq!(c.settings.binding_gc_interval_secs, 60); // default
        assert!(c.settings.debug);
        let origin = |key: &str| {
            let i = SETTINGS.iter().position(|i| i.key == key).unwrap();
            c.origins[i]
        };
        assert_eq!(origin("region"), Origin::Flag);
        assert_eq!(origin("db_path"), Origin::Env);
        assert_eq!(origin("db_reload_secs"), Origin::File);
        assert_eq!(origin("connect_attempts"), Origin::Default);
    }

    #[test]
    fn unknown_file_keys_are_named_with_the_nearest_known_one() {
        let err = Layer::from_toml("regoin = \"eu\"").unwrap_err();
        assert!(
            err.contains("\"regoin\" (did you mean \"region\"?)"),
            "{err}"
        );
        let err = Layer::from_toml("[[listener]]\naddr = \"127.0.0.1:1\"\nap = \"x\"").unwrap_err();
        assert!(err.contains("ap"), "{err}");
    }

    #[test]
    fn bad_env_values_name_the_variable() {
        let err = resolve("", &[("EDGEPROXY_DB_RELOAD_SECS", "soon")]).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("EDGEPROXY_DB_RELOAD_SECS: bad value \"soon\""),
            "{err}"
        );
        let err = resolve("", &[("EDGEPROXY_LISTEN_ADDR", "nowhere")]).unwrap_err();
        assert!(err.to_string().contains("EDGEPROXY_LISTEN_ADDR"), "{err}");
        let on = resolve("", &[("EDGEPROXY_NATIVE_POLICY", "1")]).unwrap();
        assert!(on.settings.native_policy);
        let err = resolve("", &[("EDGEPROXY_NATIVE_POLICY", "maybe")]).unwrap_err();
        assert!(err.to_string().contains("EDGEPROXY_NATIVE_POLICY"), "{err}");
        // edgeProxy's DEBUG: any value but 0/false turns it on; empty is unset.
        for (v, on) in [
            ("yes please", true),
            ("0", false),
            ("false", false),
            ("", false),
        ] {
            assert_eq!(
                resolve("", &[("DEBUG", v)]).unwrap().settings.debug,
                on,
                "{v:?}"
            );
        }
    }

    #[test]
    fn every_bad_key_is_named_at_once() {
        let err = resolve(
            "db_reload_secs = 0\nconnect_attempts = -1\nregion = \" \"",
            &[("EDGEPROXY_WORKER_THREADS", "many")],
        )
        .unwrap_err();
        let lines: Vec<String> = err.0.iter().map(ToString::to_string).collect();
        assert_eq!(lines.len(), 4, "{lines:#?}");
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("db_reload_secs: must be greater than 0")),
            "{lines:#?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("connect_attempts: bad value -1")),
            "{lines:#?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("region: must not be empty")),
            "{lines:#?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("EDGEPROXY_WORKER_THREADS")),
            "{lines:#?}"
        );
    }

    #[test]
    fn invalid_values_name_the_key() {
        let err = resolve("db_reload_secs = 0", &[]).unwrap_err();
        assert!(err.to_string().starts_with("db_reload_secs"), "{err}");
        let err = resolve(
            "[[listener]]\naddr = \"127.0.0.1:1\"\nproxy_protocol = true",
            &[],
        )
        .unwrap_err();
        assert!(err.to_string().contains("trusted_proxies"), "{err}");
        let any = "[[listener]]\naddr = \"127.0.0.1:1\"\nproxy_protocol = true\ntrusted_proxies = [\"10.0.0.0/8\", \"::/0\"]";
        let err = resolve(any, &[]).unwrap_err();
        assert!(err.to_string().contains("::/0 lets any peer"), "{err}");
        assert!(resolve(&format!("{any}\ntrust_any_peer = true"), &[]).is_ok());
        let err = resolve("[regions]\naf = [\"ZAF\"]", &[]).unwrap_err();
        assert!(err.to_string().contains("regions.af"), "{err}");
        let err = resolve("policy_memory_mib = 5000", &[]).unwrap_err();
        assert!(err.to_string().contains("at most 4096"), "{err}");
        // Durations near u64::MAX would overflow `Instant + Duration` on the hot path.
        for key in [
            "idle_timeout_secs",
            "binding_ttl_secs",
            "drain_timeout_secs",
            "db_reload_secs",
        ] {
            let err = resolve(&format!("{key} = {}", i64::MAX), &[]).unwrap_err();
            assert!(
                err.to_string()
                    .starts_with(&format!("{key}: must be at most")),
                "{err}"
            );
        }
    }

    #[test]
    fn unknown_and_unsupported_variables_are_reported() {
        let vars = [
            ("EDGEPROXY_BINDING_TTL", "60"),
            ("EDGEPROXY_MDNS_ENABLED", "true"),
            ("EDGEPROXY_CORROSION_ENABLED", "true"),
            ("EDGEPROXY_REGION", "eu"),
            ("HOME", "/root"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let (layer, warnings) = Layer::from_env(vars);
        assert_eq!(warnings.len(), 3, "{warnings:#?}");
        assert!(
            warnings[0].contains("did you mean EDGEPROXY_BINDING_TTL_SECS"),
            "{warnings:#?}"
        );
        assert!(
            warnings[1].starts_with("EDGEPROXY_CORROSION_ENABLED is ignored"),
            "{warnings:#?}"
        );
        assert!(
            warnings[2].starts_with("EDGEPROXY_MDNS_ENABLED is ignored"),
            "{warnings:#?}"
        );
        let c = Config::resolve(Layer::default(), layer, Layer::default()).unwrap();
        assert_eq!(c.region.as_str(), "eu");
    }

    #[test]
    fn edgeproxys_tls_variables_add_a_terminating_listener() {
        let c = resolve(
            "",
            &[
                ("EDGEPROXY_TLS_ENABLED", "true"),
                ("EDGEPROXY_TLS_CERT", "/etc/edge/cert.pem"),
                ("EDGEPROXY_TLS_KEY", "/etc/edge/key.pem"),
            ],
        )
        .unwrap();
        let tls = &c.listeners[1];
        assert_eq!(tls.addr, "0.0.0.0:8443".parse().unwrap());
        assert_eq!(
            (tls.tls, tls.app.as_deref()),
            (Some(TlsMode::Terminate), None)
        );
        let err = resolve("", &[("EDGEPROXY_TLS_ENABLED", "true")]).unwrap_err();
        assert!(
            err.to_string()
                .contains("tls_cert: a listener terminates TLS"),
            "{err}"
        );
        let names = "[[listener]]\naddr = \"127.0.0.1:1\"\n[listener.server_names]\n\"a.example.com\" = \"a\"";
        let err = resolve(names, &[]).unwrap_err();
        assert!(
            err.to_string().contains("routing by server name needs tls"),
            "{err}"
        );
        let bad = "[[listener]]\naddr = \"127.0.0.1:1\"\ntls = \"passthrough\"\n[listener.server_names]\n\"a.*.com\" = \"a\"";
        let err = resolve(bad, &[]).unwrap_err();
        assert!(
            err.to_string()
                .contains("listener[0].server_names: server name \"a.*.com\""),
            "{err}"
        );
    }

    #[test]
    fn tools_are_not_stopped_by_settings_they_do_not_read() {
        let bad_admin = || {
            env(&[
                ("EDGEPROXY_ADMIN_ADDR", "0.0.0.0:9090"),
                ("EDGEPROXY_IDLE_TIMEOUT_SECS", "x"),
            ])
        };
        assert!(Config::resolve(Layer::default(), bad_admin(), Layer::default()).is_err());
        let c = Config::resolve_for(
            Scope::Tools,
            Layer::default(),
            bad_admin(),
            Layer::default(),
        )
        .unwrap();
        assert_eq!(c.settings.db_path, PathBuf::from("routing.db"));
        let bad_db = env(&[("EDGEPROXY_POLICY_MEMORY_MIB", "0")]);
        assert!(
            Config::resolve_for(Scope::Tools, Layer::default(), bad_db, Layer::default()).is_err()
        );
        // `policy simulate` places clients with the region map.
        let bad_regions = Layer::from_toml("[regions]\naf = [\"ZAF\"]").unwrap();
        assert!(
            Config::resolve_for(
                Scope::Tools,
                bad_regions,
                Layer::default(),
                Layer::default()
            )
            .is_err()
        );
    }

    #[test]
    fn admin_listener_defaults_to_loopback_and_guards_remote_binds() {
        let c = resolve("", &[]).unwrap();
        assert_eq!(
            c.admin,
            Some(AdminConfig {
                addr: "127.0.0.1:9090".parse().unwrap(),
                token: None
            })
        );
        // Set but empty in the environment turns it off, over the file.
        let c = resolve(
            "admin_addr = \"127.0.0.1:9999\"",
            &[("EDGEPROXY_ADMIN_ADDR", "")],
        );
        assert_eq!(c.unwrap().admin, None);
        let err = resolve("admin_addr = \"0.0.0.0:9090\"", &[]).unwrap_err();
        assert!(
            err.to_string().starts_with("admin_addr") && err.to_string().contains("admin_token"),
            "{err}"
        );
        let c = resolve(
            "admin_addr = \"0.0.0.0:9090\"",
            &[("EDGEPROXY_ADMIN_TOKEN", "s3cret")],
        )
        .unwrap();
        assert_eq!(c.admin.as_ref().unwrap().token.as_deref(), Some("s3cret"));
        let token = c
            .show()
            .into_iter()
            .find(|(i, ..)| i.key == "admin_token")
            .unwrap();
        assert_eq!(token.1, serde_json::json!("********"));
        assert_eq!(token.2, Origin::Env);
        let c = resolve(
            "admin_addr = \"0.0.0.0:9090\"\nadmin_allow_remote = true",
            &[],
        );
        assert_eq!(c.unwrap().admin.unwrap().token, None);
        let err = resolve("admin_addr = \"localhost\"", &[]).unwrap_err();
        assert!(err.to_string().contains("bad value"), "{err}");
    }

    #[test]
    fn listeners_and_regions_from_file() {
        let c = resolve(
            r#"
            default_region = "eu"
            [regions]
            af = ["ZA", "NG"]
            [[listener]]
            addr = "127.0.0.1:9000"
            app = "web"
            [[listener]]
            addr = "127.0.0.1:9001"
            proxy_protocol = true
            trusted_proxies = ["10.0.0.0/8"]
            "#,
            &[],
        )
        .unwrap();
        assert_eq!(c.listeners.len(), 2);
        assert_eq!(c.listeners[0].app.as_deref(), Some("web"));
        assert!(c.listeners[1].trusts("10.1.2.3".parse().unwrap()));
        assert!(!c.listeners[1].trusts("127.0.0.1".parse().unwrap()));
        assert_eq!(c.regions.region_of("ZA".parse().unwrap()).as_str(), "af");
        assert_eq!(c.regions.region_of("KE".parse().unwrap()).as_str(), "eu");
    }

    #[test]
    fn cluster_settings_come_from_a_cluster_table_or_edgeproxys_variables() {
        let c = resolve(
            "[cluster]\nenabled = true\nname = \"fleet\"\nca_file = \"ca.pem\"\ncert_file = \"a.pem\"\nkey_file = \"a.key\"",
            &[("EDGEPROXY_REPLICATION_GOSSIP_ADDR", "10.0.0.1:4001")],
        )
        .unwrap();
        assert!(c.settings.cluster_enabled);
        assert_eq!(c.settings.cluster_name, "fleet");
        assert_eq!(
            c.settings.cluster_gossip_addr,
            "10.0.0.1:4001".parse().unwrap()
        );
        let err = Layer::from_toml("[cluster]\nenabld = true").unwrap_err();
        assert!(err.contains("\"enabld\" in [cluster]"), "{err}");
        // Replication without credentials is refused, naming what is missing and how to
        // make it.
        let err = resolve("", &[("EDGEPROXY_REPLICATION_ENABLED", "true")]).unwrap_err();
        let err = err.to_string();
        assert!(
            err.contains("cluster_ca_file") && err.contains("edgeproxy cluster ca"),
            "{err}"
        );
    }

    #[test]
    fn checks_take_app_overrides_and_edgeproxys_variables() {
        let c = resolve(
            "[health_check]\nenabled = true\ninterval_secs = 0.5\n\
             [health_check.app.api]\ntype = \"http\"\npath = \"/healthz\"\n\
             [health_check.app.redis]\nsend = \"PING\\r\\n\"\nexpect = \"+PONG\"\nrise = 1\n",
            &[
                ("EDGEPROXY_HEALTH_UNHEALTHY_THRESHOLD", "4"),
                ("EDGEPROXY_HEALTH_CHECK_TIMEOUT_SECS", "250ms"),
            ],
        )
        .unwrap();
        let h = &c.health;
        assert_eq!(h.check.interval, Duration::from_millis(500));
        assert_eq!(h.check.timeout, Duration::from_millis(250));
        assert_eq!((h.check.rise, h.check.fall), (2, 4));
        assert_eq!(
            h.check_for("api").probe,
            Probe::Http {
                path: "/healthz".into()
            }
        );
        let redis = h.check_for("redis");
        assert_eq!(
            redis.probe,
            Probe::Expect {
                send: b"PING\r\n"[..].into(),
                expect: b"+PONG"[..].into()
            }
        );
        assert_eq!(
            (redis.rise, redis.fall, redis.interval),
            (1, 4, Duration::from_millis(500))
        );
        assert_eq!(h.check_for("other").probe, Probe::Connect);

        let err = resolve("[health_check.app.x]\ntype = \"udp\"\nrise = 0\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("health_check.app.x.type") && err.contains("health_check.app.x.rise"),
            "{err}"
        );
        let err = Layer::from_toml("[health_check.app.x]\nexpekt = \"a\"").unwrap_err();
        assert!(err.contains("expekt"), "{err}");
        let err = resolve("", &[("EDGEPROXY_HEALTH_CHECK_INTERVAL_SECS", "soon")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("EDGEPROXY_HEALTH_CHECK_INTERVAL_SECS"),
            "{err}"
        );
    }

    #[test]
    fn the_registration_api_without_a_token_stays_on_loopback() {
        let c = resolve("", &[("EDGEPROXY_API_ENABLED", "true")]).unwrap();
        let api = c.api.unwrap();
        assert_eq!(api.addr, "127.0.0.1:8081".parse().unwrap());
        assert_eq!(api.narrowed_from, Some("0.0.0.0:8081".parse().unwrap()));
        let c = resolve(
            "",
            &[
                ("EDGEPROXY_API_ENABLED", "true"),
                ("EDGEPROXY_API_TOKEN", "t"),
                ("EDGEPROXY_HEARTBEAT_TTL_SECS", "30"),
            ],
        )
        .unwrap();
        let dns = resolve(
            "",
            &[
                ("EDGEPROXY_DNS_ENABLED", "true"),
                ("EDGEPROXY_DNS_DOMAIN", "Mesh.Internal."),
                ("EDGEPROXY_DNS_LISTEN_ADDR", "127.0.0.1:53"),
                ("EDGEPROXY_DNS_FRONT_NAME", "edge.example.com"),
                ("EDGEPROXY_DNS_FRONT_ADDRS", "203.0.113.10, 2001:db8::10"),
            ],
        )
        .unwrap()
        .dns
        .unwrap();
        // edgeProxy's metrics server and shutdown timeout, under their names.
        let edge = resolve(
            "",
            &[
                ("EDGEPROXY_METRICS_LISTEN_ADDR", "0.0.0.0:9091"),
                ("EDGEPROXY_METRICS_PATH", "/prom"),
                ("EDGEPROXY_SHUTDOWN_TIMEOUT_SECS", "7"),
            ],
        )
        .unwrap();
        let m = edge.metrics.unwrap();
        assert_eq!(m.path, "/prom");
        assert_eq!(
            m.listen,
            Some("127.0.0.1:9091".parse().unwrap()),
            "no token: loopback"
        );
        assert_eq!(m.narrowed_from, Some("0.0.0.0:9091".parse().unwrap()));
        assert_eq!(edge.settings.drain_timeout_secs, 7);
        let (_, warned) = Layer::from_env(
            [
                ("EDGEPROXY_SHUTDOWN_TIMEOUT_SECS", "7"),
                ("EDGEPROXY_DRAIN_TIMEOUT_SECS", "9"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned())),
        );
        assert_eq!(
            warned,
            ["EDGEPROXY_SHUTDOWN_TIMEOUT_SECS is ignored: EDGEPROXY_DRAIN_TIMEOUT_SECS is set too"]
        );
        assert!(
            resolve("", &[("EDGEPROXY_METRICS_ENABLED", "false")])
                .unwrap()
                .metrics
                .is_none()
        );
        let bad = resolve("[metrics]\npath = \"prom\"", &[])
            .unwrap_err()
            .to_string();
        assert!(
            bad.contains("metrics_path: must be a path starting with /"),
            "{bad}"
        );
        assert_eq!(dns.zone.apex(), "mesh.internal");
        assert_eq!(dns.zone.front(), Some("edge.example.com"));
        assert_eq!(dns.front_addrs.len(), 2);
        assert_eq!(
            (dns.ttl, dns.alternates, dns.rate_limit),
            (10, 1, Some(200))
        );
        let bad = resolve(
            "[dns]\nenabled = true\ndomain = \"a..b\"\nfront_addrs = \"edge\"",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            bad.contains("dns_domain") && bad.contains("dns_front_addrs: \"edge\" is not an IP"),
            "{bad}"
        );
        let api = c.api.unwrap();
        assert_eq!(
            (api.addr, api.narrowed_from),
            ("0.0.0.0:8081".parse().unwrap(), None)
        );
        assert_eq!(api.heartbeat_ttl, Duration::from_secs(30));
        assert!(resolve("", &[]).unwrap().api.is_none());
    }

    #[test]
    fn the_readme_table_is_the_declarations() {
        let readme =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
        let table = markdown_table();
        assert!(
            readme.contains(&table),
            "README.md's configuration table differs from config/settings.rs; replace it with:\n\n{table}"
        );
    }
}
