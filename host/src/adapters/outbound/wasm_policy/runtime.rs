//! The wasmtime side of a policy: the engine, compiling bytes
//! into a component (core modules made by `cargo build --target wasm32-unknown-unknown`
//! are wrapped into components here), checking imports, and sandboxed instances.
//!
//! A policy imports `host.log` and `host.random`, and may import WASI 0.2 (as std on
//! `wasm32-wasip2`, the preview 1 adapter of `cargo component`, componentize-py and
//! ComponentizeJS all do) with a context that grants nothing: no files, environment,
//! arguments, sockets or name lookups, empty stdin; stdout and stderr go to the host log.
//! Random and reading the clocks are allowed; waiting is not. Any other import is refused
//! at load (`WASI_GRANTS` is the list). Each call's time is bounded by fuel
//! (an instruction budget), not by the wall clock: a policy is stopped after the same
//! amount of work however busy or preempted the host thread is, so containment is
//! deterministic and a healthy policy never "times out" because the machine was loaded.
//! An epoch deadline is the wall-clock backstop (`BACKSTOP_BUDGETS`, in 10 ms ticks)
//! should fuel ever undercount. Each instance's memory and table sizes are bounded by
//! `StoreLimits`, and what `host.log` may take per call is capped, since fuel counts guest
//! instructions, not host work.

use std::sync::Arc;
use std::time::Duration;

pub use wasmtime::component::Component;
use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::edgeproxy::policy::types as wit;
use super::bindings::{Policy, PolicyPre, v1, v2, wasi};
use super::guest_output::GuestOutput;
use super::wit_table::WitTable;
use crate::domain::server_names::TlsHello;

/// Fuel per millisecond of `timeout`: measured here, 10^6 units of fuel take a tight wasm
/// loop 0.2-1.5 ms, so a budget never allows much more than the configured time.
pub const FUEL_PER_MS: u64 = 1_000_000;

/// The engine's epoch advances this often (one thread per engine).
const EPOCH_TICK: Duration = Duration::from_millis(10);
/// The backstop in budgets. Debug builds (the test suite) run the host's side of a call,
/// such as lowering a 100,000-row table in set-table, about 17x slower than release.
const BACKSTOP_BUDGETS: u32 = if cfg!(debug_assertions) { 100 } else { 10 };
/// Bytes `host.log` accepts in one call; past it the call traps. The string itself is
/// already bounded by the instance's memory.
pub const LOG_BYTES_PER_CALL: usize = 8 * 1024;
/// A logged line is cut to this many bytes.
const LOG_LINE_MAX: usize = 512;
/// Table elements an instance may hold (`table.grow` allocates host memory).
pub const TABLE_ELEMENTS: usize = 10_000;
/// WASI resources (streams, pollables) an instance may hold at once: each is host memory,
/// and a guest that never drops them would otherwise grow it call after call.
pub const WASI_RESOURCES: usize = 1_024;

/// The WASI interfaces a policy may import (any 0.2 version), and what each grants.
pub const WASI_GRANTS: &[(&str, &str)] = &[
    (
        "wasi:cli/environment",
        "nothing: no variables, no arguments, no working directory",
    ),
    ("wasi:cli/exit", "exiting faults the call"),
    ("wasi:cli/stdin", "empty"),
    (
        "wasi:cli/stdout",
        "to the host log at debug level (lines cut, rate-limited)",
    ),
    (
        "wasi:cli/stderr",
        "to the host log at debug level (lines cut, rate-limited)",
    ),
    ("wasi:cli/terminal-input", "not a terminal"),
    ("wasi:cli/terminal-output", "not a terminal"),
    ("wasi:cli/terminal-stdin", "not a terminal"),
    ("wasi:cli/terminal-stdout", "not a terminal"),
    ("wasi:cli/terminal-stderr", "not a terminal"),
    ("wasi:clocks/wall-clock", "read"),
    (
        "wasi:clocks/monotonic-clock",
        "read; waiting on it faults the call",
    ),
    (
        "wasi:filesystem/types",
        "nothing: no directory to open a file from",
    ),
    ("wasi:filesystem/preopens", "none"),
    ("wasi:io/error", "yes"),
    (
        "wasi:io/poll",
        "what is ready at once; waiting faults the call",
    ),
    ("wasi:io/streams", "the streams above"),
    ("wasi:random/random", "yes"),
    ("wasi:random/insecure", "yes"),
    ("wasi:random/insecure-seed", "yes"),
    ("wasi:sockets/network", "no network"),
    ("wasi:sockets/instance-network", "no network"),
    ("wasi:sockets/tcp", "refused"),
    ("wasi:sockets/tcp-create-socket", "refused"),
    ("wasi:sockets/udp", "refused"),
    ("wasi:sockets/udp-create-socket", "refused"),
    ("wasi:sockets/ip-name-lookup", "refused"),
];

