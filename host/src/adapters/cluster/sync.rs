//! Rows between POPs: fresh local writes pushed to every member at once, and anti-entropy
//! rounds (digests, then the rows of the buckets that differ) that repair whatever a push
//! missed: a lost packet, a partition, a restart, a wiped database.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;

use super::membership::Input;
use super::transport::{BoxFuture, Inbox};
use super::wire::{self, Message};
use super::{Inner, Peer};
use crate::adapters::outbound::sqlite_replica::wall_ms;
use crate::domain::replication::{BUCKETS, NodeId, VersionedRow};

impl Inbox for Inner {
    fn datagram(&self, data: Bytes) {
        // A full queue means SWIM is far behind; dropping a packet is what UDP would do.
        let _ = self.swim.try_send(Input::Datagram(data));
    }

    fn frame(&self, from: SocketAddr, frame: Vec<u8>) -> BoxFuture<Option<Vec<u8>>> {
        let Some(inner) = self.me.upgrade() else {
            return Box::pin(async { None });
        };
        Box::pin(async move { inner.receive(from, frame).await })
    }
}

impl Inner {
    async fn receive(self: Arc<Self>, from: SocketAddr, frame: Vec<u8>) -> Option<Vec<u8>> {
        self.stats
            .bytes_in
            .fetch_add(frame.len() as u64, Ordering::Relaxed);
        let msg = match wire::decode(&frame) {
            Ok(m) => m,
            Err(e) => {
                self.protocol_refusal(from, &e.to_string());
                return None;
            }
        };
        match msg {
            Message::Push {
                schema,
                from: node,
                rows,
            }
            | Message::SyncPush {
                schema,
                from: node,
                rows,
            } => {
                if let Some(reason) = wire::schema_mismatch(schema) {
                    self.protocol_refusal(from, &reason);
                    return None;
                }
                self.stats
                    .changes_received
                    .fetch_add(rows.len() as u64, Ordering::Relaxed);
                self.apply(node, rows).await;
                None
            }
            Message::SyncRequest {
                schema,
                digest,
                last_sync_ms,
                after,
                ..
            } => {
                let reply = match wire::schema_mismatch(schema) {
                    Some(reason) => {
                        self.protocol_refusal(from, &reason);
                        Message::Refused { reason }
                    }
                    None => {
                        self.store
                            .run(move |r| {
                                let gc_watermark = r.gc_watermark();
                                let reset = last_sync_ms < gc_watermark.millis();
                                let buckets = match reset {
                                    true => (0..BUCKETS).collect(),
                                    false => r.digest().differing(&digest),
                                };
                                let (rows, next) =
                                    r.page(&buckets, after.as_deref(), wire::PAGE_ROWS);
                                Message::SyncReply {
                                    schema: wire::SCHEMA,
                                    rows,
                                    buckets: buckets.into_iter().map(|b| b as u16).collect(),
                                    gc_watermark,
                                    reset,
                                    next,
                                }
                            })
                            .await
                    }
                };
                let reply = wire::encode(&reply);
                self.stats
                    .bytes_out
                    .fetch_add(reply.len() as u64, Ordering::Relaxed);
                Some(reply)
            }
            Message::FleetPush {
                from: node,
                records,
            } => {
                self.apply_records(node, records).await;
                None
            }
            Message::FleetSync { digest, .. } => Some(self.encode_out(&self.records_reply(digest))),
            Message::ComponentRequest { hash, offset } => {
                let reply = self.chunk_reply(hash, offset).await;
                Some(self.encode_out(&reply))
            }
            other => {
                self.protocol_refusal(from, &format!("unexpected {other:?}"));
                None
            }
        }
    }

    pub(super) fn encode_out(&self, m: &Message) -> Vec<u8> {
        let frame = wire::encode(m);
        self.stats
            .bytes_out
            .fetch_add(frame.len() as u64, Ordering::Relaxed);
        frame
    }
}

