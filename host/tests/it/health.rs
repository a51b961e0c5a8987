//! This POP's own view of its backends: active checks, passive ejection and the panic
//! rule, over real sockets, seen through `/backends` and through where clients go.

use std::time::Duration;

use crate::support::*;

fn up(b: &serde_json::Value) -> bool {
    b["up_here"] == true
}

/// Echo backends "a" and "b" (eu, DE) behind a proxy configured by `toml`.
async fn two_backends(toml: &str) -> (Backend, Backend, Db, Proxy) {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let db = Db::new(&[
        Row::new("a", "eu", "DE", a.addr),
        Row::new("b", "eu", "DE", b.addr),
    ]);
    let p = Proxy::start(&db, toml).await;
    (a, b, db, p)
}

/// Checks every 100 ms, two to fall and two to rise: a backend that stops listening is
/// out within about fall x interval and back within about rise x interval (a second of
/// slack for a loaded machine), and clients go elsewhere meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_stops_listening_is_out_and_back_by_the_counts() {
    out_and_back("native_policy = true").await;
}

/// The same with the WebAssembly policy deciding: the backend down here is left out of
/// the candidates it is offered (not re-sent in its table), and it never faults.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wasm_policy_routes_around_a_backend_down_here() {
    out_and_back("native_policy = false").await;
}

async fn out_and_back(policy: &str) {
    let (mut a, _b, _db, p) = two_backends(&format!(
        "{policy}\nbinding_ttl_secs = 0\n[ejection]\nenabled = false\n\
         [health_check]\nenabled = true\ninterval_secs = 0.1\ntimeout_secs = 0.5\nrise = 2\nfall = 2\n",
    ))
    .await;
    wait_backend(p.admin, "a", |b| b["check"]["state"] == "up").await;
    assert_eq!(
        served_by("127.0.0.1", p.addr).await,
        "a",
        "a first (lowest id)"
    );

    a.stop_listening().await;
    let (entry, took) = wait_backend(p.admin, "a", |b| !up(b)).await;
    assert_eq!(entry["check"]["state"], "down");
    assert_eq!(entry["healthy"], true, "the table is not touched");
    assert!(
        entry["check"]["last_result"]
            .as_str()
            .unwrap()
            .contains("refused"),
        "{entry:#}"
    );
    assert!(
        took < Duration::from_millis(2 * 110 + 1000),
        "out after {took:?}"
    );
    let attempts = entry["connect_attempts"].as_u64().unwrap();
    for _ in 0..5 {
        assert_eq!(served_by("127.0.0.1", p.addr).await, "b");
    }
    let (entry, _) = wait_backend(p.admin, "a", |_| true).await;
    assert_eq!(
        entry["connect_attempts"].as_u64().unwrap(),
        attempts,
        "no client was sent to a"
    );

    let _a = Backend::start_at("a", a.addr).await;
    let (_, took) = wait_backend(p.admin, "a", up).await;
    assert!(
        took < Duration::from_millis(2 * 110 + 1000),
        "back after {took:?}"
    );
    assert_eq!(served_by("127.0.0.1", p.addr).await, "a");
    // The checks' round trip is the RTT policies see, with no client traffic needed.
    let (entry, _) = wait_backend(p.admin, "b", |_| true).await;
    assert!(entry["rtt_us"].as_u64().is_some(), "{entry:#}");
    if let Some(wasm) = &p.host.wasm_policy {
        assert_eq!(wasm.faults.total(), 0, "the policy faulted");
    }
    p.stop().await;
}

/// An app's own check (send, expect a prefix) overrides the default connect check: a
/// backend that accepts but never answers fails it; one that answers passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expect_check_fails_a_backend_that_accepts_but_never_answers() {
    let (silent, _held) = silent_backend().await;
    let talker = Backend::start("hello").await;
    let db = Db::new(&[
        Row::new("a-silent", "eu", "DE", silent),
        Row::new("b-talker", "eu", "DE", talker.addr),
    ]);
    let p = Proxy::start(
        &db,
        "native_policy = true\n[health_check]\nenabled = true\ninterval_secs = 0.1\ntimeout_secs = 0.2\n\
         [health_check.app.app]\nexpect = \"hello\\n\"\nfall = 1\n",
    )
    .await;
    let (entry, _) = wait_backend(p.admin, "a-silent", |b| !up(b)).await;
    assert!(
        entry["check"]["last_result"]
            .as_str()
            .unwrap()
            .contains("no answer"),
        "{entry:#}"
    );
    wait_backend(p.admin, "b-talker", |b| b["check"]["state"] == "up").await;
    assert_eq!(served_by("127.0.0.1", p.addr).await, "hello");
    p.stop().await;
}

