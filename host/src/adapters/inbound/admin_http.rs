//! The admin listener: HTTP/1.1 (hyper) with a JSON API and Prometheus `/metrics`.
//!
//! | route | answer |
//! |---|---|
//! | `GET /metrics` | Prometheus text format (`metrics_path`; none with `metrics_enabled = false`) |
//! | `GET /status` | version, region, uptime, listeners, policy, routing table, GeoIP, bindings |
//! | `GET /backends` | the routing table joined with live state |
//! | `GET /bindings?offset=0&limit=100` | one page of bindings, ordered by client |
//! | `DELETE /bindings/{client-ip}` | drops the client's bindings (every app) |
//! | `POST /reload` | reloads the routing table and the policy now |
//! | `GET /decisions` | recent sampled policy decisions with their inputs, as JSON lines |
//! | `GET /policy/shadow` | the shadow policy against the live one: agreement, pick tables, recent disagreements |
//! | `POST /policy/promote[?drop_bindings=true]` | makes the shadow policy live (after a self-test) |
//! | `POST /policy/rollback[?drop_bindings=true]` | brings back the policy before the promotion |
//! | `GET /cluster` | this node, members and their SWIM state, sync times, table digest, counters, fleet deployments and what each POP runs |
//! | `POST /fleet/deploy?role=live\|shadow&name=N[&pops=a,b][&regions=x,y][&sha256=H]` | stores the component (the body) in the fleet and deploys it to the POPs named (every POP when none is) |
//! | `POST /fleet/rollback?role=live\|shadow` | revokes the latest deployment of that role: the POPs it selected go back to what they ran before |
//!
//! With a token configured, every route needs `Authorization: Bearer <token>`. The
//! listener only reads and formats; what it answers comes from [`Admin`].

use std::net::IpAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::http::{self, Reply, error, json, not_allowed, reply};
use super::prometheus;
use crate::application::admin::Admin;

const DEFAULT_PAGE: usize = 100;
/// Deepest page offset: a page holds offset + limit bindings while it is made.
const MAX_OFFSET: usize = 100_000;

struct State {
    admin: Arc<Admin>,
    registry: Arc<Registry>,
    token: Option<String>,
    idle: std::time::Duration,
    /// Where the metrics are served (`metrics_path`); None: not at all.
    metrics: Option<String>,
    /// The metrics alone: every other path is unknown here.
    metrics_only: bool,
}

/// What one listener serves: the admin API (with the metrics at `metrics`, when set), or
/// the metrics alone (edgeProxy's metrics server).
pub struct Serving {
    pub token: Option<String>,
    pub idle: std::time::Duration,
    pub metrics: Option<String>,
    pub metrics_only: bool,
}

/// Serves admin requests on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    admin: Arc<Admin>,
    serving: Serving,
    shutdown: CancellationToken,
) {
    let state = Arc::new(State {
        registry: Arc::new(prometheus::registry(Arc::clone(&admin))),
        admin,
        token: serving.token,
        idle: serving.idle,
        metrics: serving.metrics,
        metrics_only: serving.metrics_only,
    });
    let name = if serving.metrics_only {
        "metrics"
    } else {
        "admin"
    };
    http::serve(listener, name, serving.idle, shutdown, move |req| {
        let state = Arc::clone(&state);
        async move { state.handle(req).await }
    })
    .await
}

impl State {
    /// Rendering walks every backend: off the proxy's worker threads.
    async fn render(&self) -> Reply {
        let registry = Arc::clone(&self.registry);
        match tokio::task::spawn_blocking(move || prometheus::render(&registry)).await {
            Ok(text) => reply(StatusCode::OK, prometheus::CONTENT_TYPE, text),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        }
    }

