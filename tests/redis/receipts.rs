//! Receipts: an ack, extend or nack of a delivery whose lease ended.

use std::time::Duration;

use agent_orchestra::bus::{FetchOptions, OutgoingMessage};
use agent_orchestra::Priority;

use crate::{on_shared_redis, queue};

#[test]
fn stale_ack_does_not_remove_the_redelivered_message() {
    on_shared_redis("stale_ack", |b, _prefix| async move {
        let q = queue("stale_ack");
        b.bus
            .enqueue(
                &q,
                OutgoingMessage::new(&b"{\"n\":1}"[..], Priority::DEFAULT),
            )
            .await
            .expect("enqueue");
        let short = FetchOptions {
            max: 1,
            wait: Duration::from_secs(5),
            lease: Duration::from_millis(200),
        };
        let first = b
            .bus
            .fetch(&q, short)
            .await
            .expect("fetch")
            .pop()
            .expect("delivered");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let long = FetchOptions {
            lease: Duration::from_secs(30),
            ..short
        };
        let second = b
            .bus
            .fetch(&q, long)
            .await
            .expect("fetch")
            .pop()
            .expect("redelivered");
        assert_eq!(second.message_id, first.message_id);
        assert_eq!(second.delivery_count, 2);

        b.bus
            .ack(&first)
            .await
            .expect("a stale ack is not an error");
        assert!(
            b.bus.extend(&first, Duration::from_secs(5)).await.is_err(),
            "stale extend"
        );
        b.bus
            .nack(&first, Duration::ZERO)
            .await
            .expect("a stale nack is not an error");
        let stats = b.bus.stats(&q).await.expect("stats");
        assert_eq!(
            (stats.waiting, stats.in_flight),
            (0, 1),
            "the new lease survived: {stats:?}"
        );

        b.bus.ack(&second).await.expect("ack");
        let stats = b.bus.stats(&q).await.expect("stats");
        assert_eq!((stats.waiting, stats.in_flight), (0, 0), "{stats:?}");
    });
}

#[test]
fn acking_after_the_lease_ended_but_before_redelivery_still_removes_the_message() {
    on_shared_redis("late_ack", |b, _prefix| async move {
        let q = queue("late_ack");
        b.bus
            .enqueue(&q, OutgoingMessage::new(&b"{}"[..], Priority::DEFAULT))
            .await
            .expect("enqueue");
        let opts = FetchOptions {
            max: 1,
            wait: Duration::from_secs(5),
            lease: Duration::from_millis(100),
        };
        let d = b
            .bus
            .fetch(&q, opts)
            .await
            .expect("fetch")
            .pop()
            .expect("delivered");
        tokio::time::sleep(Duration::from_millis(300)).await;
        b.bus
            .stats(&q)
            .await
            .expect("stats (promotes the expired lease)");
        b.bus.ack(&d).await.expect("late ack");
        let stats = b.bus.stats(&q).await.expect("stats");
        assert_eq!((stats.waiting, stats.in_flight), (0, 0), "{stats:?}");
    });
}
