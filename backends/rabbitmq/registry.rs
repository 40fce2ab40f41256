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
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use lapin::types::AMQPValue;

use super::link::{short, CachedChannel, Link, BACKEND};
use super::log::{stream_arguments, Log, Start, Writer};
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
/// How far back a new process looks for the latest snapshot, widening until a window holds a
/// complete one (`None`: the whole stream, which keeps [`SNAPSHOT_MAX_AGE`]).
const SNAPSHOT_WINDOWS: [Option<Duration>; 3] = [
    Some(Duration::from_secs(15 * 60)),
    Some(Duration::from_secs(24 * 3600)),
    None,
];

/// The RabbitMQ [`Registry`]. See the module documentation and docs/backends/rabbitmq.md.
pub struct RabbitRegistry {
    log: Log<TaskView>,
    snapshots: Writer,
    /// Records applied (view counter) when this process last wrote a snapshot (0 at open: the
    /// view counts only records applied after the snapshot it loaded).
    records_at_snapshot: AtomicU64,
    /// Records replayed from the log when this registry opened (after its snapshot, if any).
    replayed: u64,
    /// Snapshot parts read when this registry opened (the snapshot loaded, and any other
    /// snapshot written in the window read to find it).
    snapshot_parts_read: u64,
    /// The paused queues (control.rs).
    control: super::control::Pauses,
    /// The schedules (schedules.rs).
    schedules: super::schedules::Schedules,
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
        let (latest, snapshot_parts_read) =
            load_latest_snapshot(&link, names, &SNAPSHOT_WINDOWS).await?;
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
        let control = super::control::Pauses::new(link.clone(), names);
        let schedules = super::schedules::Schedules::new(link.clone(), names);
        let snapshots = Writer::new(
            short(names.registry_snapshots())?,
            CachedChannel::new(link, true, None),
        );
        Ok(RabbitRegistry {
            log,
            snapshots,
            // Records replayed after the loaded snapshot count towards the next one: a monitor
            // that opens on a long log writes a snapshot at its first pass.
            records_at_snapshot: AtomicU64::new(0),
            replayed,
            snapshot_parts_read,
            control,
            schedules,
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

    /// Snapshot parts this registry read when it opened: the latest snapshot's, plus those of
    /// other snapshots written in the time window it read. Diagnostic.
    pub fn snapshot_parts_read_at_open(&self) -> u64 {
        self.snapshot_parts_read
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

fn snapshot_arguments() -> lapin::types::FieldTable {
    stream_arguments(&[
        ("x-max-age", AMQPValue::LongString(SNAPSHOT_MAX_AGE.into())),
        (
            "x-stream-max-segment-size-bytes",
            AMQPValue::LongLongInt(SNAPSHOT_SEGMENT_BYTES),
        ),
    ])
}

/// The latest complete snapshot (the log offset it runs through, its tasks) and the number of
/// snapshot parts read to find it. The snapshot stream keeps a week of snapshots: it is read
/// from a timestamp, `windows[0]` back from now, widening to the next window until one holds a
/// complete snapshot (`None`: the whole stream), so a new process reads the latest snapshot and
/// those written shortly before it, not every snapshot of the week.
async fn load_latest_snapshot(
    link: &Arc<Link>,
    names: &Names,
    windows: &[Option<Duration>],
) -> Result<(Option<(u64, Vec<serde_json::Value>)>, u64)> {
    let now = u64::try_from(Utc::now().timestamp()).unwrap_or(0);
    let mut parts_read = 0;
    for (n, window) in windows.iter().enumerate() {
        let start = match window {
            Some(w) => Start::Since(now.saturating_sub(w.as_secs())),
            None => Start::First,
        };
        let catalog = match Log::open_at(
            link.clone(),
            names.registry_snapshots(),
            snapshot_arguments(),
            Catalog::default(),
            None,
            start,
        )
        .await
        {
            Ok(catalog) => catalog,
            // Snapshots only spare a replay: when their stream cannot be read now, the caller
            // replays the registry log from its first record, which is slower but complete.
            Err(e) if e.is_temporary() => {
                tracing::warn!(error = %e, "the snapshot stream could not be read; replaying the registry log from its start");
                return Ok((None, parts_read));
            }
            Err(e) => return Err(e),
        };
        parts_read += catalog.read(|c| c.parts_read);
        if catalog.read(Catalog::has_latest) || window.is_none() || n + 1 == windows.len() {
            return Ok((catalog.read_mut(Catalog::take_latest), parts_read));
        }
    }
    Ok((None, parts_read))
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

    // The operator's controls: control.rs.
    async fn paused_queues(&self) -> Result<std::collections::BTreeSet<crate::model::QueueName>> {
        self.control.paused().await
    }
    async fn set_queue_paused(
        &self,
        queue: &crate::model::QueueName,
        paused: bool,
    ) -> Result<bool> {
        self.control.set(queue, paused).await
    }
    async fn queue_limits(
        &self,
    ) -> Result<std::collections::BTreeMap<crate::model::QueueName, crate::queue_limits::QueueLimits>>
    {
        self.control.limits().await
    }
    async fn set_queue_limits(
        &self,
        queue: &crate::model::QueueName,
        limits: &crate::queue_limits::QueueLimits,
    ) -> Result<bool> {
        self.control.set_limits(queue, limits).await
    }

    // Schedules: schedules.rs.
    async fn schedules(&self) -> Result<Vec<crate::schedule::Schedule>> {
        self.schedules.list().await
    }
    async fn put_schedule(&self, schedule: &crate::schedule::Schedule) -> Result<bool> {
        self.schedules.put(schedule).await
    }
    async fn remove_schedule(&self, name: &crate::schedule::ScheduleName) -> Result<bool> {
        self.schedules.remove(name).await
    }
}

#[cfg(test)]
#[cfg(feature = "testkit")]
mod tests {
    use super::*;
    use crate::model::{Limits, Priority, QueueName};
    use crate::testkit::harness::{broker_url, unique_prefix, BrokerKind};

    fn task(i: usize) -> Task {
        let mut t = Task::new(
            QueueName::parse("q").expect("queue"),
            serde_json::json!({"blob": "x".repeat(2000), "i": i}),
            Priority::DEFAULT,
            3,
            vec![],
            &Limits::default(),
        )
        .expect("task");
        t.task_id = TaskId::parse(&format!("snap_{i}")).expect("id");
        t
    }

    /// A new process looks for the latest snapshot in the recent end of the snapshot stream
    /// (from a timestamp), not in every snapshot the stream keeps: with an older snapshot
    /// outside the window, it reads only the newer one's parts.
    #[tokio::test]
    async fn the_latest_snapshot_is_found_without_reading_older_ones() {
        let prefix = unique_prefix("snap_window");
        let url = url::Url::parse(&broker_url(BrokerKind::Amqp).await).expect("test URL");
        let opts = crate::bundle::ConnectOptions {
            prefix: prefix.clone(),
            ..Default::default()
        };
        let (link, names) = super::super::link_for(&url, &opts, "snapshot-test").expect("link");
        let registry = RabbitRegistry::open(link.clone(), &names)
            .await
            .expect("open");
        let tasks: Vec<Task> = (0..300).map(task).collect();
        registry.create_many(&tasks[..200]).await.expect("create");
        registry.snapshot().await.expect("first snapshot");
        // The stream's timestamps are in seconds: the second snapshot is written 3 s later.
        tokio::time::sleep(Duration::from_secs(3)).await;
        registry.create_many(&tasks[200..]).await.expect("create");
        registry.snapshot().await.expect("second snapshot");
        let window = [Some(Duration::from_secs(2)), None];
        let (recent, recent_parts) = load_latest_snapshot(&link, &names, &window)
            .await
            .expect("load from the window");
        let (all, all_parts) = load_latest_snapshot(&link, &names, &[None])
            .await
            .expect("load from the start");
        drop(registry);
        let session = link.session().await.expect("session");
        let ch = session.channel(false).await.expect("channel");
        for stream in [names.registry_log(), names.registry_snapshots()] {
            let _ = ch
                .queue_delete(stream.as_str().into(), Default::default())
                .await;
        }
        let (recent_through, recent_tasks) = recent.expect("a snapshot in the window");
        let (all_through, all_tasks) = all.expect("a snapshot in the stream");
        assert_eq!(
            recent_through, all_through,
            "both found the same, latest snapshot"
        );
        assert_eq!(recent_tasks.len(), 300);
        assert_eq!(all_tasks.len(), 300);
        assert!(
            recent_parts < all_parts,
            "the window read {recent_parts} parts, the whole stream {all_parts}"
        );
    }
}