    async fn handle(&self, req: Request<Incoming>) -> Reply {
        // The status page is a static shell; what it shows comes from the API below,
        // token and all.
        if !self.metrics_only && req.uri().path() == "/" {
            return match *req.method() {
                Method::GET => status_page(),
                _ => not_allowed("GET"),
            };
        }
        if !self.authorized(&req) {
            return http::unauthorized();
        }
        let path = req.uri().path();
        let method = req.method();
        let metrics = self.metrics.as_deref();
        if self.metrics_only && metrics != Some(path) {
            return error(StatusCode::NOT_FOUND, &format!("no such endpoint: {path}"));
        }
        match (path, method) {
            (p, &Method::GET) if metrics == Some(p) => self.render().await,
            (p, _) if metrics == Some(p) => not_allowed("GET"),
            ("/status", &Method::GET) => json(StatusCode::OK, &self.admin.status()),
            ("/backends", &Method::GET) => json(StatusCode::OK, &self.admin.backends()),
            ("/decisions", &Method::GET) => match &self.admin.decisions {
                Some(d) => {
                    let d = Arc::clone(d);
                    match tokio::task::spawn_blocking(move || d.json_lines()).await {
                        Ok(lines) => reply(StatusCode::OK, "application/x-ndjson", lines),
                        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
                    }
                }
                None => error(
                    StatusCode::NOT_FOUND,
                    "no decisions are recorded on this POP (decision_log_size = 0)",
                ),
            },
            ("/policy/shadow", &Method::GET) => {
                match self.admin.shadow.as_ref().filter(|s| s.active()) {
                    Some(s) => json(StatusCode::OK, &s.report()),
                    None => error(
                        StatusCode::NOT_FOUND,
                        "no shadow policy on this POP (shadow_policy_path, or a fleet deployment with --shadow)",
                    ),
                }
            }
            ("/policy/promote" | "/policy/rollback", &Method::POST) => {
                let drop_bindings = match req.uri().query() {
                    None | Some("") => false,
                    Some("drop_bindings=true") => true,
                    Some(q) => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            &format!("unknown query {q:?} (drop_bindings=true is the only one)"),
                        );
                    }
                };
                match self
                    .admin
                    .promote(path == "/policy/promote", drop_bindings)
                    .await
                {
                    Ok(done) => json(StatusCode::OK, &done),
                    Err(e) => error(StatusCode::CONFLICT, &e),
                }
            }
            ("/policy/promote" | "/policy/rollback", _) => not_allowed("POST"),
            ("/fleet/deploy", &Method::POST) => self.deploy(req).await,
            ("/fleet/rollback", &Method::POST) => {
                let role = match fleet_query(req.uri().query(), &["role"]) {
                    Ok(q) => q.role,
                    Err(e) => return error(StatusCode::BAD_REQUEST, &e),
                };
                match self.admin.fleet_rollback(role).await {
                    Ok(d) => json(StatusCode::OK, &d),
                    Err(e) => fleet_error(e),
                }
            }
            ("/fleet/deploy" | "/fleet/rollback", _) => not_allowed("POST"),
            ("/cluster", &Method::GET) => match self.admin.cluster() {
                Some(c) => json(StatusCode::OK, &c),
                None => error(
                    StatusCode::NOT_FOUND,
                    "replication is off on this POP (cluster_enabled)",
                ),
            },
            // A page walks the whole table: off the proxy's worker threads.
            ("/bindings", &Method::GET) => match page(req.uri().query()) {
                Ok((offset, limit)) => {
                    let admin = Arc::clone(&self.admin);
                    match tokio::task::spawn_blocking(move || admin.bindings(offset, limit)).await {
                        Ok(page) => json(StatusCode::OK, &page),
                        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
                    }
                }
                Err(e) => error(StatusCode::BAD_REQUEST, &e),
            },
            ("/reload", &Method::POST) => {
                let report = self.admin.reload().await;
                let code = if report.ok() {
                    StatusCode::OK
                } else {
                    StatusCode::INTERNAL_SERVER_ERROR
                };
                json(code, &report)
            }
            (p, &Method::DELETE) if p.starts_with("/bindings/") => {
                self.unbind(&p["/bindings/".len()..])
            }
            ("/status" | "/backends" | "/bindings" | "/cluster" | "/policy/shadow", _) => {
                not_allowed("GET")
            }
            ("/reload", _) => not_allowed("POST"),
            (p, _) if p.starts_with("/bindings/") => not_allowed("DELETE"),
            _ => error(StatusCode::NOT_FOUND, &format!("no such endpoint: {path}")),
        }
    }

    async fn deploy(&self, req: Request<Incoming>) -> Reply {
        let q = match fleet_query(
            req.uri().query(),
            &["role", "name", "pops", "regions", "sha256"],
        ) {
            Ok(q) => q,
            Err(e) => return error(StatusCode::BAD_REQUEST, &e),
        };
        let Some(name) = q.name else {
            return error(
                StatusCode::BAD_REQUEST,
                "name= is required: what the component is called",
            );
        };
        // Over the cap by one byte is enough to know it is too large.
        let max = usize::try_from(self.admin.policy_max_bytes).unwrap_or(usize::MAX);
        let bytes = match http::body(req, max, self.idle).await {
            Ok(b) => b.to_vec(),
            Err(reply) => return reply,
        };
        let request = crate::domain::ports::DeployRequest {
            role: q.role,
            name,
            targets: q.targets,
        };
        match self.admin.deploy(request, bytes, q.sha256.as_deref()).await {
            Ok(d) => json(StatusCode::OK, &d),
            Err(e) => fleet_error(e),
        }
    }

    fn unbind(&self, client: &str) -> Reply {
        // IPv6 clients may arrive percent-encoded.
        let client = client.replace("%3A", ":").replace("%3a", ":");
        let Ok(ip) = client.parse::<IpAddr>() else {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("not an IP address: {client:?}"),
            );
        };
        match self.admin.unbind(ip) {
            0 => error(StatusCode::NOT_FOUND, &format!("no binding for {ip}")),
            removed => json(StatusCode::OK, &serde_json::json!({ "removed": removed })),
        }
    }

    fn authorized(&self, req: &Request<Incoming>) -> bool {
        http::bearer_ok(req, self.token.as_deref())
    }
}

