//! Policies rolled out across the fleet: which component each POP should run as its live
//! and its shadow policy, and what each POP reports it runs.
//!
//! A deployment names a component by its SHA-256, a role and the POPs it is for (by name
//! or region; none named: every POP). Deployments are never edited, only revoked, so the
//! fleet keeps their history: a POP runs, for each role, the latest deployment that
//! selects it and is not revoked, else what its own configuration says. A rollout goes
//! one POP, then a region, then everywhere by deploying the same hash with wider targets;
//! a rollback revokes the latest deployment, and every POP it selected falls back to the
//! deployment before it (which may differ per POP) without anyone computing what that was.
//!
//! Deployments and POP reports are records of one small replicated keyspace, merged like
//! routing rows: the greater (version, record) wins.

use serde::{Deserialize, Serialize};

use super::replication::{Version, fnv1a};

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    #[default]
    Live,
    Shadow,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Live => "live",
            Role::Shadow => "shadow",
        })
    }
}

/// The POPs a deployment is for: those named, and those in the regions named; every POP
/// when both are empty.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Targets {
    pub pops: Vec<String>,
    pub regions: Vec<String>,
}

impl Targets {
    pub fn selects(&self, pop: &str, region: &str) -> bool {
        (self.pops.is_empty() && self.regions.is_empty())
            || self.pops.iter().any(|p| p == pop)
            || self.regions.iter().any(|r| r == region)
    }
}

impl std::fmt::Display for Targets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.pops.is_empty() && self.regions.is_empty() {
            return f.write_str("every POP");
        }
        let mut parts: Vec<String> = self.pops.iter().map(|p| format!("POP {p}")).collect();
        parts.extend(self.regions.iter().map(|r| format!("region {r}")));
        f.write_str(&parts.join(", "))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Deployment {
    /// Unique: the creating write's version, printed.
    pub id: String,
    pub role: Role,
    /// SHA-256 of the component, lowercase hex.
    pub hash: String,
    /// What the operator called it (the file name).
    pub name: String,
    pub size: u64,
    pub targets: Targets,
    /// Orders deployments: the version of the write that created it.
    pub created: Version,
    /// The POP it was deployed through.
    pub by: String,
    pub revoked: bool,
}

/// A policy as one POP runs it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Running {
    pub name: String,
    pub hash: String,
    /// RFC 3339.
    pub since: String,
    /// The deployment it came from; None: this POP's own configuration.
    pub deployment: Option<String>,
    /// Faults since it started serving here.
    pub faults: u64,
}

/// A deployment a POP would not run, and why (it keeps what it ran before).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Refusal {
    pub deployment: String,
    pub hash: String,
    pub cause: String,
    pub at: String,
}

/// What a POP reports it runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PopPolicies {
    pub pop: String,
    pub region: String,
    pub live: Option<Running>,
    pub shadow: Option<Running>,
    /// The most recent refusals, newest first.
    pub refused: Vec<Refusal>,
}

/// Refusals a POP keeps in its report.
pub const REFUSALS_KEPT: usize = 4;

/// Where a POP takes clients under the fleet's front name (DNS), and whether it still
/// does: a draining POP says so before it stops accepting.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PopFront {
    pub pop: String,
    pub region: String,
    pub addrs: Vec<std::net::IpAddr>,
    pub draining: bool,
}

/// Addresses one POP may give under the front name.
pub const FRONT_ADDRS: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum FleetValue {
    Deployment(Deployment),
    Pop(PopPolicies),
    Front(PopFront),
}

impl FleetValue {
    pub fn key(&self) -> String {
        match self {
            FleetValue::Deployment(d) => format!("deployment/{}", d.id),
            FleetValue::Pop(p) => format!("pop/{}", p.pop),
            FleetValue::Front(f) => format!("front/{}", f.pop),
        }
    }

    /// The POP a report or front record speaks for; None for a deployment (the fleet's).
    pub fn pop(&self) -> Option<&str> {
        match self {
            FleetValue::Deployment(_) => None,
            FleetValue::Pop(p) => Some(&p.pop),
            FleetValue::Front(f) => Some(&f.pop),
        }
    }
}

