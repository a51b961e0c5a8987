//! The generic half of the configuration: one source of raw values ([`Layer`]: the file,
//! the environment or the flags), the `settings!` macro that declares each setting once,
//! and the merge that turns layers into typed, checked [`Settings`](super::Settings) with
//! the origin of every value. What the settings are lives in `settings.rs`; how several
//! settings combine (listeners, admin, policy) in `mod.rs`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::settings::SETTINGS;
use super::{ConfigError, ListenerConfig, invalid};

/// Declares the scalar settings: see `settings.rs` for the one use.
#[macro_export]
#[doc(hidden)]
macro_rules! settings {
    ($(
        $(#[doc = $doc:literal])+
        $key:ident : $ty:ty = $default:expr, env $env:literal
        $(, flag $flag:literal)? $(, check $check:expr)? $(, secret $secret:literal)? ;
    )*) => {
        /// The scalar settings after merging defaults, file, environment and flags.
        #[derive(Debug, Clone, PartialEq)]
        pub struct Settings { $( $(#[doc = $doc])+ pub $key: $ty, )* }

        /// What the flag parser, `config show` and the README table know of each setting,
        /// in declaration order.
        pub static SETTINGS: &[$crate::config::Info] = &[$( $crate::config::Info {
            key: stringify!($key),
            env: $env,
            flag: $crate::first!($($flag)? ; ""),
            help: concat!($($doc),+),
            is_switch: <$ty as $crate::config::SettingValue>::IS_SWITCH,
            secret: $crate::first!($($secret)? ; false),
        }, )*];

        impl Settings {
            pub fn defaults() -> Self {
                Self { $( $key: $default, )* }
            }

            /// The highest layer that sets each key wins; a bad value is reported in
            /// `errors` (with the setting it concerns) and replaced by the default, so every
            /// bad key is named at once.
            pub(crate) fn merge(
                layers: &[&$crate::config::Layer],
                errors: &mut Vec<(&'static str, $crate::config::ConfigError)>,
            ) -> (Self, Vec<$crate::config::Origin>) {
                let mut origins = Vec::with_capacity(SETTINGS.len());
                let settings = Self { $( $key: {
                    let check: fn(&$ty) -> Result<(), String> = $crate::first!($($check)? ; |_| Ok(()));
                    $crate::config::pick(layers, stringify!($key), || $default, check, &mut origins, errors)
                }, )* };
                (settings, origins)
            }

            /// Every value as JSON, in declaration order.
            pub fn values(&self) -> Vec<serde_json::Value> {
                vec![$( $crate::config::SettingValue::to_json(&self.$key), )*]
            }

            /// Each default passes its own check (a unit test calls this).
            #[cfg(test)]
            pub(crate) fn check_defaults() -> Vec<String> {
                let mut bad = Vec::new();
                $( {
                    let check: fn(&$ty) -> Result<(), String> = $crate::first!($($check)? ; |_| Ok(()));
                    if let Err(e) = check(&$default) { bad.push(format!("{}: {e}", stringify!($key))); }
                } )*
                bad
            }
        }
    };
}

/// The given expression, or the fallback when none is given.
#[macro_export]
#[doc(hidden)]
macro_rules! first {
    ( ; $fallback:expr) => {
        $fallback
    };
    ($given:expr ; $fallback:expr) => {
        $given
    };
}

/// One declared setting, as the tools around the configuration see it.
#[derive(Debug)]
pub struct Info {
    pub key: &'static str,
    pub env: &'static str,
    /// The flag name when it is not the key in kebab case.
    pub flag: &'static str,
    pub help: &'static str,
    /// A flag without a value (`--debug`).
    pub is_switch: bool,
    /// Masked by `config show`.
    pub secret: bool,
}

impl Info {
    pub fn flag(&self) -> String {
        match self.flag {
            "" => self.key.replace('_', "-"),
            f => f.to_owned(),
        }
    }

    /// The doc comment as one line.
    pub fn help(&self) -> String {
        self.help.split_whitespace().collect::<Vec<_>>().join(" ")
    }
}

/// Where a value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    Flag,
    Env,
    File,
    Default,
}

/// A value as a source wrote it, before it is typed.
#[derive(Debug, Clone, PartialEq)]
enum Raw {
    /// From the environment or a flag.
    Text(String),
    /// From the TOML file.
    Toml(toml::Value),
}

/// One source of settings: raw values by key, typed and checked only when merged, so a
/// command that needs a few settings is not stopped by a bad unrelated one.
#[derive(Debug, Clone, PartialEq)]
pub struct Layer {
    origin: Origin,
    values: BTreeMap<&'static str, Raw>,
    /// File only: region name -> countries moved into it.
    pub regions: Option<BTreeMap<String, Vec<String>>>,
    /// File only.
    pub listener: Option<Vec<ListenerConfig>>,
    /// File only: `[health_check.app.NAME]`, the checks of one app.
    pub app_checks: Option<BTreeMap<String, AppCheck>>,
}

impl Default for Layer {
    fn default() -> Self {
        Self::empty(Origin::File)
    }
}

/// Tables of the config file whose keys are settings named `<table>_<key>`.
const SECTIONS: &[&str] = &[
    "cluster",
    "health_check",
    "ejection",
    "api",
    "rate_limit",
    "tls",
    "dns",
    "metrics",
];

/// How the config file spells a setting: `[cluster] x` for `cluster_x`.
pub fn file_key(key: &str) -> String {
    SECTIONS
        .iter()
        .find_map(|s| {
            key.strip_prefix(&format!("{s}_"))
                .map(|k| format!("[{s}] {k}"))
        })
        .unwrap_or_else(|| key.to_owned())
}

fn info(key: &str) -> Option<&'static Info> {
    SETTINGS.iter().find(|i| i.key == key)
}

/// The known name nearest to `name`, when it is near enough to be a typo.
fn nearest<'a>(name: &str, known: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    known
        .map(|k| (strsim::levenshtein(name, k), k))
        .filter(|(d, k)| *d <= 3.max(k.len() / 4))
        .min()
        .map(|(_, k)| k)
}

impl Layer {
    fn empty(origin: Origin) -> Self {
        Self {
            origin,
            values: BTreeMap::new(),
            regions: None,
            listener: None,
            app_checks: None,
        }
    }

    /// Sets `key` as the file would. For code that builds a configuration (the demo,
    /// tests); panics on a key that is not declared, which is a programming error.
    pub fn with(mut self, key: &str, value: impl Into<toml::Value>) -> Self {
        let info = info(key).unwrap_or_else(|| panic!("no setting named {key:?}"));
        self.values.insert(info.key, Raw::Toml(value.into()));
        self
    }

    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    /// A file layer. Unknown keys are errors naming the key and the nearest known one.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let table: toml::Table =
            toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())?;
        let mut layer = Self::empty(Origin::File);
        let mut problems = Vec::new();
        for (key, value) in table {
            match key.as_str() {
                "regions" => match value.try_into() {
                    Ok(r) => layer.regions = Some(r),
                    Err(e) => problems.push(format!("regions: {e}")),
                },
                "listener" => match value.try_into() {
                    Ok(l) => layer.listener = Some(l),
                    Err(e) => problems.push(format!("listener: {}", e.to_string().trim_end())),
                },
                // `[cluster] x = …` is the setting `cluster_x`.
                section if SECTIONS.contains(&section) && value.is_table() => {
                    for (k, v) in value.as_table().into_iter().flatten() {
                        if section == "health_check" && k == "app" {
                            match v.clone().try_into() {
                                Ok(apps) => layer.app_checks = Some(apps),
                                Err(e) => problems.push(format!(
                                    "health_check.app: {}",
                                    e.to_string().trim_end()
                                )),
                            }
                            continue;
                        }
                        match info(&format!("{section}_{k}")) {
                            Some(info) => {
                                layer.values.insert(info.key, Raw::Toml(v.clone()));
                            }
                            None => problems.push(format!("unknown key {k:?} in [{section}]")),
                        }
                    }
                }
                _ => match info(&key) {
                    Some(info) => {
                        layer.values.insert(info.key, Raw::Toml(value));
                    }
                    None => {
                        let known = SETTINGS
                            .iter()
                            .map(|i| i.key)
                            .chain(["regions", "listener"]);
                        problems.push(match nearest(&key, known) {
                            Some(k) => format!("unknown key {key:?} (did you mean {k:?}?)"),
                            None => format!("unknown key {key:?}"),
                        });
                    }
                },
            }
        }
        match problems.is_empty() {
            true => Ok(layer),
            false => Err(problems.join("; ")),
        }
    }

    /// The environment layer from `vars` (all of the process's variables), and a warning for
    /// every `EDGEPROXY_*` variable that edgeproxy does not read.
    pub fn from_env(vars: impl IntoIterator<Item = (String, String)>) -> (Self, Vec<String>) {
        let mut layer = Self::empty(Origin::Env);
        let mut warnings = Vec::new();
        let vars: Vec<(String, String)> = vars.into_iter().collect();
        for (name, value) in &vars {
            // edgeProxy's other names for settings: taken unless ours is set too.
            let Some((_, ours)) = ALIASES.iter().find(|(alias, _)| alias == name) else {
                continue;
            };
            match vars.iter().any(|(n, _)| n == ours) {
                true => warnings.push(format!("{name} is ignored: {ours} is set too")),
                false => {
                    let key = SETTINGS.iter().find(|i| i.env == *ours).map(|i| i.key);
                    if let Some(key) = key {
                        layer.values.insert(key, Raw::Text(value.clone()));
                    }
                }
            }
        }
        for (name, value) in vars {
            if ALIASES.iter().any(|(alias, _)| *alias == name) {
                continue;
            }
            if let Some(info) = SETTINGS.iter().find(|i| i.env == name) {
                let value = match info.key {
                    // edgeProxy turns debug on for any value; "0" and "false" read as off.
                    "debug" if !value.is_empty() => {
                        (!matches!(value.as_str(), "0" | "false")).to_string()
                    }
                    _ => value,
                };
                layer.values.insert(info.key, Raw::Text(value));
            } else if name.starts_with("EDGEPROXY_") {
                warnings.push(unknown_variable(&name));
            }
        }
        warnings.sort();
        (layer, warnings)
    }

    /// `self` where set, else `lower`.
    pub fn over(mut self, lower: Layer) -> Layer {
        for (k, v) in lower.values {
            self.values.entry(k).or_insert(v);
        }
        self.regions = self.regions.or(lower.regions);
        self.listener = self.listener.or(lower.listener);
        self.app_checks = self.app_checks.or(lower.app_checks);
        self
    }

    /// The name a user wrote `key` under in this layer, for error messages.
    fn label(&self, key: &str) -> String {
        let info = info(key).expect("layers hold declared keys only");
        match self.origin {
            Origin::Env => info.env.to_owned(),
            Origin::Flag => format!("--{}", info.flag()),
            Origin::File | Origin::Default => key.to_owned(),
        }
    }
}

