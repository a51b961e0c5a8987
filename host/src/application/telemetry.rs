//! Counters the proxy service and the accept loops bump on the hot path: plain relaxed
//! atomics, read only when someone asks (a `/metrics` scrape, `/status`). Exposition
//! formats live in the admin adapter; nothing here formats or allocates per event.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::log_throttle::LogThrottle;

/// A fixed-bucket latency histogram, lock-free: one bucket increment, the sum and the
/// count per observation.
#[derive(Debug)]
pub struct Histogram {
    /// Upper bounds in seconds, ascending; a last, implicit bucket is +Inf.
    bounds: &'static [f64],
    buckets: Box<[AtomicU64]>,
    sum_ns: AtomicU64,
}

/// A histogram read at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    pub sum_seconds: f64,
    pub count: u64,
    /// (upper bound, observations in this bucket only), ending with +Inf. Per bucket,
    /// not cumulative, as exposition libraries take them.
    pub buckets: Vec<(f64, u64)>,
}

/// Decisions take from tens of nanoseconds (a binding hit) to a policy's whole budget.
pub const DECISION_BUCKETS: &[f64] = &[
    250e-9, 500e-9, 1e-6, 2.5e-6, 5e-6, 10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 1e-3, 10e-3,
];
/// Backend connects: loopback to intercontinental overlay links.
pub const CONNECT_BUCKETS: &[f64] = &[
    100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0,
];

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self.bounds.partition_point(|&b| b < secs);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let buckets: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(self.buckets.iter())
            .map(|(bound, n)| (bound, n.load(Ordering::Relaxed)))
            .collect();
        HistogramSnapshot {
            sum_seconds: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
            count: buckets.iter().map(|(_, n)| n).sum(),
            buckets,
        }
    }
}

/// The POP's `max_connections`: one slot per open client connection, across listeners.
/// Taking and returning a slot is one atomic step; the wake-up for paused accept loops is
/// only touched when the POP was at its cap.
#[derive(Debug)]
pub struct ConnectionSlots {
    max: usize,
    open: AtomicUsize,
    freed: Notify,
    /// Times an accept loop paused at the cap.
    pub pauses: AtomicU64,
}

impl ConnectionSlots {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            open: AtomicUsize::new(0),
            freed: Notify::new(),
            pauses: AtomicU64::new(0),
        }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    fn try_take(&self) -> bool {
        self.open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok()
    }

    /// A slot, waiting (without spinning) while every slot is taken; false if `stop`
    /// fires first.
    pub async fn take(&self, stop: &CancellationToken) -> bool {
        let mut paused = false;
        loop {
            // Registered before the check: a slot freed in between still wakes us.
            let freed = self.freed.notified();
            if self.try_take() {
                return true;
            }
            if !std::mem::replace(&mut paused, true) {
                self.pauses.fetch_add(1, Ordering::Relaxed);
            }
            tokio::select! {
                _ = stop.cancelled() => return false,
                _ = freed => {}
            }
        }
    }

    /// A slot even past the cap (it is returned like any other).
    fn force_take(&self) {
        self.open.fetch_add(1, Ordering::Relaxed);
    }

    pub fn release(&self) {
        if self.open.fetch_sub(1, Ordering::Relaxed) >= self.max {
            // Every paused loop races for the slot; the losers pause again.
            self.freed.notify_waiters();
        }
    }
}

/// One listener's connection counts.
#[derive(Debug)]
pub struct ListenerStats {
    pub addr: SocketAddr,
    pub app: Option<String>,
    pub proxy_protocol: bool,
    accepted: AtomicU64,
    closed: AtomicU64,
    /// The POP's connection cap, released when an open connection closes.
    slots: Option<Arc<ConnectionSlots>>,
    /// Per-client limits, where this listener has them.
    pub limiter: Option<Arc<crate::application::client_limits::ClientLimiter>>,
    /// Connections refused by them: over the rate, over the open connections.
    pub refused_rate: AtomicU64,
    pub refused_open: AtomicU64,
    /// On listeners that read TLS: connections closed before routing, by reason.
    pub tls: Option<TlsCounters>,
}

