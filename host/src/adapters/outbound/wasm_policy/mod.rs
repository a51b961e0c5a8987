//! The scoring port implemented by a WebAssembly component (`wit/policy.wit`).
//!
//! Each loaded policy keeps a small pool of instances, one per thread deciding at the
//! same moment, so a `Store` is never shared and a policy may keep state between calls.
//! The routing table crosses into an instance once per table version; a decision passes
//! only integers. A trap, a timeout, or an answer that is out of range or names an
//! ineligible backend is a fault: the instance is dropped (the next call gets a fresh
//! one), the fault is counted and logged, and the native scorer decides that connection.
//! Swapping in a new policy is one atomic pointer store; calls in flight finish on the
//! old one.

mod bindings;
pub mod reload;
pub mod runtime;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::{ArcSwap, ArcSwapOption};
use wasmtime::Store;

use self::bindings::edgeproxy::policy::types as wit;
use self::bindings::{Policy, PolicyPre};
use self::runtime::{Component, GuestState, LoadError, Runtime};
use crate::application::admin::{ErrorAt, PolicyControl, PolicyFaults, PolicyStatus, timestamp};
use crate::application::telemetry::LogThrottle;
use crate::domain::ports::{PickRequest, ScoringPolicy};
use crate::domain::services::NativeScorer;
use crate::domain::{CountryCode, Region, RoutedBackend, RoutingTable};

/// `set-table` copies the whole table in; it gets this many call budgets.
const SET_TABLE_BUDGETS: u64 = 20;

/// The default policy (`policies/geo-load`), built by `edgeproxy policy build`.
pub static DEFAULT_POLICY: &[u8] = include_bytes!("../../../../../policies/geo-load/geo-load.wasm");
pub const DEFAULT_POLICY_NAME: &str = "geo-load (embedded)";

/// A compiled, self-tested policy and its instances.
pub struct LoadedPolicy {
    pub name: Arc<str>,
    /// Content fingerprint (hex), to tell versions apart in logs and status.
    pub hash: String,
    pub loaded_at: SystemTime,
    /// (length, mtime) of the file it was read from, so the watcher knows what it has.
    source: Option<(u64, SystemTime)>,
    /// Decisions this policy made (faults excluded).
    pub decisions: AtomicU64,
    pre: PolicyPre<GuestState>,
    idle: Mutex<Vec<Instance>>,
}

struct Instance {
    store: Store<GuestState>,
    policy: Policy,
    /// Version of the routing table this instance was last given.
    table_version: Option<u64>,
    /// Reused per call so a decision allocates nothing once warm: (backend index,
    /// active, rtt) per candidate, flattened as the contract passes them.
    candidates: Vec<u32>,
}

/// The routing table in its WIT form, built once per version and shared by all instances.
struct WitTable {
    version: u64,
    table: wit::RoutingTable,
    regions: Vec<Region>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    Trap,
    Timeout,
    BadAnswer,
    Instantiate,
}

impl std::fmt::Display for FaultKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FaultKind::Trap => "trap",
            FaultKind::Timeout => "timeout",
            FaultKind::BadAnswer => "bad answer",
            FaultKind::Instantiate => "instantiation failed",
        })
    }
}

#[derive(Debug, Default)]
pub struct FaultCounts {
    pub traps: AtomicU64,
    pub timeouts: AtomicU64,
    pub bad_answers: AtomicU64,
    pub instantiate_failures: AtomicU64,
}

