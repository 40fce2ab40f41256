//! `orchestra bench`: N no-op tasks through the whole lifecycle (dispatch → claim → RUNNING →
//! COMPLETED → acked) with C worker slots, producer and workers in one process.
//!
//! Each payload carries its dispatch time (`{"t": micros since the bench started}`); the
//! worker's [`Worker::on_finished`] hook, which runs after the outcome is recorded and the
//! message acked, records `now - t` in an HDR histogram. The last stdout line is exactly
//! `tasks_per_s=<float> p50_ms=<float> p99_ms=<float>`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_orchestra::engine::{handler_fn, DispatchOptions, Dispatcher, Finished, Worker};
use agent_orchestra::{QueueName, TaskStatus};
use clap::Args;
use futures::{StreamExt, TryStreamExt};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::{Notify, Semaphore};

use super::{duration_arg, shutdown_signal, CliError, Ctx};

/// `orchestra bench`.
#[derive(Args)]
pub struct BenchArgs {
    /// Tasks to run.
    #[arg(short = 'n', long = "tasks", default_value_t = 10_000)]
    n: u64,
    /// Worker slots (tasks run at once).
    #[arg(short = 'c', long = "concurrency", default_value_t = 16)]
    c: usize,
    /// Dispatch at a steady R tasks/s instead of all at once.
    #[arg(long, value_name = "R")]
    rate: Option<f64>,
    /// The queue to use.
    #[arg(long, default_value = "bench")]
    queue: String,
    /// Tasks per Dispatcher::dispatch_many call (without --rate).
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Batches in flight at once (without --rate; with --rate each dispatch runs on its own).
    #[arg(long, default_value_t = 1)]
    producers: usize,
    /// Give up after this long.
    #[arg(long, value_parser = duration_arg, default_value = "10m")]
    timeout: Duration,
    /// On a broker, leave the finished tasks in the registry instead of deleting them.
    #[arg(long)]
    keep: bool,
}

/// Shared between the producer, the worker's hook and the progress loop.
struct State {
    start: Instant,
    n: u64,
    done: AtomicU64,
    failed: AtomicU64,
    dispatched: AtomicU64,
    end_micros: AtomicU64,
    hist: Mutex<Histogram<u64>>,
    all_done: Notify,
    error: Mutex<Option<String>>,
    stop: AtomicBool,
}

impl State {
    fn micros(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    fn fail(&self, message: String) {
        let mut e = self.error.lock();
        if e.is_none() {
            *e = Some(message);
        }
        self.stop.store(true, Ordering::Relaxed);
        self.all_done.notify_one();
    }

    /// The worker's hook: runs once per finished attempt, after the ack.
    fn finished(&self, f: &Finished) {
        match f.task.state.status {
            TaskStatus::Completed => {
                let now = f.at.saturating_duration_since(self.start).as_micros() as u64;
                if let Some(t) = f.task.payload.get("t").and_then(Value::as_u64) {
                    self.hist
                        .lock()
                        .saturating_record(now.saturating_sub(t).max(1));
                }
                if self.done.fetch_add(1, Ordering::AcqRel) + 1 == self.n {
                    self.end_micros.store(now, Ordering::Release);
                    self.all_done.notify_one();
                }
            }
            TaskStatus::Failed => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                self.fail(format!(
                    "task {} failed: {}",
                    f.task.task_id,
                    f.task.state.error.as_deref().unwrap_or("?")
                ));
            }
            _ => {}
        }
    }
}

