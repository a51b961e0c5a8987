//! `edgeproxy policy simulate`: one decision for a real client on a real routing table and
//! GeoIP database, every candidate with its fields and native score, the policy's pick
//! beside the native scorer's.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use serde::Serialize;

use std::fmt::Write as _;

use super::output::{self, yes_no};
use crate::adapters::outbound::maxmind_geo::MaxMindGeo;
use crate::adapters::outbound::sqlite_routing::SqliteBackendRepository;
use crate::adapters::outbound::wasm_policy::reload::load_file;
use crate::adapters::outbound::wasm_policy::runtime::{Limits, Runtime};
use crate::adapters::outbound::wasm_policy::{self as wasm, LoadedPolicy, WasmPolicy};
use crate::domain::ports::{BackendRepository, GeoResolver, PickRequest, ScoringPolicy};
use crate::domain::services::{NativeScorer, RegionMap, scoring};
use crate::domain::{BackendStats, Client, Region, RoutedBackend, RoutingTable};

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
        tls: None,
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
    let client_regions = input.regions.client_regions();
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
    out += &output::render(&header, &rows);
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
