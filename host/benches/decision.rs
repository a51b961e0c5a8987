//! The decision path, side by side in one run: native scorer vs the default wasm policy
//! at 4, 32 and 256 backends, plus a binding hit and a GeoIP lookup. Policies from other
//! toolchains join with `EDGEPROXY_BENCH_POLICIES=name=file.wasm,...` (the table in
//! docs/POLICY-AUTHORS.md: the Python and JavaScript examples, built by their scripts).
//!
//!     cargo bench -p edgeproxy --bench decision

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use edgeproxy::adapters::outbound::binding_table::BindingTable;
use edgeproxy::adapters::outbound::maxmind_geo::MaxMindGeo;
use edgeproxy::adapters::outbound::wasm_policy::runtime::{Limits, Runtime};
use edgeproxy::adapters::outbound::wasm_policy::{DEFAULT_POLICY, LoadedPolicy, WasmPolicy};
use edgeproxy::domain::ports::{
    BindingKey, BindingRepository, GeoResolver, PickRequest, ScoringPolicy,
};
use edgeproxy::domain::services::{NativeScorer, RegionMap};
use edgeproxy::domain::{Backend, BackendId, BackendStats, Region, RoutingTable};

const REGIONS: [(&str, &str); 4] = [("sa", "BR"), ("us", "US"), ("eu", "DE"), ("ap", "JP")];

/// `n` backends spread over four regions with uneven load; the client's country has none,
/// so the whole list is scored.
fn table(n: usize) -> RoutingTable {
    let backends = (0..n)
        .map(|i| {
            let (region, country) = REGIONS[i % 4];
            Backend {
                id: BackendId::new(&format!("backend-{i:04}")),
                app: "app".into(),
                region: Region::new(region),
                country: country.parse().unwrap(),
                addr: "10.50.0.1:8080".parse().unwrap(),
                healthy: i % 7 != 3,
                weight: 1 + (i % 3) as u32,
                soft_limit: 100,
                hard_limit: 500,
            }
        })
        .collect();
    // Versions identify a table to the wasm policy: one per size.
    RoutingTable::new(n as u64, backends, |id| {
        let stats = Arc::new(BackendStats::default());
        let load = id.as_str().bytes().map(u32::from).sum::<u32>() % 50;
        for _ in 0..load {
            std::mem::forget(stats.acquire());
        }
        stats
    })
}

fn decisions(c: &mut Criterion) {
    let runtime = Arc::new(Runtime::new(Limits::default()).unwrap());
    let loaded = LoadedPolicy::load(&runtime, "geo-load", DEFAULT_POLICY).unwrap();
    let regions = RegionMap::default();
    // Interpreters need more than the default budget and memory at 256 backends; a fault
    // would be decided natively and measure the fallback instead.
    let roomy = Arc::new(
        Runtime::new(Limits {
            timeout: Duration::from_millis(100),
            memory_bytes: 256 << 20,
        })
        .unwrap(),
    );
    let others: Vec<(String, WasmPolicy)> = std::env::var("EDGEPROXY_BENCH_POLICIES")
        .unwrap_or_default()
        .split(',')
        .filter_map(|spec| spec.split_once('='))
        .map(|(name, path)| {
            let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
            let loaded = LoadedPolicy::load(&roomy, name, &bytes).unwrap();
            let policy = WasmPolicy::new(Arc::clone(&roomy), regions.client_regions(), loaded);
            (name.to_owned(), policy)
        })
        .collect();
    let wasm = WasmPolicy::new(runtime, regions.client_regions(), loaded);
    let client = edgeproxy::domain::sample::client("190.98.248.1", Some("CL"), Some("sa"));
    let pop = Region::new("eu");
    let mut group = c.benchmark_group("decision");
    for n in [4, 32, 256] {
        let t = table(n);
        let req = PickRequest {
            table: &t,
            pop_region: &pop,
            app: Some("app"),
            client: &client,
        };
        let cands = t.candidates(Some("app"));
        assert_eq!(wasm.pick(&req, cands), NativeScorer.pick(&req, cands));
        group.bench_with_input(BenchmarkId::new("native", n), &n, |b, _| {
            b.iter(|| NativeScorer.pick(black_box(&req), black_box(cands)))
        });
        group.bench_with_input(BenchmarkId::new("wasm", n), &n, |b, _| {
            b.iter(|| wasm.pick(black_box(&req), black_box(cands)))
        });
        for (name, policy) in &others {
            group.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                b.iter(|| policy.pick(black_box(&req), black_box(cands)))
            });
            let f = &policy.faults;
            assert_eq!(f.total(), 0, "{name} at {n}: {f:?}");
        }
    }
    group.finish();
    assert_eq!(wasm.faults.total(), 0);
}

fn lookups(c: &mut Criterion) {
    let geo = MaxMindGeo::embedded().unwrap();
    let ip = "200.147.3.157".parse().unwrap();
    c.bench_function("geoip_lookup_embedded", |b| {
        b.iter(|| geo.country(black_box(ip)))
    });

    let bindings = BindingTable::new(Duration::from_secs(600));
    let now = tokio::time::Instant::now();
    for i in 0..10_000u32 {
        let key = BindingKey {
            client: std::net::Ipv4Addr::from(i).into(),
            app: None,
        };
        bindings.put(key, BackendId::new("backend-0001"), now);
    }
    let key = BindingKey {
        client: std::net::Ipv4Addr::from(4242u32).into(),
        app: None,
    };
    c.bench_function("binding_hit_10k", |b| {
        b.iter(|| bindings.get(black_box(&key), now))
    });
}

criterion_group!(benches, decisions, lookups);
criterion_main!(benches);