/// edgeProxy's variables that name one of our settings differently: (theirs, ours).
const ALIASES: &[(&str, &str)] = &[(
    "EDGEPROXY_SHUTDOWN_TIMEOUT_SECS",
    "EDGEPROXY_DRAIN_TIMEOUT_SECS",
)];

/// edgeProxy features edgeproxy does not have, by variable prefix, and what it does instead.
const ELSEWHERE: &[(&str, &str)] = &[
    (
        "EDGEPROXY_CORROSION_",
        "edgeproxy does not read Corrosion; POPs share the routing table by built-in replication (EDGEPROXY_REPLICATION_*)",
    ),
    ("EDGEPROXY_MDNS_", "edgeproxy has no mDNS discovery"),
    (
        "EDGEPROXY_POSTGRES_",
        "a PostgreSQL routing table is named by db_url (EDGEPROXY_DB_URL)",
    ),
    (
        "EDGEPROXY_CIRCUIT_SUCCESS_THRESHOLD",
        "an ejected backend returns after one successful health check or when its backoff ends",
    ),
    (
        "EDGEPROXY_POOL_",
        "edgeproxy has no backend connection pool: every client connection gets its own backend connection",
    ),
];

fn unknown_variable(name: &str) -> String {
    if let Some((_, instead)) = ELSEWHERE.iter().find(|(p, _)| name.starts_with(p)) {
        return format!("{name} is ignored: {instead}.");
    }
    match nearest(name, SETTINGS.iter().map(|i| i.env)) {
        Some(known) => format!("{name} is not a setting (did you mean {known}?); ignored"),
        None => format!("{name} is not a setting; ignored"),
    }
}

