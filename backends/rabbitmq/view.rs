//! The registry's state machine: the records of the registry log and the in-process view they
//! build (a [`TaskTable`] of every task, whose indexes are kept as records apply).
//!
//! Applying is deterministic: it depends only on the view and the record, never on the clock or
//! the process, so every replica reaches the same view and the same outcome for every record.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::log::Machine;
use crate::model::{Expected, Task, TaskId, TaskState, TaskStatus};
use crate::task_table::TaskTable;

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

/// The registry view.
#[derive(Default)]
pub(crate) struct TaskView {
    /// Every task, with its indexes.
    pub(crate) table: TaskTable<Task>,
    /// Records applied (for diagnostics).
    pub(crate) records: u64,
}

impl TaskView {
    /// Adds a task read from a snapshot (replacing any copy).
    pub(crate) fn insert_snapshot_task(&mut self, task: Task) {
        self.table.upsert(task);
    }

    fn create(&mut self, task: Task) -> RegistryOutcome {
        if self.table.insert(task) {
            RegistryOutcome::Created
        } else {
            RegistryOutcome::Exists
        }
    }

    fn transition(&mut self, id: &TaskId, expected: Expected, next: TaskState) -> RegistryOutcome {
        if !expected.status.can_transition_to(next.status) {
            return RegistryOutcome::Illegal {
                from: expected.status,
            };
        }
        let Some(current) = self.table.get(id) else {
            return RegistryOutcome::NotFound;
        };
        if current.state.status != expected.status || current.state.attempt != expected.attempt {
            return RegistryOutcome::Conflict {
                status: current.state.status,
                attempt: current.state.attempt,
            };
        }
        match self.table.update(id, |task| task.state = next) {
            Some((_, updated)) => RegistryOutcome::Transitioned(Box::new(updated.clone())),
            None => RegistryOutcome::NotFound,
        }
    }

    fn purge(&mut self, victims: Vec<Victim>) -> RegistryOutcome {
        let mut n = 0;
        for v in victims {
            let unchanged = self.table.get(&v.id).is_some_and(|t| {
                t.state.status == v.status
                    && t.state.attempt == v.attempt
                    && t.state.updated_at == v.updated_at
            });
            if unchanged {
                self.table.remove(&v.id);
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
        assert_eq!(view.table.counts().get(TaskStatus::Running), 1);
        assert_eq!(view.table.counts().get(TaskStatus::Pending), 0);
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
        assert_eq!(
            view.table,
            TaskTable::default(),
            "no index entry left behind"
        );
    }
}