/// What a policy is granted of the WASI interface `import` (`wasi:cli/stdout@0.2.3`);
/// None: it may not import it.
pub fn wasi_grant(import: &str) -> Option<&'static str> {
    let (interface, version) = import.split_once('@').unwrap_or((import, ""));
    if !(version.is_empty() || version.starts_with("0.2.")) {
        return None;
    }
    WASI_GRANTS
        .iter()
        .find(|(name, _)| *name == interface)
        .map(|(_, grant)| *grant)
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time budget of a call, enforced as `FUEL_PER_MS` fuel per millisecond.
    pub timeout: Duration,
    pub memory_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_millis(1),
            memory_bytes: 32 << 20,
        }
    }
}

impl Limits {
    pub fn fuel(&self) -> u64 {
        let us = u64::try_from(self.timeout.as_micros()).unwrap_or(u64::MAX);
        us.saturating_mul(FUEL_PER_MS / 1000).max(1)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("not a WebAssembly component or module: {0}")]
    NotWasm(String),
    #[error("cannot make a component from this core module: {0:#}")]
    Componentize(anyhow::Error),
    #[error("does not compile: {0:#}")]
    Compile(wasmtime::Error),
    #[error(
        "imports {0}, which policies do not get: a policy may import edgeproxy:policy and WASI 0.2's cli, clocks, filesystem, io, random and sockets interfaces (granted nothing; `edgeproxy policy check` lists what each gets)"
    )]
    ForbiddenImport(String),
    #[error("does not implement the edgeproxy:policy world: {0:#}")]
    WrongWorld(wasmtime::Error),
    #[error("fails its self-test: {0}")]
    SelfTest(String),
}

/// Data of one sandboxed instance.
pub struct GuestState {
    policy_name: Arc<str>,
    limits: StoreLimits,
    /// `host.log` bytes in the current call, and what it may log (a ranking, `n` picks'
    /// worth).
    logged: usize,
    log_budget: usize,
    /// The ClientHello of the connection being decided, during a pick (`host.client-hello`).
    tls: Option<Arc<TlsHello>>,
    /// Built whether or not the policy imports WASI: an empty context is a few
    /// allocations per instance, and instances live long.
    wasi: WasiCtx,
    resources: ResourceTable,
}

impl WasiView for GuestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.resources,
        }
    }
}

/// The WASI context of a policy: nothing granted but random, the clocks, and output
/// to the log. (The builder's defaults already deny files, environment, arguments,
/// sockets and name lookups; they are spelled out so a change of default cannot widen
/// them.)
fn deny_all_wasi(policy_name: &Arc<str>) -> WasiCtx {
    let output = GuestOutput::new(policy_name);
    WasiCtx::builder()
        .stdout(output.stream("stdout"))
        .stderr(output.stream("stderr"))
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .socket_addr_check(|_, _| Box::pin(async { false }))
        .build()
}

// The types interface has no functions; the trait only marks that it is provided.
impl super::bindings::edgeproxy::policy::types::Host for GuestState {}

