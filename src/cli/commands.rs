//! The task operations: dispatch, task get, tasks list, stats, cancel, retry, dead-letters,
//! and the monitor.

use std::time::Duration;

use agent_orchestra::bus::QueueStats;
use agent_orchestra::engine::{DispatchOptions, Dispatcher, Monitor, MonitorReport};
use agent_orchestra::model::parse_payload;
use agent_orchestra::{Priority, QueueName, Task, TaskFilter, TaskId, TaskStatus};
use clap::{Args, Subcommand};
use serde_json::json;

use super::output::{task_block, task_row, TASK_HEADER};
use super::{duration_arg, shutdown_signal, CliError, Ctx};

/// A time given on the command line: RFC 3339 (`2026-12-08T10:00:00Z`, any offset).
fn time_arg(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(s.trim())
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| format!("{s:?} is not an RFC 3339 time such as 2026-12-08T10:00:00Z: {e}"))
}

/// `orchestra dispatch`.
#[derive(Args)]
pub struct DispatchArgs {
    /// The queue (the agent's specialty), e.g. research_tasks.
    queue: String,
    /// The task's input as JSON, e.g. '{"topic": "AI agents"}'; or @FILE to read it from a file,
    /// or - to read it from stdin (at most limits.max_payload_bytes either way).
    payload: String,
    /// 1 (most urgent) ..= 10.
    #[arg(long, short, default_value_t = 5, allow_negative_numbers = true)]
    priority: i64,
    /// Attempts before the task fails for good.
    #[arg(long, default_value_t = 3)]
    max_attempts: u32,
    /// A task that must complete first (repeatable).
    #[arg(long = "depends-on", value_name = "ID")]
    depends_on: Vec<String>,
    /// Run no earlier than this from now (e.g. 5s).
    #[arg(long, value_parser = duration_arg, default_value = "0s")]
    delay: Duration,
    /// Use this id instead of a generated one.
    #[arg(long)]
    id: Option<String>,
    /// Run each attempt at most this long (e.g. 30s): the handler is then stopped and the
    /// attempt fails and is retried. Overrides the worker's handler_timeout.
    #[arg(long, value_parser = duration_arg, value_name = "DURATION")]
    task_timeout: Option<Duration>,
    /// Start no attempt after this time (RFC 3339, e.g. 2026-12-08T10:00:00Z): a task not
    /// started by then fails instead of running late.
    #[arg(long, value_parser = time_arg, value_name = "TIME", conflicts_with = "deadline_in")]
    deadline: Option<chrono::DateTime<chrono::Utc>>,
    /// The deadline as a duration from now (e.g. 10m).
    #[arg(long, value_parser = duration_arg, value_name = "DURATION")]
    deadline_in: Option<Duration>,
    /// An idempotency key: while it lives (--unique-for), a dispatch with the same key
    /// registers nothing and prints the id of the task that took it.
    #[arg(long, value_name = "KEY", requires = "unique_for")]
    unique_key: Option<String>,
    /// How long the --unique-key lives from this dispatch (e.g. 10m).
    #[arg(long, value_parser = duration_arg, value_name = "DURATION", requires = "unique_key")]
    unique_for: Option<Duration>,
    /// Wait for the outcome and print it (exit 1 if the task fails).
    #[arg(long)]
    wait: bool,
    /// How long --wait waits.
    #[arg(long, value_parser = duration_arg, default_value = "30s")]
    timeout: Duration,
}

/// `orchestra task ...`.
#[derive(Subcommand)]
pub enum TaskCommand {
    /// Prints one task.
    Get {
        /// The task's id.
        id: String,
    },
}

/// `orchestra tasks ...`.
#[derive(Subcommand)]
pub enum TasksCommand {
    /// Lists tasks, oldest change first, one page at a time.
    List(ListArgs),
}

/// `orchestra tasks list`.
#[derive(Args)]
pub struct ListArgs {
    /// Only this status (WAITING, PENDING, RUNNING, COMPLETED, FAILED, CANCELLED).
    #[arg(long)]
    status: Option<String>,
    /// Only this queue.
    #[arg(long)]
    queue: Option<String>,
    /// Tasks per page.
    #[arg(long, default_value_t = 50)]
    limit: usize,
    /// Continue after this cursor (printed with the previous page).
    #[arg(long)]
    cursor: Option<String>,
}

/// `orchestra stats`.
#[derive(Args)]
pub struct StatsArgs {
    /// Also show the sizes of this queue (repeatable).
    #[arg(long = "queue", short)]
    queues: Vec<String>,
}

