//! The RabbitMQ lock manager under contention: refused acquisitions (each one a declaration the
//! broker refuses, which closes a channel) must not use up the connection; processes contending
//! for one key never overlap and all finish; a standby monitor takes over after many refused
//! passes.

use std::time::{Duration, Instant};

use agent_orchestra::testkit::harness::unique_prefix;

use super::{cleanup, make_backends, with_cleanup};

const TTL: Duration = Duration::from_secs(60);

/// How long the two tests with thousands of refusals may take: 28–80 s measured on a 2-core
/// machine at a load average of 10–17 (the broker's CPU is what they wait for), too close to
/// the harness's usual 120 s.
const CONTENTION_LIMIT: Duration = Duration::from_secs(300);

/// Like `with_cleanup`, bounded by [`CONTENTION_LIMIT`] instead of the harness's limit.
fn with_cleanup_bounded<F, Fut>(name: &str, test: F)
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let prefix = unique_prefix(name);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let test = test(prefix.clone());
    let outcome = runtime
        .block_on(async move { tokio::time::timeout(CONTENTION_LIMIT, tokio::spawn(test)).await });
    runtime.block_on(cleanup(&prefix));
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Ok(Err(e)) => panic!("{name}: {e}"),
        Err(_) => panic!("{name} did not finish within {CONTENTION_LIMIT:?}"),
    }
}

/// More refusals than one AMQP connection has channels (RabbitMQ's default `channel_max` is
/// 2,047, and the client never frees a channel the broker closed): each is `Ok(None)`, and the
/// lock is taken as soon as its holder releases it.
#[test]
fn refused_acquisitions_do_not_use_up_the_connection() {
    with_cleanup("rmq_lock_refusals", |prefix| async move {
        let a = make_backends(&prefix).await;
        let b = make_backends(&prefix).await;
        let lease = a
            .locks
            .acquire("leader", "a", TTL)
            .await
            .expect("acquire")
            .expect("free lock");
        const REFUSALS: usize = 2_100;
        let started = Instant::now();
        for n in 0..REFUSALS {
            match b.locks.acquire("leader", "b", TTL).await {
                Ok(None) => {}
                other => panic!("refusal {n} of a held lock: {other:?}"),
            }
        }
        eprintln!("{REFUSALS} refused acquisitions in {:?}", started.elapsed());
        assert!(a.locks.release(&lease).await.expect("release"));
        let taken = b
            .locks
            .acquire("leader", "b", TTL)
            .await
            .expect("acquire after the release")
            .expect("the released lock is free");
        assert!(taken.fencing_token > lease.fencing_token);
        assert!(b.locks.release(&taken).await.expect("release"));
    });
}

/// The child processes of [`processes_contending_for_one_key_never_overlap`] find their task
/// here: `prefix|directory|number`.
const CHILD_ENV: &str = "ORCHESTRA_TEST_LOCK_CHILD";
const PROCESSES: usize = 8;
const ACQUISITIONS: usize = 100;

/// 8 processes (this test binary, started again to run [`contender_process`]) each acquire one
/// key 100 times, spinning on refusals. While a process holds the lock it creates a marker file
/// with `create_new` (which fails if another holder's marker is there), appends its fencing
/// token to a shared file, and removes the marker before releasing. Every process finishes, no
/// two holders overlap, and the tokens, in the order the holders wrote them, strictly increase.
#[test]
fn processes_contending_for_one_key_never_overlap() {
    with_cleanup_bounded("rmq_lock_procs", |prefix| async move {
        let url = agent_orchestra::testkit::harness::broker_url(
            agent_orchestra::testkit::harness::BrokerKind::Amqp,
        )
        .await;
        let dir = tempfile::tempdir().expect("temp dir");
        let exe = std::env::current_exe().expect("this test binary");
        let started = Instant::now();
        let children: Vec<_> = (0..PROCESSES)
            .map(|n| {
                tokio::process::Command::new(&exe)
                    .args([
                        "locks::contender_process",
                        "--exact",
                        "--include-ignored",
                        "--nocapture",
                        "--test-threads=1",
                    ])
                    .env(CHILD_ENV, format!("{prefix}|{}|{n}", dir.path().display()))
                    .env("ORCHESTRA_TEST_AMQP_URL", &url)
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .kill_on_drop(true)
                    .spawn()
                    .expect("start a contender process")
            })
            .collect();
        // Bounded below the test's limit, so that a stuck child is reported as such.
        let outputs = tokio::time::timeout(
            CONTENTION_LIMIT - Duration::from_secs(20),
            futures::future::join_all(children.into_iter().map(|c| c.wait_with_output())),
        )
        .await
        .expect("the contender processes did not all finish in time");
        for (n, out) in outputs.into_iter().enumerate() {
            let out = out.expect("contender output");
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && stdout.contains("contender done"),
                "contender {n} failed ({}):\n{stdout}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            if let Some(line) = stdout.lines().find(|l| l.contains("contender done")) {
                eprintln!("{line}");
            }
        }
        eprintln!(
            "{PROCESSES} processes x {ACQUISITIONS} acquisitions in {:?}",
            started.elapsed()
        );
        let tokens: Vec<u64> = std::fs::read_to_string(dir.path().join("tokens"))
            .expect("tokens file")
            .lines()
            .map(|l| {
                l.split_whitespace()
                    .next()
                    .unwrap_or("")
                    .parse()
                    .expect("a token")
            })
            .collect();
        assert_eq!(
            tokens.len(),
            PROCESSES * ACQUISITIONS,
            "acquisitions recorded"
        );
        assert!(
            tokens.windows(2).all(|w| w[0] < w[1]),
            "fencing tokens did not strictly increase in acquisition order: {tokens:?}"
        );
    });
}