/// An older contract's host: the current one's functions, under its types.
macro_rules! older_host {
    ($m:ident) => {
        impl super::bindings::$m::edgeproxy::policy::types::Host for GuestState {}

        impl super::bindings::$m::edgeproxy::policy::host::Host for GuestState {
            fn log(&mut self, message: String) -> wasmtime::Result<()> {
                super::bindings::edgeproxy::policy::host::Host::log(self, message)
            }

            fn random(&mut self) -> wasmtime::Result<u64> {
                super::bindings::edgeproxy::policy::host::Host::random(self)
            }
        }
    };
}
older_host!(v1);
older_host!(v2);

impl super::bindings::edgeproxy::policy::host::Host for GuestState {
    fn log(&mut self, message: String) -> wasmtime::Result<()> {
        // A line counts at least 64 bytes, so empty lines cannot flood either.
        self.logged += message.len().max(64);
        if self.logged > self.log_budget {
            let budget = self.log_budget;
            wasmtime::bail!("logged more than {budget} bytes in one call");
        }
        let mut end = message.len().min(LOG_LINE_MAX);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        tracing::debug!(policy = %self.policy_name, "{}", &message[..end]);
        Ok(())
    }

    fn random(&mut self) -> wasmtime::Result<u64> {
        Ok(fastrand::u64(..))
    }

    fn client_hello(&mut self) -> wasmtime::Result<Option<wit::TlsHello>> {
        Ok(self.tls.as_deref().map(super::wit_table::tls_hello))
    }
}

/// Engine and linker shared by every policy the host loads.
pub struct Runtime {
    engine: Engine,
    linker: Linker<GuestState>,
    limits: Limits,
    cache: Option<super::compile_cache::CompileCache>,
}

