//! A bounded, sampled ring of recent policy decisions with what the policy saw: the
//! client (its address truncated unless asked otherwise), the candidates with their live
//! numbers, the table version and the pick. Exported as JSON lines (`GET /decisions`)
//! and replayed offline against another component (`edgeproxy policy replay`).
//!
//! Bounded in records and in bytes: a record keeps at most [`MAX_CANDIDATES`] candidates
//! (the pick always among them), and the ring drops its oldest records past `max_bytes`.
//! The data path only pushes an `Arc` under the lock; `GET /decisions` copies the `Arc`s
//! and serialises without it.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
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
    /// The TLS server name and ALPN the policy was told (TLS listeners).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alpn: Vec<String>,
    pub app: Option<String>,
    pub pop_region: String,
    pub table_version: u64,
    /// In the order of the table (at most [`MAX_CANDIDATES`]), those down here too
    /// (marked; a policy is not offered them).
    pub candidates: Vec<RecordedCandidate>,
    /// Candidates the policy got that were not recorded (a replay skips such a record).
    #[serde(default)]
    pub omitted: usize,
    /// The id picked; None when the policy refused.
    pub pick: Option<String>,
}

/// Candidates one record keeps: at 10,000 backends a record of all of them was ~0.6 MB.
pub const MAX_CANDIDATES: usize = 256;

impl DecisionRecord {
    /// About what the record holds in memory.
    fn bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.at.len()
            + self.app.as_ref().map_or(0, String::len)
            + self.sni.as_ref().map_or(0, String::len)
            + self.alpn.iter().map(|p| 24 + p.len()).sum::<usize>()
            + self.pop_region.len()
            + self
                .candidates
                .iter()
                .map(|c| std::mem::size_of::<RecordedCandidate>() + c.id.len())
                .sum::<usize>()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedCandidate {
    pub id: String,
    pub active: u32,
    pub rtt_us: u64,
    /// False when this POP's checks or ejection had it down (written only then).
    #[serde(default = "yes", skip_serializing_if = "Clone::clone")]
    pub up: bool,
}

fn yes() -> bool {
    true
}

struct Ring {
    records: VecDeque<Arc<DecisionRecord>>,
    bytes: usize,
}

pub struct DecisionLog {
    ring: Mutex<Ring>,
    size: usize,
    max_bytes: usize,
    sample_percent: u32,
    truncate: bool,
}

impl DecisionLog {
    pub fn new(size: usize, max_bytes: usize, sample_percent: u32, truncate: bool) -> Self {
        Self {
            ring: Mutex::new(Ring {
                records: VecDeque::with_capacity(size.min(4096)),
                bytes: 0,
            }),
            size,
            max_bytes,
            sample_percent,
            truncate,
        }
    }

    /// Records held now, and about how many bytes they take.
    pub fn held(&self) -> (usize, usize) {
        let ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        (ring.records.len(), ring.bytes)
    }

    /// Records the decision `pick` (an index into `candidates`), if sampled.
    pub fn record(&self, req: &PickRequest<'_>, candidates: &[RoutedBackend], pick: Option<usize>) {
        if self.size == 0 || fastrand::u32(0..100) >= self.sample_percent {
            return;
        }
        let tls = req.client.tls.as_deref();
        let record = DecisionRecord {
            at: timestamp(SystemTime::now()),
            client: match self.truncate {
                true => truncated(req.client.ip),
                false => req.client.ip,
            },
            country: req.client.country.map(|c| c.to_string()),
            region: req.client.region.as_ref().map(|r| r.to_string()),
            via_proxy_protocol: req.client.via_proxy_protocol,
            sni: tls.and_then(|t| t.sni.as_deref().map(str::to_owned)),
            alpn: tls.map_or_else(Vec::new, |t| {
                t.policy_alpn().iter().map(|p| p.to_string()).collect()
            }),
            app: req.app.map(str::to_owned),
            pop_region: req.pop_region.to_string(),
            table_version: req.table.version(),
            candidates: kept(candidates, pick)
                .map(|c| RecordedCandidate {
                    id: c.backend.id.to_string(),
                    active: c.stats.active(),
                    rtt_us: c.stats.rtt_us(),
                    up: c.up(),
                })
                .collect(),
            omitted: candidates.len().saturating_sub(MAX_CANDIDATES),
            pick: pick
                .and_then(|i| candidates.get(i))
                .map(|c| c.backend.id.to_string()),
        };
        let bytes = record.bytes();
        let record = Arc::new(record);
        // Poisoning: the ring is only pushed to and popped whole records.
        let mut ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        while !ring.records.is_empty()
            && (ring.records.len() >= self.size || ring.bytes + bytes > self.max_bytes)
        {
            if let Some(old) = ring.records.pop_front() {
                ring.bytes -= old.bytes();
            }
        }
        ring.bytes += bytes;
        ring.records.push_back(record);
    }

