//! The conformance and engine suites with each role on a different broker, chosen by URL: a
//! RabbitMQ bus, a Redis registry and NATS locks. Proves the engine never learns which broker
//! is behind a trait, and that roles from different backends compose.

mod support;

use agent_orchestra::testkit::harness::{broker_url, BrokerKind};
use agent_orchestra::{connect, BackendUrls, Backends, ConnectOptions};

async fn make_backends(prefix: &str) -> Backends {
    let urls = BackendUrls {
        bus: broker_url(BrokerKind::Amqp).await,
        registry: broker_url(BrokerKind::Redis).await,
        locks: broker_url(BrokerKind::Nats).await,
    };
    let b = connect(
        &urls,
        &ConnectOptions {
            prefix: prefix.to_string(),
            ..ConnectOptions::default()
        },
    )
    .await
    .expect("connect the mixed backends");
    assert_eq!(
        (b.bus.backend(), b.registry.backend(), b.locks.backend()),
        ("rabbitmq", "redis", "nats")
    );
    b
}

async fn cleanup(prefix: &str) {
    support::rabbitmq(prefix).await;
    support::redis(prefix).await;
    support::nats(prefix).await;
}

agent_orchestra::conformance_suite!(make_backends, cleanup);

mod engine {
    use super::{cleanup, make_backends};
    agent_orchestra::engine_suite!(make_backends, cleanup);
}
