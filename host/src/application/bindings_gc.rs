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
                let purged = sweep(&bindings).await;
                if purged > 0 {
                    tracing::debug!(purged, left = bindings.len(), "expired bindings purged");
                }
            }
        }
    }
}

/// One sweep, on a blocking thread; returns how many bindings expired. At a million
/// bindings a sweep takes about 20 ms: on a worker thread it held up every connection that
/// worker serves for as long (`cargo bench -p edgeproxy --bench bindings`).
pub async fn sweep(bindings: &Arc<dyn BindingRepository>) -> usize {
    let bindings = Arc::clone(bindings);
    tokio::task::spawn_blocking(move || bindings.purge_expired(Instant::now()))
        .await
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::outbound::binding_table::BindingTable;
    use crate::domain::BackendId;
    use crate::domain::ports::BindingKey;

    #[tokio::test(start_paused = true)]
    async fn expired_bindings_are_swept_on_the_interval() {
        let table = Arc::new(BindingTable::new(Duration::from_secs(40)));
        let key = |last: u8| BindingKey {
            client: std::net::IpAddr::from([192, 0, 2, last]),
            app: None,
        };
        table.put(key(1), BackendId::new("b1"), Instant::now());
        let stop = CancellationToken::new();
        let gc = tokio::spawn(run(table.clone(), Duration::from_secs(60), stop.clone()));
        tokio::time::sleep(Duration::from_secs(30)).await;
        table.put(key(2), BackendId::new("b1"), Instant::now());
        assert_eq!(table.len(), 2, "nothing is swept before the first interval");
        // The sweep at 60 s: the first binding expired at 40 s, the second lives to 70 s.
        tokio::time::sleep(Duration::from_secs(31)).await;
        assert_eq!(table.len(), 1);
        stop.cancel();
        gc.await.unwrap();
    }
}
