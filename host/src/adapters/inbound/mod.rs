//! Inbound adapters: what drives the host (TCP accept loops, PROXY protocol on them,
//! file-change notifications that trigger reloads, the admin HTTP listener with its
//! Prometheus exposition, and the operator commands of the CLI).

pub mod admin_http;
pub mod cli_output;
pub mod config_cli;
pub mod file_watch;
pub mod policy_build;
pub mod policy_check;
pub mod policy_simulate;
pub mod prometheus;
pub mod proxy_protocol;
pub mod routing_cli;
pub mod tcp_server;
