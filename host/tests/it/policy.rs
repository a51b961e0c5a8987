//! WebAssembly policies in a running proxy: the default component agrees with the native
//! scorer, a replaced policy file routes new clients differently without a restart, and
//! faulty components are contained.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use edgeproxy::adapters::outbound::wasm_policy::runtime::{Limits, Runtime};
use edgeproxy::adapters::outbound::wasm_policy::{DEFAULT_POLICY, LoadedPolicy, WasmPolicy};
use edgeproxy::domain::ports::{PickRequest, ScoringPolicy};
use edgeproxy::domain::services::{NativeScorer, RegionMap};
use edgeproxy::domain::{
    Backend as BackendRow, BackendId, BackendStats, Client, Region, RoutingTable,
};
use proptest::prelude::*;

use crate::support::*;

fn default_policy() -> WasmPolicy {
    wasm_policy("default", DEFAULT_POLICY)
}

fn wasm_policy(name: &str, bytes: &[u8]) -> WasmPolicy {
    let runtime = Arc::new(Runtime::new(Limits::default()).unwrap());
    let loaded = LoadedPolicy::load(&runtime, name, bytes).unwrap();
    let regions = ["sa", "us", "eu", "ap"].map(Region::new).to_vec();
    WasmPolicy::new(runtime, regions, loaded)
}

#[derive(Debug, Clone)]
struct Spec {
    app: &'static str,
    region: &'static str,
    country: &'static str,
    healthy: bool,
    weight: u32,
    soft: u32,
    hard: u32,
    active: u32,
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        prop::sample::select(vec!["a", "b"]),
        prop::sample::select(vec!["sa", "us", "eu", "ap", "af"]),
        prop::sample::select(vec!["BR", "AR", "US", "DE", "JP", "ZA"]),
        prop::bool::weighted(0.8),
        0u32..4,
        0u32..20,
        0u32..8,
        0u32..30,
    )
        .prop_map(
            |(app, region, country, healthy, weight, soft, hard, active)| Spec {
                app,
                region,
                country,
                healthy,
                weight,
                soft,
                hard,
                active,
            },
        )
}

fn table(version: u64, specs: &[Spec]) -> RoutingTable {
    let backends: Vec<BackendRow> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| BackendRow {
            id: BackendId::new(&format!("b{i:03}")),
            app: s.app.into(),
            region: Region::new(s.region),
            country: s.country.parse().unwrap(),
            addr: "10.50.0.1:80".parse().unwrap(),
            healthy: s.healthy,
            weight: s.weight,
            soft_limit: s.soft,
            hard_limit: s.hard,
        })
        .collect();
    let active: std::collections::HashMap<String, u32> = backends
        .iter()
        .zip(specs)
        .map(|(b, s)| (b.id.to_string(), s.active))
        .collect();
    RoutingTable::new(version, backends, |id| {
        let stats = Arc::new(BackendStats::default());
        for _ in 0..active[id.as_str()] {
            std::mem::forget(stats.acquire());
        }
        stats
    })
}

#[test]
fn wasm_default_policy_agrees_with_the_native_scorer() {
    let wasm = default_policy();
    let regions = RegionMap::default();
    let version = std::cell::Cell::new(0);
    let config = ProptestConfig {
        cases: 3000,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(
        specs in prop::collection::vec(spec(), 0..40),
        country in prop::option::of(prop::sample::select(vec!["BR", "US", "DE", "KE", "JP", "ZA"])),
        pop in prop::sample::select(vec!["sa", "us", "eu", "ap"]),
        app in prop::option::of(prop::sample::select(vec!["a", "b"])),
        v6 in any::<bool>(),
    )| {
        version.set(version.get() + 1);
        let t = table(version.get(), &specs);
        let country = country.map(|c: &str| c.parse().unwrap());
        let client = Client {
            ip: if v6 { "2001:db8::7".parse().unwrap() } else { "203.0.113.7".parse().unwrap() },
            country,
            region: country.map(|c| regions.region_of(c)),
            via_proxy_protocol: v6,
            tls: None,
        };
        let pop = Region::new(pop);
        let req = PickRequest { table: &t, pop_region: &pop, app, client: &client };
        let candidates = t.candidates(app);
        prop_assert_eq!(wasm.pick(&req, candidates), NativeScorer.pick(&req, candidates));
        // A DNS batch, this client among others, ranked in one call as natively each.
        let others: Vec<Client> = ["DE", "BR", "JP"]
            .map(|c| {
                let country = c.parse().unwrap();
                Client { country: Some(country), region: Some(regions.region_of(country)), ..client.clone() }
            })
            .into();
        let requests: Vec<PickRequest<'_>> = std::iter::once(&client)
            .chain(&others)
            .map(|client| PickRequest { client, ..req })
            .collect();
        prop_assert_eq!(wasm.rank(&requests, candidates, 3), NativeScorer.rank(&requests, candidates, 3));
        prop_assert_eq!(wasm.faults.total(), 0);
    });
}

