//! Shadow evaluation: a second policy decides beside the live one on real traffic, and
//! only its answers are kept: how often the two agree, which live pick met which shadow
//! pick (by backend and by region), and a bounded sample of recent disagreements with
//! what the policies saw. The live decision has been made when the shadow is asked, and
//! nothing the shadow answers or does (a trap, a timeout) reaches the connection.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use serde::Serialize;

use crate::domain::RoutedBackend;
use crate::domain::ports::{PickRequest, PolicyStatus, ShadowPolicy, timestamp};

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
            tables: Mutex::default(),
        }
    }

    /// Asks the shadow about the decision the live policy made (`live`: its pick).
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
        let shadow = match self.policy.shadow_pick(req, candidates) {
            Ok(answer) => answer,
            Err(_) => {
                self.faults.fetch_add(1, Relaxed);
                return;
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
    use crate::domain::RoutedBackend;
    use crate::domain::ports::{PickRequest, PolicyStatus};

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
