//! [`RabbitRegistry`]: tasks as an append-only log in the stream `{prefix}registry`, replayed
//! into an in-process view ([`TaskView`]); compare-and-set decided by log order.
//!
//! * `create` and `transition` append a record and wait until this process's view applies it:
//!   the first valid record wins, later ones get `TaskExists` / `Conflict`, on every replica
//!   alike. One append (publish + confirm) and its delivery back per call.
//! * `get` reads the view. A PENDING or finished copy is returned at once; otherwise (unknown
//!   id, WAITING, RUNNING) the view first catches up with the log's tail
//!   ([`RabbitRegistry::sync`]), so a task created or moved on by another process before the
//!   call is seen as it is now.
//! * `counts`, `list`, `stale_running` and `purge_finished` first [`sync`](RabbitRegistry::sync),
//!   then read the view's indexes (never every task).
//! * A new process loads the latest complete snapshot (stream `{prefix}registry.snapshots`) and
//!   replays the registry log after it, or the whole log when there is none. Snapshots are
//!   written by [`RabbitRegistry::snapshot`], and by `purge_finished` once enough records
//!   accumulated since the last one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use lapin::types::AMQPValue;

use super::link::{short, CachedChannel, Link, BACKEND};
use super::log::{stream_arguments, Log, Writer};
use super::names::Names;
use super::snapshot::{self, Catalog};
use super::view::{RegistryOp, RegistryOutcome, TaskView, Victim};
use crate::error::{Error, Result};
use crate::model::{Expected, Task, TaskId, TaskState, TaskStatus};
use crate::registry::{check_transition, Registry, Retention, StatusCounts, TaskFilter, TaskPage};

/// Tombstones per purge record.
const PURGE_BATCH: usize = 500;
/// `purge_finished` writes a snapshot when this many records were applied since the last one
/// this process knows of.
const SNAPSHOT_EVERY: u64 = 100_000;
/// Snapshots older than this are dropped by the stream's retention (in 8 MB segments); a
/// process that finds none replays the whole registry log.
const SNAPSHOT_MAX_AGE: &str = "7D";
const SNAPSHOT_SEGMENT_BYTES: i64 = 8_000_000;

/// The RabbitMQ [`Registry`]. See the module documentation and docs/backends/rabbitmq.md.
pub struct RabbitRegistry {
    log: Log<TaskView>,
    snapshots: Writer,
    /// Records applied (view counter) when the last snapshot was loaded or written.
    records_at_snapshot: AtomicU64,
    /// Records replayed from the log when this registry opened (after its snapshot, if any).
    replayed: u64,
}

impl std::fmt::Debug for RabbitRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (tasks, records) = self.log.read(|v| (v.table.len(), v.records));
        f.debug_struct("RabbitRegistry")
            .field("log", &self.log)
            .field("tasks", &tasks)
            .field("records_applied", &records)
            .finish()
    }
}

impl RabbitRegistry {
    /// Loads the latest snapshot, replays the registry log after it, and returns once the view
    /// is complete.
    pub(crate) async fn open(link: Arc<Link>, names: &Names) -> Result<Self> {
        let snapshot_args = stream_arguments(&[
            ("x-max-age", AMQPValue::LongString(SNAPSHOT_MAX_AGE.into())),
            (
                "x-stream-max-segment-size-bytes",
                AMQPValue::LongLongInt(SNAPSHOT_SEGMENT_BYTES),
            ),
        ]);
        let catalog = Log::open(
            link.clone(),
            names.registry_snapshots(),
            snapshot_args,
            Catalog::default(),
        )
        .await?;
        let latest = catalog.read_mut(Catalog::take_latest);
        drop(catalog);
        let (view, start) = match latest {
            Some((through, tasks)) => {
                let view = snapshot::restore(tasks);
                tracing::info!(
                    tasks = view.table.len(),
                    through,
                    "registry view loaded from a snapshot"
                );
                (view, Some(through.saturating_add(1)))
            }
            None => (TaskView::default(), None),
        };
        let log = Log::open_from(
            link.clone(),
            names.registry_log(),
            stream_arguments(&[]),
            view,
            start,
        )
        .await?;
        let replayed = log.read(|v| v.records);
        let snapshots = Writer::new(
            short(names.registry_snapshots())?,
            CachedChannel::new(link, true, None),
        );
        Ok(RabbitRegistry {
            log,
            snapshots,
            records_at_snapshot: AtomicU64::new(replayed),
            replayed,
        })
    }

