//! Sweeps expired bindings on a fixed interval, so clients that never return do not keep
//! memory (reads already ignore expired entries).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::domain::ports::BindingRepository;

pub async fn run(
    bindings: Arc<dyn BindingRepository>,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {
                let purged = bindings.purge_expired(Instant::now());
                if purged > 0 {
                    tracing::debug!(purged, left = bindings.len(), "expired bindings purged");
                }
            }
        }
    }
}
