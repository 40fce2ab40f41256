//! Tests every backend repeats that need a broker of their own: one the test may stop and start
//! again, or a port where no broker answers.
//!
//! A backend's test file starts a private broker on a free port ([`PrivateBroker`], or anything
//! else implementing [`BrokerControl`]) and calls the shared function in one line:
//!
//! ```ignore
//! use agent_orchestra::testkit::brokers::{self, PrivateBroker};
//!
//! #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
//! async fn worker_keeps_consuming_across_a_restart_and_loses_nothing() {
//!     let mut server = PrivateBroker::nats_jetstream(&[]).await;
//!     brokers::worker_keeps_consuming_across_a_restart(&mut server).await;
//! }
//!
//! #[tokio::test]
//! async fn a_port_that_does_not_speak_redis_is_one_clear_error() {
//!     brokers::a_port_that_speaks_another_protocol_is_one_clear_error(
//!         |port| format!("redis://127.0.0.1:{port}"),
//!         "not the Redis protocol",
//!     )
//!     .await;
//! }
//! ```
//!
//! Like the rest of the suite, each function panics with a message that says what went wrong and
//! bounds every wait, so a broken backend fails instead of hanging.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::time::Instant;

use super::harness::unique_prefix;
pub use super::private_broker::{free_port, redis_args, PrivateBroker, PrivateDir, REDIS_DURABLE};
use crate::bus::{FetchOptions, OutgoingMessage};
use crate::{connect, BackendUrls, Backends, ConnectOptions, Limits, Priority, QueueName, Task};

/// A broker a test owns: where it listens, and stopping and starting it again with the same
/// port and the same storage.
#[async_trait]
pub trait BrokerControl: Send + Sync {
    /// The URL the backend connects to (credentials and options included).
    fn url(&self) -> String;

    /// Stops the broker abruptly (no shutdown, no final save): what it kept is what it had
    /// written durably. Returns once it no longer runs.
    async fn stop(&mut self);

    /// Starts the broker again on the same port with the same storage; returns once it accepts
    /// connections.
    async fn start(&mut self);

    /// Opens the backends on this broker under `prefix`. The default connects to
    /// [`url`](BrokerControl::url) for every role with [`connect()`](crate::connect()).
    async fn open(&self, prefix: &str) -> Backends {
        let opts = ConnectOptions {
            prefix: prefix.to_string(),
            connect_timeout: Duration::from_secs(3),
            ..ConnectOptions::default()
        };
        connect(&BackendUrls::all(self.url()), &opts)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to the private broker: {e}"))
    }
}

/// Retries `call` while it fails with a temporary error (the broker is restarting), for at most
/// 30 s; panics with `what` otherwise.
async fn through_restart<T, F, Fut>(what: &str, mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = crate::Result<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match call().await {
            Ok(v) => return v,
            Err(e) if e.is_temporary() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{what}: {e} (temporary: {})", e.is_temporary()),
        }
    }
}

