//! Outbound adapters: implementations of the domain's ports.
//!
//! - `sqlite_routing`: the routing table reader (`BackendRepository`), schema and row checks.
//! - `sqlite_editor`: operators' writes to the same file (rows, and `import` of SQL/CSV).
//! - `sqlite_replica`: versions and local-write capture for the cluster (same file).
//! - `sqlite_fleet`: policy deployments, POP reports and components for the fleet (`<db>.fleet`).
//! - `postgres`: the routing table in PostgreSQL instead (`BackendRepository`, editor,
//!   registrations), with change notifications.
//! - `tcp_probe`: one health check (connect, send, expect).
//! - `binding_table`: sticky bindings in a DashMap (`BindingRepository`).
//! - `maxmind_geo`: GeoIP lookups (`GeoResolver`), embedded database or a file.
//! - `wasm_policy`: the policy component (`ScoringPolicy`, `PolicyControl`).

pub mod binding_table;
pub mod maxmind_geo;
pub mod postgres;
pub mod sqlite_editor;
pub mod sqlite_fleet;
pub mod sqlite_replica;
pub mod sqlite_routing;
pub mod tcp_probe;
pub mod wasm_policy;
