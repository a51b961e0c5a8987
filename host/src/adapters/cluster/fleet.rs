//! Policy records and components between POPs (the `PolicyFleet` port).
//!
//! Records (deployments, POP reports) are few and small: a fresh one is pushed to every
//! member, and each anti-entropy round compares one digest and, when it differs, swaps
//! the whole set. Components are not pushed: a POP a deployment selects fetches it, in
//! 1 MiB chunks, from the deploying POP first and then from any member holding it, and
//! checks the whole against the SHA-256 the deployment names before it keeps or runs it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use super::wire::{self, Message};
use super::{Cluster, Inner, Peer};
use crate::adapters::outbound::sqlite_fleet::SqliteFleet;
use crate::adapters::outbound::sqlite_replica::wall_ms;
use crate::domain::ports::{BoxFuture, DeployRequest, FetchError, PolicyFleet};
use crate::domain::replication::NodeId;
use crate::domain::rollout::{
    self, Deployment, FleetRecord, FleetValue, PopPolicies, Role, content_hash as sha256_hex,
};

/// The fleet file, used from blocking threads, and a snapshot of its records.
pub struct FleetStore {
    file: Arc<Mutex<SqliteFleet>>,
    snapshot: Arc<ArcSwap<Snapshot>>,
    changes: watch::Sender<u64>,
}

/// The records and their digest, taken after each change: sync rounds and status read
/// them without the file.
pub struct Snapshot {
    pub records: Vec<FleetRecord>,
    pub digest: u64,
}

impl Snapshot {
    fn of(file: &SqliteFleet) -> Self {
        Self {
            records: file.records().cloned().collect(),
            digest: file.digest(),
        }
    }

    /// What one POP offers in a records round: every deployment and its own report, with
    /// their digest. Deployments are the fleet's; a report is its POP's alone.
    pub fn offered_by(&self, pop: &str) -> (Vec<FleetRecord>, u64) {
        let records: Vec<FleetRecord> = self
            .records
            .iter()
            .filter(|r| r.value.pop().is_none_or(|p| p == pop))
            .cloned()
            .collect();
        let digest = rollout::digest(&records);
        (records, digest)
    }
}

impl FleetStore {
    pub fn new(file: SqliteFleet) -> Self {
        let snapshot = Arc::new(ArcSwap::from_pointee(Snapshot::of(&file)));
        Self {
            file: Arc::new(Mutex::new(file)),
            snapshot,
            changes: watch::Sender::new(0),
        }
    }

    pub fn records(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut SqliteFleet) -> R + Send + 'static,
    ) -> R {
        let (file, snapshot) = (self.file.clone(), self.snapshot.clone());
        let call = move || {
            let mut file = file.lock().expect("fleet store lock");
            let before = file.generation();
            let out = f(&mut file);
            let changed = file.generation() != before;
            if changed {
                snapshot.store(Arc::new(Snapshot::of(&file)));
            }
            (out, changed)
        };
        let (out, changed) = super::store::blocking(call).await;
        if changed {
            self.changes.send_modify(|n| *n += 1);
        }
        out
    }

    /// Writes `value` as a local record.
    async fn write(&self, value: FleetValue) -> Result<FleetRecord, String> {
        self.run(move |f| {
            let v = f.next_version(wall_ms()).map_err(|e| e.to_string())?;
            f.write(v, value).map_err(|e| e.to_string())
        })
        .await
    }
}

impl Inner {
    /// Records a peer pushed: deployments, and reports only of the POP that sent them.
    pub(super) async fn pushed_records(
        &self,
        from: SocketAddr,
        origin: NodeId,
        peer: Option<&str>,
        records: Vec<FleetRecord>,
    ) {
        // Without certificates (plaintext mode) the sender is who SWIM says it is.
        let speaker = peer.map(str::to_owned).or_else(|| {
            self.members
                .borrow()
                .iter()
                .find(|m| m.id.node == origin)
                .map(|m| m.id.name.clone())
        });
        let records = self.reports_of(from, speaker.as_deref(), records);
        self.apply_records(origin, records).await;
    }

    /// `records` without reports of any POP but `pop` (refused, and said so).
    fn reports_of(
        &self,
        from: impl std::fmt::Display,
        pop: Option<&str>,
        mut records: Vec<FleetRecord>,
    ) -> Vec<FleetRecord> {
        let before = records.len();
        records.retain(|r| r.value.pop().is_none_or(|p| Some(p) == pop));
        if records.len() < before {
            self.protocol_refusal(
                from,
                &format!(
                    "{} report(s) of other POPs than {:?}: a POP speaks only for itself",
                    before - records.len(),
                    pop.unwrap_or("an unknown one")
                ),
            );
        }
        records
    }

