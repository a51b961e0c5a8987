//! Policies that import WASI load and route, and get nothing from it. Built by plain cargo
//! for `wasm32-wasip2` (std makes a component importing WASI 0.2) and for `wasm32-wasip1`
//! (a core module the proxy wraps with the preview 1 adapter, which is what
//! `cargo component build` makes by default): a file, the environment, a socket to a port that
//! listens, and a name lookup are all refused inside the guest, and waiting is a fault
//! the proxy routes around.

use crate::support::*;

fn probe() -> std::path::PathBuf {
    cargo_built("host/tests/fixtures/wasi-probe", "wasm32-wasip2")
}

/// The probe picks `denied-eu` only when every attempt failed in the guest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wasi_policy_gets_no_files_environment_sockets_or_names_and_routes() {
    for target in ["wasm32-wasip2", "wasm32-wasip1"] {
        refused_everything(&cargo_built("host/tests/fixtures/wasi-probe", target)).await;
    }
}

async fn refused_everything(policy: &std::path::Path) {
    let denied = Backend::start("denied-eu").await;
    let granted = Backend::start("granted-eu").await;
    // A port that accepts: a sandbox that let the guest connect would succeed here.
    let listening = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listening.local_addr().unwrap().port();
    let target = format!("listening-{port}");
    let db = Db::new(&[
        Row::new("denied-eu", "eu", "DE", denied.addr),
        Row::new("granted-eu", "eu", "DE", granted.addr),
        Row {
            healthy: false,
            ..Row::new(&target, "eu", "DE", listening.local_addr().unwrap())
        },
    ]);
    let p = Proxy::start(
        &db,
        &format!("policy_path = {:?}\n", policy.display().to_string()),
    )
    .await;
    for source in ["127.0.0.2", "127.0.0.3", "127.0.0.4"] {
        assert_eq!(served_by(source, p.addr).await, "denied-eu");
    }
    assert_eq!(granted.accepted(), 0);
    let status = admin_json(p.admin, "/status").await;
    assert_eq!(status["policy"]["decisions"], 3, "{status:#}");
    let faults = &status["policy"]["faults"];
    assert_eq!(faults["traps"], 0, "{status:#}");
    assert_eq!(faults["timeouts"], 0, "{status:#}");
    p.stop().await;
}

/// A policy that sleeps faults, and the connection is routed by the native scorer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wasi_policy_that_waits_faults_and_the_connection_is_still_routed() {
    let denied = Backend::start("denied-eu").await;
    let db = Db::new(&[
        Row::new("denied-eu", "eu", "DE", denied.addr),
        Row {
            healthy: false,
            ..Row::new("sleep", "eu", "DE", denied.addr)
        },
    ]);
    let p = Proxy::start(
        &db,
        &format!("policy_path = {:?}\n", probe().display().to_string()),
    )
    .await;
    assert_eq!(served_by("127.0.0.2", p.addr).await, "denied-eu");
    let status = admin_json(p.admin, "/status").await;
    assert_eq!(status["policy"]["faults"]["traps"], 1, "{status:#}");
    assert_eq!(status["policy"]["decisions"], 0, "{status:#}");
    p.stop().await;
}

/// `policy check` names each WASI import and what it is granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_check_lists_the_wasi_imports_and_their_grants() {
    let out = edgeproxy_ok(&["policy", "check", "--json", probe().to_str().unwrap()]).await;
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let wasi = report["wasi"].as_array().unwrap();
    let granted = |prefix: &str| {
        wasi.iter()
            .find(|w| w["interface"].as_str().unwrap().starts_with(prefix))
            .map(|w| w["granted"].as_str().unwrap().to_owned())
            .unwrap_or_else(|| panic!("{prefix} not listed: {report:#}"))
    };
    assert!(granted("wasi:filesystem/preopens@0.2").contains("none"));
    assert!(granted("wasi:sockets/tcp-create-socket@0.2").contains("refused"));
    assert!(granted("wasi:cli/environment@0.2").contains("no variables"));
    assert!(granted("wasi:cli/stdout@0.2").contains("host log"));
    assert!(report["rejected"].is_null(), "{report:#}");
}
