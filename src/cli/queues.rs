//! The operator's commands on queues: `queues` (list, pause, resume, limit) and `dead-letters`
//! (list, requeue, delete), over [`Control`].

use agent_orchestra::engine::{Control, DeadLetterOutcome, DeadLetterSelection, QueueInfo};
use agent_orchestra::wire::TaskMessage;
use agent_orchestra::{QueueLimits, QueueName, TaskStatus};
use clap::{Args, Subcommand};
use serde_json::json;

use super::output::short_json;
use super::{CliError, Ctx};

/// `orchestra queues`.
#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct QueuesArgs {
    #[command(subcommand)]
    command: Option<QueuesCommand>,
    /// Also list this queue (repeatable): one with dead letters but no task is not found by
    /// itself.
    #[arg(long = "queue", short, value_name = "QUEUE")]
    queues: Vec<String>,
}

/// `orchestra queues pause|resume|limit`.
#[derive(Subcommand)]
pub enum QueuesCommand {
    /// Stops claiming from QUEUE on every worker (running tasks finish; messages stay queued).
    Pause {
        /// The queue.
        queue: String,
    },
    /// Lets every worker of QUEUE claim from it again.
    Resume {
        /// The queue.
        queue: String,
    },
    /// Limits QUEUE across every worker: at most RATE tasks started per interval (60/min,
    /// 10/s, 1000/h, 5/30s) and at most --concurrency running at once. Replaces the queue's
    /// previous runtime limits; --clear removes them (workers go back to their configured ones).
    Limit {
        /// The queue.
        queue: String,
        /// Tasks started at most per interval: COUNT/UNIT or COUNT/DURATION.
        rate: Option<String>,
        /// Tasks of the queue running at most at once, across every worker.
        #[arg(long, value_name = "N")]
        concurrency: Option<u32>,
        /// Removes the queue's runtime limits.
        #[arg(long, conflicts_with_all = ["rate", "concurrency"])]
        clear: bool,
    },
}

/// `orchestra dead-letters`.
#[derive(Args)]
pub struct DeadLettersArgs {
    /// The queue.
    queue: String,
    /// With --requeue or --delete: the dead letters' message ids (as listed).
    #[arg(value_name = "ID")]
    ids: Vec<String>,
    /// How many to list, most recent first.
    #[arg(long, default_value_t = 20)]
    limit: usize,
    /// Put the named dead letters (or --all) back on the queue as new messages; their tasks,
    /// when known, go back to PENDING.
    #[arg(long, conflicts_with = "delete")]
    requeue: bool,
    /// Delete the named dead letters (or --all) for good.
    #[arg(long)]
    delete: bool,
    /// With --requeue or --delete: every dead letter of the queue.
    #[arg(long, conflicts_with = "ids")]
    all: bool,
}

/// Connects for a command that writes: the queues' controls live in the registry.
async fn control(ctx: &Ctx) -> Result<Control, CliError> {
    Ok(Control::new(ctx.connect_shared().await?))
}

pub async fn queues(ctx: &Ctx, a: QueuesArgs) -> Result<(), CliError> {
    match a.command {
        Some(QueuesCommand::Pause { queue }) => return set_paused(ctx, &queue, true).await,
        Some(QueuesCommand::Resume { queue }) => return set_paused(ctx, &queue, false).await,
        Some(QueuesCommand::Limit {
            queue,
            rate,
            concurrency,
            clear,
        }) => return set_limits(ctx, &queue, rate.as_deref(), concurrency, clear).await,
        None => {}
    }
    let named = a
        .queues
        .iter()
        .map(|q| QueueName::parse(q))
        .collect::<Result<Vec<_>, _>>()?;
    let (backends, found) = ctx.connect_to_read(&named).await?;
    // A named queue that does not exist is not asked about (asking the bus would declare it).
    let also: Vec<QueueName> = named
        .into_iter()
        .zip(found)
        .filter_map(|(q, exists)| exists.then_some(q))
        .collect();
    let list = Control::new(backends).queues(&also).await?;
    if ctx.out.json {
        ctx.out.json(&json!({ "queues": list }));
        return Ok(());
    }
    if list.is_empty() {
        println!("no queues (no tasks, none paused)");
        return Ok(());
    }
    println!(
        "{:<24} {:<7} {:>8} {:>8} {:>9} {:>6}  tasks",
        "QUEUE", "STATE", "WAITING", "DELAYED", "IN FLIGHT", "DEAD"
    );
    for q in &list {
        println!("{}", queue_row(q));
    }
    let limited: Vec<&QueueInfo> = list.iter().filter(|q| !q.limits.is_unlimited()).collect();
    if !limited.is_empty() {
        println!("\nlimits set at runtime (across every worker):");
        for q in limited {
            println!("  {:<24} {}", q.queue.as_str(), q.limits);
        }
    }
    Ok(())
}

