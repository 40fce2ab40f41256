//! Defects of the NATS backend found by a hostile audit (issue 16, point 4): messages that other
//! programs put on a queue's subjects must be delivered or dead-lettered, never lost or left
//! where nothing reads them.
//!
//! The shared broker comes from `ORCHESTRA_TEST_NATS_URL`, a container, or 127.0.0.1:4222 (see
//! `agent_orchestra::testkit::harness`). Every test works under its own prefix and drops it.

use std::time::{Duration, Instant};

use agent_orchestra::connect::drop_namespace;
use agent_orchestra::testkit::harness::{broker_url, unique_prefix, BrokerKind};
use agent_orchestra::{
    connect, BackendUrls, Backends, ConnectOptions, FetchOptions, OutgoingMessage, Priority,
    QueueName,
};
use async_nats::jetstream;

fn opts(prefix: &str) -> ConnectOptions {
    ConnectOptions {
        prefix: prefix.to_string(),
        ..ConnectOptions::default()
    }
}

async fn make_backends(prefix: &str) -> Backends {
    let url = broker_url(BrokerKind::Nats).await;
    connect(&BackendUrls::all(url), &opts(prefix))
        .await
        .expect("connect to the test NATS server")
}

async fn cleanup(prefix: &str, queues: &[QueueName]) {
    let url = broker_url(BrokerKind::Nats).await;
    drop_namespace(&BackendUrls::all(url), &opts(prefix), queues)
        .await
        .expect("drop the test namespace");
}

/// A JetStream context on a connection of its own, as another program would have.
async fn raw_jetstream() -> jetstream::Context {
    let url = broker_url(BrokerKind::Nats).await;
    let client = async_nats::connect(url.trim_start_matches("nats://"))
        .await
        .expect("raw client");
    jetstream::new(client)
}

/// Fetches and acks until `want` deliveries came or 20 s passed (a liveness bound: a lost
/// message makes this return fewer); returns the payloads, sorted.
async fn drain(b: &Backends, q: &QueueName, want: usize) -> Vec<String> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < want && Instant::now() < deadline {
        let batch = b
            .bus
            .fetch(
                q,
                FetchOptions {
                    max: 16,
                    wait: Duration::from_millis(500),
                    lease: Duration::from_secs(30),
                },
            )
            .await
            .expect("fetch");
        for d in batch {
            b.bus.ack(&d).await.expect("ack");
            got.push(String::from_utf8(d.payload).expect("utf-8 payload"));
        }
    }
    got.sort();
    got
}

/// Delayed messages published by another program, without an `Orch-Id` or all with the same
/// one, are each moved to their level and delivered: the mover's duplicate detection keys on
/// the stored copy, not on the id the message claims.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_messages_without_or_sharing_an_id_are_all_delivered() {
    let prefix = unique_prefix("delayed_ids");
    let q = QueueName::parse("anon").unwrap();
    let b = make_backends(&prefix).await;
    // The stream exists once something was enqueued.
    b.bus
        .enqueue(&q, OutgoingMessage::new(&b"own"[..], Priority::DEFAULT))
        .await
        .expect("enqueue");
    let js = raw_jetstream().await;
    let subject = format!("{prefix}orch.q.anon.delayed");
    let mut expected = vec!["own".to_string()];
    for i in 0..5 {
        let payload = format!("no-id-{i}");
        js.publish(subject.clone(), payload.clone().into())
            .await
            .expect("publish")
            .await
            .expect("stored");
        expected.push(payload);
    }
    for i in 0..3 {
        let payload = format!("same-id-{i}");
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Orch-Id", "same");
        headers.insert("Orch-Priority", "3");
        js.publish_with_headers(subject.clone(), headers, payload.clone().into())
            .await
            .expect("publish")
            .await
            .expect("stored");
        expected.push(payload);
    }
    expected.sort();
    let got = drain(&b, &q, expected.len()).await;
    assert_eq!(got, expected, "every delayed message is delivered once");
    let stats = b.bus.stats(&q).await.expect("stats");
    assert_eq!((stats.waiting, stats.in_flight, stats.dead), (0, 0, 0));
    drop(b);
    cleanup(&prefix, &[q]).await;
}
