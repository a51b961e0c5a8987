//! The admin listener of a live proxy: every endpoint, the bearer token, and a `/metrics`
//! scrape parsed by a Prometheus text parser whose values must match the traffic sent.

use std::net::SocketAddr;

use crate::support::*;
use edgeproxy::config::Layer;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

/// One connection from `source`: sends a line, reads the backend's greeting and the echo,
/// closes. Returns the backend's name.
async fn exchange(source: &str, addr: SocketAddr, line: &str) -> String {
    let (name, mut conn) = open(source, addr).await;
    conn.get_mut().write_all(line.as_bytes()).await.unwrap();
    let mut echo = String::new();
    conn.read_line(&mut echo).await.unwrap();
    assert_eq!(echo, line);
    conn.get_mut().shutdown().await.unwrap();
    let mut rest = Vec::new();
    conn.read_to_end(&mut rest).await.unwrap();
    name
}

pub(crate) async fn scrape(admin: SocketAddr) -> prometheus_parse::Scrape {
    let (code, body) = http(admin, "GET", "/metrics", &[]).await;
    assert_eq!(code, 200, "{body}");
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).unwrap()
}

/// The value of the sample `name` whose labels include `labels`.
pub(crate) fn value(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let sample = s
        .samples
        .iter()
        .find(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .unwrap_or_else(|| panic!("no sample {name} {labels:?}"));
    match sample.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => v,
        ref other => panic!("{name}: unexpected {other:?}"),
    }
}

/// A POP in eu with a backend in BR (region sa) and one in DE (eu), bindings on.
async fn br_de_pop() -> (Backend, Backend, Db, Proxy) {
    let br = Backend::start("br").await;
    let de = Backend::start("de").await;
    let db = Db::new(&[
        Row::new("br", "sa", "BR", br.addr),
        Row::new("de", "eu", "DE", de.addr),
    ]);
    let p = Proxy::start(&db, "").await;
    (br, de, db, p)
}

