//! One compiled, linked and self-tested policy, and its pool of idle instances: one per
//! thread deciding at the same moment, so a `Store` is never shared and a policy may keep
//! state between calls.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use wasmtime::Store;

use super::runtime::{Component, Guest, GuestState, Linked, LoadError, Runtime};
use super::set_table_budgets;
use super::wit_table::{self, WitTable};
use crate::domain::{BackendStats, Region, RoutingTable, sample};

/// A compiled, self-tested policy and its instances.
pub struct LoadedPolicy {
    pub name: Arc<str>,
    /// SHA-256 of the component (hex): what fleet deployments name it by.
    pub hash: String,
    /// The fleet deployment it came from; None: this POP's configuration.
    pub deployment: Option<String>,
    pub loaded_at: SystemTime,
    /// (length, mtime) of the file it was read from, so the watcher knows what it has.
    pub(super) source: Option<(u64, SystemTime)>,
    /// Decisions this policy made (faults excluded), and its faults.
    pub decisions: AtomicU64,
    pub faults: AtomicU64,
    pre: Linked,
    idle: Mutex<Vec<Instance>>,
}

pub(super) struct Instance {
    pub store: Store<GuestState>,
    pub policy: Guest,
    /// Rows version of the routing table this instance was last given.
    pub table_version: Option<u64>,
    /// Reused per call so a decision allocates nothing once warm: (backend index,
    /// active, rtt) per candidate, flattened as the contract passes them.
    pub candidates: Vec<u32>,
    /// Where each candidate passed sits among the decision's candidates (those down
    /// here are not passed).
    pub positions: Vec<u32>,
}

impl Instance {
    /// Gives this instance `table` (set-table, with its budget for the table's size).
    pub(super) fn take_table(
        &mut self,
        runtime: &Runtime,
        table: &WitTable,
    ) -> wasmtime::Result<()> {
        runtime.arm(
            &mut self.store,
            set_table_budgets(table.table.backends.len()),
        );
        self.policy.set_table(&mut self.store, table)?;
        self.table_version = Some(table.version);
        Ok(())
    }
}

impl LoadedPolicy {
    /// The WIT contract version the component targets.
    pub fn contract(&self) -> &'static str {
        self.pre.contract()
    }

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
            hash: crate::domain::rollout::content_hash(bytes),
            deployment: None,
            loaded_at: SystemTime::now(),
            source: None,
            decisions: AtomicU64::new(0),
            faults: AtomicU64::new(0),
            pre,
            idle: Mutex::new(Vec::new()),
        };
        loaded.self_test(runtime)?;
        Ok(loaded)
    }

    /// One decision on the sample table: the policy must answer in range, in time.
    pub fn self_test(&self, runtime: &Runtime) -> Result<(), LoadError> {
        let fail = |e: wasmtime::Error| LoadError::SelfTest(super::describe(&e).1);
        let (mut store, policy) = runtime.instantiate(&self.pre, &self.name).map_err(fail)?;
        let table = RoutingTable::new(1, sample::backends("selftest"), |_| {
            Arc::new(BackendStats::default())
        });
        let wit = wit_table::build(&table, &Region::new("sa"), &[]);
        runtime.arm(&mut store, set_table_budgets(wit.table.backends.len()));
        policy.set_table(&mut store, &wit).map_err(fail)?;
        let n = table.backends().len() as u32;
        let candidates: Vec<u32> = (0..n).flat_map(|i| [i, i, 0]).collect();
        let client = wit.client(&sample::client_in_brazil());
        runtime.arm(&mut store, 1);
        let app = wit.app(Some("selftest"));
        match policy.pick_backend(&mut store, app, client, None, &candidates) {
            Ok(None) => {}
            Ok(Some(i)) if i < n => {}
            Ok(Some(i)) => {
                return Err(LoadError::SelfTest(format!(
                    "answered {i} of {n} candidates"
                )));
            }
            Err(e) => return Err(fail(e)),
        }
        if !policy.ranks() {
            return Ok(());
        }
        // Two clients, as a DNS batch asks: two rankings.
        runtime.arm(&mut store, 2 * u64::from(n));
        let rankings = policy
            .rank_backends(&mut store, app, vec![client; 2], candidates, n)
            .map_err(fail)?;
        if rankings.len() != 2 {
            return Err(LoadError::SelfTest(format!(
                "ranked for {} clients of 2",
                rankings.len()
            )));
        }
        for ranked in &rankings {
            if let Some((_, i)) = ranked
                .iter()
                .enumerate()
                .find(|&(k, i)| *i >= n || ranked[..k].contains(i))
            {
                return Err(LoadError::SelfTest(format!(
                    "ranked {ranked:?}: {i} is out of {n} candidates or repeated"
                )));
            }
        }
        Ok(())
    }

    /// An idle instance, one holding table `version` if there is one, or a new one.
    pub(super) fn instance(&self, runtime: &Runtime, version: u64) -> wasmtime::Result<Instance> {
        let idle = {
            // Poisoning cannot leave the Vec half-changed (push and remove only).
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            match idle.iter().position(|i| i.table_version == Some(version)) {
                Some(at) => Some(idle.swap_remove(at)),
                None => idle.pop(),
            }
        };
        if let Some(i) = idle {
            return Ok(i);
        }
        let (store, policy) = runtime.instantiate(&self.pre, &self.name)?;
        Ok(Instance {
            store,
            policy,
            table_version: None,
            candidates: Vec::new(),
            positions: Vec::new(),
        })
    }

    /// Copies `table` into the idle instances holding another version, one at a time so
    /// decisions go on with the rest. One that faults is dropped: a decision makes a fresh
    /// one and meets the fault itself, where it is counted. Returns how many took it.
    pub(super) fn refresh_idle(&self, runtime: &Runtime, table: &WitTable) -> u64 {
        let mut copied = 0;
        loop {
            let mut stale = {
                let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
                match idle
                    .iter()
                    .position(|i| i.table_version != Some(table.version))
                {
                    Some(at) => idle.swap_remove(at),
                    None => return copied,
                }
            };
            if stale.take_table(runtime, table).is_ok() {
                copied += 1;
                self.put_back(stale);
            }
        }
    }

    /// Back to the pool after a sound answer (after a fault an instance is dropped).
    pub(super) fn put_back(&self, instance: Instance) {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(instance);
    }
}
