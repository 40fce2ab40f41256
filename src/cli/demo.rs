//! `orchestra demo`: the lab end to end, in six parts, each checked as it runs.
//!
//! On a broker (`--url`), everything lives under a fresh prefix (`demo_<hex>_`) and the
//! finished tasks are deleted at the end.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_orchestra::engine::{
    handler_fn, typed, Control, DispatchOptions, Dispatcher, Monitor, MonitorConfig, MonitorReport,
    Schedules, TaskContext, TaskError, Worker, WorkerConfig, WorkerHandle,
};
use agent_orchestra::queue_limits::QueueLimits;
use agent_orchestra::schedule::{Recurrence, Schedule};
use agent_orchestra::{Backends, QueueName, Retention, Task, TaskId, TaskStatus};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Notify};

use super::output::{clock, short_json};
use super::{shutdown_signal, CliError, Ctx, Output};

/// The demo's queues, one per part that has its own.
const LIFECYCLE: &str = "lifecycle";
const RESEARCH: &str = "research_tasks";
const WRITING: &str = "writing_tasks";
const TRIAGE: &str = "triage";
const FRAGILE: &str = "fragile";
const MODEL_CALLS: &str = "model_calls";
const DIGESTS: &str = "digests";

/// The queues the demo uses (its namespace is deleted at the end, on a broker).
const DEMO_QUEUES: [&str; 7] = [
    LIFECYCLE,
    RESEARCH,
    WRITING,
    TRIAGE,
    FRAGILE,
    MODEL_CALLS,
    DIGESTS,
];

/// Every wait in the demo is bounded by this, so a broken backend fails instead of hanging.
const STEP_TIMEOUT: Duration = Duration::from_secs(20);

/// Shared by the parts: the backends, a dispatcher and the output.
struct Demo {
    backends: Backends,
    dispatcher: Dispatcher,
    out: Output,
    summary: serde_json::Map<String, Value>,
}

fn check(ok: bool, what: impl Into<String>) -> Result<(), CliError> {
    if ok {
        Ok(())
    } else {
        Err(CliError::Failed(format!(
            "demo check failed: {}",
            what.into()
        )))
    }
}

async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> Result<T, CliError> {
    tokio::time::timeout(STEP_TIMEOUT, fut)
        .await
        .map_err(|_| CliError::Failed(format!("demo: timed out waiting for {what}")))
}

fn worker_config(id: &str, slots: usize, lease: Duration) -> WorkerConfig {
    WorkerConfig {
        worker_id: id.to_string(),
        concurrency: slots,
        lease,
        fetch_wait: Duration::from_millis(200),
        shutdown_timeout: Duration::from_secs(5),
        ..WorkerConfig::default()
    }
}

pub async fn run(ctx: &Ctx) -> Result<(), CliError> {
    let started = Instant::now();
    let mut config = ctx.config.clone();
    let on_broker = !config.is_memory();
    if on_broker {
        super::fresh_namespace(&mut config, "demo")?;
    }
    let backends = config.connect().await?;
    let out = ctx.out;
    out.line(format!(
        "agent-orchestra demo: bus {}, registry {}, locks {}{}",
        backends.bus.backend(),
        backends.registry.backend(),
        backends.locks.backend(),
        if on_broker {
            format!(" (everything under the prefix {})", config.prefix)
        } else {
            " (in this process; pass --url to use a broker)".into()
        }
    ));
    let mut demo = Demo {
        dispatcher: Dispatcher::new(backends.clone()).with_limits(config.limits()),
        backends,
        out,
        summary: serde_json::Map::new(),
    };
    // Ctrl-C or SIGTERM stops the demo where it is (its workers are dropped like crashed
    // ones) and the cleanup below still runs.
    let result = tokio::select! {
        r = async {
            demo.pubsub().await?;
            demo.lifecycle().await?;
            demo.pipeline().await?;
            demo.priorities().await?;
            demo.recovery().await?;
            demo.rate_and_schedule().await
        } => r,
        _ = shutdown_signal() => Err(CliError::Interrupted("the demo was interrupted".into())),
    };

    let counts = demo.backends.registry.counts().await.ok();
    if on_broker {
        let all = Retention {
            max_age: None,
            max_count: Some(0),
        };
        let queues: Vec<QueueName> = DEMO_QUEUES
            .iter()
            .filter_map(|q| QueueName::parse(q).ok())
            .collect();
        let purged = demo.backends.registry.purge_finished(&all).await;
        // Close the connections first: their background readers would only complain about
        // what the drop deletes.
        drop(demo.dispatcher);
        drop(demo.backends);
        let dropped = agent_orchestra::connect::drop_namespace(
            &config.backend_urls(),
            &config.connect_options(),
            &queues,
        )
        .await;
        match (purged, dropped) {
            (Ok(n), Ok(())) => out.line(format!(
                "\ncleaned up: {n} finished tasks, then everything else under {}",
                config.prefix
            )),
            (Err(e), _) | (_, Err(e)) => eprintln!(
                "warning: could not delete everything under the demo's prefix {}: {e}",
                config.prefix
            ),
        }
    }
    result?;
    if let Some(c) = &counts {
        out.line(format!("\nmonitor snapshot: {c}"));
        demo.summary.insert("counts".into(), json!(c));
    }
    let secs = started.elapsed().as_secs_f64();
    out.line(format!(
        "demo finished in {secs:.1} s: all six parts behaved as described"
    ));
    if out.json {
        demo.summary.insert("ok".into(), json!(true));
        demo.summary.insert("seconds".into(), json!(secs));
        out.json(&demo.summary);
    }
    Ok(())
}

