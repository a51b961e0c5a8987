//! The circuit breaker of a policy that keeps faulting. Each fault costs up to ~20 call
//! budgets (a fresh instance and the table fed to it), so a policy that faults on every
//! call would take the connection rate down with it. After `TRIP` faults within
//! `WINDOW` the policy is suspended (the native scorer decides) for a backoff that
//! doubles while it keeps tripping, up to `MAX_BACKOFF`; then it is tried again.
//!
//! The hot path reads one atomic (suspended or not); faults take a lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

pub const TRIP: u32 = 10;
pub const WINDOW: Duration = Duration::from_secs(10);
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub struct Breaker {
    start: Instant,
    /// Milliseconds since `start` until which the policy is suspended; 0: it is not.
    until_ms: AtomicU64,
    pub suspensions: AtomicU64,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    window_start_ms: u64,
    faults: u32,
    backoff: Duration,
    /// When the last suspension ended.
    last_end_ms: Option<u64>,
}

impl Default for Breaker {
    fn default() -> Self {
        Self {
            start: Instant::now(),
            until_ms: AtomicU64::new(0),
            suspensions: AtomicU64::new(0),
            state: Mutex::default(),
        }
    }
}

impl Breaker {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// How long the policy stays suspended from now, if it is.
    pub fn suspended_for(&self) -> Option<Duration> {
        match self.until_ms.load(Ordering::Relaxed) {
            0 => None,
            until => {
                let now = self.now_ms();
                (now < until).then(|| Duration::from_millis(until - now))
            }
        }
    }

    /// Counts a fault; Some(backoff) when it suspends the policy.
    pub fn fault(&self) -> Option<Duration> {
        // Poisoning cannot leave the counters in a state worse than a lost fault.
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let now = self.now_ms();
        let window = u64::try_from(WINDOW.as_millis()).unwrap_or(u64::MAX);
        if now.saturating_sub(s.window_start_ms) > window || s.faults == 0 {
            s.window_start_ms = now;
            s.faults = 0;
        }
        s.faults += 1;
        if s.faults < TRIP {
            return None;
        }
        // Tripping again soon after the last suspension ended doubles the backoff.
        let again = s
            .last_end_ms
            .is_some_and(|end| now.saturating_sub(end) <= window);
        s.backoff = match again {
            true => (s.backoff * 2).min(MAX_BACKOFF),
            false => FIRST_BACKOFF,
        };
        let until = now + u64::try_from(s.backoff.as_millis()).unwrap_or(u64::MAX);
        s.last_end_ms = Some(until);
        s.faults = 0;
        self.until_ms.store(until.max(1), Ordering::Relaxed);
        self.suspensions.fetch_add(1, Ordering::Relaxed);
        Some(s.backoff)
    }

    /// A new policy starts with a clean record.
    pub fn reset(&self) {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner) = State::default();
        self.until_ms.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trip(b: &Breaker) -> Option<Duration> {
        (0..TRIP).filter_map(|_| b.fault()).last()
    }

    #[tokio::test(start_paused = true)]
    async fn trips_after_repeated_faults_and_backs_off_while_they_go_on() {
        let b = Breaker::default();
        for _ in 1..TRIP {
            assert_eq!(b.fault(), None);
        }
        assert_eq!(b.fault(), Some(FIRST_BACKOFF));
        assert_eq!(b.suspended_for(), Some(FIRST_BACKOFF));
        tokio::time::advance(FIRST_BACKOFF).await;
        assert_eq!(b.suspended_for(), None, "tried again after the backoff");
        // Faulting on at once: twice as long, up to the cap.
        assert_eq!(trip(&b), Some(FIRST_BACKOFF * 2));
        let mut backoff = FIRST_BACKOFF * 2;
        for _ in 0..10 {
            tokio::time::advance(backoff).await;
            backoff = trip(&b).unwrap();
        }
        assert_eq!(backoff, MAX_BACKOFF);
        // A policy that behaves for a while starts over.
        tokio::time::advance(MAX_BACKOFF + WINDOW * 2).await;
        assert_eq!(trip(&b), Some(FIRST_BACKOFF));
        assert_eq!(b.suspensions.load(Ordering::Relaxed), 13);
    }

    #[tokio::test(start_paused = true)]
    async fn sparse_faults_never_trip() {
        let b = Breaker::default();
        for _ in 0..100 {
            assert_eq!(b.fault(), None);
            tokio::time::advance(WINDOW / 5).await;
        }
    }
}
