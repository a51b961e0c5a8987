//! A shared helper for warnings that can repeat per connection or per call: at most one
//! line per period, with the count of what was held back. Counters stay exact elsewhere.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Lets a repeating warning through at most once per period and counts what it held
/// back, so a policy that faults on every connection logs once a second, not 10,000
/// times. The counters keep the full count either way.
#[derive(Debug)]
pub struct LogThrottle {
    start: tokio::time::Instant,
    period_ms: u64,
    /// Milliseconds since `start` before which nothing more is logged.
    next_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl LogThrottle {
    pub fn new(period: Duration) -> Self {
        Self {
            start: tokio::time::Instant::now(),
            period_ms: u64::try_from(period.as_millis()).unwrap_or(u64::MAX),
            next_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Some(number held back since the last one) when this occurrence should be logged.
    pub fn allow(&self) -> Option<u64> {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.allow_at(now)
    }

    fn allow_at(&self, now_ms: u64) -> Option<u64> {
        let next = self.next_ms.load(Ordering::Relaxed);
        let won = now_ms >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now_ms + self.period_ms,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok();
        if won {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_logs_once_per_period_and_counts_the_rest() {
        let t = LogThrottle::new(Duration::from_secs(1));
        assert_eq!(t.allow_at(0), Some(0));
        assert_eq!(t.allow_at(10), None);
        assert_eq!(t.allow_at(999), None);
        assert_eq!(t.allow_at(1000), Some(2));
        assert_eq!(t.allow_at(1500), None);
        assert_eq!(t.allow_at(5000), Some(1));
    }
}
