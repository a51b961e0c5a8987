//! Weighted canary: a fixed share of new clients goes to canary backends (ids starting
//! with `canary-`), the rest to the stable ones, each side chosen by the default geo +
//! load score. The roll uses the host's randomness; bindings then keep each client on
//! the side it landed on. With no eligible backend on its side a client takes the other.

use policy_sdk::{Candidate, Client, Context, Policy, geo_load_score, lowest};

pub struct WeightedCanary;

/// Percentage of new clients sent to canaries.
pub const CANARY_PERCENT: u64 = 20;
pub const CANARY_PREFIX: &str = "canary-";

pub fn is_canary(c: &Candidate<'_>) -> bool {
    c.backend.id.starts_with(CANARY_PREFIX)
}

/// The pick for a roll in 0..100 (below `CANARY_PERCENT`: canary).
pub fn pick_with_roll(
    ctx: &Context<'_>,
    client: &Client,
    candidates: &[Candidate<'_>],
    roll: u64,
) -> Option<usize> {
    let canary = roll < CANARY_PERCENT;
    best(ctx, client, candidates, |c| is_canary(c) == canary)
        .or_else(|| best(ctx, client, candidates, |c| is_canary(c) != canary))
}

fn best(
    ctx: &Context<'_>,
    client: &Client,
    candidates: &[Candidate<'_>],
    side: impl Fn(&Candidate<'_>) -> bool,
) -> Option<usize> {
    let pop = ctx.table.pop_region;
    lowest(candidates, |c| {
        side(c).then(|| geo_load_score(c, client, pop))
    })
}

impl Policy for WeightedCanary {
    fn pick(ctx: &Context<'_>, client: &Client, candidates: &[Candidate<'_>]) -> Option<usize> {
        pick_with_roll(ctx, client, candidates, policy_sdk::random_u64() % 100)
    }
}

#[cfg(target_arch = "wasm32")]
policy_sdk::export_policy!(WeightedCanary);

#[cfg(test)]
mod tests {
    use super::*;
    use policy_sdk::testing::{backend, client, pick};

    /// A `Policy` with a fixed roll, so the split can be tested without the host.
    struct Rolled<const ROLL: u64>;

    impl<const ROLL: u64> Policy for Rolled<ROLL> {
        fn pick(ctx: &Context<'_>, client: &Client, c: &[Candidate<'_>]) -> Option<usize> {
            pick_with_roll(ctx, client, c, ROLL)
        }
    }

    #[test]
    fn rolls_below_the_share_go_to_canaries_the_rest_to_stable() {
        let stable = backend("stable-1", "sa", "BR");
        let canary = backend("canary-1", "us", "US");
        let br = client(Some("BR"));
        let all = [&stable, &canary];
        assert_eq!(pick::<Rolled<0>>(&all, &[0, 0], &br), Some(1));
        assert_eq!(
            pick::<Rolled<{ CANARY_PERCENT - 1 }>>(&all, &[0, 0], &br),
            Some(1)
        );
        assert_eq!(pick::<Rolled<CANARY_PERCENT>>(&all, &[0, 0], &br), Some(0));
        assert_eq!(pick::<Rolled<99>>(&all, &[0, 0], &br), Some(0));
    }

    #[test]
    fn a_side_with_nothing_eligible_falls_over_to_the_other() {
        let stable = backend("stable-1", "sa", "BR");
        let canary = policy_sdk::Backend {
            healthy: false,
            ..backend("canary-1", "sa", "BR")
        };
        let br = client(Some("BR"));
        assert_eq!(
            pick::<Rolled<0>>(&[&stable, &canary], &[0, 0], &br),
            Some(0)
        );
    }
}
