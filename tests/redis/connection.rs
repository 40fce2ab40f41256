//! Connecting to Redis: ACL users and passwords from the URL (never shown), an ACL user that
//! may not run `PUBSUB`, TLS with a self-signed CA, and ports where no Redis answers (shared
//! with every backend: `agent_orchestra::testkit::brokers`).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use agent_orchestra::bus::{FetchOptions, OutgoingMessage};
use agent_orchestra::task_queue::{Claim, Settle};
use agent_orchestra::testkit::brokers::{self, BrokerControl, PrivateBroker};
use agent_orchestra::{connect, BackendUrls, ConnectOptions, Priority, Task, TaskStatus};
use serde_json::json;

use crate::hot_path::{completed_with, fetch_claim_research};
use crate::{new_task, open_url, options, queue, raw_connection};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_user_and_password_come_from_the_url_and_are_never_shown() {
    let server = PrivateBroker::redis(&[
        "--requirepass",
        "default-pass-9f3",
        "--user",
        "alice",
        "on",
        ">wonderland-7c1",
        "~*",
        "&*",
        "+@all",
    ])
    .await;
    let port = server.port();

    let b = open_url(
        &format!("redis://alice:wonderland-7c1@127.0.0.1:{port}/2"),
        "t_acl_",
    )
    .await;
    let t = new_task(json!({"who": "alice"}), 5);
    b.registry.create(&t).await.expect("create as alice");
    let mut con = raw_connection(&format!("redis://alice:wonderland-7c1@127.0.0.1:{port}/2")).await;
    let exists: i64 = redis::cmd("EXISTS")
        .arg(format!("t_acl_task_registry:{}", t.task_id))
        .query_async(&mut con)
        .await
        .expect("EXISTS");
    assert_eq!(exists, 1, "the database number came from the URL path");

    let b = open_url(
        &format!("redis://:default-pass-9f3@127.0.0.1:{port}"),
        "t_acl_",
    )
    .await;
    assert!(b
        .locks
        .acquire("k", "me", Duration::from_secs(5))
        .await
        .expect("acquire")
        .is_some());

    for url in [
        format!("redis://alice:hunter2-wrong@127.0.0.1:{port}"),
        format!("redis://:hunter2-wrong@127.0.0.1:{port}"),
    ] {
        let err = connect(&BackendUrls::all(&url), &options("t_acl_"))
            .await
            .expect_err("a wrong password is refused");
        let shown = format!("{err} / {err:?}");
        assert!(
            !shown.contains("hunter2-wrong"),
            "the password leaked: {shown}"
        );
        assert!(
            !err.is_temporary(),
            "a wrong password is permanent: {shown}"
        );
    }
}

