//! In-memory [`Registry`]: a map of tasks plus per-status and lease indexes kept in the same
//! critical section as each compare-and-set.

use std::collections::BTreeSet;

use rustc_hash::FxHashMap as HashMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::index::{self, page, slot, IndexKey, StatusSets};
use crate::model::{Expected, Task, TaskId, TaskState, TaskStatus};
use crate::registry::{
    check_transition, conflict, Registry, Retention, StatusCounts, TaskFilter, TaskPage,
};

#[derive(Default)]
struct State {
    tasks: HashMap<TaskId, Task>,
    /// Per status (in [`TaskStatus::ALL`] order): (updated_at in µs, id).
    by_status: StatusSets,
    /// RUNNING tasks by lease end (µs).
    leases: BTreeSet<IndexKey>,
    dependents: HashMap<TaskId, Vec<TaskId>>,
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

impl State {
    fn index(&mut self, t: &Task) {
        self.by_status[slot(t.state.status)]
            .insert((micros(t.state.updated_at), t.task_id.clone()));
        if t.state.status == TaskStatus::Running {
            let until = t.state.lease_until.map(micros).unwrap_or(i64::MIN);
            self.leases.insert((until, t.task_id.clone()));
        }
    }

    fn unindex(&mut self, t: &Task) {
        self.by_status[slot(t.state.status)]
            .remove(&(micros(t.state.updated_at), t.task_id.clone()));
        if t.state.status == TaskStatus::Running {
            let until = t.state.lease_until.map(micros).unwrap_or(i64::MIN);
            self.leases.remove(&(until, t.task_id.clone()));
        }
    }

    fn remove(&mut self, id: &TaskId) {
        if let Some(t) = self.tasks.remove(id) {
            self.unindex(&t);
            for p in &t.depends_on {
                if let Some(children) = self.dependents.get_mut(p) {
                    children.retain(|c| c != id);
                    if children.is_empty() {
                        self.dependents.remove(p);
                    }
                }
            }
        }
    }
}

/// The in-memory registry.
#[derive(Default)]
pub struct MemoryRegistry {
    state: Mutex<State>,
}

impl std::fmt::Debug for MemoryRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryRegistry")
            .field("tasks", &self.state.lock().tasks.len())
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
        let mut st = self.state.lock();
        if st.tasks.contains_key(&task.task_id) {
            return Err(Error::TaskExists(task.task_id.clone()));
        }
        st.index(task);
        for p in &task.depends_on {
            st.dependents
                .entry(p.clone())
                .or_default()
                .push(task.task_id.clone());
        }
        st.tasks.insert(task.task_id.clone(), task.clone());
        Ok(())
    }

    async fn create_many(&self, tasks: &[Task]) -> Result<Vec<Result<()>>> {
        let mut out = Vec::with_capacity(tasks.len());
        for t in tasks {
            out.push(self.create(t).await);
        }
        Ok(out)
    }

    async fn get(&self, id: &TaskId) -> Result<Option<Task>> {
        Ok(self.state.lock().tasks.get(id).cloned())
    }

    async fn transition(&self, id: &TaskId, expected: Expected, next: TaskState) -> Result<Task> {
        check_transition(id, &expected, &next)?;
        let mut st = self.state.lock();
        let current = st
            .tasks
            .get(id)
            .ok_or_else(|| Error::TaskNotFound(id.clone()))?;
        if current.state.status != expected.status || current.state.attempt != expected.attempt {
            return Err(conflict(id, &expected, &current.state));
        }
        let old = current.clone();
        st.unindex(&old);
        let task = st.tasks.get_mut(id).expect("present");
        task.state = next;
        let updated = task.clone();
        st.index(&updated);
        Ok(updated)
    }

    async fn list(
        &self,
        filter: &TaskFilter,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<TaskPage> {
        let st = self.state.lock();
        let (ids, next_cursor) = page(&st.by_status, filter.status, cursor, limit, |id| {
            st.tasks
                .get(id)
                .is_some_and(|t| filter.queue.as_ref().is_none_or(|q| *q == t.queue))
        })?;
        let tasks = ids
            .iter()
            .filter_map(|id| st.tasks.get(id).cloned())
            .collect();
        Ok(TaskPage { tasks, next_cursor })
    }

    async fn counts(&self) -> Result<StatusCounts> {
        Ok(index::counts(&self.state.lock().by_status))
    }

    async fn stale_running(&self, before: DateTime<Utc>, limit: usize) -> Result<Vec<Task>> {
        let st = self.state.lock();
        Ok(index::expired(&st.leases, before, limit)
            .iter()
            .filter_map(|id| st.tasks.get(id).cloned())
            .collect())
    }

    async fn dependents(&self, parent: &TaskId) -> Result<Vec<TaskId>> {
        Ok(self
            .state
            .lock()
            .dependents
            .get(parent)
            .cloned()
            .unwrap_or_default())
    }

    async fn purge_finished(&self, retention: &Retention) -> Result<u64> {
        let mut st = self.state.lock();
        let doomed = index::beyond_retention(&st.by_status, retention, Utc::now());
        for id in &doomed {
            st.remove(id);
        }
        Ok(doomed.len() as u64)
    }
}
