//! Which workers are alive, and what each is running: every worker announces itself on the
//! bus (topic [`WORKERS_TOPIC`]) every [`WorkerConfig::announce_every`](crate::WorkerConfig)
//! and once more, marked `stopping`, when it shuts down; [`list_workers`] listens for a while
//! and returns the workers it heard.
//!
//! Announcements are events: at-most-once, carried by the bus the worker already has (no
//! extra storage, nothing to clean up). A worker that died stops announcing itself and is no
//! longer listed once a listener has not heard it for its interval: a listing is the workers
//! heard during the listening window, so it should last at least one interval (plus a
//! margin for a busy broker).

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::bus::Bus;
use crate::error::{Error, Result};
use crate::model::{QueueName, TaskId};

/// The bus topic workers announce themselves on.
pub const WORKERS_TOPIC: &str = "workers";

/// What a worker says about itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// The worker's id (`worker_id` of the tasks it claims).
    pub worker_id: String,
    /// The host it runs on (the kernel's host name; `unknown` when it cannot be read).
    pub host: String,
    /// Its process id.
    pub pid: u32,
    /// The queues it serves.
    pub queues: Vec<QueueName>,
    /// How many tasks it runs at once.
    pub concurrency: usize,
    /// The agent-orchestra version it runs.
    pub version: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it sent this announcement.
    pub seen_at: DateTime<Utc>,
    /// How often it announces itself, in milliseconds.
    pub every_ms: u64,
    /// The tasks it is running, oldest first.
    pub running: Vec<RunningTask>,
    /// True in the last announcement of a worker that is shutting down.
    #[serde(default)]
    pub stopping: bool,
}

/// A task a worker is running.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningTask {
    /// The task.
    pub task_id: TaskId,
    /// Its queue.
    pub queue: QueueName,
    /// The attempt being run.
    pub attempt: u32,
    /// When the attempt started.
    pub since: DateTime<Utc>,
}

impl WorkerInfo {
    pub(crate) fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// The host name, read once (`/proc/sys/kernel/hostname`, then `$HOSTNAME`).
pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "unknown".to_string())
}

/// The longest a listing may listen.
pub const MAX_LISTEN: Duration = Duration::from_secs(300);

/// Listens to worker announcements on `bus` for `listen` and returns the workers heard, by id:
/// for each, its latest announcement. A worker whose latest announcement says it is stopping
/// is left out. Announcements that cannot be decoded are skipped (another program on the
/// topic).
pub async fn list_workers(bus: &dyn Bus, listen: Duration) -> Result<Vec<WorkerInfo>> {
    if listen.is_zero() || listen > MAX_LISTEN {
        return Err(Error::invalid(
            "listen",
            format!(
                "must be between 1ms and {}, got {}",
                crate::clock::format_duration(MAX_LISTEN),
                crate::clock::format_duration(listen)
            ),
        ));
    }
    let mut sub = bus.subscribe(WORKERS_TOPIC).await?;
    let mut heard: BTreeMap<String, WorkerInfo> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + listen;
    loop {
        let next = tokio::time::timeout_at(deadline, sub.recv()).await;
        let Ok(Some(bytes)) = next else { break };
        let Ok(info) = serde_json::from_slice::<WorkerInfo>(&bytes) else {
            continue;
        };
        match heard.get(&info.worker_id) {
            Some(known) if known.seen_at > info.seen_at => {}
            _ => {
                heard.insert(info.worker_id.clone(), info);
            }
        }
    }
    Ok(heard.into_values().filter(|w| !w.stopping).collect())
}
