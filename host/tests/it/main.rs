//! The integration suite, one binary: `proxy` and `admin` drive an in-process host over
//! real sockets; `cli` and `routing_cli` run the built `edgeproxy` binary as an operator
//! would.

#[macro_use]
mod support;

mod admin;
mod cli;
mod cluster;
mod cluster_memory;
mod deploy;
mod dns;
mod examples;
mod fuzz;
mod handover;
mod hardening;
mod health;
mod policy;
mod policy_tools;
mod postgres;
mod proxy;
mod registration;
mod routing_cli;
mod shadow;
mod tls;
mod wasi;