fn fleet_error(e: crate::application::admin::FleetError) -> Reply {
    use crate::application::admin::FleetError;
    let code = match e {
        FleetError::Off => StatusCode::NOT_FOUND,
        FleetError::Invalid(_) => StatusCode::BAD_REQUEST,
        FleetError::Refused(_) => StatusCode::CONFLICT,
    };
    error(code, &e.to_string())
}

/// The query of `/fleet/deploy` and `/fleet/rollback`.
#[derive(Debug, Default, PartialEq)]
struct FleetQuery {
    role: crate::domain::rollout::Role,
    name: Option<String>,
    targets: crate::domain::rollout::Targets,
    sha256: Option<String>,
}

/// Parses `role=live|shadow`, `name=`, `pops=a,b`, `regions=x,y`, `sha256=` (percent-
/// encoded), refusing keys outside `allowed`.
fn fleet_query(query: Option<&str>, allowed: &[&str]) -> Result<FleetQuery, String> {
    use crate::domain::rollout::Role;
    let mut q = FleetQuery::default();
    let mut role = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if !allowed.contains(&key) {
            return Err(format!(
                "unknown query parameter {key:?} (allowed: {})",
                allowed.join(", ")
            ));
        }
        let value = percent_decode(value)
            .ok_or_else(|| format!("{key}: bad percent-encoding in {value:?}"))?;
        let list = || {
            value
                .split(',')
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(String::from)
                .collect::<Vec<_>>()
        };
        match key {
            "role" => {
                role = Some(match value.as_str() {
                    "live" => Role::Live,
                    "shadow" => Role::Shadow,
                    other => return Err(format!("role must be live or shadow, got {other:?}")),
                })
            }
            "name" if !value.is_empty() => q.name = Some(value),
            "pops" => q.targets.pops = list(),
            "regions" => q.targets.regions = list(),
            "sha256" => {
                crate::domain::rollout::valid_hash(&value)?;
                q.sha256 = Some(value)
            }
            _ => return Err(format!("{key} is empty")),
        }
    }
    q.role = role.ok_or("role= is required: live or shadow")?;
    Ok(q)
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// `offset` and `limit` from a query string.
fn page(query: Option<&str>) -> Result<(usize, usize), String> {
    let (mut offset, mut limit) = (0, DEFAULT_PAGE);
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let n = || {
            value
                .parse::<usize>()
                .map_err(|_| format!("{key} must be a non-negative integer, got {value:?}"))
        };
        match key {
            "offset" => offset = n()?,
            "limit" => limit = n()?,
            _ => return Err(format!("unknown query parameter {key:?}")),
        }
    }
    // A page keeps offset + limit entries while it walks the table.
    if offset > MAX_OFFSET {
        return Err(format!("offset {offset} is over {MAX_OFFSET}"));
    }
    Ok((offset, limit))
}

