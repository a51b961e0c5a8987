//! `edgeproxy policy replay`: a component run over recorded decisions (`GET /decisions`)
//! on the routing table, offline, reported in the shape of the shadow report: where it
//! would have picked as the live policy did, and where not.

use std::io::BufRead as _;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use serde::Serialize;

use crate::adapters::outbound::sqlite_routing::SqliteBackendRepository;
use crate::adapters::outbound::wasm_policy::WasmPolicy;
use crate::adapters::outbound::wasm_policy::reload::load_file;
use crate::adapters::outbound::wasm_policy::runtime::{Limits, Runtime};
use crate::application::decision_log::DecisionRecord;
use crate::application::shadow::{Shadow, ShadowReport};
use crate::domain::ports::{BackendRepository, PickRequest, ShadowPolicy};
use crate::domain::services::RegionMap;
use crate::domain::{BackendStats, Client, Region, RoutedBackend, RoutingTable};

pub struct ReplayInput {
    pub policy: PathBuf,
    pub decisions: PathBuf,
    pub db: PathBuf,
    pub regions: RegionMap,
    pub limits: Limits,
}

#[derive(Debug, Serialize)]
pub struct Replay {
    pub decisions: usize,
    /// Records not replayed, with why (a candidate gone from the table).
    pub skipped: usize,
    pub skipped_examples: Vec<String>,
    /// The recorded picks as "live", the replayed component as "shadow".
    #[serde(flatten)]
    pub report: ShadowReport,
}

pub fn replay(input: ReplayInput) -> anyhow::Result<Replay> {
    let rows = SqliteBackendRepository::new(&input.db).load()?;
    let table = RoutingTable::new(1, rows.backends, |_| Arc::new(BackendStats::default()));
    let runtime = Arc::new(Runtime::new(input.limits)?);
    let loaded = load_file(&runtime, &input.policy)?;
    let client_regions = input.regions.client_regions();
    let policy: Arc<dyn ShadowPolicy> = Arc::new(WasmPolicy::new(runtime, client_regions, loaded));
    let shadow = Shadow::new(policy, 100);
    let file = std::fs::File::open(&input.decisions)
        .with_context(|| format!("opening {}", input.decisions.display()))?;
    let (mut decisions, mut skipped, mut examples) = (0, 0, Vec::new());
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", input.decisions.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let record: DecisionRecord = serde_json::from_str(&line).with_context(|| {
            format!(
                "{}: line {}: not a recorded decision",
                input.decisions.display(),
                n + 1
            )
        })?;
        match candidates(&table, &record) {
            Ok(candidates) => {
                let client = Client {
                    ip: record.client,
                    country: record.country.as_deref().and_then(|c| c.parse().ok()),
                    region: record.region.as_deref().map(Region::new),
                    via_proxy_protocol: record.via_proxy_protocol,
                    tls: (record.sni.is_some() || !record.alpn.is_empty()).then(|| {
                        std::sync::Arc::new(crate::domain::server_names::TlsHello {
                            sni: record.sni.as_deref().map(Into::into),
                            alpn: record.alpn.iter().map(|p| p.as_str().into()).collect(),
                            negotiated: None,
                        })
                    }),
                };
                let pop_region = Region::new(&record.pop_region);
                let req = PickRequest {
                    table: &table,
                    pop_region: &pop_region,
                    app: record.app.as_deref(),
                    client: &client,
                };
                let live = record
                    .pick
                    .as_ref()
                    .and_then(|id| candidates.iter().position(|c| c.backend.id.as_str() == id));
                shadow.observe(&req, &candidates, live);
                decisions += 1;
            }
            Err(why) => {
                skipped += 1;
                if examples.len() < 10 {
                    examples.push(format!("line {}: {why}", n + 1));
                }
            }
        }
    }
    Ok(Replay {
        decisions,
        skipped,
        skipped_examples: examples,
        report: shadow.report(),
    })
}

/// The recorded candidates, as they are in the table now, with the recorded loads and
/// local verdicts.
fn candidates(table: &RoutingTable, record: &DecisionRecord) -> Result<Vec<RoutedBackend>, String> {
    if record.omitted > 0 {
        return Err(format!(
            "{} of its candidates were not recorded (a record keeps {})",
            record.omitted,
            crate::application::decision_log::MAX_CANDIDATES
        ));
    }
    record
        .candidates
        .iter()
        .map(|c| {
            let i = table
                .backends()
                .binary_search_by(|b| b.backend.id.as_str().cmp(&c.id))
                .map_err(|_| format!("candidate {} is no longer in the routing table", c.id))?;
            Ok(RoutedBackend {
                stats: Arc::new(BackendStats::recorded(c.active, c.rtt_us, c.up)),
                ..table.backends()[i].clone()
            })
        })
        .collect()
}