fn record_line(t: &Task) -> String {
    format!(
        "   {:<10} {:<8} {:<18} {:<13} {}",
        t.state.status.as_str(),
        t.state.attempt,
        t.state.worker_id.as_deref().unwrap_or("-"),
        clock(t.state.lease_until),
        t.state
            .result
            .as_ref()
            .map_or_else(|| "-".to_string(), |r| short_json(r, 60))
    )
}

impl Demo {
    fn say(&self, text: impl AsRef<str>) {
        self.out.line(text);
    }

    async fn get(&self, id: &TaskId) -> Result<Task, CliError> {
        Ok(self.dispatcher.get(id).await?)
    }

    async fn wait(&self, id: &TaskId) -> Result<Task, CliError> {
        match self.dispatcher.wait(id, STEP_TIMEOUT).await {
            Ok(t) => Ok(t),
            Err(agent_orchestra::Error::Timeout(m)) => Err(CliError::Failed(m)),
            Err(e) => Err(e.into()),
        }
    }

    async fn stop(&self, worker: WorkerHandle) {
        worker.shutdown().await;
    }

    /// Part 1: the lab's pub/sub, kept for events: every subscriber gets every event.
    async fn pubsub(&mut self) -> Result<(), CliError> {
        self.say("\n1. Pub/sub fan-out");
        self.say("   Two subscribers listen on topic \"agent_news\"; a publisher sends 3 events.");
        let bus = &self.backends.bus;
        let mut subs = [
            bus.subscribe("agent_news").await?,
            bus.subscribe("agent_news").await?,
        ];
        let news = [
            ("task_001", "research 'quantum computing'"),
            ("task_002", "draft a summary of task_001"),
            ("task_003", "review the draft"),
        ];
        for (id, what) in news {
            let event = json!({"task_id": id, "payload": what});
            bus.publish("agent_news", event.to_string().as_bytes())
                .await?;
        }
        let mut got = Vec::new();
        for (name, sub) in ["A", "B"].iter().zip(subs.iter_mut()) {
            let mut ids = Vec::new();
            while ids.len() < news.len() {
                let Some(bytes) = within("a published event", sub.recv()).await? else {
                    break;
                };
                let v: Value = serde_json::from_slice(&bytes).unwrap_or_default();
                ids.push(v["task_id"].as_str().unwrap_or("?").to_string());
            }
            self.say(format!("   subscriber {name} got: {}", ids.join(", ")));
            got.push(ids);
        }
        let all_three = got.iter().all(|ids| ids.len() == news.len());
        check(all_three, "both subscribers should get all 3 events")?;
        self.say("   => fan-out: every subscriber got every event. Events are fire-and-forget,");
        self.say("      so the work itself travels on durable queues (below): a task announced");
        self.say("      while no worker listens waits for one instead of being lost.");
        self.summary
            .insert("pubsub".into(), json!({"subscribers": got}));
        Ok(())
    }

