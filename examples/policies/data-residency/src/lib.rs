//! Data residency: a client in an EU member state is only ever sent to a backend in an
//! EU member state; when none is eligible the connection is refused rather than leave
//! the EU. Other clients get the default geo + load choice.

use policy_sdk::{Candidate, Client, Context, Country, Policy, geo_load_score, lowest};

pub struct DataResidency;

/// The 27 EU member states (ISO 3166-1 alpha-2; Greece is GR).
pub const EU: [&str; 27] = [
    "AT", "BE", "BG", "HR", "CY", "CZ", "DK", "EE", "FI", "FR", "DE", "GR", "HU", "IE", "IT", "LV",
    "LT", "LU", "MT", "NL", "PL", "PT", "RO", "SK", "SI", "ES", "SE",
];

pub fn in_eu(country: Country) -> bool {
    EU.iter().any(|c| Country::new(c) == Some(country))
}

impl Policy for DataResidency {
    fn pick(ctx: &Context<'_>, client: &Client, candidates: &[Candidate<'_>]) -> Option<usize> {
        let resident = client.country.is_some_and(in_eu);
        let pop = ctx.table.pop_region;
        lowest(candidates, |c| {
            let allowed = !resident || in_eu(c.backend.country);
            allowed.then(|| geo_load_score(c, client, pop))
        })
    }
}

#[cfg(target_arch = "wasm32")]
policy_sdk::export_policy!(DataResidency);

#[cfg(test)]
mod tests {
    use super::*;
    use policy_sdk::testing::{backend, client, pick};

    #[test]
    fn eu_clients_stay_in_the_eu_even_when_it_is_farther_or_busier() {
        let us = backend("us", "us", "US");
        let fr = backend("fr", "eu", "FR");
        let de = client(Some("DE"));
        assert_eq!(pick::<DataResidency>(&[&us, &fr], &[0, 9], &de), Some(1));
    }

    #[test]
    fn no_eligible_eu_backend_refuses_eu_clients_only() {
        let us = backend("us", "us", "US");
        let fr = policy_sdk::Backend {
            healthy: false,
            ..backend("fr", "eu", "FR")
        };
        // Switzerland and the UK are in Europe but not in the EU.
        let ch = backend("ch", "eu", "CH");
        assert_eq!(
            pick::<DataResidency>(&[&us, &fr, &ch], &[0; 3], &client(Some("IT"))),
            None
        );
        assert_eq!(
            pick::<DataResidency>(&[&us, &fr, &ch], &[0; 3], &client(Some("GB"))),
            Some(2)
        );
        assert_eq!(
            pick::<DataResidency>(&[&us, &fr, &ch], &[0; 3], &client(Some("BR"))),
            Some(0)
        );
        assert_eq!(
            pick::<DataResidency>(&[&us, &fr, &ch], &[0; 3], &client(None)),
            Some(0)
        );
    }
}