/// `orchestra workers`.
#[derive(Args)]
pub struct WorkersArgs {
    /// How long to listen for the workers' announcements (they come every 2 s by default).
    #[arg(long, value_parser = duration_arg, default_value = "3s")]
    listen: Duration,
}

/// `orchestra monitor`.
#[derive(Args)]
pub struct MonitorArgs {
    /// Run one pass, print it and exit.
    #[arg(long)]
    once: bool,
    /// Time between passes (default: monitor.interval from the configuration).
    #[arg(long, value_parser = duration_arg)]
    interval: Option<Duration>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464): tasks by
    /// status, and the sizes of the queues named with --queue, read at each scrape.
    #[arg(long, value_name = "ADDR", value_parser = super::metrics::addr_arg)]
    metrics: Option<std::net::SocketAddr>,
    /// A queue whose sizes --metrics reports (repeatable).
    #[arg(long = "queue", value_name = "QUEUE", requires = "metrics")]
    queues: Vec<String>,
}

/// `orchestra purge`.
#[derive(Args)]
pub struct PurgeArgs {
    /// Delete finished tasks that finished longer ago than this (e.g. 7d).
    #[arg(long, value_parser = duration_arg, value_name = "DURATION")]
    older_than: Option<Duration>,
    /// Keep at most this many finished tasks per status, the most recent (0 deletes all).
    #[arg(long, value_name = "N")]
    keep: Option<u64>,
}

/// `orchestra drop-namespace`.
#[derive(Args)]
pub struct DropNamespaceArgs {
    /// A work queue to delete with its dead letters and delays. RabbitMQ cannot list queues, so
    /// name every queue the namespace used there; Redis and NATS find them by the prefix.
    /// Repeatable.
    #[arg(long = "queue", short = 'q', value_name = "QUEUE")]
    queues: Vec<String>,
    /// Yes, delete everything under the prefix for good.
    #[arg(long)]
    yes: bool,
}

fn dispatcher(ctx: &Ctx, backends: agent_orchestra::Backends) -> Dispatcher {
    Dispatcher::new(backends).with_limits(ctx.config.limits())
}

pub async fn dispatch(ctx: &Ctx, a: DispatchArgs) -> Result<(), CliError> {
    // Check the input before connecting, so that bad input is a usage error even when the
    // broker is down.
    let queue = QueueName::parse(&a.queue)?;
    let priority = Priority::new(a.priority)?;
    let text = payload_text(&a.payload, ctx.config.limits.max_payload_bytes)?;
    let payload = parse_payload(&text)?;
    let depends_on = a
        .depends_on
        .iter()
        .map(|d| TaskId::parse(d))
        .collect::<Result<Vec<_>, _>>()?;
    let task_id = a.id.as_deref().map(TaskId::parse).transpose()?;
    Task::new(
        queue.clone(),
        payload.clone(),
        priority,
        a.max_attempts,
        depends_on.clone(),
        &ctx.config.limits(),
    )?;
    let has_parents = !depends_on.is_empty();
    let deadline = match (a.deadline, a.deadline_in) {
        (Some(at), _) => Some(at),
        (None, Some(d)) => Some(
            chrono::TimeDelta::from_std(d)
                .ok()
                .and_then(|d| chrono::Utc::now().checked_add_signed(d))
                .ok_or_else(|| CliError::Usage("--deadline-in: too far in the future".into()))?,
        ),
        (None, None) => None,
    };
    let options = DispatchOptions {
        max_attempts: a.max_attempts,
        depends_on,
        delay: a.delay,
        task_id,
        timeout: a.task_timeout,
        deadline,
        unique: a
            .unique_key
            .zip(a.unique_for)
            .map(|(key, ttl)| agent_orchestra::engine::Unique { key, ttl }),
        traceparent: None,
    };
    // Bad timeouts, deadlines and keys are usage errors even when the broker is down.
    options.validate()?;
    let d = dispatcher(ctx, ctx.connect_shared().await?);
    let id = d
        .dispatch(queue.as_str(), payload, priority.get().into(), options)
        .await?;
    if has_parents && !a.wait {
        // A dependency that already failed or was cancelled fails the new task at once: say
        // so rather than "dispatched".
        let task = d.get(&id).await?;
        if task.state.status.is_terminal() {
            print_task(ctx, &task);
            return outcome(&task);
        }
    }
    if !a.wait {
        if ctx.out.json {
            ctx.out.json(&json!({"task_id": id}));
        } else {
            println!("dispatched {id} to {queue} (priority {priority})");
        }
        return Ok(());
    }
    if !ctx.out.json {
        eprintln!(
            "dispatched {id} to {queue} (priority {priority}); waiting up to {}",
            agent_orchestra::config::format_duration(a.timeout)
        );
    }
    // Without --json, what changes while it waits goes to stderr: the attempt that started,
    // and each progress report its handler makes (read at most once a second).
    let quiet = ctx.out.json;
    let mut shown_attempt = 0;
    let watching = d.wait_watching(&id, a.timeout, Duration::from_secs(1), |t| {
        let s = &t.state;
        if quiet || s.status != TaskStatus::Running {
            return;
        }
        if s.attempt != shown_attempt {
            shown_attempt = s.attempt;
            eprintln!("running (attempt {})", s.attempt);
        }
        if let Some(p) = &s.progress {
            eprintln!("progress (attempt {}): {p}", s.attempt);
        }
    });
    let task = match watching.await {
        Ok(t) => t,
        Err(agent_orchestra::Error::Timeout(m)) => return Err(CliError::Failed(m)),
        Err(e) => return Err(e.into()),
    };
    print_task(ctx, &task);
    outcome(&task)
}

