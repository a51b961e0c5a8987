//! The integration suite, one binary: `proxy` drives an in-process host over real sockets;
//! `cli` runs the built `edgeproxy` binary as an operator would.

mod cli;
mod policy;
mod proxy;
mod support;