/// One anti-entropy round with `peer`: our digest out, their rows of the differing buckets
/// in, then ours that they lack or have older back out.
pub async fn round(inner: &Arc<Inner>, peer: &Peer) -> Result<(), String> {
    let started = wall_ms();
    let (from, digest, last_sync_ms) = inner
        .store
        .run(|r| (r.node(), r.digest(), r.last_sync_ms()))
        .await;
    // Their rows of the buckets that differ, page by page.
    let (mut theirs, mut after) = (Vec::new(), None);
    let (buckets, watermark, reset) = loop {
        let request = Message::SyncRequest {
            schema: wire::SCHEMA,
            from,
            digest: digest.clone(),
            last_sync_ms,
            after: after.take(),
        };
        let reply = inner
            .transport
            .call(peer.transport, inner.encode_out(&request))
            .await?;
        inner
            .stats
            .bytes_in
            .fetch_add(reply.len() as u64, Ordering::Relaxed);
        match wire::decode(&reply).map_err(|e| e.to_string())? {
            Message::SyncReply {
                schema,
                buckets,
                rows,
                gc_watermark,
                reset,
                next,
            } => {
                if let Some(reason) = wire::schema_mismatch(schema) {
                    return Err(reason);
                }
                theirs.extend(rows);
                match next {
                    Some(id) => after = Some(id),
                    None => break (buckets, gc_watermark, reset),
                }
            }
            Message::Refused { reason } => return Err(format!("refused: {reason}")),
            other => return Err(format!("unexpected {other:?} answering a sync")),
        }
    };
    let their_versions: HashMap<String, VersionedRow> = theirs
        .iter()
        .map(|r| (r.row.id.clone(), r.clone()))
        .collect();
    if reset {
        let ids: HashSet<String> = their_versions.keys().cloned().collect();
        let dropped = inner
            .store
            .run(move |r| r.reset_to(&ids, watermark))
            .await
            .map_err(|e| e.to_string())?;
        tracing::warn!(
            "cluster: this POP was away longer than the tombstone window; resynchronised fully \
             from {}, dropping {} row(s) deleted meanwhile: {dropped:?}",
            peer.name,
            dropped.len()
        );
    }
    inner.apply(peer.node, theirs).await;
    // Of the differing buckets, what we hold newer than they do (or they lack).
    let (node, ours) = inner
        .store
        .run(move |r| {
            let buckets: Vec<usize> = buckets.into_iter().map(usize::from).collect();
            let ours = r
                .in_buckets(&buckets)
                .into_iter()
                .filter(|mine| mine.supersedes(their_versions.get(&mine.row.id)))
                .collect::<Vec<_>>();
            (r.node(), ours)
        })
        .await;
    for page in ours.chunks(wire::PAGE_ROWS) {
        let push = Message::SyncPush {
            schema: wire::SCHEMA,
            from: node,
            rows: page.to_vec(),
        };
        inner
            .transport
            .send(peer.transport, inner.encode_out(&push))
            .await?;
    }
    inner.stats.sync_rounds.fetch_add(1, Ordering::Relaxed);
    inner.synced_with(peer.node);
    inner
        .store
        .run(move |r| r.synced(started))
        .await
        .map_err(|e| e.to_string())
}

/// Sends fresh local rows to every member, each on its own stream, without waiting.
pub fn push(inner: &Arc<Inner>, node: NodeId, rows: Vec<VersionedRow>, peers: Vec<Peer>) {
    let frames: Arc<Vec<Vec<u8>>> = Arc::new(
        rows.chunks(wire::PAGE_ROWS)
            .map(|page| {
                wire::encode(&Message::Push {
                    schema: wire::SCHEMA,
                    from: node,
                    rows: page.to_vec(),
                })
            })
            .collect(),
    );
    for peer in peers {
        let (inner, frames) = (inner.clone(), frames.clone());
        tokio::spawn(async move {
            for frame in frames.iter() {
                let n = frame.len() as u64;
                match inner.transport.send(peer.transport, frame.clone()).await {
                    Ok(()) => {
                        inner.stats.bytes_out.fetch_add(n, Ordering::Relaxed);
                    }
                    // Anti-entropy brings the rest over later.
                    Err(e) => {
                        tracing::debug!("cluster: push to {}: {e}", peer.name);
                        return;
                    }
                }
            }
        });
    }
}