/// The payload argument's JSON text: the argument itself, or the contents of `@FILE`, or stdin
/// for `-`. A file or stdin is read up to `max_bytes` (the payload limit): past it, the read
/// stops and the error says so (exit 2), so `/dev/zero` or an endless pipe cannot exhaust
/// memory.
pub(super) fn payload_text(arg: &str, max_bytes: usize) -> Result<String, CliError> {
    use std::io::Read;
    let (source, reader): (String, Box<dyn Read>) = if arg == "-" {
        ("stdin".into(), Box::new(std::io::stdin().lock()))
    } else if let Some(path) = arg.strip_prefix('@') {
        let file = std::fs::File::open(path)
            .map_err(|e| CliError::Usage(format!("payload: cannot read the file {path:?}: {e}")))?;
        (format!("the file {path:?}"), Box::new(file))
    } else {
        return Ok(arg.to_string());
    };
    let mut bytes = Vec::new();
    reader
        .take(max_bytes as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| CliError::Usage(format!("payload: cannot read {source}: {e}")))?;
    if bytes.len() > max_bytes {
        return Err(CliError::Usage(format!(
            "payload: {source} holds more than {max_bytes} bytes, the largest payload (limits.max_payload_bytes)"
        )));
    }
    String::from_utf8(bytes)
        .map_err(|_| CliError::Usage(format!("payload: {source} is not UTF-8 text")))
}

/// Exit 1 for a task that ended without completing.
fn outcome(task: &Task) -> Result<(), CliError> {
    match task.state.status {
        TaskStatus::Failed | TaskStatus::Cancelled => Err(CliError::Failed(format!(
            "task {} {}: {}",
            task.task_id,
            task.state.status,
            task.state.error.as_deref().unwrap_or("no reason recorded")
        ))),
        _ => Ok(()),
    }
}

fn print_task(ctx: &Ctx, task: &Task) {
    if ctx.out.json {
        ctx.out.json(task);
    } else {
        println!("{}", task_block(task));
    }
}

pub async fn task(ctx: &Ctx, command: TaskCommand) -> Result<(), CliError> {
    match command {
        TaskCommand::Get { id } => {
            let id = TaskId::parse(&id)?;
            let d = dispatcher(ctx, ctx.connect_to_read(&[]).await?.0);
            let task = d.get(&id).await?;
            print_task(ctx, &task);
            Ok(())
        }
    }
}

pub async fn tasks(ctx: &Ctx, command: TasksCommand) -> Result<(), CliError> {
    let TasksCommand::List(a) = command;
    let filter = TaskFilter {
        status: a.status.as_deref().map(str::parse).transpose()?,
        queue: a.queue.as_deref().map(QueueName::parse).transpose()?,
    };
    if a.limit == 0 || a.limit > 10_000 {
        return Err(CliError::Usage(format!(
            "--limit must be between 1 and 10000, got {}",
            a.limit
        )));
    }
    let (backends, _) = ctx.connect_to_read(&[]).await?;
    let page = backends
        .registry
        .list(&filter, a.cursor.as_deref(), a.limit)
        .await?;
    if ctx.out.json {
        ctx.out
            .json(&json!({"tasks": page.tasks, "next_cursor": page.next_cursor}));
        return Ok(());
    }
    if page.tasks.is_empty() {
        println!("no tasks");
    } else {
        println!("{TASK_HEADER}");
        for t in &page.tasks {
            println!("{}", task_row(t));
        }
    }
    if let Some(c) = page.next_cursor {
        println!("more: --cursor {c}");
    }
    Ok(())
}