impl Runtime {
    pub fn new(limits: Limits) -> anyhow::Result<Self> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.consume_fuel(true);
        config.epoch_interruption(true);
        let engine = Engine::new(&config)?;
        // The ticker ends when the last handle to the engine is gone.
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("policy-epoch".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(EPOCH_TICK);
                    match weak.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => return,
                    }
                }
            })?;
        let mut linker = Linker::new(&engine);
        Policy::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;
        v2::Policy::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;
        v1::Policy::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;
        // Only components that import WASI get these (and with them async calls).
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;

        Ok(Self {
            engine,
            linker,
            limits,
            cache: None,
        })
    }

    /// Keeps compiled components in `dir` (see `compile_cache`); a directory that cannot
    /// be used safely is logged and compiling goes on without it.
    pub fn with_cache(mut self, dir: Option<&std::path::Path>) -> Self {
        self.cache = dir.and_then(|d| {
            super::compile_cache::CompileCache::open(d, &self.engine)
                .inspect_err(|e| tracing::warn!("{e}; policies are compiled at every load"))
                .ok()
        });
        self
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The imports and exports of a compiled component, for `edgeproxy policy check`.
    pub fn inspect(&self, component: &Component) -> Inspection {
        let ty = component.component_type();
        let names = |it: &mut dyn Iterator<Item = &str>| it.map(str::to_owned).collect();
        Inspection {
            imports: names(&mut ty.imports(&self.engine).map(|(n, _)| n)),
            exports: names(&mut ty.exports(&self.engine).map(|(n, _)| n)),
        }
    }

    /// Bytes (a component, or a core module, wrapped here) -> a compiled component, from
    /// the compile cache when it has it. Compiles: call it on a blocking thread.
    pub fn compile(&self, bytes: &[u8]) -> Result<Component, LoadError> {
        match &self.cache {
            Some(cache) => {
                let started = tokio::time::Instant::now();
                let (component, how) =
                    cache.get_or_compile(&self.engine, bytes, || self.compile_uncached(bytes))?;
                tracing::debug!(?how, took = ?started.elapsed(), bytes = bytes.len(), "policy component ready");
                Ok(component)
            }
            None => self.compile_uncached(bytes),
        }
    }

    pub fn compile_uncached(&self, bytes: &[u8]) -> Result<Component, LoadError> {
        let component_bytes = match wasm_kind(bytes) {
            Some(WasmKind::Component) => std::borrow::Cow::Borrowed(bytes),
            Some(WasmKind::Module) => std::borrow::Cow::Owned(componentize(bytes)?),
            None => {
                return Err(LoadError::NotWasm(format!(
                    "{} bytes starting {:02x?}",
                    bytes.len(),
                    &bytes[..bytes.len().min(8)]
                )));
            }
        };
        Component::new(&self.engine, &component_bytes).map_err(LoadError::Compile)
    }

    /// A compiled component -> pre-linked against the policy world, refusing any import
    /// beyond it and the WASI in `WASI_GRANTS`.
    pub fn link(&self, component: &Component) -> Result<Linked, LoadError> {
        let ty = component.component_type();
        let mut wasi = false;
        for (name, _) in ty.imports(&self.engine) {
            if name.starts_with("edgeproxy:policy/") {
                continue;
            }
            if wasi_grant(name).is_none() {
                return Err(LoadError::ForbiddenImport(name.to_owned()));
            }
            wasi = true;
        }
        let pre = self
            .linker
            .instantiate_pre(component)
            .map_err(LoadError::WrongWorld)?;
        // The contract its imports name (a policy imports its `host` or `types`), else
        // the current one; the error is the one of the contract it claims.
        let claims = |version: &str| {
            ty.imports(&self.engine)
                .any(|(name, _)| name.starts_with("edgeproxy:policy/") && name.ends_with(version))
        };
        let current = || match wasi {
            false => PolicyPre::new(pre.clone()).map(Linked::Plain),
            true => wasi::PolicyPre::new(pre.clone()).map(Linked::Wasi),
        };
        let v2 = || match wasi {
            false => v2::PolicyPre::new(pre.clone()).map(Linked::PlainV2),
            true => v2::wasi::PolicyPre::new(pre.clone()).map(Linked::WasiV2),
        };
        let v1 = || match wasi {
            false => v1::PolicyPre::new(pre.clone()).map(Linked::PlainV1),
            true => v1::wasi::PolicyPre::new(pre.clone()).map(Linked::WasiV1),
        };
        match (claims("@0.1.0"), claims("@0.2.0")) {
            (true, _) => v1().or_else(|e| current().map_err(|_| e)),
            (_, true) => v2().or_else(|e| current().map_err(|_| e)),
            _ => current()
                .or_else(|e| v2().map_err(|_| e))
                .or_else(|e| v1().map_err(|_| e)),
        }
        .map_err(LoadError::WrongWorld)
    }

    /// A fresh sandboxed instance.
    pub fn instantiate(
        &self,
        pre: &Linked,
        policy_name: &Arc<str>,
    ) -> wasmtime::Result<(Store<GuestState>, Guest)> {
        let mut resources = ResourceTable::new();
        resources.set_max_capacity(WASI_RESOURCES);
        let mut store = Store::new(
            &self.engine,
            GuestState {
                policy_name: Arc::clone(policy_name),
                limits: store_limits(self.limits.memory_bytes),
                logged: 0,
                log_budget: LOG_BYTES_PER_CALL,
                tls: None,
                wasi: deny_all_wasi(policy_name),
                resources,
            },
        );
        store.limiter(|s| &mut s.limits);
        // Instantiation runs the guest's start-up code, which needs fuel too, and the
        // host's copy of its memory image counts against the wall-clock backstop: an
        // interpreter's (componentize-py, ComponentizeJS) is megabytes. It gets what
        // set-table gets.
        self.arm(&mut store, super::SET_TABLE_BUDGETS);
        let guest = match pre {
            Linked::Plain(pre) => {
                let instance = pre.instance_pre().instantiate(&mut store)?;
                let rank = rank_export(&mut store, &instance)?;
                Guest::Plain(Policy::new(&mut store, &instance)?, rank)
            }
            Linked::Wasi(pre) => {
                let instance = at_once(pre.instance_pre().instantiate_async(&mut store))?;
                let rank = rank_export(&mut store, &instance)?;
                Guest::Wasi(wasi::Policy::new(&mut store, &instance)?, rank)
            }
            Linked::PlainV2(pre) => Guest::PlainV2(pre.instantiate(&mut store)?),
            Linked::WasiV2(pre) => Guest::WasiV2(at_once(pre.instantiate_async(&mut store))?),
            Linked::PlainV1(pre) => Guest::PlainV1(pre.instantiate(&mut store)?),
            Linked::WasiV1(pre) => Guest::WasiV1(at_once(pre.instantiate_async(&mut store))?),
        };
        Ok((store, guest))
    }

    /// Arms the time bound for the next call on `store`: `scale` budgets (set-table does
    /// more work than a decision).
    pub fn arm(&self, store: &mut Store<GuestState>, scale: u64) {
        // Invariant: fuel is enabled on this engine, so setting it cannot fail.
        let _ = store.set_fuel(self.limits.fuel().saturating_mul(scale));
        let budget = self
            .limits
            .timeout
            .saturating_mul(u32::try_from(scale).unwrap_or(u32::MAX));
        let ticks = budget.saturating_mul(BACKSTOP_BUDGETS).as_millis() / EPOCH_TICK.as_millis();
        store.set_epoch_deadline(u64::try_from(ticks).unwrap_or(u64::MAX).saturating_add(2));
        store.data_mut().logged = 0;
        store.data_mut().log_budget = LOG_BYTES_PER_CALL.saturating_mul(scale as usize);
    }
}