    /// Merges records from a peer, reporting what was refused.
    async fn apply_records(&self, origin: NodeId, records: Vec<FleetRecord>) {
        if records.is_empty() {
            return;
        }
        let out = self
            .fleet
            .run(move |f| {
                let out = f.apply(records, wall_ms())?;
                if out
                    .applied
                    .iter()
                    .any(|r| matches!(&r.value, FleetValue::Deployment(d) if d.revoked))
                {
                    f.collect_garbage()?;
                }
                Ok::<_, crate::adapters::outbound::sqlite_fleet::FleetStoreError>(out)
            })
            .await;
        match out {
            Ok(out) => {
                if (!out.rejected.is_empty() || !out.ahead.is_empty())
                    && let Some(held) = self.reject_log.allow()
                {
                    tracing::warn!(
                        origin = %origin,
                        "cluster: refused policy records from node {origin}: invalid {:?}; clock ahead {:?} ({held} earlier reports held back)",
                        out.rejected,
                        out.ahead.iter().map(|(k, a)| format!("{k}: {a}")).collect::<Vec<_>>()
                    );
                }
            }
            Err(e) => tracing::error!("cluster: {e}"),
        }
    }

    /// Drops the reports of POPs this POP has not seen in the membership for a day (SWIM
    /// itself forgets a member a day after it went down).
    pub(super) async fn forget_gone_reports(&self) {
        const GONE: Duration = Duration::from_secs(24 * 3600);
        let now = tokio::time::Instant::now();
        let mut members: Vec<String> = self
            .members
            .borrow()
            .iter()
            .map(|m| m.id.name.clone())
            .collect();
        members.push(self.identity.name.clone());
        let gone: Vec<String> = {
            let mut seen = self.members_seen.lock().expect("members seen lock");
            for m in &members {
                seen.insert(m.clone(), now);
            }
            self.fleet
                .records()
                .records
                .iter()
                .filter_map(|r| match &r.value {
                    FleetValue::Pop(p) if !members.contains(&p.pop) => Some(p.pop.clone()),
                    FleetValue::Front(f) if !members.contains(&f.pop) => Some(f.pop.clone()),
                    _ => None,
                })
                .filter(|p| now.duration_since(*seen.entry(p.clone()).or_insert(now)) >= GONE)
                .collect()
        };
        if gone.is_empty() {
            return;
        }
        match self.fleet.run(move |f| f.forget_reports(&gone)).await {
            Ok(n) => tracing::info!("cluster: forgot the policy reports of {n} POP(s) gone a day"),
            Err(e) => tracing::error!("cluster: {e}"),
        }
    }

    /// Sends a deployment just written here to every member; returns it.
    fn publish(self: &Arc<Self>, record: FleetRecord) -> Deployment {
        self.push_records(vec![record.clone()]);
        match record.value {
            FleetValue::Deployment(d) => d,
            _ => unreachable!("only deployments are published this way"),
        }
    }

