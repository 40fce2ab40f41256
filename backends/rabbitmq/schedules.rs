//! Schedules on RabbitMQ: a replicated state machine ([`Log`]) on the stream
//! `{prefix}registry.schedules`, as for the paused queues (control.rs). A put or a removal
//! appends one record and learns from its own replica whether it added (or removed) a
//! schedule: log order decides between concurrent writers. Reads answer from the local view,
//! which lags the log by the time a record takes to arrive (a process opening the log first
//! catches up with everything appended before). The stream has no retention (a schedule must
//! not expire): one record per put or removal and one marker per process that opened it.
//! `drop_namespace` deletes it with the registry's streams.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::link::Link;
use super::log::{LazyLog, Log, Machine};
use super::names::Names;
use crate::error::Result;
use crate::schedule::{Schedule, ScheduleName};

/// The stream of the schedules.
pub(crate) fn stream_name(names: &Names) -> String {
    format!("{}.schedules", names.registry_log())
}

/// One change of the schedules.
#[derive(Serialize, Deserialize)]
pub(crate) enum ScheduleOp {
    /// Store (or replace) a schedule.
    Put(Box<Schedule>),
    /// Remove the schedule of that name.
    Remove(ScheduleName),
}

/// The schedules, as the records say.
#[derive(Default)]
pub(crate) struct ScheduleBook {
    schedules: BTreeMap<ScheduleName, Schedule>,
}

impl Machine for ScheduleBook {
    type Op = ScheduleOp;
    /// Put: whether the schedule is new; remove: whether there was one.
    type Outcome = bool;

    fn apply(&mut self, _position: u64, op: ScheduleOp) -> bool {
        match op {
            ScheduleOp::Put(s) => self.schedules.insert(s.name.clone(), *s).is_none(),
            ScheduleOp::Remove(name) => self.schedules.remove(&name).is_some(),
        }
    }
}

/// The registry's schedules: the log, opened on first use.
pub(crate) struct Schedules {
    log: LazyLog<ScheduleBook>,
}

impl Schedules {
    pub(crate) fn new(link: Arc<Link>, names: &Names) -> Self {
        Schedules {
            log: LazyLog::new(link, stream_name(names)),
        }
    }

    async fn log(&self) -> Result<&Log<ScheduleBook>> {
        self.log.get().await
    }

    /// [`Registry::schedules`](crate::Registry::schedules).
    pub(crate) async fn list(&self) -> Result<Vec<Schedule>> {
        Ok(self
            .log()
            .await?
            .read(|m| m.schedules.values().cloned().collect()))
    }

    /// [`Registry::put_schedule`](crate::Registry::put_schedule).
    pub(crate) async fn put(&self, schedule: &Schedule) -> Result<bool> {
        let op = ScheduleOp::Put(Box::new(schedule.clone()));
        self.log().await?.submit(&op).await
    }

    /// [`Registry::remove_schedule`](crate::Registry::remove_schedule).
    pub(crate) async fn remove(&self, name: &ScheduleName) -> Result<bool> {
        self.log()
            .await?
            .submit(&ScheduleOp::Remove(name.clone()))
            .await
    }
}
