//! Inbound adapters: what drives the host (TCP accept loops, PROXY protocol on them, and
//! file-change notifications that trigger reloads).

pub mod file_watch;
pub mod policy_build;
pub mod proxy_protocol;
pub mod tcp_server;