on_both_data_paths! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_scrape_matches_the_traffic_sent() {
    let (_br, _de, db, p) = br_de_pop().await;
    let line = "hello\n"; // 6 bytes up; 3 (greeting) + 6 (echo) down
    // BR client three times (1 policy decision, then 2 binding hits), DE twice, and one
    // client the GeoIP file does not know (the POP's region, eu, wins).
    for (source, want) in [
        ("127.0.0.2", "br"),
        ("127.0.0.2", "br"),
        ("127.0.0.2", "br"),
        ("127.0.0.6", "de"),
        ("127.0.0.6", "de"),
        ("127.0.0.1", "de"),
    ] {
        assert_eq!(exchange(source, p.addr, line).await, want, "{source}");
    }
    // The client has its EOF a moment before the connection task ends and counts itself
    // closed; nothing signals that moment, so wait for the count, bounded.
    wait_until(|| p.host.telemetry.listeners()[0].active() == 0).await;

    let s = scrape(p.admin).await;
    let listener = p.addr.to_string();
    let l = [("listener", listener.as_str())];
    assert_eq!(value(&s, "edgeproxy_connections_accepted_total", &l), 6.0);
    assert_eq!(value(&s, "edgeproxy_connections_closed_total", &l), 6.0);
    assert_eq!(value(&s, "edgeproxy_connections_active", &l), 0.0);
    for (backend, conns) in [("br", 3.0), ("de", 3.0)] {
        let b = [("backend", backend)];
        assert_eq!(
            value(&s, "edgeproxy_backend_connect_attempts_total", &b),
            conns
        );
        assert_eq!(
            value(&s, "edgeproxy_backend_connect_failures_total", &b),
            0.0
        );
        assert_eq!(
            value(&s, "edgeproxy_backend_bytes_up_total", &b),
            conns * 6.0
        );
        assert_eq!(
            value(&s, "edgeproxy_backend_bytes_down_total", &b),
            conns * 9.0
        );
        assert_eq!(value(&s, "edgeproxy_backend_active_connections", &b), 0.0);
        assert!(value(&s, "edgeproxy_backend_connect_rtt_seconds", &b) > 0.0);
    }
    let hit = [("result", "hit")];
    let miss = [("result", "miss")];
    let picked = [("outcome", "picked")];
    let refused_ = [("outcome", "refused")];
    let wasm = [("kind", "wasm")];
    let found = [("result", "found")];
    let not_found = [("result", "not_found")];
    let changed = [("result", "changed")];
    type Expected<'a> = (&'a str, &'a [(&'a str, &'a str)], f64);
    let expected: [Expected<'_>; 16] = [
        ("edgeproxy_binding_lookups_total", &hit, 3.0),
        ("edgeproxy_binding_lookups_total", &miss, 3.0),
        ("edgeproxy_bindings", &[], 3.0),
        ("edgeproxy_decision_seconds_count", &[], 6.0),
        ("edgeproxy_backend_connect_seconds_count", &[], 6.0),
        ("edgeproxy_decisions_total", &picked, 3.0),
        ("edgeproxy_decisions_total", &refused_, 0.0),
        ("edgeproxy_policy_decisions_total", &[], 3.0),
        ("edgeproxy_policy_info", &wasm, 1.0),
        ("edgeproxy_policy_fallbacks_total", &[], 0.0),
        ("edgeproxy_geoip_lookups_total", &found, 5.0),
        ("edgeproxy_geoip_lookups_total", &not_found, 1.0),
        ("edgeproxy_routing_table_version", &[], 1.0),
        ("edgeproxy_routing_backends", &[], 2.0),
        ("edgeproxy_routing_reloads_total", &changed, 1.0),
        ("edgeproxy_connections_no_backend_total", &[], 0.0),
    ];
    for (name, labels, want) in expected {
        assert_eq!(value(&s, name, labels), want, "{name} {labels:?}");
    }

    // A refused client counts too.
    db.exec("UPDATE backends SET healthy = 0", []);
    p.wait_version_after(1).await;
    assert!(refused("127.0.0.3", p.addr).await);
    wait_until(|| p.host.telemetry.listeners()[0].active() == 0).await;
    let s = scrape(p.admin).await;
    assert_eq!(
        value(&s, "edgeproxy_decisions_total", &[("outcome", "refused")]),
        1.0
    );
    assert_eq!(
        value(&s, "edgeproxy_connections_no_backend_total", &[]),
        1.0
    );
    assert_eq!(
        value(&s, "edgeproxy_backend_healthy", &[("backend", "br")]),
        0.0
    );
    p.stop().await;
}
}

#[tokio::test]
async fn status_backends_and_bindings_describe_the_live_state() {
    let (br, _de, db, p) = br_de_pop().await;
    assert_eq!(served_by("127.0.0.2", p.addr).await, "br");
    assert_eq!(served_by("127.0.0.6", p.addr).await, "de");
    assert_eq!(served_by("127.0.0.3", p.addr).await, "br"); // CL: same region as br

    let status = admin_json(p.admin, "/status").await;
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(status["region"], "eu");
    assert_eq!(status["listeners"][0]["addr"], p.addr.to_string());
    assert_eq!(status["listeners"][0]["accepted"], 3);
    assert_eq!(status["policy"]["kind"], "wasm");
    assert_eq!(status["policy"]["name"], "geo-load (embedded)");
    assert_eq!(status["policy"]["hash"].as_str().unwrap().len(), 64);
    assert_eq!(status["routing"]["version"], 1);
    assert_eq!(status["routing"]["backends"], 2);
    assert!(status["routing"]["last_error"].is_null());
    assert_eq!(status["bindings"]["count"], 3);
    assert_eq!(status["geoip"]["lookups"]["found"], 3);

    let backends = admin_json(p.admin, "/backends").await;
    let backends = backends.as_array().unwrap();
    assert_eq!(backends.len(), 2);
    assert_eq!(backends[0]["id"], "br");
    assert_eq!(backends[0]["addr"], br.addr.to_string());
    assert_eq!(backends[0]["country"], "BR");
    assert_eq!(backends[0]["connect_attempts"], 2);
    assert_eq!(backends[0]["eligible"], true);
    assert_eq!(backends[1]["id"], "de");
    assert_eq!(backends[1]["connect_attempts"], 1);

    // Pages in client order.
    let page = admin_json(p.admin, "/bindings?offset=1&limit=1").await;
    assert_eq!(page["total"], 3);
    assert_eq!(page["bindings"].as_array().unwrap().len(), 1);
    assert_eq!(page["bindings"][0]["client"], "127.0.0.3");
    assert_eq!(page["bindings"][0]["backend"], "br");
    assert!(page["bindings"][0]["expires_in_seconds"].as_u64().unwrap() > 500);
    let (code, body) = http(p.admin, "GET", "/bindings?limit=lots", &[]).await;
    assert_eq!(code, 400);
    assert!(body.contains("limit"), "{body}");

    // Dropping a binding makes the next connection a fresh decision: a better backend
    // for the client that appeared meanwhile now wins.
    let v = p.version();
    let cl = Backend::start("cl").await;
    db.insert(&Row::new("cl", "sa", "CL", cl.addr));
    p.wait_version_after(v).await;
    assert_eq!(served_by("127.0.0.3", p.addr).await, "br"); // still bound
    let (code, body) = http(p.admin, "DELETE", "/bindings/127.0.0.3", &[]).await;
    assert_eq!(
        (code, body.contains("\"removed\": 1")),
        (200, true),
        "{body}"
    );
    assert_eq!(served_by("127.0.0.3", p.addr).await, "cl");
    let (code, _) = http(p.admin, "DELETE", "/bindings/127.0.0.99", &[]).await;
    assert_eq!(code, 404);
    let (code, body) = http(p.admin, "DELETE", "/bindings/not-an-ip", &[]).await;
    assert_eq!(code, 400, "{body}");

    let (code, _) = http(p.admin, "GET", "/nowhere", &[]).await;
    assert_eq!(code, 404);
    let (code, _) = http(p.admin, "POST", "/status", &[]).await;
    assert_eq!(code, 405);
    p.stop().await;
}

