//! `edgeproxy policy check` and `edgeproxy policy simulate`: try a policy component
//! before it goes live, on synthetic decisions (check) or on a real routing table and a
//! real GeoIP lookup (simulate), with the native scorer's answer beside it.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use serde::Serialize;

use std::fmt::Write as _;

use super::cli_output::{self, yes_no};
use crate::adapters::outbound::maxmind_geo::MaxMindGeo;
use crate::adapters::outbound::sqlite_routing::SqliteBackendRepository;
use crate::adapters::outbound::wasm_policy::reload::load_file;
use crate::adapters::outbound::wasm_policy::runtime::{Limits, Runtime, describe_kind};
use crate::adapters::outbound::wasm_policy::{self as wasm, LoadedPolicy, WasmPolicy};
use crate::domain::ports::{BackendRepository, GeoResolver, PickRequest, ScoringPolicy};
use crate::domain::services::{NativeScorer, RegionMap, scoring};
use crate::domain::{
    Backend, BackendId, BackendStats, Client, Region, RoutedBackend, RoutingTable,
};

#[derive(Debug, Serialize)]
pub struct CheckReport {
    pub file: String,
    pub bytes: usize,
    pub kind: &'static str,
    pub imports: Vec<String>,
    pub exports: Vec<String>,
    pub hash: Option<String>,
    pub decisions: Vec<CheckedDecision>,
    /// None when the component may be deployed; else why not.
    pub rejected: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct CheckedDecision {
    pub scenario: &'static str,
    /// The chosen backend's id, "refused", or the fault.
    pub answer: String,
    pub ok: bool,
}

/// Loads `file` as the proxy would and runs a few decisions on a synthetic table whose
/// backends belong to `app` (what a listener for that app would pass).
pub fn check(file: &Path, limits: Limits, app: &str) -> anyhow::Result<CheckReport> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let runtime = Arc::new(Runtime::new(limits)?);
    let mut report = CheckReport {
        file: file.display().to_string(),
        bytes: bytes.len(),
        kind: describe_kind(&bytes),
        imports: Vec::new(),
        exports: Vec::new(),
        hash: None,
        decisions: Vec::new(),
        rejected: None,
    };
    // Compiled once: inspected, then linked and self-tested as the proxy would.
    let component = match runtime.compile(&bytes) {
        Ok(c) => c,
        Err(e) => {
            report.rejected = Some(e.to_string());
            return Ok(report);
        }
    };
    let inspection = runtime.inspect(&component);
    (report.imports, report.exports) = (inspection.imports, inspection.exports);
    let name = file.display().to_string();
    let loaded = match LoadedPolicy::from_compiled(&runtime, &name, &bytes, &component) {
        Ok(l) => l,
        Err(e) => {
            report.rejected = Some(e.to_string());
            return Ok(report);
        }
    };
    report.hash = Some(loaded.hash.clone());
    let policy = WasmPolicy::new(runtime, check_regions(), loaded);
    report.decisions = scenarios(&policy, app);
    if let Some(bad) = report.decisions.iter().find(|d| !d.ok) {
        report.rejected = Some(format!("{}: {}", bad.scenario, bad.answer));
    }
    Ok(report)
}

fn check_regions() -> Vec<Region> {
    ["sa", "eu", "us", "ap"].map(Region::new).to_vec()
}

fn backend(app: &str, id: &str, region: &str, country: &str, port: u16) -> Backend {
    Backend {
        id: BackendId::new(id),
        app: Arc::from(app),
        region: Region::new(region),
        country: country.parse().expect("valid test country"),
        addr: std::net::SocketAddr::from(([10, 0, 0, 1], port)),
        healthy: true,
        weight: 1,
        soft_limit: 10,
        hard_limit: 0,
    }
}

