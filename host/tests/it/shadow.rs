//! A shadow policy on live traffic: real components (the embedded geo-load deciding, an
//! example or the chaos fixture in the shadow), real connections.

use edgeproxy::config::{Layer, ListenerConfig};

use crate::support::*;

/// The shadow (least-connections) is asked about every decision the live policy
/// (geo-load) makes. With nothing open between connections, least connections picks the
/// first candidate by id, so the two agree exactly on the connections geo-load sent
/// there; the counts, the pick tables and the disagreements say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shadow_report_counts_what_both_policies_picked() {
    let backends = [
        Backend::start("a-us").await,
        Backend::start("b-eu").await,
        Backend::start("c-sa").await,
    ];
    let db = Db::new(&[
        Row::new("a-us", "us", "US", backends[0].addr),
        Row::new("b-eu", "eu", "DE", backends[1].addr),
        Row::new("c-sa", "sa", "BR", backends[2].addr),
    ]);
    let shadow = policy_component("examples/policies/least-connections");
    let p = Proxy::start(
        &db,
        &format!(
            "binding_ttl_secs = 0\nshadow_policy_path = {:?}\ndecision_log_sample_percent = 100\n",
            shadow.display().to_string()
        ),
    )
    .await;
    // BR, DE, KE (region us by fallback), JP (ap: no backend there), three rounds.
    let mut served = Vec::new();
    for _ in 0..3 {
        for client in ["127.0.0.2", "127.0.0.6", "127.0.0.4", "127.0.0.5"] {
            served.push(served_by(client, p.addr).await);
            wait_until(|| p.active() == 0).await;
        }
    }
    let first_by_id = "a-us";
    let agreed = served.iter().filter(|s| *s == first_by_id).count() as u64;
    assert!(
        agreed > 0 && agreed < 12,
        "the policies must differ somewhere: {served:?}"
    );
    // The shadow is asked off the connections' path: its report catches up.
    let r = shadow_report(p.admin, |r| r["compared"] == 12).await;
    assert_eq!(r["agreed"], agreed, "{r:#}");
    assert_eq!(r["disagreed"], 12 - agreed);
    assert_eq!(r["faults"], 0);
    for pair in r["by_backend"].as_array().unwrap() {
        assert_eq!(pair["shadow"], first_by_id, "{r:#}");
        let live = pair["live"].as_str().unwrap();
        let n = served.iter().filter(|s| *s == live).count() as u64;
        assert_eq!(pair["decisions"], n, "{live}: {r:#}");
    }
    let br = r["recent_disagreements"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["client_country"] == "BR")
        .expect("a BR client disagreement");
    assert_eq!(
        (br["live"].as_str(), br["shadow"].as_str()),
        (Some("c-sa"), Some(first_by_id))
    );
    assert_eq!(br["client_region"], "sa");
    assert_eq!(br["candidates"].as_array().unwrap().len(), 3);
    let metrics = http(p.admin, "GET", "/metrics", &[]).await.1;
    assert!(
        metrics.contains(&format!(
            "edgeproxy_shadow_decisions_total{{result=\"agree\"}} {agreed}"
        )),
        "{metrics}"
    );
    // The operator's view of the same report.
    let admin = p.admin.to_string();
    let text = edgeproxy_ok(&["--admin-addr", &admin, "policy", "shadow", "status"]).await;
    assert!(text.contains(&format!("agreed {agreed}")), "{text}");
    assert!(
        text.contains("c-sa") && text.contains("recent disagreements"),
        "{text}"
    );

    // Replayed offline over the recorded decisions, the same component tells the same.
    let (code, recorded) = http(p.admin, "GET", "/decisions", &[]).await;
    assert_eq!(code, 200);
    assert_eq!(recorded.lines().count(), 12, "{recorded}");
    assert!(
        recorded.contains("\"client\":\"127.0.0.0\""),
        "clients are truncated: {recorded}"
    );
    let file = db.dir.path().join("decisions.jsonl");
    std::fs::write(&file, recorded).unwrap();
    let out = replay(&shadow, &file, &db.path).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let replayed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(replayed["decisions"], 12, "{replayed:#}");
    for key in ["compared", "agreed", "disagreed", "by_backend", "by_region"] {
        assert_eq!(replayed[key], r[key], "{key}: {replayed:#}");
    }
    // A file that is not recorded decisions is named, with the line.
    let bad = db.dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"at\": 1}\n").unwrap();
    let out = replay(&shadow, &bad, &db.path).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("bad.jsonl: line 1: not a recorded decision"),
        "{stderr}"
    );
    p.stop().await;
}

/// `edgeproxy policy replay --json` of `policy` over `decisions` on `db`, off the runtime.
async fn replay(
    policy: &std::path::Path,
    decisions: &std::path::Path,
    db: &std::path::Path,
) -> std::process::Output {
    let (policy, decisions, db) = (policy.as_os_str(), decisions.as_os_str(), db.as_os_str());
    edgeproxy_cli(&[
        "policy".as_ref(),
        "replay".as_ref(),
        "--json".as_ref(),
        "--policy".as_ref(),
        policy,
        "--decisions".as_ref(),
        decisions,
        "--db".as_ref(),
        db,
    ])
    .await
}