/// A component linked against the policy world, with or without WASI, of the current
/// contract, 0.2.0 or 0.1.0.
pub enum Linked {
    Plain(PolicyPre<GuestState>),
    Wasi(wasi::PolicyPre<GuestState>),
    PlainV2(v2::PolicyPre<GuestState>),
    WasiV2(v2::wasi::PolicyPre<GuestState>),
    PlainV1(v1::PolicyPre<GuestState>),
    WasiV1(v1::wasi::PolicyPre<GuestState>),
}

impl Linked {
    /// The contract version the component was built against.
    pub fn contract(&self) -> &'static str {
        match self {
            Linked::Plain(_) | Linked::Wasi(_) => "0.3.0",
            Linked::PlainV2(_) | Linked::WasiV2(_) => "0.2.0",
            Linked::PlainV1(_) | Linked::WasiV1(_) => "0.1.0",
        }
    }
}

/// An instance of any kind, called alike.
pub enum Guest {
    /// With `rank-backends` when the component is of the `ranking-policy` world.
    Plain(Policy, Option<RankFunc>),
    Wasi(wasi::Policy, Option<RankFunc>),
    PlainV2(v2::Policy),
    WasiV2(v2::wasi::Policy),
    PlainV1(v1::Policy),
    WasiV1(v1::wasi::Policy),
}

impl Guest {
    pub fn set_table(
        &self,
        store: &mut Store<GuestState>,
        table: &WitTable,
    ) -> wasmtime::Result<()> {
        match self {
            Guest::Plain(p, _) => p.call_set_table(store, &table.table),
            Guest::Wasi(p, _) => at_once(p.call_set_table(store, &table.table)),
            Guest::PlainV2(p) => p.call_set_table(store, table.v2()),
            Guest::WasiV2(p) => at_once(p.call_set_table(store, table.v2())),
            Guest::PlainV1(p) => p.call_set_table(store, table.v1()),
            Guest::WasiV1(p) => at_once(p.call_set_table(store, table.v1())),
        }
    }

    /// `tls`: the connection's ClientHello, which 0.3.0 gives through `host.client-hello`
    /// and 0.2.0 in the client.
    pub fn pick_backend(
        &self,
        store: &mut Store<GuestState>,
        app: Option<u32>,
        client: wit::Client,
        tls: Option<&Arc<TlsHello>>,
        candidates: &[u32],
    ) -> wasmtime::Result<Option<u32>> {
        match self {
            Guest::Plain(p, _) => with_tls(store, tls, |store| {
                p.call_pick_backend(store, app, client, candidates)
            }),
            Guest::Wasi(p, _) => with_tls(store, tls, |store| {
                at_once(p.call_pick_backend(store, app, client, candidates))
            }),
            Guest::PlainV2(p) => {
                p.call_pick_backend(store, app, &v2_client(client, tls), candidates)
            }
            Guest::WasiV2(p) => {
                at_once(p.call_pick_backend(store, app, &v2_client(client, tls), candidates))
            }
            Guest::PlainV1(p) => p.call_pick_backend(store, app, v1_client(client), candidates),
            Guest::WasiV1(p) => {
                at_once(p.call_pick_backend(store, app, v1_client(client), candidates))
            }
        }
    }

