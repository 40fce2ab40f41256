//! The conformance and engine suites against real NATS with JetStream, plus what only the NATS
//! backend promises (reconnect after a server restart, auth and TLS from the URL, the lease
//! mapped onto the consumers' AckWait).
//!
//! The shared broker comes from `ORCHESTRA_TEST_NATS_URL`, a container, or 127.0.0.1:4222 (see
//! `agent_orchestra::testkit::harness`). Tests that stop a server start their own `nats-server`
//! on a free port.


use agent_orchestra::testkit::harness::{broker_url, BrokerKind};
use agent_orchestra::{connect, BackendUrls, Backends, ConnectOptions};
use futures::StreamExt;

async fn make_backends(prefix: &str) -> Backends {
    let url = broker_url(BrokerKind::Nats).await;
    let opts = ConnectOptions {
        prefix: prefix.to_string(),
        ..ConnectOptions::default()
    };
    connect(&BackendUrls::all(url), &opts)
        .await
        .expect("connect to the test NATS server")
}

/// Deletes every stream (and so every KV bucket) whose name the prefix produced.
async fn cleanup(prefix: &str) {
    let url = broker_url(BrokerKind::Nats).await;
    delete_prefixed_streams(&url, prefix).await;
}

/// The stream-name form of a prefix (the backend maps anything outside `[A-Za-z0-9_-]` to `_`).
fn name_prefix(prefix: &str) -> String {
    prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

async fn delete_prefixed_streams(url: &str, prefix: &str) {
    let server = url.trim_start_matches("nats://");
    let client = async_nats::connect(server)
        .await
        .expect("connect for cleanup");
    let js = async_nats::jetstream::new(client);
    let p = name_prefix(prefix);
    assert!(!p.is_empty(), "refusing to clean up an empty prefix");
    let kv = format!("KV_{p}");
    let names: Vec<String> = js
        .stream_names()
        .filter_map(|n| async move { n.ok() })
        .collect()
        .await;
    for name in names {
        if name.starts_with(&p) || name.starts_with(&kv) {
            js.delete_stream(&name)
                .await
                .unwrap_or_else(|e| panic!("cannot delete stream {name}: {e}"));
        }
    }
}

agent_orchestra::conformance_suite!(make_backends, cleanup);
agent_orchestra::engine_suite!(make_backends, cleanup);
