//! [`Bus`] conformance: fan-out events, and durable work queues with competing consumers, leases,
//! redelivery, dead letters and strict priority.
//!
//! Timing checks are one-sided and tolerant: a message must not be delivered *before* its delay or
//! lease ends (checked against the earliest moment it may legitimately come back, with 100 ms of
//! slack for clock rounding); how much later it comes is never asserted.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rand::seq::SliceRandom;
use serde_json::{json, Value};
use tokio::time::{sleep, Instant};

use super::{
    describe_difference, eventually, join_all, json_of_size, must, must_within, within,
    CALL_TIMEOUT,
};
use crate::bus::{Delivery, FetchOptions, OutgoingMessage};
use crate::{Backends, Bus, Priority, QueueName, QueueStats};

/// Slack for backends that round times (to milliseconds, to their own clock tick).
const CLOCK_SLACK: Duration = Duration::from_millis(100);
/// A lease long enough never to end during a test.
const LONG_LEASE: Duration = Duration::from_secs(60);

fn queue(name: &str) -> QueueName {
    QueueName::parse(name).unwrap_or_else(|e| panic!("test queue name {name:?}: {e}"))
}

fn priority(p: u8) -> Priority {
    Priority::new(i64::from(p)).unwrap_or_else(|e| panic!("test priority {p}: {e}"))
}

async fn fetch(
    bus: &dyn Bus,
    q: &QueueName,
    max: usize,
    wait: Duration,
    lease: Duration,
) -> Vec<Delivery> {
    let batch = must_within(
        format!("fetch(max = {max}, wait = {wait:?}) from queue {q}"),
        wait + CALL_TIMEOUT,
        bus.fetch(q, FetchOptions { max, wait, lease }),
    )
    .await;
    assert!(
        batch.len() <= max,
        "fetch(max = {max}) from queue {q} returned {} messages",
        batch.len()
    );
    for d in &batch {
        assert_eq!(
            &d.queue, q,
            "a delivery from queue {q} names another queue: {d:?}"
        );
    }
    batch
}

/// Fetches exactly one message, waiting up to `wait` for it.
async fn fetch_one(
    bus: &dyn Bus,
    q: &QueueName,
    wait: Duration,
    lease: Duration,
    what: &str,
) -> Delivery {
    let mut batch = fetch(bus, q, 1, wait, lease).await;
    match batch.pop() {
        Some(d) => d,
        None => panic!("{what}: fetch from queue {q} returned nothing within {wait:?}"),
    }
}

/// Fetches until exactly `n` messages are in hand (never more), within `CALL_TIMEOUT`.
async fn fetch_exactly(bus: &dyn Bus, q: &QueueName, n: usize, lease: Duration) -> Vec<Delivery> {
    let deadline = Instant::now() + CALL_TIMEOUT;
    let mut got = Vec::new();
    while got.len() < n {
        assert!(
            Instant::now() < deadline,
            "expected {n} messages from queue {q}, got only {} within {CALL_TIMEOUT:?}",
            got.len()
        );
        got.extend(fetch(bus, q, n - got.len(), Duration::from_millis(500), lease).await);
    }
    got
}

async fn assert_empty(bus: &dyn Bus, q: &QueueName, wait: Duration, why: &str) {
    let batch = fetch(bus, q, 8, wait, LONG_LEASE).await;
    assert!(
        batch.is_empty(),
        "{why}: queue {q} still delivered {batch:?}"
    );
}

async fn assert_stats(bus: &dyn Bus, q: &QueueName, want: QueueStats, when: &str) {
    eventually(
        format!("stats of queue {q} {when} should be {want:?}"),
        Duration::from_secs(5),
        || async {
            let got = must(format!("stats of queue {q}"), bus.stats(q)).await;
            if got == want {
                Ok(())
            } else {
                Err(format!("{got:?}"))
            }
        },
    )
    .await
}

fn payload_json(d: &Delivery) -> Value {
    serde_json::from_slice(&d.payload)
        .unwrap_or_else(|e| panic!("payload of {d:?} is not the JSON that was enqueued: {e}"))
}