async fn set_limits(
    ctx: &Ctx,
    queue: &str,
    rate: Option<&str>,
    concurrency: Option<u32>,
    clear: bool,
) -> Result<(), CliError> {
    let queue = QueueName::parse(queue)?;
    if !clear && rate.is_none() && concurrency.is_none() {
        return Err(CliError::Usage(
            "queues limit needs a RATE (60/min, 10/s, 1000/h, 5/30s), --concurrency N, or --clear"
                .into(),
        ));
    }
    // Checked before connecting: bad input is a usage error (exit 2) with nothing changed.
    let limits = QueueLimits::parse(rate, concurrency)?;
    let changed = control(ctx).await?.set_limits(&queue, &limits).await?;
    if ctx.out.json {
        ctx.out
            .json(&json!({"queue": queue, "limits": limits, "changed": changed}));
        return Ok(());
    }
    match (changed, limits.is_unlimited()) {
        (true, true) => println!("queue {queue}: runtime limits cleared"),
        (true, false) => println!("queue {queue} limited across every worker: {limits}"),
        (false, true) => println!("queue {queue} had no runtime limits"),
        (false, false) => println!("queue {queue} already was limited so: {limits}"),
    }
    Ok(())
}

fn queue_row(q: &QueueInfo) -> String {
    let tasks: Vec<String> = TaskStatus::ALL
        .iter()
        .filter(|s| q.tasks.get(**s) > 0)
        .map(|s| format!("{}={}", s, q.tasks.get(*s)))
        .collect();
    format!(
        "{:<24} {:<7} {:>8} {:>8} {:>9} {:>6}  {}",
        q.queue.as_str(),
        if q.paused { "paused" } else { "active" },
        q.waiting,
        q.delayed.map_or("-".to_string(), |d| d.to_string()),
        q.in_flight,
        q.dead,
        if tasks.is_empty() {
            "none".to_string()
        } else {
            tasks.join(" ")
        }
    )
}

async fn set_paused(ctx: &Ctx, queue: &str, paused: bool) -> Result<(), CliError> {
    let queue = QueueName::parse(queue)?;
    let control = control(ctx).await?;
    let changed = match paused {
        true => control.pause(&queue).await?,
        false => control.resume(&queue).await?,
    };
    if ctx.out.json {
        ctx.out
            .json(&json!({"queue": queue, "paused": paused, "changed": changed}));
        return Ok(());
    }
    let what = if paused { "paused" } else { "resumed" };
    match (changed, paused) {
        (true, true) => println!(
            "queue {queue} paused: workers finish what they run and claim nothing more from it"
        ),
        (true, false) => println!("queue {queue} resumed"),
        (false, _) => println!("queue {queue} was already {what}"),
    }
    Ok(())
}

