//! GeoIP through a MaxMind-format database: MaxMind GeoIP2/GeoLite2 Country or City
//! (`country.iso_code`) and ip-location-db country files (`country_code`) both work.
//!
//! With no file configured, the embedded database is used: ip-location-db's
//! geo-whois-asn-country (CC BY 4.0 data from the NRO), see `host/data/README.md`.

use std::borrow::Cow;
use std::net::IpAddr;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use maxminddb::Reader;
use serde::Deserialize;

use crate::domain::CountryCode;
use crate::domain::ports::{GeoLookups, GeoResolver};

static EMBEDDED: &[u8] = include_bytes!("../../../data/geo-whois-asn-country.mmdb");

#[derive(Debug, thiserror::Error)]
#[error("GeoIP database {location}: {reason}")]
pub struct GeoError {
    pub location: String,
    pub reason: String,
}

pub struct MaxMindGeo {
    reader: Reader<Cow<'static, [u8]>>,
    description: String,
    /// Lookups by outcome: found, not found, failed (a record that would not decode).
    outcomes: [AtomicU64; 3],
}

#[derive(Deserialize)]
struct Record<'a> {
    #[serde(borrow)]
    country: Option<Country<'a>>,
    country_code: Option<&'a str>,
}

#[derive(Deserialize)]
struct Country<'a> {
    iso_code: Option<&'a str>,
}

impl MaxMindGeo {
    pub fn embedded() -> Result<Self, GeoError> {
        Self::from_bytes(Cow::Borrowed(EMBEDDED), "embedded")
    }

    pub fn open(path: &Path) -> Result<Self, GeoError> {
        let bytes = std::fs::read(path).map_err(|e| GeoError {
            location: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::from_bytes(Cow::Owned(bytes), &path.display().to_string())
    }

    fn from_bytes(bytes: Cow<'static, [u8]>, location: &str) -> Result<Self, GeoError> {
        let err = |reason: String| GeoError {
            location: location.to_owned(),
            reason,
        };
        // The reader panics on some corrupt files (found by fuzzing, maxminddb 0.26): a
        // panic is a rejected file like any other error.
        let reader = std::panic::catch_unwind(AssertUnwindSafe(|| Reader::from_source(bytes)))
            .map_err(|_| {
                err("a corrupt MaxMind DB file (the reader failed on its metadata)".into())
            })?
            .map_err(|e| err(format!("not a MaxMind DB file ({e})")))?;
        let description = format!(
            "{} ({}, IPv{}, built {})",
            location,
            reader.metadata.database_type,
            reader.metadata.ip_version,
            reader.metadata.build_epoch
        );
        Ok(Self {
            reader,
            description,
            outcomes: Default::default(),
        })
    }

    pub fn description(&self) -> &str {
        &self.description
    }
}

impl GeoResolver for MaxMindGeo {
    fn country(&self, ip: IpAddr) -> Option<CountryCode> {
        // IPv4 clients on a dual-stack socket arrive as ::ffff:a.b.c.d.
        let ip = ip.to_canonical();
        // A corrupt data section can make the reader panic; that lookup then fails.
        let found =
            std::panic::catch_unwind(AssertUnwindSafe(|| self.reader.lookup::<Record<'_>>(ip)));
        let (outcome, country) = match found {
            Ok(Ok(Some(record))) => match record
                .country
                .and_then(|c| c.iso_code)
                .or(record.country_code)
                .map(str::parse::<CountryCode>)
            {
                Some(Ok(code)) => (0, Some(code)),
                None => (1, None),
                Some(Err(_)) => (2, None),
            },
            Ok(Ok(None)) => (1, None),
            Ok(Err(_)) | Err(_) => (2, None),
        };
        self.outcomes[outcome].fetch_add(1, Ordering::Relaxed);
        country
    }

    fn lookups(&self) -> GeoLookups {
        let [found, not_found, failed] =
            self.outcomes.each_ref().map(|c| c.load(Ordering::Relaxed));
        GeoLookups {
            found,
            not_found,
            failed,
        }
    }

    fn describe(&self) -> String {
        self.description.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_database_knows_well_known_networks() {
        let geo = MaxMindGeo::embedded().unwrap();
        assert_eq!(
            geo.country("200.147.3.157".parse().unwrap())
                .unwrap()
                .as_str(),
            "BR"
        );
        assert_eq!(
            geo.country("8.8.8.8".parse().unwrap()).unwrap().as_str(),
            "US"
        );
        assert_eq!(
            geo.country("::ffff:8.8.8.8".parse().unwrap())
                .unwrap()
                .as_str(),
            "US"
        );
        assert_eq!(geo.country("127.0.0.1".parse().unwrap()), None);
    }

    #[test]
    fn a_file_that_is_not_a_database_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.mmdb");
        std::fs::write(&path, b"definitely not maxmind").unwrap();
        let err = MaxMindGeo::open(&path).err().unwrap().to_string();
        assert!(
            err.contains("bad.mmdb") && err.contains("not a MaxMind DB"),
            "{err}"
        );
    }
}