const STATUS_PAGE: &str = include_str!("status.html");

/// The status page (`GET /`): one self-contained HTML file, no external assets.
fn status_page() -> Reply {
    use hyper::header::{CONTENT_SECURITY_POLICY, HeaderName, HeaderValue};
    // Its own script (by its hash: nothing injected could run) and style, requests to
    // this listener only.
    static POLICY: std::sync::OnceLock<HeaderValue> = std::sync::OnceLock::new();
    let policy = POLICY.get_or_init(|| {
        use base64::Engine as _;
        use sha2::Digest as _;
        let script = STATUS_PAGE
            .split_once("<script>")
            .and_then(|(_, rest)| rest.split_once("</script>"))
            .map_or("", |(script, _)| script);
        let hash = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(script));
        let policy = format!(
            "default-src 'none'; script-src 'sha256-{hash}'; style-src 'unsafe-inline'; \
             connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        );
        HeaderValue::from_str(&policy).expect("a header value")
    });
    let mut r = reply(
        StatusCode::OK,
        "text/html; charset=utf-8",
        STATUS_PAGE.to_owned(),
    );
    let headers = r.headers_mut();
    headers.insert(CONTENT_SECURITY_POLICY, policy.clone());
    headers.insert(
        HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        HeaderName::from_static("referrer-policy"),
        HeaderValue::from_static("no-referrer"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleet_queries_parse_and_bad_ones_are_named() {
        use crate::domain::rollout::Role;
        let all = ["role", "name", "pops", "regions", "sha256"];
        let q = fleet_query(
            Some("role=shadow&name=my%20policy.wasm&pops=a,b&regions=eu"),
            &all,
        )
        .unwrap();
        assert_eq!(q.role, Role::Shadow);
        assert_eq!(q.name.as_deref(), Some("my policy.wasm"));
        assert_eq!(q.targets.pops, ["a", "b"]);
        assert_eq!(q.targets.regions, ["eu"]);
        assert!(
            fleet_query(Some("name=x"), &all)
                .unwrap_err()
                .contains("role= is required")
        );
        assert!(
            fleet_query(Some("role=primary"), &all)
                .unwrap_err()
                .contains("live or shadow")
        );
        assert!(
            fleet_query(Some("role=live&sha256=abc"), &all)
                .unwrap_err()
                .contains("SHA-256")
        );
        assert!(
            fleet_query(Some("role=live&name=x"), &["role"])
                .unwrap_err()
                .contains("\"name\"")
        );
        assert!(
            fleet_query(Some("role=live&name=%zz"), &all)
                .unwrap_err()
                .contains("percent")
        );
    }

    #[test]
    fn pages_parse_and_bad_ones_are_named() {
        assert_eq!(page(None), Ok((0, DEFAULT_PAGE)));
        assert_eq!(page(Some("offset=20&limit=5")), Ok((20, 5)));
        assert!(page(Some("limit=-1")).unwrap_err().contains("limit"));
        assert!(page(Some("cursor=x")).unwrap_err().contains("cursor"));
    }
}
