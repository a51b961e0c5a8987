//! Where fleet deployments run on this POP (`PolicySlots`): the live policy and the
//! shadow. A deployed component is compiled by the live policy's engine whatever its role,
//! so a deployed shadow can be promoted; while a deployment serves, the configured file is
//! not reloaded over it.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{LoadedPolicy, WasmPolicy};
use crate::domain::ports::{PolicySlots, timestamp};
use crate::domain::rollout::{Role, Running};

pub struct Slots {
    pub live: Arc<WasmPolicy>,
    pub shadow: Arc<WasmPolicy>,
    /// This POP configured a shadow of its own (shadow_policy_path): restoring brings it
    /// back; otherwise restoring turns the shadow off.
    pub configured_shadow: bool,
}

impl Slots {
    fn slot(&self, role: Role) -> &WasmPolicy {
        match role {
            Role::Live => &self.live,
            Role::Shadow => &self.shadow,
        }
    }
}

impl PolicySlots for Slots {
    fn install(
        &self,
        role: Role,
        name: &str,
        bytes: &[u8],
        deployment: &str,
    ) -> Result<(), String> {
        let mut loaded =
            LoadedPolicy::load(self.live.runtime(), name, bytes).map_err(|e| e.to_string())?;
        loaded.deployment = Some(deployment.to_owned());
        let slot = self.slot(role);
        slot.hold(true);
        slot.swap(loaded);
        slot.set_enabled(true);
        Ok(())
    }

    fn restore(&self, role: Role) -> Result<(), String> {
        match role {
            Role::Shadow if !self.configured_shadow => {
                self.shadow.hold(false);
                self.shadow.set_enabled(false);
                Ok(())
            }
            role => self.slot(role).restore_configured(),
        }
    }

    fn running(&self, role: Role) -> Option<Running> {
        let slot = self.slot(role);
        if !slot.enabled() {
            return None;
        }
        let p = slot.current();
        Some(Running {
            name: p.name.to_string(),
            hash: p.hash.clone(),
            since: timestamp(p.loaded_at),
            deployment: p.deployment.clone(),
            faults: p.faults.load(Ordering::Relaxed),
        })
    }
}
