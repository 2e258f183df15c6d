//! Retry policy: exponential backoff with full jitter.

use std::time::Duration;

/// How long to wait before retrying a failed task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryBackoff {
    pub base: Duration,
    pub max: Duration,
}

impl RetryBackoff {
    /// The upper bound of the delay after `failed_attempt` (1-based) failed:
    /// `min(max, base * 2^(failed_attempt - 1))`.
    pub fn ceiling(&self, failed_attempt: u32) -> Duration {
        let doublings = failed_attempt.saturating_sub(1).min(32);
        self.base
            .checked_mul(1u32 << doublings.min(31))
            .map_or(self.max, |delay| delay.min(self.max))
    }

    /// Full jitter: a uniformly random delay in `[0, ceiling)`, given `jitter` in `[0, 1)`.
    /// Spreading retries over the whole window keeps a burst of failures from coming back as
    /// a burst.
    pub fn delay(&self, failed_attempt: u32, jitter: f64) -> Duration {
        self.ceiling(failed_attempt).mul_f64(jitter.clamp(0.0, 1.0))
    }
}

/// Whether a failure of `attempt` (1-based) is retried.
pub fn will_retry(retryable: bool, attempt: u32, max_attempts: u32) -> bool {
    retryable && attempt < max_attempts
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: RetryBackoff = RetryBackoff {
        base: Duration::from_secs(1),
        max: Duration::from_secs(300),
    };

    #[test]
    fn ceiling_doubles_per_attempt_until_the_cap() {
        assert_eq!(POLICY.ceiling(1), Duration::from_secs(1));
        assert_eq!(POLICY.ceiling(2), Duration::from_secs(2));
        assert_eq!(POLICY.ceiling(5), Duration::from_secs(16));
        assert_eq!(POLICY.ceiling(9), Duration::from_secs(256));
        assert_eq!(POLICY.ceiling(10), Duration::from_secs(300));
        assert_eq!(POLICY.ceiling(u32::MAX), Duration::from_secs(300));
    }

    #[test]
    fn delay_is_the_jittered_fraction_of_the_ceiling() {
        assert_eq!(POLICY.delay(3, 0.0), Duration::ZERO);
        assert_eq!(POLICY.delay(3, 0.5), Duration::from_secs(2));
        assert!(POLICY.delay(3, 0.999) < Duration::from_secs(4));
    }

    #[test]
    fn only_retryable_failures_with_attempts_left_are_retried() {
        assert!(will_retry(true, 1, 3));
        assert!(!will_retry(true, 3, 3));
        assert!(!will_retry(false, 1, 3));
    }
}
