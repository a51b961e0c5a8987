//! The one task behind this POP's local health: it probes every backend it may route to
//! on its own jittered schedule (a timer heap, not a sleeping task per backend), ejects
//! backends the proxy reports failing, returns them when their backoff ends, and rebuilds
//! the routing snapshot when a verdict changes. Each transition is logged once.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::routing::Routing;
use crate::adapters::outbound::tcp_probe::{self, ProbeResult};
use crate::domain::health::{CheckOutcome, HealthRules, LocalHealth, NotEjected, Transition};
use crate::domain::live_stats::LiveStats;
use crate::domain::{BackendId, RoutingTable};

/// Probes in flight at once; more wait for a slot (10,000 backends at 5 s is 2,000 a
/// second, each done in about one round trip).
pub const MAX_IN_FLIGHT: usize = 4096;
/// New backends (and all of them at start) are first checked within this long.
const FIRST_CHECK_SPREAD: Duration = Duration::from_secs(1);
/// Checks due within this long of each other start together: one wake-up starts ten
/// of them at 2,000 a second instead of one.
const SLACK: Duration = Duration::from_millis(5);
/// Verdicts changing together (a network blip takes 1,000 backends down) rebuild the
/// routing snapshot once per this long, not once each.
const COALESCE: Duration = Duration::from_millis(20);

/// Backends the proxy saw failing, waiting for the monitor to judge them.
#[derive(Debug, Default)]
pub struct Suspects {
    queue: Mutex<Vec<(BackendId, u32)>>,
    wake: Notify,
}

impl Suspects {
    /// `id` failed `failures` connects in a row.
    pub fn report(&self, id: BackendId, failures: u32) {
        self.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((id, failures));
        self.wake.notify_one();
    }

