//! Human and JSON output.

use agent_orchestra::{Task, TaskStatus};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

/// Where results go: readable lines, or one JSON document per result (one per line).
#[derive(Clone, Copy, Debug)]
pub struct Output {
    /// JSON instead of human text.
    pub json: bool,
}

impl Output {
    /// Prints `value` as one line of JSON.
    pub fn json<T: Serialize + ?Sized>(&self, value: &T) {
        match serde_json::to_string(value) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("error: could not encode the output as JSON: {e}"),
        }
    }

    /// Prints a line of human text (nothing in JSON mode).
    pub fn line(&self, text: impl AsRef<str>) {
        if !self.json {
            println!("{}", text.as_ref());
        }
    }
}

/// `12:00:01.123`, or `-`.
pub fn clock(t: Option<DateTime<Utc>>) -> String {
    t.map_or_else(|| "-".into(), |t| t.format("%H:%M:%S%.3f").to_string())
}

/// `2024-05-01 12:00:01.123Z`, or `-`.
pub fn stamp(t: Option<DateTime<Utc>>) -> String {
    t.map_or_else(
        || "-".into(),
        |t| t.format("%Y-%m-%d %H:%M:%S%.3fZ").to_string(),
    )
}

/// Compact JSON, cut to `max` characters.
pub fn short_json(v: &Value, max: usize) -> String {
    let s = v.to_string();
    if s.chars().count() <= max {
        s
    } else {
        let cut: String = s.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

/// A task as a readable block.
pub fn task_block(t: &Task) -> String {
    let s = &t.state;
    let mut lines = vec![
        format!("{}  {}", t.task_id, s.status),
        format!("  queue        {}", t.queue),
        format!("  priority     {}", t.priority),
        if s.handed_back > 0 {
            format!(
                "  attempt      {} of {} ({} more handed back on worker shutdown, not counted)",
                t.charged_attempts(),
                t.max_attempts,
                s.handed_back
            )
        } else {
            format!("  attempt      {} of {}", s.attempt, t.max_attempts)
        },
        format!("  worker       {}", s.worker_id.as_deref().unwrap_or("-")),
    ];
    if !t.depends_on.is_empty() {
        let deps: Vec<&str> = t.depends_on.iter().map(|d| d.as_str()).collect();
        lines.push(format!("  depends on   {}", deps.join(", ")));
    }
    lines.push(format!("  created      {}", stamp(Some(t.created_at))));
    if let Some(timeout) = t.timeout {
        let t = agent_orchestra::config::format_duration(timeout);
        lines.push(format!("  timeout      {t} per attempt"));
    }
    if t.deadline.is_some() {
        lines.push(format!("  deadline     {}", stamp(t.deadline)));
    }
    lines.push(format!("  updated      {}", stamp(Some(s.updated_at))));
    if s.started_at.is_some() {
        lines.push(format!("  started      {}", stamp(s.started_at)));
    }
    if s.status == TaskStatus::Running {
        lines.push(format!("  lease until  {}", stamp(s.lease_until)));
    }
    if let Some(p) = &s.progress {
        lines.push(format!("  progress     {p}"));
    }
    if s.status == TaskStatus::Pending && s.ready_at.is_some_and(|r| r > s.updated_at) {
        lines.push(format!("  ready at     {}", stamp(s.ready_at)));
    }
    if s.finished_at.is_some() {
        lines.push(format!("  finished     {}", stamp(s.finished_at)));
    }
    lines.push(format!("  payload      {}", short_json(&t.payload, 200)));
    if let Some(r) = &s.result {
        lines.push(format!("  result       {}", short_json(r, 200)));
    }
    if let Some(e) = &s.error {
        lines.push(format!("  error        {e}"));
    }
    lines.join("\n")
}

/// The header of [`task_row`].
pub const TASK_HEADER: &str =
    "ID                                      STATUS     QUEUE                PRI  ATTEMPT  UPDATED";

/// A task as one table row.
pub fn task_row(t: &Task) -> String {
    format!(
        "{:<39} {:<10} {:<20} {:>3}  {:>3}/{:<3}  {}",
        t.task_id.as_str(),
        t.state.status.as_str(),
        t.queue.as_str(),
        t.priority.get(),
        t.charged_attempts(),
        t.max_attempts,
        stamp(Some(t.state.updated_at))
    )
}
