//! A bounded, sampled ring of recent policy decisions with what the policy saw: the
//! client (its address truncated unless asked otherwise), the candidates with their live
//! numbers, the table version and the pick. Exported as JSON lines (`GET /decisions`)
//! and replayed offline against another component (`edgeproxy policy replay`).

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::domain::RoutedBackend;
use crate::domain::ports::{PickRequest, timestamp};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecisionRecord {
    pub at: String,
    pub client: IpAddr,
    pub country: Option<String>,
    pub region: Option<String>,
    #[serde(default)]
    pub via_proxy_protocol: bool,
    pub app: Option<String>,
    pub pop_region: String,
    pub table_version: u64,
    /// In the order the policy got them.
    pub candidates: Vec<RecordedCandidate>,
    /// The id picked; None when the policy refused.
    pub pick: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedCandidate {
    pub id: String,
    pub active: u32,
    pub rtt_us: u64,
}

pub struct DecisionLog {
    ring: Mutex<VecDeque<DecisionRecord>>,
    size: usize,
    sample_percent: u32,
    truncate: bool,
}

impl DecisionLog {
    pub fn new(size: usize, sample_percent: u32, truncate: bool) -> Self {
        Self {
            ring: Mutex::new(VecDeque::with_capacity(size.min(4096))),
            size,
            sample_percent,
            truncate,
        }
    }

    /// Records the decision `pick` (an index into `candidates`), if sampled.
    pub fn record(&self, req: &PickRequest<'_>, candidates: &[RoutedBackend], pick: Option<usize>) {
        if self.size == 0 || fastrand::u32(0..100) >= self.sample_percent {
            return;
        }
        let record = DecisionRecord {
            at: timestamp(SystemTime::now()),
            client: match self.truncate {
                true => truncated(req.client.ip),
                false => req.client.ip,
            },
            country: req.client.country.map(|c| c.to_string()),
            region: req.client.region.as_ref().map(|r| r.to_string()),
            via_proxy_protocol: req.client.via_proxy_protocol,
            app: req.app.map(str::to_owned),
            pop_region: req.pop_region.to_string(),
            table_version: req.table.version(),
            candidates: candidates
                .iter()
                .map(|c| RecordedCandidate {
                    id: c.backend.id.to_string(),
                    active: c.stats.active(),
                    rtt_us: c.stats.rtt_us(),
                })
                .collect(),
            pick: pick
                .and_then(|i| candidates.get(i))
                .map(|c| c.backend.id.to_string()),
        };
        // Poisoning: the ring is only pushed to and popped whole records.
        let mut ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        if ring.len() == self.size {
            ring.pop_front();
        }
        ring.push_back(record);
    }

    /// The records, oldest first, as JSON lines.
    pub fn json_lines(&self) -> String {
        let ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        ring.iter()
            .filter_map(|r| serde_json::to_string(r).ok())
            .map(|l| l + "\n")
            .collect()
    }
}

/// The /24 of an IPv4 address, the /48 of an IPv6 one.
fn truncated(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => std::net::Ipv4Addr::from_bits(v4.to_bits() & 0xffff_ff00).into(),
        IpAddr::V6(v6) => std::net::Ipv6Addr::from_bits(v6.to_bits() & !((1u128 << 80) - 1)).into(),
    }
}

#[cfg(test)]
mod tests {
    use super::truncated;

    #[test]
    fn addresses_truncate_to_their_network() {
        assert_eq!(
            truncated("203.0.113.77".parse().unwrap()),
            "203.0.113.0".parse::<std::net::IpAddr>().unwrap()
        );
        assert_eq!(
            truncated("2001:db8:1:2:3::9".parse().unwrap()),
            "2001:db8:1::".parse::<std::net::IpAddr>().unwrap()
        );
    }
}
