//! Rows between POPs: fresh local writes pushed to every member at once, and anti-entropy
//! rounds (digests, then the rows of the buckets that differ) that repair whatever a push
//! missed: a lost packet, a partition, a restart, a wiped database.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::wire::{self, Message};
use super::{Inner, Peer};
use crate::adapters::outbound::sqlite_replica::wall_ms;
use crate::domain::replication::{BUCKETS, NodeId, VersionedRow};

/// Serves the streams a peer opens on `conn` until it closes.
pub fn serve(inner: Arc<Inner>, conn: quinn::Connection) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                uni = conn.accept_uni() => match uni {
                    Ok(mut recv) => {
                        let inner = inner.clone();
                        let from = conn.remote_address();
                        tokio::spawn(async move {
                            match wire::read(&mut recv).await {
                                Ok((Message::Push { schema, from: node, rows }, bytes)) => {
                                    inner.stats.bytes_in.fetch_add(bytes as u64, Ordering::Relaxed);
                                    if let Some(reason) = wire::schema_mismatch(schema) {
                                        inner.protocol_refusal(from, &reason);
                                        return;
                                    }
                                    inner.stats.changes_received.fetch_add(rows.len() as u64, Ordering::Relaxed);
                                    inner.apply(node, rows).await;
                                }
                                Ok((other, _)) => inner.protocol_refusal(from, &format!("unexpected {other:?} on a push stream")),
                                Err(e) => inner.protocol_refusal(from, &e.to_string()),
                            }
                        });
                    }
                    Err(_) => break,
                },
                bi = conn.accept_bi() => match bi {
                    Ok((send, recv)) => {
                        let inner = inner.clone();
                        let from = conn.remote_address();
                        tokio::spawn(async move {
                            if let Err(e) = answer_sync(&inner, send, recv).await {
                                inner.protocol_refusal(from, &e);
                            }
                        });
                    }
                    Err(_) => break,
                },
            }
        }
    });
}

async fn answer_sync(
    inner: &Arc<Inner>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<(), String> {
    let (msg, n) = wire::read(&mut recv).await.map_err(|e| e.to_string())?;
    inner.stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
    let Message::SyncRequest {
        schema,
        from,
        digest,
        last_sync_ms,
    } = msg
    else {
        return Err(format!("unexpected {msg:?} opening a sync"));
    };
    if let Some(reason) = wire::schema_mismatch(schema) {
        let _ = wire::write(
            &mut send,
            &Message::Refused {
                reason: reason.clone(),
            },
        )
        .await;
        let _ = send.finish();
        return Err(reason);
    }
    let reply = inner
        .store
        .run(move |r| {
            let gc_watermark = r.gc_watermark();
            let reset = last_sync_ms < gc_watermark.millis();
            let buckets = match reset {
                true => (0..BUCKETS).collect(),
                false => r.digest().differing(&digest),
            };
            Message::SyncReply {
                schema: wire::SCHEMA,
                rows: r.in_buckets(&buckets),
                buckets: buckets.into_iter().map(|b| b as u16).collect(),
                gc_watermark,
                reset,
            }
        })
        .await;
    let n = wire::write(&mut send, &reply)
        .await
        .map_err(|e| e.to_string())?;
    inner.stats.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
    let _ = send.finish();
    let (msg, n) = wire::read(&mut recv).await.map_err(|e| e.to_string())?;
    inner.stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
    match msg {
        Message::SyncPush { rows } => {
            inner.apply(from, rows).await;
            Ok(())
        }
        other => Err(format!("unexpected {other:?} closing a sync")),
    }
}

/// One anti-entropy round with `peer`: our digest out, their rows of the differing buckets
/// in, then ours that they lack or have older back out.
pub async fn round(inner: &Arc<Inner>, peer: &Peer) -> Result<(), String> {
    let conn = inner.transport_conn(peer.transport).await?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let started = wall_ms();
    let request = inner
        .store
        .run(|r| Message::SyncRequest {
            schema: wire::SCHEMA,
            from: r.node(),
            digest: r.digest(),
            last_sync_ms: r.last_sync_ms(),
        })
        .await;
    let n = wire::write(&mut send, &request)
        .await
        .map_err(|e| e.to_string())?;
    inner.stats.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
    let (msg, n) = wire::read(&mut recv).await.map_err(|e| e.to_string())?;
    inner.stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
    let (buckets, theirs, watermark, reset) = match msg {
        Message::SyncReply {
            schema,
            buckets,
            rows,
            gc_watermark,
            reset,
        } => match wire::schema_mismatch(schema) {
            Some(reason) => return Err(reason),
            None => (buckets, rows, gc_watermark, reset),
        },
        Message::Refused { reason } => return Err(format!("refused: {reason}")),
        other => return Err(format!("unexpected {other:?} answering a sync")),
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
    let ours = inner
        .store
        .run(move |r| {
            let buckets: Vec<usize> = buckets.into_iter().map(usize::from).collect();
            r.in_buckets(&buckets)
                .into_iter()
                .filter(|mine| mine.supersedes(their_versions.get(&mine.row.id)))
                .collect::<Vec<_>>()
        })
        .await;
    let n = wire::write(&mut send, &Message::SyncPush { rows: ours })
        .await
        .map_err(|e| e.to_string())?;
    inner.stats.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
    send.finish().map_err(|e| e.to_string())?;
    let _ = send.stopped().await;
    inner.stats.sync_rounds.fetch_add(1, Ordering::Relaxed);
    inner.synced_with(peer.node);
    inner
        .store
        .run(move |r| r.synced(started))
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Sends fresh local rows to every member, each on its own stream, without waiting.
pub fn push(inner: &Arc<Inner>, node: NodeId, rows: Vec<VersionedRow>, peers: Vec<Peer>) {
    let frame = Arc::new(wire::encode(&Message::Push {
        schema: wire::SCHEMA,
        from: node,
        rows,
    }));
    for peer in peers {
        let (inner, frame) = (inner.clone(), frame.clone());
        tokio::spawn(async move {
            let result = async {
                let conn = inner.transport_conn(peer.transport).await?;
                let mut send = conn.open_uni().await.map_err(|e| e.to_string())?;
                send.write_all(&frame).await.map_err(|e| e.to_string())?;
                send.finish().map_err(|e| e.to_string())
            }
            .await;
            match result {
                Ok(()) => {
                    inner
                        .stats
                        .bytes_out
                        .fetch_add(frame.len() as u64, Ordering::Relaxed);
                }
                // Anti-entropy brings it over later.
                Err(e) => tracing::debug!("cluster: push to {}: {e}", peer.name),
            }
        });
    }
}