/// Picks `key` from the first layer that sets it (see `settings!`).
#[doc(hidden)]
pub fn pick<T: SettingValue>(
    layers: &[&Layer],
    key: &'static str,
    default: impl FnOnce() -> T,
    check: fn(&T) -> Result<(), String>,
    origins: &mut Vec<Origin>,
    errors: &mut Vec<(&'static str, ConfigError)>,
) -> T {
    for layer in layers {
        let value = match layer.values.get(key) {
            None => continue,
            // An empty variable or flag means unset, except where empty is a value ("off").
            Some(Raw::Text(t)) if t.is_empty() && !T::EMPTY_IS_VALUE => continue,
            Some(Raw::Text(t)) => T::parse(t).map_err(|e| format!("bad value {t:?}: {e}")),
            Some(Raw::Toml(v)) => T::from_toml(v).map_err(|e| format!("bad value {v}: {e}")),
        };
        origins.push(layer.origin);
        match value.and_then(|v| check(&v).map(|()| v)) {
            Ok(v) => return v,
            Err(message) => {
                errors.push((key, invalid(layer.label(key), message)));
                return default();
            }
        }
    }
    origins.push(Origin::Default);
    default()
}

/// A type a setting can have: parsed from text (environment, flags) and from TOML.
pub trait SettingValue: Sized {
    /// An empty string is a value (for optional settings: "none"), not "unset".
    const EMPTY_IS_VALUE: bool = false;
    /// A flag without a value.
    const IS_SWITCH: bool = false;
    fn parse(text: &str) -> Result<Self, String>;
    fn from_toml(value: &toml::Value) -> Result<Self, String> {
        match value {
            toml::Value::String(s) => Self::parse(s),
            other => Err(format!("expected a string, not {}", other.type_str())),
        }
    }
    fn to_json(&self) -> serde_json::Value;
}

macro_rules! text_setting {
    ($($t:ty),*) => {$(
        impl SettingValue for $t {
            fn parse(text: &str) -> Result<Self, String> {
                text.parse().map_err(|e| format!("{e}"))
            }
            fn to_json(&self) -> serde_json::Value {
                serde_json::json!(self)
            }
        }
    )*};
}
text_setting!(String, PathBuf, SocketAddr, IpAddr, LogFormat);

/// A duration written in seconds (`5`, `0.25`) or with a unit (`250ms`, `2m`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Seconds(pub std::time::Duration);

impl Seconds {
    pub const fn secs(s: u64) -> Self {
        Self(std::time::Duration::from_secs(s))
    }
}

impl SettingValue for Seconds {
    fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        match text.parse::<f64>() {
            Ok(s) => std::time::Duration::try_from_secs_f64(s)
                .map(Self)
                .map_err(|_| format!("{text:?} is not a number of seconds >= 0")),
            Err(_) => humantime::parse_duration(text)
                .map(Self)
                .map_err(|e| format!("{text:?}: {e} (write seconds, as 5 or 0.5, or 250ms)")),
        }
    }
    fn from_toml(value: &toml::Value) -> Result<Self, String> {
        match value {
            toml::Value::Integer(i) => Self::parse(&i.to_string()),
            toml::Value::Float(f) => Self::parse(&f.to_string()),
            toml::Value::String(s) => Self::parse(s),
            other => Err(format!("expected seconds, not {}", other.type_str())),
        }
    }
    fn to_json(&self) -> serde_json::Value {
        match self.0.subsec_nanos() {
            0 => serde_json::json!(self.0.as_secs()),
            _ => serde_json::json!(self.0.as_secs_f64()),
        }
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = toml::Value::deserialize(d)?;
        Self::from_toml(&value).map_err(serde::de::Error::custom)
    }
}

