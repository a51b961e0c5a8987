//! Canaries by server name: TLS clients that ask for a `canary.` name
//! (`canary.api.example.com`) go to canary backends (ids starting with `canary-`), every
//! other client to the stable ones, each side chosen by the default geo + load score. A
//! tester opts in by name, with no cookie or header an L4 proxy could not see. With no
//! eligible backend on its side a client takes the other, so a canary outage is not one.
//! The server name comes from the ClientHello on a listener with `tls` set (contract
//! 0.2.0); elsewhere there is none and every client is stable.

use policy_sdk::{Candidate, Client, Context, Policy, geo_load_score, lowest};

pub struct SniCanary;

pub const CANARY_NAME: &str = "canary.";
pub const CANARY_ID: &str = "canary-";

pub fn wants_canary(client: &Client) -> bool {
    client
        .sni
        .as_deref()
        .is_some_and(|n| n.starts_with(CANARY_NAME))
}

pub fn is_canary(c: &Candidate<'_>) -> bool {
    c.backend.id.starts_with(CANARY_ID)
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

impl Policy for SniCanary {
    fn pick(ctx: &Context<'_>, client: &Client, candidates: &[Candidate<'_>]) -> Option<usize> {
        let canary = wants_canary(client);
        best(ctx, client, candidates, |c| is_canary(c) == canary)
            .or_else(|| best(ctx, client, candidates, |c| is_canary(c) != canary))
    }
}

#[cfg(target_arch = "wasm32")]
policy_sdk::export_policy!(SniCanary);

#[cfg(test)]
mod tests {
    use super::*;
    use policy_sdk::testing::{backend, client, pick};

    fn named(name: Option<&str>) -> Client {
        Client {
            sni: name.map(str::to_owned),
            ..client(Some("BR"))
        }
    }

    #[test]
    fn canary_names_go_to_canaries_everything_else_to_stable() {
        let stable = backend("stable-1", "sa", "BR");
        // Farther away: only the name can send a client there.
        let canary = backend("canary-1", "us", "US");
        let all = [&stable, &canary];
        assert_eq!(
            pick::<SniCanary>(&all, &[0, 0], &named(Some("canary.api.example.com"))),
            Some(1)
        );
        assert_eq!(
            pick::<SniCanary>(&all, &[0, 0], &named(Some("api.example.com"))),
            Some(0)
        );
        // A name merely containing it, and no TLS at all: stable.
        assert_eq!(
            pick::<SniCanary>(&all, &[0, 0], &named(Some("my.canary.example.com"))),
            Some(0)
        );
        assert_eq!(pick::<SniCanary>(&all, &[0, 0], &named(None)), Some(0));
    }

    #[test]
    fn a_side_with_nothing_eligible_falls_over_to_the_other() {
        let stable = backend("stable-1", "sa", "BR");
        let canary = policy_sdk::Backend {
            healthy: false,
            ..backend("canary-1", "sa", "BR")
        };
        let c = named(Some("canary.api.example.com"));
        assert_eq!(pick::<SniCanary>(&[&stable, &canary], &[0, 0], &c), Some(0));
    }
}
