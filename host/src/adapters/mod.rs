//! Adapters: the technology behind each port.
//!
//! - `inbound`: what drives the host (accept loops, PROXY protocol, TLS, DNS, admin and
//!   registration HTTP, file watching).
//! - `cli`: the operator's commands (`edgeproxy backend`, `policy check`, ...).
//! - `outbound`: what the host drives (SQLite routing table, bindings, GeoIP, wasm policy).
//! - `cluster`: the fleet: SWIM membership and row replication between POPs.
//! - `net`: socket technology shared by the data path (relay, buffer and pipe pools).

pub mod cli;
pub mod cluster;
pub mod inbound;
pub mod net;
pub mod outbound;
