//! Sticky bindings in a DashMap: client (IP, app) -> backend, with a TTL refreshed on use.
//! Expiry is lazy on read and swept by the GC task; time comes from the caller so tests
//! drive it with paused tokio time.
//!
//! The table is capped (`max_bindings`): one binding per client address would otherwise
//! grow without bound (an IPv6 /64 holds 2^64 of them). Past the cap the bindings closest
//! to expiry, which are the least recently used, are evicted in a batch of 1/16 of the cap,
//! so the cost is amortised over many inserts and the hot path pays one atomic add.

use std::collections::BinaryHeap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use tokio::time::Instant;

use crate::domain::BackendId;
use crate::domain::ports::{BindingEntry, BindingKey, BindingRepository};

#[derive(Debug)]
struct Binding {
    backend: BackendId,
    expires: Instant,
}

/// Expiries sampled to find the eviction cut-off.
const SAMPLE: usize = 1024;

#[derive(Debug)]
pub struct BindingTable {
    ttl: Duration,
    map: DashMap<BindingKey, Binding>,
    /// Bindings held (DashMap's own `len` locks every shard).
    count: AtomicUsize,
    /// 0: no cap.
    max: usize,
    evicting: AtomicBool,
    evicted: AtomicU64,
    generation: AtomicU64,
}

impl BindingTable {
    /// Binds `key`; with `generation`, only if no `clear` came since. The generation is
    /// checked under the key's shard lock: `clear` moves it before sweeping, so a put
    /// either sees the new generation or is swept after it, and no other connection ever
    /// sees a binding made before the clear.
    fn store(&self, key: BindingKey, backend: BackendId, now: Instant, generation: Option<u64>) {
        let binding = Binding {
            backend,
            expires: now + self.ttl,
        };
        let added = match self.map.entry(key) {
            _ if generation.is_some_and(|g| g != self.generation.load(Ordering::SeqCst)) => {
                return;
            }
            dashmap::Entry::Occupied(mut e) => {
                e.insert(binding);
                false
            }
            dashmap::Entry::Vacant(e) => {
                e.insert(binding);
                true
            }
        };
        if added {
            let n = self.count.fetch_add(1, Ordering::Relaxed) + 1;
            if self.max > 0 && n > self.max {
                self.evict(now);
            }
        }
    }

    pub fn new(ttl: Duration) -> Self {
        Self::with_cap(ttl, 0)
    }

    /// At most `max` bindings (0: no cap).
    pub fn with_cap(ttl: Duration, max: usize) -> Self {
        Self {
            ttl,
            // A sweep locks one shard at a time: 64 shards keep a get or put that meets it
            // waiting for at most 1/64 of the sweep.
            map: DashMap::with_shard_amount(64),
            count: AtomicUsize::new(0),
            max,
            evicting: AtomicBool::new(false),
            evicted: AtomicU64::new(0),
            generation: AtomicU64::new(0),
        }
    }

    /// Drops bindings matching `drop`; returns how many.
    fn remove_where(&self, drop: impl Fn(&BindingKey, &Binding) -> bool) -> usize {
        let removed = AtomicUsize::new(0);
        self.map.retain(|k, b| {
            let gone = drop(k, b);
            if gone {
                removed.fetch_add(1, Ordering::Relaxed);
            }
            !gone
        });
        let n = removed.into_inner();
        self.count.fetch_sub(n, Ordering::Relaxed);
        n
    }

    /// Brings the table back under its cap, 1/16 of the cap below it: expired bindings
    /// first, then those closest to expiry. One thread at a time; others go on.
    fn evict(&self, now: Instant) {
        if self.evicting.swap(true, Ordering::Acquire) {
            return;
        }
        let target = self.max - self.max / 16;
        self.remove_where(|_, b| b.expires <= now);
        let over = self.count.load(Ordering::Relaxed).saturating_sub(target);
        if over > 0 {
            // The expiry below which about `over` bindings lie, from a sample.
            let mut sample: Vec<Instant> =
                self.map.iter().take(SAMPLE).map(|e| e.expires).collect();
            sample.sort_unstable();
            let share = over as f64 / self.count.load(Ordering::Relaxed).max(1) as f64;
            let at = ((sample.len() as f64 * share).ceil() as usize).clamp(1, sample.len());
            let cutoff = sample[at - 1];
            let n = self.remove_where(|_, b| b.expires <= cutoff);
            self.evicted.fetch_add(n as u64, Ordering::Relaxed);
        }
        self.evicting.store(false, Ordering::Release);
    }
}

