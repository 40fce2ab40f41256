//! Redis killed and started again: a worker keeps consuming and nothing is lost, subscribers
//! are subscribed anew (both shared with every backend: `agent_orchestra::testkit::brokers`),
//! and the metrics say when Redis cannot be read.

use std::time::Duration;

use agent_orchestra::testkit::brokers::{self, BrokerControl, PrivateBroker};
use agent_orchestra::QueueName;

use crate::open_url;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_keeps_consuming_across_a_redis_restart_and_loses_nothing() {
    let mut redis = PrivateBroker::redis(brokers::REDIS_DURABLE).await;
    brokers::worker_keeps_consuming_across_a_restart(&mut redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_resubscribes_after_a_redis_restart() {
    brokers::subscriber_resubscribes_after_a_restart(&mut PrivateBroker::redis(&[]).await).await;
}

/// `backend_gauges` while Redis is down: `orchestra_registry_up 0` and `orchestra_bus_up 0`
/// (the errors are logged), and no task or queue gauge (no zeros that would read as an empty
/// system); back to 1 once Redis is up again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_gauges_say_when_redis_cannot_be_read() {
    use agent_orchestra::engine::backend_gauges;
    let mut server = PrivateBroker::redis(&[]).await;
    let b = open_url(&server.url(), "t_gauges_").await;
    let q = QueueName::parse("gq").unwrap();
    let up = backend_gauges(&b, std::slice::from_ref(&q)).await;
    assert!(up.contains("orchestra_registry_up 1"), "{up}");
    assert!(up.contains("orchestra_bus_up 1"), "{up}");
    assert!(up.contains("orchestra_tasks{status=\"PENDING\"} 0"), "{up}");
    server.kill();
    let down = tokio::time::timeout(
        Duration::from_secs(120),
        backend_gauges(&b, std::slice::from_ref(&q)),
    )
    .await
    .expect("the gauges within 2 minutes of Redis going down");
    assert!(down.contains("orchestra_registry_up 0"), "{down}");
    assert!(down.contains("orchestra_bus_up 0"), "{down}");
    assert!(!down.contains("orchestra_tasks{"), "{down}");
    assert!(!down.contains("orchestra_queue_messages{"), "{down}");
    server.spawn().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let again = backend_gauges(&b, std::slice::from_ref(&q)).await;
        if again.contains("orchestra_registry_up 1") && again.contains("orchestra_bus_up 1") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still down a minute after Redis came back: {again}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
