//! How cost grows with the routing table (issue 14's first curve). For 100, 1,000, 10,000
//! and 100,000 backends in a SQLite file:
//! - reload: read, check and build the new snapshot after one row changed (`Routing::reload`);
//! - held: heap bytes the snapshot holds (a counting allocator), and the policy's copy of
//!   the table in the host (the WIT form, built once per version);
//! - set-table: the wasm policy's first decision on a new table version minus a warm one
//!   (copying the table into the instance);
//! - local verdict: one backend ejected by this POP (or back), published and the next
//!   decision made, with the policy prepared for every snapshot as in a running proxy;
//! - decisions among 10, 100 and 1,000 candidates of one app, wasm and native, in the
//!   10,000 and 100,000 tables.
//!
//! Run:
//!
//!     cargo bench -p edgeproxy --bench scale           # markdown, and target/scale.csv
//!     python3 bench/plot_scale.py                      # docs/scale-*.png from the CSV

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use edgeproxy::adapters::outbound::sqlite_routing::SqliteBackendRepository;
use edgeproxy::adapters::outbound::wasm_policy::runtime::{Limits, Runtime};
use edgeproxy::adapters::outbound::wasm_policy::{DEFAULT_POLICY, LoadedPolicy, WasmPolicy};
use edgeproxy::application::routing::Routing;
use edgeproxy::domain::health::{HealthRules, LocalHealth};
use edgeproxy::domain::live_stats::LiveStats;
use edgeproxy::domain::ports::{BackendRepository, PickRequest, ScoringPolicy};
use edgeproxy::domain::services::{NativeScorer, RegionMap};
use edgeproxy::domain::{BackendStats, Region, RoutingTable};
use tokio::time::Instant;

#[path = "support/counting.rs"]
mod counting;

const SIZES: [usize; 4] = [100, 1_000, 10_000, 100_000];
const REGIONS: [(&str, &str); 4] = [("sa", "BR"), ("us", "US"), ("eu", "DE"), ("ap", "JP")];

/// Which app backend `i` serves: 10, 100 and 1,000 candidates for apps a10, a100, a1000,
/// and the rest in apps of 10 (a table of 100,000 backends has about 10,000 apps).
fn app(i: usize) -> String {
    match i {
        0..10 => "a10".into(),
        10..110 => "a100".into(),
        110..1110 => "a1000".into(),
        _ => format!("app{}", i / 10),
    }
}

fn write_table(path: &std::path::Path, n: usize) {
    let repo = SqliteBackendRepository::new(path);
    repo.create_if_missing().unwrap();
    let mut conn = rusqlite::Connection::open(path).unwrap();
    let tx = conn.transaction().unwrap();
    {
        let mut insert = tx
            .prepare("INSERT INTO backends VALUES (?1, ?2, ?3, ?4, ?5, 8080, 1, ?6, 100, 0, 0)")
            .unwrap();
        for i in 0..n {
            let (region, country) = REGIONS[i % 4];
            let ip = format!("10.{}.{}.{}", i >> 16 & 255, i >> 8 & 255, i & 255);
            insert
                .execute(rusqlite::params![
                    format!("b{i:06}"),
                    app(i),
                    region,
                    country,
                    ip,
                    1 + (i % 3) as i64
                ])
                .unwrap();
        }
    }
    tx.commit().unwrap();
}