/// Why a TLS listener closed a connection before routing it.
pub const TLS_REJECTS: [&str; 11] = [
    "not_tls",
    "malformed",
    "too_large",
    "timeout",
    "closed",
    "unknown_name",
    // A terminating handshake that failed: timed out, the client refused (an alert: our
    // certificate, say), nothing in common (versions, ciphers, ALPN), no certificate for
    // the name, anything else.
    "handshake_timeout",
    "peer_alert",
    "incompatible",
    "no_certificate",
    "handshake",
];

#[derive(Debug, Default)]
pub struct TlsCounters {
    rejected: [AtomicU64; TLS_REJECTS.len()],
}

impl TlsCounters {
    /// Counts one rejection; `reason` is one of `TLS_REJECTS`.
    pub fn reject(&self, reason: &str) {
        if let Some(i) = TLS_REJECTS.iter().position(|r| *r == reason) {
            self.rejected[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn rejected(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        TLS_REJECTS
            .iter()
            .zip(&self.rejected)
            .map(|(r, n)| (*r, n.load(Ordering::Relaxed)))
    }
}

impl ListenerStats {
    pub fn new(
        addr: SocketAddr,
        app: Option<String>,
        proxy_protocol: bool,
        slots: Option<Arc<ConnectionSlots>>,
    ) -> Self {
        Self {
            addr,
            app,
            proxy_protocol,
            accepted: AtomicU64::new(0),
            closed: AtomicU64::new(0),
            slots,
            limiter: None,
            refused_rate: AtomicU64::new(0),
            refused_open: AtomicU64::new(0),
            tls: None,
        }
    }

    pub fn with_tls(mut self, tls: bool) -> Self {
        self.tls = tls.then(TlsCounters::default);
        self
    }

    pub fn with_limiter(
        mut self,
        limiter: Option<Arc<crate::application::client_limits::ClientLimiter>>,
    ) -> Self {
        self.limiter = limiter;
        self
    }

    /// A slot if one is free now (see `slot`).
    pub fn try_slot(&self) -> bool {
        self.slots.as_ref().is_none_or(|s| s.try_take())
    }

    /// A slot even at the cap, for a connection the kernel accepted already (the
    /// io_uring path's last accepts when it stops).
    pub fn extra_slot(&self) {
        if let Some(s) = &self.slots {
            s.force_take();
        }
    }

    /// Waits for a connection slot under `max_connections` (at once without a cap); false
    /// when `stop` fires first. Each slot taken is returned by the `OpenConnection` of
    /// the connection accepted with it, or by [`Self::unused_slot`].
    pub async fn slot(&self, stop: &CancellationToken) -> bool {
        match &self.slots {
            None => true,
            Some(s) => s.take(stop).await,
        }
    }

    /// Returns a slot taken for an accept that failed.
    pub fn unused_slot(&self) {
        if let Some(s) = &self.slots {
            s.release();
        }
    }

    /// Counts an accepted connection as open until the guard drops, however it ends.
    pub fn opened(self: &Arc<Self>) -> OpenConnection {
        self.accepted.fetch_add(1, Ordering::Relaxed);
        OpenConnection(Arc::clone(self))
    }

    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    pub fn closed(&self) -> u64 {
        self.closed.load(Ordering::Relaxed)
    }

    pub fn active(&self) -> u64 {
        self.accepted().saturating_sub(self.closed())
    }
}

/// One open connection of a listener.
#[derive(Debug)]
pub struct OpenConnection(Arc<ListenerStats>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.closed.fetch_add(1, Ordering::Relaxed);
        self.0.unused_slot();
    }
}

/// How a new connection's backend was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The policy picked a backend.
    Picked,
    /// The policy refused (no eligible backend, or by design).
    Refused,
    /// The policy named an ineligible backend and the native scorer decided instead.
    Overridden,
}

/// Everything the proxy service counts that is not per backend.
#[derive(Debug)]
pub struct Telemetry {
    pub started: SystemTime,
    listeners: Mutex<Vec<Arc<ListenerStats>>>,
    /// Time to choose a backend for a new client (binding lookup or policy call).
    pub decision_time: Histogram,
    decisions: [AtomicU64; 3],
    pub binding_hits: AtomicU64,
    pub binding_misses: AtomicU64,
    /// Connections refused because no backend was eligible or every connect failed.
    pub no_backend: AtomicU64,
    /// Connect attempts that failed for this POP's own want of descriptors, buffers or
    /// ports (EMFILE, ENFILE, ENOBUFS, ENOMEM, EADDRNOTAVAIL): not the backend's fault.
    pub local_connect_failures: AtomicU64,
    /// `max_connections`, shared by every listener; None: no cap.
    pub slots: Option<Arc<ConnectionSlots>>,
    pub connect_time: Histogram,
    /// Warnings for overridden policy answers, at most one a second.
    pub override_log: LogThrottle,
    /// Per-connection warnings (failed connects, relay errors, bad PROXY headers), at most
    /// one a second: during an outage every client would otherwise write several lines.
    pub connection_log: LogThrottle,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self {
            started: SystemTime::now(),
            listeners: Mutex::default(),
            decision_time: Histogram::new(DECISION_BUCKETS),
            decisions: Default::default(),
            binding_hits: AtomicU64::new(0),
            binding_misses: AtomicU64::new(0),
            no_backend: AtomicU64::new(0),
            local_connect_failures: AtomicU64::new(0),
            slots: None,
            connect_time: Histogram::new(CONNECT_BUCKETS),
            override_log: LogThrottle::new(Duration::from_secs(1)),
            connection_log: LogThrottle::new(Duration::from_secs(1)),
        }
    }
}

