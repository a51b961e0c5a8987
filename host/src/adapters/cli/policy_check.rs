//! `edgeproxy policy check`: loads a component as the proxy would and runs decisions on
//! the sample table (a pick must be eligible; refusing is allowed), listing the
//! component's imports and exports and a verdict.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use serde::Serialize;

use std::fmt::Write as _;

use crate::adapters::outbound::wasm_policy::runtime::{Runtime, describe_kind, wasi_grant};
use crate::adapters::outbound::wasm_policy::{LoadedPolicy, WasmPolicy};
use crate::domain::ports::PickRequest;
use crate::domain::sample;
use crate::domain::{Backend, BackendStats, Client, Region, RoutingTable};

#[derive(Debug, Serialize)]
pub struct CheckReport {
    pub file: String,
    pub bytes: usize,
    pub kind: &'static str,
    pub imports: Vec<String>,
    /// The WASI interfaces among `imports`, with what the proxy grants each.
    pub wasi: Vec<WasiImport>,
    pub exports: Vec<String>,
    pub hash: Option<String>,
    /// The contract version (`wit/`) it was linked against.
    pub contract: Option<&'static str>,
    pub decisions: Vec<CheckedDecision>,
    /// None when the component may be deployed; else why not.
    pub rejected: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct WasiImport {
    pub interface: String,
    /// What the policy gets from it; "refused at load" for one it may not import.
    pub granted: &'static str,
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
pub fn check(file: &Path, runtime: Runtime, app: &str) -> anyhow::Result<CheckReport> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let runtime = Arc::new(runtime);
    let mut report = CheckReport {
        file: file.display().to_string(),
        bytes: bytes.len(),
        kind: describe_kind(&bytes),
        imports: Vec::new(),
        wasi: Vec::new(),
        exports: Vec::new(),
        hash: None,
        contract: None,
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
    report.wasi = report
        .imports
        .iter()
        .filter(|i| i.starts_with("wasi:"))
        .map(|i| WasiImport {
            interface: i.clone(),
            granted: wasi_grant(i).unwrap_or("refused at load"),
        })
        .collect();
    let name = file.display().to_string();
    let loaded = match LoadedPolicy::from_compiled(&runtime, &name, &bytes, &component) {
        Ok(l) => l,
        Err(e) => {
            report.rejected = Some(e.to_string());
            return Ok(report);
        }
    };
    report.hash = Some(loaded.hash.clone());
    report.contract = Some(loaded.contract());
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

/// Decisions any sound policy answers without a fault: a pick must name an eligible
/// candidate; refusing is always allowed (a policy may refuse by design).
fn scenarios(policy: &WasmPolicy, app: &str) -> Vec<CheckedDecision> {
    let healthy = sample::backends(app);
    let mut full = healthy.clone();
    full[0].hard_limit = 1;
    let mut unhealthy = healthy.clone();
    for b in &mut unhealthy {
        b.healthy = false;
    }
    let client = sample::client;
    let br = sample::client_in_brazil();
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
    let others: Vec<String> = r
        .imports
        .iter()
        .filter(|i| !i.starts_with("wasi:"))
        .cloned()
        .collect();
    if let Some(contract) = r.contract {
        let _ = writeln!(out, "contract:  edgeproxy:policy@{contract}");
    }
    let _ = writeln!(out, "imports:   {}", list(&others));
    if !r.wasi.is_empty() {
        let _ = writeln!(out, "WASI:      granted nothing beyond what each line says");
        let width = r.wasi.iter().map(|w| w.interface.len()).max().unwrap_or(0);
        for w in &r.wasi {
            let _ = writeln!(out, "  {:<width$}  {}", w.interface, w.granted);
        }
    }
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
