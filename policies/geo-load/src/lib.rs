//! The default policy, shipped compiled inside edgeproxy:
//!
//! `score = geo_score * 100 + (active / soft_limit) / weight`, lowest wins; unhealthy
//! backends and backends at their hard limit are skipped; equal scores go to the earlier
//! candidate (the host sends them sorted by id). It must agree with the host's native
//! scorer on every input; a property test in the host checks that.

use policy_sdk::{Candidate, Client, Context, Policy, geo_load_score, lowest_ranked};

pub struct GeoLoad;

impl Policy for GeoLoad {
    fn pick(ctx: &Context<'_>, client: &Client, candidates: &[Candidate<'_>]) -> Option<usize> {
        let pop = ctx.table.pop_region;
        let mut best: Option<(usize, f64)> = None;
        for (i, c) in candidates.iter().enumerate() {
            if !c.is_eligible() {
                continue;
            }
            let s = geo_load_score(c, client, pop);
            if best.is_none_or(|(_, b)| s < b) {
                best = Some((i, s));
            }
        }
        best.map(|(i, _)| i)
    }

    fn rank(
        ctx: &Context<'_>,
        client: &Client,
        candidates: &[Candidate<'_>],
        count: usize,
    ) -> Vec<usize> {
        let pop = ctx.table.pop_region;
        lowest_ranked(candidates, count, |c| Some(geo_load_score(c, client, pop)))
    }
}

#[cfg(target_arch = "wasm32")]
policy_sdk::export_policy!(GeoLoad);

#[cfg(test)]
mod tests {
    use super::*;
    use policy_sdk::{Backend, Country, RegionId, Table};

    fn table() -> Table {
        let b = |id: &str, region: u32, country: &str| Backend {
            id: id.into(),
            app: 0,
            region: RegionId(region),
            country: Country::new(country).unwrap(),
            weight: 1,
            soft_limit: 10,
            hard_limit: 0,
            healthy: true,
        };
        Table {
            version: 1,
            pop_region: RegionId(2),
            regions: vec!["sa".into(), "us".into(), "eu".into(), "ap".into()],
            apps: vec!["web".into()],
            backends: vec![
                b("br", 0, "BR"),
                b("ar", 0, "AR"),
                b("de", 2, "DE"),
                b("jp", 3, "JP"),
            ],
        }
    }

    fn client(country: Option<&str>, region: Option<u32>) -> Client {
        Client {
            ip: "203.0.113.7".parse().unwrap(),
            country: country.and_then(Country::new),
            region: region.map(RegionId),
            ..Client::default()
        }
    }

    fn pick(t: &Table, client: &Client, active: &[u32]) -> Option<usize> {
        let cands: Vec<Candidate<'_>> = t
            .backends
            .iter()
            .zip(active)
            .map(|(backend, &active)| Candidate {
                backend,
                active,
                rtt_us: 0,
            })
            .collect();
        GeoLoad::pick(
            &Context {
                table: t,
                app: None,
            },
            client,
            &cands,
        )
    }

    #[test]
    fn country_then_region_then_pop_region() {
        let t = table();
        assert_eq!(pick(&t, &client(Some("BR"), Some(0)), &[0; 4]), Some(0));
        assert_eq!(pick(&t, &client(Some("CL"), Some(0)), &[0; 4]), Some(0)); // tie: first
        assert_eq!(
            pick(&t, &client(Some("CL"), Some(0)), &[5, 0, 0, 0]),
            Some(1)
        );
        assert_eq!(pick(&t, &client(Some("KE"), Some(1)), &[0; 4]), Some(2));
        assert_eq!(pick(&t, &client(None, None), &[0; 4]), Some(2));
    }

    #[test]
    fn unhealthy_and_full_backends_are_skipped() {
        let mut t = table();
        t.backends[0].healthy = false;
        t.backends[1].hard_limit = 3;
        assert_eq!(
            pick(&t, &client(Some("BR"), Some(0)), &[0, 3, 0, 0]),
            Some(2)
        );
        t.backends[2].healthy = false;
        t.backends[3].healthy = false;
        assert_eq!(pick(&t, &client(Some("BR"), Some(0)), &[0, 3, 0, 0]), None);
    }
}