pub async fn run(ctx: &Ctx, a: BenchArgs) -> Result<(), CliError> {
    if a.n == 0 || a.c == 0 || a.batch == 0 || a.producers == 0 {
        return Err(CliError::Usage(
            "-n, -c, --batch and --producers must be at least 1".into(),
        ));
    }
    if let Some(r) = a.rate {
        if !(r.is_finite() && r > 0.0) {
            return Err(CliError::Usage(format!(
                "--rate must be a positive number of tasks per second, got {r}"
            )));
        }
    }
    let queue = QueueName::parse(&a.queue)?;
    let mut config = ctx.config.clone();
    let on_broker = !config.is_memory();
    if on_broker {
        // A fresh namespace per run: nothing left by an earlier run is counted.
        super::fresh_namespace(&mut config, "bench")?;
    }
    config.worker.concurrency = a.c;
    config.validate()?;
    let backends = config.connect().await?;
    let dispatcher = Dispatcher::new(backends.clone()).with_limits(config.limits());

    let state = Arc::new(State {
        start: Instant::now(),
        n: a.n,
        done: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        dispatched: AtomicU64::new(0),
        end_micros: AtomicU64::new(0),
        hist: Mutex::new(
            Histogram::new_with_bounds(1, 3_600_000_000, 3)
                .map_err(|e| CliError::Failed(format!("histogram: {e}")))?,
        ),
        all_done: Notify::new(),
        error: Mutex::new(None),
        stop: AtomicBool::new(false),
    });
    let hook = state.clone();
    let worker = Worker::new(backends.clone(), config.worker_config())
        .handle(queue.as_str(), handler_fn(|_ctx| async { Ok(Value::Null) }))?
        .on_finished(move |f| hook.finished(f))
        .start()?;

    let mode = match a.rate {
        Some(r) => format!("steady {r} tasks/s"),
        None => format!("all at once in batches of {}", a.batch),
    };
    eprintln!(
        "bench: {} no-op tasks on {} (bus {}, registry {}, locks {}), {} worker slots, {mode}{}",
        a.n,
        queue,
        backends.bus.backend(),
        backends.registry.backend(),
        backends.locks.backend(),
        a.c,
        if on_broker {
            format!(", prefix {}", config.prefix)
        } else {
            String::new()
        }
    );

    let t0 = state.micros();
    let producer = {
        let state = state.clone();
        let queue = queue.clone();
        let (rate, batch, producers) = (a.rate, a.batch, a.producers);
        tokio::spawn(async move {
            let r = match rate {
                Some(r) => produce_steady(&state, &dispatcher, &queue, r).await,
                None => produce_batches(&state, &dispatcher, &queue, batch, producers).await,
            };
            if let Err(e) = r {
                state.fail(format!("dispatch failed: {e}"));
            }
        })
    };

    // Progress on stderr, once a second, until every task completed (or something broke).
    let deadline = tokio::time::Instant::now() + a.timeout;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut last = (state.micros(), 0u64);
    // Ctrl-C or SIGTERM ends the run early; the namespace is still deleted below.
    let interrupt = shutdown_signal();
    tokio::pin!(interrupt);
    let mut interrupted = false;
    loop {
        if state.done.load(Ordering::Acquire) >= a.n || state.stop.load(Ordering::Relaxed) {
            break;
        }
        tokio::select! {
            _ = &mut interrupt => {
                interrupted = true;
                break;
            }
            _ = state.all_done.notified() => {}
            _ = tick.tick() => {
                let (now, done) = (state.micros(), state.done.load(Ordering::Relaxed));
                let rate = (done - last.1) as f64 / ((now - last.0).max(1) as f64 / 1e6);
                eprintln!(
                    "  [{:>5.1}s] {done}/{} completed, {} dispatched, {rate:.0} tasks/s now",
                    (now - t0) as f64 / 1e6,
                    a.n,
                    state.dispatched.load(Ordering::Relaxed),
                );
                last = (now, done);
                if tokio::time::Instant::now() >= deadline {
                    state.fail(format!(
                        "timed out after {}: {done} of {} tasks completed",
                        agent_orchestra::config::format_duration(a.timeout),
                        a.n
                    ));
                }
            }
        }
    }
    producer.abort();
    let report = worker.shutdown_within(Duration::from_secs(5)).await;
    let error = state.error.lock().take();
    let kinds = json!({"bus": backends.bus.backend(), "registry": backends.registry.backend(), "locks": backends.locks.backend()});
    // Close the connections first: their background readers would only complain about what
    // the drop deletes.
    let _ = producer.await;
    drop(backends);
    // Everything under the run's own prefix goes: tasks, queue, streams, buckets, counters.
    let cleaned = if on_broker && !a.keep {
        match agent_orchestra::connect::drop_namespace(
            &config.backend_urls(),
            &config.connect_options(),
            std::slice::from_ref(&queue),
        )
        .await
        {
            Ok(()) => true,
            Err(e) => {
                eprintln!(
                    "warning: could not delete the bench's namespace {}: {e}",
                    config.prefix
                );
                false
            }
        }
    } else {
        false
    };
    if interrupted {
        return Err(CliError::Interrupted(if cleaned {
            format!(
                "the bench was interrupted; deleted everything under the prefix {}",
                config.prefix
            )
        } else {
            "the bench was interrupted".into()
        }));
    }
    if let Some(e) = error {
        return Err(CliError::Failed(e));
    }
    if !report.clean {
        tracing::warn!("the bench's worker did not stop cleanly");
    }

    let end = state.end_micros.load(Ordering::Acquire);
    let elapsed_s = (end.saturating_sub(t0)).max(1) as f64 / 1e6;
    let tasks_per_s = a.n as f64 / elapsed_s;
    let h = state.hist.lock();
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let (p50, p90, p99, max) = (ms(0.5), ms(0.9), ms(0.99), h.max() as f64 / 1000.0);
    if ctx.out.json {
        ctx.out.json(&json!({
            "tasks": a.n,
            "concurrency": a.c,
            "rate": a.rate,
            "batch": a.batch,
            "backend": kinds,
            "elapsed_s": elapsed_s,
            "tasks_per_s": tasks_per_s,
            "latency_ms": {"p50": p50, "p90": p90, "p99": p99, "max": max},
            "cleaned_up": cleaned,
        }));
    } else {
        println!(
            "completed {} tasks in {elapsed_s:.3} s with {} slots ({mode})",
            a.n, a.c
        );
        println!(
            "latency dispatch -> completed+acked: p50 {p50:.3} ms, p90 {p90:.3} ms, p99 {p99:.3} ms, max {max:.3} ms"
        );
        if cleaned {
            println!(
                "cleaned up: deleted everything under the prefix {}",
                config.prefix
            );
        }
    }
    // Also with --json: scripts read this last line whatever the mode (docs/cli.md).
    println!("tasks_per_s={tasks_per_s:.1} p50_ms={p50:.3} p99_ms={p99:.3}");
    Ok(())
}