/// One contender of [`processes_contending_for_one_key_never_overlap`], run in a process of
/// its own by that test (it does nothing when started any other way).
#[test]
#[ignore = "a child process of processes_contending_for_one_key_never_overlap"]
fn contender_process() {
    let Ok(task) = std::env::var(CHILD_ENV) else {
        eprintln!("contender_process runs only as a child of processes_contending_for_one_key_never_overlap");
        return;
    };
    let mut parts = task.splitn(3, '|');
    let (Some(prefix), Some(dir), Some(n)) = (parts.next(), parts.next(), parts.next()) else {
        panic!("{CHILD_ENV}={task:?} is not prefix|directory|number");
    };
    let (prefix, dir, owner) = (
        prefix.to_string(),
        std::path::PathBuf::from(dir),
        format!("contender-{n}"),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        use std::io::Write;
        let b = make_backends(&prefix).await;
        let marker = dir.join("held");
        let mut refusals = 0u64;
        for _ in 0..ACQUISITIONS {
            let lease = loop {
                match b.locks.acquire("shared", &owner, TTL).await {
                    Ok(Some(lease)) => break lease,
                    Ok(None) => refusals += 1,
                    Err(e) => panic!("{owner}: acquire failed after {refusals} refusals: {e}"),
                }
            };
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&marker)
                .unwrap_or_else(|e| {
                    panic!("{owner} holds the lock but another holder's marker is there: {e}")
                });
            let mut tokens = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(dir.join("tokens"))
                .expect("tokens file");
            writeln!(tokens, "{} {owner}", lease.fencing_token).expect("write a token");
            drop(tokens);
            tokio::time::sleep(Duration::from_millis(1)).await;
            std::fs::remove_file(&marker).expect("remove the marker");
            assert!(
                b.locks.release(&lease).await.expect("release"),
                "{owner}: the release of a held lock found it not held"
            );
        }
        println!("{owner}: contender done, {ACQUISITIONS} acquisitions, {refusals} refusals");
    });
}

/// Two monitors: the standby's passes are refused acquisitions of the monitor lock. After
/// 10,000 of them (made concurrently, to keep the test short) the standby still works: when the
/// leader steps down, its next pass takes over.
#[test]
fn a_standby_monitor_takes_over_after_10_000_refused_passes() {
    use agent_orchestra::{Monitor, MonitorConfig};
    with_cleanup_bounded("rmq_lock_standby", |prefix| async move {
        // The leader makes one pass: its lease (three intervals) must outlast the refusals.
        let config = |id: &str| MonitorConfig {
            monitor_id: id.to_string(),
            lock_key: "monitor".to_string(),
            interval: Duration::from_secs(100),
            ..MonitorConfig::default()
        };
        let a = make_backends(&prefix).await;
        let b = make_backends(&prefix).await;
        let leader = Monitor::new(a, config("leader"));
        let standby = Monitor::new(b.clone(), config("standby"));
        assert!(leader.tick().await.expect("leader pass").leader);
        assert!(!standby.tick().await.expect("standby pass").leader);

        const REFUSALS: usize = 10_000;
        const TASKS: usize = 16;
        let started = Instant::now();
        let passes = (0..TASKS).map(|_| {
            let locks = b.locks.clone();
            tokio::spawn(async move {
                for _ in 0..REFUSALS / TASKS {
                    match locks
                        .acquire("monitor", "standby", Duration::from_secs(15))
                        .await
                    {
                        Ok(None) => {}
                        other => panic!("a refused pass of the standby: {other:?}"),
                    }
                }
            })
        });
        for pass in futures::future::join_all(passes).await {
            pass.expect("refused passes");
        }
        eprintln!("{REFUSALS} refused acquisitions in {:?}", started.elapsed());

        assert!(!standby.tick().await.expect("standby pass").leader);
        leader.step_down().await.expect("step down");
        let report = standby
            .tick()
            .await
            .expect("standby pass after the step-down");
        assert!(report.leader, "the standby did not take over");
        standby.step_down().await.expect("step down");
    });
}
