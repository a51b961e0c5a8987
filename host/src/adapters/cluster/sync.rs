//! Rows between POPs: fresh local writes pushed to every member at once, and anti-entropy
//! rounds that repair whatever a push missed (a lost packet, a partition, a restart, a
//! wiped database). A round compares the writes each side has seen, never clocks: the
//! caller takes every row whose write it has not seen, marks seen what the answerer saw
//! superseded, drops its live rows the answerer saw superseded, then pushes back what the
//! answerer has not seen.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;

use super::membership::Input;
use super::transport::{BoxFuture, Inbox};
use super::wire::{self, Message};
use super::{Inner, Peer};
use crate::domain::replication::{BUCKETS, Head, NodeId, Seen, VersionedRow};

/// Most pages one round takes in; a table larger than this many pages of news is taken
/// over several rounds (each page is applied as it arrives, so memory stays one page).
const MAX_PAGES: usize = 64;

impl Inbox for Inner {
    fn datagram(&self, from: SocketAddr, data: Bytes, peer: Option<&str>) {
        // A SWIM packet names its sender, which must be the POP its certificate names,
        // at the address it sends from: otherwise one member could probe, answer and
        // refute for another, or claim its address (SWIM knows members by address).
        if let Some(peer) = peer {
            let src = foca::Codec::<super::membership::Identity>::decode_header(
                &mut foca::PostcardCodec,
                &data[..],
            )
            .map(|h| h.src);
            let wrong = match &src {
                Ok(src) if *src.name != *peer => Some(format!(
                    "a SWIM packet signed {:?} from the certificate of {peer:?}",
                    src.name
                )),
                Ok(src)
                    if src.gossip.ip().to_canonical() != from.ip().to_canonical()
                        || src.gossip.port() != from.port() =>
                {
                    Some(format!(
                        "a SWIM packet from {from} claiming the address {}",
                        src.gossip
                    ))
                }
                Ok(src) => self.impersonates(src.node, peer),
                Err(_) => Some(format!("an unreadable {}-byte SWIM packet", data.len())),
            };
            if let Some(reason) = wrong {
                return self.protocol_refusal(peer, &reason);
            }
        }
        // A full queue means SWIM is far behind; dropping a packet is what UDP would do.
        let _ = self.swim.try_send(Input::Datagram(data));
    }

    fn frame(
        &self,
        from: SocketAddr,
        peer: Option<Arc<str>>,
        frame: Vec<u8>,
    ) -> BoxFuture<Option<Vec<u8>>> {
        let Some(inner) = self.me.upgrade() else {
            return Box::pin(async { None });
        };
        Box::pin(async move { inner.receive(from, peer, frame).await })
    }
}

impl Inner {
    async fn receive(
        self: Arc<Self>,
        from: SocketAddr,
        peer: Option<Arc<str>>,
        frame: Vec<u8>,
    ) -> Option<Vec<u8>> {
        self.stats
            .bytes_in
            .fetch_add(frame.len() as u64, Ordering::Relaxed);
        let size = frame.len();
        // Decoding a large frame is real work: off the runtime's threads.
        let decoded = super::store::blocking(move || wire::decode(&frame)).await;
        let msg = match decoded {
            Ok(m) => m,
            Err(e) => {
                self.protocol_refusal(from, &format!("{size}-byte frame: {e}"));
                return None;
            }
        };
        if let (Some(node), Some(peer)) = (msg.sender(), peer.as_deref())
            && let Some(reason) = self.impersonates(node, peer)
        {
            self.protocol_refusal(from, &reason);
            return Some(self.encode_out(&Message::Refused { reason }));
        }
        match msg {
            Message::Push {
                schema,
                from: node,
                rows,
            } => {
                if let Some(reason) = wire::schema_mismatch(schema) {
                    self.protocol_refusal(from, &reason);
                    return None;
                }
                self.received(node, rows, Seen::default()).await;
                None
            }
            Message::SyncPush {
                schema,
                from: node,
                rows,
                cleared,
            } => {
                let checked = match wire::schema_mismatch(schema) {
                    Some(reason) => Err(reason),
                    None => cleared.checked(),
                };
                match checked {
                    Ok(cleared) => self.received(node, rows, cleared).await,
                    Err(reason) => self.protocol_refusal(from, &reason),
                }
                None
            }
            Message::SyncRequest {
                schema,
                from: node,
                digest,
                seen,
                wall,
                after,
            } => {
                self.peer_clock(node, wall);
                let valid = match wire::schema_mismatch(schema) {
                    Some(reason) => Err(reason),
                    None if digest.0.len() != BUCKETS => Err(format!(
                        "digest of {} buckets, not {BUCKETS}",
                        digest.0.len()
                    )),
                    None => seen.checked(),
                };
                let reply = match valid {
                    Err(reason) => {
                        self.protocol_refusal(from, &reason);
                        Message::Refused { reason }
                    }
                    Ok(seen) => {
                        let (reply, same) = self
                            .store
                            .run(move |r| {
                                // A round's first page carries the peer's whole digest.
                                let same = after.is_none().then(|| r.digest().0 == digest.0);
                                let head = after.is_none().then(|| r.head_for(&seen, &digest));
                                let (rows, next) =
                                    r.news_for(&seen, after.as_deref(), wire::PAGE_ROWS);
                                let reply = Message::SyncReply {
                                    schema: wire::SCHEMA,
                                    head,
                                    wall: r.now(),
                                    rows,
                                    next,
                                };
                                (reply, same)
                            })
                            .await;
                        if let Some(same) = same {
                            let mut agreed = self.same_table.lock().expect("digests lock");
                            agreed.insert(node, same);
                        }
                        reply
                    }
                };
                Some(self.encode_out(&reply))
            }
            Message::FleetPush {
                from: node,
                records,
            } => {
                self.pushed_records(from, node, peer.as_deref(), records)
                    .await;
                None
            }
            Message::FleetSync { digest, .. } => Some(self.encode_out(&self.records_reply(digest))),
            Message::ComponentRequest { hash, offset } => {
                let reply = self.chunk_reply(hash, offset).await;
                Some(self.encode_out(&reply))
            }
            other => {
                self.protocol_refusal(from, &format!("unexpected {} ({size} bytes)", other.kind()));
                None
            }
        }
    }

