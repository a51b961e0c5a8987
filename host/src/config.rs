//! Configuration: a TOML file, `EDGEPROXY_*` environment variables and CLI flags, merged
//! into one validated [`Config`].
//!
//! Precedence, highest first: flags > environment > file > defaults. Every scalar key has
//! the same name in all three (snake_case in the file, `EDGEPROXY_` + upper case in the
//! environment, `--kebab-case` as a flag); `[[listener]]` and `[regions]` exist only in the
//! file. The environment variables and defaults are edgeProxy's, so a deployment that only
//! sets `EDGEPROXY_*` runs unchanged:
//!
//! | key | env | default |
//! |---|---|---|
//! | listen_addr | EDGEPROXY_LISTEN_ADDR | 0.0.0.0:8080 (one listener, every app) |
//! | db_path | EDGEPROXY_DB_PATH | routing.db |
//! | region | EDGEPROXY_REGION | sa |
//! | db_reload_secs | EDGEPROXY_DB_RELOAD_SECS | 5 |
//! | geoip_path | EDGEPROXY_GEOIP_PATH | unset: the embedded database |
//! | binding_ttl_secs | EDGEPROXY_BINDING_TTL_SECS | 600 (0 turns bindings off) |
//! | binding_gc_interval_secs | EDGEPROXY_BINDING_GC_INTERVAL_SECS | 60 |
//! | connect_timeout_ms | EDGEPROXY_CONNECT_TIMEOUT_MS | 3000 |
//! | connect_attempts | EDGEPROXY_CONNECT_ATTEMPTS | 3 |
//! | idle_timeout_secs | EDGEPROXY_IDLE_TIMEOUT_SECS | 0 (off) |
//! | drain_timeout_secs | EDGEPROXY_DRAIN_TIMEOUT_SECS | 30 |
//! | log_format | EDGEPROXY_LOG_FORMAT | human (or json) |
//! | debug | DEBUG | false |
//! | default_region | EDGEPROXY_DEFAULT_REGION | us (region of unlisted countries) |
//! | policy_path | EDGEPROXY_POLICY_PATH | unset: the embedded geo-load component |
//! | native_policy | EDGEPROXY_NATIVE_POLICY | false (true: the host's native scorer, no wasm) |
//! | policy_timeout_ms | EDGEPROXY_POLICY_TIMEOUT_MS | 1 (time bound of one policy call) |
//! | policy_memory_mib | EDGEPROXY_POLICY_MEMORY_MIB | 16 (memory bound of one policy instance) |
//! | worker_threads | EDGEPROXY_WORKER_THREADS | 0 (one per core; 1 runs a single-threaded runtime) |
//! | admin_addr | EDGEPROXY_ADMIN_ADDR | 127.0.0.1:9090 (admin HTTP and /metrics; empty turns it off) |
//! | admin_token | EDGEPROXY_ADMIN_TOKEN | unset (set: every admin request needs `Authorization: Bearer <token>`) |
//! | admin_allow_remote | EDGEPROXY_ADMIN_ALLOW_REMOTE | false (a non-loopback admin_addr needs a token or this) |
//!
//! When the file has `[[listener]]` tables they replace `listen_addr`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::domain::services::RegionMap;
use crate::domain::{CountryCode, Region};

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "human" => Ok(Self::Human),
            "json" => Ok(Self::Json),
            _ => Err(format!("expected \"human\" or \"json\", got {s:?}")),
        }
    }
}

/// One `[[listener]]` table of the file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
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
}

impl ListenerConfig {
    pub fn plain(addr: SocketAddr) -> Self {
        Self {
            addr,
            app: None,
            proxy_protocol: false,
            trusted_proxies: Vec::new(),
        }
    }

    pub fn trusts(&self, peer: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(&peer))
    }
}

