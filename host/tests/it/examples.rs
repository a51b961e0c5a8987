//! The example policies (`examples/policies/`), each built from source into a component
//! and routing through a live proxy as its README says.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use edgeproxy::config::Layer;
use edgeproxy::domain::BackendStats;

use crate::support::*;
use crate::tls::client_hello;

/// A proxy deciding with the component at `policy`.
async fn proxy_with(db: &Db, policy: &Path, extra: &str) -> Proxy {
    let toml = format!("policy_path = {:?}\n{extra}", policy.display().to_string());
    Proxy::start_with(
        db,
        ProxyOptions {
            file: Layer::from_toml(&toml).unwrap(),
            listener: None,
            listener_copies: 0,
            ..ProxyOptions::default()
        },
    )
    .await
}

/// The C example, built by its own script (clang and wasm-ld).
fn c_component() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = root.join("target/test-fixtures/least-connections-c.wasm");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let status = std::process::Command::new("sh")
        .arg(root.join("examples/policies/least-connections-c/build.sh"))
        .arg(&out)
        .status()
        .expect("running build.sh (needs clang and lld)");
    assert!(status.success(), "build.sh failed");
    out
}

fn stats_of(p: &Proxy, id: &str) -> Arc<BackendStats> {
    let table = p.host.routing.current();
    let rb = table
        .backends()
        .iter()
        .find(|b| b.backend.id.as_str() == id);
    Arc::clone(&rb.expect("backend in the table").stats)
}

/// Opens connections from one BR client one after another, keeping each open, and
/// returns who served each: a least-connections policy alternates by weight.
async fn least_connections_through_a_live_proxy(policy: PathBuf) {
    let a = Backend::start("a-near").await;
    let b = Backend::start("b-far").await;
    let db = Db::new(&[
        Row::new("a-near", "sa", "BR", a.addr),
        Row {
            weight: 2,
            ..Row::new("b-far", "ap", "JP", b.addr)
        },
    ]);
    let p = proxy_with(&db, &policy, "binding_ttl_secs = 0").await;
    let mut held = Vec::new();
    let mut served = Vec::new();
    for _ in 0..4 {
        let (name, conn) = open("127.0.0.2", p.addr).await;
        served.push(name);
        held.push(conn);
    }
    // 0/1 vs 0/2: tie, first; 1/1 vs 0/2; 1/1 vs 1/2; 1/1 vs 2/2: tie, first.
    // (The default policy would send this BR client to a-near every time.)
    assert_eq!(served, ["a-near", "b-far", "b-far", "a-near"]);
    let status = p.host.admin.status();
    assert_eq!(
        status.policy.faults.traps + status.policy.faults.bad_answers,
        0
    );
    drop(held);
    p.stop().await;
}

#[tokio::test]
async fn least_connections_ignores_geography() {
    least_connections_through_a_live_proxy(policy_component("examples/policies/least-connections"))
        .await;
}

#[tokio::test]
async fn least_connections_in_c_routes_like_the_rust_one() {
    let component = tokio::task::spawn_blocking(c_component).await.unwrap();
    least_connections_through_a_live_proxy(component).await;
}

#[tokio::test]
async fn latency_aware_follows_the_lowest_connect_rtt() {
    let near = Backend::start("a-near").await;
    let far = Backend::start("b-far").await;
    let db = Db::new(&[
        Row::new("a-near", "sa", "BR", near.addr),
        Row::new("b-far", "us", "US", far.addr),
    ]);
    let policy = policy_component("examples/policies/latency-aware");
    let p = proxy_with(&db, &policy, "binding_ttl_secs = 0").await;
    // Connect RTTs on loopback are all alike, so history is seeded the way the proxy
    // records it: the BR backend has been answering in 80 ms, the US one in 2 ms.
    stats_of(&p, "a-near").record_rtt(80_000);
    stats_of(&p, "b-far").record_rtt(2_000);
    assert_eq!(served_by("127.0.0.2", p.addr).await, "b-far");
    // The US backend degrades to ~200 ms: the BR one wins again.
    for _ in 0..20 {
        stats_of(&p, "b-far").record_rtt(200_000);
    }
    assert_eq!(served_by("127.0.0.2", p.addr).await, "a-near");
    p.stop().await;
}

