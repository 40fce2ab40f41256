//! Backoff: for task retries (a handler error) and for temporary backend errors.

use std::future::Future;
use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Exponential backoff with jitter: attempt `n` (1-based) waits
/// `min(max, base * factor^(n-1))`, scaled by a random factor in `[1 - jitter, 1]`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Backoff {
    /// The first delay.
    #[serde(with = "crate::clock::duration_serde")]
    pub base: Duration,
    /// The growth factor per attempt (>= 1).
    pub factor: f64,
    /// The largest delay.
    #[serde(with = "crate::clock::duration_serde")]
    pub max: Duration,
    /// Fraction of the delay that is randomised (0 = none, 1 = full jitter).
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_secs(1),
            factor: 2.0,
            max: Duration::from_secs(300),
            jitter: 0.2,
        }
    }
}

impl Backoff {
    /// The backoff used while a backend is unreachable: 50 ms doubling to 2 s.
    pub fn backend() -> Self {
        Backoff {
            base: Duration::from_millis(50),
            factor: 2.0,
            max: Duration::from_secs(2),
            jitter: 0.3,
        }
    }

    /// Checks the policy's numbers.
    pub fn validate(&self, key: &str) -> Result<()> {
        if !(self.factor >= 1.0 && self.factor.is_finite()) {
            return Err(Error::config(
                format!("{key}.factor"),
                format!("must be a finite number >= 1, got {}", self.factor),
            ));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(Error::config(
                format!("{key}.jitter"),
                format!("must be between 0 and 1, got {}", self.jitter),
            ));
        }
        if self.max < self.base {
            return Err(Error::config(
                format!("{key}.max"),
                "must not be smaller than the base delay",
            ));
        }
        Ok(())
    }

    /// The delay before retry number `attempt` (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self.factor.powi(attempt.saturating_sub(1).min(64) as i32);
        let raw = self.base.as_secs_f64() * exp;
        let capped = raw.min(crate::clock::capped(self.max).as_secs_f64());
        let scale = if self.jitter > 0.0 {
            1.0 - rand::rng().random_range(0.0..=self.jitter)
        } else {
            1.0
        };
        Duration::from_secs_f64((capped * scale).max(0.0))
    }
}

/// Runs `op` until it succeeds or fails with a permanent error, sleeping with
/// [`Backoff::backend`] between temporary failures, for at most `budget` in total. The budget
/// turns an endless outage into an [`Error::Timeout`] instead of a hang.
pub async fn with_backend_retry<T, F, Fut>(what: &str, budget: Duration, mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let policy = Backoff::backend();
    let deadline = tokio::time::Instant::now() + crate::clock::capped(budget);
    let mut attempt = 0;
    loop {
        attempt += 1;
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_temporary() => {
                let wait = policy.delay(attempt);
                if tokio::time::Instant::now() + crate::clock::capped(wait) > deadline {
                    return Err(Error::Timeout(format!(
                        "{what}: backend still failing after {attempt} tries: {e}"
                    )));
                }
                tracing::warn!(what, attempt, error = %e, "temporary backend error; retrying");
                tokio::time::sleep(wait).await;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let b = Backoff {
            base: Duration::from_millis(100),
            factor: 2.0,
            max: Duration::from_millis(500),
            jitter: 0.0,
        };
        assert_eq!(b.delay(1), Duration::from_millis(100));
        assert_eq!(b.delay(2), Duration::from_millis(200));
        assert_eq!(b.delay(3), Duration::from_millis(400));
        assert_eq!(b.delay(4), Duration::from_millis(500));
        assert_eq!(b.delay(1000), Duration::from_millis(500));
    }

    #[test]
    fn invalid_backoff_names_the_key() {
        let b = Backoff {
            factor: 0.5,
            ..Backoff::default()
        };
        let e = b.validate("worker.retry").unwrap_err();
        assert!(e.to_string().contains("worker.retry.factor"), "{e}");
    }

    #[tokio::test]
    async fn temporary_errors_are_retried_and_permanent_ones_are_not() {
        let mut calls = 0;
        let r: Result<u32> = with_backend_retry("t", Duration::from_secs(5), || {
            calls += 1;
            let c = calls;
            async move {
                if c < 3 {
                    Err(Error::temporary("memory", "down", None))
                } else {
                    Ok(c)
                }
            }
        })
        .await;
        assert_eq!(r.unwrap(), 3);
        let mut calls = 0;
        let r: Result<u32> = with_backend_retry("t", Duration::from_secs(5), || {
            calls += 1;
            async { Err(Error::invalid("x", "bad")) }
        })
        .await;
        assert!(r.is_err());
        assert_eq!(calls, 1);
    }
}