/// One source of settings; every key optional so sources can be layered.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layer {
    pub listen_addr: Option<SocketAddr>,
    pub db_path: Option<PathBuf>,
    pub region: Option<String>,
    pub db_reload_secs: Option<u64>,
    pub geoip_path: Option<PathBuf>,
    pub binding_ttl_secs: Option<u64>,
    pub binding_gc_interval_secs: Option<u64>,
    pub connect_timeout_ms: Option<u64>,
    pub connect_attempts: Option<u32>,
    pub idle_timeout_secs: Option<u64>,
    pub drain_timeout_secs: Option<u64>,
    pub log_format: Option<LogFormat>,
    pub debug: Option<bool>,
    pub default_region: Option<String>,
    pub policy_path: Option<PathBuf>,
    pub native_policy: Option<bool>,
    pub policy_timeout_ms: Option<u64>,
    pub policy_memory_mib: Option<u64>,
    pub worker_threads: Option<usize>,
    /// An address, or "" for no admin listener.
    pub admin_addr: Option<String>,
    pub admin_token: Option<String>,
    pub admin_allow_remote: Option<bool>,
    /// File only: region name -> countries moved into it.
    pub regions: Option<BTreeMap<String, Vec<String>>>,
    /// File only.
    pub listener: Option<Vec<ListenerConfig>>,
}

impl Layer {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())
    }

    /// Reads the `EDGEPROXY_*` variables (and edgeProxy's `DEBUG`) through `lookup`, so
    /// tests need not touch the process environment.
    pub fn from_env(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let var = |name: &str| lookup(name).filter(|v| !v.is_empty());
        fn parse<T: FromStr>(name: &str, v: Option<String>) -> Result<Option<T>, ConfigError>
        where
            T::Err: std::fmt::Display,
        {
            v.map(|v| {
                v.parse::<T>()
                    .map_err(|e| invalid(name, format!("bad value {v:?}: {e}")))
            })
            .transpose()
        }
        fn flag(name: &str, v: Option<String>) -> Result<Option<bool>, ConfigError> {
            v.map(|v| match v.to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => Ok(true),
                "0" | "false" | "no" | "off" => Ok(false),
                _ => Err(invalid(
                    name,
                    format!("bad value {v:?}: expected true or false"),
                )),
            })
            .transpose()
        }
        macro_rules! env {
            ($name:literal) => {
                parse($name, var($name))?
            };
        }
        Ok(Self {
            listen_addr: env!("EDGEPROXY_LISTEN_ADDR"),
            db_path: var("EDGEPROXY_DB_PATH").map(PathBuf::from),
            region: var("EDGEPROXY_REGION"),
            db_reload_secs: env!("EDGEPROXY_DB_RELOAD_SECS"),
            geoip_path: var("EDGEPROXY_GEOIP_PATH").map(PathBuf::from),
            binding_ttl_secs: env!("EDGEPROXY_BINDING_TTL_SECS"),
            binding_gc_interval_secs: env!("EDGEPROXY_BINDING_GC_INTERVAL_SECS"),
            connect_timeout_ms: env!("EDGEPROXY_CONNECT_TIMEOUT_MS"),
            connect_attempts: env!("EDGEPROXY_CONNECT_ATTEMPTS"),
            idle_timeout_secs: env!("EDGEPROXY_IDLE_TIMEOUT_SECS"),
            drain_timeout_secs: env!("EDGEPROXY_DRAIN_TIMEOUT_SECS"),
            log_format: env!("EDGEPROXY_LOG_FORMAT"),
            // edgeProxy treats any non-empty DEBUG as on; "0" and "false" read as off.
            debug: lookup("DEBUG").map(|v| !matches!(v.as_str(), "" | "0" | "false")),
            default_region: var("EDGEPROXY_DEFAULT_REGION"),
            policy_path: var("EDGEPROXY_POLICY_PATH").map(PathBuf::from),
            native_policy: flag("EDGEPROXY_NATIVE_POLICY", var("EDGEPROXY_NATIVE_POLICY"))?,
            policy_timeout_ms: env!("EDGEPROXY_POLICY_TIMEOUT_MS"),
            policy_memory_mib: env!("EDGEPROXY_POLICY_MEMORY_MIB"),
            worker_threads: env!("EDGEPROXY_WORKER_THREADS"),
            // Set but empty means "off", so it is read unfiltered.
            admin_addr: lookup("EDGEPROXY_ADMIN_ADDR"),
            admin_token: var("EDGEPROXY_ADMIN_TOKEN"),
            admin_allow_remote: flag(
                "EDGEPROXY_ADMIN_ALLOW_REMOTE",
                var("EDGEPROXY_ADMIN_ALLOW_REMOTE"),
            )?,
            regions: None,
            listener: None,
        })
    }

    /// `self` where set, else `lower`.
    pub fn over(self, lower: Layer) -> Layer {
        Layer {
            listen_addr: self.listen_addr.or(lower.listen_addr),
            db_path: self.db_path.or(lower.db_path),
            region: self.region.or(lower.region),
            db_reload_secs: self.db_reload_secs.or(lower.db_reload_secs),
            geoip_path: self.geoip_path.or(lower.geoip_path),
            binding_ttl_secs: self.binding_ttl_secs.or(lower.binding_ttl_secs),
            binding_gc_interval_secs: self
                .binding_gc_interval_secs
                .or(lower.binding_gc_interval_secs),
            connect_timeout_ms: self.connect_timeout_ms.or(lower.connect_timeout_ms),
            connect_attempts: self.connect_attempts.or(lower.connect_attempts),
            idle_timeout_secs: self.idle_timeout_secs.or(lower.idle_timeout_secs),
            drain_timeout_secs: self.drain_timeout_secs.or(lower.drain_timeout_secs),
            log_format: self.log_format.or(lower.log_format),
            debug: self.debug.or(lower.debug),
            default_region: self.default_region.or(lower.default_region),
            policy_path: self.policy_path.or(lower.policy_path),
            native_policy: self.native_policy.or(lower.native_policy),
            policy_timeout_ms: self.policy_timeout_ms.or(lower.policy_timeout_ms),
            policy_memory_mib: self.policy_memory_mib.or(lower.policy_memory_mib),
            worker_threads: self.worker_threads.or(lower.worker_threads),
            admin_addr: self.admin_addr.or(lower.admin_addr),
            admin_token: self.admin_token.or(lower.admin_token),
            admin_allow_remote: self.admin_allow_remote.or(lower.admin_allow_remote),
            regions: self.regions.or(lower.regions),
            listener: self.listener.or(lower.listener),
        }
    }
}

