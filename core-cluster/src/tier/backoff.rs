//! Retry timing for failed uploads and store opens: exponential backoff with jitter.
//!
//! The delay doubles per consecutive failure from `initial` up to `max`, and a random share of
//! up to half of it is taken off, so partitions that failed together (the store went down)
//! do not all retry in the same instant when it returns.

use std::time::{Duration, Instant};

/// Consecutive failures of one thing (a partition's offload, opening the store) and when it
/// may be tried again.
#[derive(Debug, Default)]
pub(crate) struct Retry {
    failures: u32,
    not_before: Option<Instant>,
}

impl Retry {
    /// Whether an attempt may start at `now`.
    pub(crate) fn due(&self, now: Instant) -> bool {
        self.not_before.is_none_or(|at| now >= at)
    }

    /// Records a failure at `now`; returns how long until the next attempt.
    pub(crate) fn failed(&mut self, now: Instant, initial: Duration, max: Duration) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let delay = delay(self.failures, initial, max, jitter_unit());
        self.not_before = Some(now + delay);
        delay
    }

    /// Records a success: the next failure starts again from `initial`.
    pub(crate) fn succeeded(&mut self) {
        self.failures = 0;
        self.not_before = None;
    }

    /// Consecutive failures so far.
    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }
}

/// The delay after the `failures`-th consecutive failure: `initial * 2^(failures-1)`, capped at
/// `max`, minus `jitter` (in `0.0..1.0`) times half of it.
pub(crate) fn delay(failures: u32, initial: Duration, max: Duration, jitter: f64) -> Duration {
    let doublings = failures.saturating_sub(1).min(32);
    let full = initial.saturating_mul(1u32 << doublings.min(31)).min(max);
    full.mul_f64(1.0 - 0.5 * jitter.clamp(0.0, 1.0))
}

/// A number in `0.0..1.0` that differs between calls and processes; backoff needs spread, not
/// cryptographic randomness, so the clock's nanoseconds and a counter mixed by a hash do.
fn jitter_unit() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(CALLS.fetch_add(1, Ordering::Relaxed));
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn delays_double_up_to_the_cap_and_jitter_takes_off_at_most_half() {
        let max = Duration::from_secs(60);
        assert_eq!(delay(1, SECOND, max, 0.0), SECOND);
        assert_eq!(delay(2, SECOND, max, 0.0), 2 * SECOND);
        assert_eq!(delay(4, SECOND, max, 0.0), 8 * SECOND);
        assert_eq!(delay(7, SECOND, max, 0.0), max);
        assert_eq!(delay(u32::MAX, SECOND, max, 0.0), max);
        assert_eq!(delay(1, SECOND, max, 1.0), SECOND / 2);
        for _ in 0..100 {
            let jittered = delay(3, SECOND, max, jitter_unit());
            assert!(
                (2 * SECOND..=4 * SECOND).contains(&jittered),
                "{jittered:?}"
            );
        }
    }

    #[test]
    fn a_failure_defers_the_next_attempt_and_a_success_resets() {
        let now = Instant::now();
        let mut retry = Retry::default();
        assert!(retry.due(now));
        let wait = retry.failed(now, SECOND, 10 * SECOND);
        assert!(!retry.due(now));
        assert!(retry.due(now + wait));
        retry.failed(now, SECOND, 10 * SECOND);
        assert_eq!(retry.failures(), 2);
        retry.succeeded();
        assert!(retry.due(now));
        assert_eq!(retry.failures(), 0);
    }
}
