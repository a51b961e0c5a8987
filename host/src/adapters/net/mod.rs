//! Socket technology: how bytes move between a client and a backend (`relay`: one poll
//! loop per connection, splice(2) on Linux) and the buffers and pipes they borrow for it
//! (`pool`). What a connection means (decide, connect, fail over) is the application's.

pub mod pool;
pub mod relay;

pub use pool::BufferPool;
