//! The integration suite, one binary: `proxy` and `admin` drive an in-process host over
//! real sockets; `cli` runs the built `edgeproxy` binary as an operator would.

mod admin;
mod cli;
mod policy;
mod proxy;
mod support;