    fn take(&self) -> Vec<(BackendId, u32)> {
        std::mem::take(&mut *self.queue.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct HealthCounters {
    pub checks_passed: AtomicU64,
    pub checks_failed: AtomicU64,
    /// Checks not judged: this POP was out of descriptors or ports.
    pub checks_local_errors: AtomicU64,
    pub ejections: AtomicU64,
    /// Ejections refused by `ejection_max_percent`.
    pub ejections_capped: AtomicU64,
}

pub struct HealthMonitor {
    pub routing: Arc<Routing>,
    pub health: Arc<LocalHealth>,
    pub metrics: Arc<LiveStats>,
    pub suspects: Arc<Suspects>,
    pub counters: Arc<HealthCounters>,
}

/// What the schedule knows of one backend.
struct Target {
    addr: SocketAddr,
    app: Arc<str>,
    /// Which scheduling of the id this is: a row removed and added back within one
    /// interval leaves an old heap entry (or probe) behind, which must not schedule too.
    generation: u64,
}

/// Which backends are checked, and when each is next: a heap of (due, id, generation).
#[derive(Default)]
struct Schedule {
    targets: HashMap<BackendId, Target>,
    due: BinaryHeap<Reverse<(Instant, BackendId, u64)>>,
    generation: u64,
}

impl Schedule {
    /// Follows `table`: backends of checked apps are kept, new ones first checked within
    /// [`FIRST_CHECK_SPREAD`]; the others are forgotten (their heap entries fall out when
    /// they come due).
    fn sync(&mut self, table: &RoutingTable, rules: &HealthRules, now: Instant) {
        let mut next = HashMap::with_capacity(self.targets.len());
        for rb in table.backends() {
            let b = &rb.backend;
            let spec = rules.check_for(&b.app);
            if !spec.enabled {
                continue;
            }
            let generation = match self.targets.remove(&b.id) {
                Some(known) => known.generation,
                None => {
                    self.generation += 1;
                    let first = FIRST_CHECK_SPREAD
                        .min(spec.interval)
                        .mul_f64(fastrand::f64());
                    self.due
                        .push(Reverse((now + first, b.id.clone(), self.generation)));
                    self.generation
                }
            };
            let target = Target {
                addr: b.addr,
                app: Arc::clone(&b.app),
                generation,
            };
            next.insert(b.id.clone(), target);
        }
        self.targets = next;
    }

    fn next_due(&self) -> Option<Instant> {
        self.due.peek().map(|Reverse((at, _, _))| *at)
    }

    /// The next backend due by `until`, skipping entries of forgotten schedulings.
    fn pop_due(&mut self, until: Instant) -> Option<(BackendId, u64, SocketAddr, Arc<str>)> {
        while let Some(Reverse((at, _, _))) = self.due.peek()
            && *at <= until
        {
            let Some(Reverse((_, id, generation))) = self.due.pop() else {
                break;
            };
            if let Some(t) = self.targets.get(&id).filter(|t| t.generation == generation) {
                return Some((id, generation, t.addr, Arc::clone(&t.app)));
            }
        }
        None
    }

    /// A check of `id` (`generation`) finished: due again one interval from `now`. None
    /// (and nothing scheduled) when that scheduling is gone.
    fn reschedule(
        &mut self,
        id: &BackendId,
        generation: u64,
        rules: &HealthRules,
        now: Instant,
    ) -> Option<&Target> {
        let target = self
            .targets
            .get(id)
            .filter(|t| t.generation == generation)?;
        let next = now + rules.check_for(&target.app).next_interval(fastrand::f64());
        self.due.push(Reverse((next, id.clone(), generation)));
        Some(target)
    }
}

impl HealthMonitor {
    pub async fn run(self, stop: CancellationToken) {
        let mut versions = self.routing.subscribe();
        let mut schedule = Schedule::default();
        let mut probes: JoinSet<(BackendId, u64, SocketAddr, ProbeResult)> = JoinSet::new();
        schedule.sync(&self.routing.current(), &self.health.rules, Instant::now());
        let (mut pending, mut refreshed) = (false, Instant::now() - COALESCE);
        // Refusals repeat while a capped app keeps failing: once a minute is enough.
        let capped_log = crate::log_throttle::LogThrottle::new(Duration::from_secs(60));
        // One timer, moved as the next deadline changes, rather than a new one each turn.
        let far = || Instant::now() + Duration::from_secs(86_400);
        let sleep = tokio::time::sleep_until(far());
        tokio::pin!(sleep);
        loop {
            let next_due = match probes.len() < MAX_IN_FLIGHT {
                true => schedule.next_due(),
                false => None,
            };
            let refresh_at = pending.then_some(refreshed + COALESCE);
            let wake_at = [next_due, self.health.next_return(), refresh_at]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or_else(far);
            if sleep.deadline() != wake_at {
                sleep.as_mut().reset(wake_at);
            }
            let mut changed = Vec::new();
            tokio::select! {
                _ = stop.cancelled() => return,
                r = versions.changed() => {
                    if r.is_err() { return; }
                    schedule.sync(&self.routing.current(), &self.health.rules, Instant::now());
                }
                _ = self.suspects.wake.notified() => {
                    let table = self.routing.current();
                    for (id, failures) in self.suspects.take() {
                        match self.health.eject(&table, &id, failures, Instant::now()) {
                            Ok(t) => {
                                self.counters.ejections.fetch_add(1, Relaxed);
                                changed.push(t);
                            }
                            Err(NotEjected::Capped(why)) => {
                                self.counters.ejections_capped.fetch_add(1, Relaxed);
                                if let Some(suppressed) = capped_log.allow() {
                                    tracing::warn!(backend = %id, failures, suppressed, "not ejected: {why}");
                                }
                            }
                            Err(_) => {}
                        }
                    }
                }
                Some(done) = probes.join_next(), if !probes.is_empty() => {
                    // And every other probe already done, in the same turn.
                    let mut done = Some(done);
                    while let Some(result) = done {
                        if let Ok((id, generation, addr, result)) = result {
                            changed.extend(self.judge(&id, generation, addr, result, &mut schedule));
                        }
                        done = probes.try_join_next();
                    }
                }
                _ = &mut sleep => {
                    let now = Instant::now();
                    for t in self.health.expire_ejections(now) {
                        // Back with a clean slate: one more failure must not eject again.
                        self.metrics.backend_stats(&t.id).record_connect_ok();
                        changed.push(t);
                    }
                    while probes.len() < MAX_IN_FLIGHT
                        && let Some((id, generation, addr, app)) = schedule.pop_due(now + SLACK)
                    {
                        let health = Arc::clone(&self.health);
                        probes.spawn(async move {
                            let spec = health.rules.check_for(&app);
                            (id, generation, addr, tcp_probe::probe(addr, &spec.probe, spec.timeout).await)
                        });
                    }
                }
            }
            for t in &changed {
                log(t);
            }
            pending |= !changed.is_empty();
            if pending && refreshed.elapsed() >= COALESCE {
                self.routing.refresh_local().await;
                (pending, refreshed) = (false, Instant::now());
            }
        }
    }

    fn judge(
        &self,
        id: &BackendId,
        generation: u64,
        addr: SocketAddr,
        result: ProbeResult,
        schedule: &mut Schedule,
    ) -> Option<Transition> {
        let rules = &self.health.rules;
        let target = schedule.reschedule(id, generation, rules, Instant::now())?;
        let spec = rules.check_for(&target.app);
        if target.addr != addr {
            return None; // the row moved while this probe ran
        }
        let outcome = match result {
            ProbeResult::Passed(rtt) => {
                self.counters.checks_passed.fetch_add(1, Relaxed);
                let stats = self.metrics.backend_stats(id);
                // Policies see the RTT without client traffic (`latency-aware`).
                stats.record_rtt(rtt.as_micros().try_into().unwrap_or(u64::MAX));
                // A passed check resets the connect-failure streak (as documented): old
                // failures must not count towards the next ejection.
                stats.record_connect_ok();
                CheckOutcome::Passed(rtt)
            }
            ProbeResult::Failed(why) => {
                self.counters.checks_failed.fetch_add(1, Relaxed);
                CheckOutcome::Failed(why)
            }
            // Out of descriptors or ports here: the backend is not to blame.
            ProbeResult::Local(why) => {
                self.counters.checks_local_errors.fetch_add(1, Relaxed);
                tracing::debug!(backend = %id, error = %why, "check not run: this POP is out of resources");
                return None;
            }
        };
        self.health
            .record_check(id, addr, spec, outcome, SystemTime::now())
    }
}

fn log(t: &Transition) {
    match t.up {
        true => tracing::info!(backend = %t.id, why = %t.why, "backend up from this POP"),
        false => tracing::warn!(backend = %t.id, why = %t.why, "backend down from this POP"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::sample;

    fn rules() -> HealthRules {
        let mut rules = HealthRules::off();
        rules.check.enabled = true;
        rules.check.interval = Duration::from_secs(5);
        rules
    }

    fn table(ids: &[&str]) -> RoutingTable {
        let backends = sample::backends("app")
            .into_iter()
            .zip(ids)
            .map(|(b, id)| crate::domain::Backend {
                id: BackendId::new(id),
                ..b
            })
            .collect();
        RoutingTable::new(1, backends, |_| Arc::default())
    }

    /// Checks started in `span` from `t`, following each with its reschedule.
    fn run(s: &mut Schedule, rules: &HealthRules, t: Instant, span: Duration) -> Vec<String> {
        let mut started = Vec::new();
        let mut now = t;
        while now <= t + span {
            while let Some((id, generation, _, _)) = s.pop_due(now) {
                started.push(id.to_string());
                s.reschedule(&id, generation, rules, now);
            }
            now += Duration::from_millis(100);
        }
        started
    }

    struct NoRows;
    impl crate::domain::ports::BackendRepository for NoRows {
        fn load(
            &self,
        ) -> Result<crate::domain::ports::LoadedBackends, crate::domain::ports::RoutingError>
        {
            Ok(Default::default())
        }
    }

    #[test]
    fn a_passed_check_resets_the_connect_failure_streak() {
        let rules = rules();
        let metrics = Arc::new(LiveStats::default());
        let health = Arc::new(LocalHealth::new(rules.clone()));
        let monitor = HealthMonitor {
            routing: Arc::new(
                Routing::new(Arc::new(NoRows), Arc::clone(&metrics), 50)
                    .with_health(Arc::clone(&health)),
            ),
            health,
            metrics: Arc::clone(&metrics),
            suspects: Arc::default(),
            counters: Arc::default(),
        };
        let id = BackendId::new("a");
        for _ in 0..5 {
            metrics.backend_stats(&id).record_connect_failure();
        }
        let t = Instant::now();
        let mut s = Schedule::default();
        let table = table(&["a"]);
        s.sync(&table, &rules, t);
        let (due, generation, addr, _) = s.pop_due(t + Duration::from_secs(2)).unwrap();
        assert_eq!(due, id);
        monitor.judge(
            &id,
            generation,
            addr,
            ProbeResult::Passed(Duration::from_millis(1)),
            &mut s,
        );
        assert_eq!(metrics.backend_stats(&id).failures_in_row(), 0);
    }

    #[test]
    fn a_backend_is_checked_once_per_interval_even_after_leaving_and_coming_back() {
        let rules = rules();
        let t = Instant::now();
        let mut s = Schedule::default();
        s.sync(&table(&["a", "b"]), &rules, t);
        // Both first checked within a second.
        assert_eq!(run(&mut s, &rules, t, Duration::from_secs(1)).len(), 2);
        // "a" leaves and comes back within one interval, while its check was in flight
        // (its reschedule comes after the return): it must not gain a second schedule.
        s.sync(&table(&["b"]), &rules, t);
        s.sync(&table(&["a", "b"]), &rules, t);
        // The check of "a" in flight finishes for its first scheduling (generation 1).
        assert!(
            s.reschedule(&BackendId::new("a"), 1, &rules, t).is_none(),
            "an old scheduling"
        );
        let started = run(
            &mut s,
            &rules,
            t + Duration::from_secs(1),
            Duration::from_secs(60),
        );
        let a = started.iter().filter(|id| *id == "a").count();
        let b = started.iter().filter(|id| *id == "b").count();
        // 60 s at 5 s ± 10%: 11 to 13 each, and never twice as many.
        assert!(
            (11..=14).contains(&a) && (11..=14).contains(&b),
            "a {a}, b {b}"
        );
        // Gone for good: no more checks.
        s.sync(&table(&["b"]), &rules, t);
        let later = run(
            &mut s,
            &rules,
            t + Duration::from_secs(62),
            Duration::from_secs(30),
        );
        assert!(later.iter().all(|id| id == "b"), "{later:?}");
    }
}
