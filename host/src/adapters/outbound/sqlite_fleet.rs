//! The fleet's policy records (deployments, POP reports) and the components they name, in
//! a SQLite file of their own beside the routing file (`<db>.fleet`): a POP report changes
//! with every fault count, and the proxy must not reload its routing table for that.
//!
//! Components are stored by SHA-256 and checked against it whenever they are read, so a
//! file corrupted on disk is refused like one corrupted in transit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension as _, params};

use crate::domain::replication::{Clock, ClockAhead, Hlc, NodeId, Version};
use crate::domain::rollout::{self, FleetRecord, FleetValue, content_hash as sha256_hex};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS records (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS components (hash TEXT PRIMARY KEY, bytes BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value);
";

#[derive(Debug, thiserror::Error)]
#[error("fleet policy store {path}: {reason}")]
pub struct FleetStoreError {
    pub path: String,
    pub reason: String,
}

/// What applying records from a peer did.
#[derive(Debug, Default)]
pub struct AppliedRecords {
    pub applied: Vec<FleetRecord>,
    /// (key, reason)
    pub rejected: Vec<(String, String)>,
    pub ahead: Vec<(String, ClockAhead)>,
}

pub struct SqliteFleet {
    path: PathBuf,
    conn: Connection,
    node: NodeId,
    clock: Clock,
    records: BTreeMap<String, FleetRecord>,
    /// Bumped by every record stored, so a caller tells a change without comparing.
    generation: u64,
}

/// The fleet file that goes with the routing file at `db`.
pub fn path_for(db: &Path) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push(".fleet");
    PathBuf::from(p)
}

