//! Everything POPs say to each other, in one place, versioned.
//!
//! - The TLS ALPN is `edgeproxy/<PROTOCOL>/<cluster>`: a peer of another protocol version
//!   or another cluster fails the handshake.
//! - SWIM: foca's packets as QUIC datagrams on the gossip endpoint, as they are.
//! - Rows: postcard frames. On QUIC, one frame per stream on the transport endpoint, a
//!   length first: `Push` and `SyncPush` one-way (uni stream), `SyncRequest` a call (bi
//!   stream) answered by `SyncReply` or `Refused`.
//!
//! - Policy records and components: `FleetPush` one-way, `FleetSync` and
//!   `ComponentRequest` calls. They were added after protocol 1 shipped, as new variants
//!   at the end, so a POP of an older build refuses them as undecodable and keeps
//!   replicating rows.
//!
//! Every row message carries the routing schema version: rows are never applied across
//! schemas (Corrosion's users met half-applied changes when schemas drifted).

use serde::{Deserialize, Serialize};

use crate::domain::replication::{Digest, Head, NodeId, Seen, VersionedRow};
use crate::domain::rollout::FleetRecord;

/// 2: rows carry their write's sequence number and rounds compare the writes seen.
/// 3: rows carry their owner; a records round offers the deployments and the answerer's
/// own report only; SWIM packets must name the sender's certificate and address.
pub const PROTOCOL: u32 = 3;
/// The `backends` columns as this build stores them; bump with any change to them.
pub const SCHEMA: u32 = 2;
/// Largest answer read to a call this POP made: a page of rows with the answerer's
/// bookkeeping, or a component chunk.
pub const MAX_FRAME: usize = 16 << 20;
/// Largest frame read on a stream a peer opened (a request or a push): a page of rows and
/// some bookkeeping fit many times over; more is refused before it is read.
pub const MAX_INBOUND: usize = 4 << 20;
/// Longest a frame may take to arrive or leave once its stream is open: a peer that stops
/// sending, or stops granting flow credit, loses the stream, not a task for ever.
pub const FRAME_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Rows per push or sync page (about 0.5 MB): tables of any size move in bounded frames.
pub const PAGE_ROWS: usize = 4_000;

pub fn alpn(cluster: &str) -> Vec<u8> {
    format!("edgeproxy/{PROTOCOL}/{cluster}").into_bytes()
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Message {
    /// Fresh local writes, sent once to every member.
    Push {
        schema: u32,
        from: NodeId,
        rows: Vec<VersionedRow>,
    },
    /// Opens an anti-entropy round, or asks for its next page: the caller's live digest
    /// and the writes it has seen.
    SyncRequest {
        schema: u32,
        from: NodeId,
        digest: Digest,
        seen: Seen,
        /// The caller's wall clock (unix ms) when it sent this.
        wall: u64,
        /// Rows are answered in pages, by id: the page after this id.
        after: Option<String>,
    },
    /// Rows the answerer holds whose writes the caller has not seen (tombstones too), one
    /// page of them; the first page opens with the answerer's bookkeeping (`Head`).
    SyncReply {
        schema: u32,
        head: Option<Head>,
        /// The answerer's wall clock (unix ms) when it answered.
        wall: u64,
        rows: Vec<VersionedRow>,
        /// More rows follow: ask again with `after` = this.
        next: Option<String>,
    },
    /// The caller's rows whose writes the answerer has not seen, and the writes the caller
    /// saw superseded that the answerer has not seen (one-way).
    SyncPush {
        schema: u32,
        from: NodeId,
        rows: Vec<VersionedRow>,
        cleared: Seen,
    },
    /// The answer to a message that cannot be served (another schema, say).
    Refused {
        reason: String,
    },
    /// Fresh policy records (deployments, POP reports), sent once to every member.
    FleetPush {
        from: NodeId,
        records: Vec<FleetRecord>,
    },
    /// Compares policy records: answered by `FleetReply`, with the deployments and the
    /// answerer's own report when they differ from what the caller holds of them (the
    /// digest), nothing when they match. Reports are taken from their own POP only.
    FleetSync {
        from: NodeId,
        digest: u64,
    },
    FleetReply {
        same: bool,
        records: Vec<FleetRecord>,
    },
    /// Asks for a component by hash, `CHUNK` bytes from `offset`: answered by
    /// `ComponentChunk`, or `Refused` when the answerer does not hold it.
    ComponentRequest {
        hash: String,
        offset: u64,
    },
    ComponentChunk {
        total: u64,
        bytes: Vec<u8>,
    },
}

impl Message {
    /// The node a message says it comes from, which the sender's certificate must bear out.
    pub fn sender(&self) -> Option<NodeId> {
        match self {
            Message::Push { from, .. }
            | Message::SyncRequest { from, .. }
            | Message::SyncPush { from, .. }
            | Message::FleetPush { from, .. }
            | Message::FleetSync { from, .. } => Some(*from),
            _ => None,
        }
    }

    /// The message's name, for logs: a peer's frame is summarised, never printed.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Push { .. } => "Push",
            Message::SyncRequest { .. } => "SyncRequest",
            Message::SyncReply { .. } => "SyncReply",
            Message::SyncPush { .. } => "SyncPush",
            Message::Refused { .. } => "Refused",
            Message::FleetPush { .. } => "FleetPush",
            Message::FleetSync { .. } => "FleetSync",
            Message::FleetReply { .. } => "FleetReply",
            Message::ComponentRequest { .. } => "ComponentRequest",
            Message::ComponentChunk { .. } => "ComponentChunk",
        }
    }
}

