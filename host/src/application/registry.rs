//! Self-registration (edgeProxy's auto-discovery API): backends register as rows of the
//! routing table, so they replicate with the fleet, and keep themselves in rotation by
//! heartbeats.
//!
//! Heartbeats never write the table: each only refreshes a time in memory. The table is
//! written on transitions alone: `healthy = 0` when a backend's beats stop for the TTL,
//! `healthy = 1` when a beat finds it out of rotation, so a fleet of beating backends leaves the table's
//! version (and every POP's snapshot and every policy's copy) alone. The POP that takes a
//! backend's heartbeats owns its expiry; a heartbeat for a row registered through another
//! POP adopts it. After a restart every registered backend gets one TTL of grace.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::domain::ports::{GeoResolver, Registered, RegistrationError, RegistrationStore};
use crate::domain::registration::{self, Destinations};
use crate::domain::replication::{API_OWNER, BackendRow};
use crate::domain::services::RegionMap;
use crate::domain::{BackendId, Region};

/// edgeProxy's defaults for what a registration leaves out.
const DEFAULT_WEIGHT: u32 = 2;
const DEFAULT_SOFT_LIMIT: u32 = 100;
const DEFAULT_HARD_LIMIT: u32 = 150;

/// `POST /api/v1/register`, as edgeProxy's API takes it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    pub id: String,
    pub app: String,
    pub region: String,
    #[serde(default)]
    pub country: Option<String>,
    pub ip: String,
    /// Wide, so an out-of-range port gets its own message rather than a type error.
    pub port: i64,
    #[serde(default)]
    pub weight: Option<u32>,
    #[serde(default)]
    pub soft_limit: Option<u32>,
    #[serde(default)]
    pub hard_limit: Option<u32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RegisterReply {
    pub id: String,
    pub registered: bool,
    /// created, updated or unchanged (nothing written).
    pub outcome: Registered,
    pub message: String,
    pub heartbeat_ttl_secs: u64,
}

/// A registered backend as the API lists it.
#[derive(Debug, Clone, Serialize)]
pub struct RegisteredBackend {
    pub id: String,
    pub app: String,
    pub region: String,
    pub country: String,
    pub ip: String,
    pub port: u16,
    pub healthy: bool,
    pub weight: u32,
    pub soft_limit: u32,
    pub hard_limit: u32,
    /// Seconds since the last heartbeat (or registration, or this POP's start).
    pub last_heartbeat_secs: f64,
    /// True once the beats stopped for the TTL (the table says `healthy = 0`).
    pub expired: bool,
}

#[derive(Debug, Clone)]
struct Beat {
    last: Instant,
    expired: bool,
    /// Its app, for the per-app cap.
    app: Arc<str>,
    /// `Routing::source_changes` when its row was last read as this API's: a beat may
    /// skip the store while the source has not been written since (an operator taking
    /// the row over writes it).
    checked: u64,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct RegistryCounters {
    pub registrations: AtomicU64,
    pub heartbeats: AtomicU64,
    pub expirations: AtomicU64,
    pub revivals: AtomicU64,
    pub deregistrations: AtomicU64,
    /// Registrations removed after staying silent past `remove_after`.
    pub removals: AtomicU64,
    pub rejected: AtomicU64,
}

/// What this POP's API accepts, beyond a well-formed request.
#[derive(Debug, Clone)]
pub struct Limits {
    pub destinations: Destinations,
    pub max_registrations: usize,
    pub max_per_app: usize,
    /// Silent this long, a registration is removed (deleted everywhere); None: kept.
    pub remove_after: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            destinations: Destinations::default(),
            max_registrations: 10_000,
            max_per_app: 1_000,
            remove_after: None,
        }
    }
}

pub struct Registry {
    store: Arc<dyn RegistrationStore>,
    limits: Limits,
    registering: tokio::sync::Mutex<()>,
    /// The routing snapshot: a beat for a backend it shows healthy touches no file.
    routing: Arc<super::routing::Routing>,
    geo: Arc<dyn GeoResolver>,
    regions: RegionMap,
    pub ttl: Duration,
    beats: Mutex<HashMap<BackendId, Beat>>,
    pub counters: RegistryCounters,
}

