//! The conformance suite every backend runs (feature `testkit`).
//!
//! The suite is a set of plain `pub async fn name(b: &Backends)` functions, one per behaviour a
//! backend promises, grouped by trait: [`bus`], [`registry`], [`tasks`] and [`locks`]. Each one panics with a
//! message that says what went wrong, wraps every backend call in a generous timeout (a broken
//! backend fails instead of hanging), and finishes in a few seconds on a healthy backend (leases of
//! one or two seconds where an expiry must be observed). No test asserts how fast anything is.
//!
//! A backend runs the whole suite with one macro line in a test file, given a function that opens
//! the backends under a prefix and one that deletes everything under that prefix:
//!
//! ```ignore
//! use agent_orchestra::{connect, BackendUrls, Backends, ConnectOptions};
//! use agent_orchestra::testkit::harness::{broker_url, BrokerKind};
//!
//! async fn make_backends(prefix: &str) -> Backends {
//!     let url = broker_url(BrokerKind::Redis).await;
//!     let opts = ConnectOptions { prefix: prefix.to_string(), ..ConnectOptions::default() };
//!     connect(&BackendUrls::all(url), &opts).await.expect("connect to the test broker")
//! }
//!
//! async fn cleanup(prefix: &str) {
//!     // delete every key / stream / queue whose name starts with `prefix`
//! }
//!
//! agent_orchestra::conformance_suite!(make_backends, cleanup);
//! ```
//!
//! It expands to one `#[test]` per suite function, named like the function. Each test gets a
//! fresh [`harness::unique_prefix`], runs `make_backends(prefix)` and the suite function in a task
//! on its own multi-thread Tokio runtime (two workers, as `#[tokio::test(flavor =
//! "multi_thread", worker_threads = 2)]` would build), then **always** runs `cleanup(prefix)`,
//! also when the test panicked or timed out, before reporting the failure. The expansion names
//! everything through `$crate::`, so a third-party crate needs no dependency besides this one
//! (with the `testkit` feature).
//!
//! Payload-not-JSON and malformed-message handling are the engine's job and are proved by the
//! engine suite, not here.
//!
//! Tests that need a broker of their own (stopped and started again, or a port where no broker
//! answers) are in [`brokers`]: plain functions taking a [`brokers::BrokerControl`], which a
//! backend's test file calls in one line. A unit test checks that every suite function is listed
//! in its macro.

pub mod brokers;
pub mod bus;
pub mod control;
pub mod engine;
pub mod engine_control;
pub mod engine_limits;
pub mod harness;
pub mod locks;
#[cfg(feature = "nats")]
pub mod nats_cluster;
pub mod options;
mod private_broker;
pub mod rabbitmq_cluster;
pub mod redis_cluster;
pub mod registry;
pub mod schedule;
#[cfg(test)]
mod suite_lists;
pub mod tasks;

use std::any::Any;
use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use crate::error::Result;

