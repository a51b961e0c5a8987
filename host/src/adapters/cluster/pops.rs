//! The fleet's POPs as the DNS server answers them: who is alive from SWIM, each POP's
//! region from its policy report, and its front-name addresses and draining flag from
//! the front record it publishes (only POPs with front addresses publish one).

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::Cluster;
use crate::domain::dns::Pop;
use crate::domain::ports::PopDirectory;
use crate::domain::rollout::{FleetValue, PopFront};

/// A lookup rebuilds the list at most this often (SWIM's own detection takes seconds).
const FRESH: Duration = Duration::from_millis(200);

pub struct ClusterPops {
    cluster: Cluster,
    region: String,
    /// This POP's front record, once published (front addresses configured).
    front: Mutex<Option<PopFront>>,
    cached: Mutex<Option<(Instant, Arc<Vec<Pop>>)>>,
}

impl ClusterPops {
    pub fn new(cluster: Cluster, region: String) -> Self {
        Self {
            cluster,
            region,
            front: Mutex::default(),
            cached: Mutex::default(),
        }
    }

    /// Publishes this POP's front addresses (fleet-wide), or that it is draining: other
    /// POPs stop giving it out as soon as the record reaches them.
    pub async fn publish_front(&self, addrs: Vec<IpAddr>, draining: bool) -> Result<(), String> {
        let front = PopFront {
            pop: self.cluster.inner.identity.name.clone(),
            region: self.region.clone(),
            addrs,
            draining,
        };
        *self.front.lock().expect("front lock") = Some(front.clone());
        *self.cached.lock().expect("pops cache lock") = None;
        let work = self
            .cluster
            .inner
            .clone()
            .publish_own(FleetValue::Front(front));
        self.cluster
            .inner
            .on_cluster(work)
            .await
            .unwrap_or_else(|| Err("the cluster is stopping".into()))
    }

    fn build(&self) -> Vec<Pop> {
        let inner = &self.cluster.inner;
        let records = inner.fleet.records();
        let region_of = |name: &str| {
            records.records.iter().find_map(|r| match &r.value {
                FleetValue::Pop(p) if p.pop == name => Some(p.region.clone()),
                FleetValue::Front(f) if f.pop == name => Some(f.region.clone()),
                _ => None,
            })
        };
        let front_of = |name: &str| {
            records.records.iter().find_map(|r| match &r.value {
                FleetValue::Front(f) if f.pop == name => Some(f.clone()),
                _ => None,
            })
        };
        let own = self.front.lock().expect("front lock").clone();
        let mut pops = vec![Pop {
            name: inner.identity.name.clone(),
            region: self.region.clone(),
            overlay: inner.identity.transport.ip(),
            public: own.as_ref().map(|f| f.addrs.clone()).unwrap_or_default(),
            alive: true,
            draining: own.is_some_and(|f| f.draining),
        }];
        for m in inner.members.borrow().iter() {
            let front = front_of(&m.id.name);
            let Some(region) = region_of(&m.id.name) else {
                // No report yet: its region is unknown, so it is in no region's answer.
                continue;
            };
            pops.push(Pop {
                name: m.id.name.clone(),
                region,
                overlay: m.id.transport.ip(),
                public: front.as_ref().map(|f| f.addrs.clone()).unwrap_or_default(),
                alive: m.state == foca::State::Alive,
                draining: front.is_some_and(|f| f.draining),
            });
        }
        pops
    }
}

impl Cluster {
    /// Removes this POP's front record, for a POP that gives no front addresses now (its
    /// front name turned off since the record was published).
    pub async fn withdraw_front(&self) -> Result<(), String> {
        let key = format!("front/{}", self.inner.identity.name);
        let work = self.inner.clone().withdraw_own(key);
        self.inner
            .on_cluster(work)
            .await
            .unwrap_or_else(|| Err("the cluster is stopping".into()))
    }
}

impl PopDirectory for ClusterPops {
    fn pops(&self) -> Arc<Vec<Pop>> {
        let now = Instant::now();
        let mut cached = self.cached.lock().expect("pops cache lock");
        if let Some((at, pops)) = &*cached
            && now.duration_since(*at) < FRESH
        {
            return Arc::clone(pops);
        }
        let pops = Arc::new(self.build());
        *cached = Some((now, Arc::clone(&pops)));
        pops
    }
}
