//! Pure domain services: the region of a country, and the native scoring policy.

pub mod regions;
pub mod scoring;

pub use regions::RegionMap;
pub use scoring::NativeScorer;