    /// The records, oldest first, as JSON lines (serialised without holding the lock the
    /// data path takes).
    pub fn json_lines(&self) -> String {
        let records: Vec<Arc<DecisionRecord>> = self
            .ring
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .records
            .iter()
            .cloned()
            .collect();
        records
            .iter()
            .filter_map(|r| serde_json::to_string(&**r).ok())
            .map(|l| l + "\n")
            .collect()
    }
}

/// The candidates a record keeps: all of them up to [`MAX_CANDIDATES`]; past it the first
/// ones and the pick wherever it was.
fn kept(candidates: &[RoutedBackend], pick: Option<usize>) -> impl Iterator<Item = &RoutedBackend> {
    let beyond = pick.filter(|i| *i >= MAX_CANDIDATES && *i < candidates.len());
    let first = match beyond {
        Some(_) => MAX_CANDIDATES - 1,
        None => MAX_CANDIDATES,
    };
    candidates
        .iter()
        .take(first)
        .chain(beyond.and_then(|i| candidates.get(i)))
}

/// The /24 of an IPv4 address, the /48 of an IPv6 one; a 6to4 address (2002::/16) carries
/// its client's IPv4 address in bits 16-48, so it is cut at /40 (that address's /24).
pub fn truncated(ip: IpAddr) -> IpAddr {
    let keep = |bits: u32| !(u128::MAX >> bits);
    match ip.to_canonical() {
        IpAddr::V4(v4) => std::net::Ipv4Addr::from_bits(v4.to_bits() & 0xffff_ff00).into(),
        IpAddr::V6(v6) if v6.segments()[0] == 0x2002 => {
            std::net::Ipv6Addr::from_bits(v6.to_bits() & keep(40)).into()
        }
        IpAddr::V6(v6) => std::net::Ipv6Addr::from_bits(v6.to_bits() & keep(48)).into(),
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
        // 6to4 for 203.0.113.7: the embedded address's /24.
        assert_eq!(
            truncated("2002:cb00:7107::1".parse().unwrap()),
            "2002:cb00:7100::".parse::<std::net::IpAddr>().unwrap()
        );
        assert_eq!(
            truncated("::ffff:203.0.113.77".parse().unwrap()),
            "203.0.113.0".parse::<std::net::IpAddr>().unwrap()
        );
    }

    #[test]
    fn the_log_is_bounded_in_bytes_and_candidates_whatever_the_table() {
        use super::*;
        use crate::domain::{Region, RoutingTable, sample};
        // 10,000 backends: every record would copy them all.
        let backends: Vec<_> = (0..10_000)
            .map(|i| crate::domain::Backend {
                id: crate::domain::BackendId::new(&format!("backend-{i:05}")),
                ..sample::backends("app")[0].clone()
            })
            .collect();
        let table = RoutingTable::new(1, backends, |_| std::sync::Arc::default());
        let client = sample::client_in_brazil();
        let pop = Region::new("sa");
        let req = PickRequest {
            table: &table,
            pop_region: &pop,
            app: Some("app"),
            client: &client,
        };
        // Exactly the cap: all kept, none omitted; one more: the cap kept, one omitted.
        let small = DecisionLog::new(10, 1 << 30, 100, true);
        for n in [MAX_CANDIDATES, MAX_CANDIDATES + 1] {
            small.record(&req, &table.backends()[..n], Some(3));
        }
        let lines = small.json_lines();
        let r: Vec<DecisionRecord> = lines
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!((r[0].candidates.len(), r[0].omitted), (MAX_CANDIDATES, 0));
        assert_eq!((r[1].candidates.len(), r[1].omitted), (MAX_CANDIDATES, 1));
        let log = DecisionLog::new(1000, 1 << 20, 100, true);
        for _ in 0..1000 {
            log.record(&req, table.backends(), Some(9_999));
        }
        let (records, bytes) = log.held();
        assert!(bytes <= 1 << 20, "{bytes}");
        assert!(records > 10 && records < 1000, "{records}");
        let line = log.json_lines();
        let first: DecisionRecord = serde_json::from_str(line.lines().next().unwrap()).unwrap();
        assert_eq!(first.candidates.len(), MAX_CANDIDATES);
        assert_eq!(first.omitted, 10_000 - MAX_CANDIDATES);
        assert_eq!(first.candidates.last().unwrap().id, "backend-09999");
        assert_eq!(first.pick.as_deref(), Some("backend-09999"));
    }
}
