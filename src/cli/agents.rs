//! `orchestra worker`: built-in agents for trying things out.
//!
//! * `echo` returns its payload;
//! * `sleep` sleeps `{"ms": N}` milliseconds (and stops when the task is cancelled);
//! * `fail` fails (retryably) with probability `{"p": 0.3}` (else `--fail-probability`, else
//!   0.5) and otherwise returns its payload.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agent_orchestra::engine::{
    handler_fn, Finished, Handler, Monitor, MonitorReport, TaskError, Worker,
};
use agent_orchestra::{QueueName, TaskStatus};
use clap::Args;
use rand::Rng;
use serde_json::{json, Value};

use super::{duration_arg, shutdown_signal, CliError, Ctx};

/// `orchestra worker`.
#[derive(Args)]
pub struct WorkerArgs {
    /// A queue to serve and its agent: QUEUE or QUEUE=echo|sleep|fail (repeatable; default echo).
    #[arg(long = "queue", short, value_name = "QUEUE[=AGENT]", required = true)]
    queues: Vec<String>,
    /// Tasks run at once (default: worker.concurrency from the configuration).
    #[arg(long, short)]
    concurrency: Option<usize>,
    /// Failure probability of the `fail` agent when the payload has no "p".
    #[arg(long, value_name = "P")]
    fail_probability: Option<f64>,
    /// Lease of a claimed task (default: worker.lease).
    #[arg(long, value_parser = duration_arg)]
    lease: Option<Duration>,
    /// Stop by itself after this long (graceful shutdown, as on Ctrl-C).
    #[arg(long = "for", value_parser = duration_arg, value_name = "DURATION")]
    run_for: Option<Duration>,
    /// Do not print a line per finished task.
    #[arg(long)]
    quiet: bool,
    /// Also run the monitor here: recovery of tasks whose worker died, re-announces, retention
    /// (several monitors elect one acting monitor by lock). Its passes are printed when they
    /// changed something.
    #[arg(long)]
    monitor: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464): this worker's
    /// counters, tasks by status, and its queues' sizes, read at each scrape.
    #[arg(long, value_name = "ADDR", value_parser = super::metrics::addr_arg)]
    metrics: Option<std::net::SocketAddr>,
}

/// The built-in agents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Agent {
    /// Returns the payload.
    Echo,
    /// Sleeps `{"ms": N}`, reporting its progress each second.
    Sleep,
    /// Fails with a probability.
    Fail,
}

impl Agent {
    fn parse(name: &str) -> Result<Agent, CliError> {
        match name.trim().to_ascii_lowercase().as_str() {
            "echo" => Ok(Agent::Echo),
            "sleep" => Ok(Agent::Sleep),
            "fail" => Ok(Agent::Fail),
            other => Err(CliError::Usage(format!(
                "unknown agent {other:?}; expected echo, sleep or fail"
            ))),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Agent::Echo => "echo",
            Agent::Sleep => "sleep",
            Agent::Fail => "fail",
        }
    }

    /// The agent as a handler.
    pub fn handler(self, default_p: f64) -> Arc<dyn Handler> {
        match self {
            Agent::Echo => handler_fn(|ctx| async move { Ok(ctx.task.payload) }),
            Agent::Sleep => handler_fn(|ctx| async move {
                let ms = ctx
                    .task
                    .payload
                    .get("ms")
                    .and_then(Value::as_u64)
                    .filter(|ms| *ms <= 3_600_000)
                    .ok_or_else(|| {
                        TaskError::permanent(
                            "the sleep agent expects a payload like {\"ms\": 250} (at most an hour)",
                        )
                    })?;
                // Reports how far it got each second (`dispatch --wait` and `task get` show it).
                let started = tokio::time::Instant::now();
                let end = started + Duration::from_millis(ms);
                loop {
                    let tick = end.min(tokio::time::Instant::now() + Duration::from_secs(1));
                    tokio::select! {
                        _ = tokio::time::sleep_until(tick) => {}
                        // Cancelled while running: stop sleeping (the outcome is discarded).
                        _ = ctx.cancelled() => return Err(TaskError::permanent("cancelled")),
                    }
                    if tick >= end {
                        return Ok(json!({ "slept_ms": ms }));
                    }
                    let slept = started.elapsed().as_millis() as u64;
                    ctx.progress(json!({ "slept_ms": slept, "of_ms": ms }))
                        .map_err(|e| TaskError::permanent(e.to_string()))?;
                }
            }),
            Agent::Fail => handler_fn(move |ctx| async move {
                let p = match ctx.task.payload.get("p") {
                    None => default_p,
                    Some(v) => v.as_f64().ok_or_else(|| {
                        TaskError::permanent("\"p\" must be a number between 0 and 1")
                    })?,
                };
                if !(0.0..=1.0).contains(&p) {
                    return Err(TaskError::permanent(format!(
                        "\"p\" must be between 0 and 1, got {p}"
                    )));
                }
                if rand::rng().random_bool(p) {
                    Err(TaskError::retryable(format!("simulated failure (p = {p})")))
                } else {
                    Ok(ctx.task.payload)
                }
            }),
        }
    }
}