/// An internet-size table: the default policy takes 100,000 backends within the default
/// limits, because set-table's budget grows with the rows (it did not: every decision
/// timed out), and a table the policy's memory cannot hold is a fault naming both.
#[test]
fn a_100k_backend_table_fits_the_default_limits() {
    let backends: Vec<BackendRow> = (0..100_000u32)
        .map(|i| BackendRow {
            id: BackendId::new(&format!("b{i:06}")),
            app: if i < 10 {
                "a".into()
            } else {
                format!("app{}", i / 10).into()
            },
            region: Region::new(["sa", "us", "eu", "ap"][i as usize % 4]),
            country: ["BR", "US", "DE", "JP"][i as usize % 4].parse().unwrap(),
            addr: std::net::SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 80)),
            healthy: true,
            weight: 1 + i % 3,
            soft_limit: 100,
            hard_limit: 0,
        })
        .collect();
    let client = edgeproxy::domain::sample::client_in_brazil();
    let pop = Region::new("eu");
    // The policy's answer on version `version` of the table, and the native scorer's.
    let decide = |policy: &WasmPolicy, version| {
        let t = RoutingTable::new(version, backends.clone(), |_| {
            Arc::new(BackendStats::default())
        });
        let req = PickRequest {
            table: &t,
            pop_region: &pop,
            app: Some("a"),
            client: &client,
        };
        let candidates = t.candidates(Some("a"));
        assert_eq!(candidates.len(), 10);
        (
            policy.try_pick(&req, candidates),
            NativeScorer.pick(&req, candidates),
        )
    };
    let wasm = default_policy();
    // Later versions arrive while the instance holds the one before.
    for version in 1..=3 {
        let (answer, native) = decide(&wasm, version);
        assert_eq!(answer, Ok(native));
    }
    assert_eq!(wasm.faults.total(), 0);

    let runtime = Arc::new(
        Runtime::new(Limits {
            memory_bytes: 4 << 20,
            ..Limits::default()
        })
        .unwrap(),
    );
    let loaded = LoadedPolicy::load(&runtime, "default", DEFAULT_POLICY).unwrap();
    let small = WasmPolicy::new(runtime, vec![Region::new("sa")], loaded);
    let err = decide(&small, 1).0.unwrap_err();
    assert!(err.contains("set-table of 100000 backends"), "{err}");
    assert!(err.contains("policy_memory_mib"), "{err}");
}