impl Registry {
    /// Every backend registered here before gets one TTL from now.
    pub fn new(
        store: Arc<dyn RegistrationStore>,
        routing: Arc<super::routing::Routing>,
        geo: Arc<dyn GeoResolver>,
        regions: RegionMap,
        ttl: Duration,
        limits: Limits,
    ) -> Result<Self, RegistrationError> {
        let now = Instant::now();
        let mut beats = HashMap::new();
        for id in store.registered()? {
            let app = store.get(&id)?.map(|r| r.app).unwrap_or_default();
            let beat = Beat {
                last: now,
                expired: false,
                app: app.into(),
                checked: u64::MAX,
            };
            beats.insert(BackendId::new(&id), beat);
        }
        Ok(Self {
            store,
            limits,
            registering: tokio::sync::Mutex::new(()),
            routing,
            geo,
            regions,
            ttl,
            beats: Mutex::new(beats),
            counters: RegistryCounters::default(),
        })
    }

    fn beats(&self) -> std::sync::MutexGuard<'_, HashMap<BackendId, Beat>> {
        self.beats.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn heartbeat_age(&self, id: &BackendId) -> Option<Duration> {
        self.beats().get(id).map(|b| b.last.elapsed())
    }

    /// Backends registered through this POP (from memory).
    pub fn count(&self) -> usize {
        self.beats().len()
    }

    /// The row a request asks for, with edgeProxy's defaults; a named problem otherwise.
    pub fn row(&self, req: &RegisterRequest) -> Result<BackendRow, RegistrationError> {
        let bad = |m: String| Err(RegistrationError::Invalid(m));
        let checked = registration::check_id(req.id.trim())
            .and_then(|_| registration::check_name("app", &req.app))
            .and_then(|_| registration::check_name("region", &req.region));
        if let Err(e) = checked {
            return bad(e);
        }
        let Ok(port) = u16::try_from(req.port) else {
            return bad(format!("port {} is out of range (1 to 65535)", req.port));
        };
        if port == 0 {
            return bad("port 0 is out of range (1 to 65535)".into());
        }
        let ip: IpAddr = match req.ip.trim().parse() {
            Ok(ip) => ip,
            Err(_) => return bad(format!("ip {:?} is not an IP address", req.ip)),
        };
        // The listeners as bound too: a configured port 0 is known only then.
        let mut destinations = self.limits.destinations.clone();
        destinations.own.extend(self.routing.own_listeners());
        if let Err(e) = destinations.check(
            std::net::SocketAddr::new(ip, port),
            super::routing::is_local,
        ) {
            return bad(e);
        }
        let bounded = [
            ("weight", req.weight, registration::MAX_WEIGHT),
            ("soft_limit", req.soft_limit, registration::MAX_LIMIT),
            ("hard_limit", req.hard_limit, registration::MAX_LIMIT),
        ];
        if let Some((field, Some(v), max)) = bounded
            .into_iter()
            .find(|(_, v, max)| v.is_some_and(|v| v > *max))
        {
            return bad(format!("{field} {v} is over {max}"));
        }
        let region = Region::new(&req.region);
        let country = match &req.country {
            Some(c) => match c.parse::<crate::domain::CountryCode>() {
                Ok(c) => c,
                Err(e) => return bad(format!("country: {e}")),
            },
            None => match self
                .geo
                .country(ip)
                .or_else(|| self.regions.representative(&region))
            {
                Some(c) => c,
                None => {
                    return bad(format!(
                        "country is missing and cannot be derived: {ip} has no GeoIP record and region {region} lists no country; send \"country\""
                    ));
                }
            },
        };
        Ok(BackendRow {
            id: req.id.trim().to_owned(),
            app: req.app.trim().to_owned(),
            region: region.to_string(),
            country: country.to_string(),
            wg_ip: ip.to_string(),
            port,
            healthy: true,
            weight: req.weight.unwrap_or(DEFAULT_WEIGHT),
            soft_limit: req.soft_limit.unwrap_or(DEFAULT_SOFT_LIMIT),
            hard_limit: req.hard_limit.unwrap_or(DEFAULT_HARD_LIMIT),
            deleted: false,
            owner: Some(API_OWNER.to_owned()),
        })
    }

    pub async fn register(&self, req: RegisterRequest) -> Result<RegisterReply, RegistrationError> {
        // One at a time, so the caps hold between the check and the write (registrations
        // are rare; heartbeats do not take this).
        let _one = self.registering.lock().await;
        let result = match self
            .row(&req)
            .and_then(|row| self.room_for(&row).map(|_| row))
        {
            Ok(row) => self.blocking(move |s| s.register(&row)).await,
            Err(e) => Err(e),
        };
        let outcome = match result {
            Ok(o) => o,
            Err(e) => {
                self.counters.rejected.fetch_add(1, Relaxed);
                return Err(e);
            }
        };
        let id = BackendId::new(req.id.trim());
        self.beats().insert(
            id.clone(),
            Beat {
                last: Instant::now(),
                expired: false,
                app: req.app.as_str().into(),
                checked: u64::MAX,
            },
        );
        self.counters.registrations.fetch_add(1, Relaxed);
        if outcome != Registered::Unchanged {
            tracing::info!(backend = %id, app = %req.app, ?outcome, "backend registered");
        }
        Ok(RegisterReply {
            id: id.to_string(),
            registered: true,
            outcome,
            message: "Backend registered successfully".into(),
            heartbeat_ttl_secs: self.ttl.as_secs(),
        })
    }

