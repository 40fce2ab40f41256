//! The conformance and engine suites against real NATS with JetStream, the tests every backend
//! shares that need a server of their own (a restart loses nothing, subscribers are renewed, ports
//! where no NATS answers: `agent_orchestra::testkit::brokers`), plus what only the NATS backend
//! promises (auth and TLS from the URL, the lease mapped onto the consumers' AckWait).
//!
//! The shared broker comes from `ORCHESTRA_TEST_NATS_URL`, a container, or 127.0.0.1:4222 (see
//! `agent_orchestra::testkit::harness`). Tests that stop a server, or need auth or TLS, start
//! their own `nats-server` on a free port.

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

mod support;

/// Deletes every stream (and so every KV bucket) whose name the prefix produced.
async fn cleanup(prefix: &str) {
    let url = broker_url(BrokerKind::Nats).await;
    support::nats_at(&url, prefix).await;
}

agent_orchestra::conformance_suite!(make_backends, cleanup);
agent_orchestra::engine_suite!(make_backends, cleanup);

// ---- NATS-only behaviour, against nats-server processes these tests start themselves ----

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agent_orchestra::bundle::{Parts, Roles};
use agent_orchestra::testkit::brokers::{self, PrivateBroker};

use agent_orchestra::bus::{FetchOptions, OutgoingMessage};
use agent_orchestra::{Error, Priority, QueueName};

/// The error of an `open` that must fail (`Parts` is not `Debug`).
fn open_error(r: agent_orchestra::Result<Parts>, why: &str) -> Error {
    match r {
        Ok(_) => panic!("{why}"),
        Err(e) => e,
    }
}

