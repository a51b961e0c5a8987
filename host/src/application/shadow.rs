//! Shadow evaluation: a second policy decides beside the live one on real traffic, and
//! only its answers are kept: how often the two agree, which live pick met which shadow
//! pick (by backend and by region), and a bounded sample of recent disagreements with
//! what the policies saw. Nothing the shadow answers or does (a trap, a timeout, a slow
//! answer) reaches the connection: a connection only queues its decision (a bounded queue:
//! dropped and counted when full), and one thread of its own asks the shadow, which a
//! breaker suspends while it keeps faulting (a fault rebuilds its instance, table and all).
//! The shadow sees the table of the decision, with the live numbers of when it is asked.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::SystemTime;

use serde::Serialize;
use tokio::sync::mpsc;

use crate::domain::breaker::Breaker;
use crate::domain::ports::{PickRequest, PolicyStatus, ShadowPolicy, timestamp};
use crate::domain::{BackendId, Client, Region, RoutedBackend};

/// Decisions waiting for the shadow; past it they are dropped (counted).
const QUEUE: usize = 1024;

/// One live decision for the shadow to make again.
struct Job {
    table_version: u64,
    app: Option<Arc<str>>,
    client: Client,
    /// Candidates of the table the live policy did not see (failed over from).
    excluded: Vec<BackendId>,
    live: Option<BackendId>,
    /// The candidates' (active, rtt, up here) when the live policy decided, where there are at
    /// most [`SNAPSHOT_MAX`] (a larger set is asked with the numbers of its turn).
    loads: Vec<(u32, u64, bool)>,
}

/// Candidates whose live numbers a queued decision keeps.
const SNAPSHOT_MAX: usize = 256;

/// Recent disagreements kept for `/policy/shadow`.
const RECENT: usize = 50;
/// Distinct (live, shadow) pairs counted one by one; past it they count as "other".
const MAX_PAIRS: usize = 4096;
/// Candidates described per disagreement.
const CANDIDATES_SHOWN: usize = 16;

pub struct Shadow {
    pub policy: Arc<dyn ShadowPolicy>,
    sample_percent: u32,
    pub compared: AtomicU64,
    pub agreed: AtomicU64,
    pub faults: AtomicU64,
    /// Decisions not asked: the queue was full, the table changed before the shadow's
    /// turn, or the shadow was suspended by its breaker.
    pub dropped: AtomicU64,
    pub stale: AtomicU64,
    pub suspended: AtomicU64,
    breaker: Breaker,
    queue: OnceLock<mpsc::Sender<Job>>,
    tables: Mutex<Tables>,
}