pub async fn workers(ctx: &Ctx, a: WorkersArgs) -> Result<(), CliError> {
    let (backends, _) = ctx.connect_to_read(&[]).await?;
    let workers = agent_orchestra::engine::list_workers(backends.bus.as_ref(), a.listen).await?;
    if ctx.out.json {
        ctx.out.json(&workers);
        return Ok(());
    }
    if workers.is_empty() {
        println!(
            "no worker heard within {}",
            agent_orchestra::config::format_duration(a.listen)
        );
        return Ok(());
    }
    let now = chrono::Utc::now();
    let ago = |t: chrono::DateTime<chrono::Utc>| {
        agent_orchestra::config::format_duration((now - t).to_std().unwrap_or_default())
    };
    for w in &workers {
        let queues: Vec<&str> = w.queues.iter().map(|q| q.as_str()).collect();
        println!(
            "{} on {} (pid {}), queues {}, {}/{} running, up {}, seen {} ago",
            w.worker_id,
            w.host,
            w.pid,
            queues.join(","),
            w.running.len(),
            w.concurrency,
            ago(w.started_at),
            ago(w.seen_at)
        );
        for r in &w.running {
            println!(
                "  {} on {} attempt {}, for {}",
                r.task_id,
                r.queue,
                r.attempt,
                ago(r.since)
            );
        }
    }
    Ok(())
}

pub async fn stats(ctx: &Ctx, a: StatsArgs) -> Result<(), CliError> {
    let queues = a
        .queues
        .iter()
        .map(|q| QueueName::parse(q))
        .collect::<Result<Vec<_>, _>>()?;
    let (backends, found) = ctx.connect_to_read(&queues).await?;
    let counts = backends.registry.counts().await?;
    let mut stats = Vec::with_capacity(queues.len());
    for (q, exists) in queues.iter().zip(found) {
        // A queue that does not exist is empty; asking the bus would declare it.
        stats.push(match exists {
            true => backends.bus.stats(q).await?,
            false => QueueStats::default(),
        });
    }
    let mut queue_stats = serde_json::Map::new();
    for (q, s) in queues.iter().zip(&stats) {
        queue_stats.insert(q.to_string(), serde_json::to_value(s).unwrap_or_default());
    }
    if ctx.out.json {
        ctx.out.json(&json!({
            "counts": counts,
            "total": counts.total(),
            "queues": queue_stats,
        }));
        return Ok(());
    }
    println!("tasks by status:");
    for s in TaskStatus::ALL {
        println!("  {:<10} {}", s.as_str(), counts.get(s));
    }
    println!("  {:<10} {}", "total", counts.total());
    for (q, s) in queues.iter().zip(&stats) {
        println!(
            "queue {q}: waiting {}, in flight {}, dead letters {}",
            s.waiting, s.in_flight, s.dead
        );
    }
    Ok(())
}

pub async fn cancel(ctx: &Ctx, id: &str) -> Result<(), CliError> {
    let id = TaskId::parse(id)?;
    let d = dispatcher(ctx, ctx.connect_shared().await?);
    let task = d.cancel(&id).await?;
    if ctx.out.json {
        ctx.out.json(&task);
    } else {
        println!("task {id} is now {}", task.state.status);
    }
    Ok(())
}

pub async fn retry(ctx: &Ctx, id: &str) -> Result<(), CliError> {
    let id = TaskId::parse(id)?;
    let d = dispatcher(ctx, ctx.connect_shared().await?);
    let task = match d.retry(&id).await {
        // The id a dead-letter listing shows first is its message's, not a task's.
        Err(e @ agent_orchestra::Error::TaskNotFound(_)) => {
            return Err(CliError::Failed(format!(
                "{e}; retry takes a task id (a dead letter's message id is not one: put a dead letter back with `orchestra dead-letters QUEUE --requeue ID`)"
            )))
        }
        r => r?,
    };
    if ctx.out.json {
        ctx.out.json(&task);
    } else {
        println!(
            "task {id} is {} again on {} (attempts used so far: {})",
            task.state.status, task.queue, task.state.attempt
        );
    }
    Ok(())
}

fn print_report(ctx: &Ctx, r: &MonitorReport) {
    if ctx.out.json {
        ctx.out.json(r);
        return;
    }
    println!("{}", report_line(r));
}

/// One monitor pass as a line: time, role, counts, and what it changed.
pub(super) fn report_line(r: &MonitorReport) -> String {
    let mut line = format!(
        "[{}] {}  {}",
        chrono::Utc::now().format("%H:%M:%S"),
        if r.leader { "acting " } else { "standby" },
        r.counts
    );
    for (name, n) in [
        ("recovered", r.recovered),
        ("timed_out", r.timed_out),
        ("unblocked", r.unblocked),
        ("reannounced", r.reannounced),
        ("purged", r.purged),
        ("scheduled", r.scheduled),
        ("skipped_occurrences", r.skipped_occurrences),
    ] {
        if n > 0 {
            line.push_str(&format!("  {name}={n}"));
        }
    }
    line
}