/// All tasks as fast as possible, `batch` per dispatch_many, `producers` batches in flight.
async fn produce_batches(
    state: &State,
    dispatcher: &Dispatcher,
    queue: &QueueName,
    batch: usize,
    producers: usize,
) -> agent_orchestra::Result<()> {
    let sizes = (0..state.n.div_ceil(batch as u64)).map(|i| {
        let from = i * batch as u64;
        (state.n - from).min(batch as u64) as usize
    });
    futures::stream::iter(sizes)
        .map(|size| async move {
            if state.stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            let t = state.micros();
            let options = DispatchOptions::default();
            let tasks = (0..size)
                .map(|_| dispatcher.build(queue.as_str(), json!({ "t": t }), 5, &options))
                .collect::<agent_orchestra::Result<Vec<_>>>()?;
            for r in dispatcher.dispatch_many(tasks).await? {
                r?;
            }
            state.dispatched.fetch_add(size as u64, Ordering::Relaxed);
            // On memory nothing above waits: let the workers run between batches.
            tokio::task::yield_now().await;
            Ok(())
        })
        .buffer_unordered(producers)
        .try_collect::<()>()
        .await
}

/// Task `i` is dispatched at `i / rate` seconds; each dispatch runs on its own so that a slow
/// round trip does not delay the schedule (at most 1024 in flight).
async fn produce_steady(
    state: &Arc<State>,
    dispatcher: &Dispatcher,
    queue: &QueueName,
    rate: f64,
) -> agent_orchestra::Result<()> {
    let in_flight = Arc::new(Semaphore::new(1024));
    let began = tokio::time::Instant::now();
    for i in 0..state.n {
        if state.stop.load(Ordering::Relaxed) {
            break;
        }
        // (a rate of 1e-20 tasks/s must not overflow the clock: the schedule ends in a century)
        let at = Duration::try_from_secs_f64(i as f64 / rate)
            .unwrap_or(Duration::MAX)
            .min(Duration::from_secs(100 * 365 * 86_400));
        tokio::time::sleep_until(began + at).await;
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let (state, dispatcher, queue) = (state.clone(), dispatcher.clone(), queue.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let t = state.micros();
            match dispatcher
                .dispatch(
                    queue.as_str(),
                    json!({ "t": t }),
                    5,
                    DispatchOptions::default(),
                )
                .await
            {
                Ok(_) => {
                    state.dispatched.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => state.fail(format!("dispatch failed: {e}")),
            }
        });
    }
    Ok(())
}