impl SqliteFleet {
    /// Opens (creating) the store for node `node`; its clock restarts past its last reading.
    pub fn open(path: &Path, node: NodeId, max_skew: Duration) -> Result<Self, FleetStoreError> {
        let err = |e: rusqlite::Error| FleetStoreError {
            path: path.display().to_string(),
            reason: e.to_string(),
        };
        let conn = super::sqlite_routing::open_writer(path, SCHEMA).map_err(err)?;
        let last: Option<i64> = conn
            .query_row("SELECT value FROM state WHERE key = 'last_hlc'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(err)?;
        let mut records = BTreeMap::new();
        let mut stmt = conn
            .prepare("SELECT key, value FROM records")
            .map_err(err)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
            })
            .map_err(err)?;
        for row in rows {
            let (key, value) = row.map_err(err)?;
            match postcard::from_bytes::<FleetRecord>(&value) {
                Ok(r) => {
                    records.insert(key, r);
                }
                // Anti-entropy brings a good copy back from a peer.
                Err(e) => tracing::warn!(key, "fleet store: dropping an unreadable record: {e}"),
            }
        }
        drop(stmt);
        let mut fleet = Self {
            path: path.to_owned(),
            conn,
            node,
            clock: Clock::new(Hlc(last.unwrap_or(0) as u64), max_skew.as_millis() as u64),
            records,
            generation: 0,
        };
        // Stored by an older build: records its peers would now refuse, and deployments
        // the fleet has retired, go here too, or this POP's set would never match theirs.
        let refused: Vec<String> = fleet
            .records
            .iter()
            .filter_map(|(k, r)| r.validate().err().map(|e| (k, e)))
            .map(|(k, e)| {
                tracing::warn!(key = %k, "fleet store: dropping a stored record that fails its checks: {e}");
                k.clone()
            })
            .collect();
        fleet.remove(&refused)?;
        fleet.retire()?;
        Ok(fleet)
    }

    fn err(&self, e: rusqlite::Error) -> FleetStoreError {
        FleetStoreError {
            path: self.path.display().to_string(),
            reason: e.to_string(),
        }
    }

    pub fn node(&self) -> NodeId {
        self.node
    }

    pub fn records(&self) -> impl Iterator<Item = &FleetRecord> {
        self.records.values()
    }

    pub fn digest(&self) -> u64 {
        rollout::digest(self.records.values())
    }

    fn store(&mut self, r: FleetRecord) -> rusqlite::Result<()> {
        let key = r.value.key();
        self.conn.execute(
            "INSERT OR REPLACE INTO records VALUES (?1, ?2)",
            params![key, postcard::to_stdvec(&r).expect("a record serializes")],
        )?;
        self.records.insert(key, r);
        self.generation += 1;
        Ok(())
    }

    fn remove(&mut self, keys: &[String]) -> Result<(), FleetStoreError> {
        for key in keys {
            self.conn
                .execute("DELETE FROM records WHERE key = ?1", [key])
                .map_err(|e| self.err(e))?;
            self.records.remove(key);
            self.generation += 1;
        }
        Ok(())
    }

    /// Drops the deployments the fleet no longer needs ([`rollout::retired`]); every POP
    /// drops the same ones, so one that comes back from a peer goes again.
    fn retire(&mut self) -> Result<(), FleetStoreError> {
        let retired: Vec<String> = rollout::retired(&rollout::deployments(self.records.values()))
            .into_iter()
            .map(|id| format!("deployment/{id}"))
            .collect();
        if !retired.is_empty() {
            self.remove(&retired)?;
            self.collect_garbage()?;
        }
        Ok(())
    }

    /// Sets a POP's own record at `key` (`pop/NAME`, its report; `front/NAME`, its front
    /// addresses) to what that POP itself answered (`None`: it has none), whatever the
    /// versions say: a POP is the authority on its own records, even one whose store was
    /// lost or whose clock went back. True when something changed.
    pub fn take_own(
        &mut self,
        key: &str,
        report: Option<FleetRecord>,
    ) -> Result<bool, FleetStoreError> {
        let key = key.to_owned();
        match report {
            Some(r) if r.value.key() == key && r.validate().is_ok() => {
                if self.records.get(&key) == Some(&r) {
                    return Ok(false);
                }
                self.store(r).map_err(|e| self.err(e))?;
                Ok(true)
            }
            Some(_) => Ok(false),
            None if self.records.contains_key(&key) => {
                self.remove(&[key])?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Drops the reports of `pops` (gone from the fleet); returns how many there were.
    pub fn forget_reports(&mut self, pops: &[String]) -> Result<usize, FleetStoreError> {
        let keys: Vec<String> = pops
            .iter()
            .flat_map(|p| [format!("pop/{p}"), format!("front/{p}")])
            .filter(|k| self.records.contains_key(k))
            .collect();
        self.remove(&keys)?;
        Ok(keys.len())
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// A fresh version for a local write (persisted before it is used).
    pub fn next_version(&mut self, wall_ms: u64) -> Result<Version, FleetStoreError> {
        let hlc = self.clock.tick(wall_ms);
        self.conn
            .execute(
                "INSERT OR REPLACE INTO state VALUES ('last_hlc', ?1)",
                [hlc.0 as i64],
            )
            .map_err(|e| self.err(e))?;
        Ok(Version {
            hlc,
            node: self.node,
        })
    }

    /// Writes `value` locally with `version` (from [`Self::next_version`]), checked as a
    /// peer would check it: a record this POP writes is one every peer takes.
    pub fn write(
        &mut self,
        version: Version,
        value: FleetValue,
    ) -> Result<FleetRecord, FleetStoreError> {
        let r = FleetRecord { version, value };
        r.validate().map_err(|reason| FleetStoreError {
            path: self.path.display().to_string(),
            reason: format!("record {}: {reason}", r.value.key()),
        })?;
        self.store(r.clone()).map_err(|e| self.err(e))?;
        self.retire()?;
        Ok(r)
    }

    /// Merges records from a peer: invalid ones and ones from a clock too far ahead are
    /// refused, the rest win or lose by version.
    pub fn apply(
        &mut self,
        incoming: Vec<FleetRecord>,
        wall_ms: u64,
    ) -> Result<AppliedRecords, FleetStoreError> {
        let mut out = AppliedRecords::default();
        for r in incoming {
            let key = r.value.key();
            if let Err(reason) = r.validate() {
                out.rejected.push((key, reason));
                continue;
            }
            if let Err(a) = self.clock.observe(r.version.hlc, wall_ms) {
                out.ahead.push((key, a));
                continue;
            }
            if r.supersedes(self.records.get(&key)) {
                self.store(r.clone()).map_err(|e| self.err(e))?;
                out.applied.push(r);
            }
        }
        if !out.applied.is_empty() {
            self.retire()?;
        }
        Ok(out)
    }

    pub fn has_component(&self, hash: &str) -> bool {
        self.conn
            .query_row("SELECT 1 FROM components WHERE hash = ?1", [hash], |_| {
                Ok(())
            })
            .optional()
            .ok()
            .flatten()
            .is_some()
    }

    /// Stores a component under its hash; refuses bytes that do not match it.
    pub fn put_component(&mut self, hash: &str, bytes: &[u8]) -> Result<(), String> {
        let actual = sha256_hex(bytes);
        if actual != hash {
            return Err(format!(
                "component does not match its hash: expected {hash}, got {actual}"
            ));
        }
        self.conn
            .execute(
                "INSERT OR REPLACE INTO components VALUES (?1, ?2)",
                params![hash, bytes],
            )
            .map(drop)
            .map_err(|e| self.err(e).to_string())
    }

    /// The whole component, checked against its hash (a mismatch is an error).
    pub fn component(&self, hash: &str) -> Result<Option<Vec<u8>>, String> {
        let bytes: Option<Vec<u8>> = self
            .conn
            .query_row(
                "SELECT bytes FROM components WHERE hash = ?1",
                [hash],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e).to_string())?;
        match bytes {
            Some(b) if sha256_hex(&b) != hash => Err(format!(
                "the stored copy of component {hash} does not match its hash (got {}): \
                 corrupted on disk",
                sha256_hex(&b)
            )),
            other => Ok(other),
        }
    }

    /// `len` bytes from `offset` of a stored component, and its total size (served to
    /// peers unchecked: they check the whole against the hash). Read from the blob in
    /// place, so serving a chunk never loads the whole component.
    pub fn chunk(
        &self,
        hash: &str,
        offset: u64,
        len: usize,
    ) -> Result<Option<(u64, Vec<u8>)>, String> {
        let err = |e: rusqlite::Error| self.err(e).to_string();
        let rowid: Option<i64> = self
            .conn
            .query_row(
                "SELECT rowid FROM components WHERE hash = ?1",
                [hash],
                |r| r.get(0),
            )
            .optional()
            .map_err(err)?;
        let Some(rowid) = rowid else {
            return Ok(None);
        };
        let blob = self
            .conn
            .blob_open(rusqlite::MAIN_DB, "components", "bytes", rowid, true)
            .map_err(err)?;
        let total = blob.len() as u64;
        let from = offset.min(total) as usize;
        let mut bytes = vec![0u8; len.min(total as usize - from)];
        blob.read_at_exact(&mut bytes, from).map_err(err)?;
        Ok(Some((total, bytes)))
    }

    /// Drops components no standing deployment names; returns how many.
    pub fn collect_garbage(&mut self) -> Result<usize, FleetStoreError> {
        let keep: Vec<String> = rollout::deployments(self.records.values())
            .into_iter()
            .filter(|d| !d.revoked)
            .map(|d| d.hash.clone())
            .collect();
        let hashes: Vec<String> = {
            let mut stmt = self
                .conn
                .prepare("SELECT hash FROM components")
                .map_err(|e| self.err(e))?;
            let rows = stmt.query_map([], |r| r.get(0)).map_err(|e| self.err(e))?;
            rows.collect::<rusqlite::Result<_>>()
                .map_err(|e| self.err(e))?
        };
        let mut dropped = 0;
        for h in hashes.iter().filter(|h| !keep.contains(h)) {
            dropped += self
                .conn
                .execute("DELETE FROM components WHERE hash = ?1", [h])
                .map_err(|e| self.err(e))?;
        }
        Ok(dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::rollout::{Deployment, Role, Targets};

    fn open(dir: &tempfile::TempDir) -> SqliteFleet {
        SqliteFleet::open(
            &dir.path().join("r.db.fleet"),
            NodeId(7),
            Duration::from_secs(60),
        )
        .unwrap()
    }

    #[test]
    fn components_are_checked_against_their_hash_on_the_way_in_and_out() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = open(&dir);
        let bytes = b"not really wasm".to_vec();
        let hash = sha256_hex(&bytes);
        assert!(
            f.put_component(&"0".repeat(64), &bytes)
                .unwrap_err()
                .contains("does not match")
        );
        f.put_component(&hash, &bytes).unwrap();
        assert_eq!(f.component(&hash).unwrap().unwrap(), bytes);
        assert_eq!(
            f.chunk(&hash, 4, 6).unwrap().unwrap(),
            (15, b"really".to_vec())
        );
        // Corrupted on disk: refused when read.
        f.conn
            .execute(
                "UPDATE components SET bytes = x'00' WHERE hash = ?1",
                [&hash],
            )
            .unwrap();
        assert!(
            f.component(&hash)
                .unwrap_err()
                .contains("corrupted on disk")
        );
        // A good copy (fetched from a peer) replaces the corrupt one.
        f.put_component(&hash, &bytes).unwrap();
        assert_eq!(f.component(&hash).unwrap().unwrap(), bytes);
        assert_eq!(
            f.chunk(&hash, 11, 100).unwrap().unwrap(),
            (15, b"wasm".to_vec())
        );
        assert_eq!(f.chunk(&hash, 99, 4).unwrap().unwrap(), (15, Vec::new()));
        assert_eq!(f.chunk(&"1".repeat(64), 0, 4).unwrap(), None);
    }

    #[test]
    fn peers_records_merge_by_version_and_bad_ones_are_refused_with_the_reason() {
        use crate::domain::rollout::PopPolicies;
        let dir = tempfile::tempdir().unwrap();
        let mut f = open(&dir);
        let report = |hlc: u64, region: &str| FleetRecord {
            version: Version {
                hlc: Hlc::from_millis(hlc),
                node: NodeId(9),
            },
            value: FleetValue::Pop(PopPolicies {
                pop: "b".into(),
                region: region.into(),
                ..Default::default()
            }),
        };
        let wall = 1_000_000;
        let out = f
            .apply(vec![report(wall - 5, "eu"), report(wall - 9, "us")], wall)
            .unwrap();
        assert_eq!(
            out.applied.len(),
            1,
            "the older write loses whatever the order"
        );
        let mut bad = report(wall, "eu");
        if let FleetValue::Pop(p) = &mut bad.value {
            p.pop = String::new();
        }
        let far = report(wall + 3_600_000, "ap");
        let out = f.apply(vec![bad, far], wall).unwrap();
        assert!(out.applied.is_empty());
        assert!(out.rejected[0].1.contains("POP name"), "{:?}", out.rejected);
        assert_eq!(out.ahead.len(), 1);
        let kept: Vec<_> = f.records().collect();
        assert!(matches!(&kept[0].value, FleetValue::Pop(p) if p.region == "eu"));
        // Every string is bounded, and a local write is checked as a peer's is.
        let mut long = report(wall, &"x".repeat(300));
        let out = f.apply(vec![long.clone()], wall).unwrap();
        assert!(out.rejected[0].1.contains("region"), "{:?}", out.rejected);
        let err = f.write(long.version, long.value.clone()).unwrap_err();
        assert!(err.reason.contains("region is 300 bytes"), "{}", err.reason);
        if let FleetValue::Pop(p) = &mut long.value {
            p.region = "eu".into();
            p.live = Some(crate::domain::rollout::Running {
                name: "n".repeat(1000),
                hash: String::new(),
                since: String::new(),
                deployment: None,
                faults: 0,
            });
        }
        assert!(
            f.apply(vec![long], wall).unwrap().rejected[0]
                .1
                .contains("name")
        );
        // A report of a POP gone from the fleet can be dropped.
        assert_eq!(f.forget_reports(&["c".to_owned()]).unwrap(), 0);
        assert_eq!(f.forget_reports(&["b".to_owned()]).unwrap(), 1);
        assert_eq!(f.records().count(), 0);
        assert!(
            open(&dir).records().next().is_none(),
            "forgotten on disk too"
        );
    }

    #[test]
    fn a_pops_front_record_is_what_it_says_and_leaves_with_it() {
        use crate::domain::rollout::PopFront;
        let dir = tempfile::tempdir().unwrap();
        let mut f = open(&dir);
        let front = |hlc: u64, draining: bool| FleetRecord {
            version: Version {
                hlc: Hlc::from_millis(hlc),
                node: NodeId(9),
            },
            value: FleetValue::Front(PopFront {
                pop: "b".into(),
                region: "eu".into(),
                addrs: vec!["192.0.2.1".parse().unwrap()],
                draining,
            }),
        };
        f.apply(vec![front(2_000, false)], 10_000).unwrap();
        // An older record from the POP itself (its store lost) replaces a newer one; none
        // removes it; a front of more than 8 addresses is refused.
        assert!(f.take_own("front/b", Some(front(1_000, true))).unwrap());
        assert!(matches!(&f.records().next().unwrap().value, FleetValue::Front(p) if p.draining));
        assert!(f.take_own("front/b", None).unwrap());
        assert_eq!(f.records().count(), 0);
        let mut many = front(3_000, false);
        if let FleetValue::Front(p) = &mut many.value {
            p.addrs = vec!["192.0.2.1".parse().unwrap(); 9];
        }
        assert!(
            f.apply(vec![many], 10_000).unwrap().rejected[0]
                .1
                .contains("9 front addresses")
        );
        f.apply(vec![front(4_000, false)], 10_000).unwrap();
        assert_eq!(f.forget_reports(&["b".to_owned()]).unwrap(), 1);
    }

    #[test]
    fn retired_deployments_leave_the_store_as_they_arrive() {
        use crate::domain::rollout::{DEPLOYMENTS_KEPT, Deployment, Role, Targets};
        let dir = tempfile::tempdir().unwrap();
        let mut f = open(&dir);
        let wall = 1_000_000;
        let dep = |i: u64, everywhere: bool| FleetRecord {
            version: Version {
                hlc: Hlc::from_millis(wall - 1000 + i),
                node: NodeId(9),
            },
            value: FleetValue::Deployment(Deployment {
                id: format!("d{i}"),
                role: Role::Live,
                hash: "a".repeat(64),
                name: "p.wasm".into(),
                size: 1,
                targets: match everywhere {
                    true => Targets::default(),
                    false => Targets {
                        pops: vec!["a".into()],
                        regions: vec![],
                    },
                },
                created: Version {
                    hlc: Hlc::from_millis(wall - 1000 + i),
                    node: NodeId(9),
                },
                by: "b".into(),
                revoked: false,
            }),
        };
        // A canary, then deployments to every POP arriving one by one.
        f.apply(vec![dep(0, false)], wall).unwrap();
        let n = DEPLOYMENTS_KEPT as u64;
        for i in 1..n {
            f.apply(vec![dep(i, true)], wall).unwrap();
        }
        assert_eq!(f.records().count(), n as usize, "nothing retired yet");
        f.apply(vec![dep(n, true)], wall).unwrap();
        assert!(!f.records().any(|r| r.value.key() == "deployment/d0"));
        // Offered again by a peer that has not dropped it: gone again.
        let out = f.apply(vec![dep(0, false)], wall).unwrap();
        assert_eq!(out.applied.len(), 1);
        assert!(!f.records().any(|r| r.value.key() == "deployment/d0"));
        assert_eq!(f.records().count(), n as usize);
        // A file that still holds one (written before the rule) drops it when opened.
        let held = f.records().count();
        f.store(dep(0, false)).unwrap();
        drop(f);
        assert_eq!(open(&dir).records().count(), held);
    }

    #[test]
    fn records_survive_a_restart_and_unnamed_components_are_collected() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = open(&dir);
        let (a, b) = (b"a".to_vec(), b"b".to_vec());
        let (ha, hb) = (sha256_hex(&a), sha256_hex(&b));
        f.put_component(&ha, &a).unwrap();
        f.put_component(&hb, &b).unwrap();
        let v = f.next_version(1_000).unwrap();
        let d = Deployment {
            id: "d1".into(),
            role: Role::Live,
            hash: ha.clone(),
            name: "a.wasm".into(),
            size: 1,
            targets: Targets::default(),
            created: v,
            by: "a".into(),
            revoked: false,
        };
        f.write(v, FleetValue::Deployment(d)).unwrap();
        assert_eq!(f.collect_garbage().unwrap(), 1);
        let digest = f.digest();
        drop(f);
        let f = open(&dir);
        assert_eq!(f.digest(), digest);
        assert!(f.has_component(&ha) && !f.has_component(&hb));
    }
}
