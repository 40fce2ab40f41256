//! `orchestra schedule`: add, list, pause, resume and remove the schedules the acting monitor
//! fires, over [`Schedules`].

use std::time::Duration;

use agent_orchestra::engine::{ScheduleInfo, Schedules};
use agent_orchestra::model::parse_payload;
use agent_orchestra::schedule::{CatchUp, Recurrence, Schedule};
use clap::{Args, Subcommand};
use serde_json::json;

use super::commands::payload_text;
use super::output::{short_json, stamp};
use super::{duration_arg, CliError, Ctx};

/// `orchestra schedule ...`.
#[derive(Subcommand)]
pub enum ScheduleCommand {
    /// Stores a schedule (replacing one of the same name): from now on, the acting monitor
    /// dispatches PAYLOAD on QUEUE at each occurrence.
    Add(AddArgs),
    /// Lists the schedules with their next occurrence.
    List,
    /// Deletes a schedule (the tasks it dispatched stay).
    Remove {
        /// The schedule's name.
        name: String,
    },
    /// Stops a schedule firing; what it would fire while paused is never fired.
    Pause {
        /// The schedule's name.
        name: String,
    },
    /// Lets a paused schedule fire again, from now on.
    Resume {
        /// The schedule's name.
        name: String,
    },
}

/// `orchestra schedule add`.
#[derive(Args)]
pub struct AddArgs {
    /// The schedule's name: letters, digits, `_` and `-`.
    name: String,
    /// The queue of its tasks.
    queue: String,
    /// Each task's input as JSON; or @FILE, or - for stdin.
    payload: String,
    /// A cron expression: 5 fields (minute hour day-of-month month day-of-week), or 6 with
    /// seconds first, e.g. "*/5 * * * *".
    #[arg(long, required_unless_present = "every", conflicts_with = "every")]
    cron: Option<String>,
    /// A fixed interval instead (whole seconds, counted from the Unix epoch), e.g. 30s, 1h.
    #[arg(long, value_parser = duration_arg)]
    every: Option<Duration>,
    /// The IANA time zone the cron expression is read in, e.g. Europe/Paris.
    #[arg(long, default_value = "UTC", conflicts_with = "every")]
    tz: String,
    /// 1 (most urgent) ..= 10.
    #[arg(long, short, default_value_t = 5, allow_negative_numbers = true)]
    priority: i64,
    /// Attempts of each task before it fails for good (default 3).
    #[arg(long)]
    max_attempts: Option<u32>,
    /// Occurrences an outage made late: latest (fire the most recent), all (up to 100), none.
    #[arg(long, default_value = "latest")]
    catch_up: String,
    /// Store it paused.
    #[arg(long)]
    paused: bool,
}

pub async fn schedule(ctx: &Ctx, command: ScheduleCommand) -> Result<(), CliError> {
    match command {
        ScheduleCommand::Add(a) => add(ctx, a).await,
        ScheduleCommand::List => list(ctx).await,
        ScheduleCommand::Remove { name } => remove(ctx, &name).await,
        ScheduleCommand::Pause { name } => set_paused(ctx, &name, true).await,
        ScheduleCommand::Resume { name } => set_paused(ctx, &name, false).await,
    }
}

/// The schedule the arguments describe, checked before connecting (bad input is a usage
/// error even when the broker is down).
fn build(ctx: &Ctx, a: AddArgs) -> Result<Schedule, CliError> {
    let recurrence = match (&a.cron, a.every) {
        (Some(expr), _) => Recurrence::cron(expr)?,
        (None, Some(d)) => Recurrence::every(d)?,
        (None, None) => return Err(CliError::Usage("give --cron or --every".into())),
    };
    let text = payload_text(&a.payload, ctx.config.limits.max_payload_bytes)?;
    let mut s = Schedule::new(&a.name, recurrence, &a.queue, parse_payload(&text)?)?
        .with_time_zone(&a.tz)?
        .with_priority(a.priority)?
        .with_catch_up(a.catch_up.parse::<CatchUp>()?)
        .with_paused(a.paused);
    if let Some(n) = a.max_attempts {
        s = s.with_max_attempts(n);
    }
    Ok(s)
}

async fn schedules(ctx: &Ctx) -> Result<Schedules, CliError> {
    Ok(Schedules::new(ctx.connect_shared().await?).with_limits(ctx.config.limits()))
}

async fn add(ctx: &Ctx, a: AddArgs) -> Result<(), CliError> {
    let schedule = build(ctx, a)?;
    let name = schedule.name.clone();
    let schedules = schedules(ctx).await?;
    let new = schedules.add(schedule).await?;
    let next = schedules
        .list()
        .await?
        .into_iter()
        .find(|s| s.schedule.name == name)
        .and_then(|s| s.next_at);
    if ctx.out.json {
        ctx.out
            .json(&json!({"schedule": name, "added": new, "replaced": !new, "next_at": next}));
        return Ok(());
    }
    let what = if new { "added" } else { "replaced" };
    println!("schedule {name} {what}; next at {}", stamp(next));
    Ok(())
}

async fn list(ctx: &Ctx) -> Result<(), CliError> {
    let (backends, _) = ctx.connect_to_read(&[]).await?;
    let list = Schedules::new(backends).list().await?;
    if ctx.out.json {
        ctx.out.json(&json!({ "schedules": list }));
        return Ok(());
    }
    if list.is_empty() {
        println!("no schedules");
        return Ok(());
    }
    println!(
        "{:<24} {:<28} {:<16} {:<20} {:<26} {:<7} payload",
        "NAME", "WHEN", "ZONE", "QUEUE", "NEXT", "CATCHUP"
    );
    for s in &list {
        println!("{}", row(s));
    }
    Ok(())
}

fn row(info: &ScheduleInfo) -> String {
    let s = &info.schedule;
    let when = match &s.recurrence {
        Recurrence::Cron(e) => format!("cron {e}"),
        Recurrence::Every(d) => format!("every {}", agent_orchestra::config::format_duration(*d)),
    };
    let next = match s.paused {
        true => "paused".to_string(),
        false => stamp(info.next_at),
    };
    format!(
        "{:<24} {:<28} {:<16} {:<20} {:<26} {:<7} {}",
        s.name.as_str(),
        when,
        s.time_zone.name(),
        s.queue.as_str(),
        next,
        s.catch_up.as_str(),
        short_json(&s.payload, 60)
    )
}

async fn remove(ctx: &Ctx, name: &str) -> Result<(), CliError> {
    if !schedules(ctx).await?.remove(name).await? {
        return Err(CliError::Failed(format!("no schedule named {name}")));
    }
    if ctx.out.json {
        ctx.out.json(&json!({"schedule": name, "removed": true}));
    } else {
        println!("schedule {name} removed");
    }
    Ok(())
}

async fn set_paused(ctx: &Ctx, name: &str, paused: bool) -> Result<(), CliError> {
    let changed = schedules(ctx).await?.set_paused(name, paused).await?;
    if ctx.out.json {
        ctx.out
            .json(&json!({"schedule": name, "paused": paused, "changed": changed}));
        return Ok(());
    }
    let what = if paused { "paused" } else { "resumed" };
    match changed {
        true => println!("schedule {name} {what}"),
        false => println!("schedule {name} was already {what}"),
    }
    Ok(())
}