    /// Whether the component ranks in one call (`rank-backends`).
    pub fn ranks(&self) -> bool {
        matches!(self, Guest::Plain(_, Some(_)) | Guest::Wasi(_, Some(_)))
    }

    /// The component's `rank-backends` answer, one ranking per client; none from a
    /// component without it (ask [`Guest::ranks`] first). No ClientHello: rankings are
    /// for DNS answers.
    pub fn rank_backends(
        &self,
        store: &mut Store<GuestState>,
        app: Option<u32>,
        clients: Vec<wit::Client>,
        candidates: Vec<u32>,
        count: u32,
    ) -> wasmtime::Result<Vec<Vec<u32>>> {
        let args = (app, clients, candidates, count);
        let answer = match self {
            Guest::Plain(_, Some(rank)) => rank.call(store, args),
            Guest::Wasi(_, Some(rank)) => at_once(rank.call_async(store, args)),
            _ => return Ok(Vec::new()),
        };
        answer.map(|(ranked,)| ranked)
    }
}

/// `rank-backends` of the `ranking-policy` world.
pub type RankFunc = wasmtime::component::TypedFunc<
    (Option<u32>, Vec<wit::Client>, Vec<u32>, u32),
    (Vec<Vec<u32>>,),
>;

/// The component's `rank-backends`, when it exports one; one of another type refuses it.
fn rank_export(
    store: &mut Store<GuestState>,
    instance: &wasmtime::component::Instance,
) -> wasmtime::Result<Option<RankFunc>> {
    let Some(func) = instance.get_func(&mut *store, "rank-backends") else {
        return Ok(None);
    };
    let typed = func
        .typed(&*store)
        .map_err(|e| e.context("rank-backends"))?;
    Ok(Some(typed))
}

/// Runs a 0.3.0 call with the connection's ClientHello where `host.client-hello` finds it.
fn with_tls<R>(
    store: &mut Store<GuestState>,
    tls: Option<&Arc<TlsHello>>,
    call: impl FnOnce(&mut Store<GuestState>) -> wasmtime::Result<R>,
) -> wasmtime::Result<R> {
    store.data_mut().tls = tls.cloned();
    let answer = call(store);
    store.data_mut().tls = None;
    answer
}

/// A client as 0.2.0 has it: with the TLS fields.
fn v2_client(c: wit::Client, tls: Option<&Arc<TlsHello>>) -> v2::edgeproxy::policy::types::Client {
    use v2::edgeproxy::policy::types as old;
    let hello = tls.map(|t| super::wit_table::tls_hello(t));
    old::Client {
        ip: match c.ip {
            wit::IpAddress::Ipv4(a) => old::IpAddress::Ipv4(a),
            wit::IpAddress::Ipv6(a) => old::IpAddress::Ipv6(a),
        },
        country: c.country,
        region: c.region,
        via_proxy_protocol: c.via_proxy_protocol,
        sni: hello.as_ref().and_then(|h| h.sni.clone()),
        alpn: hello.map_or_else(Vec::new, |h| h.alpn),
    }
}

/// A client as 0.1.0 has it: without the TLS fields.
fn v1_client(c: wit::Client) -> v1::edgeproxy::policy::types::Client {
    use v1::edgeproxy::policy::types as old;
    old::Client {
        ip: match c.ip {
            wit::IpAddress::Ipv4(a) => old::IpAddress::Ipv4(a),
            wit::IpAddress::Ipv6(a) => old::IpAddress::Ipv6(a),
        },
        country: c.country,
        region: c.region,
        via_proxy_protocol: c.via_proxy_protocol,
    }
}