/// The scripts ask `PUBSUB` whether anyone listens before publishing an event. An ACL user
/// that may not run `PUBSUB` still runs the whole lifecycle: a refused `PUBSUB` counts as
/// someone listening (before, the claim script stopped after its first write).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_user_without_pubsub_runs_the_whole_lifecycle() {
    let server = PrivateBroker::redis(&[
        "--user",
        "bob",
        "on",
        ">no-pubsub-4e2",
        "~*",
        "&*",
        "+@all",
        "-pubsub",
    ])
    .await;
    let url = format!("redis://bob:no-pubsub-4e2@127.0.0.1:{}", server.port());
    let mut raw = raw_connection(&url).await;
    let refused = redis::cmd("PUBSUB")
        .arg("NUMPAT")
        .query_async::<i64>(&mut raw)
        .await;
    assert!(refused.is_err(), "bob may not run PUBSUB: {refused:?}");
    let b = open_url(&url, "t_nopubsub_").await;
    let tasks: Vec<Task> = (0..4).map(|i| new_task(json!({ "i": i }), 5)).collect();
    for r in b.tasks().submit(&tasks).await.expect("submit") {
        r.expect("each task submitted");
    }
    let got = fetch_claim_research(&b, 4).await;
    assert_eq!(got.len(), 4);
    for (d, c) in got {
        let running = match c {
            Some(Claim::Claimed(t)) => t,
            other => panic!("claimed, got {other:?}"),
        };
        b.tasks()
            .record(
                &d,
                &running,
                completed_with(&running, json!("done")),
                Settle::Ack,
            )
            .await
            .expect("record");
    }
    let counts = b.registry.counts().await.expect("counts");
    assert_eq!(counts.get(TaskStatus::Completed), 4, "{counts:?}");
    assert_eq!(counts.get(TaskStatus::Running), 0, "{counts:?}");
    let stats = b.bus.stats(&queue("research")).await.expect("stats");
    assert_eq!((stats.waiting, stats.in_flight), (0, 0), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_refused_is_a_temporary_error() {
    brokers::a_port_nobody_listens_on_is_a_temporary_error(|p| format!("redis://127.0.0.1:{p}"))
        .await;
}

// ---------------------------------------------------------------------------------------------
// TLS against our own server with a self-signed CA

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl (needed to make a test certificate): {e}"));
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a server certificate for 127.0.0.1 / localhost signed by it.
fn make_certificates(dir: &Path) {
    std::fs::write(
        dir.join("server.ext"),
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n\
         extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .expect("ext file");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=orchestra test CA",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_url_with_a_self_signed_ca_works_for_every_role() {
    let certs = tempfile::tempdir().expect("temp dir");
    make_certificates(certs.path());
    let c = certs.path().to_path_buf();
    let ca = certs.path().join("ca.crt").display().to_string();
    let server = PrivateBroker::launch(
        "redis-server",
        move |port, dir| {
            let f = |n: &str| c.join(n).to_string_lossy().into_owned();
            vec![
                "--port".into(),
                "0".into(),
                "--tls-port".into(),
                port.to_string(),
                "--bind".into(),
                "127.0.0.1".into(),
                "--dir".into(),
                dir.to_string_lossy().into_owned(),
                "--save".into(),
                "".into(),
                "--tls-cert-file".into(),
                f("server.crt"),
                "--tls-key-file".into(),
                f("server.key"),
                "--tls-ca-cert-file".into(),
                f("ca.crt"),
                "--tls-auth-clients".into(),
                "no".into(),
                "--requirepass".into(),
                "tls-pass-51".into(),
            ]
        },
        move |port| format!("rediss://:tls-pass-51@127.0.0.1:{port}/0?tls_ca_file={ca}"),
    )
    .await;
    let b = open_url(&server.url(), "t_tls_").await;

    let q = queue("tls");
    let mut sub = b.bus.subscribe("events").await.expect("subscribe over TLS");
    b.bus
        .enqueue(
            &q,
            OutgoingMessage::new(&b"{\"tls\":true}"[..], Priority::HIGHEST),
        )
        .await
        .expect("enqueue over TLS");
    let d = b
        .bus
        .fetch(
            &q,
            FetchOptions {
                max: 1,
                wait: Duration::from_secs(5),
                lease: Duration::from_secs(5),
            },
        )
        .await
        .expect("fetch over TLS")
        .pop()
        .expect("delivered");
    b.bus.ack(&d).await.expect("ack");
    b.bus.publish("events", b"over tls").await.expect("publish");
    let got = tokio::time::timeout(Duration::from_secs(10), sub.recv())
        .await
        .expect("event");
    assert_eq!(got.as_deref(), Some(&b"over tls"[..]));
    let t = new_task(json!({"secure": "✓"}), 2);
    b.registry.create(&t).await.expect("create over TLS");
    assert_eq!(
        b.registry
            .get(&t.task_id)
            .await
            .expect("get")
            .expect("found"),
        t
    );
    assert!(b
        .locks
        .acquire("tls", "me", Duration::from_secs(5))
        .await
        .expect("lock")
        .is_some());

    // Without the CA the server's certificate is not trusted: a permanent error.
    let err = connect(
        &BackendUrls::all(format!(
            "rediss://:tls-pass-51@127.0.0.1:{}/0",
            server.port()
        )),
        &ConnectOptions {
            connect_timeout: Duration::from_secs(3),
            ..options("t_tls_")
        },
    )
    .await
    .expect_err("an untrusted certificate is refused");
    assert!(!format!("{err:?}").contains("tls-pass-51"), "{err:?}");
}

/// A redis:// URL naming a port where something else answers is one clear line, not the
/// client's multi-line parser dump.
#[tokio::test]
async fn a_port_that_does_not_speak_redis_is_one_clear_error() {
    brokers::a_port_that_speaks_another_protocol_is_one_clear_error(
        |port| format!("redis://127.0.0.1:{port}"),
        "not the Redis protocol",
    )
    .await;
}