/// A record with the version of the write that made it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FleetRecord {
    pub version: Version,
    pub value: FleetValue,
}

impl FleetRecord {
    /// The routing rows' rule: greater (version, record) wins.
    pub fn supersedes(&self, current: Option<&FleetRecord>) -> bool {
        current.is_none_or(|c| self > c)
    }

    pub fn fingerprint(&self) -> u64 {
        fnv1a(&postcard::to_stdvec(self).expect("a record always serializes"))
    }

    /// What a record from a peer must be before it is stored.
    pub fn validate(&self) -> Result<(), String> {
        let short = |what: &str, s: &str| match s.len() {
            1..=256 => Ok(()),
            n => Err(format!("{what} is {n} bytes (1 to 256 allowed)")),
        };
        let at_most = |what: &str, s: &str| match s.len() {
            0..=256 => Ok(()),
            n => Err(format!("{what} is {n} bytes (at most 256)")),
        };
        let running = |r: &Option<Running>| match r {
            None => Ok(()),
            Some(r) => {
                at_most("a running policy's name", &r.name)?;
                at_most("a running policy's hash", &r.hash)?;
                at_most("a running policy's start", &r.since)?;
                at_most(
                    "a running policy's deployment",
                    r.deployment.as_deref().unwrap_or(""),
                )
            }
        };
        match &self.value {
            FleetValue::Deployment(d) => {
                short("deployment id", &d.id)?;
                short("component name", &d.name)?;
                at_most("deploying POP", &d.by)?;
                valid_hash(&d.hash)?;
                if d.targets.pops.len() + d.targets.regions.len() > MAX_TARGETS {
                    return Err(format!("more than {MAX_TARGETS} targets"));
                }
                d.targets
                    .pops
                    .iter()
                    .chain(&d.targets.regions)
                    .try_for_each(|t| match t.len() {
                        1..=64 => Ok(()),
                        n => Err(format!("a target is {n} bytes (1 to 64 allowed)")),
                    })
            }
            FleetValue::Front(f) => {
                short("POP name", &f.pop)?;
                at_most("region", &f.region)?;
                match f.addrs.len() {
                    0..=FRONT_ADDRS => Ok(()),
                    n => Err(format!("{n} front addresses ({FRONT_ADDRS} allowed)")),
                }
            }
            FleetValue::Pop(p) => {
                short("POP name", &p.pop)?;
                at_most("region", &p.region)?;
                running(&p.live)?;
                running(&p.shadow)?;
                if p.refused.len() > REFUSALS_KEPT {
                    return Err(format!("more than {REFUSALS_KEPT} refusals"));
                }
                p.refused.iter().try_for_each(|r| {
                    at_most("a refusal's deployment", &r.deployment)?;
                    at_most("a refusal's hash", &r.hash)?;
                    at_most("a refusal's time", &r.at)?;
                    match r.cause.len() {
                        0..=2048 => Ok(()),
                        n => Err(format!("a refusal's cause is {n} bytes (2048 allowed)")),
                    }
                })
            }
        }
    }
}

/// What names a component: the SHA-256 of its bytes, lowercase hex.
pub fn content_hash(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A component hash as deployments carry it: 64 lowercase hex digits.
pub fn valid_hash(h: &str) -> Result<(), String> {
    match h.len() == 64
        && h.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        true => Ok(()),
        false => Err(format!("{h:?} is not a SHA-256 (64 lowercase hex digits)")),
    }
}

/// XOR of the records' fingerprints: equal on two POPs exactly when they hold the same.
pub fn digest<'a>(records: impl IntoIterator<Item = &'a FleetRecord>) -> u64 {
    records.into_iter().fold(0, |d, r| d ^ r.fingerprint())
}

pub fn deployments<'a>(records: impl IntoIterator<Item = &'a FleetRecord>) -> Vec<&'a Deployment> {
    let mut out: Vec<&Deployment> = records
        .into_iter()
        .filter_map(|r| match &r.value {
            FleetValue::Deployment(d) => Some(d),
            _ => None,
        })
        .collect();
    out.sort_by_key(|d| d.created);
    out
}

