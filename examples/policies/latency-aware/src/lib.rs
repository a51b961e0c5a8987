//! Latency-aware: among eligible candidates, the lowest connect round-trip time (the
//! host's moving average of its connects to each backend) wins. Geography breaks ties,
//! then load. A backend not measured yet (RTT 0) comes first, so a new backend gets
//! measured instead of being ignored forever.

use policy_sdk::{Candidate, Client, Context, Policy, geo_score, lowest};

pub struct LatencyAware;

/// RTTs within this many microseconds count as equal, so loopback-level noise does not
/// flip clients between backends that are equally close.
pub const RTT_BUCKET_US: u32 = 500;

impl Policy for LatencyAware {
    fn pick(ctx: &Context<'_>, client: &Client, candidates: &[Candidate<'_>]) -> Option<usize> {
        let pop = ctx.table.pop_region;
        lowest(candidates, |c| {
            // 0 for "not measured", so it sorts before every measured backend.
            let rtt = match c.rtt_us {
                0 => 0,
                us => 1 + us / RTT_BUCKET_US,
            };
            Some((rtt, geo_score(c.backend, client, pop), c.load()))
        })
    }
}

#[cfg(target_arch = "wasm32")]
policy_sdk::export_policy!(LatencyAware);

#[cfg(test)]
mod tests {
    use super::*;
    use policy_sdk::testing::{backend, client, pick_measured};

    #[test]
    fn lowest_rtt_wins_over_geography() {
        let near = backend("near", "sa", "BR");
        let far = backend("far", "us", "US");
        let br = client(Some("BR"));
        // near is in the client's country but 80 ms away; far answers in 2 ms.
        let p = pick_measured::<LatencyAware>(&[&near, &far], &[(0, 80_000), (0, 2_000)], &br);
        assert_eq!(p, Some(1));
    }

    #[test]
    fn equal_rtt_falls_back_to_geography_then_load() {
        let near = backend("near", "sa", "BR");
        let far = backend("far", "us", "US");
        let other = backend("other", "sa", "BR");
        let br = client(Some("BR"));
        // Within one bucket: the client's country wins.
        let p = pick_measured::<LatencyAware>(&[&far, &near], &[(0, 1_100), (0, 1_300)], &br);
        assert_eq!(p, Some(1));
        // Same RTT, same country: the less loaded one.
        let p = pick_measured::<LatencyAware>(&[&near, &other], &[(5, 1_000), (1, 1_000)], &br);
        assert_eq!(p, Some(1));
    }

    #[test]
    fn unmeasured_backends_are_tried_first_and_ineligible_ones_never() {
        let measured = backend("measured", "sa", "BR");
        let new = backend("new", "ap", "JP");
        let down = policy_sdk::Backend {
            healthy: false,
            ..backend("down", "sa", "BR")
        };
        let br = client(Some("BR"));
        let p = pick_measured::<LatencyAware>(&[&measured, &new], &[(0, 300), (0, 0)], &br);
        assert_eq!(p, Some(1));
        assert_eq!(
            pick_measured::<LatencyAware>(&[&down], &[(0, 0)], &br),
            None
        );
    }
}