    /// Part 2: one task's stored record at PENDING, RUNNING and COMPLETED.
    async fn lifecycle(&mut self) -> Result<(), CliError> {
        self.say("\n2. One task's life in the registry");
        let (started_tx, mut started_rx) = mpsc::channel::<()>(1);
        let release = Arc::new(Notify::new());
        let gate = release.clone();
        let handler = handler_fn(move |ctx: TaskContext| {
            let (tx, gate) = (started_tx.clone(), gate.clone());
            async move {
                let _ = tx.send(()).await;
                gate.notified().await; // hold the task RUNNING until its record was shown
                let topic = ctx.task.payload["topic"]
                    .as_str()
                    .unwrap_or("?")
                    .to_string();
                Ok(json!({ "summary": format!("notes on {topic}") }))
            }
        });
        let id = self
            .dispatcher
            .dispatch(
                LIFECYCLE,
                json!({"topic": "quantum computing"}),
                5,
                DispatchOptions::default(),
            )
            .await?;
        self.say(format!(
            "   dispatched {id}; its stored record at each step:"
        ));
        self.say(format!(
            "   {:<10} {:<8} {:<18} {:<13} {}",
            "status", "attempt", "worker", "lease until", "result"
        ));
        let pending = self.get(&id).await?;
        self.say(record_line(&pending));
        let worker = Worker::new(
            self.backends.clone(),
            worker_config("demo-worker", 1, Duration::from_secs(10)),
        )
        .handle(LIFECYCLE, handler)?
        .start()?;
        within("the worker to claim the task", started_rx.recv()).await?;
        let running = self.get(&id).await?;
        self.say(record_line(&running));
        release.notify_one();
        let done = self.wait(&id).await?;
        self.say(record_line(&done));
        self.stop(worker).await;
        let statuses = [
            pending.state.status,
            running.state.status,
            done.state.status,
        ];
        check(
            statuses
                == [
                    TaskStatus::Pending,
                    TaskStatus::Running,
                    TaskStatus::Completed,
                ],
            format!("expected PENDING, RUNNING, COMPLETED, saw {statuses:?}"),
        )?;
        self.say(
            "   => claimed by compare-and-set (attempt 1 is the fencing token), kept alive by",
        );
        self.say("      heartbeats renewing the lease, then COMPLETED with its result.");
        self.summary.insert(
            LIFECYCLE.into(),
            json!({"task_id": id, "records": [pending, running, done]}),
        );
        Ok(())
    }

    /// Part 3: the Researcher → Writer pipeline through `depends_on`.
    async fn pipeline(&mut self) -> Result<(), CliError> {
        self.say("\n3. Researcher -> Writer through a dependency");
        #[derive(Deserialize)]
        struct Research {
            topic: String,
        }
        #[derive(Serialize)]
        struct Findings {
            topic: String,
            findings: Vec<String>,
        }
        let researcher = typed(|r: Research, _ctx: TaskContext| async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok::<_, TaskError>(Findings {
                findings: vec![
                    format!("{} cut dispatch delays", r.topic),
                    "route planning runs as competing workers".into(),
                    "failures are retried, never lost".into(),
                ],
                topic: r.topic,
            })
        });
        let writer = handler_fn(|ctx: TaskContext| async move {
            let parents = ctx.parent_results().await?;
            let (parent, research) = parents
                .first()
                .ok_or_else(|| TaskError::permanent("the writer needs a research task"))?;
            let topic = research["topic"].as_str().unwrap_or("?");
            let points: Vec<&str> = research["findings"]
                .as_array()
                .map(|f| f.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            Ok(json!({
                "draft": format!("{topic}: {}.", points.join("; ")),
                "based_on": parent,
                "points": points.len(),
            }))
        });
        let research_id = self
            .dispatcher
            .dispatch(
                RESEARCH,
                json!({"topic": "AI agents in logistics"}),
                5,
                DispatchOptions::default(),
            )
            .await?;
        let writer_id = self
            .dispatcher
            .dispatch(
                WRITING,
                json!({"style": "short"}),
                5,
                DispatchOptions::default().after([research_id.clone()]),
            )
            .await?;
        self.say(format!("   research {research_id} on research_tasks"));
        self.say(format!(
            "   writer   {writer_id} on writing_tasks, depends_on = [{research_id}]"
        ));
        let waiting = self.get(&writer_id).await?;
        self.say(format!(
            "   the writer is {}: on no queue until the research completes (the lab's Writer polled)",
            waiting.state.status
        ));
        check(
            waiting.state.status == TaskStatus::Waiting,
            "the writer should wait for its parent",
        )?;
        let worker = Worker::new(
            self.backends.clone(),
            worker_config("demo-agents", 2, Duration::from_secs(10)),
        )
        .handle(RESEARCH, researcher)?
        .handle(WRITING, writer)?
        .start()?;
        let research = self.wait(&research_id).await?;
        let n = research
            .state
            .result
            .as_ref()
            .and_then(|r| r["findings"].as_array().map(Vec::len))
            .unwrap_or(0);
        self.say(format!(
            "   researcher COMPLETED with {n} findings; the engine queued the writer at once"
        ));
        let written = self.wait(&writer_id).await?;
        self.stop(worker).await;
        check(
            written.state.status == TaskStatus::Completed,
            format!(
                "the writer should complete, it is {}: {}",
                written.state.status,
                written.state.error.as_deref().unwrap_or("")
            ),
        )?;
        let draft = written
            .state
            .result
            .as_ref()
            .and_then(|r| r["draft"].as_str())
            .unwrap_or("")
            .to_string();
        self.say("   writer read the research with ctx.parent_results() and wrote:");
        self.say(format!("     \"{draft}\""));
        self.summary.insert(
            "pipeline".into(),
            json!({"research": research_id, "writer": writer_id, "draft": draft}),
        );
        Ok(())
    }

