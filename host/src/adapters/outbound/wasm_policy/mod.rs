//! The scoring port implemented by a WebAssembly component (`wit/policy.wit`).
//!
//! Children: `loaded` (one compiled, self-tested policy and its instance pool), `wit_table`
//! (the table and client in the contract's form), `runtime` (engine and sandbox limits),
//! `reload` (the file watcher), `bindings` (generated). The routing table crosses into an
//! instance once per table version; a decision passes only integers. A trap, a timeout, or an answer that is out of range or names an
//! ineligible backend is a fault: the instance is dropped (the next call gets a fresh
//! one), the fault is counted and logged, and the native scorer decides that connection.
//! Swapping in a new policy is one atomic pointer store; calls in flight finish on the
//! old one.

mod bindings;

pub mod compile_cache;
mod guest_output;
mod loaded;
pub mod reload;
pub mod runtime;
mod slots;
mod wit_table;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use arc_swap::{ArcSwap, ArcSwapOption};

pub use self::loaded::LoadedPolicy;
use self::runtime::Runtime;
pub use self::slots::Slots;
use self::wit_table::WitTable;
use crate::domain::breaker;
use crate::domain::ports::{ErrorAt, PolicyControl, PolicyFaults, PolicyStatus, timestamp};
use crate::domain::ports::{PickRequest, ScoringPolicy, rank_by_picks};
use crate::domain::services::NativeScorer;
use crate::domain::{Region, RoutedBackend, RoutingTable};
use crate::log_throttle::LogThrottle;

/// `set-table` copies the whole table in; it gets this many call budgets, plus one per
/// `ROWS_PER_BUDGET` rows, since receiving a table is linear in its rows whatever the
/// policy does with them (measured 0.3 to 0.4 us per row for the default policy, so a
/// 1 ms budget covers 1,000 rows 2.5 times).
pub(crate) const SET_TABLE_BUDGETS: u64 = 20;
const ROWS_PER_BUDGET: u64 = 1_000;

/// Call budgets a `rank-backends` call gets at most (one per record of each client's
/// answer): a DNS batch is cut into calls of this many, 16 clients at the default one
/// alternate, so one call's cost is bounded while the guest is entered once per dozen
/// queries instead of once per query.
const RANK_BUDGETS: usize = 32;

/// Call budgets for `set-table` of a table with `rows` backends.
pub(crate) fn set_table_budgets(rows: usize) -> u64 {
    SET_TABLE_BUDGETS + rows as u64 / ROWS_PER_BUDGET
}

/// The default policy (`policies/geo-load`), built by `edgeproxy policy build`.
pub static DEFAULT_POLICY: &[u8] = include_bytes!("../../../../../policies/geo-load/geo-load.wasm");
pub const DEFAULT_POLICY_NAME: &str = "geo-load (embedded)";

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
    /// What served before the last promotion, for a rollback.
    before_promotion: Mutex<Option<Arc<LoadedPolicy>>>,
    /// Serialises reloads (the watcher and `POST /reload`) and holds the signature of
    /// the file version last tried, so an unchanged file is never compiled again.
    reloading: Mutex<Option<(u64, SystemTime)>>,
    /// Policy files read and compiled (reloads that found the file unchanged excluded).
    pub file_loads: AtomicU64,
    /// Fault warnings, at most one a second (`suppressed` says how many were not logged).
    fault_log: LogThrottle,
    /// Suspends a policy that keeps faulting.
    pub breaker: breaker::Breaker,
    /// Decisions the native scorer made while the policy was suspended.
    pub suspended_decisions: AtomicU64,
    /// Decisions that had to copy the table into their instance first (the rest found it
    /// there: see `prepare`).
    pub tables_copied_on_decision: AtomicU64,
    /// Tables copied into idle instances ahead of decisions (`prepare`).
    pub tables_copied_ahead: AtomicU64,
    /// A fleet deployment serves: the configured file is not reloaded meanwhile.
    held: AtomicBool,
    /// As a shadow: false while there is nothing to compare (no configured shadow and no
    /// deployed one), so the shadow costs the live path one atomic load.
    enabled: AtomicBool,
}

struct Fault {
    kind: FaultKind,
    cause: String,
}