/// Runs an async call (on its fiber) to the end at once, without an executor. Nothing a
/// policy is granted has to wait, so one poll finishes a call; a call still pending
/// waits on a clock or a stream, and is a fault (dropping it unwinds the guest).
fn at_once<T>(call: impl Future<Output = wasmtime::Result<T>>) -> wasmtime::Result<T> {
    let mut call = std::pin::pin!(call);
    // wasmtime-wasi reaches for a tokio runtime (for timers); `policy check` has none.
    wasmtime_wasi::runtime::with_ambient_tokio_runtime(|| {
        match call
            .as_mut()
            .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
        {
            std::task::Poll::Ready(r) => r,
            std::task::Poll::Pending => Err(wasmtime::format_err!(
                "waited (on a clock or a stream); a policy must not block"
            )),
        }
    })
}

/// The bounds of one instance: memory, table elements, and few instances and tables.
/// (A componentize-py or ComponentizeJS component is several core modules, an
/// interpreter and adapters, each with its own memory: `memory_bytes` bounds each.)
fn store_limits(memory_bytes: usize) -> StoreLimits {
    StoreLimitsBuilder::new()
        .memory_size(memory_bytes)
        .table_elements(TABLE_ELEMENTS)
        .trap_on_grow_failure(true)
        .instances(32)
        .tables(16)
        .memories(4)
        .build()
}

/// What kind of file `bytes` is, in words.
pub fn describe_kind(bytes: &[u8]) -> &'static str {
    match wasm_kind(bytes) {
        Some(WasmKind::Component) => "component",
        Some(WasmKind::Module) => "core module (wrapped into a component on load)",
        None => "not WebAssembly",
    }
}

/// The outside of a policy file, for `edgeproxy policy check`.
#[derive(Debug, Clone)]
pub struct Inspection {
    pub imports: Vec<String>,
    pub exports: Vec<String>,
}

enum WasmKind {
    Module,
    Component,
}

fn wasm_kind(bytes: &[u8]) -> Option<WasmKind> {
    match bytes.get(..8)? {
        [0, b'a', b's', b'm', 1, 0, 0, 0] => Some(WasmKind::Module),
        [0, b'a', b's', b'm', _, _, 1, 0] => Some(WasmKind::Component),
        _ => None,
    }
}

/// The contract, for core modules that do not carry it.
static POLICY_WIT: &str = include_str!("../../../../../wit/policy.wit");
static POLICY_WIT_V2: &str = include_str!("../../../../../wit/v0.2/policy.wit");
static POLICY_WIT_V1: &str = include_str!("../../../../../wit/v0.1/policy.wit");

/// Wraps a core module into a component, like `wasm-tools component new`. A module from
/// wit-bindgen carries the WIT world in a `component-type` custom section; one without
/// (C, Zig or anything else that exports the canonical-ABI functions by hand) is given
/// the policy world first, so any language that makes a core module can write policies.
/// A module that imports WASI preview 1 (`cargo build --target wasm32-wasip1`) gets the
/// reactor adapter `cargo component` links, which turns those imports into WASI 0.2.
pub fn componentize(module: &[u8]) -> Result<Vec<u8>, LoadError> {
    let (typed, preview1) = outline(module);
    if typed {
        return encode(module.to_vec(), preview1);
    }
    // Written by hand against one contract: the current one, else 0.2.0 (whose
    // `pick-backend` takes its arguments through memory), else 0.1.0 (whose client has
    // no `tls`), and the current one's error if none fits.
    let with = |wit: &str| -> Result<Vec<u8>, LoadError> {
        let mut typed = module.to_vec();
        embed_policy_world(&mut typed, wit).map_err(LoadError::Componentize)?;
        encode(typed, preview1)
    };
    with(POLICY_WIT)
        .or_else(|e| with(POLICY_WIT_V2).map_err(|_| e))
        .or_else(|e| with(POLICY_WIT_V1).map_err(|_| e))
}