/// Longest a single backend call may take in the suite before the test fails.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest a whole suite test (opening the backends included) may run before it is aborted.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Longest the cleanup of one test may take.
pub const CLEANUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs one suite test the way [`conformance_suite!`](crate::conformance_suite) does: on a new
/// multi-thread Tokio runtime with two workers, `test` in a spawned task bounded by
/// [`TEST_TIMEOUT`], then `cleanup` whatever happened (bounded by [`CLEANUP_TIMEOUT`]), then the
/// test's panic, if any, is raised again (else the cleanup's).
///
/// Public so that other suites (the engine suite) and hand-written backend tests can share the
/// same always-clean-up discipline.
pub fn run_suite_test<T, C>(name: &str, test: T, cleanup: C)
where
    T: Future<Output = ()> + Send + 'static,
    C: Future<Output = ()> + Send + 'static,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{name}: cannot build the Tokio runtime: {e}"));
    let failure = runtime.block_on(async {
        let mut test_task = tokio::spawn(test);
        let test_failure: Option<Box<dyn Any + Send>> =
            match tokio::time::timeout(TEST_TIMEOUT, &mut test_task).await {
                Ok(Ok(())) => None,
                Ok(Err(e)) if e.is_panic() => Some(e.into_panic()),
                Ok(Err(e)) => Some(Box::new(format!("{name}: the test task ended abnormally: {e}"))),
                Err(_) => {
                    test_task.abort();
                    let _ = test_task.await;
                    Some(Box::new(format!(
                        "{name}: did not finish within {TEST_TIMEOUT:?} (a backend call hung?)"
                    )))
                }
            };
        let cleanup_failure: Option<Box<dyn Any + Send>> =
            match tokio::time::timeout(CLEANUP_TIMEOUT, tokio::spawn(cleanup)).await {
                Ok(Ok(())) => None,
                Ok(Err(e)) if e.is_panic() => Some(e.into_panic()),
                Ok(Err(e)) => Some(Box::new(format!("{name}: cleanup ended abnormally: {e}"))),
                Err(_) => Some(Box::new(format!(
                    "{name}: cleanup did not finish within {CLEANUP_TIMEOUT:?}"
                ))),
            };
        match (test_failure, cleanup_failure) {
            (Some(t), Some(c)) => {
                tracing::error!(test = name, cleanup_panic = %panic_text(&*c), "cleanup failed after the test failed");
                Some(t)
            }
            (t, c) => t.or(c),
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(5));
    if let Some(payload) = failure {
        std::panic::resume_unwind(payload);
    }
}

fn panic_text(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-text panic)".to_string()
    }
}

/// Runs the whole conformance suite ([`bus`], [`registry`], [`tasks`], [`locks`]) against a
/// backend.
///
/// `$make` is an `async fn(prefix: &str) -> agent_orchestra::Backends` that opens the backends
/// under `prefix`; `$cleanup` is an `async fn(prefix: &str)` that deletes everything created
/// under it. Expands to one `#[test]` per suite function, named like the function; see the
/// [module documentation](crate::testkit) for what each test does around the suite function.
#[macro_export]
macro_rules! conformance_suite {
    ($make:path, $cleanup:path $(,)?) => {
        $crate::__suite_tests! {
            $make, $cleanup;
            bus: [
                fan_out_reaches_every_subscriber_in_order,
                an_event_published_right_after_subscribe_is_delivered,
                competing_consumers_get_each_message_exactly_once,
                fetch_from_an_empty_queue_returns_nothing_after_waiting,
                fetch_of_usize_max_gets_what_is_there,
                ack_removes_the_message,
                nack_with_delay_redelivers_after_the_delay_and_not_before,
                unacked_message_is_redelivered_after_its_lease_ends,
                extend_keeps_the_lease_beyond_its_original_end,
                message_is_dead_lettered_after_max_deliveries,
                dead_letter_keeps_the_reason_and_stops_delivery,
                strict_priority_holds_with_a_backlog_and_prefetch,
                delayed_enqueue_is_not_delivered_before_its_delay,
                stats_reflect_waiting_in_flight_and_dead,
                payload_round_trips_through_the_queue,
            ];
            registry: [
                create_then_get_round_trips_every_field,
                create_twice_fails_with_task_exists,
                transition_is_a_compare_and_set,
                illegal_transition_is_rejected,
                only_one_of_fifty_concurrent_claimers_wins,
                stale_attempt_cannot_complete_after_a_takeover,
                counts_reflect_each_status,
                stale_running_returns_expired_leases_oldest_first,
                list_paginates_by_status_and_queue,
                dependents_lists_the_children_of_a_parent,
                purge_finished_by_count_keeps_the_most_recent,
                purge_finished_by_age_leaves_unfinished_tasks_alone,
                unknown_task_is_not_found,
                task_payload_round_trips_through_the_registry,
            ];
            tasks: [
                submit_stores_publishes_and_announces,
                fetch_claim_claims_pending_tasks,
                claim_refuses_what_is_not_claimable,
                record_completes_acks_and_lists_dependents,
                record_with_nack_gives_the_message_back_once,
                record_from_a_lost_attempt_conflicts_and_acks,
                records_made_at_once_each_get_their_own_outcome,
                record_does_not_take_another_writers_state_for_its_own,
            ];
            locks: [
                second_acquire_by_another_owner_gets_none,
                lock_is_exclusive_under_contention,
                fencing_tokens_strictly_increase,
                lock_expires_after_its_ttl,
                extend_by_owner_keeps_the_lock_past_its_ttl,
                non_owner_cannot_release_or_extend,
                holder_reports_owner_and_token,
                bad_lock_key_is_invalid_input,
            ];
            control: [
                paused_flag_is_stored_listed_and_cleared,
                queues_and_their_counts_follow_the_tasks,
                removed_dead_letters_are_gone_and_the_others_stay,
                delayed_count_is_exact_when_reported,
                removing_from_a_queue_without_dead_letters_removes_nothing,
                queue_limits_are_stored_listed_and_cleared,
            ];
        }
    };
}

