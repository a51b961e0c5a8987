//! Keeps the routing snapshot fresh: loads the table off the hot path (blocking thread),
//! joins it with live stats and swaps it in atomically. A failed load keeps the last good
//! snapshot serving and is logged on every attempt.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
// Locks hold plain values replaced whole: a panic elsewhere cannot leave them half-set,
// so a poisoned lock is recovered.
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::domain::health::{HealthRules, LocalHealth, local_view};
use crate::domain::live_stats::LiveStats;
use crate::domain::ports::{BackendRepository, RoutingError, SkippedRow};
use crate::domain::{BackendId, RoutedBackend, RoutingTable};

/// How long the routing source must stay unchanged before a notified reload reads it.
const SETTLE: Duration = Duration::from_millis(100);
/// A source still changing after this long is read anyway.
const SETTLE_MAX: Duration = Duration::from_secs(2);

pub struct Routing {
    table: ArcSwap<RoutingTable>,
    repo: Arc<dyn BackendRepository>,
    metrics: Arc<LiveStats>,
    /// This POP's checks and ejections, joined into every snapshot.
    health: Arc<LocalHealth>,
    version: watch::Sender<u64>,
    /// The last version handed out: reloads and local verdicts publish without waiting
    /// for each other, so each takes its version from here.
    versions: AtomicU64,
    /// Skipped rows of the last load, so each bad row is reported once, not every period.
    skipped: Mutex<Vec<SkippedRow>>,
    /// This POP's listeners as bound: a row pointing at one would make the proxy connect
    /// to itself (a registration through another POP, an operator's mistake).
    own: Mutex<Vec<std::net::SocketAddr>>,
    history: Mutex<History>,
    /// Reload attempts by outcome: changed, unchanged, failed.
    outcomes: [AtomicU64; 3],
    /// One reload at a time (the timer, file events and `POST /reload` all ask): a slow
    /// load can never store an older table after a newer one, and versions only grow.
    reloading: tokio::sync::Mutex<()>,
    /// A reload removing more than this percentage of the backends is reported loudly.
    drop_warn_percent: u64,
    /// Reloads that removed more than `drop_warn_percent` of the backends at once.
    pub mass_drops: AtomicU64,
    /// The source's marker when it was last read: a change notification that finds the
    /// source still so is this process's own read (SQLite creates and removes its WAL
    /// file around every read), not a write, and reloads nothing.
    read_at: Mutex<Option<String>>,
    /// The last reload failure logged: the same failure again is not logged again (a
    /// database down for an hour makes one line, and one more when it is back).
    failing: Mutex<Option<String>>,
    /// Change notifications that found nothing changed since the last read.
    pub notifications_ignored: AtomicU64,
    /// Reads that found the source written since the previous read (every read, for a
    /// source without a marker): what was checked beside the table (a row's owner) may
    /// have changed too.
    source_changes: AtomicU64,
    prepare: OnceLock<Prepare>,
}

/// When the table last changed and the last failure, for `/status`.
#[derive(Debug, Clone, Default)]
pub struct History {
    pub loaded_at: Option<SystemTime>,
    pub last_error: Option<(SystemTime, String)>,
}

/// Why a wake-up of the reloader found nothing to do, or what it did.
#[derive(Debug, PartialEq, Eq)]
pub enum Reloaded {
    Unchanged,
    Changed { version: u64, backends: usize },
}

/// How many ids of `old` are not in `new`, both sorted by id.
fn removed_ids(old: &[RoutedBackend], new: &[RoutedBackend]) -> usize {
    let (mut removed, mut j) = (0, 0);
    for o in old {
        while new.get(j).is_some_and(|n| n.backend.id < o.backend.id) {
            j += 1;
        }
        if new.get(j).is_none_or(|n| n.backend.id != o.backend.id) {
            removed += 1;
        }
    }
    removed
}

/// Called with each new snapshot before it is published (see [`Routing::prepare_with`]).
type Prepare = Arc<dyn Fn(&RoutingTable) + Send + Sync>;

