//! Application services: the per-connection orchestration (`proxy_service`, with the
//! byte copying in `relay`) and the
//! background work that keeps the domain's inputs fresh (`routing`, `bindings_gc`).

pub mod admin;
pub mod bindings_gc;
pub mod proxy_service;
pub mod routing;
pub mod telemetry;
