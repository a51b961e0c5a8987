//! This POP's own view of its backends' health: active checks (rise and fall counts) and
//! passive ejection (consecutive connect failures, a backoff growing with repeats), with
//! the caps that keep a POP routing when everything looks dead.
//!
//! The verdict is local: reachability depends on the path from this POP, so it never
//! goes into the replicated table (which holds the operators' intent). A backend is
//! routable here when the table says healthy and this POP says up; the routing snapshot
//! carries the combination ([`RoutedBackend::up`](super::RoutedBackend)), so a policy and
//! the host always judge one decision by the same view.
//!
//! State at start-up and for a new backend: up until checked (as HAProxy), with its first
//! check due at once, and one failed first check is enough to take it down. Envoy keeps a
//! new host out until its first check passes; at the edge that would route a restarted
//! POP to nothing for an interval, and connect failover covers the short window.

use std::collections::HashMap;
use std::net::SocketAddr;
// Locks hold plain values replaced in place by short, panic-free code.
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::BackendId;
use super::routing_table::RoutingTable;

/// What a check sends and expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// Connecting is enough.
    Connect,
    /// Send `send` (may be empty) once connected; the answer must start with `expect`.
    Expect { send: Box<[u8]>, expect: Box<[u8]> },
    /// `GET path HTTP/1.0`; the status must be 2xx or 3xx.
    Http { path: String },
}

/// How one app's backends are checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckSpec {
    pub enabled: bool,
    pub interval: Duration,
    pub timeout: Duration,
    /// Each interval is drawn within this percentage of itself.
    pub jitter_percent: u32,
    pub probe: Probe,
    pub rise: u32,
    pub fall: u32,
}