    /// Opens a registry on its own connection (for callers who want the concrete type, for
    /// [`RabbitRegistry::sync`] and [`RabbitRegistry::snapshot`]); `open` with
    /// `Roles { registry: true, .. }` gives the same behind `Arc<dyn Registry>`.
    pub async fn connect(url: &url::Url, opts: &crate::bundle::ConnectOptions) -> Result<Self> {
        let (link, names) = super::link_for(url, opts, "registry")?;
        link.session().await?;
        Self::open(link, &names).await
    }

    /// Writes a snapshot of the view (as of the log's tail now) to the snapshot stream, so that
    /// processes opened later replay only what follows it. Returns the number of tasks written.
    /// Costs one sync, then one confirmed message per 256 kB of task JSON; the view is held
    /// read-locked while it is encoded.
    pub async fn snapshot(&self) -> Result<u64> {
        self.log.sync().await?;
        let cut = self.log.read_at(|view, offset| {
            offset.map(|through| {
                (
                    snapshot::encode(view, through),
                    view.table.len() as u64,
                    view.records,
                )
            })
        });
        let Some((parts, tasks, records)) = cut else {
            return Ok(0); // an empty log: nothing to snapshot
        };
        let parts = parts.map_err(|e| {
            Error::permanent(
                BACKEND,
                format!("cannot encode a registry snapshot: {e}"),
                Some(Box::new(e) as _),
            )
        })?;
        self.snapshots.append(parts).await?;
        self.records_at_snapshot.store(records, Ordering::Relaxed);
        tracing::info!(tasks, "registry snapshot written");
        Ok(tasks)
    }

    /// Records this registry replayed from the log when it opened (after its snapshot, if it
    /// loaded one). Diagnostic.
    pub fn records_replayed_at_open(&self) -> u64 {
        self.replayed
    }

    /// Waits until this process's view contains every change appended to the registry log
    /// (by any process) before the call: after it, `get` is as fresh as a read from the log's
    /// tail. Costs one marker append and its delivery.
    pub async fn sync(&self) -> Result<()> {
        self.log.sync().await
    }

    fn created(id: &TaskId, outcome: Result<RegistryOutcome>) -> Result<()> {
        match outcome? {
            RegistryOutcome::Created => Ok(()),
            RegistryOutcome::Exists => Err(Error::TaskExists(id.clone())),
            other => Err(unexpected(other)),
        }
    }
}

fn unexpected(outcome: RegistryOutcome) -> Error {
    Error::permanent(
        BACKEND,
        format!("unexpected registry log outcome {outcome:?}"),
        None,
    )
}

#[async_trait]
impl Registry for RabbitRegistry {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn create(&self, task: &Task) -> Result<()> {
        let op = RegistryOp::Create { task: task.clone() };
        Self::created(&task.task_id, self.log.submit(&op).await)
    }

    async fn create_many(&self, tasks: &[Task]) -> Result<Vec<Result<()>>> {
        let ops: Vec<RegistryOp> = tasks
            .iter()
            .map(|t| RegistryOp::Create { task: t.clone() })
            .collect();
        let outcomes = self.log.submit_many(&ops).await?;
        Ok(tasks
            .iter()
            .zip(outcomes)
            .map(|(t, o)| Self::created(&t.task_id, o))
            .collect())
    }

