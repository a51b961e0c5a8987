//! The native scoring policy, exactly as the design gives it:
//!
//! `score = geo_score * 100 + (active / soft_limit) / weight`, lowest wins, where
//! geo_score is 0 for a backend in the client's country, 1 in the client's region, 2 in
//! the POP's own region and 3 otherwise. Unhealthy backends and backends at their hard
//! limit are never picked. Equal scores go to the backend with the smallest id (the
//! routing table is sorted by id), so the same inputs always give the same pick.

use crate::domain::model::{Backend, Client, Region};
use crate::domain::ports::{PickRequest, PolicyControl, PolicyFaults, PolicyStatus, ScoringPolicy};
use crate::domain::routing_table::RoutedBackend;

pub fn geo_score(backend: &Backend, client: &Client, pop_region: &Region) -> u32 {
    if client.country == Some(backend.country) {
        0
    } else if client.region.as_ref() == Some(&backend.region) {
        1
    } else if &backend.region == pop_region {
        2
    } else {
        3
    }
}

/// Load as the fraction of the soft limit in use, divided by weight.
pub fn load_score(backend: &Backend, active: u32) -> f64 {
    f64::from(active)
        / f64::from(backend.effective_soft_limit())
        / f64::from(backend.effective_weight())
}

pub fn score(candidate: &RoutedBackend, client: &Client, pop_region: &Region) -> f64 {
    let b = &candidate.backend;
    f64::from(geo_score(b, client, pop_region)) * 100.0 + load_score(b, candidate.stats.active())
}

#[derive(Debug, Default, Clone, Copy)]
pub struct NativeScorer;

impl ScoringPolicy for NativeScorer {
    fn name(&self) -> &str {
        "native"
    }

    fn pick(&self, request: &PickRequest<'_>, candidates: &[RoutedBackend]) -> Option<usize> {
        self.pick_leaving_out(request, candidates, &[])
    }

    fn pick_leaving_out(
        &self,
        request: &PickRequest<'_>,
        candidates: &[RoutedBackend],
        left_out: &[usize],
    ) -> Option<usize> {
        let mut best: Option<(usize, f64)> = None;
        for (i, c) in candidates.iter().enumerate() {
            if !c.is_eligible() || left_out.contains(&i) {
                continue;
            }
            let s = score(c, request.client, request.pop_region);
            // Strictly lower only: the earlier (smaller id) candidate keeps a tie.
            if best.is_none_or(|(_, b)| s < b) {
                best = Some((i, s));
            }
        }
        best.map(|(i, _)| i)
    }
}

impl PolicyControl for NativeScorer {
    fn status(&self) -> PolicyStatus {
        PolicyStatus {
            kind: "native",
            name: "native".into(),
            hash: None,
            contract: None,
            path: None,
            loaded_at: None,
            reloads: 0,
            reload_failures: 0,
            last_error: None,
            faults: PolicyFaults::default(),
            decisions: 0,
            suspended_for_ms: None,
            suspensions: 0,
            suspended_decisions: 0,
        }
    }