    /// Refuses a new registration past this POP's caps (one already here may change).
    fn room_for(&self, row: &BackendRow) -> Result<(), RegistrationError> {
        let beats = self.beats();
        if beats.contains_key(&BackendId::new(&row.id)) {
            return Ok(());
        }
        let max = self.limits.max_registrations;
        if beats.len() >= max {
            return Err(RegistrationError::Limit(format!(
                "this POP holds {max} registrations, its most (api_max_registrations)"
            )));
        }
        let of_app = beats.values().filter(|b| *b.app == *row.app).count();
        let max = self.limits.max_per_app;
        match of_app >= max {
            true => Err(RegistrationError::Limit(format!(
                "app {:?} has {max} backends registered through this POP, its most \
                 (api_max_per_app)",
                row.app
            ))),
            false => Ok(()),
        }
    }

    /// Refreshes `id`'s heartbeat. Writes only when the table says it is out of rotation
    /// (its beats had stopped here, or at the POP it beat to before): a beating backend
    /// is healthy. A backend registered through another POP is adopted.
    pub async fn heartbeat(&self, id: &str) -> Result<RegisteredBackend, RegistrationError> {
        let key = BackendId::new(id);
        let not_registered = || {
            RegistrationError::NotFound(format!(
                "backend {id:?} is not registered; register it first (POST /api/v1/register)"
            ))
        };
        let now = Instant::now();
        // The common case: registered here, its row read as this API's since the source
        // last changed, and healthy in the snapshot. A row expired a moment ago may still
        // show healthy there; the next beat then revives it.
        let source = self.routing.source_changes();
        if let Some(known) = self.beats().get_mut(&key)
            && known.checked == source
            && let table = self.routing.current()
            && let Ok(i) = table
                .backends()
                .binary_search_by(|b| b.backend.id.cmp(&key))
            && table.backends()[i].backend.healthy
            && !known.expired
        {
            known.last = now;
            self.counters.heartbeats.fetch_add(1, Relaxed);
            return Ok(from_snapshot(&table.backends()[i].backend, known.expired));
        }
        // Adopting is registering here: the same caps, held the same way (until the beat
        // is recorded below).
        let mut _adopting = None;
        if !self.beats().contains_key(&key) {
            _adopting = Some(self.registering.lock().await);
            let owned = id.to_owned();
            if let Some(row) = self.blocking(move |s| s.get(&owned)).await?
                && !row.deleted
            {
                self.room_for(&row)?;
            }
            let owned = id.to_owned();
            if !self.blocking(move |s| s.adopt(&owned)).await? {
                return Err(not_registered());
            }
            tracing::info!(backend = %id, "heartbeat for a backend registered elsewhere; adopted");
        }
        let owned = id.to_owned();
        let mut row = match self.blocking(move |s| s.get(&owned)).await? {
            Some(row) if !row.deleted => row,
            _ => {
                self.beats().remove(&key);
                return Err(not_registered());
            }
        };
        // An operator took the row over since it registered here: no longer this API's.
        if row.owner.as_deref() != Some(API_OWNER) {
            self.beats().remove(&key);
            return Err(RegistrationError::Conflict(format!(
                "backend {id:?} is managed by an operator now, not by this API"
            )));
        }
        if !row.healthy {
            let owned = id.to_owned();
            self.blocking(move |s| s.set_healthy(&owned, true)).await?;
            row.healthy = true;
            self.counters.revivals.fetch_add(1, Relaxed);
            tracing::info!(backend = %id, "heartbeats resumed; back in rotation");
        }
        let beat = Beat {
            last: now,
            expired: false,
            app: row.app.as_str().into(),
            // As read before the row: a write after it makes the next beat read again.
            checked: source,
        };
        self.beats().insert(key, beat.clone());
        self.counters.heartbeats.fetch_add(1, Relaxed);
        Ok(listed(row, &beat))
    }

    pub async fn deregister(&self, id: &str) -> Result<(), RegistrationError> {
        let owned = id.to_owned();
        if !self.blocking(move |s| s.deregister(&owned)).await? {
            return Err(RegistrationError::NotFound(format!(
                "backend {id:?} was not registered through this API"
            )));
        }
        self.beats().remove(&BackendId::new(id));
        self.counters.deregistrations.fetch_add(1, Relaxed);
        tracing::info!(backend = %id, "backend deregistered");
        Ok(())
    }