impl Routing {
    pub fn new(
        repo: Arc<dyn BackendRepository>,
        metrics: Arc<LiveStats>,
        drop_warn_percent: u64,
    ) -> Self {
        Self {
            table: ArcSwap::from_pointee(RoutingTable::default()),
            repo,
            metrics,
            health: Arc::new(LocalHealth::new(HealthRules::off())),
            version: watch::Sender::new(0),
            versions: AtomicU64::new(0),
            skipped: Mutex::default(),
            own: Mutex::default(),
            history: Mutex::default(),
            outcomes: Default::default(),
            reloading: tokio::sync::Mutex::new(()),
            drop_warn_percent,
            mass_drops: AtomicU64::new(0),
            read_at: Mutex::default(),
            failing: Mutex::default(),
            notifications_ignored: AtomicU64::new(0),
            source_changes: AtomicU64::new(0),
            prepare: OnceLock::new(),
        }
    }

    /// Runs `prepare` (on a blocking thread) with every snapshot of new rows before
    /// connections see it: the policies copy it in while the previous one still serves.
    /// (This POP's verdicts alone change no rows, and prepare nothing.)
    pub fn prepare_with(&self, prepare: impl Fn(&RoutingTable) + Send + Sync + 'static) {
        let _ = self.prepare.set(Arc::new(prepare));
    }