    fn reload(&self) -> Result<bool, String> {
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;
    use crate::domain::model::{BackendStats, CountryCode};

    fn backend(id: &str, region: &str, country: &str) -> Backend {
        crate::domain::sample::backend("app", id, region, country, 8080)
    }

    fn routed(b: Backend, active: u32) -> RoutedBackend {
        let stats = Arc::new(BackendStats::default());
        for _ in 0..active {
            std::mem::forget(stats.acquire());
        }
        RoutedBackend {
            index: 0,
            backend: b,
            stats,
        }
    }

    fn client(country: Option<&str>, region: Option<&str>) -> Client {
        Client {
            ip: "203.0.113.7".parse().unwrap(),
            country: country.map(|c| c.parse().unwrap()),
            region: region.map(Region::new),
            via_proxy_protocol: false,
            tls: None,
        }
    }

    fn pick(cands: &[RoutedBackend], client: &Client, pop: &str) -> Option<usize> {
        let pop = Region::new(pop);
        NativeScorer.pick(
            &PickRequest {
                table: &Default::default(),
                pop_region: &pop,
                app: None,
                client,
            },
            cands,
        )
    }

    #[test]
    fn geo_order_country_region_pop_other() {
        let c = client(Some("BR"), Some("sa"));
        let pop = Region::new("eu");
        assert_eq!(geo_score(&backend("a", "sa", "BR"), &c, &pop), 0);
        assert_eq!(geo_score(&backend("a", "sa", "AR"), &c, &pop), 1);
        assert_eq!(geo_score(&backend("a", "eu", "DE"), &c, &pop), 2);
        assert_eq!(geo_score(&backend("a", "ap", "JP"), &c, &pop), 3);
        // Unknown client location: only the POP's region is preferred.
        let unknown = client(None, None);
        assert_eq!(geo_score(&backend("a", "sa", "BR"), &unknown, &pop), 3);
        assert_eq!(geo_score(&backend("a", "eu", "DE"), &unknown, &pop), 2);
    }

    #[test]
    fn load_spreads_by_soft_limit_and_weight() {
        // a: 5/10 = 0.5; b: weight 2, 8/10/2 = 0.4 -> b.
        let mut a = backend("a", "sa", "BR");
        let mut b = backend("b", "sa", "BR");
        a.soft_limit = 10;
        b.weight = 2;
        let cands = [routed(a, 5), routed(b, 8)];
        assert_eq!(pick(&cands, &client(Some("BR"), Some("sa")), "sa"), Some(1));
    }

    #[test]
    fn zero_weight_and_soft_limit_count_as_one() {
        let mut a = backend("a", "sa", "BR");
        a.weight = 0;
        a.soft_limit = 0;
        assert_eq!(load_score(&a, 3), 3.0);
    }

    #[test]
    fn excluded_backends_are_never_picked() {
        let mut sick = backend("a", "sa", "BR");
        sick.healthy = false;
        let mut full = backend("b", "sa", "BR");
        full.hard_limit = 2;
        let far = backend("c", "ap", "JP");
        let cands = [routed(sick, 0), routed(full, 2), routed(far, 50)];
        assert_eq!(pick(&cands, &client(Some("BR"), Some("sa")), "sa"), Some(2));
        assert_eq!(
            pick(&cands[..2], &client(Some("BR"), Some("sa")), "sa"),
            None
        );
    }

    #[test]
    fn ties_go_to_the_smallest_id() {
        let cands = [
            routed(backend("a", "sa", "BR"), 0),
            routed(backend("b", "sa", "BR"), 0),
        ];
        assert_eq!(pick(&cands, &client(Some("BR"), Some("sa")), "sa"), Some(0));
    }

    fn arb_candidate() -> impl Strategy<Value = RoutedBackend> {
        (
            "[a-z]{1,4}",
            prop::sample::select(vec!["sa", "us", "eu", "ap"]),
            prop::sample::select(vec!["BR", "AR", "US", "DE", "JP"]),
            any::<bool>(),
            0u32..5,
            0u32..20,
            0u32..6,
            0u32..30,
        )
            .prop_map(
                |(id, region, country, healthy, weight, soft, hard, active)| {
                    let mut b = backend(&id, region, country);
                    b.healthy = healthy;
                    b.weight = weight;
                    b.soft_limit = soft;
                    b.hard_limit = hard;
                    routed(b, active)
                },
            )
    }

    proptest! {
        #[test]
        fn pick_is_an_eligible_minimum(
            cands in prop::collection::vec(arb_candidate(), 0..24),
            country in prop::option::of(prop::sample::select(vec!["BR", "US", "DE", "KE"])),
            pop in prop::sample::select(vec!["sa", "us", "eu", "ap"]),
        ) {
            let region = country.map(|c: &str| {
                crate::domain::services::RegionMap::default()
                    .region_of(c.parse::<CountryCode>().unwrap())
                    .as_str()
                    .to_owned()
            });
            let c = client(country, region.as_deref());
            let popr = Region::new(pop);
            match pick(&cands, &c, pop) {
                None => prop_assert!(cands.iter().all(|c| !c.is_eligible())),
                Some(i) => {
                    prop_assert!(cands[i].is_eligible());
                    let best = score(&cands[i], &c, &popr);
                    for (j, other) in cands.iter().enumerate().filter(|(_, o)| o.is_eligible()) {
                        let s = score(other, &c, &popr);
                        prop_assert!(best < s || (best == s && i <= j));
                    }
                }
            }
        }
    }
}
