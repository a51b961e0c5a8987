//! The routing domain: what a backend, a client and a binding are, the ports the rest of the
//! host plugs into, and the pure services (region map, native scorer) that decide.
//!
//! - `model`: entities and value objects; `routing_table`: the snapshot the hot path reads;
//!   `live_stats`: per-backend counters kept across reloads.
//! - `ports`: the traits adapters implement; `services`: region map and native scorer.
//! - `breaker`: suspends a policy (live or shadow) that keeps faulting.
//! - `health`: this POP's own verdicts (checks, passive ejection) and the panic rule.
//! - `replication`: row versions (hybrid logical clock), the merge rule and the digest POPs
//!   compare.
//! - `rollout`: policies deployed across the fleet: which one each POP runs, by role.
//! - `registration`: what a self-registration may ask for (ids, bounds, destinations).
//! - `server_names`: TLS server names (SNI) to the app and mode that serve them.
//! - `dns`: the names the internal DNS server answers, and the fleet's front name.
//! - `sample`: the synthetic table the policy self-test, `policy check` and tests share.
//!
//! Nothing here does I/O or awaits; adapters feed it immutable snapshots and it answers
//! synchronously, so everything in it is testable without a runtime.

pub mod breaker;
pub mod dns;
pub mod health;
pub mod live_stats;
pub mod model;
pub mod ports;
pub mod registration;
pub mod replication;
pub mod rollout;
pub mod routing_table;
pub mod sample;
pub mod server_names;
pub mod services;

pub use model::{Backend, BackendId, BackendStats, Client, CountryCode, Region};
pub use routing_table::{RoutedBackend, RoutingTable};