    /// Part 4: a backlog with mixed priorities, drained by one worker with one slot.
    async fn priorities(&mut self) -> Result<(), CliError> {
        self.say("\n4. Priorities under a backlog");
        let backlog = [
            (5, "weekly report"),
            (9, "newsletter"),
            (1, "production outage"),
            (5, "customer email"),
            (10, "archive cleanup"),
            (1, "security alert"),
            (3, "bug triage"),
            (7, "blog draft"),
        ];
        let mut ids = Vec::new();
        for (p, title) in backlog {
            let id = self
                .dispatcher
                .dispatch(
                    TRIAGE,
                    json!({"title": title}),
                    p,
                    DispatchOptions::default(),
                )
                .await?;
            ids.push(id);
        }
        let listed: Vec<String> = backlog.iter().map(|(p, t)| format!("p{p} {t}")).collect();
        self.say(format!(
            "   {} tasks dispatched while no worker runs (the lab lost such messages):",
            backlog.len()
        ));
        self.say(format!("     {}", listed.join(", ")));
        let order = Arc::new(Mutex::new(Vec::<(u8, String)>::new()));
        let seen = order.clone();
        let handler = handler_fn(move |ctx: TaskContext| {
            let seen = seen.clone();
            async move {
                let title = ctx.task.payload["title"]
                    .as_str()
                    .unwrap_or("?")
                    .to_string();
                seen.lock().push((ctx.task.priority.get(), title));
                Ok(Value::Null)
            }
        });
        let worker = Worker::new(
            self.backends.clone(),
            worker_config("demo-triage", 1, Duration::from_secs(10)),
        )
        .handle(TRIAGE, handler)?
        .start()?;
        for id in &ids {
            self.wait(id).await?;
        }
        self.stop(worker).await;
        let order = order.lock().clone();
        self.say("   one worker with 1 slot starts; the order it ran them:");
        for (i, (p, title)) in order.iter().enumerate() {
            self.say(format!("     {}. p{p} {title}", i + 1));
        }
        let sorted = order.windows(2).all(|w| w[0].0 <= w[1].0);
        check(
            sorted && order.len() == backlog.len(),
            format!("expected urgent first, got {order:?}"),
        )?;
        self.say(
            "   => urgent first: strict priority (1 is the most urgent), FIFO within a priority.",
        );
        self.summary.insert(
            "priorities".into(),
            json!(order
                .iter()
                .map(|(p, t)| json!({"priority": p, "title": t}))
                .collect::<Vec<_>>()),
        );
        Ok(())
    }