/// Without active checks: consecutive failed connects eject a backend (clients stop
/// paying a failed connect for it), and the backoff's end returns it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_connect_failures_eject_until_the_backoff_ends() {
    let dead = refusing_addr().await;
    let b = Backend::start("b").await;
    let db = Db::new(&[
        Row::new("a-dead", "eu", "DE", dead),
        Row::new("b", "eu", "DE", b.addr),
    ]);
    let p = Proxy::start(
        &db,
        "native_policy = true\nbinding_ttl_secs = 0\n\
         [ejection]\nconsecutive_failures = 2\nbase_secs = 2\n",
    )
    .await;
    // Each client fails over from a-dead to b, until a-dead is ejected.
    for _ in 0..2 {
        assert_eq!(served_by("127.0.0.1", p.addr).await, "b");
    }
    // The ejection is recorded, then the table republished without it: both seen.
    let (entry, _) = wait_backend(p.admin, "a-dead", |b| !b["ejection"].is_null() && !up(b)).await;
    assert!(
        entry["ejection"]["reason"]
            .as_str()
            .unwrap()
            .contains("2 connects failed"),
        "{entry:#}"
    );
    assert!(!up(&entry));
    let attempts = entry["connect_attempts"].as_u64().unwrap();
    assert_eq!(served_by("127.0.0.1", p.addr).await, "b");
    let (entry, _) = wait_backend(p.admin, "a-dead", |_| true).await;
    assert_eq!(
        entry["connect_attempts"].as_u64().unwrap(),
        attempts,
        "ejected: not tried"
    );

    let (entry, _) = wait_backend(p.admin, "a-dead", up).await;
    assert!(entry["ejection"].is_null());
    assert_eq!(entry["ejections_in_row"], 1);
    let metrics = http(p.admin, "GET", "/metrics", &[]).await.1;
    assert!(
        metrics.contains("edgeproxy_ejections_total{outcome=\"ejected\"} 1"),
        "{metrics}"
    );
    p.stop().await;
}

/// Every check fails (a check path broken from this POP while the data path works):
/// rather than route to nothing, the app is in panic and routed by the table alone.
/// And passive ejection never takes more than `ejection_max_percent` of an app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_panic_rule_keeps_routing_when_every_backend_fails() {
    let (_a, _b, _db, p) = two_backends(
        "native_policy = true\n[health_check]\nenabled = true\ninterval_secs = 0.1\n\
         expect = \"never this\"\nfall = 1\n",
    )
    .await;
    for id in ["a", "b"] {
        let (entry, _) = wait_backend(p.admin, id, |b| {
            b["check"]["state"] == "down" && b["app_in_panic"] == true
        })
        .await;
        assert!(
            up(&entry),
            "in panic, local verdicts are set aside: {entry:#}"
        );
    }
    assert_eq!(served_by("127.0.0.1", p.addr).await, "a");
    let metrics = http(p.admin, "GET", "/metrics", &[]).await.1;
    assert!(
        metrics.contains("edgeproxy_app_health_panic{app=\"app\"} 1"),
        "{metrics}"
    );
    p.stop().await;

    let (d1, d2) = (refusing_addr().await, refusing_addr().await);
    let db = Db::new(&[
        Row::new("d1", "eu", "DE", d1),
        Row::new("d2", "eu", "DE", d2),
    ]);
    let p = Proxy::start(
        &db,
        "native_policy = true\n[ejection]\nconsecutive_failures = 1\n",
    )
    .await;
    for _ in 0..3 {
        assert!(refused("127.0.0.1", p.addr).await);
    }
    // Both failed; one of two (50%) is ejected, the other stays to be tried.
    let metrics = loop {
        let m = http(p.admin, "GET", "/metrics", &[]).await.1;
        if m.contains("edgeproxy_ejections_total{outcome=\"capped\"}")
            && !m.contains("edgeproxy_ejections_total{outcome=\"capped\"} 0")
        {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(
        metrics.contains("edgeproxy_ejections_total{outcome=\"ejected\"} 1"),
        "{metrics}"
    );
    let all = admin_json(p.admin, "/backends").await;
    let ups = all.as_array().unwrap().iter().filter(|b| up(b)).count();
    assert_eq!(ups, 1, "{all:#}");
    p.stop().await;
}