    pub async fn get(&self, id: &str) -> Result<RegisteredBackend, RegistrationError> {
        let beat = self.beats().get(&BackendId::new(id)).cloned();
        let owned = id.to_owned();
        let row = self.blocking(move |s| s.get(&owned)).await?;
        match (row, beat) {
            (Some(row), Some(beat)) if !row.deleted => Ok(listed(row, &beat)),
            _ => Err(RegistrationError::NotFound(format!(
                "backend {id:?} is not registered through this API"
            ))),
        }
    }

    pub async fn list(&self) -> Result<Vec<RegisteredBackend>, RegistrationError> {
        let beats: Vec<(BackendId, Beat)> = self
            .beats()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let rows = self
            .blocking(move |s| {
                beats
                    .into_iter()
                    .filter_map(|(id, beat)| match s.get(id.as_str()) {
                        Ok(Some(row)) if !row.deleted => Some(Ok(listed(row, &beat))),
                        Ok(_) => None,
                        Err(e) => Some(Err(e)),
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .await?;
        let mut rows = rows;
        rows.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(rows)
    }

    /// Marks backends whose beats stopped for the TTL unhealthy (one write each), and
    /// removes those silent past `remove_after`.
    pub async fn expire(&self, now: Instant) {
        self.remove_silent(now).await;
        let due: Vec<BackendId> = self
            .beats()
            .iter()
            .filter(|(_, b)| !b.expired && now.duration_since(b.last) >= self.ttl)
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            let owned = id.to_string();
            match self.blocking(move |s| s.set_healthy(&owned, false)).await {
                Ok(_) => {
                    // A beat that came in meanwhile wins.
                    if let Some(b) = self.beats().get_mut(&id)
                        && now.duration_since(b.last) >= self.ttl
                    {
                        b.expired = true;
                    }
                    self.counters.expirations.fetch_add(1, Relaxed);
                    tracing::warn!(backend = %id, ttl = ?self.ttl, "no heartbeat within the TTL; out of rotation in every POP until it beats again");
                }
                Err(e) => {
                    tracing::error!(backend = %id, error = %e, "cannot expire a silent backend; retrying");
                }
            }
        }
    }

    async fn remove_silent(&self, now: Instant) {
        let Some(after) = self.limits.remove_after else {
            return;
        };
        let due: Vec<BackendId> = self
            .beats()
            .iter()
            .filter(|(_, b)| b.expired && now.duration_since(b.last) >= after)
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            let owned = id.to_string();
            match self.blocking(move |s| s.deregister(&owned)).await {
                Ok(_) | Err(RegistrationError::Conflict(_)) => {
                    self.beats().remove(&id);
                    self.counters.removals.fetch_add(1, Relaxed);
                    tracing::warn!(backend = %id, silent = ?after, "no heartbeat for a long time; registration removed");
                }
                Err(e) => {
                    tracing::error!(backend = %id, error = %e, "cannot remove a long-silent backend; retrying");
                }
            }
        }
    }

    /// Sweeps for silent backends until `stop`, a few times per TTL.
    pub async fn run_expiry(self: Arc<Self>, stop: CancellationToken) {
        let every = (self.ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => self.expire(Instant::now()).await,
            }
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn RegistrationStore) -> Result<T, RegistrationError> + Send + 'static,
    ) -> Result<T, RegistrationError> {
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || f(&*store))
            .await
            .map_err(|e| RegistrationError::Store(format!("registration writer failed: {e}")))?
    }
}

fn from_snapshot(b: &crate::domain::Backend, expired: bool) -> RegisteredBackend {
    RegisteredBackend {
        id: b.id.to_string(),
        app: b.app.to_string(),
        region: b.region.to_string(),
        country: b.country.to_string(),
        ip: b.addr.ip().to_string(),
        port: b.addr.port(),
        healthy: b.healthy,
        weight: b.weight,
        soft_limit: b.soft_limit,
        hard_limit: b.hard_limit,
        last_heartbeat_secs: 0.0,
        expired,
    }
}

fn listed(row: BackendRow, beat: &Beat) -> RegisteredBackend {
    RegisteredBackend {
        id: row.id,
        app: row.app,
        region: row.region,
        country: row.country,
        ip: row.wg_ip,
        port: row.port,
        healthy: row.healthy,
        weight: row.weight,
        soft_limit: row.soft_limit,
        hard_limit: row.hard_limit,
        last_heartbeat_secs: beat.last.elapsed().as_secs_f64(),
        expired: beat.expired,
    }
}