/// What `pop` (in `region`) should run as `role`: the latest deployment for it that is not
/// revoked; None: its own configuration.
pub fn assignment<'a>(
    deployments: &[&'a Deployment],
    role: Role,
    pop: &str,
    region: &str,
) -> Option<&'a Deployment> {
    deployments
        .iter()
        .filter(|d| d.role == role && !d.revoked && d.targets.selects(pop, region))
        .max_by_key(|d| d.created)
        .copied()
}

/// POPs and regions one deployment may name; with [`DEPLOYMENTS_MAX`], this bounds what
/// a records round carries (a few MiB) so it needs no paging.
pub const MAX_TARGETS: usize = 64;

/// Rollbacks a fleet can always make: a deployment goes only once this many newer
/// unrevoked deployments of its role select every POP.
pub const DEPLOYMENTS_KEPT: usize = 32;
/// Deployments of a role a POP deploys beside: past this, a new one is refused until one
/// to every POP lets older ones go.
pub const DEPLOYMENTS_MAX: usize = 256;

/// The ids of deployments no POP can need any more: of each role, those with at least
/// [`DEPLOYMENTS_KEPT`] newer unrevoked deployments selecting every POP (each of those
/// outranks it at every POP, so it is no POP's assignment even after that many
/// rollbacks). Decided from the records alone, so every POP holding the same records
/// drops the same ones.
pub fn retired(deployments: &[&Deployment]) -> Vec<String> {
    let mut out = Vec::new();
    for role in [Role::Live, Role::Shadow] {
        let mut of_role: Vec<&Deployment> = deployments
            .iter()
            .filter(|d| d.role == role)
            .copied()
            .collect();
        of_role.sort_by_key(|d| std::cmp::Reverse(d.created));
        let mut everywhere = 0;
        for d in of_role {
            if everywhere >= DEPLOYMENTS_KEPT {
                out.push(d.id.clone());
            }
            if !d.revoked && d.targets == Targets::default() {
                everywhere += 1;
            }
        }
    }
    out
}

