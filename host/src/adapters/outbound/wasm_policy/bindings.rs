//! Host bindings generated from `wit/policy.wit`, and nothing else.

wasmtime::component::bindgen!({
    world: "policy",
    path: "../wit",
    // Host functions may trap the call (a policy that logs too much).
    imports: { default: trappable },
});
