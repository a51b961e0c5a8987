//! Socket technology: how bytes move between a client and a backend (`relay`: one poll
//! loop per connection, splice(2) on Linux) and the buffers and pipes they borrow for it
//! (`pool`). What a connection means (decide, connect, fail over) is the application's.

pub mod pool;
pub mod relay;

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