/// `subscribe` returns once the subscription is in force: an event published right after it
/// returns is delivered, round after round on fresh topics (a backend whose subscription is
/// still on its way to the server when `subscribe` returns loses some of them).
pub async fn an_event_published_right_after_subscribe_is_delivered(b: &Backends) {
    const ROUNDS: usize = 200;
    for i in 0..ROUNDS {
        let topic = format!("in_force_{i}");
        let mut sub = must(format!("subscribe to {topic}"), b.bus.subscribe(&topic)).await;
        must(
            format!("publish to {topic}"),
            b.bus.publish(&topic, b"{\"first\":true}"),
        )
        .await;
        let got = within(
            format!("round {i} of {ROUNDS}: the event published right after subscribe returned"),
            CALL_TIMEOUT,
            sub.recv(),
        )
        .await
        .unwrap_or_else(|| panic!("round {i}: subscription closed"));
        assert_eq!(got, b"{\"first\":true}".to_vec(), "round {i}");
    }
}

/// Every current subscriber of a topic gets every event published after it subscribed, in
/// publish order; subscribers of another topic get none of them; publishing to a topic nobody
/// listens to is not an error.
pub async fn fan_out_reaches_every_subscriber_in_order(b: &Backends) {
    const SUBSCRIBERS: usize = 3;
    const EVENTS: usize = 25;
    let topic = "fanout_task_events";
    let mut subs = Vec::new();
    for i in 0..SUBSCRIBERS {
        subs.push(must(format!("subscribe #{i} to {topic}"), b.bus.subscribe(topic)).await);
    }
    let mut bystander = must(
        "subscribe to another topic",
        b.bus.subscribe("fanout_other_topic"),
    )
    .await;
    must(
        "publish to a topic nobody subscribes to",
        b.bus.publish("fanout_nobody_listens", b"{\"seq\":-1}"),
    )
    .await;
    for seq in 0..EVENTS {
        let event = json!({"seq": seq, "text": "événement ✓ 事件"}).to_string();
        must(
            format!("publish event {seq} to {topic}"),
            b.bus.publish(topic, event.as_bytes()),
        )
        .await;
    }
    for (i, sub) in subs.iter_mut().enumerate() {
        for seq in 0..EVENTS {
            let got = within(
                format!("subscriber #{i} waiting for event {seq} of {EVENTS} on {topic}"),
                CALL_TIMEOUT,
                sub.recv(),
            )
            .await
            .unwrap_or_else(|| panic!("subscriber #{i}: subscription closed after {seq} events"));
            let v: Value = serde_json::from_slice(&got).unwrap_or_else(|e| {
                panic!(
                    "subscriber #{i} got an event that is not what was published ({e}): {:?}",
                    String::from_utf8_lossy(&got)
                )
            });
            assert_eq!(
                v,
                json!({"seq": seq, "text": "événement ✓ 事件"}),
                "subscriber #{i} missed an event or got events out of order (expected seq {seq})"
            );
        }
    }
    let stray = tokio::time::timeout(Duration::from_millis(300), bystander.recv()).await;
    if let Ok(Some(event)) = stray {
        panic!(
            "a subscriber of fanout_other_topic received an event of another topic: {:?}",
            String::from_utf8_lossy(&event)
        );
    }
}

