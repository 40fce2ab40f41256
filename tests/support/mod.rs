//! Cleanup of everything a test created under its prefix, one function per broker, shared by
//! the backend test files. Nothing here calls FLUSHALL, FLUSHDB or deletes another prefix.
#![allow(dead_code)]

use agent_orchestra::testkit::harness::{broker_url, BrokerKind};

/// Deletes every key starting with `prefix` on the shared test Redis.
#[cfg(feature = "redis")]
pub async fn redis(prefix: &str) {
    redis_at(&broker_url(BrokerKind::Redis).await, prefix).await;
}

/// Deletes every Redis key starting with `prefix` on the server at `url` (the library's
/// `drop_namespace`: SCAN + UNLINK).
#[cfg(feature = "redis")]
pub async fn redis_at(url: &str, prefix: &str) {
    drop_at(url, prefix).await;
}

/// The Redis keys starting with `prefix` on the server at `url`.
#[cfg(feature = "redis")]
pub async fn redis_keys(url: &str, prefix: &str) -> Vec<String> {
    let mut con = redis::Client::open(url)
        .expect("test Redis URL")
        .get_multiplexed_async_connection()
        .await
        .expect("connection to the test Redis");
    let escaped: String = prefix
        .chars()
        .flat_map(|c| match c {
            '*' | '?' | '[' | ']' | '\\' => vec!['\\', c],
            c => vec![c],
        })
        .collect();
    let mut out = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{escaped}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut con)
            .await
            .expect("SCAN");
        out.extend(keys);
        if next == 0 {
            out.sort();
            return out;
        }
        cursor = next;
    }
}

/// `drop_namespace` for one broker URL, panicking on failure.
pub async fn drop_at(url: &str, prefix: &str) {
    drop_queues_at(url, prefix, &[]).await;
}

/// `drop_namespace` for one broker URL naming `queues` (RabbitMQ needs them), panicking on
/// failure.
pub async fn drop_queues_at(url: &str, prefix: &str, queues: &[&str]) {
    assert!(!prefix.is_empty(), "cleanup needs a prefix");
    let opts = agent_orchestra::ConnectOptions {
        prefix: prefix.to_string(),
        ..agent_orchestra::ConnectOptions::default()
    };
    let queues: Vec<agent_orchestra::QueueName> = queues
        .iter()
        .map(|q| agent_orchestra::QueueName::parse(q).expect("queue name"))
        .collect();
    agent_orchestra::connect::drop_namespace(
        &agent_orchestra::BackendUrls::all(url),
        &opts,
        &queues,
    )
    .await
    .unwrap_or_else(|e| panic!("cannot drop the namespace {prefix}: {e}"));
}

/// Deletes the JetStream streams (work queues, KV buckets) the prefix created on the shared
/// test server.
#[cfg(feature = "nats")]
pub async fn nats(prefix: &str) {
    nats_at(&broker_url(BrokerKind::Nats).await, prefix).await;
}

/// Deletes the JetStream streams whose names start with the prefix on the server at `url`
/// (the library's `drop_namespace`).
#[cfg(feature = "nats")]
pub async fn nats_at(url: &str, prefix: &str) {
    drop_at(url, prefix).await;
}

/// The JetStream streams (and so buckets) whose names the prefix produced, on the server at
/// `url`.
#[cfg(feature = "nats")]
pub async fn nats_streams(url: &str, prefix: &str) -> Vec<String> {
    use futures::StreamExt;
    let client = async_nats::connect(url.trim_start_matches("nats://"))
        .await
        .expect("connect to list streams");
    let js = async_nats::jetstream::new(client);
    // The backend maps anything outside [A-Za-z0-9_-] to '_' in stream names.
    let p: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let kv = format!("KV_{p}");
    let mut names: Vec<String> = js
        .stream_names()
        .filter_map(|n| async move { n.ok() })
        .filter(|n| std::future::ready(n.starts_with(&p) || n.starts_with(&kv)))
        .collect()
        .await;
    names.sort();
    names
}