impl Telemetry {
    pub fn with_connection_limit(limit: Option<usize>) -> Self {
        Self {
            slots: limit.map(|n| Arc::new(ConnectionSlots::new(n))),
            ..Self::default()
        }
    }

    pub fn add_listener(&self, stats: Arc<ListenerStats>) {
        self.listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(stats);
    }

    pub fn listeners(&self) -> Vec<Arc<ListenerStats>> {
        self.listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn decided(&self, how: Decision) {
        self.decisions[how as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn decisions(&self, how: Decision) -> u64 {
        self.decisions[how as usize].load(Ordering::Relaxed)
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_counts_each_bucket_and_ends_at_inf() {
        let h = Histogram::new(&[1e-3, 1e-2]);
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(1)); // on the bound: le="0.001"
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_secs(1));
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.buckets, vec![(1e-3, 2), (1e-2, 1), (f64::INFINITY, 1)]);
        assert!((s.sum_seconds - 1.0065).abs() < 1e-9);
    }

    #[tokio::test]
    async fn a_paused_take_resumes_when_a_slot_frees_and_stops_on_shutdown() {
        let slots = Arc::new(ConnectionSlots::new(1));
        let stop = CancellationToken::new();
        assert!(slots.take(&stop).await);
        let waiting = tokio::spawn({
            let (slots, stop) = (slots.clone(), stop.clone());
            async move { slots.take(&stop).await }
        });
        while slots.pauses.load(Ordering::Relaxed) == 0 {
            tokio::task::yield_now().await;
        }
        slots.release();
        assert!(waiting.await.unwrap());
        let waiting = tokio::spawn({
            let (slots, stop) = (slots.clone(), stop.clone());
            async move { slots.take(&stop).await }
        });
        stop.cancel();
        assert!(!waiting.await.unwrap());
        assert_eq!(slots.pauses.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn listener_counts_a_connection_closed_however_it_ends() {
        let l = Arc::new(ListenerStats::new(
            "127.0.0.1:1".parse().unwrap(),
            None,
            false,
            None,
        ));
        let a = l.opened();
        let b = l.opened();
        assert_eq!((l.accepted(), l.active()), (2, 2));
        drop(a);
        drop(b);
        assert_eq!((l.accepted(), l.closed(), l.active()), (2, 2, 0));
    }
}