fn encode(module: Vec<u8>, preview1: bool) -> Result<Vec<u8>, LoadError> {
    use wasi_preview1_component_adapter_provider as p1;
    let mut encoder = wit_component::ComponentEncoder::default()
        .module(&module)
        .map_err(LoadError::Componentize)?
        .validate(true);
    if preview1 {
        encoder = encoder
            .adapter(
                p1::WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME,
                p1::WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER,
            )
            .map_err(LoadError::Componentize)?;
    }
    encoder.encode().map_err(LoadError::Componentize)
}

/// Whether a core module carries its WIT world, and whether it imports WASI preview 1.
fn outline(module: &[u8]) -> (bool, bool) {
    let (mut typed, mut preview1) = (false, false);
    for payload in wasmparser::Parser::new(0).parse_all(module).flatten() {
        match payload {
            wasmparser::Payload::CustomSection(s) => {
                typed |= s.name().starts_with("component-type");
            }
            wasmparser::Payload::ImportSection(imports) => {
                preview1 |= imports.into_imports().flatten().any(|i| {
                    i.module == wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME
                });
            }
            _ => {}
        }
    }
    (typed, preview1)
}

fn embed_policy_world(module: &mut Vec<u8>, wit: &str) -> anyhow::Result<()> {
    let mut resolve = wit_parser::Resolve::default();
    let package = resolve.push_source("policy.wit", wit)?;
    let world = resolve.select_world(&[package], Some("policy"))?;
    wit_component::embed_component_metadata(
        module,
        &resolve,
        world,
        wit_component::StringEncoding::UTF8,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(table 0 funcref)` and `grow(n)`: `table.grow` by n null references.
    const TABLE_GROWER: &[u8] = &[
        0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // magic, version
        0x01, 0x06, 0x01, 0x60, 0x01, 0x7f, 0x01, 0x7f, // type: (i32) -> i32
        0x03, 0x02, 0x01, 0x00, // one function of that type
        0x04, 0x04, 0x01, 0x70, 0x00, 0x00, // table: funcref, min 0, no max
        0x07, 0x08, 0x01, 0x04, b'g', b'r', b'o', b'w', 0x00, 0x00, // export "grow"
        0x0a, 0x0b, 0x01, 0x09, 0x00, // code: one body, no locals
        0xd0, 0x70, 0x20, 0x00, 0xfc, 0x0f, 0x00,
        0x0b, // ref.null func; local.get 0; table.grow 0
    ];

    /// Outgoing HTTP, key-value, WASI 0.3: refused at load, by name.
    #[test]
    fn imports_beyond_the_granted_wasi_are_refused_by_name() {
        let runtime = Runtime::new(Limits::default()).unwrap();
        for import in [
            "wasi:http/outgoing-handler@0.2.0",
            "wasi:keyvalue/store@0.2.0-draft",
            "wasi:cli/stdout@0.3.0",
            "acme:spy/exfiltrate",
        ] {
            let text = format!(r#"(component (import "{import}" (instance (export "f" (func)))))"#);
            let component = runtime.compile(&wat::parse_str(&text).unwrap()).unwrap();
            let err = runtime.link(&component).err().expect("refused").to_string();
            assert!(err.contains(import), "{err}");
            assert!(err.contains("WASI 0.2's cli, clocks"), "{err}");
        }
        assert_eq!(wasi_grant("wasi:cli/stdout@0.2.6"), WASI_GRANTS[3].1.into());
        assert_eq!(
            wasi_grant("wasi:filesystem/types@0.2.0"),
            Some("nothing: no directory to open a file from")
        );
    }

    #[test]
    fn table_growth_is_bounded() {
        let engine = Engine::default();
        let module = wasmtime::Module::new(&engine, TABLE_GROWER).unwrap();
        let mut store = Store::new(&engine, store_limits(16 << 20));
        store.limiter(|l| l);
        let instance = wasmtime::Instance::new(&mut store, &module, &[]).unwrap();
        let grow = instance
            .get_typed_func::<i32, i32>(&mut store, "grow")
            .unwrap();
        assert_eq!(
            grow.call(&mut store, 100).unwrap(),
            0,
            "small growth is fine"
        );
        // 10^7 elements would be 80 MB of host memory outside the memory cap.
        assert!(grow.call(&mut store, 10_000_000).is_err());
    }
}
