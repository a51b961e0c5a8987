//! Outbound adapters: implementations of the domain's ports.

pub mod binding_table;
pub mod maxmind_geo;
pub mod sqlite_editor;
pub mod sqlite_routing;
pub mod wasm_policy;