/// The deployment a rollback of `role` revokes: the latest one standing.
pub fn latest<'a>(deployments: &[&'a Deployment], role: Role) -> Option<&'a Deployment> {
    deployments
        .iter()
        .filter(|d| d.role == role && !d.revoked)
        .max_by_key(|d| d.created)
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::replication::{Hlc, NodeId};

    fn dep(id: u64, role: Role, hash: char, pops: &[&str], regions: &[&str]) -> Deployment {
        Deployment {
            id: id.to_string(),
            role,
            hash: hash.to_string().repeat(64),
            name: "p.wasm".into(),
            size: 1,
            targets: Targets {
                pops: pops.iter().map(|s| s.to_string()).collect(),
                regions: regions.iter().map(|s| s.to_string()).collect(),
            },
            created: Version {
                hlc: Hlc(id),
                node: NodeId(1),
            },
            by: "a".into(),
            revoked: false,
        }
    }

    #[test]
    fn deployments_are_retired_only_where_no_pop_or_rollback_can_reach_them() {
        let ids = |ds: &[Deployment]| {
            let refs: Vec<&Deployment> = ds.iter().collect();
            let mut r = retired(&refs);
            r.sort_by_key(|id| id.parse::<u64>().unwrap());
            r
        };
        // One to every POP, then canaries to POP b only, then 31 to every POP: d1 is
        // still a's assignment after 31 rollbacks, so it stays.
        let mut ds = vec![dep(1, Role::Live, 'a', &[], &[])];
        ds.extend((2..=40).map(|i| dep(i, Role::Live, 'b', &["b"], &[])));
        ds.extend((41..=71).map(|i| dep(i, Role::Live, 'c', &[], &[])));
        assert!(ids(&ds).is_empty());
        // A revoked one counts for nothing.
        ds.push(dep(72, Role::Live, 'c', &[], &[]));
        ds.last_mut().unwrap().revoked = true;
        assert!(ids(&ds).is_empty());
        // The 32nd: everything older than the oldest of the 32 goes; the shadow's stay.
        ds.push(dep(73, Role::Live, 'c', &[], &[]));
        ds.push(dep(74, Role::Shadow, 'd', &[], &[]));
        let gone: Vec<String> = (1..=40).map(|i| i.to_string()).collect();
        assert_eq!(ids(&ds), gone);
        // Nothing retired can be an assignment, even after 31 rollbacks.
        let refs: Vec<&Deployment> = ds.iter().collect();
        let mut kept: Vec<Deployment> = ds
            .iter()
            .filter(|d| !retired(&refs).contains(&d.id))
            .cloned()
            .collect();
        let mut full = ds.clone();
        for _ in 0..31 {
            for set in [&mut kept, &mut full] {
                let refs: Vec<&Deployment> = set.iter().collect();
                let id = latest(&refs, Role::Live).unwrap().id.clone();
                set.iter_mut().find(|d| d.id == id).unwrap().revoked = true;
            }
            for pop in ["a", "b"] {
                let k: Vec<&Deployment> = kept.iter().collect();
                let f: Vec<&Deployment> = full.iter().collect();
                assert_eq!(
                    assignment(&k, Role::Live, pop, "eu").map(|d| &d.id),
                    assignment(&f, Role::Live, pop, "eu").map(|d| &d.id)
                );
            }
        }
    }

    #[test]
    fn a_rollout_widens_and_a_rollback_restores_each_pops_previous_policy() {
        // a alone, then region eu (a and b), then everywhere.
        let mut ds = vec![
            dep(1, Role::Live, 'a', &["a"], &[]),
            dep(2, Role::Live, 'b', &[], &["eu"]),
            dep(3, Role::Shadow, 'c', &[], &[]),
        ];
        let pick = |ds: &[Deployment], pop, region| {
            let refs: Vec<&Deployment> = ds.iter().collect();
            assignment(&refs, Role::Live, pop, region).map(|d| d.hash.chars().next().unwrap())
        };
        assert_eq!(pick(&ds, "a", "eu"), Some('b'));
        assert_eq!(pick(&ds, "b", "eu"), Some('b'));
        assert_eq!(pick(&ds, "c", "us"), None, "not selected: its own config");
        ds.push(dep(4, Role::Live, 'd', &[], &[]));
        assert_eq!(pick(&ds, "c", "us"), Some('d'));
        // Rolling back the latest revokes it: each POP falls back to what selected it before.
        let refs: Vec<&Deployment> = ds.iter().collect();
        let id = latest(&refs, Role::Live).unwrap().id.clone();
        assert_eq!(id, "4");
        ds.iter_mut().find(|d| d.id == id).unwrap().revoked = true;
        assert_eq!(pick(&ds, "a", "eu"), Some('b'));
        assert_eq!(pick(&ds, "c", "us"), None);
        ds.iter_mut().find(|d| d.id == "2").unwrap().revoked = true;
        assert_eq!(pick(&ds, "a", "eu"), Some('a'));
        assert_eq!(pick(&ds, "b", "eu"), None);
        let refs: Vec<&Deployment> = ds.iter().collect();
        assert_eq!(
            assignment(&refs, Role::Shadow, "b", "eu").map(|d| d.id.as_str()),
            Some("3"),
            "roles are independent"
        );
    }

    #[test]
    fn peers_records_are_validated() {
        let mut d = dep(1, Role::Live, 'a', &[], &[]);
        let rec = |d: &Deployment| FleetRecord {
            version: d.created,
            value: FleetValue::Deployment(d.clone()),
        };
        assert!(rec(&d).validate().is_ok());
        d.hash = "A".repeat(64);
        assert!(rec(&d).validate().unwrap_err().contains("SHA-256"));
        d.hash = "a".repeat(64);
        d.name = "x".repeat(300);
        assert!(rec(&d).validate().unwrap_err().contains("component name"));
    }
}