impl FaultCounts {
    fn count(&self, kind: FaultKind) {
        let c = match kind {
            FaultKind::Trap => &self.traps,
            FaultKind::Timeout => &self.timeouts,
            FaultKind::BadAnswer => &self.bad_answers,
            FaultKind::Instantiate => &self.instantiate_failures,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn total(&self) -> u64 {
        [
            &self.traps,
            &self.timeouts,
            &self.bad_answers,
            &self.instantiate_failures,
        ]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
    }
}

pub struct WasmPolicy {
    runtime: Arc<Runtime>,
    current: ArcSwap<LoadedPolicy>,
    table: ArcSwapOption<WitTable>,
    /// Regions a client can be in (the country map's), so every client region has an id.
    client_regions: Vec<Region>,
    pub faults: FaultCounts,
    /// Policy file reloads swapped in, and rejected.
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
    /// Bumped after every reload attempt, for whoever waits on one (tests, admin).
    reload_events: tokio::sync::watch::Sender<u64>,
    /// The file it was loaded from and is reloaded from; None for the embedded default.
    path: Option<PathBuf>,
    last_error: Mutex<Option<(SystemTime, String)>>,
    /// Fault warnings, at most one a second (`suppressed` says how many were not logged).
    fault_log: LogThrottle,
}

struct Fault {
    kind: FaultKind,
    cause: String,
}

impl LoadedPolicy {
    /// Compiles `bytes`, instantiates them and runs a self-test decision. Blocking.
    pub fn load(runtime: &Runtime, name: &str, bytes: &[u8]) -> Result<Self, LoadError> {
        Self::from_compiled(runtime, name, bytes, &runtime.compile(bytes)?)
    }

    /// As [`Self::load`], for a component already compiled from `bytes`.
    pub fn from_compiled(
        runtime: &Runtime,
        name: &str,
        bytes: &[u8],
        component: &Component,
    ) -> Result<Self, LoadError> {
        let pre = runtime.link(component)?;
        let loaded = Self {
            name: Arc::from(name),
            hash: fingerprint(bytes),
            loaded_at: SystemTime::now(),
            source: None,
            decisions: AtomicU64::new(0),
            pre,
            idle: Mutex::new(Vec::new()),
        };
        loaded.self_test(runtime)?;
        Ok(loaded)
    }

    /// One decision on a synthetic table: the policy must answer in range, in time.
    fn self_test(&self, runtime: &Runtime) -> Result<(), LoadError> {
        let fail = |e: wasmtime::Error| LoadError::SelfTest(describe(&e).1);
        let (mut store, policy) = runtime.instantiate(&self.pre, &self.name).map_err(fail)?;
        let backend = |id: &str, region: u32, country: &str| wit::Backend {
            id: id.into(),
            app: 0,
            region,
            country: country_code(country.parse().expect("valid test country")),
            weight: 1,
            soft_limit: 100,
            hard_limit: 0,
            healthy: true,
        };
        let table = wit::RoutingTable {
            version: 1,
            pop_region: 0,
            regions: vec!["sa".into(), "eu".into(), "us".into(), "ap".into()],
            apps: vec!["selftest".into()],
            backends: vec![
                backend("a-sa", 0, "BR"),
                backend("b-eu", 1, "DE"),
                backend("c-us", 2, "US"),
                backend("d-ap", 3, "JP"),
            ],
        };
        runtime.arm(&mut store, SET_TABLE_BUDGETS);
        policy.call_set_table(&mut store, &table).map_err(fail)?;
        let client = wit::Client {
            ip: wit::IpAddress::Ipv4(u32::from_be_bytes([200, 147, 3, 157])),
            country: Some(country_code("BR".parse().expect("valid test country"))),
            region: Some(0),
            via_proxy_protocol: false,
        };
        let candidates: Vec<u32> = (0..4).flat_map(|i| [i, i, 0]).collect();
        runtime.arm(&mut store, 1);
        match policy.call_pick_backend(&mut store, Some(0), client, &candidates) {
            Ok(None) => Ok(()),
            Ok(Some(i)) if i < 4 => Ok(()),
            Ok(Some(i)) => Err(LoadError::SelfTest(format!("answered {i} of 4 candidates"))),
            Err(e) => Err(fail(e)),
        }
    }
}

impl WasmPolicy {
    pub fn new(runtime: Arc<Runtime>, client_regions: Vec<Region>, first: LoadedPolicy) -> Self {
        Self {
            runtime,
            current: ArcSwap::from_pointee(first),
            table: ArcSwapOption::empty(),
            client_regions,
            faults: FaultCounts::default(),
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
            reload_events: tokio::sync::watch::Sender::new(0),
            path: None,
            last_error: Mutex::new(None),
            fault_log: LogThrottle::new(std::time::Duration::from_secs(1)),
        }
    }

    /// Marks the policy as loaded from `path`, which reloads re-read.
    pub fn with_path(mut self, path: PathBuf) -> Self {
        self.path = Some(path);
        self
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// When and why the last rejected reload failed.
    pub fn last_error(&self) -> Option<(SystemTime, String)> {
        self.last_error.lock().expect("policy error lock").clone()
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    pub fn current(&self) -> Arc<LoadedPolicy> {
        self.current.load_full()
    }

    /// Swaps in a freshly loaded file, or records why it was rejected. Ok(false) when the
    /// file holds the policy already serving (it is kept, with its instances).
    pub fn apply(
        &self,
        loaded: Result<LoadedPolicy, reload::PolicyFileError>,
    ) -> Result<bool, String> {
        match loaded {
            Ok(next) if next.hash == self.current.load().hash => {
                self.reload_events.send_modify(|n| *n += 1);
                Ok(false)
            }
            Ok(next) => {
                self.swap(next);
                Ok(true)
            }
            Err(e) => {
                tracing::error!(error = %e, "policy rejected; the previous policy keeps serving");
                *self.last_error.lock().expect("policy error lock") =
                    Some((SystemTime::now(), e.to_string()));
                self.reload_failures.fetch_add(1, Ordering::Relaxed);
                self.reload_events.send_modify(|n| *n += 1);
                Err(e.to_string())
            }
        }
    }

    /// Makes `next` serve new decisions; decisions in flight finish on the old policy.
    pub fn swap(&self, next: LoadedPolicy) {
        tracing::info!(policy = %next.name, hash = %next.hash, "policy swapped in");
        self.current.store(Arc::new(next));
        self.reloads.fetch_add(1, Ordering::Relaxed);
        self.reload_events.send_modify(|n| *n += 1);
    }

    /// Changes after every reload attempt (swapped in or rejected).
    pub fn reload_events(&self) -> tokio::sync::watch::Receiver<u64> {
        self.reload_events.subscribe()
    }

    /// One decision with no native fallback: a fault comes back described (for
    /// `policy check` and `policy simulate`).
    pub fn try_pick(
        &self,
        req: &PickRequest<'_>,
        candidates: &[RoutedBackend],
    ) -> Result<Option<usize>, String> {
        let loaded = self.current.load();
        self.decide(&loaded, req, candidates)
            .map_err(|f| format!("{}: {}", f.kind, f.cause))
    }

    fn wit_table(&self, table: &RoutingTable, pop_region: &Region) -> Arc<WitTable> {
        if let Some(t) = self
            .table
            .load_full()
            .filter(|t| t.version == table.version())
        {
            return t;
        }
        let built = Arc::new(build_wit_table(table, pop_region, &self.client_regions));
        self.table.store(Some(Arc::clone(&built)));
        built
    }

    fn decide(
        &self,
        loaded: &LoadedPolicy,
        req: &PickRequest<'_>,
        candidates: &[RoutedBackend],
    ) -> Result<Option<usize>, Fault> {
        let table = self.wit_table(req.table, req.pop_region);
        let idle = loaded.idle.lock().expect("policy pool lock").pop();
        let mut inst = match idle {
            Some(i) => i,
            None => {
                let (store, policy) = self
                    .runtime
                    .instantiate(&loaded.pre, &loaded.name)
                    .map_err(|e| Fault {
                        kind: FaultKind::Instantiate,
                        cause: describe(&e).1,
                    })?;
                Instance {
                    store,
                    policy,
                    table_version: None,
                    candidates: Vec::new(),
                }
            }
        };
        let fault = |e: wasmtime::Error| {
            let (kind, cause) = describe(&e);
            Fault { kind, cause }
        };
        if inst.table_version != Some(table.version) {
            self.runtime.arm(&mut inst.store, SET_TABLE_BUDGETS);
            inst.policy
                .call_set_table(&mut inst.store, &table.table)
                .map_err(fault)?;
            inst.table_version = Some(table.version);
        }
        inst.candidates.clear();
        for c in candidates {
            let rtt = u32::try_from(c.stats.rtt_us()).unwrap_or(u32::MAX);
            inst.candidates
                .extend_from_slice(&[c.index, c.stats.active(), rtt]);
        }
        let client = wit::Client {
            ip: match req.client.ip {
                std::net::IpAddr::V4(v4) => wit::IpAddress::Ipv4(v4.to_bits()),
                std::net::IpAddr::V6(v6) => {
                    let bits = v6.to_bits();
                    wit::IpAddress::Ipv6(((bits >> 64) as u64, bits as u64))
                }
            },
            country: req.client.country.map(country_code),
            region: req
                .client
                .region
                .as_ref()
                .and_then(|r| index_of(&table.regions, r)),
            via_proxy_protocol: req.client.via_proxy_protocol,
        };
        let app = req
            .app
            .and_then(|a| table.table.apps.iter().position(|x| x == a))
            .map(|i| i as u32);
        self.runtime.arm(&mut inst.store, 1);
        let answer = inst
            .policy
            .call_pick_backend(&mut inst.store, app, client, &inst.candidates)
            .map_err(fault)?;
        let bad = |cause: String| {
            Err(Fault {
                kind: FaultKind::BadAnswer,
                cause,
            })
        };
        let decision = match answer {
            None => None,
            Some(i) => match candidates.get(i as usize) {
                Some(c) if c.is_eligible() => Some(i as usize),
                Some(c) => {
                    return bad(format!(
                        "chose {} which is unhealthy or at its hard limit",
                        c.backend.id
                    ));
                }
                None => return bad(format!("answered {i} of {} candidates", candidates.len())),
            },
        };
        // A sound answer: the instance goes back to the pool (after a fault it is dropped,
        // so the next decision gets a fresh one).
        loaded.idle.lock().expect("policy pool lock").push(inst);
        Ok(decision)
    }
}

impl PolicyControl for WasmPolicy {
    fn status(&self) -> PolicyStatus {
        let current = self.current();
        let count = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PolicyStatus {
            kind: "wasm",
            name: current.name.to_string(),
            hash: Some(current.hash.clone()),
            path: self.path.as_ref().map(|p| p.display().to_string()),
            loaded_at: Some(timestamp(current.loaded_at)),
            reloads: count(&self.reloads),
            reload_failures: count(&self.reload_failures),
            last_error: self.last_error().map(|(at, m)| ErrorAt::new(at, m)),
            faults: PolicyFaults {
                traps: count(&self.faults.traps),
                timeouts: count(&self.faults.timeouts),
                bad_answers: count(&self.faults.bad_answers),
                instantiate_failures: count(&self.faults.instantiate_failures),
            },
            decisions: count(&current.decisions),
        }
    }

    fn reload(&self) -> Result<bool, String> {
        match &self.path {
            Some(path) => self.apply(reload::load_file(&self.runtime, path)),
            None => Ok(false),
        }
    }
}

impl ScoringPolicy for WasmPolicy {
    fn name(&self) -> &str {
        "wasm"
    }

    fn pick(&self, req: &PickRequest<'_>, candidates: &[RoutedBackend]) -> Option<usize> {
        let loaded = self.current.load();
        match self.decide(&loaded, req, candidates) {
            Ok(answer) => {
                loaded.decisions.fetch_add(1, Ordering::Relaxed);
                answer
            }
            Err(f) => {
                self.faults.count(f.kind);
                if let Some(suppressed) = self.fault_log.allow() {
                    tracing::warn!(policy = %loaded.name, fault = ?f.kind, cause = %f.cause, suppressed, "policy fault; native scorer decides this connection");
                }
                NativeScorer.pick(req, candidates)
            }
        }
    }
}

fn build_wit_table(
    table: &RoutingTable,
    pop_region: &Region,
    client_regions: &[Region],
) -> WitTable {
    let mut regions: Vec<Region> = Vec::new();
    let intern = |r: &Region, regions: &mut Vec<Region>| match index_of(regions, r) {
        Some(i) => i,
        None => {
            regions.push(r.clone());
            (regions.len() - 1) as u32
        }
    };
    let pop = intern(pop_region, &mut regions);
    for r in client_regions {
        intern(r, &mut regions);
    }
    let mut apps: Vec<String> = Vec::new();
    let backends = table
        .backends()
        .iter()
        .map(|rb| {
            let b = &rb.backend;
            let app = match apps.iter().position(|a| **a == *b.app) {
                Some(i) => i,
                None => {
                    apps.push(b.app.to_string());
                    apps.len() - 1
                }
            };
            wit::Backend {
                id: b.id.to_string(),
                app: app as u32,
                region: intern(&b.region, &mut regions),
                country: country_code(b.country),
                weight: b.weight,
                soft_limit: b.soft_limit,
                hard_limit: b.hard_limit,
                healthy: b.healthy,
            }
        })
        .collect();
    WitTable {
        version: table.version(),
        table: wit::RoutingTable {
            version: table.version(),
            pop_region: pop,
            regions: regions.iter().map(|r| r.as_str().to_owned()).collect(),
            apps,
            backends,
        },
        regions,
    }
}

fn index_of(regions: &[Region], r: &Region) -> Option<u32> {
    regions.iter().position(|x| x == r).map(|i| i as u32)
}

/// "BR" -> 0x4252, as the WIT contract packs countries.
fn country_code(c: CountryCode) -> u16 {
    u16::from_be_bytes(c.bytes())
}

/// Fault kind and a one-line cause for a failed guest call.
fn describe(e: &wasmtime::Error) -> (FaultKind, String) {
    match e.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::OutOfFuel) => (FaultKind::Timeout, "ran past its time budget".into()),
        Some(trap) => (FaultKind::Trap, format!("trapped: {trap}")),
        None => (FaultKind::Trap, format!("{:#}", e)),
    }
}

fn fingerprint(bytes: &[u8]) -> String {
    use std::hash::{DefaultHasher, Hasher};
    let mut h = DefaultHasher::new();
    h.write(bytes);
    format!("{:016x}", h.finish())
}
