//! Application services: what a connection, a reload and an operator's question mean,
//! with no socket code of their own (bytes move in `adapters::net`).
//!
//! - `proxy_service`: one connection, from decision to close, with failover.
//! - `dns`: what the internal DNS server answers (the policy's pick by name).
//! - `client_limits`: new-connection rate and open connections per client prefix.
//! - `shadow`: a second policy deciding beside the live one, only for the record.
//! - `rollout`: this POP's side of fleet policy deployments: fetch, load, swap, report.
//! - `routing`: loads the routing table off the hot path and swaps the snapshot in.
//! - `health_monitor`: checks, ejections and returns: this POP's verdicts, in one task.
//! - `registry`: self-registration and heartbeats (the auto-discovery API).
//! - `decision_log`: a sampled ring of recent decisions, for `GET /decisions` and replay.
//! - `bindings_gc`: the periodic sweep of expired bindings.
//! - `telemetry`: hot-path counters and histograms, read at scrape time.
//! - `admin`: what the admin API and `/metrics` answer.

pub mod admin;
pub mod bindings_gc;
pub mod client_limits;
pub mod decision_log;
pub mod dns;
pub mod health_monitor;
pub mod proxy_service;
pub mod registry;
pub mod rollout;
pub mod routing;
pub mod shadow;
pub mod telemetry;
