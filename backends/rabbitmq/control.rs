//! The operator's controls on RabbitMQ: the paused queues and the queues' runtime limits, a
//! replicated state machine
//! ([`Log`]) on the stream `{prefix}registry.control`. A pause or resume appends one record and
//! learns from its own replica whether it changed the set (log order decides between
//! concurrent writers); every process follows the stream, so reads answer from the local view,
//! which lags the log by the time a record takes to arrive (a process opening the log first
//! catches up with everything appended before). The stream has no retention (a pause must not
//! expire); it holds one small record per pause or resume and one marker per process that
//! opened it. `drop_namespace` deletes it with the registry's streams. The removal of dead
//! letters is the bus's (`bus/control.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::link::Link;
use super::log::{LazyLog, Log, Machine};
use super::names::Names;
use crate::error::Result;
use crate::model::QueueName;
use crate::queue_limits::{apply_limits, QueueLimits};

/// The stream of the paused queues.
pub(crate) fn stream_name(names: &Names) -> String {
    format!("{}.control", names.registry_log())
}

/// One pause or resume, or one change of a queue's limits.
#[derive(Serialize, Deserialize)]
pub(crate) struct PauseOp {
    queue: String,
    /// A pause (true) or a resume (false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    paused: Option<bool>,
    /// The queue's new limits (unlimited: cleared).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    limits: Option<QueueLimits>,
}

/// The paused queues and the queues' limits, as the records say.
#[derive(Default)]
pub(crate) struct PausedSet {
    queues: BTreeSet<QueueName>,
    limits: BTreeMap<QueueName, QueueLimits>,
}

impl Machine for PausedSet {
    type Op = PauseOp;
    /// Whether the record changed the set or the limits.
    type Outcome = bool;

    fn apply(&mut self, _position: u64, op: PauseOp) -> bool {
        // A record naming no valid queue (written by another program) changes nothing.
        let Ok(queue) = QueueName::parse(&op.queue) else {
            return false;
        };
        let paused = match op.paused {
            Some(true) => self.queues.insert(queue.clone()),
            Some(false) => self.queues.remove(&queue),
            None => false,
        };
        let limited = match op.limits {
            Some(l) if l.validate().is_ok() => apply_limits(&mut self.limits, &queue, &l),
            _ => false,
        };
        paused || limited
    }
}

/// The registry's paused queues and limits: the log, opened on first use.
pub(crate) struct Pauses {
    log: LazyLog<PausedSet>,
}

impl Pauses {
    pub(crate) fn new(link: Arc<Link>, names: &Names) -> Self {
        Pauses {
            log: LazyLog::new(link, stream_name(names)),
        }
    }

    async fn log(&self) -> Result<&Log<PausedSet>> {
        self.log.get().await
    }

    /// [`Registry::paused_queues`](crate::Registry::paused_queues).
    pub(crate) async fn paused(&self) -> Result<BTreeSet<QueueName>> {
        Ok(self.log().await?.read(|m| m.queues.clone()))
    }

    /// [`Registry::set_queue_paused`](crate::Registry::set_queue_paused).
    pub(crate) async fn set(&self, queue: &QueueName, paused: bool) -> Result<bool> {
        let op = PauseOp {
            queue: queue.to_string(),
            paused: Some(paused),
            limits: None,
        };
        self.log().await?.submit(&op).await
    }

    /// [`Registry::queue_limits`](crate::Registry::queue_limits).
    pub(crate) async fn limits(&self) -> Result<BTreeMap<QueueName, QueueLimits>> {
        Ok(self.log().await?.read(|m| m.limits.clone()))
    }

    /// [`Registry::set_queue_limits`](crate::Registry::set_queue_limits).
    pub(crate) async fn set_limits(&self, queue: &QueueName, limits: &QueueLimits) -> Result<bool> {
        limits.validate()?;
        let op = PauseOp {
            queue: queue.to_string(),
            paused: None,
            limits: Some(*limits),
        };
        self.log().await?.submit(&op).await
    }
}