    /// Sends fresh local records to every member.
    fn push_records(self: &Arc<Self>, records: Vec<FleetRecord>) {
        let frame = wire::encode(&Message::FleetPush {
            from: self.identity.node,
            records,
        });
        for peer in self.alive_peers() {
            let (inner, frame) = (self.clone(), frame.clone());
            self.runtime.spawn(async move {
                let n = frame.len() as u64;
                match inner.transport.send(peer.transport, frame).await {
                    Ok(()) => {
                        inner
                            .stats
                            .bytes_out
                            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(e) => tracing::debug!("cluster: policy records to {}: {e}", peer.name),
                }
            });
        }
    }

    /// The answer to `FleetSync`: the deployments and this POP's report, unless the caller
    /// holds them already (the digests match).
    pub(super) fn records_reply(&self, digest: u64) -> Message {
        let (records, ours) = self.fleet.records().offered_by(&self.identity.name);
        match ours == digest {
            true => Message::FleetReply {
                same: true,
                records: Vec::new(),
            },
            false => Message::FleetReply {
                same: false,
                records,
            },
        }
    }

    /// The answer to `ComponentRequest`.
    pub(super) async fn chunk_reply(&self, hash: String, offset: u64) -> Message {
        let found = self
            .fleet
            .run(move |f| f.chunk(&hash, offset, wire::CHUNK))
            .await;
        match found {
            Ok(Some((total, bytes))) => Message::ComponentChunk { total, bytes },
            Ok(None) => Message::Refused {
                reason: "component not held here".into(),
            },
            Err(e) => Message::Refused { reason: e },
        }
    }

    /// Compares records with `peer`, then sends what it lacks or has older.
    pub(super) async fn records_round(&self, peer: &Peer) -> Result<(), String> {
        let ours = self.fleet.records();
        let (_, digest) = ours.offered_by(&peer.name);
        let request = Message::FleetSync {
            from: self.identity.node,
            digest,
        };
        let reply = self
            .transport
            .call(peer.transport, &peer.name, self.encode_out(&request))
            .await?;
        let theirs = match wire::decode(&reply).map_err(|e| e.to_string())? {
            Message::FleetReply { same: true, .. } => return Ok(()),
            Message::FleetReply { records, .. } => records,
            Message::Refused { reason } => return Err(format!("refused: {reason}")),
            other => {
                return Err(format!(
                    "unexpected {} answering a policy sync",
                    other.kind()
                ));
            }
        };
        // The answer is the POP the certificate names (`call` checks it), and its report and
        // front record are taken as it says, even older than those held, or none.
        let mut theirs = self.reports_of(&peer.name, Some(&peer.name), theirs);
        let mut own = |kind: fn(&FleetValue) -> bool| {
            theirs
                .iter()
                .position(|r| kind(&r.value))
                .map(|i| theirs.swap_remove(i))
        };
        let report = own(|v| matches!(v, FleetValue::Pop(_)));
        let front = own(|v| matches!(v, FleetValue::Front(_)));
        // Unless the record changed here while the round was out (the POP pushed a newer
        // one: its draining flag, say): this answer is then the older news.
        let keys = [format!("pop/{}", peer.name), format!("front/{}", peer.name)];
        let held = keys
            .clone()
            .map(|k| ours.records.iter().find(|r| r.value.key() == k).cloned());
        let taken = self
            .fleet
            .run(move |f| {
                for ((key, held), record) in keys.iter().zip(held).zip([report, front]) {
                    if f.records().find(|r| r.value.key() == *key) == held.as_ref() {
                        f.take_own(key, record)?;
                    }
                }
                Ok::<(), crate::adapters::outbound::sqlite_fleet::FleetStoreError>(())
            })
            .await;
        if let Err(e) = taken {
            tracing::error!("cluster: {e}");
        }
        let known: HashMap<String, FleetRecord> =
            theirs.iter().map(|r| (r.value.key(), r.clone())).collect();
        self.apply_records(peer.node, theirs).await;
        // Back: the deployments they lack or hold older (they ask for this POP's report in
        // their own rounds).
        let newer: Vec<FleetRecord> = ours
            .records
            .iter()
            .filter(|r| matches!(r.value, FleetValue::Deployment(_)))
            .filter(|r| r.supersedes(known.get(&r.value.key())))
            .cloned()
            .collect();
        if !newer.is_empty() {
            let push = Message::FleetPush {
                from: self.identity.node,
                records: newer,
            };
            self.transport
                .send(peer.transport, self.encode_out(&push))
                .await?;
        }
        Ok(())
    }

    /// The whole component from `peer`, chunk by chunk: `Corrupt` when what it offers
    /// cannot be the component (wrong size, over the cap), `Unavailable` when it does not
    /// hold it or cannot be reached.
    async fn fetch_from(
        &self,
        peer: SocketAddr,
        name: &str,
        d: &Deployment,
        max_bytes: u64,
    ) -> Result<Vec<u8>, FetchError> {
        use FetchError::{Corrupt, Unavailable};
        let mut bytes = Vec::new();
        loop {
            let request = Message::ComponentRequest {
                hash: d.hash.clone(),
                offset: bytes.len() as u64,
            };
            let reply = self
                .transport
                .call(peer, name, self.encode_out(&request))
                .await
                .map_err(Unavailable)?;
            match wire::decode(&reply).map_err(|e| Unavailable(e.to_string()))? {
                Message::ComponentChunk { total, bytes: b } => {
                    if total > max_bytes || total != d.size {
                        return Err(Corrupt(format!(
                            "offered {total} bytes; the deployment says {} (cap {max_bytes})",
                            d.size
                        )));
                    }
                    if b.is_empty() && (bytes.len() as u64) < total {
                        return Err(Corrupt("sent an empty chunk before the end".into()));
                    }
                    bytes.extend_from_slice(&b);
                    if bytes.len() as u64 >= total {
                        bytes.truncate(total as usize);
                        return Ok(bytes);
                    }
                }
                Message::Refused { reason } => return Err(Unavailable(reason)),
                other => {
                    return Err(Unavailable(format!(
                        "unexpected {} answering for a component",
                        other.kind()
                    )));
                }
            }
        }
    }
}

impl Inner {
    async fn deploy(
        self: Arc<Self>,
        request: DeployRequest,
        bytes: Vec<u8>,
        max_bytes: u64,
    ) -> Result<Deployment, String> {
        if bytes.len() as u64 > max_bytes {
            return Err(format!(
                "the component is {} bytes, over the {max_bytes}-byte cap (policy_max_bytes)",
                bytes.len()
            ));
        }
        let (hash, bytes) = hash_off_workers(bytes).await;
        let by = self.identity.name.clone();
        let record = self
            .fleet
            .run(move |f| {
                let kept = rollout::deployments(f.records())
                    .iter()
                    .filter(|d| d.role == request.role)
                    .count();
                if kept >= rollout::DEPLOYMENTS_MAX && request.targets != Default::default() {
                    return Err(format!(
                        "{kept} {} deployments are kept, the most a fleet holds: deploy to \
                             every POP ({} such deployments standing retire the older ones)",
                        request.role,
                        rollout::DEPLOYMENTS_KEPT
                    ));
                }
                f.put_component(&hash, &bytes)?;
                let v = f.next_version(wall_ms()).map_err(|e| e.to_string())?;
                let d = Deployment {
                    id: format!("{:x}-{}", v.hlc.0, v.node),
                    role: request.role,
                    hash,
                    name: request.name,
                    size: bytes.len() as u64,
                    targets: request.targets,
                    created: v,
                    by,
                    revoked: false,
                };
                f.write(v, FleetValue::Deployment(d))
                    .map_err(|e| e.to_string())
            })
            .await?;
        Ok(self.publish(record))
    }