/// Expands `module: [fn, ...];` lists into one `#[test]` per function (used by
/// [`conformance_suite!`](crate::conformance_suite) and the engine suite).
#[doc(hidden)]
#[macro_export]
macro_rules! __suite_tests {
    ($make:path, $cleanup:path; $($module:ident : [$($name:ident),* $(,)?];)*) => {
        $($(
            #[test]
            fn $name() {
                let prefix = $crate::testkit::harness::unique_prefix(::std::stringify!($name));
                let test_prefix = ::std::clone::Clone::clone(&prefix);
                $crate::testkit::run_suite_test(
                    ::std::stringify!($name),
                    async move {
                        let backends: $crate::Backends = $make(&test_prefix).await;
                        let again = ::std::clone::Clone::clone(&test_prefix);
                        let reconnect: $crate::testkit::Reconnect = ::std::sync::Arc::new(move || {
                            let p = ::std::clone::Clone::clone(&again);
                            $crate::testkit::boxed_backends(async move { $make(&p).await })
                        });
                        $crate::testkit::with_reconnect(
                            reconnect,
                            $crate::testkit::$module::$name(&backends),
                        )
                        .await;
                    },
                    async move {
                        $cleanup(&prefix).await;
                    },
                );
            }
        )*)*
    };
}

// ---- helpers shared by the suite modules ----

/// Opens another connection to a suite test's brokers and namespace, as a second process has
/// (the engine suite's tests of limits across workers use one).
pub type Reconnect =
    std::sync::Arc<dyn Fn() -> futures::future::BoxFuture<'static, crate::Backends> + Send + Sync>;

tokio::task_local! {
    static RECONNECT: Reconnect;
}

/// Runs a suite test with `reconnect` at hand for [`another_process`] (used by the suite
/// macros).
#[doc(hidden)]
pub async fn with_reconnect<F: Future>(reconnect: Reconnect, test: F) -> F::Output {
    RECONNECT.scope(reconnect, test).await
}

/// Boxes the future of a backends' maker (used by the suite macros).
#[doc(hidden)]
pub fn boxed_backends<F>(make: F) -> futures::future::BoxFuture<'static, crate::Backends>
where
    F: Future<Output = crate::Backends> + Send + 'static,
{
    Box::pin(make)
}

/// Backends over connections of their own to `b`'s brokers and namespace, as a second process
/// has; `b` itself where a role is in memory (one process's memory is not shared) or outside a
/// suite test.
pub(crate) async fn another_process(b: &crate::Backends) -> crate::Backends {
    let roles = [b.bus.backend(), b.registry.backend(), b.locks.backend()];
    if roles.contains(&"memory") {
        return b.clone();
    }
    match RECONNECT.try_with(|r| r.clone()) {
        Ok(reconnect) => reconnect().await,
        Err(_) => b.clone(),
    }
}

