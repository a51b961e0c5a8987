//! Self-registration through the API: register, heartbeat, expiry and deregistration,
//! seen by the proxy's routing; bad requests refused with nothing written.

use crate::support::*;

/// Register, beat, fall silent, beat again, deregister: each step reaches routing, and
/// heartbeats alone never change the table's version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_heartbeat_expire_and_deregister_reach_routing() {
    let fixed = Backend::start("fixed").await;
    let joiner = Backend::start("joiner").await;
    let db = Db::new(&[Row::new("z-fixed", "eu", "DE", fixed.addr)]);
    let p = Proxy::start(&db, "native_policy = true\nbinding_ttl_secs = 0\n[api]\nenabled = true\nheartbeat_ttl_secs = 1\nallowed_networks = \"127.0.0.0/8\"\n").await;
    let api = p.api.unwrap();
    assert_eq!(served_by("127.0.0.1", p.addr).await, "fixed");

    let (code, body) = register(api, &registration("a-joiner", "app", joiner.addr)).await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"created\""), "{body}");
    let (entry, _) = wait_backend(p.admin, "a-joiner", |b| b["eligible"] == true).await;
    // No country given, none in GeoIP for 127.0.0.1: the region's.
    assert_eq!(entry["country"], "DE");
    assert_eq!(
        (
            entry["weight"].as_u64(),
            entry["soft_limit"].as_u64(),
            entry["hard_limit"].as_u64()
        ),
        (Some(2), Some(100), Some(150))
    );
    assert_eq!(served_by("127.0.0.1", p.addr).await, "joiner");

    // Beats keep it in; they write nothing. Registering the same row again writes nothing.
    let version = p.version();
    for _ in 0..5 {
        let (code, body) = send(api, "POST", "/api/v1/heartbeat/a-joiner", &[], "").await;
        assert_eq!(code, 200, "{body}");
    }
    let (code, body) = register(api, &registration("a-joiner", "app", joiner.addr)).await;
    assert_eq!(code, 200);
    assert!(body.contains("\"unchanged\""), "{body}");
    let (entry, _) = wait_backend(p.admin, "a-joiner", |_| true).await;
    assert!(
        entry["heartbeat_age_secs"].as_f64().unwrap() < 1.0,
        "{entry:#}"
    );
    assert_eq!(p.version(), version, "heartbeats changed the table");

    // Silent for the TTL: out of rotation (in the table, so in every POP).
    let (entry, took) = wait_backend(p.admin, "a-joiner", |b| b["healthy"] == false).await;
    assert!(took.as_secs_f64() < 3.0, "expired after {took:?}");
    assert!(entry["heartbeat_age_secs"].as_f64().unwrap() >= 1.0);
    assert_eq!(served_by("127.0.0.1", p.addr).await, "fixed");
    let listed = send(api, "GET", "/api/v1/backends/a-joiner", &[], "")
        .await
        .1;
    assert!(listed.contains("\"expired\": true"), "{listed}");

    // A beat brings it back.
    assert_eq!(
        send(api, "POST", "/api/v1/heartbeat/a-joiner", &[], "")
            .await
            .0,
        200
    );
    wait_backend(p.admin, "a-joiner", |b| b["healthy"] == true).await;
    assert_eq!(served_by("127.0.0.1", p.addr).await, "joiner");

    let (code, list) = send(api, "GET", "/api/v1/backends", &[], "").await;
    assert_eq!(code, 200);
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list["total"], 1, "only registered backends: {list:#}");

    assert_eq!(
        send(api, "DELETE", "/api/v1/backends/a-joiner", &[], "")
            .await
            .0,
        200
    );
    wait_backend(p.admin, "a-joiner", |b| b.is_null()).await;
    assert_eq!(served_by("127.0.0.1", p.addr).await, "fixed");
    assert_eq!(
        send(api, "POST", "/api/v1/heartbeat/a-joiner", &[], "")
            .await
            .0,
        404
    );
    // Operators' rows are not the API's to delete.
    assert_eq!(
        send(api, "DELETE", "/api/v1/backends/z-fixed", &[], "")
            .await
            .0,
        404
    );
    let health = send(api, "GET", "/health", &[], "").await;
    assert_eq!(health.0, 200);
    assert!(health.1.contains("\"status\": \"ok\""));
    p.stop().await;
}