    async fn revoke_latest(self: Arc<Self>, role: Role) -> Result<Deployment, String> {
        let snapshot = self.fleet.records();
        let deployments = rollout::deployments(snapshot.records.iter());
        let mut latest = rollout::latest(&deployments, role)
            .cloned()
            .ok_or_else(|| format!("no {role} deployment to roll back"))?;
        latest.revoked = true;
        let record = self
            .fleet
            .run(move |f| {
                let v = f.next_version(wall_ms()).map_err(|e| e.to_string())?;
                let r = f
                    .write(v, FleetValue::Deployment(latest))
                    .map_err(|e| e.to_string())?;
                f.collect_garbage().map_err(|e| e.to_string())?;
                Ok::<_, String>(r)
            })
            .await?;
        Ok(self.publish(record))
    }

    async fn component(
        self: Arc<Self>,
        d: Deployment,
        max_bytes: u64,
    ) -> Result<Vec<u8>, FetchError> {
        let d = &d;
        if d.size > max_bytes {
            return Err(FetchError::Corrupt(format!(
                "the component is {} bytes, over this POP's {max_bytes}-byte cap (policy_max_bytes)",
                d.size
            )));
        }
        let hash = d.hash.clone();
        match self.fleet.run(move |f| f.component(&hash)).await {
            Ok(Some(bytes)) => return Ok(bytes),
            Ok(None) => {}
            // A damaged copy here is replaced by a good one from a peer.
            Err(e) => tracing::warn!(
                "cluster: the stored copy of {}: {e}; fetching it again",
                d.hash
            ),
        }
        // The deploying POP first: it certainly has it.
        let mut peers = self.alive_peers();
        fastrand::shuffle(&mut peers);
        peers.sort_by_key(|p| p.node != d.created.node);
        let mut tried = Vec::new();
        let mut corrupt = None;
        for peer in peers {
            let fetched = match self
                .fetch_from(peer.transport, &peer.name, d, max_bytes)
                .await
            {
                Ok(bytes) => Ok(hash_off_workers(bytes).await),
                Err(e) => Err(e),
            };
            match fetched {
                Ok((hash, bytes)) if hash == d.hash => {
                    let (hash, keep) = (d.hash.clone(), bytes.clone());
                    let kept = self.fleet.run(move |f| f.put_component(&hash, &keep)).await;
                    if let Err(e) = kept {
                        tracing::warn!("cluster: keeping component {}: {e}", d.hash);
                    }
                    return Ok(bytes);
                }
                Ok((hash, _)) => {
                    corrupt = Some(format!(
                        "the copy from {} does not match the deployment's hash: expected {}, got {hash}",
                        peer.name, d.hash,
                    ));
                }
                Err(FetchError::Corrupt(e)) => {
                    corrupt = Some(format!(
                        "the copy from {} does not match the deployment: {e}",
                        peer.name
                    ));
                }
                Err(FetchError::Unavailable(e)) => tried.push(format!("{}: {e}", peer.name)),
            }
        }
        Err(match corrupt {
            Some(c) => FetchError::Corrupt(c),
            None if tried.is_empty() => {
                FetchError::Unavailable("no other POP is reachable to fetch it from".into())
            }
            None => {
                FetchError::Unavailable(format!("no reachable POP holds it ({})", tried.join("; ")))
            }
        })
    }

