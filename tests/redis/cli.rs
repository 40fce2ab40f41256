//! The CLI and the namespace on Redis: `drop-namespace`, a worker's own monitor, what an
//! operator's Ctrl-C, a missed deadline and `monitor --once` leave, commands that only read,
//! and the Prometheus metrics.

use std::process::{Child, Command};
use std::time::Duration;

use agent_orchestra::testkit::harness::{broker_url, unique_prefix, BrokerKind};
use agent_orchestra::{BackendUrls, ConnectOptions, TaskStatus};
use serde_json::Value;

use crate::{abandoned_task, cleanup, make_backends, support};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_namespace_deletes_everything_under_the_prefix_and_nothing_else() {
    let url = broker_url(BrokerKind::Redis).await;
    let keys = |p: String| {
        let url = url.clone();
        async move { support::redis_keys(&url, &p).await }
    };
    let make = |p: String| async move { make_backends(&p).await };
    support::check_drop(&url, make, keys, |_| false).await;
    // An empty prefix would mean everything: refused.
    let err = agent_orchestra::connect::drop_namespace(
        &BackendUrls::all(url.clone()),
        &ConnectOptions::default(),
        &[],
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("prefix"), "{err}");
}

/// Runs the CLI's worker on `queue` for 4 s under `prefix`, with `extra` flags.
fn run_cli_worker(url: &str, prefix: &str, queue: &str, extra: &[&str]) -> String {
    let spec = format!("{queue}=echo");
    let mut args = vec![
        "--url", url, "--prefix", prefix, "worker", "-q", &spec, "--for", "4s", "--json",
    ];
    args.extend_from_slice(extra);
    let out = Command::new(env!("CARGO_BIN_EXE_orchestra"))
        .args(&args)
        .env("ORCHESTRA_MONITOR_INTERVAL", "200ms")
        .output()
        .expect("run orchestra worker");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "orchestra worker failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_worker_with_monitor_recovers_a_task_its_dead_worker_left_running() {
    let url = broker_url(BrokerKind::Redis).await;
    let prefix = unique_prefix("cli_monitor");
    let b = make_backends(&prefix).await;

    // Without --monitor nothing brings the task back: it has no message left.
    let stuck = abandoned_task(&b, "rescue").await;
    let (u, p) = (url.clone(), prefix.clone());
    tokio::task::spawn_blocking(move || run_cli_worker(&u, &p, "rescue", &[]))
        .await
        .unwrap();
    let t = b.registry.get(&stuck).await.unwrap().unwrap();
    assert_eq!(t.state.status, TaskStatus::Running, "{t:?}");

    // With --monitor the worker's own monitor hands it back and the worker completes it.
    let (u, p) = (url.clone(), prefix.clone());
    let stdout =
        tokio::task::spawn_blocking(move || run_cli_worker(&u, &p, "rescue", &["--monitor"]))
            .await
            .unwrap();
    let t = b.registry.get(&stuck).await.unwrap().unwrap();
    assert_eq!(t.state.status, TaskStatus::Completed, "{t:?}\n{stdout}");
    assert_eq!(t.state.attempt, 2);
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("\"event\":\"monitor\"") && l.contains("\"recovered\":1")),
        "{stdout}"
    );
    cleanup(&prefix).await;
}

