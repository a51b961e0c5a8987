//! Sticky bindings in a DashMap: client (IP, app) -> backend, with a TTL refreshed on use.
//! Expiry is lazy on read and swept by the GC task; time comes from the caller so tests
//! drive it with paused tokio time.

use std::net::IpAddr;
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

#[derive(Debug)]
pub struct BindingTable {
    ttl: Duration,
    map: DashMap<BindingKey, Binding>,
}

impl BindingTable {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            map: DashMap::new(),
        }
    }
}

impl BindingRepository for BindingTable {
    fn get(&self, key: &BindingKey, now: Instant) -> Option<BackendId> {
        let mut entry = self.map.get_mut(key)?;
        if entry.expires <= now {
            drop(entry);
            // Only remove it if nobody refreshed it in between.
            self.map.remove_if(key, |_, b| b.expires <= now);
            return None;
        }
        entry.expires = now + self.ttl;
        Some(entry.backend.clone())
    }

    fn put(&self, key: BindingKey, backend: BackendId, now: Instant) {
        self.map.insert(
            key,
            Binding {
                backend,
                expires: now + self.ttl,
            },
        );
    }

    fn remove(&self, key: &BindingKey) {
        self.map.remove(key);
    }

    fn purge_expired(&self, now: Instant) -> usize {
        let before = self.map.len();
        self.map.retain(|_, b| b.expires > now);
        before.saturating_sub(self.map.len())
    }

    fn page(&self, offset: usize, limit: usize, now: Instant) -> (usize, Vec<BindingEntry>) {
        let mut live: Vec<BindingEntry> = self
            .map
            .iter()
            .filter(|e| e.expires > now)
            .map(|e| BindingEntry {
                key: e.key().clone(),
                backend: e.backend.clone(),
                expires_in: e.expires - now,
            })
            .collect();
        live.sort_unstable_by(|a, b| (a.key.client, &a.key.app).cmp(&(b.key.client, &b.key.app)));
        let total = live.len();
        (total, live.into_iter().skip(offset).take(limit).collect())
    }

    fn remove_client(&self, client: IpAddr) -> usize {
        let before = self.map.len();
        self.map.retain(|k, _| k.client != client);
        before.saturating_sub(self.map.len())
    }

    fn len(&self) -> usize {
        self.map.len()
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