    /// Removes this POP's own record at `key` (a front record it no longer gives): peers
    /// drop theirs at their next round with it.
    pub(super) async fn withdraw_own(self: Arc<Self>, key: String) -> Result<(), String> {
        let held = self
            .fleet
            .records()
            .records
            .iter()
            .any(|r| r.value.key() == key);
        if !held {
            return Ok(());
        }
        self.fleet
            .run(move |f| f.take_own(&key, None))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Publishes one of this POP's own records (its report, its front), unless unchanged.
    pub(super) async fn publish_own(self: Arc<Self>, value: FleetValue) -> Result<(), String> {
        if self
            .fleet
            .records()
            .records
            .iter()
            .any(|r| r.value == value)
        {
            return Ok(());
        }
        let record = self.fleet.write(value).await?;
        self.push_records(vec![record]);
        Ok(())
    }

    /// Runs `work` on the cluster's runtime (its connections and their tasks live there),
    /// whichever runtime asks.
    pub(super) async fn on_cluster<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Option<T> {
        self.runtime.spawn(work).await.ok()
    }
}

impl PolicyFleet for Cluster {
    fn pop(&self) -> String {
        self.inner.identity.name.clone()
    }

    fn records(&self) -> Vec<FleetRecord> {
        self.inner.fleet.records().records.clone()
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.inner.fleet.changes.subscribe()
    }

    fn deploy(
        &self,
        request: DeployRequest,
        bytes: Vec<u8>,
        max_bytes: u64,
    ) -> BoxFuture<'_, Result<Deployment, String>> {
        let work = self.inner.clone().deploy(request, bytes, max_bytes);
        Box::pin(async move {
            self.inner
                .on_cluster(work)
                .await
                .unwrap_or_else(|| Err(STOPPING.into()))
        })
    }

    fn revoke_latest(&self, role: Role) -> BoxFuture<'_, Result<Deployment, String>> {
        let work = self.inner.clone().revoke_latest(role);
        Box::pin(async move {
            self.inner
                .on_cluster(work)
                .await
                .unwrap_or_else(|| Err(STOPPING.into()))
        })
    }

    fn component<'a>(
        &'a self,
        d: &'a Deployment,
        max_bytes: u64,
    ) -> BoxFuture<'a, Result<Vec<u8>, FetchError>> {
        let work = self.inner.clone().component(d.clone(), max_bytes);
        Box::pin(async move {
            self.inner
                .on_cluster(work)
                .await
                .unwrap_or_else(|| Err(FetchError::Unavailable(STOPPING.into())))
        })
    }

    fn report(&self, report: PopPolicies) -> BoxFuture<'_, Result<(), String>> {
        let work = self.inner.clone().publish_own(FleetValue::Pop(report));
        Box::pin(async move {
            self.inner
                .on_cluster(work)
                .await
                .unwrap_or_else(|| Err(STOPPING.into()))
        })
    }
}

const STOPPING: &str = "the cluster is stopping";

/// SHA-256 of a component (megabytes) on a blocking thread, not a proxy worker.
async fn hash_off_workers(bytes: Vec<u8>) -> (String, Vec<u8>) {
    super::store::blocking(move || (sha256_hex(&bytes), bytes)).await
}