/// Decisions any sound policy answers without a fault: a pick must name an eligible
/// candidate; refusing is always allowed (a policy may refuse by design).
fn scenarios(policy: &WasmPolicy, app: &str) -> Vec<CheckedDecision> {
    let healthy = vec![
        backend(app, "a-sa", "sa", "BR", 1),
        backend(app, "b-eu", "eu", "DE", 2),
        backend(app, "c-us", "us", "US", 3),
        backend(app, "d-ap", "ap", "JP", 4),
    ];
    let mut full = healthy.clone();
    full[0].hard_limit = 1;
    let mut unhealthy = healthy.clone();
    for b in &mut unhealthy {
        b.healthy = false;
    }
    let client = |ip: &str, country: Option<&str>, region: Option<&str>| Client {
        ip: ip.parse().expect("valid test IP"),
        country: country.map(|c| c.parse().expect("valid test country")),
        region: region.map(Region::new),
        via_proxy_protocol: false,
    };
    let br = client("200.147.3.157", Some("BR"), Some("sa"));
    let cases: [(&'static str, &[Backend], Client, &[u32]); 5] = [
        (
            "client in BR, four healthy backends",
            &healthy,
            br.clone(),
            &[0, 0, 0, 0],
        ),
        (
            "client with no GeoIP country",
            &healthy,
            client("10.1.2.3", None, None),
            &[0; 4],
        ),
        (
            "IPv6 client in DE",
            &healthy,
            client("2a01:4f8::1", Some("DE"), Some("eu")),
            &[0; 4],
        ),
        (
            "the BR backend at its hard limit",
            &full,
            br.clone(),
            &[1, 0, 0, 0],
        ),
        ("every backend unhealthy", &unhealthy, br, &[0; 4]),
    ];
    let pop = Region::new("eu");
    cases
        .into_iter()
        .enumerate()
        .map(|(version, (scenario, backends, client, active))| {
            let table = RoutingTable::new(version as u64 + 1, backends.to_vec(), |_| {
                Arc::new(BackendStats::default())
            });
            let _held: Vec<_> = table
                .backends()
                .iter()
                .zip(active)
                .flat_map(|(rb, &n)| (0..n).map(|_| rb.stats.acquire()))
                .collect();
            let req = PickRequest {
                table: &table,
                pop_region: &pop,
                app: Some(app),
                client: &client,
            };
            let (answer, ok) = match policy.try_pick(&req, table.backends()) {
                Ok(Some(i)) => (table.backends()[i].backend.id.to_string(), true),
                Ok(None) => ("refused".into(), true),
                Err(fault) => (fault, false),
            };
            CheckedDecision {
                scenario,
                answer,
                ok,
            }
        })
        .collect()
}

/// The check report as text.
pub fn render_check(r: &CheckReport) -> String {
    let mut out = String::new();
    // `let _ =` below: writing to a String cannot fail.
    let _ = writeln!(out, "file:      {} ({} bytes, {})", r.file, r.bytes, r.kind);
    if let Some(hash) = &r.hash {
        let _ = writeln!(out, "hash:      {hash}");
    }
    let _ = writeln!(out, "imports:   {}", list(&r.imports));
    let _ = writeln!(out, "exports:   {}", list(&r.exports));
    if !r.decisions.is_empty() {
        let _ = writeln!(out, "decisions:");
        let width = r
            .decisions
            .iter()
            .map(|d| d.scenario.len())
            .max()
            .unwrap_or(0);
        for d in &r.decisions {
            let mark = if d.ok { "" } else { "  <- FAULT" };
            let _ = writeln!(out, "  {:<width$}  -> {}{mark}", d.scenario, d.answer);
        }
    }
    let _ = match &r.rejected {
        None => writeln!(
            out,
            "verdict:   OK, ready to deploy (policy_path = {:?})",
            r.file
        ),
        Some(why) => writeln!(out, "verdict:   REJECTED: {why}"),
    };
    out
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "(none)".into()
    } else {
        items.join(", ")
    }
}

/// What `simulate` needs besides the policy.
pub struct SimulateInput {
    pub policy: Option<PathBuf>,
    pub db: PathBuf,
    pub geoip: Option<PathBuf>,
    pub client: IpAddr,
    pub pop_region: Region,
    pub app: Option<String>,
    pub regions: RegionMap,
    pub limits: Limits,
    /// Simulated open connections per backend id.
    pub load: Vec<(String, u32)>,
}

