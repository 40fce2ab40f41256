//! The registry's state machine: the records of the registry log and the in-process view they
//! build (every task, plus per-status, lease and dependents indexes kept as records apply).
//!
//! Applying is deterministic: it depends only on the view and the record, never on the clock or
//! the process, so every replica reaches the same view and the same outcome for every record.

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::log::Machine;
use crate::model::{Expected, Task, TaskId, TaskState, TaskStatus};

/// One record of the registry log.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RegistryOp {
    /// Register a task; the first create of an id wins.
    Create { task: Task },
    /// A proposed compare-and-set; applied if, at its place in the log, the task is in
    /// `expected`.
    Transition {
        id: TaskId,
        expected: Expected,
        next: TaskState,
    },
    /// Tombstones: each task is deleted if it is still exactly as the purger saw it.
    Purge { victims: Vec<Victim> },
}

/// A task the purger decided to delete, as it saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Victim {
    pub(crate) id: TaskId,
    pub(crate) status: TaskStatus,
    pub(crate) attempt: u32,
    pub(crate) updated_at: DateTime<Utc>,
}

/// What applying a record decided.
#[derive(Debug)]
pub(crate) enum RegistryOutcome {
    Created,
    Exists,
    Transitioned(Box<Task>),
    NotFound,
    Conflict { status: TaskStatus, attempt: u32 },
    Illegal { from: TaskStatus },
    Purged(u64),
}

pub(crate) use crate::index::{slot, IndexKey};

/// The registry view.
#[derive(Default)]
pub(crate) struct TaskView {
    pub(crate) tasks: HashMap<TaskId, Task>,
    /// Per status (in [`TaskStatus::ALL`] order): (updated_at in µs, id).
    pub(crate) by_status: [BTreeSet<IndexKey>; 6],
    /// RUNNING tasks by lease end (µs).
    pub(crate) leases: BTreeSet<IndexKey>,
    pub(crate) dependents: HashMap<TaskId, Vec<TaskId>>,
    /// Records applied (for diagnostics).
    pub(crate) records: u64,
}

pub(crate) fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

impl TaskView {
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

    /// Adds a task read from a snapshot (replacing any copy).
    pub(crate) fn insert_snapshot_task(&mut self, task: Task) {
        self.remove(&task.task_id);
        self.create(task);
    }

    fn create(&mut self, task: Task) -> RegistryOutcome {
        if self.tasks.contains_key(&task.task_id) {
            return RegistryOutcome::Exists;
        }
        self.index(&task);
        for p in &task.depends_on {
            self.dependents
                .entry(p.clone())
                .or_default()
                .push(task.task_id.clone());
        }
        self.tasks.insert(task.task_id.clone(), task);
        RegistryOutcome::Created
    }

    fn transition(&mut self, id: &TaskId, expected: Expected, next: TaskState) -> RegistryOutcome {
        if !expected.status.can_transition_to(next.status) {
            return RegistryOutcome::Illegal {
                from: expected.status,
            };
        }
        let Some(current) = self.tasks.get(id) else {
            return RegistryOutcome::NotFound;
        };
        if current.state.status != expected.status || current.state.attempt != expected.attempt {
            return RegistryOutcome::Conflict {
                status: current.state.status,
                attempt: current.state.attempt,
            };
        }
        let old = current.clone();
        self.unindex(&old);
        let mut updated = old;
        updated.state = next;
        self.index(&updated);
        self.tasks.insert(id.clone(), updated.clone());
        RegistryOutcome::Transitioned(Box::new(updated))
    }

    fn purge(&mut self, victims: Vec<Victim>) -> RegistryOutcome {
        let mut n = 0;
        for v in victims {
            let unchanged = self.tasks.get(&v.id).is_some_and(|t| {
                t.state.status == v.status
                    && t.state.attempt == v.attempt
                    && t.state.updated_at == v.updated_at
            });
            if unchanged {
                self.remove(&v.id);
                n += 1;
            }
        }
        RegistryOutcome::Purged(n)
    }
}

impl Machine for TaskView {
    type Op = RegistryOp;
    type Outcome = RegistryOutcome;

    fn apply(&mut self, _position: u64, op: RegistryOp) -> RegistryOutcome {
        self.records += 1;
        match op {
            RegistryOp::Create { task } => self.create(task),
            RegistryOp::Transition { id, expected, next } => self.transition(&id, expected, next),
            RegistryOp::Purge { victims } => self.purge(victims),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Limits, Priority, QueueName};

    fn task(id: &str) -> Task {
        let mut t = Task::new(
            QueueName::parse("q").expect("queue"),
            serde_json::json!({"n": u64::MAX, "f": -1.5e-7}),
            Priority::DEFAULT,
            3,
            vec![],
            &Limits::default(),
        )
        .expect("task");
        t.task_id = TaskId::parse(id).expect("id");
        t
    }

    fn apply_encoded(view: &mut TaskView, op: &RegistryOp) -> RegistryOutcome {
        let bytes = serde_json::to_vec(op).expect("encode");
        view.apply(0, serde_json::from_slice(&bytes).expect("decode"))
    }

    #[test]
    fn first_create_wins_and_cas_is_decided_in_log_order() {
        let mut view = TaskView::default();
        let t = task("t1");
        assert!(matches!(
            apply_encoded(&mut view, &RegistryOp::Create { task: t.clone() }),
            RegistryOutcome::Created
        ));
        assert!(matches!(
            apply_encoded(&mut view, &RegistryOp::Create { task: t.clone() }),
            RegistryOutcome::Exists
        ));
        let mut next = t.state.clone();
        next.status = TaskStatus::Running;
        next.attempt = 1;
        let claim = RegistryOp::Transition {
            id: t.task_id.clone(),
            expected: t.expect(),
            next,
        };
        match apply_encoded(&mut view, &claim) {
            RegistryOutcome::Transitioned(got) => {
                assert_eq!(got.state.attempt, 1);
                assert_eq!(got.payload, t.payload, "payload survives the log encoding");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            apply_encoded(&mut view, &claim),
            RegistryOutcome::Conflict {
                status: TaskStatus::Running,
                attempt: 1
            }
        ));
        assert_eq!(view.by_status[slot(TaskStatus::Running)].len(), 1);
        assert_eq!(view.by_status[slot(TaskStatus::Pending)].len(), 0);
    }

    #[test]
    fn tombstones_only_delete_tasks_that_did_not_change() {
        let mut view = TaskView::default();
        let t = task("t2");
        view.apply(0, RegistryOp::Create { task: t.clone() });
        let stale = Victim {
            id: t.task_id.clone(),
            status: TaskStatus::Pending,
            attempt: 0,
            updated_at: t.state.updated_at - chrono::Duration::seconds(1),
        };
        assert!(matches!(
            view.apply(
                1,
                RegistryOp::Purge {
                    victims: vec![stale]
                }
            ),
            RegistryOutcome::Purged(0)
        ));
        let exact = Victim {
            id: t.task_id.clone(),
            status: TaskStatus::Pending,
            attempt: 0,
            updated_at: t.state.updated_at,
        };
        assert!(matches!(
            view.apply(
                2,
                RegistryOp::Purge {
                    victims: vec![exact]
                }
            ),
            RegistryOutcome::Purged(1)
        ));
        assert!(view.tasks.is_empty());
        assert!(view.by_status.iter().all(|s| s.is_empty()));
    }
}
