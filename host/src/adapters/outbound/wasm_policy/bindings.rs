//! Host bindings generated from `wit/policy.wit` (0.3.0), `wit/v0.2/policy.wit` and
//! `wit/v0.1/policy.wit` (the contracts components built before 0.3.0 target), and
//! nothing else.

wasmtime::component::bindgen!({
    world: "policy",
    path: "../wit",
    // Host functions may trap the call (a policy that logs too much).
    imports: { default: trappable },
});

/// The same world for components that import WASI: wasmtime-wasi's host functions are
/// async, so their stores need async calls (run on a fiber). The types and the host
/// interface are the ones above; only the calls differ.
pub mod wasi {
    wasmtime::component::bindgen!({
        world: "policy",
        path: "../wit",
        imports: { default: trappable },
        exports: { default: async },
        with: {
            "edgeproxy:policy/types": super::edgeproxy::policy::types,
            "edgeproxy:policy/host": super::edgeproxy::policy::host,
        },
    });
}

/// The 0.1.0 contract: its client has no TLS fields; the rest is the same.
pub mod v1 {
    wasmtime::component::bindgen!({
        world: "policy",
        path: "../wit/v0.1/policy.wit",
        imports: { default: trappable },
    });

    pub mod wasi {
        wasmtime::component::bindgen!({
            world: "policy",
            path: "../wit/v0.1/policy.wit",
            imports: { default: trappable },
            exports: { default: async },
            with: {
                "edgeproxy:policy/types": super::edgeproxy::policy::types,
                "edgeproxy:policy/host": super::edgeproxy::policy::host,
            },
        });
    }
}

/// The 0.2.0 contract: its client carries the TLS fields (0.3.0's `host.client-hello`).
pub mod v2 {
    wasmtime::component::bindgen!({
        world: "policy",
        path: "../wit/v0.2/policy.wit",
        imports: { default: trappable },
    });

    pub mod wasi {
        wasmtime::component::bindgen!({
            world: "policy",
            path: "../wit/v0.2/policy.wit",
            imports: { default: trappable },
            exports: { default: async },
            with: {
                "edgeproxy:policy/types": super::edgeproxy::policy::types,
                "edgeproxy:policy/host": super::edgeproxy::policy::host,
            },
        });
    }
}