/// Parses `QUEUE` or `QUEUE=AGENT`.
fn parse_spec(spec: &str) -> Result<(QueueName, Agent), CliError> {
    let (q, agent) = match spec.split_once('=') {
        Some((q, a)) => (q, Agent::parse(a)?),
        None => (spec, Agent::Echo),
    };
    Ok((QueueName::parse(q.trim())?, agent))
}

pub async fn run(ctx: &Ctx, a: WorkerArgs) -> Result<(), CliError> {
    let specs = a
        .queues
        .iter()
        .map(|s| parse_spec(s))
        .collect::<Result<Vec<_>, _>>()?;
    let default_p = a.fail_probability.unwrap_or(0.5);
    if !(0.0..=1.0).contains(&default_p) {
        return Err(CliError::Usage(format!(
            "--fail-probability must be between 0 and 1, got {default_p}"
        )));
    }
    let mut config = ctx.config.clone();
    if let Some(c) = a.concurrency {
        config.worker.concurrency = c;
    }
    if let Some(l) = a.lease {
        config.worker.lease = l;
    }
    config.validate()?;
    let worker_config = config.worker_config();
    let backends = Ctx {
        config: config.clone(),
        out: ctx.out,
    }
    .connect_shared()
    .await?;

    let monitor_config = config.monitor_config();
    monitor_config.validate()?;
    let mut worker = Worker::new(backends.clone(), worker_config.clone());
    for (queue, agent) in &specs {
        worker = worker.handle(queue.as_str(), agent.handler(default_p))?;
    }
    let out = ctx.out;
    let quiet = a.quiet;
    // Counted here because the worker's own counters are gone once shutdown consumes it.
    let tally = Arc::new(Tally::default());
    let seen = tally.clone();
    worker = worker.on_finished(move |f: &Finished| {
        seen.count(f.task.state.status);
        if !quiet {
            print_finished(out, f);
        }
    });
    // Bound before the worker starts: a taken port stops the command before any task is
    // claimed.
    let listener = match a.metrics {
        Some(addr) => Some(super::metrics::bind(addr).await?),
        None => None,
    };
    let handle = worker.start()?;
    let exporter = listener.map(|l| {
        let url = super::metrics::url(&l);
        let queues: Vec<QueueName> = specs.iter().map(|(q, _)| q.clone()).collect();
        let render = super::metrics::render(backends.clone(), queues, Some(&handle));
        (url, super::metrics::serve(l, render))
    });
    let monitor = if a.monitor {
        let started = Monitor::new(backends, monitor_config).start(move |r: &MonitorReport| {
            let acted = r.recovered + r.timed_out + r.unblocked + r.reannounced + r.purged;
            if acted > 0 {
                if out.json {
                    out.json(&json!({"event": "monitor", "report": r}));
                } else {
                    println!("monitor: {}", super::commands::report_line(r));
                }
            }
        });
        match started {
            Ok(m) => Some(m),
            Err(e) => {
                handle.shutdown().await;
                return Err(e.into());
            }
        }
    } else {
        None
    };
    let serving: Vec<String> = specs
        .iter()
        .map(|(q, agent)| format!("{q} ({})", agent.name()))
        .collect();
    if ctx.out.json {
        ctx.out.json(&json!({
            "event": "started",
            "worker_id": handle.worker_id(),
            "queues": specs.iter().map(|(q, agent)| json!({"queue": q, "agent": agent.name()})).collect::<Vec<_>>(),
            "concurrency": worker_config.concurrency,
            "metrics": exporter.as_ref().map(|(url, _)| url),
        }));
    } else {
        println!(
            "worker {} serving {} with {} slot(s); Ctrl-C to stop",
            handle.worker_id(),
            serving.join(", "),
            worker_config.concurrency
        );
        if let Some((url, _)) = &exporter {
            println!("metrics at {url}");
        }
    }
    match a.run_for {
        Some(d) => {
            tokio::select! {
                _ = shutdown_signal() => {}
                _ = tokio::time::sleep(d) => {}
            }
        }
        None => shutdown_signal().await,
    }
    if !ctx.out.json {
        eprintln!(
            "stopping: no new tasks; running tasks have up to {} to finish",
            agent_orchestra::config::format_duration(worker_config.shutdown_timeout),
        );
    }
    if let Some(m) = monitor {
        m.shutdown().await;
    }
    let worker_id = handle.worker_id().to_string();
    // A second Ctrl-C or SIGTERM stops at once (a cold shutdown): dropping the handle stops
    // the running tasks without recording anything, as a crash would; they stay RUNNING until
    // their lease ends and then go to another worker.
    let report = tokio::select! {
        r = handle.shutdown() => r,
        _ = shutdown_signal() => {
            return Err(CliError::Interrupted(
                "a second signal: stopped at once; the tasks that were running return to their queue when their lease ends".into(),
            ));
        }
    };
    if let Some((_, server)) = exporter {
        server.abort();
    }
    let (completed, retried, failed) = tally.get();
    if ctx.out.json {
        ctx.out.json(&json!({
            "event": "stopped",
            "worker_id": worker_id,
            "handed_back": report.handed_back,
            "clean": report.clean,
            "deadline_passed": report.deadline_passed,
            "completed": completed,
            "retried": retried,
            "failed": failed,
            "cancelled": report.metrics.cancelled,
        }));
    } else {
        println!(
            "worker {worker_id} stopped ({}): completed {completed}, retried {retried}, failed {failed}, cancelled {}, handed back {}",
            match (report.clean, report.deadline_passed) {
                (true, false) => "clean",
                (true, true) => "deadline passed",
                (false, _) => "not clean",
            },
            report.metrics.cancelled,
            report.handed_back,
        );
    }
    if !report.clean {
        Err(CliError::Failed(
            "shutdown did not finish cleanly; unfinished tasks return to their queue when their lease ends".into(),
        ))
    } else if report.deadline_passed {
        Err(CliError::Failed(format!(
            "the shutdown deadline ({}) passed: {} running task(s) were handed back to their queue",
            agent_orchestra::config::format_duration(worker_config.shutdown_timeout),
            report.handed_back
        )))
    } else {
        Ok(())
    }
}