fn opts(prefix: &str) -> ConnectOptions {
    ConnectOptions {
        prefix: prefix.to_string(),
        connect_timeout: Duration::from_secs(3),
        ..ConnectOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumption_resumes_after_the_server_restarts_and_nothing_is_lost() {
    let mut server = PrivateBroker::nats_jetstream(&[]).await;
    brokers::worker_keeps_consuming_across_a_restart(&mut server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_resubscribes_after_a_server_restart() {
    let mut server = PrivateBroker::nats_jetstream(&[]).await;
    brokers::subscriber_resubscribes_after_a_restart(&mut server).await;
}

/// A URL naming the port of another protocol's server fails with one line that says so.
#[tokio::test]
async fn a_port_that_does_not_speak_nats_is_one_clear_error() {
    brokers::a_port_that_speaks_another_protocol_is_one_clear_error(
        |port| format!("nats://127.0.0.1:{port}"),
        "not the NATS protocol",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_refused_is_a_temporary_error() {
    brokers::a_port_nobody_listens_on_is_a_temporary_error(|p| format!("nats://127.0.0.1:{p}"))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_password_come_from_the_url_and_stay_secret() {
    let server = PrivateBroker::nats(&["--user", "alice", "--pass", "s3cret-pw"]).await;
    let port = server.port();
    let events_only = Roles {
        bus: true,
        registry: false,
        locks: false,
    };
    let good = format!("nats://alice:s3cret-pw@127.0.0.1:{port}");
    let parts = agent_orchestra::connect::open(&good, &events_only, &opts("auth_"))
        .await
        .expect("right password connects");
    let bus = parts.bus.expect("bus opened");
    let mut sub = bus.subscribe("hello").await.expect("subscribe");
    bus.publish("hello", b"hi").await.expect("publish");
    let got = tokio::time::timeout(Duration::from_secs(5), sub.recv())
        .await
        .expect("event within 5 s");
    assert_eq!(got.as_deref(), Some(&b"hi"[..]));

    let bad = format!("nats://alice:wrong-pw@127.0.0.1:{port}");
    let err = open_error(
        agent_orchestra::connect::open(&bad, &events_only, &opts("auth_")).await,
        "a wrong password must not connect",
    );
    let text = err.to_string();
    assert!(!text.contains("wrong-pw"), "password leaked: {text}");
    assert!(
        !err.is_temporary(),
        "bad credentials are permanent: {err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_comes_from_the_user_part_or_the_query() {
    let server = PrivateBroker::nats(&["--auth", "T0K3N"]).await;
    let port = server.port();
    let events_only = Roles {
        bus: true,
        registry: false,
        locks: false,
    };
    for url in [
        format!("nats://T0K3N@127.0.0.1:{port}"),
        format!("nats://127.0.0.1:{port}?token=T0K3N"),
    ] {
        agent_orchestra::connect::open(&url, &events_only, &opts("token_"))
            .await
            .unwrap_or_else(|e| panic!("{url} should connect: {e}"));
    }
    let err = open_error(
        agent_orchestra::connect::open(
            &format!("nats://nope@127.0.0.1:{port}"),
            &events_only,
            &opts("token_"),
        )
        .await,
        "a wrong token must not connect",
    );
    assert!(!err.to_string().contains("nope"), "token leaked: {err}");
}

/// A CA and a server certificate for 127.0.0.1, made with the openssl tool.
fn make_certificates(dir: &Path) {
    let run = |args: &[&str]| {
        let status = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("the TLS test needs the openssl tool (apt-get install openssl)");
        assert!(status.success(), "openssl {args:?} failed");
    };
    std::fs::write(
        dir.join("ext.cnf"),
        "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write ext.cnf");
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=orchestra-test-ca",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_by_scheme_or_option_with_a_private_ca() {
    let dir = tempfile::tempdir().expect("temp dir");
    make_certificates(dir.path());
    let store = dir.path().join("js");
    let server = PrivateBroker::nats(&[
        "-js",
        "-sd",
        &store.display().to_string(),
        "--tls",
        "--tlscert",
        &dir.path().join("server.pem").display().to_string(),
        "--tlskey",
        &dir.path().join("server.key").display().to_string(),
    ])
    .await;
    let port = server.port();
    let ca = dir.path().join("ca.pem").display().to_string();
    for url in [
        format!("tls://127.0.0.1:{port}?tls_ca={ca}"),
        format!("nats://127.0.0.1:{port}?tls=true&tls_ca={ca}"),
    ] {
        let b = connect(&BackendUrls::all(url.as_str()), &opts("tls_"))
            .await
            .unwrap_or_else(|e| panic!("{url} should connect over TLS: {e}"));
        let q = QueueName::parse("over_tls").expect("queue name");
        b.bus
            .enqueue(&q, OutgoingMessage::new(&b"{}"[..], Priority::DEFAULT))
            .await
            .expect("enqueue over TLS");
        let got = b
            .bus
            .fetch(
                &q,
                FetchOptions {
                    max: 1,
                    wait: Duration::from_secs(2),
                    lease: Duration::from_secs(5),
                },
            )
            .await
            .expect("fetch over TLS");
        assert_eq!(got.len(), 1);
        b.bus.ack(&got[0]).await.expect("ack over TLS");
    }
    // Without the CA the server's certificate is not trusted.
    let err = open_error(
        agent_orchestra::connect::open(
            &format!("tls://127.0.0.1:{port}"),
            &Roles::ALL,
            &opts("tls_"),
        )
        .await,
        "an unknown CA must be refused",
    );
    assert!(matches!(err, Error::Backend { .. }), "{err:?}");
}

#[tokio::test]
async fn a_missing_credentials_file_is_a_configuration_error() {
    let err = open_error(
        agent_orchestra::connect::open(
            "nats://127.0.0.1:4222?creds=/nonexistent/orchestra.creds",
            &Roles::ALL,
            &ConnectOptions::default(),
        )
        .await,
        "a missing creds file must fail",
    );
    assert!(
        matches!(&err, Error::Config { key, .. } if key == "creds"),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_travel_on_prefixed_core_subjects() {
    let url = broker_url(BrokerKind::Nats).await;
    let prefix = agent_orchestra::testkit::harness::unique_prefix("events_subject");
    let b = make_backends(&prefix).await;
    let client = async_nats::connect(url.trim_start_matches("nats://"))
        .await
        .expect("raw client");
    let mut raw = client
        .subscribe(format!("{prefix}events.task_events"))
        .await
        .expect("raw subscribe");
    client.flush().await.expect("flush");
    // Events are at-most-once: publish until the raw subscriber has seen one.
    let deadline = Instant::now() + Duration::from_secs(10);
    let m = loop {
        b.bus
            .publish("task_events", br#"{"e":1}"#)
            .await
            .expect("publish");
        if let Ok(m) = tokio::time::timeout(Duration::from_millis(200), raw.next()).await {
            break m.expect("subscription open");
        }
        assert!(
            Instant::now() < deadline,
            "no event on {prefix}events.task_events within 10 s"
        );
    };
    assert_eq!(&m.payload[..], br#"{"e":1}"#);
    // Opening the registry and locks created their buckets.
    cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_queue_is_a_work_queue_stream_with_one_consumer_per_level() {
    let url = broker_url(BrokerKind::Nats).await;
    let prefix = agent_orchestra::testkit::harness::unique_prefix("stream_layout");
    let b = make_backends(&prefix).await;
    let q = QueueName::parse("layout").expect("queue name");
    b.bus
        .enqueue(&q, OutgoingMessage::new(&b"{}"[..], Priority::DEFAULT))
        .await
        .expect("enqueue");
    let got = b
        .bus
        .fetch(
            &q,
            FetchOptions {
                max: 1,
                wait: Duration::from_secs(2),
                lease: Duration::from_secs(5),
            },
        )
        .await
        .expect("fetch");
    b.bus.ack(&got[0]).await.expect("ack");
    let client = async_nats::connect(url.trim_start_matches("nats://"))
        .await
        .expect("raw client");
    let js = async_nats::jetstream::new(client);
    let mut stream = js
        .get_stream(format!("{prefix}ORCH_Q_layout"))
        .await
        .expect("the queue's stream exists");
    let info = stream.info().await.expect("stream info").clone();
    assert_eq!(
        info.config.retention,
        async_nats::jetstream::stream::RetentionPolicy::WorkQueue
    );
    assert_eq!(
        info.config.storage,
        async_nats::jetstream::stream::StorageType::File
    );
    assert_eq!(info.state.consumer_count, 11, "p1..p10 and delayed");
    cleanup(&prefix).await;
}

/// A pull answered 503 or not at all (the level's consumer has no leader, as while a replicated
/// consumer elects one, or is gone for a moment) is retried within the fetch, not returned to
/// the caller as an error: here the consumer is deleted and made again while a fetch waits.
#[tokio::test]
async fn a_fetch_rides_out_a_consumer_that_is_gone_for_a_moment() {
    use async_nats::jetstream::consumer::{pull, AckPolicy};
    let url = broker_url(BrokerKind::Nats).await;
    let prefix = agent_orchestra::testkit::harness::unique_prefix("pull_503");
    let b = make_backends(&prefix).await;
    let q = QueueName::parse("gone").expect("queue name");
    let options = |wait| FetchOptions {
        max: 1,
        wait,
        lease: Duration::from_secs(30),
    };
    // The first fetch makes the consumers.
    let none = b.bus.fetch(&q, options(Duration::from_millis(100))).await;
    assert!(none.expect("first fetch").is_empty());
    let client = async_nats::connect(url.trim_start_matches("nats://"))
        .await
        .expect("raw client");
    let js = async_nats::jetstream::new(client);
    let stream = js
        .get_stream(format!("{prefix}ORCH_Q_gone"))
        .await
        .expect("the queue's stream");
    let mut level = stream
        .get_consumer::<pull::Config>("p5")
        .await
        .expect("the consumer of priority 5");
    let config = level.info().await.expect("consumer info").config.clone();
    stream.delete_consumer("p5").await.expect("delete p5");
    b.bus
        .enqueue(&q, OutgoingMessage::new(&b"{}"[..], Priority::DEFAULT))
        .await
        .expect("enqueue");
    let fetch = tokio::spawn({
        let b = b.clone();
        let q = q.clone();
        async move { b.bus.fetch(&q, options(Duration::from_secs(20))).await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    stream
        .create_consumer(pull::Config {
            durable_name: Some("p5".into()),
            filter_subject: config.filter_subject.clone(),
            ack_policy: AckPolicy::Explicit,
            ack_wait: config.ack_wait,
            max_deliver: -1,
            max_ack_pending: -1,
            ..Default::default()
        })
        .await
        .expect("make p5 again");
    let got = fetch.await.expect("fetch task");
    cleanup(&prefix).await;
    let got = got.expect("the fetch failed while the consumer was gone");
    assert_eq!(got.len(), 1, "the message was not fetched once p5 was back");
}

/// Polls `f` every 50 ms until it is true; false after 15 s (a liveness bound, not a timing).
async fn eventually(mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_skipped_only_while_nobody_listens() {
    use agent_orchestra::EVENTS_TOPIC;
    let url = broker_url(BrokerKind::Nats).await;
    let prefix = agent_orchestra::testkit::harness::unique_prefix("listeners");
    let publisher = make_backends(&prefix).await;
    let elsewhere = make_backends(&prefix).await;
    let events = format!("{prefix}events.{EVENTS_TOPIC}");
    let bus = publisher.bus.clone();

    // Nobody listens, once a probe has answered. (Before the first answer every event is
    // published; when that answer comes depends on the broker, so it is not asserted here.)
    assert!(
        eventually(|| !bus.may_have_subscribers(EVENTS_TOPIC)).await,
        "a probe should have found nobody on {events}"
    );

    // A subscriber of this process counts at once.
    let own = publisher
        .bus
        .subscribe(EVENTS_TOPIC)
        .await
        .expect("subscribe");
    assert!(bus.may_have_subscribers(EVENTS_TOPIC));
    drop(own);
    assert!(eventually(|| !bus.may_have_subscribers(EVENTS_TOPIC)).await);

    // A subscriber in another process: once the publisher has received anything that
    // process sent after subscribing (here an event on another topic, through the same
    // server), the publisher knows at once; its hello came first on the same connection.
    let mut go = publisher.bus.subscribe("test_go").await.expect("subscribe");
    let mut sub = elsewhere
        .bus
        .subscribe(EVENTS_TOPIC)
        .await
        .expect("subscribe");
    elsewhere.bus.publish("test_go", b"go").await.expect("go");
    let got = tokio::time::timeout(Duration::from_secs(10), go.recv())
        .await
        .expect("go within 10 s")
        .expect("open");
    assert_eq!(got, b"go".to_vec());
    assert!(
        bus.may_have_subscribers(EVENTS_TOPIC),
        "the other process's subscriber was not noticed by the time its later message arrived"
    );
    // Its events arrive, and probes are answered, never delivered as events.
    // Let at least one probe reach it.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    bus.publish(EVENTS_TOPIC, br#"{"e":1}"#)
        .await
        .expect("publish");
    let got = tokio::time::timeout(Duration::from_secs(10), sub.recv())
        .await
        .expect("the event within 10 s")
        .expect("subscription open");
    assert_eq!(
        got,
        br#"{"e":1}"#.to_vec(),
        "a probe was delivered as an event"
    );
    assert!(
        bus.may_have_subscribers(EVENTS_TOPIC),
        "the probe did not find it"
    );
    drop(sub);
    assert!(
        eventually(|| !bus.may_have_subscribers(EVENTS_TOPIC)).await,
        "a probe should have noticed the subscriber left"
    );

    // A subscriber that never says hello (another library, the `nats` tool) is found by the
    // probe, which it sees as an empty message with the Orch-Probe header.
    let raw = async_nats::connect(url.trim_start_matches("nats://"))
        .await
        .expect("raw client");
    let mut foreign = raw.subscribe(events.clone()).await.expect("foreign sub");
    raw.flush().await.expect("flush");
    assert!(
        eventually(|| bus.may_have_subscribers(EVENTS_TOPIC)).await,
        "a probe should have found the foreign subscriber"
    );
    let probe = tokio::time::timeout(Duration::from_secs(10), foreign.next())
        .await
        .expect("a probe within 10 s")
        .expect("open");
    assert!(probe.payload.is_empty());
    assert!(probe
        .headers
        .as_ref()
        .is_some_and(|h| h.get("Orch-Probe").is_some()));
    drop(foreign);
    cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_namespace_deletes_every_stream_and_bucket_of_the_prefix_and_nothing_else() {
    let url = broker_url(BrokerKind::Nats).await;
    let streams = |p: String| {
        let url = url.clone();
        async move { support::nats_streams(&url, &p).await }
    };
    let make = |p: String| async move { make_backends(&p).await };
    let had = support::check_drop(&url, make, streams, |_| false).await;
    assert!(
        had.len() >= 4,
        "work queue, dead letters, tasks, locks: {had:?}"
    );
}

/// `subscribe` returns only once the server has the interest: an event another connection
/// publishes right after it returns is delivered. (Flushing the socket is not enough: the
/// server reads the two connections concurrently, and a publish it reads first is lost.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_published_elsewhere_right_after_subscribe_returns_is_delivered() {
    let prefix = agent_orchestra::testkit::harness::unique_prefix("sub_in_force");
    let subscriber = make_backends(&prefix).await;
    let publisher = make_backends(&prefix).await;
    for i in 0..2000 {
        let topic = format!("topic_{i}");
        let mut sub = subscriber.bus.subscribe(&topic).await.expect("subscribe");
        publisher
            .bus
            .publish(&topic, b"first")
            .await
            .expect("publish");
        let got = tokio::time::timeout(Duration::from_secs(5), sub.recv())
            .await
            .unwrap_or_else(|_| panic!("round {i}: the event published after subscribe was lost"))
            .expect("subscription open");
        assert_eq!(got, b"first".to_vec());
    }
}

/// `subscribe` proves its subscription in force with a message to itself under the namespace
/// (`{prefix}orch.echo.*`), not under `_INBOX.>`: an account that may not publish to
/// `_INBOX.>` subscribes at once and gets the events another connection publishes right
/// after. An account that may not publish the echo either still subscribes (after the echo's
/// 5 s timeout, with a warning) instead of failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_works_for_accounts_that_may_not_publish_to_inboxes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("nats.conf");
    std::fs::write(
        &config,
        format!(
            r#"jetstream {{ store_dir: "{}" }}
authorization {{
  users = [
    {{ user: "all", password: "pw" }}
    {{ user: "noinbox", password: "pw",
       permissions: {{ publish: {{ allow: [">"], deny: ["_INBOX.>"] }}, subscribe: {{ allow: [">"] }} }} }}
    {{ user: "noecho", password: "pw",
       permissions: {{ publish: {{ allow: [">"], deny: ["_INBOX.>", "perm_orch.echo.>"] }}, subscribe: {{ allow: [">"] }} }} }}
  ]
}}
"#,
            dir.path().join("js").display()
        ),
    )
    .expect("write the server's configuration");
    let server = PrivateBroker::nats(&["-c", &config.display().to_string()]).await;
    let port = server.port();
    let url = |user: &str| format!("nats://{user}:pw@127.0.0.1:{port}");
    let publisher = connect(&BackendUrls::all(url("all").as_str()), &opts("perm_"))
        .await
        .expect("connect as the publisher");
    for user in ["noinbox", "noecho"] {
        let b = connect(&BackendUrls::all(url(user).as_str()), &opts("perm_"))
            .await
            .unwrap_or_else(|e| panic!("connect as {user}: {e}"));
        // One round for "noecho": each of its subscribes waits for the echo's timeout.
        let rounds = if user == "noinbox" { 3 } else { 1 };
        for i in 0..rounds {
            let topic = format!("{user}_{i}");
            let started = Instant::now();
            let mut sub = b
                .bus
                .subscribe(&topic)
                .await
                .unwrap_or_else(|e| panic!("{user} subscribes to {topic}: {e}"));
            let took = started.elapsed();
            if user == "noinbox" {
                // Not a timing assertion: the echo either came back or the 5 s timeout ran.
                assert!(
                    took < Duration::from_secs(5),
                    "{user}: subscribe waited for the echo's timeout ({took:?}): the echo is not \
                     where this account may publish"
                );
            }
            publisher
                .bus
                .publish(&topic, b"hello")
                .await
                .expect("publish");
            let got = tokio::time::timeout(Duration::from_secs(10), sub.recv())
                .await
                .unwrap_or_else(|_| panic!("{user}: the event on {topic} was not delivered"))
                .expect("subscription open");
            assert_eq!(got, b"hello".to_vec());
        }
    }
}

/// A message on a queue's subject whose `Orch-Blob` header is malformed or names chunks that
/// are not there (another program's message) is dead-lettered at once, without allocating what
/// the header claims, and the queue's other messages are delivered; the dead letters list it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bogus_blob_header_is_dead_lettered_not_trusted() {
    let url = broker_url(BrokerKind::Nats).await;
    let prefix = agent_orchestra::testkit::harness::unique_prefix("bogus_blob");
    let b = make_backends(&prefix).await;
    let q = QueueName::parse("bogus").unwrap();
    // The stream exists once something was enqueued.
    b.bus
        .enqueue(
            &q,
            OutgoingMessage::new(b"first".to_vec(), Priority::new(5).unwrap()),
        )
        .await
        .expect("enqueue");
    let client = async_nats::connect(url.trim_start_matches("nats://"))
        .await
        .expect("raw client");
    let js = async_nats::jetstream::new(client);
    let bogus = [
        "x;18446744073709551615;0",
        "x;1099511627776;3",
        "x;5;1000000000",
        "not a blob",
    ];
    for h in bogus {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Orch-Blob", h);
        js.publish_with_headers(format!("{prefix}orch.q.bogus.5"), headers, "".into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }
    b.bus
        .enqueue(
            &q,
            OutgoingMessage::new(b"last".to_vec(), Priority::new(5).unwrap()),
        )
        .await
        .expect("enqueue");
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.len() < 2 && Instant::now() < deadline {
        let batch = b
            .bus
            .fetch(
                &q,
                FetchOptions {
                    max: 10,
                    wait: Duration::from_secs(1),
                    lease: Duration::from_secs(30),
                },
            )
            .await
            .expect("fetch (a bogus message must not fail it)");
        for d in batch {
            b.bus.ack(&d).await.expect("ack");
            got.push(d.payload);
        }
    }
    assert_eq!(got, vec![b"first".to_vec(), b"last".to_vec()]);
    let dead = b.bus.dead_letters(&q, 10).await.expect("dead letters");
    assert_eq!(dead.len(), bogus.len(), "{dead:?}");
    assert!(
        dead.iter()
            .all(|d| d.reason.starts_with("malformed message")),
        "{dead:?}"
    );
    drop(b);
    cleanup(&prefix).await;
}

/// Inspecting a namespace (`stats`, `task get`, `tasks list`, `dead-letters`) creates no
/// bucket or stream: opening the backend would declare the task and lock buckets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_that_only_read_create_no_stream_or_bucket() {
    let url = broker_url(BrokerKind::Nats).await;
    let streams = |p: String| {
        let url = url.clone();
        async move { support::nats_streams(&url, &p).await }
    };
    support::check_read_only_commands(&url, true, streams).await;
}

/// `replicas=3` on a server outside any cluster: opening fails with a configuration error for
/// the key `replicas`, both when the streams would be created with 3 replicas and when they
/// exist with 1 (they are never used silently with a count other than the one asked for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_a_single_server_cannot_hold_are_a_configuration_error() {
    let url = broker_url(BrokerKind::Nats).await;
    let with = |q: &str| match url.contains('?') {
        true => format!("{url}&{q}"),
        false => format!("{url}?{q}"),
    };
    let prefix = agent_orchestra::testkit::harness::unique_prefix("replicas_single");
    let expect_config = |r: agent_orchestra::Result<Parts>, when: &str| {
        let err = open_error(
            r,
            &format!("{when}: replicas=3 must not open on a single server"),
        );
        assert!(
            matches!(&err, Error::Config { key, reason } if key == "replicas" && reason.contains('3')),
            "{when}: expected a configuration error for `replicas`, got {err:?}"
        );
    };
    // Nothing exists yet: the first stream's creation is refused.
    expect_config(
        agent_orchestra::connect::open(&with("replicas=3"), &Roles::ALL, &opts(&prefix)).await,
        "new streams",
    );
    // The streams exist with one replica: the update is refused.
    let parts = agent_orchestra::connect::open(&with("replicas=1"), &Roles::ALL, &opts(&prefix))
        .await
        .unwrap_or_else(|e| panic!("replicas=1 opens: {e}"));
    drop(parts);
    expect_config(
        agent_orchestra::connect::open(&with("replicas=3"), &Roles::ALL, &opts(&prefix)).await,
        "existing streams",
    );
    cleanup(&prefix).await;
}