/// `[health_check.app.NAME]`: what differs for one app from `[health_check]`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppCheck {
    pub enabled: Option<bool>,
    pub interval_secs: Option<Seconds>,
    pub timeout_secs: Option<Seconds>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub path: Option<String>,
    pub send: Option<String>,
    pub expect: Option<String>,
    pub rise: Option<u32>,
    pub fall: Option<u32>,
}

macro_rules! integer_setting {
    ($($t:ty),*) => {$(
        impl SettingValue for $t {
            fn parse(text: &str) -> Result<Self, String> {
                text.trim().parse().map_err(|e| format!("{e}"))
            }
            fn from_toml(value: &toml::Value) -> Result<Self, String> {
                match value {
                    toml::Value::Integer(i) => <$t>::try_from(*i)
                        .map_err(|_| format!("out of range (0 to {})", <$t>::MAX)),
                    other => Err(format!("expected an integer, not {}", other.type_str())),
                }
            }
            fn to_json(&self) -> serde_json::Value {
                serde_json::json!(self)
            }
        }
    )*};
}
integer_setting!(u32, u64, usize);

fn parse_bool(text: &str) -> Result<bool, String> {
    match text.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err("expected true or false".into()),
    }
}

impl SettingValue for bool {
    const IS_SWITCH: bool = true;
    fn parse(text: &str) -> Result<Self, String> {
        parse_bool(text)
    }
    fn from_toml(value: &toml::Value) -> Result<Self, String> {
        value
            .as_bool()
            .ok_or_else(|| format!("expected true or false, not {}", value.type_str()))
    }
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!(self)
    }
}

