//! Inbound adapters: what drives the host.
//!
//! - `tcp_server` (accept loops; `uring_server` those of the io_uring data path), `proxy_protocol` (the PROXY v1/v2 header on them) and
//!   `tls_hello` (the ClientHello a TLS listener routes by), `tls_certs` (the certificates
//!   terminating listeners present, reloaded as their files change).
//! - `dns_server`: the internal DNS server's UDP and TCP sockets and wire format.
//! - `file_watch`: file-change notifications that trigger reloads.
//! - `handover`: the listening sockets passed to a new process (upgrades, restarts).
//! - `admin_http` (the admin JSON API) and `prometheus` (its `/metrics` exposition);
//!   `registration_http` (backends register and beat); `http`: what they share.

pub mod admin_http;
pub mod dns_server;
pub mod file_watch;
#[cfg(target_os = "linux")]
pub mod handover;
pub mod http;
pub mod prometheus;
pub mod proxy_protocol;
pub mod registration_http;
pub mod tcp_server;
pub mod tls_certs;
pub mod tls_hello;
#[cfg(target_os = "linux")]
pub mod uring_server;