/// A reload copies the new table into the policy's idle instances before connections see
/// it, so no decision waits for set-table (70 ms per instance at 100,000 backends).
#[tokio::test]
async fn a_reloaded_table_is_in_the_policy_before_it_serves() {
    let addr: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    let db = Db::new(&[
        Row::new("a", "sa", "BR", addr),
        Row::new("z", "eu", "DE", addr),
    ]);
    let routing = routing_of(&db);
    routing.reload().await.unwrap();
    let wasm = Arc::new(default_policy());
    let pop = Region::new("eu");
    let decide = || decide_for_brazil(&routing, &wasm, &pop);
    let copied = || wasm.tables_copied_on_decision.load(Ordering::Relaxed);
    assert_eq!(decide(), Some(0));
    assert_eq!(
        copied(),
        1,
        "a new instance takes the table on its first decision"
    );

    // Without preparing, the first decision after a reload copies the table.
    db.exec("UPDATE backends SET weight = 2 WHERE id = 'z'", []);
    routing.reload().await.unwrap();
    decide();
    assert_eq!(copied(), 2);

    let (w, p) = (Arc::clone(&wasm), pop.clone());
    routing.prepare_with(move |t| w.prepare(t, &p));
    for weight in 3..6 {
        db.exec("UPDATE backends SET weight = ?1 WHERE id = 'z'", [weight]);
        routing.reload().await.unwrap();
        decide();
    }
    // A healthy backend taken out changes the answer, from the prepared table too.
    db.exec("UPDATE backends SET healthy = 0 WHERE id = 'a'", []);
    routing.reload().await.unwrap();
    assert_eq!(decide(), Some(1));
    assert_eq!(
        copied(),
        2,
        "every later version was in the instance before it served"
    );
    assert_eq!(wasm.faults.total(), 0);
}

/// This POP's own verdicts reach the policy as the candidates it is offered, not as a new
/// table: a backend ejected here is never chosen, and no instance copies the table again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_verdict_reaches_the_policy_without_a_table_copy() {
    use edgeproxy::domain::health::{HealthRules, LocalHealth};
    let addr: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    let db = Db::new(&[
        Row::new("a", "sa", "BR", addr),
        Row::new("b", "sa", "BR", addr),
        Row::new("z", "eu", "DE", addr),
    ]);
    let mut rules = HealthRules::off();
    rules.ejection.enabled = true;
    let health = Arc::new(LocalHealth::new(rules));
    let routing = routing_of(&db).with_health(Arc::clone(&health));
    let wasm = Arc::new(default_policy());
    let pop = Region::new("eu");
    let (w, p) = (Arc::clone(&wasm), pop.clone());
    routing.prepare_with(move |t| w.prepare(t, &p));
    routing.reload().await.unwrap();
    let decide = || decide_for_brazil(&routing, &wasm, &pop);
    let copies = || {
        wasm.tables_copied_ahead.load(Ordering::Relaxed)
            + wasm.tables_copied_on_decision.load(Ordering::Relaxed)
    };
    assert_eq!(decide(), Some(0));
    let copied = copies();

    let ejected = BackendId::new("a");
    health
        .eject(&routing.current(), &ejected, 5, tokio::time::Instant::now())
        .unwrap();
    assert!(routing.refresh_local().await);
    for _ in 0..3 {
        assert_eq!(decide(), Some(1), "the ejected backend is not offered");
    }
    assert_eq!(copies(), copied, "a local verdict copied the table");
    assert_eq!(wasm.faults.total(), 0);
}

/// Routing over `db`'s table, as a POP reads it.
fn routing_of(db: &Db) -> edgeproxy::application::routing::Routing {
    let repo =
        edgeproxy::adapters::outbound::sqlite_routing::SqliteBackendRepository::new(&db.path);
    edgeproxy::application::routing::Routing::new(
        Arc::new(repo),
        Arc::new(edgeproxy::domain::live_stats::LiveStats::default()),
        100,
    )
}

/// `wasm`'s pick for a client in Brazil on `routing`'s table (any app), which must be
/// the native scorer's too.
fn decide_for_brazil(
    routing: &edgeproxy::application::routing::Routing,
    wasm: &WasmPolicy,
    pop: &Region,
) -> Option<usize> {
    let client = edgeproxy::domain::sample::client_in_brazil();
    let t = routing.current();
    let req = PickRequest {
        table: &t,
        pop_region: pop,
        app: None,
        client: &client,
    };
    let answer = wasm.pick(&req, t.candidates(None));
    assert_eq!(answer, NativeScorer.pick(&req, t.candidates(None)));
    answer
}