#[derive(Debug, Serialize)]
pub struct Simulation {
    pub client: ClientView,
    pub pop_region: String,
    pub app: Option<String>,
    pub geoip: String,
    pub policy: String,
    pub candidates: Vec<CandidateView>,
    pub skipped_rows: Vec<String>,
    /// The policy's pick (backend id), None for a refusal, or its fault.
    pub policy_pick: Result<Option<String>, String>,
    pub native_pick: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ClientView {
    pub ip: IpAddr,
    pub country: Option<String>,
    pub region: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct CandidateView {
    pub id: String,
    pub app: String,
    pub region: String,
    pub country: String,
    pub addr: String,
    pub healthy: bool,
    pub weight: u32,
    pub soft_limit: u32,
    pub hard_limit: u32,
    pub active: u32,
    pub eligible: bool,
    pub geo_score: u32,
    /// The native scorer's score (lower wins).
    pub native_score: f64,
}

/// One decision for `input.client` on the real table, by the policy and natively.
pub fn simulate(input: SimulateInput) -> anyhow::Result<Simulation> {
    let geo = match &input.geoip {
        Some(p) => MaxMindGeo::open(p)?,
        None => MaxMindGeo::embedded()?,
    };
    let loaded = SqliteBackendRepository::new(&input.db).load()?;
    let skipped_rows = loaded
        .skipped
        .iter()
        .map(|s| format!("{}: {}", s.id, s.reason))
        .collect();
    let table = RoutingTable::new(1, loaded.backends, |_| Arc::new(BackendStats::default()));
    let mut held = Vec::new();
    for (id, n) in &input.load {
        let rb = table
            .backends()
            .iter()
            .find(|rb| rb.backend.id.as_str() == id)
            .with_context(|| format!("--load {id}={n}: no backend with that id"))?;
        held.extend((0..*n).map(|_| rb.stats.acquire()));
    }
    let ip = input.client.to_canonical();
    let country = geo.country(ip);
    let client = Client {
        ip,
        country,
        region: country.map(|c| input.regions.region_of(c)),
        via_proxy_protocol: false,
    };
    let candidates = table.candidates(input.app.as_deref());
    let req = PickRequest {
        table: &table,
        pop_region: &input.pop_region,
        app: input.app.as_deref(),
        client: &client,
    };
    let runtime = Arc::new(Runtime::new(input.limits)?);
    let loaded_policy = match &input.policy {
        Some(path) => load_file(&runtime, path)?,
        None => LoadedPolicy::load(&runtime, wasm::DEFAULT_POLICY_NAME, wasm::DEFAULT_POLICY)?,
    };
    let policy_name = format!("{} ({})", loaded_policy.name, loaded_policy.hash);
    let mut client_regions: Vec<Region> = input.regions.regions().cloned().collect();
    client_regions.sort();
    client_regions.dedup();
    let policy = WasmPolicy::new(runtime, client_regions, loaded_policy);
    let id_of = |i: usize| candidates[i].backend.id.to_string();
    let policy_pick = policy
        .try_pick(&req, candidates)
        .map(|answer| answer.map(id_of));
    let native_pick = NativeScorer.pick(&req, candidates).map(id_of);
    let simulation = Simulation {
        client: ClientView {
            ip,
            country: client.country.map(|c| c.to_string()),
            region: client.region.as_ref().map(Region::to_string),
        },
        pop_region: input.pop_region.to_string(),
        app: input.app.clone(),
        geoip: geo.describe(),
        policy: policy_name,
        candidates: candidates
            .iter()
            .map(|c| view(c, &client, &input.pop_region))
            .collect(),
        skipped_rows,
        policy_pick,
        native_pick,
    };
    drop(held); // the simulated connections count until the views are taken
    Ok(simulation)
}

fn view(c: &RoutedBackend, client: &Client, pop: &Region) -> CandidateView {
    let b = &c.backend;
    CandidateView {
        id: b.id.to_string(),
        app: b.app.to_string(),
        region: b.region.to_string(),
        country: b.country.to_string(),
        addr: b.addr.to_string(),
        healthy: b.healthy,
        weight: b.weight,
        soft_limit: b.soft_limit,
        hard_limit: b.hard_limit,
        active: c.stats.active(),
        eligible: c.is_eligible(),
        geo_score: scoring::geo_score(b, client, pop),
        native_score: scoring::score(c, client, pop),
    }
}

/// The simulation as text.
pub fn render_simulation(s: &Simulation) -> String {
    let mut out = String::new();
    // `let _ =` below: writing to a String cannot fail.
    let or_unknown = |v: &Option<String>| v.clone().unwrap_or_else(|| "unknown".into());
    let _ = writeln!(
        out,
        "client:     {} (country {}, region {})",
        s.client.ip,
        or_unknown(&s.client.country),
        or_unknown(&s.client.region)
    );
    let _ = writeln!(out, "geoip:      {}", s.geoip);
    let _ = writeln!(
        out,
        "pop region: {}; app: {}",
        s.pop_region,
        s.app.as_deref().unwrap_or("(any)")
    );
    let _ = writeln!(out, "policy:     {}", s.policy);
    for row in &s.skipped_rows {
        let _ = writeln!(out, "skipped:    {row}");
    }
    out.push('\n');
    let header = [
        "ID", "APP", "REGION", "COUNTRY", "ADDRESS", "HEALTHY", "WEIGHT", "SOFT", "HARD", "ACTIVE",
        "ELIGIBLE", "GEO", "SCORE",
    ];
    let rows: Vec<Vec<String>> = s
        .candidates
        .iter()
        .map(|c| {
            vec![
                c.id.clone(),
                c.app.clone(),
                c.region.clone(),
                c.country.clone(),
                c.addr.clone(),
                yes_no(c.healthy),
                c.weight.to_string(),
                c.soft_limit.to_string(),
                c.hard_limit.to_string(),
                c.active.to_string(),
                yes_no(c.eligible),
                c.geo_score.to_string(),
                format!("{:.3}", c.native_score),
            ]
        })
        .collect();
    out += &cli_output::render(&header, &rows);
    if s.candidates.is_empty() {
        let _ = writeln!(out, "(no backends for this app)");
    }
    out.push('\n');
    let pick = match &s.policy_pick {
        Ok(Some(id)) => id.clone(),
        Ok(None) => "refused".into(),
        Err(fault) => format!("FAULT ({fault}); the proxy would use the native pick"),
    };
    let _ = writeln!(out, "policy pick: {pick}");
    let _ = writeln!(
        out,
        "native pick: {}",
        s.native_pick.as_deref().unwrap_or("refused")
    );
    out
}