/// The `orchestra` binary against the shared test Redis under `prefix`, with `env` set.
fn orchestra(url: &str, prefix: &str, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = support::orchestra_command(&["--url", url, "--prefix", prefix]);
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Runs it to the end: (exit code, stdout, stderr).
fn orchestra_run(url: &str, prefix: &str, args: &[&str]) -> (i32, String, String) {
    let out = orchestra(url, prefix, args, &[])
        .output()
        .expect("the orchestra binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Sends SIGINT (an operator's Ctrl-C) to `child`, then waits at most a minute for its exit:
/// (exit code, stdout, stderr).
fn interrupt(mut child: Child) -> (i32, String, String) {
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let started = std::time::Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("orchestra did not stop within a minute of SIGINT");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("output");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `monitor --once` releases the monitor lock as it exits: a second one right after acts too
/// (before, it was on standby for the lock's TTL, three intervals).
#[test]
fn monitor_once_releases_the_monitor_lock() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let url = rt.block_on(broker_url(BrokerKind::Redis));
    let prefix = unique_prefix("cli_monitor_once");
    for round in 0..2 {
        let (code, stdout, stderr) = orchestra_run(&url, &prefix, &["--json", "monitor", "--once"]);
        assert_eq!(code, 0, "round {round}: {stdout}\n{stderr}");
        let report: Value = serde_json::from_str(stdout.trim()).expect("the report as JSON");
        assert_eq!(report["leader"], true, "round {round}: {report}");
    }
    let left = rt.block_on(support::redis_keys(&url, &prefix));
    // (its fencing counter stays: tokens only grow)
    assert!(
        !left.iter().any(|k| k.ends_with("lock:{monitor}")),
        "the monitor lock is gone: {left:?}"
    );
    rt.block_on(cleanup(&prefix));
}

/// Dispatches a one-minute `sleep` task `id` on queue `slow`, starts a CLI worker for it with
/// `worker.shutdown_timeout` at `shutdown_timeout`, and returns once the task is RUNNING.
fn worker_running_a_slow_task(url: &str, prefix: &str, id: &str, shutdown_timeout: &str) -> Child {
    let (code, out, err) = orchestra_run(
        url,
        prefix,
        &["dispatch", "slow", r#"{"ms": 60000}"#, "--id", id],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    let worker = orchestra(
        url,
        prefix,
        &["worker", "-q", "slow=sleep"],
        &[("ORCHESTRA_SHUTDOWN_TIMEOUT", shutdown_timeout)],
    )
    .spawn()
    .expect("the worker starts");
    let started = std::time::Instant::now();
    loop {
        let (_, out, _) = orchestra_run(url, prefix, &["--json", "task", "get", id]);
        if out.contains("\"RUNNING\"") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the task did not start: {out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    worker
}

/// A worker whose running task outlives `worker.shutdown_timeout` hands it back and exits 1
/// saying so (docs/cli.md), and the task is PENDING again for another worker.
#[test]
fn a_worker_that_misses_its_shutdown_deadline_exits_1() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let url = rt.block_on(broker_url(BrokerKind::Redis));
    let prefix = unique_prefix("cli_deadline");
    let worker = worker_running_a_slow_task(&url, &prefix, "long_one", "1s");
    let (code, stdout, stderr) = interrupt(worker);
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    assert!(stdout.contains("deadline passed"), "{stdout}");
    assert!(
        stderr.contains("the shutdown deadline (1s) passed: 1 running task(s) were handed back"),
        "{stderr}"
    );
    let (_, out, _) = orchestra_run(&url, &prefix, &["--json", "task", "get", "long_one"]);
    assert!(out.contains("\"PENDING\""), "handed back: {out}");
    rt.block_on(cleanup(&prefix));
}

/// `orchestra workers` lists a CLI worker from another process with its queue and running task,
/// and no longer once it stopped.
#[test]
fn workers_lists_a_running_worker_and_its_task() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let url = rt.block_on(broker_url(BrokerKind::Redis));
    let prefix = unique_prefix("cli_workers");
    let worker = worker_running_a_slow_task(&url, &prefix, "seen_one", "1s");
    let (code, out, err) = orchestra_run(&url, &prefix, &["--json", "workers", "--listen", "3s"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let listed: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let workers = listed.as_array().expect("an array");
    assert_eq!(workers.len(), 1, "{out}");
    assert_eq!(workers[0]["queues"], serde_json::json!(["slow"]), "{out}");
    assert_eq!(workers[0]["running"][0]["task_id"], "seen_one", "{out}");
    let (code, out, _) = orchestra_run(&url, &prefix, &["workers", "--listen", "3s"]);
    assert_eq!(code, 0);
    assert!(out.contains("queues slow, 1/"), "{out}");
    assert!(out.contains("  seen_one on slow attempt 1"), "{out}");
    let _ = interrupt(worker);
    let (code, out, _) = orchestra_run(&url, &prefix, &["workers", "--listen", "1s"]);
    assert_eq!(code, 0);
    assert!(out.contains("no worker heard within 1s"), "{out}");
    let (code, _, err) = orchestra_run(&url, &prefix, &["workers", "--listen", "0s"]);
    assert_eq!(code, 2, "{err}");
    rt.block_on(cleanup(&prefix));
}

/// `cancel` of a RUNNING task: CANCELLED at once, the worker stops the handler (the sleep agent
/// returns on the signal), so the worker then stops at once with nothing to hand back.
#[test]
fn cancel_stops_a_running_task_on_its_worker() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let url = rt.block_on(broker_url(BrokerKind::Redis));
    let prefix = unique_prefix("cli_cancel_running");
    let worker = worker_running_a_slow_task(&url, &prefix, "stop_me", "60s");
    let (code, out, err) = orchestra_run(&url, &prefix, &["cancel", "stop_me"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("task stop_me is now CANCELLED"), "{out}");
    let (_, out, _) = orchestra_run(&url, &prefix, &["--json", "task", "get", "stop_me"]);
    let task: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(task["status"], "CANCELLED", "{out}");
    assert!(
        task["error"]
            .as_str()
            .is_some_and(|e| e.contains("cancelled by an operator while running (attempt 1")),
        "{out}"
    );
    // The worker's slot is free: it stops at once, handing nothing back, with the
    // attempt counted as cancelled in its metrics.
    let started = std::time::Instant::now();
    loop {
        let (_, out, _) = orchestra_run(&url, &prefix, &["--json", "workers", "--listen", "3s"]);
        if out.contains("\"running\":[]") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the worker still runs the cancelled task: {out}"
        );
    }
    let (code, stdout, stderr) = interrupt(worker);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains("stopped (clean)"), "{stdout}");
    assert!(stdout.contains("cancelled 1, handed back 0"), "{stdout}");
    // A finished task cannot be cancelled: exit 1 with the reason.
    let (code, _, err) = orchestra_run(&url, &prefix, &["cancel", "stop_me"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("CANCELLED"), "{err}");
    rt.block_on(cleanup(&prefix));
}

/// `dispatch --wait` prints each progress report of the running attempt to stderr while it
/// waits (the sleep agent reports one each second), then the finished task.
#[test]
fn dispatch_wait_shows_the_progress_of_the_running_task() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let url = rt.block_on(broker_url(BrokerKind::Redis));
    let prefix = unique_prefix("cli_wait_progress");
    let worker = orchestra(&url, &prefix, &["worker", "-q", "slow=sleep"], &[])
        .spawn()
        .expect("the worker starts");
    let (code, out, err) = orchestra_run(
        &url,
        &prefix,
        &[
            "dispatch",
            "slow",
            r#"{"ms": 3500}"#,
            "--wait",
            "--timeout",
            "60s",
        ],
    );
    let _ = interrupt(worker);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(err.contains("running (attempt 1)"), "{err}");
    assert!(
        err.contains("progress (attempt 1): {\"of_ms\":3500,\"slept_ms\":"),
        "{err}"
    );
    assert!(out.contains("COMPLETED"), "{out}");
    rt.block_on(cleanup(&prefix));
}

/// Ctrl-C during a bench or the demo stops it, deletes its namespace (as a finished run does)
/// and exits 130; before, everything it had created stayed.
#[test]
fn ctrl_c_during_the_bench_or_the_demo_leaves_nothing_behind() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let url = rt.block_on(broker_url(BrokerKind::Redis));
    for (name, args) in [
        (
            "cli_bench_int",
            &["bench", "-n", "100000", "-c", "4", "--rate", "300"][..],
        ),
        ("cli_demo_int", &["demo"][..]),
    ] {
        let prefix = unique_prefix(name);
        let child = orchestra(&url, &prefix, args, &[])
            .spawn()
            .expect("orchestra starts");
        // Until it has written something under its prefix.
        let started = std::time::Instant::now();
        while rt.block_on(support::redis_keys(&url, &prefix)).is_empty() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{name} wrote nothing"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(500));
        let (code, stdout, stderr) = interrupt(child);
        assert_eq!(code, 130, "{name}: {stdout}\n{stderr}");
        assert!(stderr.contains("interrupted"), "{name}: {stderr}");
        let left = rt.block_on(support::redis_keys(&url, &prefix));
        assert!(left.is_empty(), "{name} left {} keys: {left:?}", left.len());
    }
}

/// A second Ctrl-C during a graceful shutdown stops the worker at once (exit 130): its running
/// task is left RUNNING, as a crash would leave it, for its lease to hand it on.
#[test]
fn a_second_ctrl_c_stops_the_worker_at_once() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let url = rt.block_on(broker_url(BrokerKind::Redis));
    let prefix = unique_prefix("cli_cold");
    let worker = worker_running_a_slow_task(&url, &prefix, "cold_one", "60s");
    let first = Command::new("kill")
        .args(["-INT", &worker.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(first.success());
    // The graceful shutdown now waits up to 60 s for the task; the second signal ends it.
    std::thread::sleep(Duration::from_millis(1000));
    let asked = std::time::Instant::now();
    let (code, stdout, stderr) = interrupt(worker);
    assert_eq!(code, 130, "{stdout}\n{stderr}");
    assert!(
        stderr.contains("a second signal: stopped at once"),
        "{stderr}"
    );
    assert!(
        asked.elapsed() < Duration::from_secs(30),
        "stopped {:?} after the second signal",
        asked.elapsed()
    );
    let (_, out, _) = orchestra_run(&url, &prefix, &["--json", "task", "get", "cold_one"]);
    assert!(out.contains("\"RUNNING\""), "left for its lease: {out}");
    rt.block_on(cleanup(&prefix));
}

/// bench and demo add `<kind>_<8 hex>_` to the prefix: a prefix too long for that is refused
/// with how long it may be, before anything is created.
#[test]
fn bench_and_demo_say_how_long_the_prefix_may_be() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let url = rt.block_on(broker_url(BrokerKind::Redis));
    let prefix = format!("t_long_{}", "x".repeat(53));
    for (args, room) in [(&["bench", "-n", "10"][..], 49), (&["demo"][..], 50)] {
        let (code, out, err) = orchestra_run(&url, &prefix, args);
        assert_eq!(code, 2, "{args:?}: {out}\n{err}");
        assert!(
            err.contains(&format!("at most {room} characters here, not 60")),
            "{args:?}: {err}"
        );
    }
    assert!(rt.block_on(support::redis_keys(&url, "t_long_")).is_empty());
}

/// `dispatch --depends-on` a task that was cancelled (or failed) says that the new task failed
/// at once, with exit 1, instead of "dispatched".
#[test]
fn dispatch_after_a_cancelled_dependency_reports_the_failure() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let url = rt.block_on(broker_url(BrokerKind::Redis));
    let prefix = unique_prefix("cli_dep_cancelled");
    let (code, out, err) = orchestra_run(&url, &prefix, &["dispatch", "q", "{}", "--id", "par"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let (code, out, err) = orchestra_run(&url, &prefix, &["cancel", "par"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let (code, out, err) = orchestra_run(
        &url,
        &prefix,
        &["dispatch", "q", "{}", "--id", "kid", "--depends-on", "par"],
    );
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        err.contains("task kid FAILED: dependency par CANCELLED"),
        "{err}"
    );
    assert!(!out.contains("dispatched"), "{out}");
    // A dependency still pending: dispatched as usual.
    let (code, out, err) = orchestra_run(&url, &prefix, &["dispatch", "q", "{}", "--id", "p2"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let (code, out, err) = orchestra_run(
        &url,
        &prefix,
        &["dispatch", "q", "{}", "--id", "k2", "--depends-on", "p2"],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("dispatched k2"), "{out}");
    rt.block_on(cleanup(&prefix));
}

/// `dispatch --id` run twice is idempotent (same id, exit 0, one task that runs once); the same id
/// with another payload is refused.
#[test]
fn dispatch_with_the_same_id_twice_is_idempotent() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let url = rt.block_on(broker_url(BrokerKind::Redis));
    let prefix = unique_prefix("cli_same_id");
    for _ in 0..2 {
        let (code, out, err) = orchestra_run(
            &url,
            &prefix,
            &["dispatch", "q", r#"{"n":1}"#, "--id", "once"],
        );
        assert_eq!(code, 0, "{out}\n{err}");
        assert!(out.contains("dispatched once"), "{out}");
    }
    let (code, out, err) = orchestra_run(
        &url,
        &prefix,
        &["dispatch", "q", r#"{"n":2}"#, "--id", "once"],
    );
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(err.contains("task once already exists"), "{err}");
    let (code, out, err) = orchestra_run(&url, &prefix, &["--json", "stats"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains(r#""PENDING":1"#), "one task, PENDING: {out}");
    rt.block_on(cleanup(&prefix));
}

/// `drop-namespace` deletes everything under the prefix, only with `--yes`, and nothing of a
/// neighbouring prefix.
#[test]
fn drop_namespace_deletes_the_prefix_only_when_asked() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let url = rt.block_on(broker_url(BrokerKind::Redis));
    let prefix = unique_prefix("cli_drop");
    let neighbour = unique_prefix("cli_drop_keep");
    for p in [&prefix, &neighbour] {
        let (code, out, err) = orchestra_run(&url, p, &["dispatch", "q", "{}"]);
        assert_eq!(code, 0, "{out}\n{err}");
    }
    let before = rt.block_on(support::redis_keys(&url, &prefix));
    assert!(!before.is_empty());
    let (code, out, err) = orchestra_run(&url, &prefix, &["drop-namespace"]);
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(err.contains("add --yes"), "{err}");
    assert_eq!(rt.block_on(support::redis_keys(&url, &prefix)), before);
    let (code, out, err) = orchestra_run(&url, &prefix, &["drop-namespace", "--yes"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("deleted everything under the prefix"), "{out}");
    assert!(rt.block_on(support::redis_keys(&url, &prefix)).is_empty());
    assert!(!rt
        .block_on(support::redis_keys(&url, &neighbour))
        .is_empty());
    // An empty prefix is refused, whatever --yes says.
    let (code, _, err) = orchestra_run(&url, "", &["drop-namespace", "--yes"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("needs --prefix"), "{err}");
    rt.block_on(cleanup(&neighbour));
}

/// Inspecting a namespace (`stats`, `task get`, `tasks list`, `dead-letters`) writes no key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_that_only_read_write_no_key() {
    let url = broker_url(BrokerKind::Redis).await;
    let keys = |p: String| {
        let url = url.clone();
        async move { support::redis_keys(&url, &p).await }
    };
    support::check_read_only_commands(&url, false, keys).await;
}

/// `worker --metrics` and `monitor --metrics` serve Prometheus' text format: the worker's
/// counters, tasks by status and the queue's sizes, read from Redis at each scrape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_and_monitor_serve_prometheus_metrics() {
    let url = broker_url(BrokerKind::Redis).await;
    let prefix = unique_prefix("metrics");
    let base = ["--url", url.as_str(), "--prefix", prefix.as_str()];
    let mut cmd = support::orchestra_command(&base);
    cmd.args([
        "--json",
        "worker",
        "--queue",
        "mq",
        "--quiet",
        "--metrics",
        "127.0.0.1:0",
    ]);
    let (worker, worker_url) = support::start_with_metrics(cmd);
    let mut cmd = support::orchestra_command(&base);
    cmd.args([
        "--json",
        "monitor",
        "--interval",
        "1s",
        "--metrics",
        "127.0.0.1:0",
        "--queue",
        "mq",
    ]);
    let (monitor, monitor_url) = support::start_with_metrics(cmd);
    for i in 0..3 {
        let out = orchestra_run(
            &url,
            &prefix,
            &["dispatch", "mq", &format!("{{\"i\": {i}}}")],
        );
        assert_eq!(out.0, 0, "dispatch: {}", out.2);
    }
    let want = [
        "orchestra_tasks{status=\"COMPLETED\"} 3",
        "orchestra_queue_messages{queue=\"mq\",state=\"waiting\"} 0",
        "orchestra_queue_messages{queue=\"mq\",state=\"in_flight\"} 0",
        "orchestra_registry_up 1",
        "orchestra_bus_up 1",
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let (mut w, mut m) = (String::new(), String::new());
    while std::time::Instant::now() < deadline {
        let (status, body) = support::http_get(&worker_url);
        assert_eq!(status, "HTTP/1.1 200 OK");
        w = body;
        m = support::http_get(&monitor_url).1;
        let done = w.lines().any(|l| {
            l.starts_with("orchestra_worker_completed_total{worker=\"") && l.ends_with("} 3")
        });
        if done && want.iter().all(|x| w.contains(x) && m.contains(x)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for x in want {
        assert!(w.contains(x), "worker's metrics lack {x}:\n{w}");
        assert!(m.contains(x), "monitor's metrics lack {x}:\n{m}");
    }
    assert!(
        w.contains("# TYPE orchestra_worker_completed counter"),
        "{w}"
    );
    assert!(
        !m.contains("orchestra_worker_"),
        "the monitor runs no worker:\n{m}"
    );
    let (status, _) = support::http_get(&worker_url.replace("/metrics", "/"));
    assert!(status.starts_with("HTTP/1.1 404"), "{status}");
    assert_eq!(support::terminate(worker), Some(0));
    assert_eq!(support::terminate(monitor), Some(0));
    cleanup(&prefix).await;
}
