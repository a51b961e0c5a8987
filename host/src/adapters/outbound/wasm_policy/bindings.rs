//! Host bindings generated from `wit/policy.wit`, and nothing else.

wasmtime::component::bindgen!({
    world: "policy",
    path: "../wit",
});