/// Deletes every RabbitMQ queue starting with `prefix` (listed with `rabbitmqctl`), and the
/// prefix's events exchange.
#[cfg(feature = "rabbitmq")]
pub async fn rabbitmq(prefix: &str) {
    use lapin::{Connection, ConnectionProperties};
    assert!(!prefix.is_empty(), "cleanup needs a prefix");
    let listed = rabbitmq_listed("list_queues", prefix).await;
    let url = broker_url(BrokerKind::Amqp).await;
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .expect("cleanup connection");
    rabbitmq_delete(conn, prefix, listed).await;
}

/// Over `conn`: deletes the queues `listed` and those whose names are known without listing
/// (the registry's and the locks' streams, the snapshots), and the prefix's events exchange;
/// then closes `conn`.
#[cfg(feature = "rabbitmq")]
pub async fn rabbitmq_delete(conn: lapin::Connection, prefix: &str, listed: Vec<String>) {
    use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
    let mut names = listed;
    names.push(format!("{prefix}registry"));
    names.push(format!("{prefix}locks"));
    names.push(format!("{prefix}registry.snapshots"));
    names.sort();
    names.dedup();
    for name in &names {
        // One channel per delete: a refused delete closes its channel.
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch
                .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }
    if let Ok(ch) = conn.create_channel().await {
        let _ = ch
            .exchange_delete(
                format!("{prefix}events").as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await;
    }
    let _ = conn.close(200, "cleaned up".into()).await;
}

/// The queue [`fill`] uses.
pub const DROP_QUEUE: &str = "dropq";

/// Puts a bit of everything under a namespace: tasks (one with a dependent), messages, a dead
/// letter, a delayed message, a lock.
pub async fn fill(b: &agent_orchestra::Backends) {
    use agent_orchestra::bus::{FetchOptions, OutgoingMessage};
    use agent_orchestra::engine::{DispatchOptions, Dispatcher};
    use agent_orchestra::{Priority, QueueName};
    use std::time::Duration;
    let d = Dispatcher::new(b.clone());
    let parent = d
        .dispatch(
            DROP_QUEUE,
            serde_json::json!({"n": 1}),
            3,
            DispatchOptions::default(),
        )
        .await
        .expect("dispatch");
    d.dispatch(
        DROP_QUEUE,
        serde_json::json!({"n": 2}),
        3,
        DispatchOptions::default().after([parent]),
    )
    .await
    .expect("dispatch a dependent");
    let q = QueueName::parse(DROP_QUEUE).unwrap();
    let p = Priority::new(1).unwrap();
    b.bus
        .enqueue(&q, OutgoingMessage::new(b"doomed".to_vec(), p))
        .await
        .expect("enqueue");
    let mut delayed = OutgoingMessage::new(b"later".to_vec(), p);
    delayed.delay = Duration::from_secs(3600);
    b.bus.enqueue(&q, delayed).await.expect("enqueue delayed");
    let got = b
        .bus
        .fetch(
            &q,
            FetchOptions {
                max: 1,
                wait: Duration::from_secs(5),
                lease: Duration::from_secs(30),
            },
        )
        .await
        .expect("fetch");
    b.bus
        .dead_letter(got.first().expect("a message"), "for the drop test")
        .await
        .expect("dead letter");
    b.locks
        .acquire("dropk", "tester", Duration::from_secs(600))
        .await
        .expect("lock")
        .expect("the lock is free");
}

/// The names `rabbitmqctl <what>` (`list_queues`, `list_exchanges`) prints that start with
/// `prefix`; empty if rabbitmqctl cannot be run.
#[cfg(feature = "rabbitmq")]
pub async fn rabbitmq_listed(what: &'static str, prefix: &str) -> Vec<String> {
    let listed = tokio::task::spawn_blocking(move || {
        std::process::Command::new("rabbitmqctl")
            .args([what, "-q", "--no-table-headers", "name"])
            .output()
    })
    .await
    .expect("rabbitmqctl task");
    let mut names: Vec<String> = match listed {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|n| n.starts_with(prefix))
            .collect(),
        _ => Vec::new(),
    };
    names.sort();
    names
}

