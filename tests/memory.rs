//! The conformance suite on the in-memory backend, plus what only the memory backend promises.

use std::time::Duration;

use agent_orchestra::bus::{FetchOptions, OutgoingMessage};
use agent_orchestra::{connect, BackendUrls, Backends, ConnectOptions, Priority, QueueName};

/// Opens `memory://` the way every backend is opened, with the prefix and the default options
/// (so `max_deliveries` is the default).
async fn make_backends(prefix: &str) -> Backends {
    let opts = ConnectOptions {
        prefix: prefix.to_string(),
        ..ConnectOptions::default()
    };
    connect(&BackendUrls::all("memory://"), &opts)
        .await
        .expect("memory:// always opens")
}

/// Nothing to delete: each `memory://` instance is private and dies with the test.
async fn cleanup(_prefix: &str) {}

agent_orchestra::conformance_suite!(make_backends, cleanup);

/// Each `memory://` connection is a private instance: nothing leaks between two of them.
#[tokio::test]
async fn memory_instances_are_private() {
    let a = make_backends("t_private_a_").await;
    let b = make_backends("t_private_b_").await;
    let q = QueueName::parse("private_queue").expect("valid queue name");
    a.bus
        .enqueue(&q, OutgoingMessage::new(&b"{}"[..], Priority::DEFAULT))
        .await
        .expect("enqueue");
    let got = b
        .bus
        .fetch(
            &q,
            FetchOptions {
                max: 1,
                wait: Duration::from_millis(100),
                lease: Duration::from_secs(5),
            },
        )
        .await
        .expect("fetch");
    assert!(
        got.is_empty(),
        "a second memory:// instance saw the first one's message"
    );
    let stats = a.bus.stats(&q).await.expect("stats");
    assert_eq!(stats.waiting, 1, "the first instance lost its message");
}

/// `max_deliveries` from the options reaches the memory bus.
#[tokio::test]
async fn memory_bus_honours_max_deliveries_from_the_options() {
    let opts = ConnectOptions {
        max_deliveries: 3,
        ..ConnectOptions::default()
    };
    let b = connect(&BackendUrls::all("memory://"), &opts)
        .await
        .expect("memory:// always opens");
    assert_eq!(b.bus.max_deliveries(), 3);
}

/// A fetch with `max = 0` is refused with a typed error instead of returning nothing forever.
#[tokio::test]
async fn memory_fetch_of_zero_messages_is_invalid_input() {
    let b = make_backends("t_fetch_zero_").await;
    let q = QueueName::parse("zero_fetch").expect("valid queue name");
    let err = b
        .bus
        .fetch(
            &q,
            FetchOptions {
                max: 0,
                wait: Duration::ZERO,
                lease: Duration::from_secs(1),
            },
        )
        .await
        .expect_err("max = 0 must be refused");
    assert!(
        matches!(err, agent_orchestra::Error::InvalidInput { .. }),
        "{err:?}"
    );
}