/// A shadow that traps on every decision: each one is counted as its fault, and every
/// connection is routed by the live policy, which records no fault at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_faulting_shadow_never_touches_traffic() {
    let b = Backend::start("b").await;
    let db = Db::new(&[Row {
        app: "trap",
        ..Row::new("b", "eu", "DE", b.addr)
    }]);
    let shadow = chaos_component();
    let file = Layer::from_toml(&format!(
        "binding_ttl_secs = 0\nshadow_policy_path = {:?}\n",
        shadow.display().to_string()
    ))
    .unwrap();
    let p = Proxy::start_with(
        &db,
        ProxyOptions {
            file,
            listener: Some(ListenerConfig {
                app: Some("trap".into()),
                ..ListenerConfig::plain("127.0.0.1:0".parse().unwrap())
            }),
            ..ProxyOptions::default()
        },
    )
    .await;
    // Its breaker suspends it after ten faults in a row (each rebuilds its instance).
    let n = 3 * edgeproxy::domain::breaker::TRIP as u64;
    for _ in 0..n {
        assert_eq!(served_by("127.0.0.6", p.addr).await, "b");
    }
    let r = shadow_report(p.admin, |r| {
        r["faults"].as_u64().unwrap() + r["suspended"].as_u64().unwrap() == n
    })
    .await;
    let faults = r["faults"].as_u64().unwrap();
    assert!(
        faults >= edgeproxy::domain::breaker::TRIP as u64 && faults < n,
        "{r:#}"
    );
    assert_eq!(
        (r["compared"].as_u64(), r["dropped"].as_u64()),
        (Some(0), Some(0)),
        "{r:#}"
    );
    assert_eq!(r["policy"]["faults"]["traps"], faults);
    let status = admin_json(p.admin, "/status").await;
    assert_eq!(status["policy"]["faults"]["traps"], 0, "{status:#}");
    assert_eq!(status["policy"]["suspensions"], 0);
    p.stop().await;
}

/// Promotion makes the shadow (the chaos fixture: last candidate) serve instead of
/// geo-load, rollback brings geo-load back, and clients connecting all along see no
/// failure. Bindings made before the promotion are dropped when asked, so the bound
/// client moves at once; a rollback with nothing to roll back to is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promote_and_rollback_under_load_lose_no_connection() {
    let a = Backend::start("a-eu").await;
    let z = Backend::start("z-eu").await;
    let db = Db::new(&[
        Row::new("a-eu", "eu", "DE", a.addr),
        Row::new("z-eu", "eu", "DE", z.addr),
    ]);
    let shadow = chaos_component();
    let p = Proxy::start(
        &db,
        &format!("shadow_policy_path = {:?}\n", shadow.display().to_string()),
    )
    .await;
    assert_eq!(served_by("127.0.0.6", p.addr).await, "a-eu");
    let stop = tokio_util::sync::CancellationToken::new();
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (addr, stop) = (p.addr, stop.clone());
            tokio::spawn(async move {
                let mut served = 0u32;
                // Another client than the bound one checked below, whose binding is
                // then the promotion's alone.
                while !stop.is_cancelled() {
                    served_by("127.0.0.7", addr).await;
                    served += 1;
                }
                served
            })
        })
        .collect();

    let admin = p.admin.to_string();
    let promoted: serde_json::Value = serde_json::from_str(
        &edgeproxy_ok(&[
            "--admin-addr",
            &admin,
            "policy",
            "promote",
            "--drop-bindings",
            "--json",
        ])
        .await,
    )
    .unwrap();
    assert!(
        promoted["live"].as_str().unwrap().contains("chaos"),
        "{promoted}"
    );
    assert!(
        promoted["bindings_dropped"].as_u64().unwrap() >= 1,
        "{promoted}"
    );
    assert_eq!(served_by("127.0.0.6", p.addr).await, "z-eu");

    let (code, body) = http(p.admin, "POST", "/policy/rollback?drop_bindings=true", &[]).await;
    assert_eq!(code, 200, "{body}");
    stop.cancel();
    for task in load {
        assert!(task.await.expect("a client failed") > 0);
    }
    wait_until(|| p.active() == 0).await;
    assert_eq!(served_by("127.0.0.6", p.addr).await, "a-eu");
    let (code, body) = http(p.admin, "POST", "/policy/promote?drop=all", &[]).await;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("drop_bindings=true"), "{body}");
    let (code, body) = http(p.admin, "POST", "/policy/rollback", &[]).await;
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("nothing to roll back"), "{body}");
    let metrics = http(p.admin, "GET", "/metrics", &[]).await.1;
    assert!(
        metrics.contains("edgeproxy_connections_no_backend_total 0"),
        "{metrics}"
    );
    let status = admin_json(p.admin, "/status").await;
    assert_eq!(status["policy"]["faults"]["traps"], 0, "{status:#}");
    p.stop().await;
}

/// `/policy/shadow` once `cond` holds (the shadow is asked on its own thread).
async fn shadow_report(
    admin: std::net::SocketAddr,
    cond: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let r = admin_json(admin, "/policy/shadow").await;
        if cond(&r) {
            return r;
        }
        assert!(tokio::time::Instant::now() < deadline, "{r:#}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