/// The validated settings the host runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub listeners: Vec<ListenerConfig>,
    pub db_path: PathBuf,
    pub region: Region,
    pub db_reload: Duration,
    pub geoip_path: Option<PathBuf>,
    /// None: bindings off, every connection is a fresh decision.
    pub binding_ttl: Option<Duration>,
    pub binding_gc_interval: Duration,
    pub connect_timeout: Duration,
    pub connect_attempts: u32,
    pub idle_timeout: Option<Duration>,
    pub drain_timeout: Duration,
    pub log_format: LogFormat,
    pub debug: bool,
    pub regions: RegionMap,
    pub policy: PolicyConfig,
    /// Runtime worker threads; 0 means one per core.
    pub worker_threads: usize,
    /// None: no admin listener.
    pub admin: Option<AdminConfig>,
}

/// The admin HTTP listener (JSON API and `/metrics`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub addr: SocketAddr,
    /// Required as `Authorization: Bearer <token>` on every request when set.
    pub token: Option<String>,
}

/// Which scoring policy decides, and its bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyConfig {
    pub source: PolicySource,
    pub timeout: Duration,
    pub memory_bytes: usize,
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

impl Config {
    /// Merges the sources by precedence and validates the result.
    pub fn resolve(file: Layer, env: Layer, flags: Layer) -> Result<Self, ConfigError> {
        let l = flags.over(env).over(file);
        let positive = |key: &str, v: Option<u64>, default: u64| match v.unwrap_or(default) {
            0 => Err(invalid(key, "must be greater than 0")),
            n => Ok(n),
        };
        let region = l.region.unwrap_or_else(|| "sa".into());
        if region.trim().is_empty() {
            return Err(invalid("region", "must not be empty"));
        }
        let listeners = match l.listener {
            Some(list) if list.is_empty() => {
                return Err(invalid("listener", "at least one [[listener]] is needed"));
            }
            Some(list) => list,
            None => vec![ListenerConfig::plain(
                l.listen_addr
                    .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 8080))),
            )],
        };
        for (i, lc) in listeners.iter().enumerate() {
            if lc.proxy_protocol && lc.trusted_proxies.is_empty() {
                return Err(invalid(
                    format!("listener[{i}].trusted_proxies"),
                    "proxy_protocol = true needs at least one trusted CIDR",
                ));
            }
            if listeners[..i].iter().any(|o| o.addr == lc.addr) {
                return Err(invalid(
                    format!("listener[{i}].addr"),
                    format!("{} is listed twice", lc.addr),
                ));
            }
        }
        let mut overrides = Vec::new();
        for (name, countries) in l.regions.unwrap_or_default() {
            let codes = countries
                .iter()
                .map(|c| c.parse::<CountryCode>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| invalid(format!("regions.{name}"), e.to_string()))?;
            overrides.push((Region::new(&name), codes));
        }
        let regions = RegionMap::with_overrides(
            overrides.iter().map(|(r, c)| (r, &c[..])),
            l.default_region.as_deref().map(Region::new),
        );
        let attempts = positive("connect_attempts", l.connect_attempts.map(u64::from), 3)?;
        Ok(Self {
            listeners,
            db_path: l.db_path.unwrap_or_else(|| "routing.db".into()),
            region: Region::new(&region),
            db_reload: Duration::from_secs(positive("db_reload_secs", l.db_reload_secs, 5)?),
            geoip_path: l.geoip_path,
            binding_ttl: match l.binding_ttl_secs.unwrap_or(600) {
                0 => None,
                n => Some(Duration::from_secs(n)),
            },
            binding_gc_interval: Duration::from_secs(positive(
                "binding_gc_interval_secs",
                l.binding_gc_interval_secs,
                60,
            )?),
            connect_timeout: Duration::from_millis(positive(
                "connect_timeout_ms",
                l.connect_timeout_ms,
                3000,
            )?),
            // Invariant: `attempts` came from a u32 (or the default 3).
            connect_attempts: u32::try_from(attempts).expect("connect_attempts fits u32"),
            idle_timeout: l
                .idle_timeout_secs
                .filter(|s| *s > 0)
                .map(Duration::from_secs),
            drain_timeout: Duration::from_secs(l.drain_timeout_secs.unwrap_or(30)),
            log_format: l.log_format.unwrap_or_default(),
            debug: l.debug.unwrap_or(false),
            regions,
            policy: PolicyConfig {
                source: match (l.native_policy.unwrap_or(false), l.policy_path) {
                    (true, Some(_)) => {
                        return Err(invalid(
                            "native_policy",
                            "cannot be combined with policy_path",
                        ));
                    }
                    (true, None) => PolicySource::Native,
                    (false, Some(p)) => PolicySource::File(p),
                    (false, None) => PolicySource::Embedded,
                },
                timeout: Duration::from_millis(positive(
                    "policy_timeout_ms",
                    l.policy_timeout_ms,
                    1,
                )?),
                memory_bytes: match positive("policy_memory_mib", l.policy_memory_mib, 16)? {
                    n if n > 4096 => {
                        return Err(invalid("policy_memory_mib", "must be at most 4096"));
                    }
                    n => (n as usize) << 20,
                },
            },
            worker_threads: l.worker_threads.unwrap_or(0),
            admin: admin_config(l.admin_addr, l.admin_token, l.admin_allow_remote)?,
        })
    }
}