#[tokio::test]
async fn reload_endpoint_reports_routing_and_policy_outcomes() {
    let br = Backend::start("br").await;
    let db = Db::new(&[Row::new("br", "sa", "BR", br.addr)]);
    let p = Proxy::start(&db, "").await;
    let (code, body) = http(p.admin, "POST", "/reload", &[]).await;
    assert_eq!(code, 200, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["routing"], "unchanged");
    assert_eq!(report["policy"], "unchanged"); // the embedded policy has no file

    // A broken database: the reload fails, says why, and the last table keeps serving.
    std::fs::write(&db.path, b"this is not sqlite").unwrap();
    let (code, body) = http(p.admin, "POST", "/reload", &[]).await;
    assert_eq!(code, 500, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    let reason = report["routing"]["failed"].as_str().unwrap();
    assert!(reason.contains("routing.db"), "{reason}");
    assert_eq!(served_by("127.0.0.2", p.addr).await, "br");
    let status = admin_json(p.admin, "/status").await;
    assert!(
        status["routing"]["last_error"]["message"]
            .as_str()
            .unwrap()
            .contains("routing.db")
    );
    assert!(status["routing"]["reloads"]["failed"].as_u64().unwrap() >= 1);
    p.stop().await;
}

#[tokio::test]
async fn a_token_guards_every_endpoint() {
    let db = Db::new(&[]);
    let p = Proxy::start_with(
        &db,
        ProxyOptions {
            file: Layer::default().with("admin_token", "s3cret"),
            listener: None,
            listener_copies: 0,
            ..ProxyOptions::default()
        },
    )
    .await;
    for (method, path) in [
        ("GET", "/metrics"),
        ("GET", "/status"),
        ("GET", "/backends"),
        ("GET", "/bindings"),
        ("DELETE", "/bindings/127.0.0.2"),
        ("POST", "/reload"),
    ] {
        let (code, _) = http(p.admin, method, path, &[]).await;
        assert_eq!(code, 401, "{method} {path}");
        let (code, _) = http(p.admin, method, path, &["Authorization: Bearer wrong!"]).await;
        assert_eq!(code, 401, "{method} {path}");
    }
    let (code, _) = http(p.admin, "GET", "/status", &["Authorization: Bearer s3cret"]).await;
    assert_eq!(code, 200);
    p.stop().await;
}

on_both_data_paths! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reuseport_copies_of_a_listener_serve_and_count_as_one() {
    let b = Backend::start("b").await;
    let db = Db::new(&[Row::new("b", "sa", "BR", b.addr)]);
    let p = Proxy::start_with(
        &db,
        ProxyOptions {
            listener_copies: 2,
            ..Default::default()
        },
    )
    .await;
    for _ in 0..40 {
        assert_eq!(served_by("127.0.0.2", p.addr).await, "b");
    }
    wait_until(|| p.host.telemetry.listeners()[0].active() == 0).await;
    let status = admin_json(p.admin, "/status").await;
    let listeners = status["listeners"].as_array().unwrap();
    assert_eq!(listeners.len(), 1, "{listeners:?}");
    assert_eq!(listeners[0]["accepted"], 40);
    p.stop().await;
}
}

