//! `edgeproxy config check` and `edgeproxy config show`: the effective configuration and
//! where each value came from, without starting the proxy (as `nginx -T` and `haproxy -c`).

use serde::Serialize;

use super::output::render;
use crate::config::{Config, ListenerConfig, Origin};

#[derive(Debug, Serialize)]
pub struct Shown {
    pub config_file: Option<String>,
    pub settings: Vec<ShownSetting>,
    pub listeners: Vec<ListenerConfig>,
    pub regions: std::collections::BTreeMap<String, Vec<String>>,
    pub warnings: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct ShownSetting {
    pub key: &'static str,
    pub value: serde_json::Value,
    pub origin: Origin,
    pub env: &'static str,
}

pub fn show(config: &Config, config_file: Option<String>, warnings: Vec<String>) -> Shown {
    Shown {
        config_file,
        settings: config
            .show()
            .into_iter()
            .map(|(info, value, origin)| ShownSetting {
                key: info.key,
                value,
                origin,
                env: info.env,
            })
            .collect(),
        listeners: config.listeners.clone(),
        regions: config.region_overrides.clone(),
        warnings,
    }
}

fn text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "(unset)".into(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub fn render_show(s: &Shown) -> String {
    let origin = |o: &Origin, env: &str, file: &Option<String>| match o {
        Origin::Flag => "flag".to_owned(),
        Origin::Env => format!("env {env}"),
        Origin::File => format!("file {}", file.as_deref().unwrap_or("")),
        Origin::Default => "default".to_owned(),
    };
    let rows: Vec<Vec<String>> = s
        .settings
        .iter()
        .map(|r| {
            vec![
                r.key.into(),
                text(&r.value),
                origin(&r.origin, r.env, &s.config_file),
            ]
        })
        .collect();
    let mut out = render(&["SETTING", "VALUE", "FROM"], &rows);
    out += "\nlisteners:\n";
    for l in &s.listeners {
        out += &format!(
            "  {} app={} proxy_protocol={}{}\n",
            l.addr,
            l.app.as_deref().unwrap_or("*"),
            l.proxy_protocol,
            match l.trusted_proxies.is_empty() {
                true => String::new(),
                false => format!(
                    " trusted_proxies={}",
                    l.trusted_proxies
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                ),
            }
        );
    }
    if !s.regions.is_empty() {
        out += "regions (moved countries):\n";
        for (r, c) in &s.regions {
            out += &format!("  {r} = {}\n", c.join(" "));
        }
    }
    out + &render_warnings(&s.warnings)
}

pub fn render_warnings(warnings: &[String]) -> String {
    warnings.iter().map(|w| format!("warning: {w}\n")).collect()
}
