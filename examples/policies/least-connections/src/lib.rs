//! Weighted least connections, ignoring geography: the eligible candidate with the
//! fewest open connections per unit of weight wins; ties go to the earlier candidate
//! (the host sends them sorted by id).

use policy_sdk::{Candidate, Client, Context, Policy, lowest};

pub struct LeastConnections;

/// Open connections per unit of weight (a weight of 0 counts as 1).
fn per_weight(c: &Candidate<'_>) -> f64 {
    f64::from(c.active) / f64::from(c.backend.weight.max(1))
}

impl Policy for LeastConnections {
    fn pick(_ctx: &Context<'_>, _client: &Client, candidates: &[Candidate<'_>]) -> Option<usize> {
        lowest(candidates, |c| Some(per_weight(c)))
    }
}

#[cfg(target_arch = "wasm32")]
policy_sdk::export_policy!(LeastConnections);

#[cfg(test)]
mod tests {
    use super::*;
    use policy_sdk::testing::{backend, client, pick};

    #[test]
    fn fewest_connections_per_weight_wins_wherever_it_is() {
        let far = backend("far", "ap", "JP");
        let near = backend("near", "sa", "BR");
        let heavy = policy_sdk::Backend {
            weight: 4,
            ..backend("heavy", "eu", "DE")
        };
        let br = client(Some("BR"));
        // near has 2, far 1: far wins although near is in the client's country.
        assert_eq!(
            pick::<LeastConnections>(&[&near, &far], &[2, 1], &br),
            Some(1)
        );
        // heavy carries 4x the weight: 6/4 < 2/1.
        assert_eq!(
            pick::<LeastConnections>(&[&near, &heavy], &[2, 6], &br),
            Some(1)
        );
        // Ties go to the first.
        assert_eq!(
            pick::<LeastConnections>(&[&near, &far], &[0, 0], &br),
            Some(0)
        );
    }

    #[test]
    fn ineligible_backends_are_skipped_and_none_left_refuses() {
        let full = policy_sdk::Backend {
            hard_limit: 1,
            ..backend("full", "sa", "BR")
        };
        let down = policy_sdk::Backend {
            healthy: false,
            ..backend("down", "sa", "BR")
        };
        let br = client(Some("BR"));
        assert_eq!(
            pick::<LeastConnections>(&[&full, &down], &[1, 0], &br),
            None
        );
    }
}
