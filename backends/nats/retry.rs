//! The retry budget: how long the backend keeps retrying an operation that failed with a
//! temporary error (a stream without a leader during an election, a node that restarts, a
//! connection moving to another node of the cluster) before it gives the error to its caller.
//!
//! A JetStream cluster elects a new stream leader within a few seconds of losing one (the
//! Raft election timeout is 4-9 s on nats-server 2.9, and a restarted node catches up in a few
//! more); [`BUDGET`] covers that with room to spare. Writes that are retried carry a
//! `Nats-Msg-Id` fixed for the whole operation, so a write whose answer was lost and that is
//! sent again is recognised by the server as a duplicate (within the stream's duplicate window,
//! two minutes) and answered with the first one's sequence: a retry never writes twice.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::{Error, Result};

/// How long an operation is retried on temporary errors before the caller sees the error.
pub(crate) const BUDGET: Duration = Duration::from_secs(30);

/// The first pause between two attempts; doubled after each, up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(50);

/// The longest pause between two attempts.
const MAX_PAUSE: Duration = Duration::from_secs(1);

/// Runs `op` until it succeeds, fails with a permanent error, or fails with a temporary one
/// after [`BUDGET`] has passed since the first attempt. `what` names the operation in logs.
pub(crate) async fn within_budget<T, F, Fut>(what: &str, mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let deadline = Instant::now() + BUDGET;
    let mut pause = FIRST_PAUSE;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        match op().await {
            Ok(v) => {
                if attempts > 1 {
                    tracing::info!(what, attempts, "succeeded after temporary errors");
                }
                return Ok(v);
            }
            Err(e) if e.is_temporary() && Instant::now() + pause < deadline => {
                tracing::debug!(what, attempts, error = %e, "temporary error; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_PAUSE);
            }
            Err(e) => return Err(e),
        }
    }
}

/// A temporary error saying that `what` gave no answer its caller can trust yet.
pub(crate) fn unsettled(what: String) -> Error {
    Error::temporary(super::BACKEND, what, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn temporary_errors_are_retried_and_permanent_ones_are_not() {
        let calls = AtomicU32::new(0);
        let got = within_budget("t", || async {
            match calls.fetch_add(1, Ordering::Relaxed) {
                0..=2 => Err(unsettled("not yet".into())),
                n => Ok(n),
            }
        })
        .await
        .unwrap();
        assert_eq!(got, 3);
        let calls = AtomicU32::new(0);
        let e = within_budget("t", || async {
            calls.fetch_add(1, Ordering::Relaxed);
            Err::<(), _>(Error::permanent(super::super::BACKEND, "no", None))
        })
        .await
        .unwrap_err();
        assert!(!e.is_temporary());
        assert_eq!(calls.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_temporary_error_reaches_the_caller_once_the_budget_is_spent() {
        let start = Instant::now();
        let e = within_budget("t", || async { Err::<(), _>(unsettled("down".into())) })
            .await
            .unwrap_err();
        assert!(e.is_temporary());
        let spent = start.elapsed();
        assert!(spent <= BUDGET, "{spent:?}");
        assert!(spent >= BUDGET - MAX_PAUSE * 2, "{spent:?}");
    }
}
