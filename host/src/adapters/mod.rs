//! Adapters: the technology behind each port (inbound: sockets and file watching;
//! outbound: SQLite, DashMap, MaxMind, in-memory metrics).

pub mod inbound;
pub mod net;
pub mod outbound;
