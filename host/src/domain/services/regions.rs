//! Country -> region mapping. The defaults are edgeProxy's, so existing routing tables keep
//! their meaning; the config file can move countries between regions or add regions.

use std::collections::HashMap;

use crate::domain::model::{CountryCode, Region};

const DEFAULT_REGIONS: &[(&str, &[&str])] = &[
    (
        "sa",
        &["BR", "AR", "CL", "PE", "CO", "UY", "PY", "BO", "EC", "VE"],
    ),
    ("us", &["US", "CA", "MX"]),
    (
        "eu",
        &[
            "DE", "PT", "ES", "FR", "NL", "IT", "GB", "IE", "BE", "CH", "AT", "PL", "CZ", "SE",
            "NO", "DK", "FI", "RU", "UA",
        ],
    ),
    (
        "ap",
        &[
            "JP", "KR", "TW", "HK", "SG", "MY", "TH", "VN", "ID", "PH", "AU", "NZ", "CN", "IN",
        ],
    ),
];

/// Countries not listed anywhere belong to this region, as in edgeProxy.
pub const DEFAULT_FALLBACK_REGION: &str = "us";

#[derive(Clone, Debug)]
pub struct RegionMap {
    by_country: HashMap<CountryCode, Region>,
    /// Each region's first listed country: a registration naming only a region gets it.
    representative: HashMap<Region, CountryCode>,
    fallback: Region,
}

impl Default for RegionMap {
    fn default() -> Self {
        let mut map = Self {
            by_country: HashMap::new(),
            representative: HashMap::new(),
            fallback: Region::new(DEFAULT_FALLBACK_REGION),
        };
        for (region, countries) in DEFAULT_REGIONS {
            let region = Region::new(region);
            for c in *countries {
                // Invariant: the table above holds only two-letter codes.
                let code = c.parse().expect("default region table is valid");
                map.by_country.insert(code, region.clone());
                map.representative.entry(region.clone()).or_insert(code);
            }
        }
        map
    }
}

impl RegionMap {
    /// The defaults with `overrides` applied: each listed country moves to that region.
    pub fn with_overrides<'a>(
        overrides: impl IntoIterator<Item = (&'a Region, &'a [CountryCode])>,
        fallback: Option<Region>,
    ) -> Self {
        let mut map = Self::default();
        for (region, countries) in overrides {
            if let Some(first) = countries.first() {
                map.representative.insert(region.clone(), *first);
            }
            for code in countries {
                map.by_country.insert(*code, region.clone());
            }
        }
        if let Some(fallback) = fallback {
            map.fallback = fallback;
        }
        map
    }

    /// Every region a client can be placed in, sorted, each once (policies get them as
    /// region ids).
    pub fn client_regions(&self) -> Vec<Region> {
        let mut regions: Vec<Region> = self
            .by_country
            .values()
            .chain(std::iter::once(&self.fallback))
            .cloned()
            .collect();
        regions.sort();
        regions.dedup();
        regions
    }

    /// The country a backend of `region` is taken to be in when nothing else says.
    pub fn representative(&self, region: &Region) -> Option<CountryCode> {
        self.representative.get(region).copied()
    }

    pub fn region_of(&self, country: CountryCode) -> Region {
        self.by_country
            .get(&country)
            .unwrap_or(&self.fallback)
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cc(s: &str) -> CountryCode {
        s.parse().unwrap()
    }

    #[test]
    fn defaults_match_edgeproxy() {
        let m = RegionMap::default();
        assert_eq!(m.region_of(cc("BR")).as_str(), "sa");
        assert_eq!(m.region_of(cc("MX")).as_str(), "us");
        assert_eq!(m.region_of(cc("UA")).as_str(), "eu");
        assert_eq!(m.region_of(cc("IN")).as_str(), "ap");
        // Unlisted countries fall back to "us".
        assert_eq!(m.region_of(cc("ZA")).as_str(), "us");
        assert_eq!(m.representative(&Region::new("eu")), Some(cc("DE")));
        assert_eq!(m.representative(&Region::new("sa")), Some(cc("BR")));
        assert_eq!(m.representative(&Region::new("xx")), None);
    }

    #[test]
    fn overrides_move_countries_and_fallback() {
        let af = Region::new("af");
        let eu = Region::new("eu");
        let za = [cc("ZA"), cc("NG")];
        let gb = [cc("GB")];
        let m =
            RegionMap::with_overrides([(&af, &za[..]), (&eu, &gb[..])], Some(Region::new("eu")));
        assert_eq!(m.region_of(cc("ZA")).as_str(), "af");
        assert_eq!(m.region_of(cc("GB")).as_str(), "eu");
        assert_eq!(m.region_of(cc("BR")).as_str(), "sa");
        assert_eq!(m.region_of(cc("KE")).as_str(), "eu");
    }
}