/// Median of `runs` timings of `f`, in microseconds.
fn median_us(runs: usize, mut f: impl FnMut() -> Duration) -> f64 {
    let mut t: Vec<f64> = (0..runs).map(|_| f().as_secs_f64() * 1e6).collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// Nanoseconds per call of `f`: the median of 5 batches of about 100 ms each.
fn per_call_ns(mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut calibrate = 0u64;
    while start.elapsed() < Duration::from_millis(20) {
        f();
        calibrate += 1;
    }
    let batch = (calibrate * 5).max(1);
    let mut t: Vec<f64> = (0..5)
        .map(|_| {
            let s = Instant::now();
            for _ in 0..batch {
                f();
            }
            s.elapsed().as_secs_f64() * 1e9 / batch as f64
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[2]
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let runtime = Arc::new(Runtime::new(Limits::default()).unwrap());
    let regions = RegionMap::default();
    let client = edgeproxy::domain::sample::client("190.98.248.1", Some("CL"), Some("sa"));
    let pop = Region::new("eu");
    let dir = tempfile::tempdir().unwrap();
    let mut csv = String::from("rows,reload_ms,snapshot_bytes,wit_bytes,set_table_us,verdict_ms\n");
    let mut decisions_csv = String::from("rows,candidates,native_ns,wasm_ns\n");
    println!(
        "| backends | reload (ms) | snapshot held (bytes/backend) | policy's table copy (bytes/backend) | set-table, per instance (us) | local verdict (ms) |"
    );
    println!("|---|---|---|---|---|---|");
    let mut decision_rows = Vec::new();
    for n in SIZES {
        let path = dir.path().join(format!("routing-{n}.db"));
        write_table(&path, n);
        let repo = Arc::new(SqliteBackendRepository::new(&path));
        let routing = Routing::new(repo.clone(), Arc::new(LiveStats::default()), 100);
        rt.block_on(routing.reload()).unwrap();
        // One row changed before each reload, so each builds a new snapshot.
        let conn = rusqlite::Connection::open(&path).unwrap();
        let mut weight = 1;
        let reload_us = median_us(5, || {
            weight += 1;
            conn.execute(
                "UPDATE backends SET weight = ?1 WHERE id = 'b000000'",
                [weight],
            )
            .unwrap();
            let s = Instant::now();
            rt.block_on(routing.reload()).unwrap();
            s.elapsed()
        });

        // What one snapshot holds, built alone.
        let loaded = repo.load().unwrap();
        let before = counting::live();
        let table = RoutingTable::new(1, loaded.backends, |_| Arc::new(BackendStats::default()));
        let snapshot = counting::live() - before;

        // The policy's first decision on a new version copies the table in; warm ones do not.
        let wasm = WasmPolicy::new(
            runtime.clone(),
            regions.client_regions(),
            LoadedPolicy::load(&runtime, "geo-load", DEFAULT_POLICY).unwrap(),
        );
        let mut set_table = Vec::new();
        let mut wit_bytes = None;
        for version in 2..7u64 {
            let rows = table.backends().iter().map(|r| r.backend.clone()).collect();
            let t = RoutingTable::new(version, rows, |_| Arc::new(BackendStats::default()));
            let req = PickRequest {
                table: &t,
                pop_region: &pop,
                app: Some("a10"),
                client: &client,
            };
            let cands = t.candidates(Some("a10"));
            let before = counting::live();
            let s = Instant::now();
            black_box(wasm.pick(&req, cands));
            let first = s.elapsed();
            // The first version only: later ones free the previous copy as they store theirs.
            wit_bytes.get_or_insert(counting::live() - before);
            let s = Instant::now();
            black_box(wasm.pick(&req, cands));
            let warm = s.elapsed();
            set_table.push(first.saturating_sub(warm).as_secs_f64() * 1e6);
        }
        set_table.sort_by(f64::total_cmp);
        let set_table_us = set_table[2];
        let wit_bytes = wit_bytes.unwrap_or(0);
        // A table the policy cannot take within its limits: every decision faults.
        let f = &wasm.faults;
        let faulted = match f.total() {
            0 => None,
            total => Some(format!(
                "faults: {total} ({} timeouts, {} traps, {} instantiations)",
                f.timeouts.load(Ordering::Relaxed),
                f.traps.load(Ordering::Relaxed),
                f.instantiate_failures.load(Ordering::Relaxed)
            )),
        };

        let verdict_us = match faulted {
            None => local_verdict_us(&rt, &runtime, &regions, &repo, &pop, &client),
            Some(_) => f64::NAN,
        };
        println!(
            "| {n} | {:.2} | {} | {} | {} | {:.2} |",
            reload_us / 1e3,
            snapshot / n as isize,
            wit_bytes / n as isize,
            match &faulted {
                None => format!("{set_table_us:.0}"),
                Some(why) => format!("does not fit the default limits ({why})"),
            },
            verdict_us / 1e3
        );
        csv += &format!(
            "{n},{:.3},{snapshot},{wit_bytes},{},{:.3}\n",
            reload_us / 1e3,
            match faulted {
                None => format!("{set_table_us:.1}"),
                Some(_) => String::new(),
            },
            verdict_us / 1e3
        );

        if n >= 10_000 && wasm.faults.total() == 0 {
            for (app, k) in [("a10", 10), ("a100", 100), ("a1000", 1000)] {
                let req = PickRequest {
                    table: &table,
                    pop_region: &pop,
                    app: Some(app),
                    client: &client,
                };
                let cands = table.candidates(Some(app));
                assert_eq!(cands.len(), k);
                assert_eq!(wasm.pick(&req, cands), NativeScorer.pick(&req, cands));
                let native = per_call_ns(|| {
                    black_box(NativeScorer.pick(black_box(&req), black_box(cands)));
                });
                let w = per_call_ns(|| {
                    black_box(wasm.pick(black_box(&req), black_box(cands)));
                });
                decisions_csv += &format!("{n},{k},{native:.0},{w:.0}\n");
                decision_rows.push((n, k, native, w));
            }
        }
    }
    println!("\n| backends in the table | candidates of the app | native (ns) | wasm (ns) |");
    println!("|---|---|---|---|");
    for (n, k, native, w) in decision_rows {
        println!("| {n} | {k} | {native:.0} | {w:.0} |");
    }
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    std::fs::write(out.join("scale.csv"), csv).unwrap();
    std::fs::write(out.join("scale-decisions.csv"), decisions_csv).unwrap();
}

/// One backend of app a10 ejected by this POP, or returned, then the next decision: the
/// median over 9 verdicts, in microseconds.
fn local_verdict_us(
    rt: &tokio::runtime::Runtime,
    runtime: &Arc<Runtime>,
    regions: &RegionMap,
    repo: &Arc<SqliteBackendRepository>,
    pop: &Region,
    client: &edgeproxy::domain::Client,
) -> f64 {
    let mut rules = HealthRules::off();
    rules.ejection.enabled = true;
    let health = Arc::new(LocalHealth::new(rules));
    let routing = Routing::new(repo.clone(), Arc::new(LiveStats::default()), 100)
        .with_health(Arc::clone(&health));
    let wasm = Arc::new(WasmPolicy::new(
        runtime.clone(),
        regions.client_regions(),
        LoadedPolicy::load(runtime, "geo-load", DEFAULT_POLICY).unwrap(),
    ));
    let (w, p) = (Arc::clone(&wasm), pop.clone());
    routing.prepare_with(move |t| w.prepare(t, &p));
    rt.block_on(routing.reload()).unwrap();
    let decide = || {
        let t = routing.current();
        let req = PickRequest {
            table: &t,
            pop_region: pop,
            app: Some("a10"),
            client,
        };
        black_box(wasm.pick(&req, t.candidates(Some("a10"))));
    };
    decide();
    let id = routing.current().candidates(Some("a10"))[0]
        .backend
        .id
        .clone();
    let mut back_at = Instant::now();
    median_us(9, || {
        let s = Instant::now();
        if health.up(&id) {
            health.eject(&routing.current(), &id, 5, s).unwrap();
        } else {
            back_at += Duration::from_secs(86_400);
            assert_eq!(health.expire_ejections(back_at).len(), 1);
        }
        assert!(rt.block_on(routing.refresh_local()));
        decide();
        s.elapsed()
    })
}