/// Fills two namespaces, drops one, and checks with `list` (what the broker holds under a
/// prefix) that the dropped one is empty, except what `may_stay` allows, and the other
/// unchanged. `make` opens backends under a prefix. Returns the dropped prefix's listing from
/// before the drop.
pub async fn check_drop<M, MF, L, LF>(
    url: &str,
    make: M,
    list: L,
    may_stay: fn(&str) -> bool,
) -> Vec<String>
where
    M: Fn(String) -> MF,
    MF: std::future::Future<Output = agent_orchestra::Backends>,
    L: Fn(String) -> LF,
    LF: std::future::Future<Output = Vec<String>>,
{
    use agent_orchestra::testkit::harness::unique_prefix;
    let prefix = unique_prefix("drop");
    let neighbour = unique_prefix("drop_keep");
    let doomed = make(prefix.clone()).await;
    let kept = make(neighbour.clone()).await;
    fill(&doomed).await;
    fill(&kept).await;
    let had = list(prefix.clone()).await;
    assert!(!had.is_empty(), "nothing listed under {prefix}");
    let before = list(neighbour.clone()).await;
    drop(doomed);
    drop_queues_at(url, &prefix, &[DROP_QUEUE]).await;
    let left: Vec<String> = list(prefix.clone())
        .await
        .into_iter()
        .filter(|n| !may_stay(n))
        .collect();
    assert_eq!(left, Vec::<String>::new(), "left under {prefix}");
    assert_eq!(
        list(neighbour.clone()).await,
        before,
        "the neighbour changed"
    );
    drop(kept);
    drop_queues_at(url, &neighbour, &[DROP_QUEUE]).await;
    had
}