pub async fn monitor(ctx: &Ctx, a: MonitorArgs) -> Result<(), CliError> {
    let mut config = ctx.config.monitor_config();
    if let Some(i) = a.interval {
        config.interval = i;
    }
    config.validate()?;
    let queues = a
        .queues
        .iter()
        .map(|q| QueueName::parse(q))
        .collect::<Result<Vec<_>, _>>()?;
    if a.once && a.metrics.is_some() {
        return Err(CliError::Usage(
            "--metrics serves while the monitor runs; --once exits after one pass".into(),
        ));
    }
    let listener = match a.metrics {
        Some(addr) => Some(super::metrics::bind(addr).await?),
        None => None,
    };
    let backends = ctx.connect_shared().await?;
    let exporter = listener.map(|l| {
        let url = super::metrics::url(&l);
        let render = super::metrics::render(backends.clone(), queues, None);
        (url, super::metrics::serve(l, render))
    });
    let monitor = Monitor::new(backends, config.clone());
    if a.once {
        let r = monitor.tick().await;
        // The lock goes at once: a later `--once` (or a running monitor) acts without waiting
        // for its TTL.
        let released = monitor.step_down().await;
        let r = r?;
        released?;
        print_report(ctx, &r);
        return Ok(());
    }
    if !ctx.out.json {
        eprintln!(
            "monitor {} every {}; Ctrl-C to stop",
            config.monitor_id,
            agent_orchestra::config::format_duration(config.interval)
        );
    }
    if let Some((url, _)) = &exporter {
        match ctx.out.json {
            true => ctx.out.json(&json!({"event": "started", "metrics": url})),
            false => eprintln!("metrics at {url}"),
        }
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<MonitorReport>();
    let handle = monitor.start(move |r| {
        let _ = tx.send(r.clone());
    })?;
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            r = rx.recv() => match r {
                Some(r) => print_report(ctx, &r),
                None => break,
            },
        }
    }
    handle.shutdown().await;
    if let Some((_, server)) = exporter {
        server.abort();
    }
    Ok(())
}

pub async fn drop_namespace(ctx: &Ctx, a: DropNamespaceArgs) -> Result<(), CliError> {
    let queues = a
        .queues
        .iter()
        .map(|q| QueueName::parse(q))
        .collect::<Result<Vec<_>, _>>()?;
    let prefix = &ctx.config.prefix;
    if prefix.is_empty() {
        return Err(CliError::Usage(
            "drop-namespace needs --prefix (or ORCHESTRA_PREFIX): everything whose name starts with it is deleted, and an empty prefix would be everything".into(),
        ));
    }
    if ctx.config.is_memory() {
        return Err(CliError::Usage(
            "drop-namespace deletes a namespace on a broker; memory:// keeps nothing beyond its process (pass --url)".into(),
        ));
    }
    let urls = ctx.config.backend_urls();
    let mut places: Vec<String> = Vec::new();
    for u in [&urls.bus, &urls.registry, &urls.locks] {
        let shown = agent_orchestra::redact_url(u);
        if !places.contains(&shown) {
            places.push(shown);
        }
    }
    if !a.yes {
        return Err(CliError::Usage(format!(
            "drop-namespace deletes everything under the prefix {prefix:?} on {} for good; add --yes to do it",
            places.join(", ")
        )));
    }
    agent_orchestra::connect::drop_namespace(&urls, &ctx.config.connect_options(), &queues).await?;
    if ctx.out.json {
        ctx.out.json(&json!({"dropped": prefix, "on": places}));
    } else {
        println!(
            "deleted everything under the prefix {prefix:?} on {}",
            places.join(", ")
        );
    }
    Ok(())
}

pub async fn purge(ctx: &Ctx, a: PurgeArgs) -> Result<(), CliError> {
    if a.older_than.is_none() && a.keep.is_none() {
        return Err(CliError::Usage(
            "say what to delete: --older-than DURATION and/or --keep N".into(),
        ));
    }
    let retention = agent_orchestra::Retention {
        max_age: a.older_than,
        max_count: a.keep,
    };
    let backends = ctx.connect_shared().await?;
    let n = backends.registry.purge_finished(&retention).await?;
    if ctx.out.json {
        ctx.out.json(&json!({"purged": n}));
    } else {
        println!("deleted {n} finished task(s)");
    }
    Ok(())
}
