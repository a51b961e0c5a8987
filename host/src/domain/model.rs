//! Entities and value objects: backends as the routing table describes them, their live
//! state, and the client as the proxy sees it. Validation of raw input happens in the
//! adapters; values here are already well formed.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

/// A backend's primary key in the routing table. Cheap to clone (shared string).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendId(Arc<str>);

impl BackendId {
    pub fn new(id: &str) -> Self {
        Self(Arc::from(id))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for BackendId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for BackendId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// ISO 3166-1 alpha-2 country code, upper case. Two bytes, so comparisons are free.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CountryCode([u8; 2]);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a two-letter country code")]
pub struct InvalidCountryCode(pub String);

impl FromStr for CountryCode {
    type Err = InvalidCountryCode;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.as_bytes() {
            [a, b] if a.is_ascii_alphabetic() && b.is_ascii_alphabetic() => {
                Ok(Self([a.to_ascii_uppercase(), b.to_ascii_uppercase()]))
            }
            _ => Err(InvalidCountryCode(s.to_owned())),
        }
    }
}

impl CountryCode {
    pub fn bytes(self) -> [u8; 2] {
        self.0
    }

    pub fn as_str(&self) -> &str {
        // Invariant: built only from two ASCII letters.
        std::str::from_utf8(&self.0).expect("country code is ASCII")
    }
}

impl fmt::Debug for CountryCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for CountryCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A region name ("sa", "eu", ...): a POP's region or a backend's. Lower case, shared.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Region(Arc<str>);

impl Region {
    pub fn new(name: &str) -> Self {
        Self(Arc::from(name.trim().to_ascii_lowercase()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One row of the routing table, validated. Deleted rows never become a `Backend`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub id: BackendId,
    pub app: Arc<str>,
    pub region: Region,
    pub country: CountryCode,
    /// Address on the WireGuard overlay; the mesh itself belongs to the operating system.
    pub addr: SocketAddr,
    pub healthy: bool,
    /// Relative capacity; 0 is treated as 1.
    pub weight: u32,
    /// Connections at which the backend counts as fully loaded; 0 is treated as 1.
    pub soft_limit: u32,
    /// Connections at which the backend takes no more; 0 means unlimited.
    pub hard_limit: u32,
}

impl Backend {
    pub fn effective_weight(&self) -> u32 {
        self.weight.max(1)
    }
    pub fn effective_soft_limit(&self) -> u32 {
        self.soft_limit.max(1)
    }
    pub fn at_hard_limit(&self, active: u32) -> bool {
        self.hard_limit != 0 && active >= self.hard_limit
    }
}

/// Live state of one backend, shared by every connection to it and by the scorer.
/// Lives as long as the backend id is known to the metrics store, across table reloads,
/// so counts never reset when the table changes.
#[derive(Debug, Default)]
pub struct BackendStats {
    active: AtomicU32,
    /// Connections to it another process of this POP still holds: the one this process
    /// took the sockets over from, while it drains. They count against the hard limit and
    /// in the load the policy sees.
    inherited: AtomicU32,
    /// Connect round-trip time EWMA in microseconds; 0 until the first connect.
    rtt_us: AtomicU64,
    connect_attempts: AtomicU64,
    connect_failures: AtomicU64,
    /// Failed connects since the last good one (passive ejection counts these).
    failures_in_row: AtomicU32,
    /// Bytes relayed through this backend, counted per chunk so long connections show.
    pub traffic: Traffic,
    /// DNS answers that named it.
    pub dns_answers: AtomicU64,
    /// This POP's checks or ejection hold it out (and its app is not in panic): the
    /// verdict every snapshot of the table reads, so a verdict copies no snapshot.
    down_here: AtomicBool,
}

/// Bytes relayed client -> backend (`up`) and backend -> client (`down`).
#[derive(Debug, Default)]
pub struct Traffic {
    pub up: AtomicU64,
    pub down: AtomicU64,
}

impl BackendStats {
    /// Up by this POP's own view (see `health::local_view`).
    pub fn up_here(&self) -> bool {
        !self.down_here.load(Ordering::Relaxed)
    }

    pub fn set_up_here(&self, up: bool) {
        self.down_here.store(!up, Ordering::Relaxed);
    }

    /// Connections this POP holds to it (this process's and those it inherited).
    pub fn active(&self) -> u32 {
        self.own_active()
            .saturating_add(self.inherited.load(Ordering::Relaxed))
    }

    /// This process's connections only.
    pub fn own_active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }

    pub fn set_inherited(&self, n: u32) {
        self.inherited.store(n, Ordering::Relaxed);
    }

    pub fn rtt_us(&self) -> u64 {
        self.rtt_us.load(Ordering::Relaxed)
    }

    pub fn connect_failures(&self) -> u64 {
        self.connect_failures.load(Ordering::Relaxed)
    }

    pub fn connect_attempts(&self) -> u64 {
        self.connect_attempts.load(Ordering::Relaxed)
    }

    /// Stats as a recorded decision saw them (replays and the shadow).
    pub fn recorded(active: u32, rtt_us: u64, up_here: bool) -> Self {
        Self {
            active: AtomicU32::new(active),
            rtt_us: AtomicU64::new(rtt_us),
            down_here: AtomicBool::new(!up_here),
            ..Self::default()
        }
    }

    pub fn record_connect_attempt(&self) {
        self.connect_attempts.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connection to this backend until the returned guard drops, whatever path
    /// the connection ends on.
    /// Takes a connection slot if one is free under `hard_limit` (0: unlimited), in one
    /// atomic step: a check of `active` followed by an add lets two threads take the last
    /// slot together.
    pub fn try_acquire(self: &Arc<Self>, hard_limit: u32) -> Option<ActiveGuard> {
        let inherited = self.inherited.load(Ordering::Relaxed);
        self.active
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (hard_limit == 0 || n.saturating_add(inherited) < hard_limit).then_some(n + 1)
            })
            .ok()
            .map(|_| ActiveGuard(Arc::clone(self)))
    }

    pub fn acquire(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(Arc::clone(self))
    }

    /// EWMA with alpha 1/4: fast enough to see a backend degrade, smooth enough to ignore
    /// one slow handshake.
    pub fn record_rtt(&self, sample_us: u64) {
        let sample = sample_us.max(1);
        // A lost race only loses one sample of an average; no CAS loop needed.
        let old = self.rtt_us.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            (old * 3 + sample) / 4
        };
        self.rtt_us.store(new, Ordering::Relaxed);
    }