impl BindingRepository for BindingTable {
    fn get(&self, key: &BindingKey, now: Instant) -> Option<BackendId> {
        let mut entry = self.map.get_mut(key)?;
        if entry.expires <= now {
            drop(entry);
            // Only remove it if nobody refreshed it in between.
            if self.map.remove_if(key, |_, b| b.expires <= now).is_some() {
                self.count.fetch_sub(1, Ordering::Relaxed);
            }
            return None;
        }
        entry.expires = now + self.ttl;
        Some(entry.backend.clone())
    }

    fn put(&self, key: BindingKey, backend: BackendId, now: Instant) {
        self.store(key, backend, now, None);
    }

    fn put_unless_cleared(
        &self,
        key: BindingKey,
        backend: BackendId,
        now: Instant,
        generation: u64,
    ) {
        self.store(key, backend, now, Some(generation));
    }

    fn remove(&self, key: &BindingKey) {
        if self.map.remove(key).is_some() {
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn purge_expired(&self, now: Instant) -> usize {
        self.remove_where(|_, b| b.expires <= now)
    }

    /// Keeps only the `offset + limit` smallest keys while walking the map (a bounded
    /// heap), so a page never copies or sorts the whole table.
    fn page(&self, offset: usize, limit: usize, now: Instant) -> (usize, Vec<BindingEntry>) {
        // Ordered by key first; keys are unique, so the rest never decides.
        type Item = (IpAddr, Option<std::sync::Arc<str>>, BackendId, Duration);
        let keep = offset.saturating_add(limit);
        let mut heap: BinaryHeap<Item> = BinaryHeap::with_capacity(keep.min(1 << 16));
        let mut live = 0;
        for e in self.map.iter().filter(|e| e.expires > now) {
            live += 1;
            let smaller = heap.len() < keep
                || heap
                    .peek()
                    .is_some_and(|top| (e.key().client, &e.key().app) < (top.0, &top.1));
            if smaller {
                let item = (
                    e.key().client,
                    e.key().app.clone(),
                    e.backend.clone(),
                    e.expires - now,
                );
                heap.push(item);
                if heap.len() > keep {
                    heap.pop();
                }
            }
        }
        let page = heap
            .into_sorted_vec()
            .into_iter()
            .skip(offset)
            .map(|(client, app, backend, expires_in)| BindingEntry {
                key: BindingKey { client, app },
                backend,
                expires_in,
            })
            .collect();
        (live, page)
    }

    fn export(&self, now: Instant) -> Vec<BindingEntry> {
        self.map
            .iter()
            .filter(|e| e.expires > now)
            .map(|e| BindingEntry {
                key: e.key().clone(),
                backend: e.backend.clone(),
                expires_in: e.expires - now,
            })
            .collect()
    }

    fn restore(&self, entry: BindingEntry, now: Instant) {
        self.put(entry.key.clone(), entry.backend, now);
        // `put` gave it a whole TTL; it keeps what it had left.
        if entry.expires_in < self.ttl
            && let Some(mut b) = self.map.get_mut(&entry.key)
        {
            b.expires = now + entry.expires_in;
        }
    }

    fn remove_client(&self, client: IpAddr) -> usize {
        self.remove_where(|k, _| k.client == client)
    }

    fn clear(&self) -> usize {
        // Before the sweep: a put the sweep misses then sees the new generation.
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.remove_where(|_, _| true)
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ip: &str) -> BindingKey {
        BindingKey {
            client: ip.parse().unwrap(),
            app: None,
        }
    }

    /// A connection decided before a `clear` binds nothing another connection can see,
    /// even for an instant (seen before: that one then refreshed it for good).
    #[test]
    fn a_binding_made_before_a_clear_is_never_seen() {
        let t = std::sync::Arc::new(BindingTable::new(Duration::from_secs(10)));
        let before = t.generation();
        t.clear();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let putting = {
            let (t, stop) = (t.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let stale = BackendId::new("stale");
                    t.put_unless_cleared(key("1.1.1.1"), stale, Instant::now(), before);
                }
            })
        };
        let seen = (0..200_000).find(|_| t.get(&key("1.1.1.1"), Instant::now()).is_some());
        stop.store(true, Ordering::Relaxed);
        putting.join().unwrap();
        assert_eq!(seen, None);
        assert_eq!(t.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn ttl_expires_and_refreshes_on_use() {
        let t = BindingTable::new(Duration::from_secs(10));
        let b = BackendId::new("b1");
        t.put(key("1.1.1.1"), b.clone(), Instant::now());
        tokio::time::advance(Duration::from_secs(8)).await;
        assert_eq!(t.get(&key("1.1.1.1"), Instant::now()), Some(b.clone()));
        // Refreshed at t=8, so alive at t=17 ...
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(t.get(&key("1.1.1.1"), Instant::now()), Some(b));
        // ... and gone 10 s after the last use.
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(t.get(&key("1.1.1.1"), Instant::now()), None);
        assert_eq!(t.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn purge_drops_only_expired() {
        let t = BindingTable::new(Duration::from_secs(10));
        t.put(key("1.1.1.1"), BackendId::new("a"), Instant::now());
        tokio::time::advance(Duration::from_secs(6)).await;
        t.put(key("2.2.2.2"), BackendId::new("b"), Instant::now());
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(t.purge_expired(Instant::now()), 1);
        assert_eq!(t.len(), 1);
        assert!(t.get(&key("2.2.2.2"), Instant::now()).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn the_cap_evicts_the_least_recently_used() {
        let t = BindingTable::with_cap(Duration::from_secs(600), 160);
        let ip = |i: u32| BindingKey {
            client: IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i)),
            app: None,
        };
        for i in 0..1000 {
            t.put(ip(i), BackendId::new("b"), Instant::now());
            tokio::time::advance(Duration::from_millis(10)).await;
            assert!(t.len() <= 160, "{} bindings", t.len());
        }
        assert!(t.evicted() >= 1000 - 160, "{}", t.evicted());
        assert_eq!(t.len() as u64 + t.evicted(), 1000);
        // The newest are kept.
        assert!(t.get(&ip(999), Instant::now()).is_some());
        assert!(t.get(&ip(0), Instant::now()).is_none());
    }

    #[test]
    fn pages_are_ordered_and_complete() {
        let t = BindingTable::new(Duration::from_secs(10));
        let now = Instant::now();
        for i in (0..50u8).rev() {
            t.put(key(&format!("10.0.0.{i}")), BackendId::new("b"), now);
        }
        let mut seen = Vec::new();
        for offset in (0..50).step_by(7) {
            let (total, page) = t.page(offset, 7, now);
            assert_eq!(total, 50);
            seen.extend(page.into_iter().map(|e| e.key.client));
        }
        let expected: Vec<IpAddr> = (0..50u8)
            .map(|i| format!("10.0.0.{i}").parse().unwrap())
            .collect();
        assert_eq!(seen, expected);
    }

    #[test]
    fn apps_bind_separately() {
        let t = BindingTable::new(Duration::from_secs(10));
        let now = Instant::now();
        let web = BindingKey {
            client: "1.1.1.1".parse().unwrap(),
            app: Some("web".into()),
        };
        t.put(web.clone(), BackendId::new("w"), now);
        assert_eq!(t.get(&key("1.1.1.1"), now), None);
        assert_eq!(t.get(&web, now), Some(BackendId::new("w")));
    }
}