    /// Part 5: a worker dies mid-task; the monitor hands its task to another worker.
    async fn recovery(&mut self) -> Result<(), CliError> {
        self.say("\n5. A worker dies mid-task; the monitor recovers its task");
        let lease = Duration::from_secs(1);
        let (report_tx, mut reports) = mpsc::unbounded_channel::<MonitorReport>();
        let monitor = Monitor::new(
            self.backends.clone(),
            MonitorConfig {
                monitor_id: "demo-monitor".into(),
                interval: Duration::from_millis(200),
                lock_key: "demo_monitor".into(),
                reannounce_pending_after: None,
                ..MonitorConfig::default()
            },
        )
        .start(move |r| {
            let _ = report_tx.send(r.clone());
        })?;

        let (claimed_tx, mut claimed) = mpsc::channel::<u32>(1);
        let stuck = handler_fn(move |ctx: TaskContext| {
            let tx = claimed_tx.clone();
            async move {
                let _ = tx.send(ctx.task.state.attempt).await;
                std::future::pending::<Result<Value, TaskError>>().await
            }
        });
        // The doomed worker runs on a runtime of its own, shut down at the kill: its tasks are
        // dropped where they stand, as in a process that dies. (WorkerHandle::kill alone
        // currently races with the worker's graceful hand-back of running tasks.)
        let crash_rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| CliError::Failed(format!("cannot start a runtime: {e}")))?;
        let doomed = {
            let _on_crash_rt = crash_rt.enter();
            Worker::new(
                self.backends.clone(),
                worker_config("demo-doomed", 1, lease),
            )
            .handle(FRAGILE, stuck)?
            .start()?
        };
        let id = self
            .dispatcher
            .dispatch(
                FRAGILE,
                json!({"job": "long analysis"}),
                5,
                DispatchOptions::default(),
            )
            .await?;
        let attempt = within("the first worker to claim", claimed.recv()).await?;
        // Stop the doomed worker's runtime first (its tasks are dropped, never polled again),
        // then kill the handle: nothing is left to hand the task back.
        let _ = tokio::task::spawn_blocking(move || crash_rt.shutdown_timeout(lease)).await;
        doomed.kill();
        let orphan = self.get(&id).await?;
        self.say(format!(
            "   worker demo-doomed claimed {id} (attempt {}) and was killed mid-task",
            attempt.unwrap_or(0)
        ));
        self.say(format!(
            "   the registry still says {} by {}, lease until {} (lease {}s, no more heartbeats)",
            orphan.state.status,
            orphan.state.worker_id.as_deref().unwrap_or("-"),
            clock(orphan.state.lease_until),
            lease.as_secs()
        ));
        let recovered = within("the monitor to recover the task", async {
            while let Some(r) = reports.recv().await {
                if r.recovered > 0 {
                    return Some(r);
                }
            }
            None
        })
        .await?;
        check(recovered.is_some(), "the monitor should recover the task")?;
        let back = self.get(&id).await?;
        self.say(format!(
            "   monitor: lease expired -> recovered 1 task: RUNNING -> {} and back on its queue",
            back.state.status
        ));