    /// A version above every one handed out.
    fn next_version(&self) -> u64 {
        self.versions.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Prepares `table` (see `prepare_with`).
    async fn prepare(&self, table: &Arc<RoutingTable>) {
        if let Some(prepare) = self.prepare.get() {
            let (prepare, t) = (Arc::clone(prepare), Arc::clone(table));
            let _ = tokio::task::spawn_blocking(move || prepare(&t)).await;
        }
    }

    /// Publishes `rows` (a new table), prepared first, in place of `current`, with this
    /// POP's verdicts worked out and written just before the swap, with no wait between:
    /// the verdicts live beside the backends' counts, shared with the snapshot still
    /// serving, which must not route by another table's view while the policies copy
    /// this one (the panic rule depends on each app's rows). A verdict published
    /// meanwhile (verdicts take no lock) makes the swap fail, and the verdicts are worked
    /// out again over it under a newer version, so versions only grow. Returns the
    /// version stored.
    async fn publish(&self, current: &Arc<RoutingTable>, rows: RoutingTable) -> u64 {
        let rows = Arc::new(rows);
        self.prepare(&rows).await;
        let mut current = Arc::clone(current);
        let mut version = rows.version();
        loop {
            let (up, panicking) = self.local_changes(&rows, &current).unwrap_or_else(|| {
                let up = rows.backends().iter().map(RoutedBackend::up).collect();
                (up, rows.panicking().to_vec())
            });
            // The same rows: nothing for the policies to copy again.
            let table = Arc::new(rows.with_local(version, &up, panicking));
            let before = self.table.compare_and_swap(&current, table);
            if Arc::ptr_eq(&before, &current) {
                self.announce(version);
                return version;
            }
            current = arc_swap::Guard::into_inner(before);
            version = self.next_version();
        }
    }

    /// Tells subscribers, never going back (publishers race).
    fn announce(&self, version: u64) {
        self.version.send_if_modified(|v| {
            let newer = version > *v;
            *v = (*v).max(version);
            newer
        });
    }

    /// Routes by `health`'s verdicts as well as the table.
    pub fn with_health(mut self, health: Arc<LocalHealth>) -> Self {
        self.health = health;
        self
    }

    pub fn health(&self) -> &Arc<LocalHealth> {
        &self.health
    }

    /// This POP's verdicts on `table`'s backends (by position) and the apps in panic, or
    /// None when they are what `table` already holds; apps entering or leaving panic
    /// (against `before`) are logged once.
    fn local_changes(
        &self,
        table: &RoutingTable,
        before: &RoutingTable,
    ) -> Option<(Vec<bool>, Vec<Arc<str>>)> {
        let (up, panicking) = local_view(
            table,
            self.health.verdicts(),
            self.health.rules.panic_percent,
        );
        for app in panicking.iter().filter(|a| !before.panicking().contains(a)) {
            tracing::error!(%app, "no backend of this app is up from this POP (or fewer than health_check_panic_percent); routing by the table alone until some are");
        }
        for app in before.panicking().iter().filter(|a| !panicking.contains(a)) {
            tracing::info!(%app, "backends of this app are up from this POP again; routing by local health");
        }
        let same = table
            .backends()
            .iter()
            .map(RoutedBackend::up)
            .eq(up.iter().copied());
        (!same || panicking != table.panicking()).then_some((up, panicking))
    }

    /// Rebuilds the snapshot after this POP's verdicts changed (not the table): true when
    /// routing changed here. Takes no lock, so it never waits for a reload (a source that
    /// stalls, a PostgreSQL server that stopped answering): a reload that stores its table
    /// meanwhile makes the swap fail and this goes again over that table. The rows stay,
    /// so the policies keep their copy of the table (see `RoutingTable::rows_version`).
    pub async fn refresh_local(&self) -> bool {
        loop {
            let current = self.table.load_full();
            let Some((up, panicking)) = self.local_changes(&current, &current) else {
                return false;
            };
            let table = Arc::new(current.with_local(self.next_version(), &up, panicking));
            let version = table.version();
            let before = self.table.compare_and_swap(&current, table);
            if Arc::ptr_eq(&before, &current) {
                self.announce(version);
                return true;
            }
        }
    }

    pub fn history(&self) -> History {
        self.history
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Rows of the last load that were skipped as invalid.
    pub fn skipped(&self) -> Vec<SkippedRow> {
        self.skipped
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// How many reads found the source written since the one before.
    pub fn source_changes(&self) -> u64 {
        self.source_changes.load(Ordering::Acquire)
    }

    /// Reload attempts that changed the table, found it unchanged, and failed.
    pub fn reload_counts(&self) -> [u64; 3] {
        self.outcomes.each_ref().map(|c| c.load(Ordering::Relaxed))
    }

    /// The snapshot to route one connection with.
    pub fn current(&self) -> Arc<RoutingTable> {
        self.table.load_full()
    }

    /// Changes to the table version, for whoever must react to a reload (and tests).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Loads the table once and swaps it in if it changed; counts and records the outcome.
    pub async fn reload(&self) -> Result<Reloaded, RoutingError> {
        self.reload_locked().await
    }

    async fn reload_locked(&self) -> Result<Reloaded, RoutingError> {
        let _one = self.reloading.lock().await;
        let result = self.load_and_swap().await;
        let outcome = match &result {
            Ok(Reloaded::Changed { .. }) => 0,
            Ok(Reloaded::Unchanged) => 1,
            Err(_) => 2,
        };
        self.outcomes[outcome].fetch_add(1, Ordering::Relaxed);
        let mut history = self.history.lock().unwrap_or_else(PoisonError::into_inner);
        match &result {
            Ok(Reloaded::Changed { .. }) => history.loaded_at = Some(SystemTime::now()),
            Ok(Reloaded::Unchanged) => {}
            Err(e) => history.last_error = Some((SystemTime::now(), e.to_string())),
        }
        result
    }

    /// This POP's listeners as bound.
    pub fn own_listeners(&self) -> Vec<std::net::SocketAddr> {
        self.own
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// This POP's listeners, as bound; rows pointing at them are skipped from now on.
    pub fn listening_at(&self, addrs: impl IntoIterator<Item = std::net::SocketAddr>) {
        self.own
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(addrs);
    }

    /// Moves the rows that point at this POP's own listeners to the skipped ones.
    fn skip_own(&self, loaded: &mut crate::domain::ports::LoadedBackends) {
        let own = self.own_listeners();
        if own.is_empty() {
            return;
        }
        // Whether an address is this host's is asked once per address (a bind), and only
        // for rows on the port of a wildcard listener.
        let mut local = std::collections::HashMap::new();
        let mut this_host = |ip| *local.entry(ip).or_insert_with(|| is_local(ip));
        loaded.backends.retain(|b| {
            if !crate::domain::registration::is_own_listener(&own, b.addr, &mut this_host) {
                return true;
            }
            loaded.skipped.push(SkippedRow {
                id: b.id.to_string(),
                reason: format!(
                    "{} is this POP's own listener: the proxy would connect to itself",
                    b.addr
                ),
            });
            false
        });
    }

    async fn load_and_swap(&self) -> Result<Reloaded, RoutingError> {
        let repo = Arc::clone(&self.repo);
        // The marker first: a write landing during the read changes it, so that write's
        // notification still reloads.
        let (marker, loaded) = tokio::task::spawn_blocking(move || (repo.marker(), repo.load()))
            .await
            .map_err(|e| RoutingError::Unreadable {
                location: "routing loader".into(),
                reason: e.to_string(),
            })?;
        let mut loaded = loaded?;
        self.skip_own(&mut loaded);
        {
            let mut read_at = self.read_at.lock().unwrap_or_else(PoisonError::into_inner);
            if marker.is_none() || *read_at != marker {
                self.source_changes.fetch_add(1, Ordering::Release);
            }
            *read_at = marker;
        }
        {
            // Invariant: the lock is never held across a panic-prone call.
            let mut last = self.skipped.lock().unwrap_or_else(PoisonError::into_inner);
            for row in loaded.skipped.iter().filter(|r| !last.contains(r)) {
                tracing::warn!(backend = %row.id, reason = %row.reason, "skipping routing row");
            }
            *last = loaded.skipped;
        }
        let current = self.table.load_full();
        if current.version() > 0 && current.same_rows(&loaded.backends) {
            return Ok(Reloaded::Unchanged);
        }
        let version = self.next_version();
        let count = loaded.backends.len();
        let table = RoutingTable::new(version, loaded.backends, |id| {
            self.metrics.backend_stats(id)
        });
        let before = current.backends().len();
        // Both are sorted by id: one merge walk. (A binary search per row made this the
        // costliest step at 100,000 rows, each comparison a cache miss.)
        let removed = removed_ids(current.backends(), table.backends());
        if before > 0 && removed as u64 * 100 > before as u64 * self.drop_warn_percent {
            self.mass_drops.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                removed,
                of = before,
                left = count,
                "routing reload removes more than {}% of the backends at once; applying it (check the routing table if this was not meant)",
                self.drop_warn_percent
            );
        }
        let ids: HashSet<BackendId> = table
            .backends()
            .iter()
            .map(|b| b.backend.id.clone())
            .collect();
        let checked: HashSet<BackendId> = table
            .backends()
            .iter()
            .filter(|b| self.health.rules.check_for(&b.backend.app).enabled)
            .map(|b| b.backend.id.clone())
            .collect();
        self.metrics.retain(&|id| ids.contains(id));
        self.health.forget_checks(|id| checked.contains(id));
        let version = self.publish(&current, table).await;
        // Only once the old table is gone: a verdict published over it meanwhile must not
        // find its removed backends' verdicts forgotten (up).
        self.health.retain(|id| ids.contains(id));
        // A verdict that landed between working the verdicts out and the swap, and
        // changed nothing on the table then serving (an app in panic there), is applied.
        self.refresh_local().await;
        Ok(Reloaded::Changed {
            version,
            backends: count,
        })
    }

    async fn reload_and_log(&self) {
        let result = self.reload().await;
        let mut failing = self.failing.lock().unwrap_or_else(PoisonError::into_inner);
        match result {
            Ok(loaded) => {
                if failing.take().is_some() {
                    tracing::info!("routing table readable again");
                }
                if let Reloaded::Changed { version, backends } = loaded {
                    tracing::info!(version, backends, "routing table loaded")
                }
            }
            Err(e) => {
                let message = e.to_string();
                match failing.as_deref() == Some(message.as_str()) {
                    true => tracing::debug!(error = %e, "routing reload failed again"),
                    false => {
                        tracing::error!(error = %e, "routing reload failed; keeping the last good table (logged again when the failure changes or ends)")
                    }
                }
                *failing = Some(message);
            }
        }
    }

    /// Waits until the source stops changing (a burst of writes, or a file copied in
    /// place, which must not be read half-written): its marker the same for `SETTLE`,
    /// for at most `SETTLE_MAX`.
    async fn settle(&self) -> Option<String> {
        let marker = || {
            let repo = Arc::clone(&self.repo);
            async move {
                tokio::task::spawn_blocking(move || repo.marker())
                    .await
                    .ok()
                    .flatten()
            }
        };
        let deadline = tokio::time::Instant::now() + SETTLE_MAX;
        let mut last = marker().await;
        loop {
            tokio::time::sleep(SETTLE).await;
            let now = marker().await;
            if now == last || tokio::time::Instant::now() >= deadline {
                return now;
            }
            last = now;
        }
    }

    /// Reloads every `every` and shortly after each `changed` notification until shutdown.
    pub async fn run(&self, every: Duration, changed: Arc<Notify>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate; the caller already loaded once
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
                _ = changed.notified() => {
                    let now = self.settle().await;
                    let read_at = self.read_at.lock().unwrap_or_else(PoisonError::into_inner).clone();
                    if now.is_some() && now == read_at {
                        self.notifications_ignored.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                }
            }
            self.reload_and_log().await;
        }
    }
}

/// Whether `ip` is one of this host's addresses: binding to it works only then, unless
/// the host lets any address be bound (`ip_nonlocal_bind`, common beside keepalived),
/// where only loopback is taken for this host's.
pub(crate) fn is_local(ip: std::net::IpAddr) -> bool {
    static NONLOCAL_BIND: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let nonlocal = *NONLOCAL_BIND.get_or_init(|| {
        ["ipv4", "ipv6"].iter().any(|v| {
            std::fs::read_to_string(format!("/proc/sys/net/{v}/ip_nonlocal_bind"))
                .is_ok_and(|s| s.trim() != "0")
        })
    });
    match nonlocal {
        true => ip.is_loopback(),
        false => std::net::UdpSocket::bind((ip, 0)).is_ok(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::mpsc;

    use super::*;
    use crate::domain::ports::LoadedBackends;
    use crate::domain::sample;

    #[test]
    fn removed_ids_counts_rows_gone_from_the_new_table() {
        let table = |ids: &[&str]| {
            let rows = ids
                .iter()
                .map(|id| crate::domain::Backend {
                    id: crate::domain::BackendId::new(id),
                    ..sample::backends("app")[0].clone()
                })
                .collect();
            RoutingTable::new(1, rows, |_| Default::default())
        };
        let old = table(&["a", "b", "c", "e"]);
        let new = table(&["b", "d", "e", "f"]);
        assert_eq!(removed_ids(old.backends(), new.backends()), 2);
        assert_eq!(removed_ids(new.backends(), old.backends()), 2);
        assert_eq!(removed_ids(old.backends(), old.backends()), 0);
        assert_eq!(removed_ids(old.backends(), &[]), 4);
    }

    /// The first load is slow and sees the old table; the second is quick and sees the
    /// new one (an `edgeproxy backend add` landed in between).
    struct SlowThenFast {
        loads: AtomicUsize,
        second_done: Mutex<Option<mpsc::Receiver<()>>>,
        signal: Mutex<Option<mpsc::Sender<()>>>,
    }

    impl BackendRepository for SlowThenFast {
        fn load(&self) -> Result<LoadedBackends, RoutingError> {
            let n = self.loads.fetch_add(1, Ordering::SeqCst);
            let mut backends = sample::backends("app");
            if n == 0 {
                // Wait (bounded) for the second load to finish first, as it would when
                // two reloads race; serialised, it never starts, and this one goes on.
                let rx = self.second_done.lock().unwrap().take().unwrap();
                let _ = rx.recv_timeout(Duration::from_millis(300));
                backends.truncate(1);
            } else if let Some(tx) = self.signal.lock().unwrap().take() {
                let _ = tx.send(());
            }
            Ok(LoadedBackends {
                backends,
                skipped: Vec::new(),
            })
        }
    }

    /// A file copied in place, slowly: written in four steps 60 ms apart, whole only
    /// after the last. Loads while it is being written see half a table.
    #[derive(Default)]
    struct Copying {
        step: Mutex<u32>,
        writing: std::sync::atomic::AtomicBool,
        loads_while_writing: AtomicUsize,
    }

    impl BackendRepository for Copying {
        fn load(&self) -> Result<LoadedBackends, RoutingError> {
            let mut backends = sample::backends("app");
            if self.writing.load(Ordering::SeqCst) {
                self.loads_while_writing.fetch_add(1, Ordering::SeqCst);
                backends.truncate(2);
            }
            Ok(LoadedBackends {
                backends,
                skipped: Vec::new(),
            })
        }

        fn marker(&self) -> Option<String> {
            Some(self.step.lock().unwrap().to_string())
        }
    }

    /// A source whose `n`th load (from 0) reads `tables(n)`.
    struct ByLoad<F>(AtomicUsize, F);

    impl<F: Fn(usize) -> Vec<crate::domain::Backend> + Send + Sync> BackendRepository for ByLoad<F> {
        fn load(&self) -> Result<LoadedBackends, RoutingError> {
            Ok(LoadedBackends {
                backends: (self.1)(self.0.fetch_add(1, Ordering::SeqCst)),
                skipped: Vec::new(),
            })
        }
    }

    /// Routing over `tables` (see [`ByLoad`]) with passive ejection on, up to
    /// `max_percent` of an app, and this POP's health it routes by.
    fn ejecting(
        tables: impl Fn(usize) -> Vec<crate::domain::Backend> + Send + Sync + 'static,
        max_percent: u32,
    ) -> (Arc<Routing>, Arc<LocalHealth>) {
        let mut rules = HealthRules::off();
        rules.ejection.enabled = true;
        rules.ejection.max_percent = max_percent;
        let health = Arc::new(LocalHealth::new(rules));
        let routing = Routing::new(
            Arc::new(ByLoad(AtomicUsize::new(0), tables)),
            Arc::new(LiveStats::default()),
            50,
        )
        .with_health(Arc::clone(&health));
        (Arc::new(routing), health)
    }

    /// Holds the preparation of each table `when` picks until released: a receiver told
    /// when one is held, and the sender that releases it.
    fn hold_prepare(
        routing: &Routing,
        when: impl Fn(&RoutingTable) -> bool + Send + Sync + 'static,
    ) -> (mpsc::Receiver<()>, mpsc::Sender<()>) {
        let (entered, preparing) = mpsc::channel();
        let (release, released) = mpsc::channel::<()>();
        let released = Mutex::new(released);
        routing.prepare_with(move |t| {
            if when(t) {
                let _ = entered.send(());
                let _ = released
                    .lock()
                    .unwrap()
                    .recv_timeout(Duration::from_secs(10));
            }
        });
        (preparing, release)
    }

    /// Waits (off the runtime) until `held` says a preparation is held.
    async fn held(held: mpsc::Receiver<()>) {
        tokio::task::spawn_blocking(move || held.recv_timeout(Duration::from_secs(10)))
            .await
            .unwrap()
            .unwrap();
    }

    /// A reload whose source stalls must not hold this POP's verdicts back: a verdict is
    /// published at once, without the reload lock, and the reload's table, stored after
    /// it, keeps it under a newer version.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_verdict_does_not_wait_for_a_stalled_reload() {
        let (tx, rx) = mpsc::channel::<()>();
        let release = Mutex::new(Some(rx));
        // The second load stalls until released, and brings a row less.
        let (routing, health) = ejecting(
            move |n| {
                let mut backends = sample::backends("app");
                if n == 1 {
                    if let Some(rx) = release.lock().unwrap().take() {
                        let _ = rx.recv_timeout(Duration::from_secs(10));
                    }
                    backends.pop();
                }
                backends
            },
            50,
        );
        routing.reload().await.unwrap();
        let loaded = routing.current();
        let first = loaded.backends()[0].backend.id.clone();
        let reload = tokio::spawn({
            let r = Arc::clone(&routing);
            async move { r.reload().await }
        });
        // The reload holds its lock, stalled in the source.
        while routing.reloading.try_lock().is_ok() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        health
            .eject(&loaded, &first, 5, tokio::time::Instant::now())
            .unwrap();
        let refreshed = tokio::time::timeout(Duration::from_secs(2), routing.refresh_local()).await;
        assert_eq!(refreshed, Ok(true), "waited for the stalled reload");
        let ejected = routing.current();
        assert!(!ejected.backends()[0].up());
        assert_eq!(
            ejected.rows_version(),
            loaded.rows_version(),
            "a verdict keeps the rows (and the policies' copies)"
        );
        tx.send(()).unwrap();
        assert!(matches!(
            reload.await.unwrap().unwrap(),
            Reloaded::Changed { .. }
        ));
        let reloaded = routing.current();
        assert_eq!(reloaded.backends().len(), loaded.backends().len() - 1);
        assert!(!reloaded.backends()[0].up(), "the reload lost the verdict");
        assert!(reloaded.version() > ejected.version());
        assert!(reloaded.rows_version() > ejected.rows_version());
        assert_eq!(*routing.subscribe().borrow(), reloaded.version());
    }

    /// A verdict published while a reload prepares its new rows (the policies copying
    /// them in) is not lost when the reload's table goes in after it: the reload joins it
    /// under a newer version, and reports the version it stored.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_verdict_published_while_a_reload_prepares_is_joined_to_it() {
        let (routing, health) = ejecting(
            |n| {
                let mut backends = sample::backends("app");
                if n > 0 {
                    backends.pop();
                }
                backends
            },
            50,
        );
        let (preparing, release) = hold_prepare(&routing, |t| t.rows_version() > 1);
        routing.reload().await.unwrap();
        let loaded = routing.current();
        let first = loaded.backends()[0].backend.id.clone();
        let reload = tokio::spawn({
            let r = Arc::clone(&routing);
            async move { r.reload().await }
        });
        held(preparing).await;
        health
            .eject(&loaded, &first, 5, tokio::time::Instant::now())
            .unwrap();
        assert!(routing.refresh_local().await);
        let ejected = routing.current();
        assert!(!ejected.backends()[0].up());
        release.send(()).unwrap();
        let Reloaded::Changed { version, .. } = reload.await.unwrap().unwrap() else {
            panic!("the rows changed");
        };
        let reloaded = routing.current();
        assert_eq!(reloaded.version(), version, "reported another version");
        assert!(version > ejected.version());
        assert_eq!(reloaded.backends().len(), loaded.backends().len() - 1);
        assert!(!reloaded.backends()[0].up(), "the reload lost the verdict");
        assert_eq!(*routing.subscribe().borrow(), version);
    }

    /// The verdicts live beside the backends' counts, shared with the snapshot serving:
    /// a reload whose rows take an app out of panic must not write its view while the
    /// policies copy its table, or the serving snapshot (still in panic) would route to
    /// nothing. After the swap, the new view holds.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reload_writes_its_verdicts_only_as_it_swaps() {
        let (routing, health) = ejecting(
            |n| {
                let mut backends = sample::backends("app");
                backends.truncate(2 + n.min(1));
                backends
            },
            100,
        );
        let (preparing, release) = hold_prepare(&routing, |t| {
            t.rows_version() > 1 && t.backends().len() == 3
        });
        routing.reload().await.unwrap();
        let two = routing.current();
        let now = tokio::time::Instant::now();
        for b in two.backends() {
            health.eject(&two, &b.backend.id, 5, now).unwrap();
        }
        routing.refresh_local().await;
        let serving = routing.current();
        assert_eq!(
            serving.panicking().len(),
            1,
            "nothing up: the app is in panic"
        );
        assert!(serving.backends().iter().all(RoutedBackend::routable));

        let reload = tokio::spawn({
            let r = Arc::clone(&routing);
            async move { r.reload().await }
        });
        held(preparing).await;
        assert!(
            serving.backends().iter().all(RoutedBackend::routable),
            "the snapshot serving lost its panic while the next table was prepared"
        );
        release.send(()).unwrap();
        reload.await.unwrap().unwrap();
        let three = routing.current();
        assert!(three.panicking().is_empty());
        let up: Vec<bool> = three.backends().iter().map(RoutedBackend::up).collect();
        assert_eq!(up, [false, false, true]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_source_still_being_written_is_not_read() {
        let repo = Arc::new(Copying::default());
        let routing = Arc::new(Routing::new(
            repo.clone(),
            Arc::new(LiveStats::default()),
            50,
        ));
        let (changed, stop) = (Arc::new(Notify::new()), CancellationToken::new());
        let task = tokio::spawn({
            let (r, c, s) = (Arc::clone(&routing), Arc::clone(&changed), stop.clone());
            async move { r.run(Duration::from_secs(3600), c, s).await }
        });
        repo.writing.store(true, Ordering::SeqCst);
        for step in 1..=4 {
            *repo.step.lock().unwrap() = step;
            if step == 4 {
                repo.writing.store(false, Ordering::SeqCst);
            }
            changed.notify_one();
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
        let mut versions = routing.subscribe();
        tokio::time::timeout(Duration::from_secs(10), versions.wait_for(|v| *v >= 1))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(repo.loads_while_writing.load(Ordering::SeqCst), 0);
        assert_eq!(routing.current().backends().len(), 4);
        stop.cancel();
        task.await.unwrap();
    }

    /// Every read of a SQLite file in WAL mode creates and removes its `-wal` file, and the
    /// watcher sees both: each reload used to notify the next, several a second for as
    /// long as the proxy ran (with 10,000 rows, 17% of a core). A notification that finds
    /// the file as it was read is now the reader's own, and ignored.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reload_does_not_trigger_the_next() {
        use crate::adapters::outbound::sqlite_routing::SqliteBackendRepository;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routing.db");
        let repo = SqliteBackendRepository::new(&path);
        repo.create_if_missing().unwrap();
        let routing = Arc::new(Routing::new(
            Arc::new(repo),
            Arc::new(LiveStats::default()),
            50,
        ));
        routing.reload().await.unwrap();
        let changed = Arc::new(Notify::new());
        let _watch =
            crate::adapters::inbound::file_watch::watch(&path, Arc::clone(&changed)).unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let (r, s) = (Arc::clone(&routing), stop.clone());
            async move { r.run(Duration::from_secs(3600), changed, s).await }
        });
        let mut versions = routing.subscribe();
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute(
                "INSERT INTO backends (id, app, region, country, wg_ip, port) VALUES ('a', 'app', 'eu', 'DE', '10.0.0.1', 80)",
                [],
            )
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), versions.wait_for(|v| *v >= 2))
            .await
            .unwrap()
            .unwrap();
        // The reload's own read is noticed, and let be.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while routing.notifications_ignored.load(Ordering::Relaxed) == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no notification after the reload"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // At most one more read: the writer's own close (a checkpoint) may land after the
        // marker of the read its commit caused.
        let [changed, unchanged, _] = routing.reload_counts();
        assert_eq!(changed, 2);
        assert!(unchanged <= 1, "{unchanged} reloads found nothing new");
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn racing_reloads_never_store_an_older_table() {
        let (tx, rx) = mpsc::channel();
        let repo = Arc::new(SlowThenFast {
            loads: AtomicUsize::new(0),
            second_done: Mutex::new(Some(rx)),
            signal: Mutex::new(Some(tx)),
        });
        let routing = Arc::new(Routing::new(
            repo.clone(),
            Arc::new(LiveStats::default()),
            50,
        ));
        let first = tokio::spawn({
            let r = Arc::clone(&routing);
            async move { r.reload().await }
        });
        while repo.loads.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        routing.reload().await.unwrap();
        first.await.unwrap().unwrap();
        // The load that started last decides what serves.
        assert_eq!(routing.current().backends().len(), 4);
    }
}