    /// Rows a peer sent on its own (a push): applied, a failure logged (the peer's next
    /// round, or ours, brings them again).
    async fn received(self: &Arc<Self>, origin: NodeId, rows: Vec<VersionedRow>, cleared: Seen) {
        self.stats
            .changes_received
            .fetch_add(rows.len() as u64, Ordering::Relaxed);
        if let Err(e) = self.apply(origin, rows, cleared).await {
            tracing::error!("cluster: {e}");
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

/// One anti-entropy round with `peer`: the rows we have not seen in, page by page, then
/// what they saw superseded out of our table, then what they have not seen back out.
pub async fn round(inner: &Arc<Inner>, peer: &Peer) -> Result<(), String> {
    let (from, digest, seen, wall) = inner
        .store
        .run(|r| (r.node(), r.digest(), r.seen().clone(), r.now()))
        .await;
    let mut head: Option<Head> = None;
    let mut after: Option<String> = None;
    for page in 0..MAX_PAGES {
        let request = Message::SyncRequest {
            schema: wire::SCHEMA,
            from,
            digest: digest.clone(),
            seen: seen.clone(),
            wall,
            after: after.clone(),
        };
        let reply = inner
            .transport
            .call(peer.transport, &peer.name, inner.encode_out(&request))
            .await?;
        inner
            .stats
            .bytes_in
            .fetch_add(reply.len() as u64, Ordering::Relaxed);
        let size = reply.len();
        let reply = super::store::blocking(move || wire::decode(&reply))
            .await
            .map_err(|e| e.to_string())?;
        let (rows, next) = match reply {
            Message::SyncReply {
                schema,
                head: h,
                wall,
                rows,
                next,
            } => {
                if let Some(reason) = wire::schema_mismatch(schema) {
                    return Err(reason);
                }
                inner.peer_clock(peer.node, wall);
                match (page, h) {
                    (0, Some(h)) => head = Some(h.checked()?),
                    (0, None) => return Err("a sync answer without its head".into()),
                    _ => {}
                }
                (rows, next)
            }
            Message::Refused { reason } => return Err(format!("refused: {reason}")),
            other => {
                return Err(format!(
                    "unexpected {} ({size} bytes) answering a sync",
                    other.kind()
                ));
            }
        };
        // Marked seen with the first page; the head keeps what the rest of the round uses.
        let cleared = head
            .as_mut()
            .map(|h| std::mem::take(&mut h.cleared))
            .unwrap_or_default();
        inner
            .stats
            .changes_received
            .fetch_add(rows.len() as u64, Ordering::Relaxed);
        inner.apply(peer.node, rows, cleared).await?;
        match next {
            // A cursor that does not move on would have us ask for ever.
            Some(id) if after.as_ref().is_some_and(|a| id <= *a) => {
                return Err(format!(
                    "{} answered a page that did not advance",
                    peer.name
                ));
            }
            Some(id) => after = Some(id),
            None => break,
        }
    }
    let head = Arc::new(head.ok_or("a sync answer without its head")?);
    inner.drop_superseded(peer, head.clone()).await?;
    // Ours they have not seen, and what we saw superseded that they have not seen.
    let (node, ours, cleared) = inner
        .store
        .run(move |r| {
            let (ours, _) = r.news_for(&head.seen, None, usize::MAX);
            (r.node(), ours, r.cleared_for(&head.seen))
        })
        .await;
    let mut cleared = Some(cleared).filter(|c| !c.is_empty());
    let mut pages = ours.chunks(wire::PAGE_ROWS).map(<[_]>::to_vec).peekable();
    while pages.peek().is_some() || cleared.is_some() {
        let push = Message::SyncPush {
            schema: wire::SCHEMA,
            from: node,
            rows: pages.next().unwrap_or_default(),
            cleared: cleared.take().unwrap_or_default(),
        };
        inner
            .transport
            .send(peer.transport, inner.encode_out(&push))
            .await?;
    }
    inner.stats.sync_rounds.fetch_add(1, Ordering::Relaxed);
    inner.synced_with(peer.node);
    Ok(())
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
