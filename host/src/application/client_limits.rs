//! Per-client limits (edgeProxy's `EDGEPROXY_RATE_LIMIT_*`, nginx's `limit_conn`, HAProxy's
//! stick tables): new connections per second as a token bucket, and connections open at
//! once, per client prefix (/32 and /64 by default, so one IPv6 host cannot dodge it by
//! rotating addresses). Checked before any decision or backend connect; a refused
//! connection is closed at once.
//!
//! Memory is bounded: at most `max_tracked` prefixes are tracked (about 100 bytes each). A
//! prefix whose bucket is full again and that holds no connection is the same as an absent
//! one, so those are dropped when the table fills; a new prefix that still finds no room is
//! admitted untracked and counted, so a flood from more addresses than the table holds
//! degrades to no limit for the newcomers, never to refusing everyone.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use dashmap::DashMap;
use ipnet::IpNet;
use tokio::time::Instant;

/// The prefix a client address is counted under (`v4` and `v6` bits long).
pub fn client_prefix(ip: IpAddr, v4: u8, v6: u8) -> IpNet {
    let ip = ip.to_canonical();
    let len = match ip {
        IpAddr::V4(_) => v4,
        IpAddr::V6(_) => v6,
    };
    IpNet::new(ip, len).map_or_else(|_| IpNet::from(ip), |n| n.trunc())
}

/// What a listener allows each client prefix.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientLimits {
    /// New connections per second, and how many may come at once (the bucket's size).
    pub rate: Option<(f64, f64)>,
    /// Connections open at once.
    pub max_open: Option<u32>,
    pub v4_prefix: u8,
    pub v6_prefix: u8,
    /// Never limited (monitoring, other POPs, trusted proxies).
    pub exempt: Vec<IpNet>,
    pub max_tracked: usize,
}

impl ClientLimits {
    pub fn any(&self) -> bool {
        self.rate.is_some() || self.max_open.is_some()
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Rate,
    Open,
}

struct Entry {
    tokens: f64,
    at: Instant,
    open: u32,
}

#[derive(Debug, Default)]
pub struct LimitCounters {
    pub refused_rate: AtomicU64,
    pub refused_open: AtomicU64,
    /// Admitted without tracking: the table was full of active prefixes.
    pub untracked: AtomicU64,
}

pub struct ClientLimiter {
    limits: ClientLimits,
    map: DashMap<IpNet, Entry>,
    /// Last sweep for idle prefixes (ms after `since`), so a flood sweeps at most every
    /// [`SWEEP_EVERY`].
    swept: AtomicU64,
    since: Instant,
    pub counters: LimitCounters,
}

impl std::fmt::Debug for ClientLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientLimiter")
            .field("limits", &self.limits)
            .field("tracked", &self.map.len())
            .finish()
    }
}

const SWEEP_EVERY: Duration = Duration::from_millis(100);

/// A connection's share of its prefix's open count, given back when dropped.
pub struct Admitted {
    limiter: Arc<ClientLimiter>,
    key: IpNet,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Some(mut e) = self.limiter.map.get_mut(&self.key) {
            e.open = e.open.saturating_sub(1);
        }
    }
}