/// The same in a running proxy: `Host` wires its policy to the routing table's reloads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_proxy_prepares_its_policy_for_each_reload() {
    let near = Backend::start("a").await;
    let far = Backend::start("z").await;
    let db = Db::new(&rows_for("app", &near, &far));
    // Bindings off: the policy decides every connection.
    let p = Proxy::start(&db, "binding_ttl_secs = 0").await;
    let wasm = p.host.wasm_policy.clone().unwrap();
    let first = served_by("127.0.0.2", p.addr).await;
    let copied = wasm.tables_copied_on_decision.load(Ordering::Relaxed);
    for weight in 2..5 {
        let v = p.version();
        let mut rx = p.host.routing.subscribe();
        db.exec("UPDATE backends SET weight = ?1 WHERE id = 'z'", [weight]);
        tokio::time::timeout(WAIT, rx.wait_for(|n| *n > v))
            .await
            .expect("the change is routed")
            .unwrap();
        // The policy decides, on a table it already holds.
        assert_eq!(served_by("127.0.0.2", p.addr).await, first);
    }
    assert_eq!(
        wasm.tables_copied_on_decision.load(Ordering::Relaxed),
        copied
    );
    assert_eq!(p.stop().await.cut_off, 0);
}

fn rows_for(app: &'static str, near: &Backend, far: &Backend) -> Vec<Row<'static>> {
    let mut a = Row::new("a", "sa", "BR", near.addr);
    let mut m = Row::new("m", "sa", "BR", near.addr);
    let mut z = Row::new("z", "eu", "DE", far.addr);
    m.healthy = false;
    for r in [&mut a, &mut m, &mut z] {
        r.app = app;
    }
    vec![a, m, z]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faulty_policies_are_contained() {
    let chaos = chaos_component();
    let near = Backend::start("a").await;
    let far = Backend::start("z").await;
    for app in [
        "trap",
        "loop",
        "grow",
        "garbage",
        "unhealthy",
        "refuse",
        "log-flood",
        "healthy",
    ] {
        let db = Db::new(&rows_for(app, &near, &far));
        let opts = ProxyOptions {
            file: edgeproxy::config::Layer::from_toml(&format!(
                "binding_ttl_secs = 0\npolicy_path = {:?}",
                chaos.display().to_string()
            ))
            .unwrap(),
            listener: Some(edgeproxy::config::ListenerConfig {
                app: Some(app.into()),
                ..edgeproxy::config::ListenerConfig::plain("127.0.0.1:0".parse().unwrap())
            }),
            listener_copies: 0,
            ..ProxyOptions::default()
        };
        let p = Proxy::start_with(&db, opts).await;
        let wasm = p.host.wasm_policy.clone().unwrap();
        let f = &wasm.faults;
        for round in 1..=2u64 {
            match app {
                // No answer is a refusal, not a fault.
                "refuse" => assert!(refused("127.0.0.2", p.addr).await),
                // The chaos policy's own choice: the last eligible backend.
                "healthy" => assert_eq!(served_by("127.0.0.2", p.addr).await, "z"),
                // A fault: the native scorer decides (BR client -> "a"), a fresh
                // instance is used next time.
                _ => assert_eq!(served_by("127.0.0.2", p.addr).await, "a", "{app}"),
            }
            let (traps, timeouts, bad) = (
                f.traps.load(Ordering::Relaxed),
                f.timeouts.load(Ordering::Relaxed),
                f.bad_answers.load(Ordering::Relaxed),
            );
            let expected = match app {
                "trap" | "grow" | "log-flood" => (round, 0, 0),
                "loop" => (0, round, 0),
                "garbage" | "unhealthy" => (0, 0, round),
                _ => (0, 0, 0),
            };
            assert_eq!((traps, timeouts, bad), expected, "{app}");
        }
        assert_eq!(p.stop().await.cut_off, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_the_policy_file_reroutes_new_clients_live() {
    let chaos = std::fs::read(chaos_component()).unwrap();
    let near = Backend::start("a").await;
    let far = Backend::start("z").await;
    let db = Db::new(&[
        Row::new("a", "sa", "BR", near.addr),
        Row::new("z", "eu", "DE", far.addr),
    ]);
    let policy_path = db.dir.path().join("policy.wasm");
    std::fs::write(&policy_path, DEFAULT_POLICY).unwrap();
    let p = Proxy::start(
        &db,
        &format!(
            "binding_ttl_secs = 0\npolicy_path = {:?}",
            policy_path.display().to_string()
        ),
    )
    .await;
    let wasm = p.host.wasm_policy.clone().unwrap();
    assert_eq!(served_by("127.0.0.2", p.addr).await, "a");

    // A burst runs across every swap below; none of its connections may fail.
    let addr = p.addr;
    let burst = tokio::spawn(async move {
        let mut served = Vec::new();
        for _ in 0..300 {
            served.push(served_by("127.0.0.2", addr).await);
        }
        served
    });

    // `cp` over the file: written in place.
    std::fs::write(&policy_path, &chaos).unwrap();
    wait_reload_attempts(&wasm, 1).await;
    assert_eq!(wasm.reloads.load(Ordering::Relaxed), 1);
    assert_eq!(served_by("127.0.0.2", p.addr).await, "z");

    // Not a component: rejected, the chaos policy keeps serving.
    std::fs::write(&policy_path, b"\0asm garbage").unwrap();
    wait_reload_attempts(&wasm, 2).await;
    assert_eq!(wasm.reload_failures.load(Ordering::Relaxed), 1);
    assert_eq!(served_by("127.0.0.2", p.addr).await, "z");

    // An atomic rename of the default back into place.
    let staged = db.dir.path().join("policy.wasm.new");
    std::fs::write(&staged, DEFAULT_POLICY).unwrap();
    std::fs::rename(&staged, &policy_path).unwrap();
    wait_reload_attempts(&wasm, 3).await;
    assert_eq!(wasm.reloads.load(Ordering::Relaxed), 2);
    assert_eq!(served_by("127.0.0.2", p.addr).await, "a");

    let served = burst.await.unwrap();
    assert_eq!(served.len(), 300);
    assert!(served.iter().all(|s| s == "a" || s == "z"));
    assert_eq!(wasm.faults.total(), 0);
    assert_eq!(p.stop().await.cut_off, 0);
}

#[tokio::test]
async fn a_policy_that_does_not_load_stops_start_up() {
    let db = Db::new(&[]);
    let bad = db.dir.path().join("bad.wasm");
    std::fs::write(&bad, b"definitely not wasm").unwrap();
    let missing = db.dir.path().join("missing.wasm");
    for (path, cause) in [(&bad, "not a WebAssembly"), (&missing, "No such file")] {
        let file = edgeproxy::config::Layer::from_toml(&format!(
            "db_path = {:?}\npolicy_path = {:?}",
            db.path.display().to_string(),
            path.display().to_string()
        ))
        .unwrap();
        let config =
            edgeproxy::config::Config::resolve(file, Default::default(), Default::default())
                .unwrap();
        let err = format!("{:#}", edgeproxy::Host::build(&config).await.err().unwrap());
        assert!(
            err.contains(&path.display().to_string()) && err.contains(cause),
            "{err}"
        );
    }
}

#[test]
fn a_plain_core_module_from_cargo_build_loads_too() {
    // `chaos_component()` ran `cargo build --profile policy --target wasm32-unknown-unknown`;
    // its raw output is a core module, which the host wraps into a component itself.
    let component = chaos_component();
    let module = component
        .parent()
        .unwrap()
        .join("cargo/wasm32-unknown-unknown/policy/chaos_policy.wasm");
    let bytes = std::fs::read(&module).unwrap();
    assert_eq!(&bytes[..8], b"\0asm\x01\0\0\0", "expected a core module");
    let runtime = Runtime::new(Limits::default()).unwrap();
    LoadedPolicy::load(&runtime, "core module", &bytes).unwrap();
}

#[test]
fn a_ranking_that_repeats_itself_or_a_mistyped_rank_backends_is_refused_at_load() {
    let runtime = Runtime::new(Limits::default()).unwrap();
    for (fixture, expected) in [
        // Its picks pass; its ranking names one backend twice.
        ("repeating-ranker", "repeated"),
        // `rank-backends` of another type: refused, not called with the wrong arguments.
        ("mistyped-ranker", "rank-backends"),
    ] {
        let component = policy_component(&format!("host/tests/fixtures/{fixture}"));
        let bytes = std::fs::read(&component).unwrap();
        let err = LoadedPolicy::load(&runtime, fixture, &bytes)
            .err()
            .unwrap_or_else(|| panic!("{fixture} loaded"))
            .to_string();
        assert!(err.contains(expected), "{fixture}: {err}");
    }
}

/// A backend of `app` in `region` and `country`: healthy, weight 1, no limits, idle.
fn plain(app: &'static str, region: &'static str, country: &'static str) -> Spec {
    Spec {
        app,
        region,
        country,
        healthy: true,
        weight: 1,
        soft: 0,
        hard: 0,
        active: 0,
    }
}

/// Clients in `countries` (with their regions), all at one address.
fn clients_in<'a>(countries: impl IntoIterator<Item = &'a str>) -> Vec<Client> {
    let regions = RegionMap::default();
    countries
        .into_iter()
        .map(|c| {
            let country = c.parse().unwrap();
            Client {
                ip: "203.0.113.7".parse().unwrap(),
                country: Some(country),
                region: Some(regions.region_of(country)),
                via_proxy_protocol: false,
                tls: None,
            }
        })
        .collect()
}

/// A DNS batch: `clients` asking about `app` on `t` at a POP in `pop`.
fn batch<'a>(
    t: &'a RoutingTable,
    pop: &'a Region,
    app: &'a str,
    clients: &'a [Client],
) -> Vec<PickRequest<'a>> {
    clients
        .iter()
        .map(|client| PickRequest {
            table: t,
            pop_region: pop,
            app: Some(app),
            client,
        })
        .collect()
}

/// A ranking that faults for one client of a DNS batch: that client is answered natively
/// and counted once; the others keep the policy's rankings.
#[test]
fn one_clients_faulting_ranking_costs_the_others_nothing() {
    let wasm = wasm_policy("chaos", &std::fs::read(chaos_component()).unwrap());
    let app = "rank-traps-for-kenya";
    let t = table(
        1,
        &[
            plain(app, "sa", "BR"),
            plain(app, "eu", "DE"),
            plain(app, "ap", "JP"),
        ],
    );
    let candidates = t.candidates(Some(app));
    let clients = clients_in(["BR", "KE", "DE"]);
    let pop = Region::new("sa");
    let requests = batch(&t, &pop, app, &clients);
    let ranked = wasm.rank(&requests, candidates, 2);
    // The chaos policy ranks from the last eligible backend; the native scorer geo first.
    assert_eq!(ranked[0], [2, 1], "Brazil: the policy's ranking");
    assert_eq!(
        ranked[1],
        NativeScorer.rank(&requests[1..2], candidates, 2)[0]
    );
    assert_eq!(ranked[2], [2, 1], "Germany: the policy's ranking");
    assert_eq!(wasm.faults.total(), 1);
}

/// More clients than one ranking call takes: cut into calls, answered in order.
#[test]
fn a_batch_larger_than_one_call_is_ranked_in_order() {
    let wasm = default_policy();
    let t = table(
        1,
        &[
            plain("a", "sa", "BR"),
            plain("a", "eu", "DE"),
            plain("a", "ap", "JP"),
            plain("a", "us", "US"),
        ],
    );
    let candidates = t.candidates(Some("a"));
    let clients = clients_in(["BR", "DE", "JP", "US", "KE"].into_iter().cycle().take(50));
    let pop = Region::new("sa");
    let requests = batch(&t, &pop, "a", &clients);
    let ranked = wasm.rank(&requests, candidates, 2);
    assert_eq!(ranked, NativeScorer.rank(&requests, candidates, 2));
    // Each client's own country first: the rankings differ along the batch.
    assert_eq!((ranked[0][0], ranked[1][0], ranked[47][0]), (0, 1, 2));
    assert_eq!(wasm.faults.total(), 0);
}