/// Awaits `fut` for at most `limit`, panicking with `what` when it takes longer.
pub(crate) async fn within<T>(
    what: impl Display,
    limit: Duration,
    fut: impl Future<Output = T>,
) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

/// Awaits a backend call for at most [`CALL_TIMEOUT`] and unwraps it, panicking with `what` and
/// the error otherwise.
pub(crate) async fn must<T>(what: impl Display, fut: impl Future<Output = Result<T>>) -> T {
    must_within(what, CALL_TIMEOUT, fut).await
}

/// [`must`] with an explicit time limit (for calls that wait on purpose, like `fetch`).
pub(crate) async fn must_within<T>(
    what: impl Display,
    limit: Duration,
    fut: impl Future<Output = Result<T>>,
) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => panic!("{what} failed: {e} ({e:?})"),
        Err(_) => panic!("{what} did not answer within {limit:?}"),
    }
}

/// Polls `check` every 50 ms until it returns `Ok`, for at most `limit`; panics with `what` and
/// the last observation (the `Err` text) otherwise.
pub(crate) async fn eventually<T, F, Fut>(what: impl Display, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let last = match tokio::time::timeout_at(deadline, check()).await {
            Ok(Ok(v)) => return v,
            Ok(Err(seen)) => seen,
            Err(_) => "(the last check itself did not finish)".to_string(),
        };
        if tokio::time::Instant::now() >= deadline {
            panic!("{what}: still not so after {limit:?}; last seen: {last}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Awaits spawned tasks, raising the first panic among them again.
pub(crate) async fn join_all<T>(what: &str, handles: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::with_capacity(handles.len());
    for (i, h) in handles.into_iter().enumerate() {
        match h.await {
            Ok(v) => out.push(v),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("{what} #{i} ended abnormally: {e}"),
        }
    }
    out
}

/// Describes where two byte strings first differ, without printing megabytes.
pub(crate) fn describe_difference(want: &[u8], got: &[u8]) -> Option<String> {
    if want == got {
        return None;
    }
    let at = want
        .iter()
        .zip(got)
        .position(|(a, b)| a != b)
        .unwrap_or(want.len().min(got.len()));
    let window = |b: &[u8]| {
        String::from_utf8_lossy(&b[at.min(b.len())..(at + 24).min(b.len())]).into_owned()
    };
    Some(format!(
        "expected {} bytes, got {} bytes; first difference at byte {at}: expected {:?}…, got {:?}…",
        want.len(),
        got.len(),
        window(want),
        window(got)
    ))
}

/// A JSON document of exactly `bytes` bytes (for `bytes` >= 64), with non-ASCII text in it.
pub(crate) fn json_of_size(bytes: usize) -> Vec<u8> {
    let head = r#"{"kind":"large","note":"ünïcødé ✓ 大きい 🎻","blob":""#;
    let tail = r#""}"#;
    let fill = bytes.saturating_sub(head.len() + tail.len());
    let mut out = Vec::with_capacity(bytes);
    out.extend_from_slice(head.as_bytes());
    out.extend((0..fill).map(|i| b"abcdefghijklmnopqrstuvwxyz0123456789"[i % 36]));
    out.extend_from_slice(tail.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_of_size_is_exact_and_valid() {
        let doc = json_of_size(1024 * 1024);
        assert_eq!(doc.len(), 1024 * 1024);
        let v: serde_json::Value = serde_json::from_slice(&doc).expect("valid JSON");
        assert_eq!(v["kind"], "large");
    }

    #[test]
    fn describe_difference_points_at_the_first_differing_byte() {
        assert_eq!(describe_difference(b"abc", b"abc"), None);
        let d = describe_difference(b"abcdef", b"abXdef").expect("differs");
        assert!(d.contains("byte 2"), "{d}");
        let d = describe_difference(b"abc", b"abcd").expect("differs");
        assert!(d.contains("byte 3"), "{d}");
    }
}