#[tokio::test]
async fn edgeproxys_metrics_server_is_a_listener_of_its_own_at_its_path() {
    let backend = Backend::start("a").await;
    let db = Db::new(&[Row::new("a", "eu", "DE", backend.addr)]);
    let p = Proxy::start(
        &db,
        "[metrics]\nlisten_addr = \"127.0.0.1:0\"\npath = \"/prom\"\n",
    )
    .await;
    let metrics = p.metrics.unwrap();
    let (code, body) = http(metrics, "GET", "/prom", &[]).await;
    assert_eq!(code, 200);
    assert!(body.contains("edgeproxy_build_info"), "{body}");
    // The metrics alone there; the admin API keeps the rest, with the metrics at the path.
    assert_eq!(http(metrics, "GET", "/status", &[]).await.0, 404);
    assert_eq!(http(p.admin, "GET", "/metrics", &[]).await.0, 404);
    assert_eq!(http(p.admin, "GET", "/prom", &[]).await.0, 200);
    assert_eq!(http(metrics, "POST", "/prom", &[]).await.0, 405);
    p.stop().await;

    let off = Proxy::start(&db, "[metrics]\nenabled = false\n").await;
    assert_eq!(http(off.admin, "GET", "/metrics", &[]).await.0, 404);
    assert_eq!(http(off.admin, "GET", "/status", &[]).await.0, 200);
    off.stop().await;
}

/// The status page (`GET /`) in a real browser (headless Chromium over WebDriver): a
/// static page with nothing from elsewhere, whose script reads the API with the token given
/// in the address or its form, and, left open, shows a backend going down in the table and
/// coming back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_a_backend_going_down_and_coming_back() {
    let backend = Backend::start("b1").await;
    let db = Db::new(&[Row::new("b1", "sa", "BR", backend.addr)]);
    let p = Proxy::start(&db, "admin_token = \"s3cret-token\"").await;
    let (code, html) = http(p.admin, "GET", "/", &[]).await;
    assert_eq!(code, 200);
    for outside in ["src=\"http", "href=\"http", "url(http", "@import"] {
        assert!(!html.contains(outside), "{outside}");
    }
    assert_eq!(http(p.admin, "GET", "/status", &[]).await.0, 401);

    // One page, left open: it redraws by itself as the table changes.
    let page = Browser::open(&format!("http://{}/#token=s3cret-token", p.admin)).await;
    let state = "return document.querySelector('[data-backend=b1]')?.dataset.state ?? null";
    let text = page.wait_for(state, "up".into()).await;
    assert!(text.contains("POP eu"), "{text}");
    // The token left the address once read.
    assert_eq!(page.eval("return location.hash").await, "");
    db.exec("UPDATE backends SET healthy = 0 WHERE id = 'b1'", []);
    let text = page.wait_for(state, "table-down".into()).await;
    // Said in words and a symbol, not by colour alone.
    assert!(text.contains("✖ down (table)"), "{text}");
    db.exec("UPDATE backends SET healthy = 1 WHERE id = 'b1'", []);
    page.wait_for(state, "up".into()).await;
    drop(page);

    // Without the token the page says what it needs, and takes it in its form.
    let page = Browser::open(&format!("http://{}/", p.admin)).await;
    let login = "return document.getElementById('login').hidden";
    page.wait_for(login, false.into()).await;
    page.eval(
        "document.getElementById('token').value = 's3cret-token'; \
         document.getElementById('login').requestSubmit()",
    )
    .await;
    page.wait_for(state, "up".into()).await;
}