impl CheckSpec {
    /// The interval, jittered by `unit` (uniform in [0, 1)).
    pub fn next_interval(&self, unit: f64) -> Duration {
        let spread = f64::from(self.jitter_percent) / 100.0;
        self.interval.mul_f64(1.0 - spread + 2.0 * spread * unit)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EjectionRules {
    pub enabled: bool,
    /// Consecutive failed connects that eject.
    pub after: u32,
    pub base: Duration,
    pub max: Duration,
    /// Never more than this share of an app's backends ejected at once (one at least).
    pub max_percent: u32,
}

impl EjectionRules {
    /// The `n`th ejection in a row lasts `n` base times, up to the maximum (Envoy's rule).
    pub fn backoff(&self, n: u32) -> Duration {
        self.base.saturating_mul(n.max(1)).min(self.max)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthRules {
    pub check: CheckSpec,
    /// Apps whose checks differ from `check`.
    pub app_checks: HashMap<String, CheckSpec>,
    pub ejection: EjectionRules,
    /// Below this share of an app's backends up (and always at none), local verdicts are
    /// set aside for the app.
    pub panic_percent: u32,
}

impl HealthRules {
    /// Nothing local: every backend is as the table says.
    pub fn off() -> Self {
        Self {
            check: CheckSpec {
                enabled: false,
                interval: Duration::from_secs(5),
                timeout: Duration::from_secs(2),
                jitter_percent: 10,
                probe: Probe::Connect,
                rise: 2,
                fall: 3,
            },
            app_checks: HashMap::new(),
            ejection: EjectionRules {
                enabled: false,
                after: 5,
                base: Duration::from_secs(30),
                max: Duration::from_secs(300),
                max_percent: 50,
            },
            panic_percent: 0,
        }
    }

    pub fn check_for(&self, app: &str) -> &CheckSpec {
        self.app_checks.get(app).unwrap_or(&self.check)
    }

    /// True when any backend may be checked.
    pub fn any_checks(&self) -> bool {
        self.check.enabled || self.app_checks.values().any(|c| c.enabled)
    }
}

/// One check's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckOutcome {
    /// Passed; the connect round-trip time.
    Passed(Duration),
    /// The backend failed it (refused, timed out, wrong answer).
    Failed(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckVerdict {
    /// Not checked yet (counts as up).
    Unknown,
    Up,
    Down,
}

#[derive(Debug, Clone)]
struct CheckState {
    /// The address the verdict is about: a row moved elsewhere starts over.
    addr: SocketAddr,
    verdict: CheckVerdict,
    passed_in_row: u32,
    failed_in_row: u32,
    last: Option<(SystemTime, CheckOutcome)>,
}

#[derive(Debug, Clone)]
struct Ejected {
    until: Instant,
    reason: String,
}

#[derive(Debug, Clone, Default)]
struct Entry {
    check: Option<CheckState>,
    /// Ejections in a row (the backoff multiplier); forgotten after a quiet `max`.
    ejections: u32,
    returned_at: Option<Instant>,
}

impl Entry {
    fn checks_up(&self) -> bool {
        self.check
            .as_ref()
            .is_none_or(|c| c.verdict != CheckVerdict::Down)
    }
}

/// The ejected backends are kept apart: the monitor asks for the next return on every
/// wake-up, and that must not walk 10,000 entries.
#[derive(Debug, Default)]
struct State {
    entries: HashMap<BackendId, Entry>,
    ejected: HashMap<BackendId, Ejected>,
}

impl State {
    fn up(&self, id: &BackendId) -> bool {
        !self.ejected.contains_key(id) && self.entries.get(id).is_none_or(Entry::checks_up)
    }
}

/// Why a backend reported failing was not ejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotEjected {
    /// No longer in the table.
    Gone,
    Already,
    /// The app's share of ejected backends is reached (the reason says how).
    Capped(String),
}

/// A change of one backend's local verdict, for the log (each is logged once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub id: BackendId,
    pub up: bool,
    pub why: String,
}

/// What `/backends` shows of one backend's local health.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct HealthReport {
    /// None when checks are off for the backend's app.
    pub check: Option<CheckReport>,
    /// Some while ejected.
    pub ejection: Option<EjectionReport>,
    pub ejections_in_row: u32,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckReport {
    pub state: CheckVerdict,
    pub passed_in_row: u32,
    pub failed_in_row: u32,
    /// "passed in 1.2ms", or why it failed.
    pub last_result: Option<String>,
    pub last_at: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct EjectionReport {
    pub reason: String,
    pub remaining_secs: f64,
}

/// The local verdicts, by backend id.
#[derive(Debug)]
pub struct LocalHealth {
    pub rules: HealthRules,
    state: Mutex<State>,
}

impl LocalHealth {
    pub fn new(rules: HealthRules) -> Self {
        Self {
            rules,
            state: Mutex::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// True unless this POP's checks or an ejection hold `id` out.
    pub fn up(&self, id: &BackendId) -> bool {
        self.state().up(id)
    }

    /// [`Self::up`] for many backends under one lock (a table's worth: the lock is held
    /// until the closure is dropped).
    pub fn verdicts(&self) -> impl Fn(&BackendId) -> bool + '_ {
        let state = self.state();
        move |id| state.up(id)
    }

    /// Records one check of `id` at `addr`; a transition when the verdict changed.
    /// A passed check also ends an ejection.
    pub fn record_check(
        &self,
        id: &BackendId,
        addr: SocketAddr,
        spec: &CheckSpec,
        outcome: CheckOutcome,
        at: SystemTime,
    ) -> Option<Transition> {
        let mut state = self.state();
        let was_up = state.up(id);
        let state = &mut *state;
        let entry = state.entries.entry(id.clone()).or_default();
        let check = match &mut entry.check {
            Some(c) if c.addr == addr => c,
            slot => slot.insert(CheckState {
                addr,
                verdict: CheckVerdict::Unknown,
                passed_in_row: 0,
                failed_in_row: 0,
                last: None,
            }),
        };
        let passed = matches!(outcome, CheckOutcome::Passed(_));
        if passed {
            check.passed_in_row += 1;
            check.failed_in_row = 0;
            if check.verdict != CheckVerdict::Up
                && (check.verdict == CheckVerdict::Unknown || check.passed_in_row >= spec.rise)
            {
                check.verdict = CheckVerdict::Up;
            }
            if state.ejected.remove(id).is_some() {
                entry.returned_at = Some(Instant::now());
            }
        } else {
            check.failed_in_row += 1;
            check.passed_in_row = 0;
            // The first check of a new backend decides at once (see the module comment).
            if check.verdict == CheckVerdict::Unknown || check.failed_in_row >= spec.fall {
                check.verdict = CheckVerdict::Down;
            }
        }
        let up = check.verdict != CheckVerdict::Down && !state.ejected.contains_key(id);
        // The reason is written only for a transition: checks pass by the thousand.
        let transition = (up != was_up).then(|| Transition {
            id: id.clone(),
            up,
            why: match &outcome {
                CheckOutcome::Passed(_) => {
                    format!("passed {} checks in a row", check.passed_in_row)
                }
                CheckOutcome::Failed(e) => format!("check failed: {e}"),
            },
        });
        check.last = Some((at, outcome));
        transition
    }

    /// Ejects `id` after `failures` consecutive failed connects, unless that would take
    /// the app past its share of ejected backends.
    pub fn eject(
        &self,
        table: &RoutingTable,
        id: &BackendId,
        failures: u32,
        now: Instant,
    ) -> Result<Transition, NotEjected> {
        let rules = &self.rules.ejection;
        let Ok(i) = table.backends().binary_search_by(|b| b.backend.id.cmp(id)) else {
            return Err(NotEjected::Gone);
        };
        let app = &table.backends()[i].backend.app;
        let mut state = self.state();
        let state = &mut *state;
        if state.ejected.contains_key(id) {
            return Err(NotEjected::Already);
        }
        // The cap is a share of the backends that could take traffic: healthy in the
        // table and not down by this POP's checks (ejected ones count, as routable but for
        // the ejection).
        let routable: Vec<&BackendId> = table
            .candidates(Some(app))
            .iter()
            .map(|b| &b.backend)
            .filter(|b| b.healthy && state.entries.get(&b.id).is_none_or(Entry::checks_up))
            .map(|b| &b.id)
            .collect();
        let ejected = routable
            .iter()
            .filter(|id| state.ejected.contains_key(*id))
            .count();
        let cap = (routable.len() * rules.max_percent as usize / 100).max(1);
        let entry = state.entries.entry(id.clone()).or_default();
        if ejected >= cap {
            return Err(NotEjected::Capped(format!(
                "{ejected} of app {app}'s {} routable backends are ejected already (ejection_max_percent = {})",
                routable.len(),
                rules.max_percent
            )));
        }
        if entry
            .returned_at
            .is_some_and(|t| now.duration_since(t) > rules.max)
        {
            entry.ejections = 0;
        }
        entry.ejections += 1;
        let backoff = rules.backoff(entry.ejections);
        let reason = format!("{failures} connects failed in a row");
        state.ejected.insert(
            id.clone(),
            Ejected {
                until: now + backoff,
                reason: reason.clone(),
            },
        );
        Ok(Transition {
            id: id.clone(),
            up: false,
            why: format!("ejected for {backoff:?}: {reason}"),
        })
    }

    /// Ends the ejections whose backoff is over.
    pub fn expire_ejections(&self, now: Instant) -> Vec<Transition> {
        let mut state = self.state();
        let over: Vec<BackendId> = state
            .ejected
            .iter()
            .filter(|(_, e)| e.until <= now)
            .map(|(id, _)| id.clone())
            .collect();
        over.into_iter()
            .map(|id| {
                state.ejected.remove(&id);
                state.entries.entry(id.clone()).or_default().returned_at = Some(now);
                Transition {
                    up: state.up(&id),
                    id,
                    why: "ejection over".into(),
                }
            })
            .collect()
    }

    /// When the next ejection ends.
    pub fn next_return(&self) -> Option<Instant> {
        self.state().ejected.values().map(|e| e.until).min()
    }

    /// Forgets backends `keep` rejects (gone from the table).
    pub fn retain(&self, keep: impl Fn(&BackendId) -> bool) {
        let mut state = self.state();
        state.entries.retain(|id, _| keep(id));
        state.ejected.retain(|id, _| keep(id));
    }

    /// Drops the check verdicts of backends no longer checked (their app's checks are
    /// off, or they moved to such an app): a stale Down must not keep one out for good.
    pub fn forget_checks(&self, checked: impl Fn(&BackendId) -> bool) {
        let mut state = self.state();
        for (id, entry) in state.entries.iter_mut() {
            if !checked(id) {
                entry.check = None;
            }
        }
    }

    pub fn report(&self, id: &BackendId, now: Instant) -> HealthReport {
        let state = self.state();
        let entry = state.entries.get(id);
        HealthReport {
            check: entry.and_then(|e| e.check.as_ref()).map(|c| CheckReport {
                state: c.verdict,
                passed_in_row: c.passed_in_row,
                failed_in_row: c.failed_in_row,
                last_result: c.last.as_ref().map(|(_, o)| match o {
                    CheckOutcome::Passed(rtt) => format!("passed in {rtt:.1?}"),
                    CheckOutcome::Failed(e) => e.clone(),
                }),
                last_at: c.last.as_ref().map(|(at, _)| super::ports::timestamp(*at)),
            }),
            ejection: state.ejected.get(id).map(|j| EjectionReport {
                reason: j.reason.clone(),
                remaining_secs: j.until.saturating_duration_since(now).as_secs_f64(),
            }),
            ejections_in_row: entry.map_or(0, |e| e.ejections),
        }
    }
}

/// Which of `table`'s backends are up here, and the apps in panic: an app with fewer than
/// `panic_percent` of its table-healthy backends up (or none) has its local verdicts set
/// aside, since routing to something beats routing to nothing.
pub fn local_view(
    table: &RoutingTable,
    up: impl Fn(&BackendId) -> bool,
    panic_percent: u32,
) -> (Vec<bool>, Vec<std::sync::Arc<str>>) {
    let mut flags: Vec<bool> = table.backends().iter().map(|b| up(&b.backend.id)).collect();
    let mut panicking = Vec::new();
    for (app, of_app) in table.apps() {
        let healthy: Vec<usize> = of_app
            .iter()
            .filter(|b| b.backend.healthy)
            .map(|b| b.index as usize)
            .collect();
        let up_count = healthy.iter().filter(|i| flags[**i]).count();
        let wanted = (healthy.len() * panic_percent as usize)
            .div_ceil(100)
            .max(1);
        if !healthy.is_empty() && up_count < wanted {
            panicking.push(std::sync::Arc::clone(app));
            for b in of_app {
                flags[b.index as usize] = true;
            }
        }
    }
    // In a stable order: snapshots compare their lists.
    panicking.sort();
    (flags, panicking)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::sample;
    use std::sync::Arc;

    fn spec(rise: u32, fall: u32) -> CheckSpec {
        CheckSpec {
            rise,
            fall,
            enabled: true,
            ..HealthRules::off().check
        }
    }

    fn table(n: usize) -> RoutingTable {
        let mut backends = sample::backends("app");
        backends.truncate(n);
        RoutingTable::new(1, backends, |_| Arc::default())
    }

    const ADDR: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 1);

    fn check(h: &LocalHealth, id: &BackendId, s: &CheckSpec, ok: bool) -> Option<bool> {
        let outcome = match ok {
            true => CheckOutcome::Passed(Duration::from_millis(1)),
            false => CheckOutcome::Failed("refused".into()),
        };
        h.record_check(id, ADDR, s, outcome, SystemTime::now())
            .map(|t| t.up)
    }

    #[test]
    fn rise_and_fall_counts_with_a_decisive_first_check() {
        let h = LocalHealth::new(HealthRules::off());
        let s = spec(2, 3);
        let id = BackendId::new("a");
        assert!(h.up(&id), "unchecked is up");
        assert_eq!(
            check(&h, &id, &s, false),
            Some(false),
            "a failed first check decides"
        );
        assert_eq!(check(&h, &id, &s, true), None);
        assert_eq!(check(&h, &id, &s, true), Some(true), "up after rise = 2");
        assert_eq!(check(&h, &id, &s, false), None);
        assert_eq!(check(&h, &id, &s, false), None);
        assert_eq!(
            check(&h, &id, &s, true),
            None,
            "a pass resets the fall count"
        );
        for _ in 0..2 {
            assert_eq!(check(&h, &id, &s, false), None);
        }
        assert_eq!(
            check(&h, &id, &s, false),
            Some(false),
            "down after fall = 3"
        );
        // A row moved to another address starts over.
        let moved = SocketAddr::from(([127, 0, 0, 1], 2));
        let t = h.record_check(
            &id,
            moved,
            &s,
            CheckOutcome::Passed(Duration::ZERO),
            SystemTime::now(),
        );
        assert!(t.is_some_and(|t| t.up));
    }

    #[test]
    fn ejection_backs_off_is_capped_and_a_passed_check_ends_it() {
        let mut rules = HealthRules::off();
        rules.ejection.enabled = true;
        rules.ejection.max_percent = 50;
        let h = LocalHealth::new(rules);
        let t = table(4);
        let ids: Vec<BackendId> = t.backends().iter().map(|b| b.backend.id.clone()).collect();
        let now = Instant::now();
        assert!(h.eject(&t, &ids[0], 5, now).is_ok());
        assert_eq!(h.eject(&t, &ids[0], 5, now), Err(NotEjected::Already));
        assert!(
            h.eject(&t, &ids[1], 5, now + Duration::from_secs(1))
                .is_ok()
        );
        let NotEjected::Capped(refused) = h.eject(&t, &ids[2], 5, now).unwrap_err() else {
            panic!("not capped")
        };
        assert!(refused.contains("2 of app app's 4 routable"), "{refused}");
        assert!(!h.up(&ids[0]) && h.up(&ids[2]));
        assert_eq!(h.next_return(), Some(now + Duration::from_secs(30)));
        // The backoff ends the first; a passed check ends the second.
        let back = h.expire_ejections(now + Duration::from_secs(30));
        assert_eq!(back.len(), 1);
        assert!(h.up(&ids[0]));
        assert_eq!(check(&h, &ids[1], &spec(2, 3), true), Some(true));
        // Ejected again soon: twice as long.
        h.eject(&t, &ids[0], 5, now + Duration::from_secs(31))
            .unwrap();
        assert_eq!(h.next_return(), Some(now + Duration::from_secs(91)));
        // At least one backend may always be ejected.
        let h = LocalHealth::new(HealthRules {
            ejection: EjectionRules {
                max_percent: 0,
                ..h.rules.ejection.clone()
            },
            ..h.rules.clone()
        });
        assert!(h.eject(&t, &ids[0], 5, now).is_ok());
        assert!(h.eject(&t, &ids[1], 5, now).is_err());
    }

    #[test]
    fn the_ejection_cap_counts_only_routable_backends() {
        let mut rules = HealthRules::off();
        rules.ejection.enabled = true;
        rules.ejection.max_percent = 50;
        let h = LocalHealth::new(rules);
        // Four rows: one drained in the table, one down by this POP's checks.
        let mut backends = sample::backends("app");
        backends.truncate(4);
        backends[3].healthy = false;
        let t = RoutingTable::new(1, backends, |_| Arc::default());
        let ids: Vec<BackendId> = t.backends().iter().map(|b| b.backend.id.clone()).collect();
        for _ in 0..3 {
            check(&h, &ids[2], &spec(2, 3), false);
        }
        assert!(!h.up(&ids[2]));
        // Two routable: one of them may go, not both (half of four would have let it).
        let now = Instant::now();
        assert!(h.eject(&t, &ids[0], 5, now).is_ok());
        let NotEjected::Capped(why) = h.eject(&t, &ids[1], 5, now).unwrap_err() else {
            panic!("not capped")
        };
        assert!(why.contains("1 of app app's 2 routable"), "{why}");
    }

    #[test]
    fn a_backend_no_longer_checked_loses_its_down_verdict() {
        let h = LocalHealth::new(HealthRules::off());
        let t = table(2);
        let ids: Vec<BackendId> = t.backends().iter().map(|b| b.backend.id.clone()).collect();
        for _ in 0..3 {
            check(&h, &ids[0], &spec(2, 3), false);
        }
        assert!(!h.up(&ids[0]));
        h.forget_checks(|id| *id != ids[0]);
        assert!(h.up(&ids[0]));
        assert!(h.report(&ids[0], Instant::now()).check.is_none());
    }

    #[test]
    fn an_app_with_nothing_up_panics_and_routes_by_the_table() {
        let t = table(4);
        let (flags, panic) = local_view(&t, |_| false, 0);
        assert_eq!(flags, vec![true; 4]);
        assert_eq!(panic.len(), 1);
        let first = t.backends()[0].backend.id.clone();
        let (flags, panic) = local_view(&t, |id| *id == first, 0);
        assert_eq!(flags, vec![true, false, false, false]);
        assert!(panic.is_empty());
        // At 50%, one of four up is a panic.
        let (_, panic) = local_view(&t, |id| *id == first, 50);
        assert_eq!(panic.len(), 1);
    }

    #[test]
    fn jitter_stays_within_its_percentage() {
        let s = CheckSpec {
            interval: Duration::from_secs(10),
            jitter_percent: 10,
            ..spec(1, 1)
        };
        assert_eq!(s.next_interval(0.0), Duration::from_secs(9));
        assert!(s.next_interval(0.999) < Duration::from_secs(11));
    }
}
