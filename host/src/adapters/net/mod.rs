//! Socket technology: how bytes move between a client and a backend (`relay`: one poll
//! loop per connection, splice(2) on Linux) and the buffers and pipes they borrow for it
//! (`pool`); `downstream`: the client's side, its socket or a TLS session terminated here;
//! `tls`: the provider, CA-file clients and certificate names every TLS use shares;
//! `uring`: the io_uring data path (a ring per thread, its operations and relay).
//! What a connection means (decide, connect, fail over) is the application's.

pub mod downstream;
pub mod pool;
pub mod relay;
pub mod tls;
#[cfg(target_os = "linux")]
pub mod uring;

pub use pool::BufferPool;

/// A socket error that is this host's problem, not the peer's: out of descriptors (EMFILE,
/// ENFILE), buffers or memory (ENOBUFS, ENOMEM), or local ports (EADDRNOTAVAIL). Another
/// backend would fail the same way, so such a connect failure blames no backend.
pub fn is_local_resource_error(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12 | 99))
}

/// Makes the close of `stream` send a reset instead of a FIN (SO_LINGER 0): after an abort
/// (a reset, an error, the idle timeout), a FIN would tell a close-delimited protocol that
/// a truncated answer is complete.
pub fn reset_on_close(stream: &tokio::net::TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(std::time::Duration::ZERO));
}

/// TCP keepalive on a listener (accepted sockets inherit it): the first probe after
/// `idle` without traffic, then every 10 s (the system's probe count), so a client that
/// vanished without a FIN or RST is noticed.
pub fn set_keepalive(socket: &impl std::os::fd::AsFd, idle: std::time::Duration) {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval(idle.min(std::time::Duration::from_secs(10)));
    let _ = socket2::SockRef::from(socket).set_tcp_keepalive(&keepalive);
}

/// TCP keepalive on one backend connection, in two system calls (the probe interval
/// stays the system's): it is paid per connection, unlike the listener's.
pub fn set_backend_keepalive(socket: &impl std::os::fd::AsFd, idle: std::time::Duration) {
    let keepalive = socket2::TcpKeepalive::new().with_time(idle);
    let _ = socket2::SockRef::from(socket).set_tcp_keepalive(&keepalive);
}

/// Raises the soft limit of open descriptors to the hard limit (a default systemd unit
/// gives 1024 soft: about 500 proxied connections). Returns (soft, hard) as they are now.
#[cfg(target_os = "linux")]
pub fn raise_fd_limit() -> std::io::Result<(u64, u64)> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        limit.current = limit.maximum;
        setrlimit(Resource::Nofile, limit)?;
    }
    let now = getrlimit(Resource::Nofile);
    Ok((
        now.current.unwrap_or(u64::MAX),
        now.maximum.unwrap_or(u64::MAX),
    ))
}
