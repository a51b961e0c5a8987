//! Host bindings generated from `wit/policy.wit`, and nothing else.

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