impl ClientLimiter {
    pub fn new(limits: ClientLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            map: DashMap::with_shard_amount(64),
            swept: AtomicU64::new(0),
            since: Instant::now(),
            counters: LimitCounters::default(),
        })
    }

    pub fn limits(&self) -> &ClientLimits {
        &self.limits
    }

    /// Prefixes tracked now.
    pub fn tracked(&self) -> usize {
        self.map.len()
    }

    fn key(&self, ip: IpAddr) -> IpNet {
        client_prefix(ip, self.limits.v4_prefix, self.limits.v6_prefix)
    }

    /// Admits a connection from `ip` at `now`, or says why not. `Ok(Some)` holds a share of
    /// the prefix's open count until dropped (only where open connections are limited).
    pub fn admit(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<Option<Admitted>, Refused> {
        let l = &self.limits;
        if l.exempt.iter().any(|n| n.contains(&ip.to_canonical())) {
            return Ok(None);
        }
        let key = self.key(ip);
        if !self.map.contains_key(&key) && self.map.len() >= l.max_tracked {
            self.sweep(now);
            if self.map.len() >= l.max_tracked {
                self.counters.untracked.fetch_add(1, Relaxed);
                return Ok(None);
            }
        }
        let burst = l.rate.map_or(0.0, |(_, b)| b);
        let mut e = self.map.entry(key).or_insert_with(|| Entry {
            tokens: burst,
            at: now,
            open: 0,
        });
        if let Some(max) = l.max_open
            && e.open >= max
        {
            self.counters.refused_open.fetch_add(1, Relaxed);
            return Err(Refused::Open);
        }
        if let Some((per_sec, burst)) = l.rate {
            let elapsed = now.saturating_duration_since(e.at).as_secs_f64();
            e.tokens = (e.tokens + elapsed * per_sec).min(burst);
            e.at = now;
            if e.tokens < 1.0 {
                self.counters.refused_rate.fetch_add(1, Relaxed);
                return Err(Refused::Rate);
            }
            e.tokens -= 1.0;
        }
        if l.max_open.is_none() {
            return Ok(None);
        }
        e.open += 1;
        drop(e);
        Ok(Some(Admitted {
            limiter: Arc::clone(self),
            key,
        }))
    }

    /// Drops the prefixes that hold no connection and whose bucket is full again: keeping
    /// them changes nothing.
    fn sweep(&self, now: Instant) {
        let ms = now.saturating_duration_since(self.since).as_millis() as u64;
        let last = self.swept.load(Relaxed);
        if ms < last + SWEEP_EVERY.as_millis() as u64
            || self
                .swept
                .compare_exchange(last, ms, Relaxed, Relaxed)
                .is_err()
        {
            return;
        }
        let rate = self.limits.rate;
        self.map.retain(|_, e| {
            let full = rate.is_none_or(|(per_sec, burst)| {
                e.tokens + now.saturating_duration_since(e.at).as_secs_f64() * per_sec >= burst
            });
            e.open > 0 || !full
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rate: Option<(f64, f64)>, max_open: Option<u32>) -> ClientLimits {
        ClientLimits {
            rate,
            max_open,
            v4_prefix: 32,
            v6_prefix: 64,
            exempt: vec!["10.9.0.0/16".parse().unwrap()],
            max_tracked: 1000,
        }
    }

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let l = ClientLimiter::new(limits(Some((10.0, 5.0)), None));
        let t = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..5 {
            assert!(l.admit(a, t).is_ok());
        }
        assert!(matches!(l.admit(a, t), Err(Refused::Rate)));
        // Another client is not held back; the first gets one more after 100 ms.
        assert!(l.admit("192.0.2.2".parse().unwrap(), t).is_ok());
        let later = t + Duration::from_millis(100);
        assert!(l.admit(a, later).is_ok());
        assert!(l.admit(a, later).is_err());
        assert_eq!(l.counters.refused_rate.load(Relaxed), 2);
        // Exempt addresses and IPv6 hosts of one /64 share nothing with others.
        for _ in 0..100 {
            assert!(l.admit("10.9.1.1".parse().unwrap(), t).is_ok());
        }
        for i in 0..5 {
            let v6: IpAddr = format!("2001:db8:0:1::{i}").parse().unwrap();
            assert!(l.admit(v6, t).is_ok());
        }
        assert!(
            l.admit("2001:db8:0:1::99".parse().unwrap(), t).is_err(),
            "one /64"
        );
        assert!(l.admit("2001:db8:0:2::1".parse().unwrap(), t).is_ok());
    }

    #[test]
    fn open_connections_are_counted_until_dropped() {
        let l = ClientLimiter::new(limits(None, Some(2)));
        let (t, a) = (Instant::now(), "192.0.2.1".parse().unwrap());
        let one = l.admit(a, t).unwrap();
        let two = l.admit(a, t).unwrap();
        assert!(matches!(l.admit(a, t), Err(Refused::Open)));
        drop(one);
        let _three = l.admit(a, t).unwrap();
        drop(two);
        assert_eq!(l.counters.refused_open.load(Relaxed), 1);
    }

    #[test]
    fn a_flood_of_addresses_never_grows_the_table_past_its_bound() {
        let mut lim = limits(Some((1.0, 2.0)), Some(10));
        lim.max_tracked = 1000;
        let l = ClientLimiter::new(lim);
        let t = Instant::now();
        let mut held = Vec::new();
        for i in 0..100_000u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            // Some keep a connection open (cannot be dropped), the rest made one and left.
            match l.admit(ip, t) {
                Ok(Some(a)) if i % 10 == 0 => held.push(a),
                Ok(_) => {}
                Err(e) => panic!("{ip}: {e:?}"),
            }
            assert!(l.tracked() <= 1000);
        }
        assert!(l.counters.untracked.load(Relaxed) > 0);
        // Later, with their buckets full again, the ones without connections make room.
        let later = t + Duration::from_secs(5);
        drop(held);
        assert!(l.admit("192.0.2.1".parse().unwrap(), later).is_ok());
        assert!(l.tracked() < 1000);
    }
}