pub async fn dead_letters(ctx: &Ctx, a: DeadLettersArgs) -> Result<(), CliError> {
    let queue = QueueName::parse(&a.queue)?;
    if a.requeue || a.delete {
        return act(ctx, &queue, &a).await;
    }
    if !a.ids.is_empty() || a.all {
        return Err(CliError::Usage(
            "message ids and --all say which dead letters to --requeue or --delete; give one of those"
                .into(),
        ));
    }
    if a.limit == 0 {
        return Err(CliError::Usage("--limit must be at least 1".into()));
    }
    let (backends, found) = ctx.connect_to_read(std::slice::from_ref(&queue)).await?;
    // A queue that does not exist has no dead letters; asking the bus would declare it.
    let letters = match found[0] {
        true => backends.bus.dead_letters(&queue, a.limit).await?,
        false => Vec::new(),
    };
    let task_of = |payload: &[u8]| TaskMessage::decode(payload).ok().map(|m| m.task_id);
    if ctx.out.json {
        let list: Vec<_> = letters
            .iter()
            .map(|l| {
                json!({
                    "queue": l.queue,
                    "message_id": l.message_id,
                    "task_id": task_of(&l.payload),
                    "payload": String::from_utf8_lossy(&l.payload),
                    "reason": l.reason,
                    "delivery_count": l.delivery_count,
                    "dead_at": l.dead_at,
                })
            })
            .collect();
        ctx.out.json(&json!({"queue": queue, "dead_letters": list}));
        return Ok(());
    }
    if letters.is_empty() {
        println!("no dead letters on {queue}");
    }
    for l in &letters {
        let payload = String::from_utf8_lossy(&l.payload);
        let preview = short_json(&serde_json::Value::String(payload.into_owned()), 80);
        let task = task_of(&l.payload).map_or("not a task message".to_string(), |t| t.to_string());
        println!(
            "{}  {}  deliveries {}  {}\n  task     {}\n  reason   {}\n  payload  {}",
            l.message_id,
            l.dead_at.format("%Y-%m-%d %H:%M:%S%.3fZ"),
            l.delivery_count,
            l.queue,
            task,
            l.reason,
            preview
        );
    }
    Ok(())
}

/// `--requeue` or `--delete`: exit 1 when a named dead letter was not found or one was left.
async fn act(ctx: &Ctx, queue: &QueueName, a: &DeadLettersArgs) -> Result<(), CliError> {
    let verb = if a.requeue { "--requeue" } else { "--delete" };
    let which = match (a.all, a.ids.is_empty()) {
        (true, _) => DeadLetterSelection::All,
        (false, false) => DeadLetterSelection::Ids(a.ids.clone()),
        (false, true) => {
            return Err(CliError::Usage(format!(
                "{verb} needs the dead letters' message ids, or --all"
            )))
        }
    };
    let control = control(ctx).await?;
    let outcomes = match a.requeue {
        true => control.requeue_dead_letters(queue, &which).await?,
        false => control.delete_dead_letters(queue, &which).await?,
    };
    let left = outcomes
        .iter()
        .filter(|o| {
            matches!(
                o,
                DeadLetterOutcome::NotFound { .. } | DeadLetterOutcome::Skipped { .. }
            )
        })
        .count();
    if ctx.out.json {
        ctx.out.json(&json!({"queue": queue, "outcomes": outcomes}));
    } else {
        if outcomes.is_empty() {
            println!("no dead letters on {queue}");
        }
        for o in &outcomes {
            println!("{}", outcome_line(o));
        }
    }
    if left > 0 {
        return Err(CliError::Failed(format!(
            "{left} of {} dead letters were not {}",
            outcomes.len(),
            if a.requeue { "requeued" } else { "deleted" }
        )));
    }
    Ok(())
}

fn outcome_line(o: &DeadLetterOutcome) -> String {
    match o {
        DeadLetterOutcome::Requeued {
            message_id,
            new_message_id,
            task_id,
            task_status,
        } => match (task_id, task_status) {
            (Some(t), Some(s)) => {
                format!("{message_id}: requeued as message {new_message_id}; task {t} is {s}")
            }
            _ => format!("{message_id}: requeued as message {new_message_id} (no task known)"),
        },
        DeadLetterOutcome::Deleted { message_id } => format!("{message_id}: deleted"),
        DeadLetterOutcome::Skipped {
            message_id, reason, ..
        } => format!("{message_id}: left as it is: {reason}"),
        DeadLetterOutcome::NotFound { message_id } => {
            format!("{message_id}: no such dead letter on this queue")
        }
    }
}