impl WasmPolicy {
    pub fn new(runtime: Arc<Runtime>, client_regions: Vec<Region>, first: LoadedPolicy) -> Self {
        Self::serving(runtime, client_regions, Arc::new(first))
    }

    /// A policy serving `first`, which may be shared (an idle shadow holds the live one).
    pub fn serving(
        runtime: Arc<Runtime>,
        client_regions: Vec<Region>,
        first: Arc<LoadedPolicy>,
    ) -> Self {
        Self {
            runtime,
            current: ArcSwap::new(first),
            table: ArcSwapOption::empty(),
            client_regions,
            faults: FaultCounts::default(),
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
            reload_events: tokio::sync::watch::Sender::new(0),
            path: None,
            last_error: Mutex::new(None),
            before_promotion: Mutex::new(None),
            reloading: Mutex::new(None),
            file_loads: AtomicU64::new(0),
            fault_log: LogThrottle::new(std::time::Duration::from_secs(1)),
            breaker: breaker::Breaker::default(),
            suspended_decisions: AtomicU64::new(0),
            tables_copied_on_decision: AtomicU64::new(0),
            tables_copied_ahead: AtomicU64::new(0),
            held: AtomicBool::new(false),
            enabled: AtomicBool::new(true),
        }
    }

    /// Whether it decides as a shadow; a disabled shadow is never asked.
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// While held (a fleet deployment serves), the configured file is not reloaded.
    pub fn hold(&self, held: bool) {
        self.held.store(held, Ordering::Relaxed);
    }

    pub fn held(&self) -> bool {
        self.held.load(Ordering::Relaxed)
    }

