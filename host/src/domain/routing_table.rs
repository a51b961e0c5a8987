//! The routing snapshot the hot path reads: backends joined with their live stats,
//! grouped by app. Built off the hot path on every reload and swapped in whole. Its rows
//! never change; this POP's verdicts live beside the live counts (shared by every
//! snapshot of the same backend), so a verdict is a new version that shares the rows.

use std::collections::HashMap;
use std::sync::Arc;

use super::model::{Backend, BackendId, BackendStats};

/// A backend together with the live counters shared across reloads.
#[derive(Clone, Debug)]
pub struct RoutedBackend {
    /// Position in [`RoutingTable::backends`].
    pub index: u32,
    pub backend: Backend,
    pub stats: Arc<BackendStats>,
}

impl RoutedBackend {
    /// This POP's checks and ejections let it route here (see [`super::health`]).
    pub fn up(&self) -> bool {
        self.stats.up_here()
    }

    /// Healthy in the table and up here (a policy is offered only backends up here, and
    /// told the table's `healthy`).
    pub fn routable(&self) -> bool {
        self.backend.healthy && self.up()
    }

    /// May take a new connection: routable and under its hard limit.
    pub fn is_eligible(&self) -> bool {
        self.up() && self.is_eligible_if_up()
    }

    /// Healthy in the table and under its hard limit, whatever this POP's verdict.
    pub fn is_eligible_if_up(&self) -> bool {
        self.backend.healthy && !self.backend.at_hard_limit(self.stats.active())
    }
}

#[derive(Debug, Default)]
pub struct RoutingTable {
    version: u64,
    /// The version of the rows: this POP's verdicts alone change `version`, not this, so
    /// what is built from the rows (a policy's copy of the table) is kept across them.
    rows_version: u64,
    /// Sorted by id, so positions (and therefore tie-breaks) are deterministic. Shared
    /// by the versions that differ only in this POP's verdicts.
    all: Arc<[RoutedBackend]>,
    by_app: Arc<HashMap<Arc<str>, Box<[RoutedBackend]>>>,
    /// Apps whose local verdicts are set aside (nothing up here).
    panicking: Vec<Arc<str>>,
}

impl RoutingTable {
    pub fn new(
        version: u64,
        mut backends: Vec<Backend>,
        stats_for: impl Fn(&BackendId) -> Arc<BackendStats>,
    ) -> Self {
        backends.sort_by(|a, b| a.id.cmp(&b.id));
        let all: Vec<RoutedBackend> = backends
            .into_iter()
            .enumerate()
            .map(|(i, backend)| RoutedBackend {
                // Invariant: a table never holds 2^32 backends (it comes from SQLite rows
                // routed by one process).
                index: u32::try_from(i).expect("fewer than 2^32 backends"),
                stats: stats_for(&backend.id),
                backend,
            })
            .collect();
        let mut by_app: HashMap<Arc<str>, Vec<RoutedBackend>> = HashMap::new();
        for rb in &all {
            by_app
                .entry(Arc::clone(&rb.backend.app))
                .or_default()
                .push(rb.clone());
        }
        Self {
            version,
            rows_version: version,
            all: all.into(),
            by_app: Arc::new(by_app.into_iter().map(|(k, v)| (k, v.into())).collect()),
            panicking: Vec::new(),
        }
    }

    /// This table as `version`, with this POP's verdicts (`up`, by position) and the apps
    /// in panic; the rows, and their version, stay. The verdicts are stored beside the
    /// backends' live counts, so every snapshot holding them (this one too) reads them at
    /// once: no row is copied.
    pub fn with_local(&self, version: u64, up: &[bool], panicking: Vec<Arc<str>>) -> Self {
        // Those coming up first, then those going down: never a moment with fewer up
        // than either view has.
        for going_up in [true, false] {
            for (b, up) in self.all.iter().zip(up).filter(|(_, up)| **up == going_up) {
                b.stats.set_up_here(*up);
            }
        }
        Self {
            version,
            rows_version: self.rows_version,
            all: Arc::clone(&self.all),
            by_app: Arc::clone(&self.by_app),
            panicking,
        }
    }

    /// Each app with its backends, in no particular order.
    pub fn apps(&self) -> impl Iterator<Item = (&Arc<str>, &[RoutedBackend])> {
        self.by_app.iter().map(|(app, of_app)| (app, &of_app[..]))
    }

    /// Apps whose local verdicts are set aside.
    pub fn panicking(&self) -> &[Arc<str>] {
        &self.panicking
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// Changes with the rows only (see the field).
    pub fn rows_version(&self) -> u64 {
        self.rows_version
    }

    /// Every backend, sorted by id.
    pub fn backends(&self) -> &[RoutedBackend] {
        &self.all
    }

    /// The backends a listener may use: those of its app, or all of them when the
    /// listener serves every app.
    pub fn candidates(&self, app: Option<&str>) -> &[RoutedBackend] {
        match app {
            None => &self.all,
            Some(app) => self.by_app.get(app).map_or(&[], |v| &v[..]),
        }
    }

    /// The app `name` names, compared without case (DNS names have none): its name as
    /// the table spells it and its backends.
    pub fn app_named(&self, name: &str) -> Option<(&str, &[RoutedBackend])> {
        if let Some((app, b)) = self.by_app.get_key_value(name) {
            return Some((app, b));
        }
        self.by_app
            .iter()
            .find(|(app, _)| app.eq_ignore_ascii_case(name))
            .map(|(app, b)| (&**app, &b[..]))
    }

    /// True when `backends` describe the same table as this snapshot (reloads that change
    /// nothing keep the version).
    pub fn same_rows(&self, backends: &[Backend]) -> bool {
        let mut sorted: Vec<&Backend> = backends.iter().collect();
        sorted.sort_by(|a, b| a.id.cmp(&b.id));
        sorted.len() == self.all.len()
            && sorted
                .iter()
                .zip(self.all.iter())
                .all(|(a, b)| **a == b.backend)
    }
}