/// Component bytes per chunk: a large component moves in bounded frames.
pub const CHUNK: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("stream: {0}")]
    Io(String),
    #[error("frame of {0} bytes is over the {1}-byte limit")]
    TooLarge(usize, usize),
    #[error("frame not done within {FRAME_TIMEOUT:?}")]
    Timeout,
    #[error("undecodable frame: {0}")]
    Decode(#[from] postcard::Error),
}

pub fn encode(m: &Message) -> Vec<u8> {
    postcard::to_stdvec(m).expect("messages always serialize")
}

pub fn decode(frame: &[u8]) -> Result<Message, WireError> {
    Ok(postcard::from_bytes(frame)?)
}

/// Writes one frame: its length, then the bytes, within [`FRAME_TIMEOUT`].
pub async fn write_frame(send: &mut quinn::SendStream, frame: &[u8]) -> Result<(), WireError> {
    let io = |e: quinn::WriteError| WireError::Io(e.to_string());
    let write = async {
        send.write_all(&(frame.len() as u32).to_be_bytes())
            .await
            .map_err(io)?;
        send.write_all(frame).await.map_err(io)
    };
    tokio::time::timeout(FRAME_TIMEOUT, write)
        .await
        .map_err(|_| WireError::Timeout)?
}

/// Reads one frame's length, refusing one over `max` before any of it is read.
pub async fn read_len(recv: &mut quinn::RecvStream, max: usize) -> Result<usize, WireError> {
    let mut len = [0u8; 4];
    tokio::time::timeout(FRAME_TIMEOUT, recv.read_exact(&mut len))
        .await
        .map_err(|_| WireError::Timeout)?
        .map_err(|e| WireError::Io(e.to_string()))?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(WireError::TooLarge(len, max));
    }
    Ok(len)
}

/// Reads a frame's `len` bytes within [`FRAME_TIMEOUT`]; memory grows with what arrives,
/// never to a length a peer merely claims.
pub async fn read_body(recv: &mut quinn::RecvStream, len: usize) -> Result<Vec<u8>, WireError> {
    let body = tokio::time::timeout(FRAME_TIMEOUT, recv.read_to_end(len))
        .await
        .map_err(|_| WireError::Timeout)?
        .map_err(|e| WireError::Io(e.to_string()))?;
    if body.len() != len {
        return Err(WireError::Io(format!(
            "frame of {} bytes where {len} were announced",
            body.len()
        )));
    }
    Ok(body)
}

/// Reads one whole frame of at most `max` bytes.
pub async fn read_frame(recv: &mut quinn::RecvStream, max: usize) -> Result<Vec<u8>, WireError> {
    let len = read_len(recv, max).await?;
    read_body(recv, len).await
}

/// Why a message from a peer of `schema` cannot be applied here, if it cannot.
pub fn schema_mismatch(schema: u32) -> Option<String> {
    (schema != SCHEMA).then(|| {
        format!("peer stores routing schema {schema}, this node {SCHEMA}; upgrade every POP to the same release")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_garbage_is_an_error() {
        let m = Message::SyncRequest {
            schema: SCHEMA,
            from: NodeId(3),
            digest: Digest(vec![1; 64]),
            seen: Seen::default(),
            wall: 0,
            after: None,
        };
        let back = decode(&encode(&m)).unwrap();
        assert!(matches!(
            back,
            Message::SyncRequest {
                from: NodeId(3),
                ..
            }
        ));
        assert!(decode(&[0xff, 0xff, 0xff]).is_err());
        assert!(schema_mismatch(SCHEMA).is_none());
        assert!(schema_mismatch(SCHEMA + 1).unwrap().contains("schema"));
    }
}