/// The `orchestra` binary with `args`, stdin closed, stdout and stderr piped, and none of the
/// caller's `ORCHESTRA_*` or `RUST_LOG` variables (the test decides the configuration).
pub fn orchestra_command(args: &[&str]) -> std::process::Command {
    use std::process::Stdio;
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_orchestra"));
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, _) in std::env::vars() {
        if k.starts_with("ORCHESTRA_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// The CLI's commands that only read (`stats`, `task get`, `tasks list`, `dead-letters`) create
/// nothing on the broker at `url`. On a prefix nothing uses they answer empty (with a note on
/// stderr) and `list` (what the broker holds under a prefix) stays empty; on a used prefix they
/// answer from the broker, and asking about a queue that does not exist creates nothing for it.
/// `list` must list what a dispatch creates (checked, so that a lister that sees nothing cannot
/// pass the test). `notes`: whether the backend tells an unused prefix (NATS, RabbitMQ; on Redis
/// reading creates nothing, so nothing is asked first, and a task the lab wrote has no index to
/// be found by).
pub async fn check_read_only_commands<L, LF>(url: &str, notes: bool, list: L)
where
    L: Fn(String) -> LF,
    LF: std::future::Future<Output = Vec<String>>,
{
    use agent_orchestra::testkit::harness::unique_prefix;
    let prefix = unique_prefix("readonly");
    let run = |args: &[&str]| {
        let mut cmd = orchestra_command(&["--url", url, "--prefix", &prefix]);
        let out = cmd.args(args).output().expect("the orchestra binary runs");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let json = |s: &str| -> serde_json::Value {
        serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
    };
    const NOTE: &str = "nothing was created";

    // A prefix nothing uses.
    let (code, out, err) = run(&["--json", "stats", "--queue", "ro_q"]);
    assert_eq!(code, 0, "stats: {err}");
    let v = json(&out);
    assert_eq!(v["total"], 0, "{out}");
    assert_eq!(v["queues"]["ro_q"]["waiting"], 0, "{out}");
    assert_eq!(
        err.contains(NOTE),
        notes,
        "the note that nothing exists: {err}"
    );
    let (code, _, err) = run(&["task", "get", "task_ro_missing"]);
    assert_eq!(code, 1, "task get of a task nowhere: {err}");
    assert!(err.contains("not found"), "{err}");
    let (code, out, err) = run(&["--json", "tasks", "list"]);
    assert_eq!(code, 0, "tasks list: {err}");
    assert_eq!(json(&out)["tasks"], serde_json::json!([]), "{out}");
    let (code, out, err) = run(&["--json", "dead-letters", "ro_q"]);
    assert_eq!(code, 0, "dead-letters: {err}");
    assert_eq!(json(&out)["dead_letters"], serde_json::json!([]), "{out}");
    assert_eq!(
        list(prefix.clone()).await,
        Vec::<String>::new(),
        "commands that only read created this under {prefix}"
    );

    // A used prefix, and a queue that does not exist on it.
    let (code, _, err) = run(&["dispatch", "ro_q", r#"{"x": 1}"#]);
    assert_eq!(code, 0, "dispatch: {err}");
    let had = list(prefix.clone()).await;
    assert!(
        !had.is_empty(),
        "the lister sees nothing a dispatch created under {prefix}"
    );
    let (code, out, err) = run(&["--json", "stats", "--queue", "ro_q", "--queue", "ro_other"]);
    assert_eq!(code, 0, "stats: {err}");
    let v = json(&out);
    assert_eq!(v["total"], 1, "{out}");
    assert_eq!(v["counts"]["PENDING"], 1, "{out}");
    assert_eq!(v["queues"]["ro_q"]["waiting"], 1, "{out}");
    assert_eq!(v["queues"]["ro_other"]["waiting"], 0, "{out}");
    assert!(!err.contains(NOTE), "the prefix is in use: {err}");
    let (code, out, err) = run(&["--json", "dead-letters", "ro_other"]);
    assert_eq!(code, 0, "dead-letters: {err}");
    assert_eq!(json(&out)["dead_letters"], serde_json::json!([]), "{out}");
    let after = list(prefix.clone()).await;
    let made: Vec<&String> = after.iter().filter(|n| n.contains("ro_other")).collect();
    assert!(
        made.is_empty(),
        "reading a queue that does not exist created {made:?}"
    );
    drop_queues_at(url, &prefix, &["ro_q"]).await;
}

/// Starts `cmd` (an `orchestra worker` or `monitor` with `--json --metrics 127.0.0.1:0`) and
/// returns it with the metrics URL from its `started` line. Panics if there is none within 60 s.
pub fn start_with_metrics(mut cmd: std::process::Command) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = cmd.spawn().expect("the orchestra binary starts");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if let Some(url) = v["metrics"].as_str() {
                let _ = tx.send(url.to_string());
            }
        }
    });
    match rx.recv_timeout(std::time::Duration::from_secs(60)) {
        Ok(url) => (child, url),
        Err(_) => {
            let _ = child.kill();
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            panic!("no metrics URL printed within 60 s: {err}");
        }
    }
}

/// GET `url` (`http://host:port/path`): the status line and the body.
pub fn http_get(url: &str) -> (String, String) {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("an http:// URL");
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut s = std::net::TcpStream::connect(host).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .expect("timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").expect("send the request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read the response");
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

/// Sends SIGTERM to `child` and waits up to 60 s for it to exit; its exit code.
pub fn terminate(mut child: std::process::Child) -> Option<i32> {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let started = std::time::Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return s.code();
        }
        if started.elapsed() > std::time::Duration::from_secs(60) {
            let _ = child.kill();
            panic!("it ignored SIGTERM for 60 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