fn admin_config(
    addr: Option<String>,
    token: Option<String>,
    allow_remote: Option<bool>,
) -> Result<Option<AdminConfig>, ConfigError> {
    let addr = match addr.as_deref().map(str::trim) {
        Some("") => return Ok(None),
        None => SocketAddr::from(([127, 0, 0, 1], 9090)),
        Some(a) => a
            .parse()
            .map_err(|e| invalid("admin_addr", format!("bad address {a:?}: {e}")))?,
    };
    let token = token.filter(|t| !t.is_empty());
    // The admin API can drop bindings and trigger reloads: off loopback it needs a token
    // unless the operator says the network is trusted.
    if !addr.ip().is_loopback() && token.is_none() && !allow_remote.unwrap_or(false) {
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
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Layer::from_env(|k| map.get(k).cloned()).unwrap()
    }

    #[test]
    fn defaults_are_edgeproxys() {
        let c = Config::resolve(Layer::default(), Layer::default(), Layer::default()).unwrap();
        assert_eq!(
            c.listeners,
            vec![ListenerConfig::plain("0.0.0.0:8080".parse().unwrap())]
        );
        assert_eq!(c.db_path, PathBuf::from("routing.db"));
        assert_eq!(c.region.as_str(), "sa");
        assert_eq!(c.db_reload, Duration::from_secs(5));
        assert_eq!(c.binding_ttl, Some(Duration::from_secs(600)));
        assert_eq!(c.binding_gc_interval, Duration::from_secs(60));
        assert_eq!(c.connect_timeout, Duration::from_secs(3));
        assert_eq!(c.geoip_path, None);
        assert!(!c.debug);
        assert_eq!(c.policy.source, PolicySource::Embedded);
        assert_eq!(c.policy.timeout, Duration::from_millis(1));
        assert_eq!(c.policy.memory_bytes, 16 << 20);
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
        let flags = Layer {
            region: Some("ap".into()),
            ..Layer::default()
        };
        let c = Config::resolve(file, env, flags).unwrap();
        assert_eq!(c.region.as_str(), "ap"); // flag
        assert_eq!(c.db_path, PathBuf::from("env.db")); // env over file
        assert_eq!(c.binding_ttl, Some(Duration::from_secs(10))); // file over default
        assert_eq!(c.db_reload, Duration::from_secs(7));
        assert_eq!(c.binding_gc_interval, Duration::from_secs(60)); // default
        assert!(c.debug);
    }

    #[test]
    fn unknown_file_keys_are_named() {
        let err = Layer::from_toml("regoin = \"eu\"").unwrap_err();
        assert!(err.contains("regoin"), "{err}");
        let err = Layer::from_toml("[[listener]]\naddr = \"127.0.0.1:1\"\nap = \"x\"").unwrap_err();
        assert!(err.contains("ap"), "{err}");
    }

    #[test]
    fn bad_env_values_name_the_variable() {
        let err = Layer::from_env(|k| (k == "EDGEPROXY_DB_RELOAD_SECS").then(|| "soon".into()))
            .unwrap_err();
        assert!(
            err.to_string().contains("EDGEPROXY_DB_RELOAD_SECS"),
            "{err}"
        );
        let err = Layer::from_env(|k| (k == "EDGEPROXY_LISTEN_ADDR").then(|| "nowhere".into()))
            .unwrap_err();
        assert!(err.to_string().contains("EDGEPROXY_LISTEN_ADDR"), "{err}");
        let on = Layer::from_env(|k| (k == "EDGEPROXY_NATIVE_POLICY").then(|| "1".into())).unwrap();
        assert_eq!(on.native_policy, Some(true));
        let err = Layer::from_env(|k| (k == "EDGEPROXY_NATIVE_POLICY").then(|| "maybe".into()))
            .unwrap_err();
        assert!(err.to_string().contains("EDGEPROXY_NATIVE_POLICY"), "{err}");
    }

    #[test]
    fn invalid_values_name_the_key() {
        let zero = Layer::from_toml("db_reload_secs = 0").unwrap();
        let err = Config::resolve(zero, Layer::default(), Layer::default()).unwrap_err();
        assert!(err.to_string().starts_with("db_reload_secs"), "{err}");
        let pp = Layer::from_toml("[[listener]]\naddr = \"127.0.0.1:1\"\nproxy_protocol = true")
            .unwrap();
        let err = Config::resolve(pp, Layer::default(), Layer::default()).unwrap_err();
        assert!(err.to_string().contains("trusted_proxies"), "{err}");
        let bad = Layer::from_toml("[regions]\naf = [\"ZAF\"]").unwrap();
        let err = Config::resolve(bad, Layer::default(), Layer::default()).unwrap_err();
        assert!(err.to_string().contains("regions.af"), "{err}");
    }

    #[test]
    fn admin_listener_defaults_to_loopback_and_guards_remote_binds() {
        let resolve = |file: &str, e: &[(&str, &str)]| {
            Config::resolve(Layer::from_toml(file).unwrap(), env(e), Layer::default())
        };
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
        assert_eq!(c.admin.unwrap().token.as_deref(), Some("s3cret"));
        let c = resolve(
            "admin_addr = \"0.0.0.0:9090\"\nadmin_allow_remote = true",
            &[],
        );
        assert_eq!(c.unwrap().admin.unwrap().token, None);
        let err = resolve("admin_addr = \"localhost\"", &[]).unwrap_err();
        assert!(err.to_string().contains("bad address"), "{err}");
    }

    #[test]
    fn listeners_and_regions_from_file() {
        let file = Layer::from_toml(
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
        )
        .unwrap();
        let c = Config::resolve(file, Layer::default(), Layer::default()).unwrap();
        assert_eq!(c.listeners.len(), 2);
        assert_eq!(c.listeners[0].app.as_deref(), Some("web"));
        assert!(c.listeners[1].trusts("10.1.2.3".parse().unwrap()));
        assert!(!c.listeners[1].trusts("127.0.0.1".parse().unwrap()));
        assert_eq!(c.regions.region_of("ZA".parse().unwrap()).as_str(), "af");
        assert_eq!(c.regions.region_of("KE".parse().unwrap()).as_str(), "eu");
    }
}