/// Outcomes seen by this worker.
#[derive(Default)]
struct Tally {
    completed: AtomicU64,
    retried: AtomicU64,
    failed: AtomicU64,
}

impl Tally {
    fn count(&self, status: TaskStatus) {
        let c = match status {
            TaskStatus::Completed => &self.completed,
            TaskStatus::Failed => &self.failed,
            _ => &self.retried,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn get(&self) -> (u64, u64, u64) {
        (
            self.completed.load(Ordering::Relaxed),
            self.retried.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

fn print_finished(out: super::Output, f: &Finished) {
    let t = &f.task;
    if out.json {
        out.json(&json!({
            "event": "finished",
            "task_id": t.task_id,
            "queue": t.queue,
            "status": t.state.status,
            "attempt": t.state.attempt,
            "error": t.state.error,
        }));
        return;
    }
    let what = match t.state.status {
        TaskStatus::Completed => "COMPLETED",
        TaskStatus::Failed => "FAILED   ",
        TaskStatus::Pending => "RETRY    ",
        _ => t.state.status.as_str(),
    };
    let detail = match t.state.status {
        TaskStatus::Completed => String::new(),
        _ => format!("  {}", t.state.error.as_deref().unwrap_or("")),
    };
    println!(
        "{what} {} on {} (attempt {}/{}){detail}",
        t.task_id, t.queue, t.state.attempt, t.max_attempts
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_specs_parse_with_a_default_agent() {
        let (q, a) = parse_spec("research_tasks").unwrap();
        assert_eq!((q.as_str(), a), ("research_tasks", Agent::Echo));
        let (q, a) = parse_spec("slow=sleep").unwrap();
        assert_eq!((q.as_str(), a), ("slow", Agent::Sleep));
        assert!(parse_spec("q=dance").is_err());
        assert!(parse_spec("bad queue=echo").is_err());
    }
}