        let runs = Arc::new(AtomicU32::new(0));
        let counted = runs.clone();
        let finish = handler_fn(move |ctx: TaskContext| {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                Ok(json!({"done_by": ctx.worker_id.to_string(), "attempt": ctx.task.state.attempt}))
            }
        });
        let rescuer = Worker::new(
            self.backends.clone(),
            worker_config("demo-rescuer", 1, Duration::from_secs(10)),
        )
        .handle(FRAGILE, finish)?
        .start()?;
        let done = self.wait(&id).await?;
        // The killed worker's own delivery comes back when its bus lease ends: the rescuer
        // must drop it (the task is COMPLETED), not run it again.
        let grace = Instant::now();
        while grace.elapsed() < lease * 2 && rescuer.metrics().skipped == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let skipped = rescuer.metrics().skipped;
        self.stop(rescuer).await;
        monitor.shutdown().await;
        let n = runs.load(Ordering::SeqCst);
        self.say(format!(
            "   worker demo-rescuer: {} on attempt {} by {}",
            done.state.status,
            done.state.attempt,
            done.state.worker_id.as_deref().unwrap_or("-")
        ));
        self.say(format!(
            "   => completed exactly once: the handler ran {n} time(s) after the crash; {skipped} duplicate delivery(ies) dropped"
        ));
        check(
            done.state.status == TaskStatus::Completed && n == 1,
            format!(
                "expected one completion, got status {} after {n} run(s)",
                done.state.status
            ),
        )?;
        self.summary.insert(
            "recovery".into(),
            json!({"task_id": id, "attempt": done.state.attempt, "worker": done.state.worker_id, "handler_runs": n, "duplicates_dropped": skipped}),
        );
        Ok(())
    }

    /// Part 6: a model-calling agent under a global rate limit, and a schedule fired by the
    /// monitor.
    async fn rate_and_schedule(&mut self) -> Result<(), CliError> {
        self.say("\n6. A rate-limited agent and a schedule");
        let calls = QueueName::parse(MODEL_CALLS)?;
        let limits = QueueLimits::parse(Some("4/s"), None)?;
        Control::new(self.backends.clone())
            .set_limits(&calls, &limits)
            .await?;
        self.say(format!(
            "   {MODEL_CALLS} is limited to {limits} for every worker of the namespace (orchestra queues limit)"
        ));
        let mut ids = Vec::new();
        for i in 0..10 {
            ids.push(
                self.dispatcher
                    .dispatch(
                        MODEL_CALLS,
                        json!({"prompt": i}),
                        5,
                        DispatchOptions::default(),
                    )
                    .await?,
            );
        }
        let starts = Arc::new(Mutex::new(Vec::<Instant>::new()));
        let seen = starts.clone();
        let model = handler_fn(move |_ctx: TaskContext| {
            let seen = seen.clone();
            async move {
                seen.lock().push(Instant::now());
                Ok(json!({"answer": "..."}))
            }
        });
        let began = Instant::now();
        let worker = Worker::new(
            self.backends.clone(),
            worker_config("demo-model", 8, Duration::from_secs(10)),
        )
        .handle(MODEL_CALLS, model)?
        .start()?;
        for id in &ids {
            self.wait(id).await?;
        }
        self.stop(worker).await;
        let mut starts = starts.lock().clone();
        starts.sort();
        let offsets: Vec<String> = starts
            .iter()
            .map(|t| format!("{:.1}", t.duration_since(began).as_secs_f64()))
            .collect();
        self.say(format!(
            "   10 calls dispatched at once, a worker with 8 slots; they started at (s): {}",
            offsets.join(", ")
        ));
        // Unlimited, the 8 slots would start them all at once. Limited, 10 starts need three
        // windows of a second: at least 2 s from the first to the last. (The starts are seen
        // in the handlers, a little after each permit: a window a bit under a second counts.)
        let span = starts[starts.len() - 1].duration_since(starts[0]);
        let most = starts
            .iter()
            .map(|a| {
                starts
                    .iter()
                    .filter(|b| **b >= *a && b.duration_since(*a) < Duration::from_millis(900))
                    .count()
            })
            .max()
            .unwrap_or(0);
        check(
            starts.len() == 10 && most <= 4 && span >= Duration::from_millis(1800),
            format!("expected at most 4 starts a second, saw {most} within 0.9 s and all 10 within {span:?}"),
        )?;
        self.say(format!(
            "   => at most {most} starts in any second, 10 starts spread over {:.1} s: the limit holds for every worker of the namespace, and waiting costs no attempt.",
            span.as_secs_f64()
        ));
        self.summary.insert(
            "rate_limit".into(),
            json!({"limit": limits.to_string(), "most_in_a_second": most}),
        );

        // A schedule every second, fired by the monitor that holds the lock.
        let schedules = Schedules::new(self.backends.clone());
        let schedule = Schedule::new(
            "digest",
            Recurrence::every(Duration::from_secs(1))?,
            DIGESTS,
            json!({"kind": "digest"}),
        )?;
        schedules.add(schedule).await?;
        self.say(
            "   schedule `digest` added: every 1s to the queue digests (orchestra schedule add)",
        );
        let ran = Arc::new(Mutex::new(Vec::<String>::new()));
        let seen = ran.clone();
        let digest = handler_fn(move |ctx: TaskContext| {
            let seen = seen.clone();
            async move {
                seen.lock().push(ctx.task.task_id.to_string());
                Ok(Value::Null)
            }
        });
        let worker = Worker::new(
            self.backends.clone(),
            worker_config("demo-digest", 2, Duration::from_secs(10)),
        )
        .handle(DIGESTS, digest)?
        .start()?;
        let monitor = Monitor::new(
            self.backends.clone(),
            MonitorConfig {
                monitor_id: "demo-scheduler".into(),
                interval: Duration::from_millis(200),
                lock_key: "demo_scheduler".into(),
                ..MonitorConfig::default()
            },
        )
        .start(|_| {})?;
        within("three occurrences of the schedule", async {
            while ran.lock().len() < 3 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await?;
        monitor.shutdown().await;
        schedules.remove("digest").await?;
        self.stop(worker).await;
        let ran = ran.lock().clone();
        let mut unique = ran.clone();
        unique.sort();
        unique.dedup();
        check(
            unique.len() == ran.len() && ran.iter().all(|id| id.starts_with("sched:digest:")),
            format!("expected each occurrence once, under its derived id: {ran:?}"),
        )?;
        for id in ran.iter().take(3) {
            self.say(format!("     ran {id}"));
        }
        self.say(
            "   => each occurrence is dispatched once, under an id made of the schedule and its time, so several monitors or a restarted one cannot fire it twice.",
        );
        self.summary
            .insert("schedule".into(), json!({"occurrences_run": ran}));
        Ok(())
    }
}