/// A worker fetches and acks while the broker is killed and started again: every message
/// enqueued before the kill and after the restart is consumed (at least once: an ack the kill
/// cut off means a redelivery), none is invented, the queue empties, a task registered before
/// the kill is still there, and the worker only ever saw temporary errors.
///
/// The broker must keep what it acknowledged across a kill (Redis with `appendfsync always`,
/// JetStream's file store).
pub async fn worker_keeps_consuming_across_a_restart(broker: &mut dyn BrokerControl) {
    const BATCH: usize = 200;
    let b = broker.open(&unique_prefix("restart")).await;
    let q = QueueName::parse("survivors").expect("queue name");
    let body = |i: usize| format!("{{\"n\":{i}}}").into_bytes();
    let batch = |from: usize| -> Vec<OutgoingMessage> {
        (from..from + BATCH)
            .map(|i| {
                let p = Priority::new((i % 10) as i64 + 1).expect("priority");
                OutgoingMessage::new(body(i), p)
            })
            .collect()
    };
    b.bus
        .enqueue_many(&q, batch(0))
        .await
        .expect("enqueue before the restart");
    let task = Task::new(
        q.clone(),
        serde_json::json!({"keep": "me"}),
        Priority::DEFAULT,
        3,
        vec![],
        &Limits::default(),
    )
    .expect("task");
    b.registry
        .create(&task)
        .await
        .expect("create before the restart");

    // payload -> deliveries seen
    let consumed: Arc<Mutex<HashMap<Vec<u8>, usize>>> = Arc::default();
    let errors = Arc::new(AtomicUsize::new(0));
    let worker = {
        let (bus, q, consumed, errors) =
            (b.bus.clone(), q.clone(), consumed.clone(), errors.clone());
        tokio::spawn(async move {
            let opts = FetchOptions {
                max: 8,
                wait: Duration::from_millis(500),
                lease: Duration::from_secs(5),
            };
            loop {
                let got = match bus.fetch(&q, opts).await {
                    Ok(got) => got,
                    Err(e) if e.is_temporary() => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                    Err(e) => panic!("fetch failed permanently: {e}"),
                };
                for d in got {
                    // Slow enough that the restart comes mid-stream.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    // Processed once the ack returns, even with an error: an ack whose reply the
                    // kill cut off may still have removed the message. One whose ack was lost
                    // comes again after its lease and is acked then (checked below).
                    let acked = bus.ack(&d).await;
                    *consumed.lock().entry(d.payload.clone()).or_default() += 1;
                    match acked {
                        Ok(()) => {}
                        Err(e) if e.is_temporary() => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => panic!("ack failed permanently: {e}"),
                    }
                }
            }
        })
    };
    let wait_for = |n: usize, what: &'static str| {
        let consumed = consumed.clone();
        async move {
            // Generous: a busy machine may take a while to reconnect after the restart.
            let deadline = Instant::now() + Duration::from_secs(120);
            while consumed.lock().len() < n {
                assert!(
                    Instant::now() < deadline,
                    "{what}: only {} of {n} messages consumed",
                    consumed.lock().len()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_for(20, "before the restart").await;
    broker.stop().await;
    let at_kill = consumed.lock().len();
    assert!(
        at_kill < BATCH,
        "the restart should come mid-stream ({at_kill} consumed)"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    broker.start().await;

    // More work once the broker is back (the first calls may find it still loading).
    through_restart("enqueue after the restart", || {
        b.bus.enqueue_many(&q, batch(BATCH))
    })
    .await;
    wait_for(2 * BATCH, "after the restart").await;
    let (seen, again) = {
        let consumed = consumed.lock();
        let seen: std::collections::HashSet<Vec<u8>> = consumed.keys().cloned().collect();
        (seen, consumed.values().filter(|&&n| n > 1).count())
    };
    let all: std::collections::HashSet<Vec<u8>> = (0..2 * BATCH).map(body).collect();
    assert_eq!(
        seen, all,
        "every message the broker kept was consumed, and nothing else"
    );
    // A message whose ack the kill lost is delivered again once its 5 s lease ends, and acked:
    // the queue empties while the worker runs.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stats = through_restart("stats after the restart", || b.bus.stats(&q)).await;
        if stats.waiting + stats.in_flight == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the queue never emptied: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    worker.abort();
    let stored = through_restart("get after the restart", || b.registry.get(&task.task_id))
        .await
        .expect("the task registered before the restart is still there");
    assert_eq!(stored.payload, task.payload);
    tracing::info!(
        consumed_at_kill = at_kill,
        delivered_again = again,
        temporary_errors = errors.load(Ordering::Relaxed),
        "restart test"
    );
}

/// A subscriber keeps receiving events after the broker is killed and started again: it is
/// subscribed anew (events published while the broker was down may be lost, as the bus's
/// contract says), not closed.
pub async fn subscriber_resubscribes_after_a_restart(broker: &mut dyn BrokerControl) {
    let b = broker.open(&unique_prefix("resub")).await;
    let mut sub = b.bus.subscribe("events").await.expect("subscribe");
    // A subscription may take a moment to reach the broker: publish until one arrives.
    let first = receive_while_publishing(&b, &mut sub, b"before", Duration::from_secs(10)).await;
    assert_eq!(
        first.as_deref(),
        Some(&b"before"[..]),
        "no event before the restart"
    );

    broker.stop().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    broker.start().await;

    let got = receive_while_publishing(&b, &mut sub, b"after", Duration::from_secs(30)).await;
    assert_eq!(
        got.as_deref(),
        Some(&b"after"[..]),
        "no event within 30 s of the restart: the subscription was closed instead of renewed"
    );
}

/// Publishes `event` every 100 ms until `sub` receives it (other events are passed over), the
/// subscription ends (`None`) or `limit` passes (`None`).
async fn receive_while_publishing(
    b: &Backends,
    sub: &mut crate::Subscription,
    event: &'static [u8],
    limit: Duration,
) -> Option<Vec<u8>> {
    let publisher = {
        let bus = b.bus.clone();
        tokio::spawn(async move {
            loop {
                let _ = bus.publish("events", event).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let got = tokio::time::timeout(limit, async {
        loop {
            match sub.recv().await {
                Some(e) if e == event => return Some(e),
                Some(_) => continue,
                None => return None,
            }
        }
    })
    .await
    .unwrap_or(None);
    publisher.abort();
    got
}

/// What a server on another protocol's port says first, whatever the client sends: an SSH
/// server's banner, which no broker protocol parses.
const FOREIGN_GREETING: &[u8] = b"SSH-2.0-OpenSSH_9.6 not the broker you want\r\n";

/// A TCP server on a free local port that greets every connection with a line no broker
/// protocol parses (what a client meets when its URL names another server's port), then reads
/// until the client hangs up. Runs until the process ends. Returns the port.
pub fn wrong_protocol_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    let port = listener.local_addr().expect("local address").port();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = stream.write_all(FOREIGN_GREETING);
                let mut buf = [0u8; 1024];
                while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
    port
}

/// A URL naming a port where another protocol's server answers fails within the connect
/// timeout with one clear line that contains `says` (the backend's explanation), not the
/// client's multi-line parser dump. `url(port)` is the backend's URL for 127.0.0.1:`port`.
pub async fn a_port_that_speaks_another_protocol_is_one_clear_error(
    url: impl Fn(u16) -> String,
    says: &str,
) {
    let url = url(wrong_protocol_server());
    let e = connect_error(
        &url,
        "wrongport",
        Duration::from_secs(3),
        "no broker answers",
    )
    .await
    .to_string();
    assert!(
        e.contains(says) && !e.contains('\n'),
        "want one line saying {says:?}, got: {e}"
    );
}

/// A URL naming a local port nobody listens on fails with a temporary error (a broker that is
/// not up yet may be soon), within the connect timeout. `url(port)` is the backend's URL for
/// 127.0.0.1:`port`.
pub async fn a_port_nobody_listens_on_is_a_temporary_error(url: impl Fn(u16) -> String) {
    let url = url(free_port());
    let e = connect_error(&url, "refused", Duration::from_secs(2), "nothing listens").await;
    assert!(e.is_temporary(), "a refused connection is temporary: {e:?}");
}

/// The error of connecting every role to `url` with `connect_timeout`, which must come within
/// 30 s; `nobody` says why a success is wrong.
async fn connect_error(
    url: &str,
    prefix: &str,
    connect_timeout: Duration,
    nobody: &str,
) -> crate::Error {
    let opts = ConnectOptions {
        prefix: unique_prefix(prefix),
        connect_timeout,
        ..ConnectOptions::default()
    };
    let outcome = tokio::time::timeout(
        Duration::from_secs(30),
        connect(&BackendUrls::all(url), &opts),
    )
    .await
    .unwrap_or_else(|_| panic!("connecting to {url} did not end within 30 s"));
    match outcome {
        Ok(_) => panic!("connected to {url}, where {nobody}"),
        Err(e) => e,
    }
}
