//! In-memory [`Registry`]: a [`TaskTable`] of tasks, whose indexes change in the same critical
//! section as each compare-and-set.

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::model::{Expected, QueueName, Task, TaskId, TaskState};
use crate::queue_limits::{apply_limits, QueueLimits};
use crate::registry::{
    check_transition, conflict, Registry, Retention, StatusCounts, TaskFilter, TaskPage,
};
use crate::schedule::{Schedule, ScheduleName};
use crate::task_table::TaskTable;

/// The in-memory registry.
#[derive(Default)]
pub struct MemoryRegistry {
    table: Mutex<TaskTable<Task>>,
    /// The paused queues.
    paused: Mutex<BTreeSet<QueueName>>,
    /// The limits set at runtime.
    limits: Mutex<BTreeMap<QueueName, QueueLimits>>,
    /// The schedules, by name.
    schedules: Mutex<BTreeMap<ScheduleName, Schedule>>,
}

impl std::fmt::Debug for MemoryRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryRegistry")
            .field("tasks", &self.table.lock().len())
            .finish()
    }
}

impl MemoryRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl Registry for MemoryRegistry {
    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn create(&self, task: &Task) -> Result<()> {
        if self.table.lock().insert(task.clone()) {
            Ok(())
        } else {
            Err(Error::TaskExists(task.task_id.clone()))
        }
    }

    async fn create_many(&self, tasks: &[Task]) -> Result<Vec<Result<()>>> {
        let mut out = Vec::with_capacity(tasks.len());
        for t in tasks {
            out.push(self.create(t).await);
        }
        Ok(out)
    }

    async fn get(&self, id: &TaskId) -> Result<Option<Task>> {
        Ok(self.table.lock().get(id).cloned())
    }

    async fn transition(&self, id: &TaskId, expected: Expected, next: TaskState) -> Result<Task> {
        check_transition(id, &expected, &next)?;
        let mut table = self.table.lock();
        let current = table
            .get(id)
            .ok_or_else(|| Error::TaskNotFound(id.clone()))?;
        if current.state.status != expected.status || current.state.attempt != expected.attempt {
            return Err(conflict(id, &expected, &current.state));
        }
        let (_, updated) = table
            .update(id, |task| task.state = next)
            .ok_or_else(|| Error::TaskNotFound(id.clone()))?;
        Ok(updated.clone())
    }

    async fn list(
        &self,
        filter: &TaskFilter,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<TaskPage> {
        let table = self.table.lock();
        let (tasks, next_cursor) = table.page(filter, cursor, limit)?;
        Ok(TaskPage {
            tasks: tasks.into_iter().cloned().collect(),
            next_cursor,
        })
    }

    async fn counts(&self) -> Result<StatusCounts> {
        Ok(self.table.lock().counts())
    }

    async fn stale_running(&self, before: DateTime<Utc>, limit: usize) -> Result<Vec<Task>> {
        let table = self.table.lock();
        Ok(table.expired(before, limit).into_iter().cloned().collect())
    }

    async fn dependents(&self, parent: &TaskId) -> Result<Vec<TaskId>> {
        Ok(self.table.lock().dependents(parent).to_vec())
    }

    async fn purge_finished(&self, retention: &Retention) -> Result<u64> {
        Ok(self.table.lock().purge(retention, Utc::now()))
    }

    async fn queues(&self) -> Result<Vec<QueueName>> {
        let table = self.table.lock();
        let found: BTreeSet<&QueueName> = table.rows().map(|t| &t.queue).collect();
        Ok(found.into_iter().cloned().collect())
    }

    async fn queue_counts(&self, queue: &QueueName) -> Result<StatusCounts> {
        let mut counts = StatusCounts::default();
        for t in self.table.lock().rows().filter(|t| &t.queue == queue) {
            *counts.0.entry(t.state.status).or_default() += 1;
        }
        Ok(counts)
    }

    async fn paused_queues(&self) -> Result<BTreeSet<QueueName>> {
        Ok(self.paused.lock().clone())
    }

    async fn set_queue_paused(&self, queue: &QueueName, paused: bool) -> Result<bool> {
        let mut set = self.paused.lock();
        Ok(match paused {
            true => set.insert(queue.clone()),
            false => set.remove(queue),
        })
    }

    async fn queue_limits(&self) -> Result<BTreeMap<QueueName, QueueLimits>> {
        Ok(self.limits.lock().clone())
    }

    async fn set_queue_limits(&self, queue: &QueueName, limits: &QueueLimits) -> Result<bool> {
        limits.validate()?;
        Ok(apply_limits(&mut self.limits.lock(), queue, limits))
    }

    async fn schedules(&self) -> Result<Vec<Schedule>> {
        Ok(self.schedules.lock().values().cloned().collect())
    }

    async fn put_schedule(&self, schedule: &Schedule) -> Result<bool> {
        let mut all = self.schedules.lock();
        Ok(all
            .insert(schedule.name.clone(), schedule.clone())
            .is_none())
    }

    async fn remove_schedule(&self, name: &ScheduleName) -> Result<bool> {
        Ok(self.schedules.lock().remove(name).is_some())
    }
}