    /// Counts a failed connect; returns the failures in a row, this one included.
    pub fn record_connect_failure(&self) -> u32 {
        self.connect_failures.fetch_add(1, Ordering::Relaxed);
        self.failures_in_row.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// A good connect ends a run of failures.
    pub fn record_connect_ok(&self) {
        // A load first: the common case writes nothing, so the cache line stays shared.
        if self.failures_in_row.load(Ordering::Relaxed) != 0 {
            self.failures_in_row.store(0, Ordering::Relaxed);
        }
    }

    pub fn failures_in_row(&self) -> u32 {
        self.failures_in_row.load(Ordering::Relaxed)
    }
}

/// Holds one unit of a backend's active-connection count.
#[derive(Debug)]
pub struct ActiveGuard(Arc<BackendStats>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The client of one connection, after PROXY protocol and GeoIP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Client {
    pub ip: IpAddr,
    pub country: Option<CountryCode>,
    pub region: Option<Region>,
    /// True when `ip` came from a trusted PROXY protocol header rather than the socket.
    pub via_proxy_protocol: bool,
    /// What it said in its TLS ClientHello, on listeners that read it.
    pub tls: Option<std::sync::Arc<super::server_names::TlsHello>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn country_codes_normalise_and_reject() {
        assert_eq!("br".parse::<CountryCode>().unwrap().as_str(), "BR");
        assert!("BRA".parse::<CountryCode>().is_err());
        assert!("B1".parse::<CountryCode>().is_err());
        assert!("".parse::<CountryCode>().is_err());
    }

    #[test]
    fn guard_counts_back_to_zero() {
        let stats = Arc::new(BackendStats::default());
        let a = stats.acquire();
        let b = stats.acquire();
        assert_eq!(stats.active(), 2);
        drop(a);
        drop(b);
        assert_eq!(stats.active(), 0);
    }

    /// A predecessor's connections (a handover) count in the load and against the limit.
    #[test]
    fn inherited_connections_count_in_the_load_and_against_the_hard_limit() {
        let stats = Arc::new(BackendStats::default());
        stats.set_inherited(2);
        assert_eq!(stats.active(), 2);
        assert!(stats.try_acquire(2).is_none());
        let held = stats.try_acquire(3).expect("room for one more");
        assert_eq!((stats.active(), stats.own_active()), (3, 1));
        stats.set_inherited(0);
        drop(held);
        assert_eq!(stats.active(), 0);
    }

    /// Eight threads race for two slots: never more than two are held. The same loop with
    /// `if !at_hard_limit(active()) { acquire() }` (what the proxy did) overshoots.
    #[test]
    fn try_acquire_never_exceeds_the_hard_limit() {
        let stats = Arc::new(BackendStats::default());
        let over = std::sync::atomic::AtomicBool::new(false);
        let start = std::sync::Barrier::new(8);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    start.wait();
                    for _ in 0..20_000 {
                        if let Some(g) = stats.try_acquire(2) {
                            if stats.active() > 2 {
                                over.store(true, Ordering::Relaxed);
                            }
                            drop(g);
                        }
                    }
                });
            }
        });
        assert!(!over.load(Ordering::Relaxed));
        assert_eq!(stats.active(), 0);
        assert!(stats.try_acquire(0).is_some(), "0 is unlimited");
    }

    #[test]
    fn rtt_ewma_moves_towards_samples() {
        let stats = BackendStats::default();
        stats.record_rtt(400);
        assert_eq!(stats.rtt_us(), 400);
        stats.record_rtt(800);
        assert_eq!(stats.rtt_us(), 500);
    }
}