#[derive(Default)]
struct Tables {
    by_backend: HashMap<(String, String), u64>,
    by_region: HashMap<(String, String), u64>,
    other_pairs: u64,
    recent: VecDeque<Disagreement>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Disagreement {
    pub at: String,
    pub client_country: Option<String>,
    pub client_region: Option<String>,
    pub app: Option<String>,
    pub live: String,
    pub shadow: String,
    /// The first candidates as both policies saw them.
    pub candidates: Vec<CandidateSeen>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CandidateSeen {
    pub id: String,
    pub region: String,
    pub active: u32,
    pub rtt_us: u64,
    pub eligible: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct PairCount {
    pub live: String,
    pub shadow: String,
    pub decisions: u64,
}

/// `GET /policy/shadow`.
#[derive(Debug, Clone, Serialize)]
pub struct ShadowReport {
    pub policy: PolicyStatus,
    pub sample_percent: u32,
    pub compared: u64,
    pub agreed: u64,
    pub disagreed: u64,
    /// Agreed / compared; None before the first comparison.
    pub agreement: Option<f64>,
    /// Shadow decisions that faulted (not compared; traffic unaffected).
    pub faults: u64,
    /// Decisions not asked: the queue was full, the table had changed, the shadow was
    /// suspended after repeated faults.
    pub dropped: u64,
    pub stale: u64,
    pub suspended: u64,
    /// Live pick against shadow pick, most frequent first ("none" is a refusal).
    pub by_backend: Vec<PairCount>,
    pub by_region: Vec<PairCount>,
    /// Pairs past the counting cap.
    pub other_pairs: u64,
    /// Most recent first.
    pub recent_disagreements: Vec<Disagreement>,
}

impl Shadow {
    pub fn new(policy: Arc<dyn ShadowPolicy>, sample_percent: u32) -> Self {
        Self {
            policy,
            sample_percent,
            compared: AtomicU64::new(0),
            agreed: AtomicU64::new(0),
            faults: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            suspended: AtomicU64::new(0),
            breaker: Breaker::default(),
            queue: OnceLock::new(),
            tables: Mutex::default(),
        }
    }

    /// Starts the thread that asks the shadow about queued decisions, on the tables
    /// `routing` holds; it ends when the shadow is dropped.
    pub fn start(self: &Arc<Self>, routing: Arc<super::routing::Routing>, pop_region: Region) {
        let (tx, mut rx) = mpsc::channel::<Job>(QUEUE);
        if self.queue.set(tx).is_err() {
            return;
        }
        let me: Weak<Self> = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("edgeproxy-shadow".into())
            .spawn(move || {
                while let Some(job) = rx.blocking_recv() {
                    let Some(shadow) = me.upgrade() else { return };
                    shadow.ask(&routing, &pop_region, job);
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "no thread for the shadow policy: it is not asked");
        }
    }

    /// Queues the live decision `live` (an index into `candidates`) for the shadow, if
    /// sampled; never waits.
    pub fn submit(&self, req: &PickRequest<'_>, candidates: &[RoutedBackend], live: Option<usize>) {
        if !self.policy.active()
            || (self.sample_percent < 100 && fastrand::u32(0..100) >= self.sample_percent)
        {
            return;
        }
        let Some(queue) = self.queue.get() else {
            return;
        };
        // The candidates are the table's for the app, less those failed over from (rare).
        let all = req.table.candidates(req.app);
        let excluded = match all.len() == candidates.len() {
            true => Vec::new(),
            false => all
                .iter()
                .filter(|b| {
                    candidates
                        .binary_search_by(|c| c.backend.id.cmp(&b.backend.id))
                        .is_err()
                })
                .map(|b| b.backend.id.clone())
                .collect(),
        };
        let job = Job {
            table_version: req.table.version(),
            app: req.app.map(Arc::from),
            client: req.client.clone(),
            excluded,
            live: live
                .and_then(|i| candidates.get(i))
                .map(|b| b.backend.id.clone()),
            loads: match candidates.len() <= SNAPSHOT_MAX {
                true => candidates
                    .iter()
                    .map(|c| (c.stats.active(), c.stats.rtt_us(), c.up()))
                    .collect(),
                false => Vec::new(),
            },
        };
        if queue.try_send(job).is_err() {
            self.dropped.fetch_add(1, Relaxed);
        }
    }

    /// Asks the shadow about one queued decision (on the shadow's thread).
    fn ask(&self, routing: &super::routing::Routing, pop_region: &Region, job: Job) {
        if self.breaker.suspended_for().is_some() {
            self.suspended.fetch_add(1, Relaxed);
            return;
        }
        let table = routing.current();
        if table.version() != job.table_version {
            self.stale.fetch_add(1, Relaxed);
            return;
        }
        let all = table.candidates(job.app.as_deref());
        let owned: Vec<RoutedBackend>;
        let candidates = match (job.excluded.is_empty(), job.loads.is_empty()) {
            (true, true) => all,
            _ => {
                let mut left: Vec<RoutedBackend> = all
                    .iter()
                    .filter(|b| !job.excluded.contains(&b.backend.id))
                    .cloned()
                    .collect();
                // As the live policy saw them.
                if left.len() == job.loads.len() {
                    for (c, (active, rtt, up)) in left.iter_mut().zip(&job.loads) {
                        let stats = crate::domain::BackendStats::recorded(*active, *rtt, *up);
                        c.stats = Arc::new(stats);
                    }
                }
                owned = left;
                &owned
            }
        };
        let live = job
            .live
            .as_ref()
            .and_then(|id| candidates.binary_search_by(|c| c.backend.id.cmp(id)).ok());
        let req = PickRequest {
            table: &table,
            pop_region,
            app: job.app.as_deref(),
            client: &job.client,
        };
        if !self.compare(&req, candidates, live)
            && let Some(backoff) = self.breaker.fault()
        {
            tracing::warn!(
                ?backoff,
                "the shadow policy keeps faulting: not asked for {backoff:?}"
            );
        }
    }

    /// Asks the shadow about the decision the live policy made (`live`: its pick), at
    /// once and on this thread, if sampled (`policy replay`).
    pub fn observe(
        &self,
        req: &PickRequest<'_>,
        candidates: &[RoutedBackend],
        live: Option<usize>,
    ) {
        if !self.policy.active()
            || (self.sample_percent < 100 && fastrand::u32(0..100) >= self.sample_percent)
        {
            return;
        }
        self.compare(req, candidates, live);
    }

    /// Asks the shadow and records how it compares; false when it faulted.
    fn compare(
        &self,
        req: &PickRequest<'_>,
        candidates: &[RoutedBackend],
        live: Option<usize>,
    ) -> bool {
        let shadow = match self.policy.shadow_pick(req, candidates) {
            Ok(answer) => answer,
            Err(_) => {
                self.faults.fetch_add(1, Relaxed);
                return false;
            }
        };
        self.compared.fetch_add(1, Relaxed);
        let id = |i: Option<usize>| i.and_then(|i| candidates.get(i));
        let (live_b, shadow_b) = (id(live), id(shadow));
        let agreed = live_b.map(|b| &b.backend.id) == shadow_b.map(|b| &b.backend.id);
        if agreed {
            self.agreed.fetch_add(1, Relaxed);
        }
        let name =
            |b: Option<&RoutedBackend>| b.map_or("none".to_owned(), |b| b.backend.id.to_string());
        let region = |b: Option<&RoutedBackend>| {
            b.map_or("none".to_owned(), |b| b.backend.region.to_string())
        };
        // Poisoning: counts are only ever added to.
        let mut guard = self.tables.lock().unwrap_or_else(PoisonError::into_inner);
        let t = &mut *guard;
        for (map, key) in [
            (&mut t.by_backend, (name(live_b), name(shadow_b))),
            (&mut t.by_region, (region(live_b), region(shadow_b))),
        ] {
            if map.len() < MAX_PAIRS || map.contains_key(&key) {
                *map.entry(key).or_default() += 1;
            } else {
                t.other_pairs += 1;
            }
        }
        if !agreed {
            if t.recent.len() == RECENT {
                t.recent.pop_back();
            }
            t.recent.push_front(Disagreement {
                at: timestamp(SystemTime::now()),
                client_country: req.client.country.map(|c| c.to_string()),
                client_region: req.client.region.as_ref().map(|r| r.to_string()),
                app: req.app.map(str::to_owned),
                live: name(live_b),
                shadow: name(shadow_b),
                candidates: candidates
                    .iter()
                    .take(CANDIDATES_SHOWN)
                    .map(|c| CandidateSeen {
                        id: c.backend.id.to_string(),
                        region: c.backend.region.to_string(),
                        active: c.stats.active(),
                        rtt_us: c.stats.rtt_us(),
                        eligible: c.is_eligible(),
                    })
                    .collect(),
            });
        }
        true
    }

    /// Whether a shadow decides here now.
    pub fn active(&self) -> bool {
        self.policy.active()
    }

    /// Forgets every comparison: a different shadow starts its record afresh.
    pub fn reset(&self) {
        self.agreed.store(0, Relaxed);
        self.compared.store(0, Relaxed);
        self.faults.store(0, Relaxed);
        for n in [&self.dropped, &self.stale, &self.suspended] {
            n.store(0, Relaxed);
        }
        self.breaker.reset();
        *self.tables.lock().unwrap_or_else(PoisonError::into_inner) = Tables::default();
    }

    /// Decisions compared and agreed, read so that agreed never exceeds compared (they are
    /// counted one after the other, and a reader may come in between).
    pub fn counts(&self) -> (u64, u64) {
        let agreed = self.agreed.load(Relaxed);
        (self.compared.load(Relaxed).max(agreed), agreed)
    }

    pub fn report(&self) -> ShadowReport {
        let (compared, agreed) = self.counts();
        let t = self.tables.lock().unwrap_or_else(PoisonError::into_inner);
        let sorted = |m: &HashMap<(String, String), u64>| {
            let mut v: Vec<PairCount> = m
                .iter()
                .map(|((live, shadow), n)| PairCount {
                    live: live.clone(),
                    shadow: shadow.clone(),
                    decisions: *n,
                })
                .collect();
            v.sort_by(|a, b| {
                b.decisions
                    .cmp(&a.decisions)
                    .then(a.live.cmp(&b.live))
                    .then(a.shadow.cmp(&b.shadow))
            });
            v
        };
        ShadowReport {
            policy: self.policy.status(),
            sample_percent: self.sample_percent,
            compared,
            agreed,
            disagreed: compared - agreed,
            agreement: (compared > 0).then(|| agreed as f64 / compared as f64),
            faults: self.faults.load(Relaxed),
            dropped: self.dropped.load(Relaxed),
            stale: self.stale.load(Relaxed),
            suspended: self.suspended.load(Relaxed),
            by_backend: sorted(&t.by_backend),
            by_region: sorted(&t.by_region),
            other_pairs: t.other_pairs,
            recent_disagreements: t.recent.iter().cloned().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ports::PolicyStatus;

    struct Never;
    impl ShadowPolicy for Never {
        fn shadow_pick(
            &self,
            _: &PickRequest<'_>,
            _: &[RoutedBackend],
        ) -> Result<Option<usize>, String> {
            Ok(None)
        }
        fn status(&self) -> PolicyStatus {
            PolicyStatus::default()
        }
    }

    /// `observe` counts compared, then agreed: a reader in between must not see more agreed
    /// than compared (1.8e19 disagreements in `/metrics`).
    #[test]
    fn agreement_read_between_its_two_counts_never_wraps() {
        let s = Shadow::new(Arc::new(Never), 100);
        s.agreed.store(11, Relaxed);
        s.compared.store(10, Relaxed);
        let r = s.report();
        assert_eq!((r.compared, r.agreed, r.disagreed), (11, 11, 0));
        assert!(r.agreement.unwrap() <= 1.0);
    }
}