/// Each bad registration gets a 4xx naming its problem, and the table is not written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_registrations_are_refused_with_nothing_written() {
    let b = Backend::start("b").await;
    let db = Db::new(&[Row::new("taken", "eu", "DE", b.addr)]);
    let p = Proxy::start(
        &db,
        "[api]\nenabled = true\ntoken = \"s3cret\"\nallowed_networks = \"127.0.0.0/8\"\n",
    )
    .await;
    let api = p.api.unwrap();
    let auth = ["Authorization: Bearer s3cret"];
    let version = p.version();
    let big = format!("{{\"id\": \"{}\"}}", "x".repeat(20_000));
    let cases: Vec<(String, u16, &str)> = vec![
        ("{\"id\": ".into(), 400, "invalid registration"),
        (r#"{"id": "n", "app": "app", "region": "eu", "ip": "127.0.0.1"}"#.into(), 400, "missing field `port`"),
        (r#"{"id": "n", "app": "app", "region": "eu", "ip": "127.0.0.1", "port": 70000}"#.into(), 422, "port 70000 is out of range"),
        (r#"{"id": "n", "app": "app", "region": "eu", "ip": "not-an-ip", "port": 80}"#.into(), 422, "not an IP address"),
        (r#"{"id": "n", "app": "app", "region": "eu", "ip": "127.0.0.1", "port": 80, "wieght": 3}"#.into(), 400, "unknown field `wieght`"),
        (r#"{"id": "n", "app": "app", "region": "eu", "ip": "127.0.0.1", "port": 80, "country": "Germany"}"#.into(), 422, "country"),
        (r#"{"id": "taken", "app": "other", "region": "eu", "ip": "127.0.0.1", "port": 80}"#.into(), 409, "an operator's row"),
        (r#"{"id": " ", "app": "app", "region": "eu", "ip": "127.0.0.1", "port": 80}"#.into(), 422, "id must not be empty"),
        (r#"{"id": "n", "app": "app", "region": "eu", "ip": "127.0.0.1", "port": 0}"#.into(), 422, "port 0"),
        (big, 413, "over 16384 bytes"),
    ];
    for (body, code, needle) in &cases {
        let (got, answer) = send(api, "POST", "/api/v1/register", &auth, body).await;
        assert_eq!(got, *code, "{body:.80}: {answer}");
        assert!(answer.contains(needle), "{body:.80}: {answer}");
    }
    // Without the token: refused, even a valid registration.
    let valid = registration("n", "app", b.addr);
    assert_eq!(
        send(api, "POST", "/api/v1/register", &[], &valid).await.0,
        401
    );
    assert_eq!(
        send(
            api,
            "POST",
            "/api/v1/register",
            &["Authorization: Bearer wrong"],
            &valid
        )
        .await
        .0,
        401
    );

    let rows = edgeproxy::adapters::outbound::sqlite_editor::RoutingEditor::open(&db.path)
        .unwrap()
        .list(None, true)
        .unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].app, "app");
    assert_eq!(p.version(), version);
    // The valid one, with the token, goes through.
    assert_eq!(
        send(api, "POST", "/api/v1/register", &auth, &valid).await.0,
        200
    );
    p.stop().await;
}

/// The API's trust boundary: a token holder cannot take an operator's row (register over
/// it, adopt it by heartbeat, delete it), point a backend at the POP itself or at
/// addresses the operator did not allow, use ids its own URLs cannot carry, or grow the
/// table past the caps; a registration silent for long is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_changes_only_its_own_rows_and_only_sends_traffic_where_allowed() {
    let b = Backend::start("b").await;
    let mut op = Row::new("op-1", "eu", "DE", b.addr);
    op.healthy = false;
    let db = Db::new(&[op]);
    let p = Proxy::start(
        &db,
        "[api]\nenabled = true\nheartbeat_ttl_secs = 1\nremove_after_ttls = 2\n\
         allowed_networks = \"127.0.0.0/8\"\nmax_registrations = 3\nmax_per_app = 2\n",
    )
    .await;
    let api = p.api.unwrap();
    let row = |id: &str| {
        edgeproxy::adapters::outbound::sqlite_editor::RoutingEditor::open(&db.path)
            .unwrap()
            .get(id)
            .unwrap()
    };
    let before = row("op-1").unwrap();

    // The operator's drained row, re-registered to put it back in rotation: refused,
    // untouched.
    let at = |id: &str, addr: std::net::SocketAddr| registration(id, "app", addr);
    let (code, body) = register(api, &at("op-1", b.addr)).await;
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("an operator's row"), "{body}");
    let (code, body) = send(api, "POST", "/api/v1/heartbeat/op-1", &[], "").await;
    assert_eq!(code, 409, "{body}");
    let (code, _) = send(api, "DELETE", "/api/v1/backends/op-1", &[], "").await;
    assert_eq!(code, 404);
    assert_eq!(row("op-1").unwrap(), before);

    // The POP's own listeners, and what the operator did not allow.
    for own in [p.addr, p.admin, api] {
        let (code, body) = register(api, &at("loop", own)).await;
        assert_eq!(code, 422, "{own}: {body}");
        assert!(body.contains("own listener"), "{own}: {body}");
    }
    for (body, needle) in [
        (
            at("meta", "169.254.169.254:80".parse().unwrap()),
            "outside the networks",
        ),
        (at("api köln 1", b.addr), "ids are letters"),
        (
            serde_json::json!({"id": "heavy", "app": "app", "region": "eu",
                "ip": "127.0.0.1", "port": b.addr.port(), "weight": 1_000_000})
            .to_string(),
            "weight 1000000 is over",
        ),
    ] {
        let (code, answer) = register(api, &body).await;
        assert_eq!(code, 422, "{body}: {answer}");
        assert!(answer.contains(needle), "{body}: {answer}");
    }
    assert!(row("loop").is_none() && row("meta").is_none() && row("heavy").is_none());

    // Caps: two per app, three in all.
    for id in ["r1", "r2"] {
        assert_eq!(register(api, &at(id, b.addr)).await.0, 200);
    }
    let (code, body) = register(api, &at("r3", b.addr)).await;
    assert_eq!(code, 429, "{body}");
    assert!(body.contains("api_max_per_app"), "{body}");
    let other = registration("o1", "other", b.addr);
    assert_eq!(register(api, &other).await.0, 200);
    let (code, body) = register(api, &registration("o2", "other", b.addr)).await;
    assert_eq!(code, 429, "{body}");
    assert!(body.contains("api_max_registrations"), "{body}");
    // One already registered may still change.
    assert_eq!(
        register(api, &registration("o1", "other", b.addr)).await.0,
        200
    );
    let health = send(api, "GET", "/health", &[], "").await.1;
    assert!(health.contains("\"registered_backends\": 3"), "{health}");

    // Silent: out of rotation after the TTL, removed (deleted everywhere) after two.
    let silent = tokio::time::Instant::now();
    wait_until(|| row("r1").unwrap().deleted).await;
    assert!(
        silent.elapsed().as_secs_f64() >= 1.0,
        "removed after {:?}",
        silent.elapsed()
    );
    wait_until(|| ["r2", "o1"].iter().all(|id| row(id).unwrap().deleted)).await;
    let metrics = send(p.admin, "GET", "/metrics", &[], "").await.1;
    assert!(
        metrics.contains("edgeproxy_registrations_total{event=\"removed\"} 3"),
        "{metrics}"
    );
    // The operator's row is still there, still drained.
    assert_eq!(row("op-1").unwrap(), before);
    // An operator takes over a registered row: its expiry writes nothing, and its next
    // heartbeat, though the row is healthy and fresh, is told it is no longer the API's.
    assert_eq!(register(api, &at("t1", b.addr)).await.0, 200);
    assert_eq!(
        send(api, "POST", "/api/v1/heartbeat/t1", &[], "").await.0,
        200
    );
    assert_eq!(
        send(api, "POST", "/api/v1/heartbeat/t1", &[], "").await.0,
        200
    );
    let seen = p.host.routing.source_changes();
    db.exec("DELETE FROM _edgeproxy_owners WHERE id = 't1'", []);
    let routing = p.host.routing.clone();
    wait_until(|| routing.source_changes() > seen).await;
    let (code, body) = send(api, "POST", "/api/v1/heartbeat/t1", &[], "").await;
    assert_eq!(code, 409, "{body}");
    let t1 = row("t1").unwrap();
    assert!(t1.healthy && !t1.deleted && t1.owner.is_none(), "{t1:?}");
    // A row at this POP's own listener that arrives another way (registered through
    // another POP, replicated; or written by mistake) is skipped, not routed to.
    db.insert(&Row::new("loop", "eu", "DE", p.addr));
    let routing = p.host.routing.clone();
    wait_until(|| {
        routing
            .skipped()
            .iter()
            .any(|s| s.id == "loop" && s.reason.contains("own listener"))
    })
    .await;
    assert!(
        p.host
            .routing
            .current()
            .backends()
            .iter()
            .all(|b| b.backend.id.as_str() != "loop")
    );
    p.stop().await;
}

/// Registrations at once never pass the caps between the check and the write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_registrations_hold_the_cap() {
    let b = Backend::start("b").await;
    let db = Db::new(&[]);
    let p = Proxy::start(
        &db,
        "[api]\nenabled = true\nallowed_networks = \"127.0.0.0/8\"\nmax_registrations = 3\n",
    )
    .await;
    let api = p.api.unwrap();
    // Twelve: under the listener's 16 connections per client.
    let all: Vec<_> = (0..12)
        .map(|i| {
            let body = registration(&format!("c{i}"), "app", b.addr);
            tokio::spawn(async move { register(api, &body).await.0 })
        })
        .collect();
    let mut codes = Vec::new();
    for one in all {
        codes.push(one.await.unwrap());
    }
    assert_eq!(codes.iter().filter(|c| **c == 200).count(), 3, "{codes:?}");
    assert!(codes.iter().all(|c| *c == 200 || *c == 429), "{codes:?}");
    p.stop().await;
}