    /// Serves this POP's configured policy again (the file, or the embedded default),
    /// releasing the hold (blocking).
    pub fn restore_configured(&self) -> Result<(), String> {
        let loaded =
            load_configured(&self.runtime, self.path.as_deref()).map_err(|e| format!("{e:#}"))?;
        self.hold(false);
        if loaded.hash != self.current.load().hash {
            self.swap(loaded);
        }
        Ok(())
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
        self.last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
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
                *self
                    .last_error
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) =
                    Some((SystemTime::now(), e.to_string()));
                self.reload_failures.fetch_add(1, Ordering::Relaxed);
                self.reload_events.send_modify(|n| *n += 1);
                Err(e.to_string())
            }
        }
    }

    /// Loads the policy file if it changed since it was last tried, and swaps it in
    /// (blocking). One reload at a time: a slow one can never store an older version
    /// after a newer one. Ok(false) when there is no file or it is unchanged.
    pub fn reload_file(&self) -> Result<bool, String> {
        let Some(path) = &self.path else {
            return Ok(false);
        };
        if self.held() {
            return Ok(false);
        }
        // Poisoning: the guarded value is only ever replaced whole.
        let mut tried = self
            .reloading
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let now = reload::signature(path);
        if now.is_some() && (now == *tried || now == self.current().source) {
            return Ok(false);
        }
        *tried = now;
        self.file_loads.fetch_add(1, Ordering::Relaxed);
        self.apply(reload::load_file(&self.runtime, path))
    }

    /// Makes `next` serve new decisions; decisions in flight finish on the old policy.
    pub fn swap(&self, next: LoadedPolicy) {
        tracing::info!(policy = %next.name, hash = %next.hash, "policy swapped in");
        self.serve(Arc::new(next));
    }

    /// `next` decides from now on; returns what it replaced.
    fn serve(&self, next: Arc<LoadedPolicy>) -> Arc<LoadedPolicy> {
        let replaced = self.current.swap(next);
        self.breaker.reset();
        self.reloads.fetch_add(1, Ordering::Relaxed);
        self.reload_events.send_modify(|n| *n += 1);
        replaced
    }

    /// Makes `next` (the shadow's policy, compiled by the same runtime) serve, keeping
    /// what it replaces (returned) for [`Self::rollback`]. Err when `next` is already
    /// serving or was compiled by another runtime.
    pub fn promote(
        &self,
        next: Arc<LoadedPolicy>,
        runtime: &Arc<Runtime>,
    ) -> Result<Arc<LoadedPolicy>, String> {
        if !Arc::ptr_eq(runtime, &self.runtime) {
            return Err("the shadow was compiled by another engine".into());
        }
        if next.hash == self.current.load().hash {
            return Err(format!("{} ({}) is serving already", next.name, next.hash));
        }
        tracing::info!(policy = %next.name, hash = %next.hash, "shadow policy promoted to live");
        let replaced = self.serve(next);
        *self
            .before_promotion
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Arc::clone(&replaced));
        Ok(replaced)
    }

    /// Brings back what served before the last promotion: (it, the promoted one).
    pub fn rollback(&self) -> Result<(Arc<LoadedPolicy>, Arc<LoadedPolicy>), String> {
        let before = self
            .before_promotion
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .ok_or("nothing to roll back to: no promotion since start")?;
        tracing::info!(policy = %before.name, hash = %before.hash, "rolled back to the policy before the promotion");
        let promoted = self.serve(Arc::clone(&before));
        Ok((before, promoted))
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
        self.decide(&loaded, req, candidates, &[])
            .map_err(|f| format!("{}: {}", f.kind, f.cause))
    }

    fn wit_table(&self, table: &RoutingTable, pop_region: &Region) -> Arc<WitTable> {
        if let Some(t) = self
            .table
            .load_full()
            .filter(|t| t.version == table.rows_version())
        {
            return t;
        }
        let built = Arc::new(wit_table::build(table, pop_region, &self.client_regions));
        self.table.store(Some(Arc::clone(&built)));
        built
    }

    /// A fault of the live policy: counted, logged (throttled), and past the breaker's
    /// limit the policy is suspended.
    fn faulted(&self, loaded: &LoadedPolicy, f: &Fault) {
        self.faults.count(f.kind);
        loaded.faults.fetch_add(1, Ordering::Relaxed);
        if let Some(backoff) = self.breaker.fault() {
            tracing::error!(policy = %loaded.name, faults = breaker::TRIP, within = ?breaker::WINDOW, ?backoff, cause = %f.cause, "policy suspended: the native scorer decides until the backoff ends, then the policy is tried again");
        } else if let Some(suppressed) = self.fault_log.allow() {
            tracing::warn!(policy = %loaded.name, fault = ?f.kind, cause = %f.cause, suppressed, "policy fault; native scorer decides this connection");
        }
    }

    /// An instance ready to decide among `candidates` less `left_out`: its copy of the
    /// table current, the candidates' numbers and positions filled in.
    fn ready(
        &self,
        loaded: &LoadedPolicy,
        req: &PickRequest<'_>,
        candidates: &[RoutedBackend],
        left_out: &[usize],
    ) -> Result<(loaded::Instance, Arc<WitTable>), Fault> {
        let table = self.wit_table(req.table, req.pop_region);
        let mut inst = loaded
            .instance(&self.runtime, table.version)
            .map_err(|e| Fault {
                kind: FaultKind::Instantiate,
                cause: describe(&e).1,
            })?;
        if inst.table_version != Some(table.version) {
            self.tables_copied_on_decision
                .fetch_add(1, Ordering::Relaxed);
            inst.take_table(&self.runtime, &table).map_err(|e| {
                let Fault { kind, cause } = fault(e);
                let rows = table.table.backends.len();
                let cause = format!("set-table of {rows} backends {cause}");
                Fault { kind, cause }
            })?;
        }
        inst.candidates.clear();
        inst.positions.clear();
        // Backends down here are left out rather than marked in the table: a verdict then
        // changes no instance's copy (in panic every one is up, see `health::local_view`).
        let offered = |(at, c): &(usize, &RoutedBackend)| c.up() && !left_out.contains(at);
        for (at, c) in candidates.iter().enumerate().filter(offered) {
            let rtt = u32::try_from(c.stats.rtt_us()).unwrap_or(u32::MAX);
            inst.candidates
                .extend_from_slice(&[c.index, c.stats.active(), rtt]);
            // Invariant: candidates come from one table (fewer than 2^32 rows).
            inst.positions.push(at as u32);
        }
        Ok((inst, table))
    }

    fn decide(
        &self,
        loaded: &LoadedPolicy,
        req: &PickRequest<'_>,
        candidates: &[RoutedBackend],
        left_out: &[usize],
    ) -> Result<Option<usize>, Fault> {
        let (mut inst, table) = self.ready(loaded, req, candidates, left_out)?;
        let client = table.client(req.client);
        let app = table.app(req.app);
        self.runtime.arm(&mut inst.store, 1);
        let answer = inst
            .policy
            .pick_backend(
                &mut inst.store,
                app,
                client,
                req.client.tls.as_ref(),
                &inst.candidates,
            )
            .map_err(fault)?;
        let decision = answer
            .map(|i| offered_at(&inst.positions, candidates, i))
            .transpose()?;
        // A sound answer: the instance goes back to the pool (after a fault it is dropped,
        // so the next decision gets a fresh one).
        loaded.put_back(inst);
        Ok(decision)
    }

    /// The component's rankings of up to `n` candidates for each request, in one call,
    /// checked; None when it has no `rank-backends`.
    fn decide_ranked(
        &self,
        loaded: &LoadedPolicy,
        requests: &[PickRequest<'_>],
        candidates: &[RoutedBackend],
        n: usize,
    ) -> Result<Option<Vec<Vec<usize>>>, RankFault> {
        let Some(first) = requests.first() else {
            return Ok(Some(Vec::new()));
        };
        debug_assert!(requests.iter().all(|r| r.app == first.app));
        let (mut inst, table) = self
            .ready(loaded, first, candidates, &[])
            .map_err(|fault| RankFault {
                fault,
                in_call: false,
            })?;
        if !inst.policy.ranks() {
            loaded.put_back(inst);
            return Ok(None);
        }
        let rankings = self
            .call_ranking(&mut inst, &table, requests, candidates, n)
            .map_err(|fault| RankFault {
                fault,
                in_call: true,
            })?;
        // A sound answer: the instance goes back (after a fault it is dropped).
        loaded.put_back(inst);
        Ok(Some(rankings))
    }

    fn call_ranking(
        &self,
        inst: &mut loaded::Instance,
        table: &WitTable,
        requests: &[PickRequest<'_>],
        candidates: &[RoutedBackend],
        n: usize,
    ) -> Result<Vec<Vec<usize>>, Fault> {
        let clients = requests.iter().map(|r| table.client(r.client)).collect();
        let app = table.app(requests[0].app);
        // A ranking may do the work of `n` picks, for each client.
        self.runtime
            .arm(&mut inst.store, (n * requests.len()) as u64);
        let count = u32::try_from(n).unwrap_or(u32::MAX);
        let answers = inst
            .policy
            .rank_backends(
                &mut inst.store,
                app,
                clients,
                inst.candidates.clone(),
                count,
            )
            .map_err(fault)?;
        if answers.len() != requests.len() {
            return Err(Fault {
                kind: FaultKind::BadAnswer,
                cause: format!("ranked for {} clients of {}", answers.len(), requests.len()),
            });
        }
        let mut rankings = Vec::with_capacity(requests.len());
        for answer in answers {
            let mut ranked = Vec::with_capacity(answer.len().min(n));
            for i in answer.into_iter().take(n) {
                let at = offered_at(&inst.positions, candidates, i)?;
                if ranked.contains(&at) {
                    return Err(Fault {
                        kind: FaultKind::BadAnswer,
                        cause: format!("ranked {} twice", candidates[at].backend.id),
                    });
                }
                ranked.push(at);
            }
            rankings.push(ranked);
        }
        Ok(rankings)
    }

    /// One ranking call's answers (the native scorer's where it faulted or the breaker is
    /// open), and whether a fault was counted.
    fn rank_call(
        &self,
        requests: &[PickRequest<'_>],
        candidates: &[RoutedBackend],
        n: usize,
    ) -> (Vec<Vec<usize>>, bool) {
        if self.breaker.suspended_for().is_some() {
            self.suspended_decisions
                .fetch_add(requests.len() as u64, Ordering::Relaxed);
            return (NativeScorer.rank(requests, candidates, n), false);
        }
        let loaded = self.current.load();
        match self.decide_ranked(&loaded, requests, candidates, n) {
            Ok(Some(rankings)) => {
                loaded
                    .decisions
                    .fetch_add(requests.len() as u64, Ordering::Relaxed);
                (rankings, false)
            }
            // A component of the plain `policy` world: one pick at a time.
            Ok(None) => (rank_by_picks(self, requests, candidates, n), false),
            // Which client's ranking faulted the call is unknown: each is asked again
            // alone, so the fault is counted, and answered natively, for its own client.
            // One that no client's call shows alone (an answer only a batch gets wrong) is
            // counted once.
            Err(RankFault {
                fault,
                in_call: true,
            }) if requests.len() > 1 => {
                let mut shown = false;
                let rankings = requests
                    .chunks(1)
                    .map(|one| {
                        let (mut ranked, faulted) = self.rank_call(one, candidates, n);
                        shown |= faulted;
                        ranked.pop().unwrap_or_default()
                    })
                    .collect();
                if !shown {
                    self.faulted(&loaded, &fault);
                }
                (rankings, true)
            }
            // Not the clients' (no instance, or its table would not go in): once.
            Err(RankFault { fault, .. }) => {
                self.faulted(&loaded, &fault);
                (NativeScorer.rank(requests, candidates, n), true)
            }
        }
    }
}

/// Why a ranking call decided nothing, and whether it was the call (its answer
/// included) rather than getting an instance ready for it.
struct RankFault {
    fault: Fault,
    in_call: bool,
}

fn fault(e: wasmtime::Error) -> Fault {
    let (kind, cause) = describe(&e);
    Fault { kind, cause }
}

/// The candidate the policy's answer `i` names, checked: one it was offered, and
/// eligible. (Offered means up here when offered: a verdict landing since is the next
/// decision's, not this policy's fault.)
fn offered_at(positions: &[u32], candidates: &[RoutedBackend], i: u32) -> Result<usize, Fault> {
    let bad = |cause: String| Fault {
        kind: FaultKind::BadAnswer,
        cause,
    };
    match positions.get(i as usize).map(|&at| at as usize) {
        Some(at) if candidates[at].is_eligible_if_up() => Ok(at),
        Some(at) => Err(bad(format!(
            "chose {} which is unhealthy or at its hard limit",
            candidates[at].backend.id
        ))),
        None => Err(bad(format!(
            "answered {i} of {} candidates",
            positions.len()
        ))),
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
            contract: Some(current.contract()),
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
            suspended_for_ms: self
                .breaker
                .suspended_for()
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            suspensions: count(&self.breaker.suspensions),
            suspended_decisions: count(&self.suspended_decisions),
        }
    }

    fn reload(&self) -> Result<bool, String> {
        self.reload_file()
    }
}

/// The policy a POP's configuration names: the file at `path`, or the embedded default
/// when None (blocking).
pub fn load_configured(runtime: &Runtime, path: Option<&Path>) -> anyhow::Result<LoadedPolicy> {
    use anyhow::Context as _;
    Ok(match path {
        Some(path) => reload::load_file(runtime, path)?,
        None => LoadedPolicy::load(runtime, DEFAULT_POLICY_NAME, DEFAULT_POLICY)
            .context("the embedded default policy")?,
    })
}

/// The live policy and the shadow beside it, for promotion and rollback.
pub struct Promotion {
    pub live: Arc<WasmPolicy>,
    pub shadow: Arc<WasmPolicy>,
}

impl crate::domain::ports::PolicyPromotion for Promotion {
    fn promote(&self) -> Result<crate::domain::ports::Promoted, String> {
        if !self.shadow.enabled() {
            return Err("no shadow policy on this POP (shadow_policy_path, or a fleet deployment with --shadow)".into());
        }
        let next = self.shadow.current();
        next.self_test(&self.live.runtime)
            .map_err(|e| format!("the shadow failed its self-test: {e}"))?;
        let replaced = self
            .live
            .promote(Arc::clone(&next), self.shadow.runtime())?;
        Ok(promoted(&next, &replaced))
    }

    fn rollback(&self) -> Result<crate::domain::ports::Promoted, String> {
        let (now, replaced) = self.live.rollback()?;
        Ok(promoted(&now, &replaced))
    }
}

fn promoted(live: &LoadedPolicy, replaced: &LoadedPolicy) -> crate::domain::ports::Promoted {
    crate::domain::ports::Promoted {
        live: format!("{} ({})", live.name, live.hash),
        replaced: format!("{} ({})", replaced.name, replaced.hash),
        bindings_dropped: 0,
    }
}

/// As the shadow: every answer recorded, faults counted, no breaker and no fallback.
impl crate::domain::ports::ShadowPolicy for WasmPolicy {
    fn shadow_pick(
        &self,
        req: &PickRequest<'_>,
        candidates: &[RoutedBackend],
    ) -> Result<Option<usize>, String> {
        let loaded = self.current.load();
        match self.decide(&loaded, req, candidates, &[]) {
            Ok(answer) => {
                loaded.decisions.fetch_add(1, Ordering::Relaxed);
                Ok(answer)
            }
            Err(f) => {
                self.faults.count(f.kind);
                loaded.faults.fetch_add(1, Ordering::Relaxed);
                if let Some(suppressed) = self.fault_log.allow() {
                    tracing::warn!(policy = %loaded.name, fault = ?f.kind, cause = %f.cause, suppressed, "shadow policy fault (traffic is not affected)");
                }
                Err(format!("{}: {}", f.kind, f.cause))
            }
        }
    }

    fn status(&self) -> PolicyStatus {
        PolicyControl::status(self)
    }

    fn active(&self) -> bool {
        self.enabled()
    }
}

impl ScoringPolicy for WasmPolicy {
    fn name(&self) -> &str {
        "wasm"
    }

    fn pick(&self, req: &PickRequest<'_>, candidates: &[RoutedBackend]) -> Option<usize> {
        self.pick_leaving_out(req, candidates, &[])
    }

    fn pick_leaving_out(
        &self,
        req: &PickRequest<'_>,
        candidates: &[RoutedBackend],
        left_out: &[usize],
    ) -> Option<usize> {
        if self.breaker.suspended_for().is_some() {
            self.suspended_decisions.fetch_add(1, Ordering::Relaxed);
            return NativeScorer.pick_leaving_out(req, candidates, left_out);
        }
        let loaded = self.current.load();
        match self.decide(&loaded, req, candidates, left_out) {
            Ok(answer) => {
                loaded.decisions.fetch_add(1, Ordering::Relaxed);
                answer
            }
            Err(f) => {
                self.faulted(&loaded, &f);
                NativeScorer.pick_leaving_out(req, candidates, left_out)
            }
        }
    }

    fn rank(
        &self,
        requests: &[PickRequest<'_>],
        candidates: &[RoutedBackend],
        n: usize,
    ) -> Vec<Vec<usize>> {
        // A call's budget is its clients' together, so calls are cut to RANK_BUDGETS
        // records: a policy that runs out stalls the DNS thread that long (and, after a
        // fault, as long again in its clients' calls alone), not for a whole read.
        let per_call = (RANK_BUDGETS / n.max(1)).max(1);
        requests
            .chunks(per_call)
            .flat_map(|some| self.rank_call(some, candidates, n).0)
            .collect()
    }

    fn prepare(&self, table: &RoutingTable, pop_region: &Region) {
        // An idle shadow slot (nothing deployed) has nothing to prepare.
        if !self.enabled() {
            return;
        }
        let wit = self.wit_table(table, pop_region);
        let copied = self.current.load().refresh_idle(&self.runtime, &wit);
        self.tables_copied_ahead
            .fetch_add(copied, Ordering::Relaxed);
    }
}

/// Fault kind and a one-line cause for a failed guest call.
fn describe(e: &wasmtime::Error) -> (FaultKind, String) {
    match e.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::OutOfFuel) => (FaultKind::Timeout, "ran past its time budget".into()),
        Some(wasmtime::Trap::Interrupt) => (
            FaultKind::Timeout,
            "ran past its wall-clock backstop".into(),
        ),
        Some(trap) => (FaultKind::Trap, format!("trapped: {trap}")),
        // The store's limiter: name the setting that bounds it.
        None if e.root_cause().to_string().contains("growing memory") => (
            FaultKind::Trap,
            format!("{} (over policy_memory_mib)", e.root_cause()),
        ),
        None => (FaultKind::Trap, format!("{:#}", e)),
    }
}