#[tokio::test]
async fn data_residency_keeps_eu_clients_in_the_eu_or_refuses_them() {
    let us = Backend::start("us").await;
    let de = Backend::start("de").await;
    let db = Db::new(&[
        Row::new("de", "eu", "DE", de.addr),
        Row::new("us", "us", "US", us.addr),
    ]);
    let policy = policy_component("examples/policies/data-residency");
    let p = proxy_with(&db, &policy, "binding_ttl_secs = 0").await;
    assert_eq!(served_by("127.0.0.6", p.addr).await, "de"); // DE client
    assert_eq!(served_by("127.0.0.2", p.addr).await, "de"); // BR client: the POP's region

    let v = p.version();
    db.exec("UPDATE backends SET healthy = 0 WHERE id = 'de'", []);
    p.wait_version_after(v).await;
    // The DE client is refused although a US backend is free; the BR client is served.
    assert!(refused("127.0.0.6", p.addr).await);
    assert_eq!(served_by("127.0.0.2", p.addr).await, "us");
    assert_eq!(us.accepted(), 1);
    let status = p.host.admin.status();
    assert_eq!(status.policy.faults.bad_answers, 0);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_canary_sends_its_share_of_new_clients_to_canaries() {
    let stable = Backend::start("stable-1").await;
    let canary = Backend::start("canary-1").await;
    let db = Db::new(&[
        Row::new("canary-1", "sa", "BR", canary.addr),
        Row::new("stable-1", "sa", "BR", stable.addr),
    ]);
    let policy = policy_component("examples/policies/weighted-canary");
    let p = proxy_with(&db, &policy, "binding_ttl_secs = 0").await;
    const N: usize = 400;
    let mut canaries = 0;
    for _ in 0..N {
        if served_by("127.0.0.2", p.addr).await == "canary-1" {
            canaries += 1;
        }
    }
    // 20% of 400 is 80 with a standard deviation of 8: this range is over 5 of them.
    assert!(
        (40..=125).contains(&canaries),
        "{canaries} of {N} to the canary"
    );
    p.stop().await;

    // With bindings on, a client stays on the side it first landed on.
    let p = proxy_with(&db, &policy, "").await;
    let first = served_by("127.0.0.3", p.addr).await;
    for _ in 0..20 {
        assert_eq!(served_by("127.0.0.3", p.addr).await, first);
    }
    p.stop().await;
}

/// An example built by its own build script into `target/test-fixtures/NAME.wasm`.
fn scripted_component(program: &str, script: &str, name: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = root.join(format!("target/test-fixtures/{name}.wasm"));
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let started = tokio::time::Instant::now();
    let output = std::process::Command::new(program)
        .arg(root.join(script))
        .arg(&out)
        .output()
        .unwrap_or_else(|e| panic!("running {program} {script}: {e}"));
    assert!(
        output.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("{name}: built in {:?}", started.elapsed());
    out
}

/// Runs the example's own unit tests (`program args` in its directory).
fn native_tests(dir: &str, program: &str, args: &[&str]) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let output = std::process::Command::new(program)
        .args(args)
        .current_dir(root.join(dir))
        .output()
        .unwrap_or_else(|e| panic!("running {program} in {dir}: {e}"));
    assert!(
        output.status.success(),
        "{dir}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// One client from each test country, against one backend per region: the policy at
/// `policy` must route each as the default policy does, without a fault.
async fn routes_like_the_default(policy: PathBuf) {
    let backends = [
        Backend::start("br").await,
        Backend::start("de").await,
        Backend::start("jp").await,
        Backend::start("us").await,
    ];
    let db = Db::new(&[
        Row::new("br", "sa", "BR", backends[0].addr),
        Row::new("de", "eu", "DE", backends[1].addr),
        Row::new("jp", "ap", "JP", backends[2].addr),
        Row::new("us", "us", "US", backends[3].addr),
    ]);
    let p = proxy_with(&db, &policy, "binding_ttl_secs = 0").await;
    let default = Proxy::start(&db, "binding_ttl_secs = 0").await;
    let mut served = Vec::new();
    // BR, CL (region sa), KE (no region listed: us), JP, DE.
    for source in [
        "127.0.0.2",
        "127.0.0.3",
        "127.0.0.4",
        "127.0.0.5",
        "127.0.0.6",
    ] {
        let theirs = served_by(source, p.addr).await;
        assert_eq!(theirs, served_by(source, default.addr).await, "{source}");
        served.push(theirs);
    }
    assert_eq!(served, ["br", "br", "us", "jp", "de"]);
    let status = p.host.admin.status();
    assert_eq!(status.policy.decisions, 5);
    assert_eq!(
        status.policy.faults.traps
            + status.policy.faults.bad_answers
            + status.policy.faults.timeouts,
        0
    );
    default.stop().await;
    p.stop().await;
}

/// The example `name` in another language: its own unit tests (`tests`), its build
/// script run by `builder`, then the live comparison with the default policy.
async fn language_example(
    name: &'static str,
    tests: &[&str],
    builder: &'static str,
    script: &'static str,
) {
    let dir = format!("examples/policies/{name}");
    native_tests(&dir, tests[0], &tests[1..]);
    let component = tokio::task::spawn_blocking(move || {
        scripted_component(builder, &format!("{dir}/{script}"), name)
    })
    .await
    .unwrap();
    routes_like_the_default(component).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn geo_load_in_python_routes_like_the_default() {
    language_example(
        "geo-load-python",
        &["python3", "test_app.py"],
        "sh",
        "build.sh",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn geo_load_in_javascript_routes_like_the_default() {
    language_example("geo-load-js", &["node", "--test"], "node", "build.mjs").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_canary_sends_canary_names_to_canaries() {
    let policy = policy_component("examples/policies/sni-canary");
    sni_canary_routes(&policy, "0.3.0").await;
}

/// Contract 0.2.0 passed the TLS fields in the client (0.3.0 gives them through
/// `host.client-hello`): the same example as built then still routes by server name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_built_against_contract_0_2_still_gets_the_server_name() {
    let old = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sni-canary-0.2.0.wasm");
    sni_canary_routes(&old, "0.2.0").await;
}

async fn sni_canary_routes(policy: &Path, contract: &str) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let stable = Backend::start("stable-1").await;
    let canary = Backend::start("canary-1").await;
    let db = Db::new(&[
        Row::new("canary-1", "us", "US", canary.addr),
        Row::new("stable-1", "sa", "BR", stable.addr),
    ]);
    let listener = "[[listener]]\naddr = \"127.0.0.1:0\"\napp = \"app\"\ntls = \"passthrough\"";
    let p = proxy_with(&db, policy, &format!("binding_ttl_secs = 0\n{listener}")).await;
    assert_eq!(p.host.admin.status().policy.contract, Some(contract));
    // The backends greet before reading: who answers the hello is who was chosen.
    let served = |sni: &'static str| async move {
        let mut s = connect_from("127.0.0.2".parse().unwrap(), p.addr).await;
        s.write_all(&client_hello(sni)).await.unwrap();
        let mut line = String::new();
        tokio::io::BufReader::new(s)
            .read_line(&mut line)
            .await
            .unwrap();
        line.trim_end().to_owned()
    };
    for _ in 0..3 {
        assert_eq!(served("canary.api.example.com").await, "canary-1");
        assert_eq!(served("api.example.com").await, "stable-1");
    }
    let faults = p.host.admin.status().policy.faults;
    assert_eq!(faults.traps + faults.bad_answers, 0);
    p.stop().await;
}

/// Contract versions: a component built against 0.1.0 (the default policy as it was
/// committed then) loads and routes as before; it is not told the TLS fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_built_against_contract_0_1_still_loads_and_routes() {
    let br = Backend::start("br").await;
    let jp = Backend::start("jp").await;
    let db = Db::new(&[
        Row::new("br", "sa", "BR", br.addr),
        Row::new("jp", "ap", "JP", jp.addr),
    ]);
    let old = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/geo-load-0.1.0.wasm");
    let listener = "[[listener]]\naddr = \"127.0.0.1:0\"\ntls = \"passthrough\"";
    let p = proxy_with(&db, &old, listener).await;
    assert_eq!(p.host.admin.status().policy.contract, Some("0.1.0"));
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    for (source, want) in [("127.0.0.2", "br"), ("127.0.0.5", "jp")] {
        let mut s = connect_from(source.parse().unwrap(), p.addr).await;
        s.write_all(&client_hello("api.example.com")).await.unwrap();
        let mut line = String::new();
        tokio::io::BufReader::new(s)
            .read_line(&mut line)
            .await
            .unwrap();
        assert_eq!(line.trim_end(), want, "{source}");
    }
    let faults = p.host.admin.status().policy.faults;
    assert_eq!(faults.traps + faults.bad_answers, 0);
    p.stop().await;
}
