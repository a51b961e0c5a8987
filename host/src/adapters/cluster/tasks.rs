//! The cluster's background work: stamping and pushing local writes, anti-entropy rounds
//! (and announcements while alone), and purging tombstones. Each task ends with `stop`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::membership::Input;
use super::{Inner, Peer, resolve, sync};
use crate::domain::replication::NodeId;
use crate::log_throttle::LogThrottle;

/// How often local writes are looked for (`PRAGMA data_version`, one cheap read) without
/// change notifications, and with them (a backstop for a missed one).
const LOCAL_POLL: Duration = Duration::from_millis(50);
const LOCAL_POLL_WATCHED: Duration = Duration::from_secs(1);

/// Stamps and pushes local writes as soon as they are committed.
pub(super) async fn watch_local_writes(inner: Arc<Inner>, stop: CancellationToken) {
    let unreplicable = LogThrottle::new(Duration::from_secs(60));
    // Woken by the file's change notifications, with a slow poll behind them; a fast poll
    // where the system gives no notifications (or no more inotify instances).
    let written = Arc::new(tokio::sync::Notify::new());
    let path = inner.store.run(|r| r.path().to_owned()).await;
    let watch = crate::adapters::inbound::file_watch::watch(&path, written.clone());
    let poll = match &watch {
        Ok(_) => LOCAL_POLL_WATCHED,
        Err(e) => {
            tracing::debug!(
                "cluster: no change notifications for {} ({e}); polling",
                path.display()
            );
            LOCAL_POLL
        }
    };
    // A notification comes with the write of the WAL frames, which can be just before the
    // commit is visible (the WAL index is memory-mapped: its update makes no event), so a
    // few quick re-checks follow each one.
    let mut rechecks: usize = 0;
    let mut next = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {}
            _ = written.notified() => rechecks = 3,
        }
        next = tokio::time::Instant::now()
            + match rechecks {
                0 => poll,
                n => {
                    rechecks -= 1;
                    // 2, then 10, then 40 ms after the notification.
                    Duration::from_millis([40, 8, 2][n - 1])
                }
            };
        let result = inner
            .store
            .run(|r| match r.changed() {
                Ok(true) => r.stamp_local(),
                Ok(false) => Ok(Default::default()),
                Err(e) => Err(e),
            })
            .await;
        match result {
            Ok((rows, bad)) => {
                if !bad.is_empty()
                    && let Some(held) = unreplicable.allow()
                {
                    tracing::warn!(
                        "cluster: local rows not replicated until fixed (the proxy skips them too): \
                         {bad:?} ({held} earlier reports held back)"
                    );
                }
                if !rows.is_empty() {
                    tracing::debug!("cluster: {} local change(s) stamped, pushing", rows.len());
                    inner.broadcast(rows);
                }
            }
            Err(e) => tracing::error!("cluster: {e}"),
        }
    }
}

/// Anti-entropy: a round with one random member every interval (with jitter), at once
/// with a member that comes up, and announcements to the bootstrap and remembered peers
/// while alone.
pub(super) async fn anti_entropy(
    inner: Arc<Inner>,
    seeds: Vec<String>,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut members = inner.members.clone();
    let mut up: Vec<NodeId> = Vec::new();
    let mut next = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {
                let jitter = interval.mul_f64(0.5 + fastrand::f64());
                next = tokio::time::Instant::now() + jitter;
                let peers = inner.alive_peers();
                if peers.is_empty() {
                    for addr in resolve(&seeds).await {
                        if addr != inner.identity.gossip {
                            let _ = inner.swim.send(Input::Announce(addr)).await;
                        }
                    }
                } else {
                    let peer = &peers[fastrand::usize(..peers.len())];
                    run_round(&inner, peer).await;
                }
            }
            changed = members.changed() => {
                if changed.is_err() {
                    return;
                }
                let peers = inner.alive_peers();
                let now_up: Vec<NodeId> = peers.iter().map(|p| p.node).collect();
                // Down members too (SWIM keeps them a day): a POP restarted during a
                // partition must still know where the others were.
                let mut remembered: Vec<String> = inner.members.borrow().iter()
                    .map(|m| m.id.gossip.to_string()).collect();
                remembered.sort();
                remembered.dedup();
                if !remembered.is_empty() {
                    let _ = inner.store.run(move |r| r.remember_peers(&remembered)).await;
                }
                for peer in peers.iter().filter(|p| !up.contains(&p.node)) {
                    run_round(&inner, peer).await;
                }
                up = now_up;
            }
        }
    }
}

/// Purges tombstones held longer than the window, checked a few times per window (at
/// most every `every`), and the policy reports of POPs long gone.
pub(super) async fn purge_tombstones(
    inner: Arc<Inner>,
    ttl: Duration,
    every: Duration,
    stop: CancellationToken,
) {
    let every = (ttl / 4).clamp(Duration::from_millis(50), every);
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match inner.store.run(move |r| r.purge_tombstones(ttl)).await {
            Ok((n, stamped)) => {
                if n > 0 {
                    tracing::info!("cluster: purged {n} tombstone(s) held longer than {ttl:?}");
                }
                if !stamped.is_empty() {
                    inner.broadcast(stamped);
                }
            }
            Err(e) => tracing::error!("cluster: purging tombstones: {e}"),
        }
        inner.forget_gone_reports().await;
    }
}

/// Longest a whole round may take: a peer that answers slowly page after page is dropped
/// for this round, and the next round may pick another.
const ROUND_TIMEOUT: Duration = Duration::from_secs(120);

async fn run_round(inner: &Arc<Inner>, peer: &Peer) {
    let round = async {
        sync::round(inner, peer).await?;
        inner.records_round(peer).await
    };
    let records = tokio::time::timeout(ROUND_TIMEOUT, round)
        .await
        .unwrap_or_else(|_| Err(format!("round not done within {ROUND_TIMEOUT:?}")));
    if let Err(e) = records {
        inner.stats.sync_failures.fetch_add(1, Ordering::Relaxed);
        tracing::debug!("cluster: sync with {}: {e}", peer.name);
    }
}