/// Several consumers fetching concurrently (with different batch sizes) from one queue together
/// receive every message exactly once: none duplicated, none missing.
pub async fn competing_consumers_get_each_message_exactly_once(b: &Backends) {
    const MESSAGES: usize = 200;
    let q = queue("competing_consumers");
    let messages = (0..MESSAGES)
        .map(|n| OutgoingMessage::new(format!("{{\"n\":{n}}}"), Priority::DEFAULT))
        .collect();
    let ids = must(
        format!("enqueue_many of {MESSAGES} messages"),
        b.bus.enqueue_many(&q, messages),
    )
    .await;
    assert_eq!(
        ids.len(),
        MESSAGES,
        "enqueue_many must return one id per message"
    );
    let distinct: HashSet<&String> = ids.iter().collect();
    assert_eq!(
        distinct.len(),
        MESSAGES,
        "enqueue_many returned duplicate message ids"
    );

    let seen: Arc<Mutex<Vec<(usize, u64, String)>>> = Arc::default();
    let acked = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut consumers = Vec::new();
    for (consumer, max) in [1usize, 3, 8, 16].into_iter().enumerate() {
        let (bus, q, seen, acked) = (b.bus.clone(), q.clone(), seen.clone(), acked.clone());
        consumers.push(tokio::spawn(async move {
            while acked.load(Ordering::SeqCst) < MESSAGES && Instant::now() < deadline {
                let batch = fetch(&*bus, &q, max, Duration::from_millis(200), LONG_LEASE).await;
                for d in batch {
                    let n = payload_json(&d)["n"]
                        .as_u64()
                        .unwrap_or_else(|| panic!("payload of {d:?} lost its number"));
                    seen.lock().push((consumer, n, d.message_id.clone()));
                    must(
                        format!("consumer #{consumer} ack of message {n}"),
                        bus.ack(&d),
                    )
                    .await;
                    acked.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    join_all("consumer", consumers).await;

    let seen = std::mem::take(&mut *seen.lock());
    let mut times: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    for (consumer, n, _) in &seen {
        times.entry(*n).or_default().push(*consumer);
    }
    let duplicated: Vec<_> = times.iter().filter(|(_, c)| c.len() > 1).take(10).collect();
    assert!(
        duplicated.is_empty(),
        "messages delivered more than once (message -> consumers), first ones: {duplicated:?}"
    );
    let missing: Vec<u64> = (0..MESSAGES as u64)
        .filter(|n| !times.contains_key(n))
        .take(20)
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {MESSAGES} messages never delivered within 15 s; first missing: {missing:?}",
        MESSAGES - times.len()
    );
    for (_, n, message_id) in &seen {
        assert_eq!(
            &ids[*n as usize], message_id,
            "message {n} was delivered with another id than enqueue_many returned"
        );
    }
    assert_empty(
        &*b.bus,
        &q,
        Duration::from_millis(300),
        "every message was acked",
    )
    .await;
    assert_stats(
        &*b.bus,
        &q,
        QueueStats::default(),
        "after every message was acked",
    )
    .await;
}

/// Fetching from an empty (never used) queue waits about `wait` and returns an empty batch, not
/// an error.
pub async fn fetch_from_an_empty_queue_returns_nothing_after_waiting(b: &Backends) {
    let q = queue("never_used_queue");
    let batch = fetch(&*b.bus, &q, 4, Duration::from_millis(300), LONG_LEASE).await;
    assert!(batch.is_empty(), "an empty queue delivered {batch:?}");
    assert_stats(&*b.bus, &q, QueueStats::default(), "of a never-used queue").await;
}

/// A fetch that asks for `usize::MAX` messages ("everything") gets what is there, at most
/// [`crate::bus::FETCH_MAX`], without allocating for what it asked.
pub async fn fetch_of_usize_max_gets_what_is_there(b: &Backends) {
    let q = queue("fetch_everything");
    let batch: Vec<OutgoingMessage> = (0..5)
        .map(|i| OutgoingMessage::new(format!("{{\"n\":{i}}}").into_bytes(), Priority::DEFAULT))
        .collect();
    must("enqueue five", b.bus.enqueue_many(&q, batch)).await;
    let mut got = Vec::new();
    let deadline = Instant::now() + CALL_TIMEOUT;
    while got.len() < 5 && Instant::now() < deadline {
        let options = FetchOptions {
            max: usize::MAX,
            wait: Duration::from_secs(1),
            lease: LONG_LEASE,
        };
        let batch = must("fetch usize::MAX", b.bus.fetch(&q, options)).await;
        assert!(
            batch.len() <= crate::bus::FETCH_MAX,
            "{} delivered",
            batch.len()
        );
        got.extend(batch);
    }
    assert_eq!(got.len(), 5, "every message once");
    for d in &got {
        must("ack", b.bus.ack(d)).await;
    }
}

/// An acked message is gone: it is not delivered again, not even after its lease would have
/// ended.
pub async fn ack_removes_the_message(b: &Backends) {
    let q = queue("ack_removes");
    let id = must(
        "enqueue",
        b.bus.enqueue(
            &q,
            OutgoingMessage::new(&b"{\"job\":\"ack me\"}"[..], Priority::DEFAULT),
        ),
    )
    .await;
    let d = fetch_one(
        &*b.bus,
        &q,
        CALL_TIMEOUT,
        Duration::from_secs(1),
        "first delivery",
    )
    .await;
    assert_eq!(
        d.message_id, id,
        "the delivered message id differs from enqueue's"
    );
    assert_eq!(
        d.payload, b"{\"job\":\"ack me\"}",
        "payload changed on the way"
    );
    assert_eq!(
        d.delivery_count, 1,
        "first delivery must have delivery_count 1"
    );
    assert_eq!(d.priority, Priority::DEFAULT, "priority changed on the way");
    must("ack", b.bus.ack(&d)).await;
    // Wait past the 1 s lease: an acked message must not come back.
    assert_empty(
        &*b.bus,
        &q,
        Duration::from_millis(1500),
        "the message was acked",
    )
    .await;
    assert_stats(&*b.bus, &q, QueueStats::default(), "after the ack").await;
}

/// A nacked message comes back only after the nack's delay, with `delivery_count` + 1, the same
/// id and the same payload.
pub async fn nack_with_delay_redelivers_after_the_delay_and_not_before(b: &Backends) {
    const DELAY: Duration = Duration::from_secs(2);
    let q = queue("nack_with_delay");
    let id = must(
        "enqueue",
        b.bus.enqueue(
            &q,
            OutgoingMessage::new(&b"{\"job\":\"retry me\"}"[..], Priority::DEFAULT),
        ),
    )
    .await;
    let first = fetch_one(&*b.bus, &q, CALL_TIMEOUT, LONG_LEASE, "first delivery").await;
    assert_eq!(first.delivery_count, 1);
    let nacked_at = Instant::now();
    must("nack with a 2 s delay", b.bus.nack(&first, DELAY)).await;

    let earliest = nacked_at + DELAY;
    let early = fetch(&*b.bus, &q, 1, Duration::from_millis(500), LONG_LEASE).await;
    if !early.is_empty() && Instant::now() + CLOCK_SLACK < earliest {
        panic!("a message nacked with a {DELAY:?} delay was delivered again before the delay ended: {early:?}");
    }
    let again = match early.into_iter().next() {
        Some(d) => d,
        None => {
            let d = fetch_one(
                &*b.bus,
                &q,
                CALL_TIMEOUT,
                LONG_LEASE,
                "redelivery after the nack delay",
            )
            .await;
            // The fetch started before `earliest` may end before it only if it broke the delay.
            assert!(
                Instant::now() + CLOCK_SLACK >= earliest,
                "a message nacked with a {DELAY:?} delay was delivered again before the delay ended"
            );
            d
        }
    };
    assert_eq!(
        again.message_id, id,
        "the redelivered message has another id"
    );
    assert_eq!(
        again.payload, first.payload,
        "the redelivered payload changed"
    );
    assert_eq!(
        again.delivery_count, 2,
        "a nack counts as one delivery: the redelivery must have delivery_count 2"
    );
    must("ack of the redelivery", b.bus.ack(&again)).await;
    assert_empty(
        &*b.bus,
        &q,
        Duration::from_millis(300),
        "the redelivery was acked",
    )
    .await;
}

/// A message whose lease ends without an ack is delivered again (here to a second consumer),
/// not before the lease ends, with `delivery_count` + 1; the first consumer's late ack is not an
/// error.
pub async fn unacked_message_is_redelivered_after_its_lease_ends(b: &Backends) {
    const LEASE: Duration = Duration::from_secs(1);
    let q = queue("lease_expiry");
    let id = must(
        "enqueue",
        b.bus.enqueue(
            &q,
            OutgoingMessage::new(&b"{\"job\":\"crash on me\"}"[..], Priority::DEFAULT),
        ),
    )
    .await;
    let fetched_at = Instant::now();
    let lost = fetch_one(&*b.bus, &q, CALL_TIMEOUT, LEASE, "consumer A's delivery").await;
    assert_eq!(lost.delivery_count, 1);
    // Consumer A "crashes": no ack, no extend. Consumer B waits for the message.
    let taken_over = fetch_one(
        &*b.bus,
        &q,
        CALL_TIMEOUT,
        LONG_LEASE,
        "consumer B waiting for the message whose 1 s lease ended",
    )
    .await;
    assert!(
        Instant::now() + CLOCK_SLACK >= fetched_at + LEASE,
        "the message was delivered again before its {LEASE:?} lease ended"
    );
    assert_eq!(
        taken_over.message_id, id,
        "the redelivered message has another id"
    );
    assert_eq!(
        taken_over.payload, lost.payload,
        "the redelivered payload changed"
    );
    assert_eq!(
        taken_over.delivery_count, 2,
        "a redelivery after lease expiry must have delivery_count 2"
    );
    must(
        "consumer A's late ack of a lease that already ended (must not be an error)",
        b.bus.ack(&lost),
    )
    .await;
    must("consumer B's ack", b.bus.ack(&taken_over)).await;
    assert_empty(
        &*b.bus,
        &q,
        Duration::from_millis(300),
        "consumer B acked the message",
    )
    .await;
}

/// Extending a lease keeps the message from being redelivered after the lease's original end.
pub async fn extend_keeps_the_lease_beyond_its_original_end(b: &Backends) {
    const LEASE: Duration = Duration::from_secs(1);
    let q = queue("extend_lease");
    must(
        "enqueue",
        b.bus.enqueue(
            &q,
            OutgoingMessage::new(&b"{\"job\":\"long handler\"}"[..], Priority::DEFAULT),
        ),
    )
    .await;
    let d = fetch_one(&*b.bus, &q, CALL_TIMEOUT, LEASE, "delivery").await;
    let fetched = Instant::now();
    let new_end = must(
        "extend the lease to 5 s",
        b.bus.extend(&d, Duration::from_secs(5)),
    )
    .await;
    assert!(
        new_end > d.lease_until,
        "extend returned {new_end}, not after the original lease end {}",
        d.lease_until
    );
    // Sleep past the original end of the lease, then make sure nobody else gets the message.
    sleep((fetched + Duration::from_millis(1500)).saturating_duration_since(Instant::now())).await;
    assert_empty(
        &*b.bus,
        &q,
        Duration::from_millis(300),
        "the lease was extended to 5 s, so the message must not be redelivered after 1.5 s",
    )
    .await;
    must(
        "a second extend after the original end",
        b.bus.extend(&d, Duration::from_secs(5)),
    )
    .await;
    must("ack after extending", b.bus.ack(&d)).await;
    assert_empty(
        &*b.bus,
        &q,
        Duration::from_millis(300),
        "the message was acked",
    )
    .await;
}

/// After `max_deliveries()` deliveries without an ack (nacks, then a lease expiry), the message is
/// not delivered again: it is in the dead letters, with a reason naming the limit.
pub async fn message_is_dead_lettered_after_max_deliveries(b: &Backends) {
    let max = b.bus.max_deliveries();
    assert!(max >= 1, "max_deliveries() must be at least 1, is {max}");
    let q = queue("poison_message");
    let payload = br#"{"job":"always fails"}"#.to_vec();
    let id = must(
        "enqueue",
        b.bus
            .enqueue(&q, OutgoingMessage::new(payload.clone(), Priority::DEFAULT)),
    )
    .await;
    for n in 1..max {
        let d = fetch_one(
            &*b.bus,
            &q,
            CALL_TIMEOUT,
            LONG_LEASE,
            &format!("delivery {n} of {max}"),
        )
        .await;
        assert_eq!(
            d.delivery_count, n,
            "delivery {n} has the wrong delivery_count"
        );
        must(
            format!("nack of delivery {n}"),
            b.bus.nack(&d, Duration::ZERO),
        )
        .await;
    }
    let last = fetch_one(
        &*b.bus,
        &q,
        CALL_TIMEOUT,
        Duration::from_secs(1),
        &format!("last allowed delivery ({max} of {max})"),
    )
    .await;
    assert_eq!(
        last.delivery_count, max,
        "the last allowed delivery has the wrong delivery_count"
    );
    // Not acked: its lease ends during this fetch, and a further delivery would exceed the limit.
    assert_empty(
        &*b.bus,
        &q,
        Duration::from_secs(3),
        &format!("the message was delivered {max} times (the maximum)"),
    )
    .await;
    let dead = eventually(
        format!("message {id} in the dead letters of {q}"),
        Duration::from_secs(5),
        || async {
            let all = must("dead_letters", b.bus.dead_letters(&q, 10)).await;
            all.iter()
                .find(|dl| dl.message_id == id)
                .cloned()
                .ok_or_else(|| format!("{all:?}"))
        },
    )
    .await;
    assert_eq!(dead.queue, q, "the dead letter names another queue");
    assert_eq!(dead.payload, payload, "the dead letter's payload changed");
    assert!(
        dead.reason.contains(&max.to_string()),
        "the dead letter's reason should name the limit of {max} deliveries, is {:?}",
        dead.reason
    );
    assert!(
        dead.delivery_count >= max,
        "the dead letter's delivery_count is {}, expected at least {max}",
        dead.delivery_count
    );
    assert_stats(
        &*b.bus,
        &q,
        QueueStats {
            waiting: 0,
            in_flight: 0,
            dead: 1,
        },
        "after the message was dead-lettered",
    )
    .await;
    assert_empty(
        &*b.bus,
        &q,
        Duration::from_millis(300),
        "the message is dead",
    )
    .await;
}

/// `dead_letter` moves a delivered message to the dead letters with the given reason; it is not
/// delivered again, even after its lease would have ended.
pub async fn dead_letter_keeps_the_reason_and_stops_delivery(b: &Backends) {
    let q = queue("explicit_dead_letter");
    let payload = b"not json at all \xff".to_vec();
    let id = must(
        "enqueue",
        b.bus
            .enqueue(&q, OutgoingMessage::new(payload.clone(), priority(2))),
    )
    .await;
    let d = fetch_one(
        &*b.bus,
        &q,
        CALL_TIMEOUT,
        Duration::from_secs(1),
        "delivery",
    )
    .await;
    let reason = "malformed message: expected JSON with a task_id (conformance test)";
    must("dead_letter", b.bus.dead_letter(&d, reason)).await;
    assert_empty(
        &*b.bus,
        &q,
        Duration::from_millis(1500),
        "the message was dead-lettered (and its 1 s lease is over)",
    )
    .await;
    let dead = must("dead_letters", b.bus.dead_letters(&q, 10)).await;
    assert_eq!(
        dead.len(),
        1,
        "expected exactly one dead letter, got {dead:?}"
    );
    assert_eq!(dead[0].message_id, id, "the dead letter has another id");
    assert_eq!(dead[0].queue, q, "the dead letter names another queue");
    assert_eq!(
        dead[0].payload, payload,
        "the dead letter's payload changed"
    );
    assert_eq!(dead[0].reason, reason, "the dead letter's reason changed");
    assert_eq!(
        dead[0].delivery_count, 1,
        "the dead letter's delivery_count"
    );
    assert_stats(
        &*b.bus,
        &q,
        QueueStats {
            waiting: 0,
            in_flight: 0,
            dead: 1,
        },
        "after dead_letter",
    )
    .await;
}

/// A backlog of messages with shuffled priorities is drained strictly by priority (1 first) and
/// FIFO within a priority, one at a time and with prefetch (fetch of 8); with prefetch, a more
/// urgent message enqueued in the middle of the drain is taken before the rest.
pub async fn strict_priority_holds_with_a_backlog_and_prefetch(b: &Backends) {
    const PER_LEVEL: usize = 20;
    let mut backlog: Vec<u8> = (1..=10u8)
        .flat_map(|p| std::iter::repeat_n(p, PER_LEVEL))
        .collect();
    backlog.shuffle(&mut rand::rng());
    let message = |seq: usize, p: u8| {
        OutgoingMessage::new(json!({"seq": seq, "priority": p}).to_string(), priority(p))
    };

    // One at a time, enqueued one by one.
    let single = queue("priority_backlog_single");
    for (seq, p) in backlog.iter().enumerate() {
        must(
            format!("enqueue message {seq}"),
            b.bus.enqueue(&single, message(seq, *p)),
        )
        .await;
    }
    let drained = drain(&*b.bus, &single, 1, backlog.len(), None).await;
    check_priority_order(&drained, backlog.len(), "fetch(max = 1)");

    // With prefetch, enqueued in one batch; an urgent message arrives mid-drain.
    let prefetch = queue("priority_backlog_prefetch");
    let batch = backlog
        .iter()
        .enumerate()
        .map(|(seq, p)| message(seq, *p))
        .collect();
    must(
        "enqueue_many of the backlog",
        b.bus.enqueue_many(&prefetch, batch),
    )
    .await;
    let urgent_seq = 10_000;
    let drained = drain(
        &*b.bus,
        &prefetch,
        8,
        backlog.len() + 1,
        Some((backlog.len() / 2, message(urgent_seq, 1))),
    )
    .await;
    let rest: Vec<(u8, usize)> = drained
        .iter()
        .copied()
        .filter(|(_, seq)| *seq != urgent_seq)
        .collect();
    check_priority_order(&rest, backlog.len(), "fetch(max = 8)");
}

/// Drains `expected` messages with fetch(max), acking each batch; returns (priority, seq) in
/// delivery order. With `urgent = Some((after, m))`, enqueues `m` once `after` messages were
/// drained and checks that the very next delivery is it.
async fn drain(
    bus: &dyn Bus,
    q: &QueueName,
    max: usize,
    expected: usize,
    mut urgent: Option<(usize, OutgoingMessage)>,
) -> Vec<(u8, usize)> {
    let mut out: Vec<(u8, usize)> = Vec::with_capacity(expected);
    let mut expect_urgent_next = false;
    while out.len() < expected {
        if let Some((after, _)) = &urgent {
            if out.len() >= *after {
                let (_, m) = urgent.take().expect("checked above");
                must(
                    format!("enqueue of an urgent message into {q}"),
                    bus.enqueue(q, m),
                )
                .await;
                expect_urgent_next = true;
            }
        }
        let batch = fetch(bus, q, max, Duration::from_secs(2), LONG_LEASE).await;
        assert!(
            !batch.is_empty(),
            "queue {q} stopped delivering after {} of {expected} messages",
            out.len()
        );
        for d in &batch {
            let v = payload_json(d);
            let (p, seq) = (
                v["priority"].as_u64().unwrap_or(0) as u8,
                v["seq"].as_u64().unwrap_or(0) as usize,
            );
            assert_eq!(
                d.priority.get(),
                p,
                "message {seq} was enqueued with priority {p} but delivered with priority {}",
                d.priority
            );
            if expect_urgent_next {
                assert_eq!(
                    p, 1,
                    "with prefetch (fetch of {max}), a priority-1 message enqueued mid-drain must be \
                     delivered before the remaining backlog; got message {seq} of priority {p} first"
                );
                expect_urgent_next = false;
            }
            out.push((p, seq));
        }
        for d in &batch {
            must(
                format!("ack of message {} from {q}", d.message_id),
                bus.ack(d),
            )
            .await;
        }
    }
    assert_empty(
        bus,
        q,
        Duration::from_millis(300),
        "the whole backlog was drained",
    )
    .await;
    out
}

fn check_priority_order(drained: &[(u8, usize)], expected: usize, how: &str) {
    let distinct: BTreeSet<usize> = drained.iter().map(|(_, seq)| *seq).collect();
    assert_eq!(
        (drained.len(), distinct.len()),
        (expected, expected),
        "{how}: expected each of the {expected} messages exactly once"
    );
    for (i, pair) in drained.windows(2).enumerate() {
        let ((p1, s1), (p2, s2)) = (pair[0], pair[1]);
        assert!(
            p1 < p2 || (p1 == p2 && s1 < s2),
            "{how}: delivery {i} was message {s1} (priority {p1}) and delivery {} message {s2} \
             (priority {p2}): order must be by priority, then FIFO",
            i + 1
        );
    }
}

/// A delayed message is not delivered before its delay, even when it is more urgent than a ready
/// one; it is delivered once the delay has passed.
pub async fn delayed_enqueue_is_not_delivered_before_its_delay(b: &Backends) {
    const DELAY: Duration = Duration::from_secs(2);
    let q = queue("delayed_enqueue");
    let enqueued_at = Instant::now();
    let delayed_id = must(
        "enqueue of an urgent message delayed by 2 s",
        b.bus.enqueue(
            &q,
            OutgoingMessage::new(&b"{\"job\":\"later\"}"[..], Priority::HIGHEST).delayed(DELAY),
        ),
    )
    .await;
    let ready_id = must(
        "enqueue of a ready, least urgent message",
        b.bus.enqueue(
            &q,
            OutgoingMessage::new(&b"{\"job\":\"now\"}"[..], Priority::LOWEST),
        ),
    )
    .await;
    let earliest = enqueued_at + DELAY;
    let deadline = Instant::now() + CALL_TIMEOUT + DELAY;
    let mut seen_ready = false;
    let mut seen_delayed = false;
    while !(seen_ready && seen_delayed) {
        assert!(
            Instant::now() < deadline,
            "not delivered in time: ready message seen {seen_ready}, delayed message seen {seen_delayed}"
        );
        let batch = fetch(&*b.bus, &q, 8, Duration::from_millis(500), LONG_LEASE).await;
        for d in batch {
            if d.message_id == delayed_id {
                assert!(
                    Instant::now() + CLOCK_SLACK >= earliest,
                    "a message enqueued with a {DELAY:?} delay was delivered before the delay ended"
                );
                assert_eq!(d.payload, b"{\"job\":\"later\"}");
                assert_eq!(
                    d.delivery_count, 1,
                    "a delayed message's first delivery has delivery_count 1"
                );
                seen_delayed = true;
            } else if d.message_id == ready_id {
                seen_ready = true;
            } else {
                panic!("unexpected delivery {d:?}");
            }
            must("ack", b.bus.ack(&d)).await;
        }
    }
}

/// `stats` counts waiting (ready or delayed), in-flight (leased) and dead messages.
pub async fn stats_reflect_waiting_in_flight_and_dead(b: &Backends) {
    let q = queue("stats_counts");
    assert_stats(
        &*b.bus,
        &q,
        QueueStats::default(),
        "before anything was enqueued",
    )
    .await;
    for n in 0..4 {
        must(
            format!("enqueue {n}"),
            b.bus.enqueue(
                &q,
                OutgoingMessage::new(format!("{{\"n\":{n}}}"), Priority::DEFAULT),
            ),
        )
        .await;
    }
    must(
        "enqueue of a message delayed by 60 s",
        b.bus.enqueue(
            &q,
            OutgoingMessage::new(&b"{\"n\":\"delayed\"}"[..], Priority::DEFAULT)
                .delayed(Duration::from_secs(60)),
        ),
    )
    .await;
    let waiting5 = QueueStats {
        waiting: 5,
        in_flight: 0,
        dead: 0,
    };
    assert_stats(&*b.bus, &q, waiting5, "after 4 ready + 1 delayed enqueues").await;
    let leased = fetch_exactly(&*b.bus, &q, 2, LONG_LEASE).await;
    let after_fetch = QueueStats {
        waiting: 3,
        in_flight: 2,
        dead: 0,
    };
    assert_stats(&*b.bus, &q, after_fetch, "after leasing 2").await;
    must(
        "dead_letter",
        b.bus.dead_letter(&leased[0], "stats test: malformed"),
    )
    .await;
    let after_dead = QueueStats {
        waiting: 3,
        in_flight: 1,
        dead: 1,
    };
    assert_stats(
        &*b.bus,
        &q,
        after_dead,
        "after dead-lettering 1 of the 2 leased",
    )
    .await;
    must("ack", b.bus.ack(&leased[1])).await;
    let after_ack = QueueStats {
        waiting: 3,
        in_flight: 0,
        dead: 1,
    };
    assert_stats(&*b.bus, &q, after_ack, "after acking the other").await;
}

/// Payloads come out of the queue byte for byte as they went in: unicode text, nested JSON,
/// every byte value, and a 1 MiB document.
pub async fn payload_round_trips_through_the_queue(b: &Backends) {
    let q = queue("payload_round_trip");
    let nested = json!({
        "task_id": "task_ünïcødé",
        "deep": {"list": [1, 2.5, -3, null, true, {"x": ["y", {"z": "✓"}]}], "empty": {}},
        "text": "line\nbreak \"quoted\" \\ back\tslash — 日本語 — 🎻",
    });
    let payloads: Vec<(&str, Vec<u8>)> = vec![
        (
            "unicode text",
            "héllo wörld — 你好 — Привет — 🎻🚀".as_bytes().to_vec(),
        ),
        (
            "nested JSON",
            serde_json::to_vec(&nested).unwrap_or_default(),
        ),
        ("every byte value", (0..=255u8).collect()),
        ("1 MiB JSON document", json_of_size(1024 * 1024)),
    ];
    let mut expected: HashMap<String, (&str, Vec<u8>)> = HashMap::new();
    for (name, payload) in &payloads {
        let id = must(
            format!("enqueue of the {name} payload ({} bytes)", payload.len()),
            b.bus
                .enqueue(&q, OutgoingMessage::new(payload.clone(), Priority::DEFAULT)),
        )
        .await;
        expected.insert(id, (name, payload.clone()));
    }
    while !expected.is_empty() {
        let d = fetch_one(&*b.bus, &q, CALL_TIMEOUT, LONG_LEASE, "payload round trip").await;
        let (name, want) = expected
            .remove(&d.message_id)
            .unwrap_or_else(|| panic!("unexpected or repeated delivery {d:?}"));
        if let Some(diff) = describe_difference(&want, &d.payload) {
            panic!("the {name} payload changed on its way through the queue: {diff}");
        }
        must("ack", b.bus.ack(&d)).await;
    }
}