/// Optional settings: empty means none, overriding lower layers ("" turns a default off).
impl<T: SettingValue> SettingValue for Option<T> {
    const EMPTY_IS_VALUE: bool = true;
    fn parse(text: &str) -> Result<Self, String> {
        match text.trim() {
            "" => Ok(None),
            t => T::parse(t).map(Some),
        }
    }
    fn from_toml(value: &toml::Value) -> Result<Self, String> {
        match value {
            toml::Value::String(s) if s.trim().is_empty() => Ok(None),
            v => T::from_toml(v).map(Some),
        }
    }
    fn to_json(&self) -> serde_json::Value {
        self.as_ref().map_or(serde_json::Value::Null, T::to_json)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
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

// Checks for `check` in `settings.rs`.

pub fn positive<T: PartialEq + Default>(v: &T) -> Result<(), String> {
    match *v == T::default() {
        true => Err("must be greater than 0".into()),
        false => Ok(()),
    }
}

pub fn at_most<T: Copy + TryInto<u64>>(v: &T, max: u64) -> Result<(), String> {
    match (*v).try_into().map_or(true, |v| v > max) {
        true => Err(format!("must be at most {max}")),
        false => Ok(()),
    }
}

pub fn not_blank(v: &str) -> Result<(), String> {
    match v.trim().is_empty() {
        true => Err("must not be empty".into()),
        false => Ok(()),
    }
}

/// The CLI flags as a layer: one `--flag` per declared setting.
#[derive(Debug, Clone, Default)]
pub struct Flags(pub Layer);

impl clap::FromArgMatches for Flags {
    fn from_arg_matches(matches: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let mut layer = Layer::empty(Origin::Flag);
        for info in SETTINGS {
            let value = match info.is_switch {
                true => matches.get_flag(info.key).then(|| "true".to_owned()),
                false => matches.get_one::<String>(info.key).cloned(),
            };
            if let Some(v) = value {
                layer.values.insert(info.key, Raw::Text(v));
            }
        }
        Ok(Self(layer))
    }

    fn update_from_arg_matches(&mut self, matches: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

impl clap::Args for Flags {
    fn augment_args(mut cmd: clap::Command) -> clap::Command {
        for info in SETTINGS {
            let flag = info.flag();
            let mut arg = clap::Arg::new(info.key)
                .long(flag.clone())
                .help(info.help());
            if flag != info.key.replace('_', "-") {
                arg = arg.visible_alias(info.key.replace('_', "-"));
            }
            arg = match info.is_switch {
                true => arg.action(clap::ArgAction::SetTrue),
                false => arg.value_name(info.key.to_uppercase()),
            };
            cmd = cmd.arg(arg);
        }
        cmd
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

/// The README's configuration table, generated from the declarations (a test keeps the
/// README equal to it).
pub fn markdown_table() -> String {
    let defaults = super::Settings::defaults().values();
    let mut out = String::from(
        "| file key | environment | flag | default | meaning |\n|---|---|---|---|---|\n",
    );
    for (info, default) in SETTINGS.iter().zip(defaults) {
        let default = match default {
            serde_json::Value::Null => "unset".to_owned(),
            serde_json::Value::String(s) if s.is_empty() => "empty".to_owned(),
            serde_json::Value::String(s) => format!("`{s}`"),
            v => format!("`{v}`"),
        };
        out += &format!(
            "| `{}` | `{}` | `--{}` | {default} | {} |\n",
            file_key(info.key),
            info.env,
            info.flag(),
            info.help()
        );
    }
    out
}
