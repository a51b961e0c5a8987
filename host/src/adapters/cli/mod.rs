//! The operator's commands: what `edgeproxy <command>` does besides serving. Each reads
//! its settings, talks to the routing table, a policy file or a running POP's admin API,
//! and prints (`output`: tables for people, `--json` for scripts).
//!
//! - `routing` (backend, db), `config` (config check, show), `cluster` (cluster ca, cert,
//!   status; the admin API client the other commands share), `shadow` (policy shadow).
//! - `policy_build`, `policy_check`, `policy_new`, `policy_simulate`, `policy_replay`.
//! - `commands`: the command line itself (clap) and what runs each command.

pub mod cluster;
pub mod commands;
pub mod config;
pub mod output;
pub mod policy_build;
pub mod policy_check;
pub mod policy_new;
pub mod policy_replay;
pub mod policy_simulate;
pub mod routing;
pub mod shadow;