    async fn get(&self, id: &TaskId) -> Result<Option<Task>> {
        // PENDING and finished copies are served from the view: a worker about to claim gets
        // its answer from the compare-and-set anyway, and a finished task stays finished. Any
        // other answer (missing, WAITING, RUNNING) may be what a lagging view says about a task
        // that moved on, so the view first catches up with the log's tail.
        let fast = self.log.read(|v| {
            v.table
                .get(id)
                .filter(|t| t.state.status == TaskStatus::Pending || t.state.status.is_terminal())
                .cloned()
        });
        if fast.is_some() {
            return Ok(fast);
        }
        self.log.sync().await?;
        Ok(self.log.read(|v| v.table.get(id).cloned()))
    }

    async fn transition(&self, id: &TaskId, expected: Expected, next: TaskState) -> Result<Task> {
        check_transition(id, &expected, &next)?;
        let to = next.status;
        let op = RegistryOp::Transition {
            id: id.clone(),
            expected,
            next,
        };
        match self.log.submit(&op).await? {
            RegistryOutcome::Transitioned(task) => Ok(*task),
            RegistryOutcome::NotFound => Err(Error::TaskNotFound(id.clone())),
            RegistryOutcome::Conflict { status, attempt } => Err(Error::Conflict {
                task_id: id.clone(),
                expected_status: expected.status,
                expected_attempt: expected.attempt,
                actual_status: status,
                actual_attempt: attempt,
            }),
            RegistryOutcome::Illegal { from } => Err(Error::IllegalTransition {
                task_id: id.clone(),
                from,
                to,
            }),
            other => Err(unexpected(other)),
        }
    }

    async fn list(
        &self,
        filter: &TaskFilter,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<TaskPage> {
        self.log.sync().await?;
        self.log.read(|view| {
            let (tasks, next_cursor) = view.table.page(filter, cursor, limit)?;
            Ok(TaskPage {
                tasks: tasks.into_iter().cloned().collect(),
                next_cursor,
            })
        })
    }

    async fn counts(&self) -> Result<StatusCounts> {
        self.log.sync().await?;
        Ok(self.log.read(|view| view.table.counts()))
    }

    async fn stale_running(&self, before: DateTime<Utc>, limit: usize) -> Result<Vec<Task>> {
        self.log.sync().await?;
        Ok(self.log.read(|view| {
            view.table
                .expired(before, limit)
                .into_iter()
                .cloned()
                .collect()
        }))
    }

    async fn dependents(&self, parent: &TaskId) -> Result<Vec<TaskId>> {
        Ok(self.log.read(|view| view.table.dependents(parent).to_vec()))
    }

    async fn purge_finished(&self, retention: &Retention) -> Result<u64> {
        self.log.sync().await?;
        let now = Utc::now();
        let victims: Vec<Victim> = self.log.read(|view| {
            view.table
                .beyond_retention(retention, now)
                .into_iter()
                .map(|t| Victim {
                    id: t.task_id.clone(),
                    status: t.state.status,
                    attempt: t.state.attempt,
                    updated_at: t.state.updated_at,
                })
                .collect()
        });
        let ops: Vec<RegistryOp> = victims
            .chunks(PURGE_BATCH)
            .map(|c| RegistryOp::Purge {
                victims: c.to_vec(),
            })
            .collect();
        let mut purged = 0;
        for outcome in self.log.submit_many(&ops).await? {
            match outcome? {
                RegistryOutcome::Purged(n) => purged += n,
                other => return Err(unexpected(other)),
            }
        }
        // Retention runs periodically (the monitor's leader): a good moment to compact.
        self.maintain().await?;
        Ok(purged)
    }

    async fn maintain(&self) -> Result<()> {
        let records = self.log.read(|v| v.records);
        if records.saturating_sub(self.records_at_snapshot.load(Ordering::Relaxed))
            >= SNAPSHOT_EVERY
        {
            if let Err(e) = self.snapshot().await {
                tracing::warn!(error = %e, "could not write a registry snapshot; will try again at the next monitor pass");
            }
        }
        Ok(())
    }
}
