//! This POP's side of fleet deployments: whenever the replicated records change, work out
//! what it should run as live and shadow policy (`domain::rollout::assignment`), fetch the
//! component (checked against its hash), compile and self-test it on a blocking thread,
//! swap it in, and report what it runs. A component that fails any step is refused: the
//! refusal is reported with its cause and what served before keeps serving. A deployment
//! refused here stays refused (the operator deploys again); one that could not be fetched
//! because no POP holding it was reachable is tried again.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use super::shadow::Shadow;
use crate::domain::ports::{FetchError, PolicyFleet, PolicySlots, timestamp};
use crate::domain::rollout::{
    self, Deployment, PopPolicies, REFUSALS_KEPT, Refusal, Role, Running,
};

/// Fault counts in the report are brought up to date this often (when they changed).
const REPORT_EVERY: Duration = Duration::from_secs(10);
/// A component no reachable POP held is looked for again after this, doubling up to
/// `RETRY_MAX` while it stays out of reach.
const RETRY: Duration = Duration::from_secs(2);
const RETRY_MAX: Duration = Duration::from_secs(60);

pub struct Rollout {
    pub fleet: Arc<dyn PolicyFleet>,
    /// None: the live policy is the native scorer, which a component cannot replace.
    pub slots: Option<Arc<dyn PolicySlots>>,
    /// The shadow's record, reset when a deployed shadow replaces another.
    pub shadow: Option<Arc<Shadow>>,
    pub region: String,
    pub max_bytes: u64,
}

/// What this POP has applied, per role: the deployment id, None for its configuration.
#[derive(Default)]
struct Applied {
    live: Option<String>,
    shadow: Option<String>,
    refused: Vec<Refusal>,
}

impl Applied {
    fn of(&mut self, role: Role) -> &mut Option<String> {
        match role {
            Role::Live => &mut self.live,
            Role::Shadow => &mut self.shadow,
        }
    }

    fn refuse(&mut self, d: &Deployment, cause: String) {
        tracing::error!(deployment = %d.id, hash = %d.hash, role = %d.role, "fleet deployment refused; the previous policy keeps serving: {cause}");
        self.refused.insert(
            0,
            Refusal {
                deployment: d.id.clone(),
                hash: d.hash.clone(),
                cause,
                at: timestamp(SystemTime::now()),
            },
        );
        self.refused.truncate(REFUSALS_KEPT);
    }

    fn refused(&self, d: &Deployment) -> bool {
        self.refused.iter().any(|r| r.deployment == d.id)
    }
}

impl Rollout {
    pub async fn run(self, stop: CancellationToken) {
        let mut changes = self.fleet.changes();
        let mut applied = Applied::default();
        let mut tick = tokio::time::interval(REPORT_EVERY);
        let mut backoff = RETRY;
        loop {
            let retry = self.converge(&mut applied).await;
            let report = PopPolicies {
                pop: self.fleet.pop(),
                region: self.region.clone(),
                live: self.running(Role::Live),
                shadow: self.running(Role::Shadow),
                refused: applied.refused.clone(),
            };
            if let Err(e) = self.fleet.report(report).await {
                tracing::warn!("fleet: reporting this POP's policies: {e}");
            }
            let wait = match retry {
                true => {
                    let now = backoff;
                    backoff = (backoff * 2).min(RETRY_MAX);
                    now
                }
                false => {
                    backoff = RETRY;
                    Duration::MAX
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = changes.changed() => if changed.is_err() { return },
                _ = tick.tick() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    fn running(&self, role: Role) -> Option<Running> {
        self.slots.as_ref().and_then(|s| s.running(role))
    }

    /// Applies what the records say for both roles; true when something should be tried
    /// again soon.
    async fn converge(&self, applied: &mut Applied) -> bool {
        let records = self.fleet.records();
        let deployments = rollout::deployments(records.iter());
        let pop = self.fleet.pop();
        let mut retry = false;
        for role in [Role::Live, Role::Shadow] {
            let want = rollout::assignment(&deployments, role, &pop, &self.region);
            if want.map(|d| &d.id) == applied.of(role).as_ref() {
                continue;
            }
            let Some(slots) = self.slots.clone() else {
                if let Some(d) = want.filter(|d| !applied.refused(d)) {
                    applied.refuse(d, "this POP decides with the native scorer (native_policy); only a component can be replaced".into());
                }
                continue;
            };
            match want {
                Some(d) if applied.refused(d) => {}
                Some(d) => match self.fleet.component(d, self.max_bytes).await {
                    Ok(bytes) => {
                        let (id, name) = (d.id.clone(), d.name.clone());
                        let installed = tokio::task::spawn_blocking(move || {
                            slots.install(role, &name, &bytes, &id)
                        })
                        .await
                        .unwrap_or_else(|e| Err(format!("the loader failed: {e}")));
                        match installed {
                            Ok(()) => {
                                tracing::info!(deployment = %d.id, hash = %d.hash, %role, "fleet deployment serving");
                                *applied.of(role) = Some(d.id.clone());
                                if role == Role::Shadow
                                    && let Some(s) = &self.shadow
                                {
                                    s.reset();
                                }
                            }
                            Err(e) => applied.refuse(d, e),
                        }
                    }
                    Err(FetchError::Corrupt(e)) => applied.refuse(d, e),
                    Err(FetchError::Unavailable(e)) => {
                        tracing::warn!(deployment = %d.id, "fleet: cannot fetch the component yet: {e}");
                        retry = true;
                    }
                },
                None => {
                    let restored = tokio::task::spawn_blocking(move || slots.restore(role))
                        .await
                        .unwrap_or_else(|e| Err(format!("the loader failed: {e}")));
                    match restored {
                        Ok(()) => {
                            tracing::info!(%role, "no fleet deployment for this POP: its configured policy serves");
                            *applied.of(role) = None;
                            if role == Role::Shadow
                                && let Some(s) = &self.shadow
                            {
                                s.reset();
                            }
                        }
                        Err(e) => {
                            tracing::error!(%role, "restoring the configured policy failed; the deployed one keeps serving: {e}");
                            retry = true;
                        }
                    }
                }
            }
        }
        retry
    }
}
