//! The [`Monitor`]: the lab's SystemMonitor, made safe. It counts tasks by status, recovers
//! RUNNING tasks whose lease ended, moves stuck WAITING tasks on, re-announces PENDING tasks
//! that have waited too long (a dispatcher that died between registering and announcing), and
//! enforces retention. Several monitors may run; only the holder of the `monitor` lock acts.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::watch;

use crate::bundle::Backends;
use crate::error::{Error, Result};
use crate::lock::Lease;
use crate::model::{TaskState, TaskStatus};
use crate::registry::{Retention, StatusCounts, TaskFilter};

use super::flow;
use super::schedule::{SchedulePass, Scheduler};

/// How a monitor behaves.
#[derive(Clone, Debug, PartialEq)]
pub struct MonitorConfig {
    /// This monitor's id (the lock owner name).
    pub monitor_id: String,
    /// Time between passes.
    pub interval: Duration,
    /// The lock that elects the acting monitor.
    pub lock_key: String,
    /// Re-announce PENDING tasks unchanged for longer than this whose queue holds no message
    /// at all (their message was lost) (`None`: never).
    pub reannounce_pending_after: Option<Duration>,
    /// Retention of finished tasks (`None` fields: keep forever).
    pub retention: Retention,
    /// Most tasks handled per kind per pass.
    pub batch: usize,
    /// How late a schedule's occurrence may be fired as on time (default 60 s; at least four
    /// intervals are used, the time a standby monitor takes to act after the acting one
    /// died). Older ones are late: their schedule's [`CatchUp`](crate::CatchUp) decides.
    pub schedule_grace: Duration,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        MonitorConfig {
            monitor_id: format!("monitor-{}", std::process::id()),
            interval: Duration::from_secs(5),
            lock_key: "monitor".into(),
            reannounce_pending_after: Some(Duration::from_secs(600)),
            retention: Retention::default(),
            batch: 500,
            schedule_grace: Duration::from_secs(60),
        }
    }
}

/// The longest `monitor.interval`: its lock's TTL, three intervals, must fit every backend's
/// longest lock (NATS: 23 hours).
pub const MAX_INTERVAL: Duration = Duration::from_secs(7 * 3600);

impl MonitorConfig {
    /// Checks the numbers; errors name the key.
    pub fn validate(&self) -> Result<()> {
        // At most 7 hours: the monitor lock is held for three intervals (a monitor that stops
        // for good keeps every other one on standby that long), and NATS keeps a lock at most
        // 23 hours.
        if self.interval < Duration::from_millis(10) || self.interval > MAX_INTERVAL {
            return Err(Error::config(
                "monitor.interval",
                format!(
                    "must be between 10ms and 7h, got {}",
                    crate::clock::format_duration(self.interval)
                ),
            ));
        }
        if self.batch == 0 {
            return Err(Error::config("monitor.batch", "must be at least 1"));
        }
        crate::lock::validate_lock_key(&self.lock_key)
            .map_err(|e| Error::config("monitor.lock_key", e.to_string()))
    }
}

/// What one pass saw and did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MonitorReport {
    /// Tasks per status.
    pub counts: StatusCounts,
    /// Whether this monitor held the lock and acted.
    pub leader: bool,
    /// Stale RUNNING tasks handed back for another attempt.
    pub recovered: u64,
    /// Stale RUNNING tasks failed because their attempts were spent.
    pub timed_out: u64,
    /// WAITING tasks moved on (queued or failed).
    pub unblocked: u64,
    /// PENDING tasks re-announced.
    pub reannounced: u64,
    /// Finished tasks deleted by retention.
    pub purged: u64,
    /// Schedules' occurrences dispatched.
    pub scheduled: u64,
    /// Schedules' late occurrences skipped by their catch-up policy.
    pub skipped_occurrences: u64,
}

/// Watches the registry and repairs what crashed workers and dispatchers left behind.
#[derive(Clone, Debug)]
pub struct Monitor {
    backends: Backends,
    config: MonitorConfig,
    lease: Arc<tokio::sync::Mutex<Option<Lease>>>,
    scheduler: Arc<Scheduler>,
}

impl Monitor {
    /// A monitor over `backends`.
    pub fn new(backends: Backends, config: MonitorConfig) -> Self {
        Monitor {
            backends,
            config,
            lease: Arc::new(tokio::sync::Mutex::new(None)),
            scheduler: Arc::default(),
        }
    }

    /// Counts by status (any monitor may report; no lock needed).
    pub async fn snapshot(&self) -> Result<StatusCounts> {
        self.backends.registry.counts().await
    }

    async fn lead(&self) -> Result<bool> {
        let ttl = self
            .config
            .interval
            .saturating_mul(3)
            .max(Duration::from_secs(1));
        let mut held = self.lease.lock().await;
        if let Some(lease) = held.as_ref() {
            match self.backends.locks.extend(lease, ttl).await {
                Ok(l) => {
                    *held = Some(l);
                    return Ok(true);
                }
                Err(Error::NotLockOwner { .. }) => {
                    tracing::warn!(monitor_id = %self.config.monitor_id, "lost the monitor lock");
                    *held = None;
                }
                Err(e) => return Err(e),
            }
        }
        let got = self
            .backends
            .locks
            .acquire(&self.config.lock_key, &self.config.monitor_id, ttl)
            .await?;
        let leader = got.is_some();
        if let Some(l) = &got {
            tracing::info!(monitor_id = %self.config.monitor_id, fencing_token = l.fencing_token, "acting monitor");
        }
        *held = got;
        Ok(leader)
    }

    /// Releases the monitor lock if this monitor holds it, so that another monitor acts at once
    /// instead of after the lock's TTL (three intervals). For a monitor driven by
    /// [`tick`](Self::tick) that stops: [`start`](Self::start)'s loop does it on shutdown.
    pub async fn step_down(&self) -> Result<()> {
        match self.lease.lock().await.take() {
            Some(lease) => match self.backends.locks.release(&lease).await {
                Ok(_) | Err(Error::NotLockOwner { .. }) => Ok(()),
                Err(e) => Err(e),
            },
            None => Ok(()),
        }
    }

    /// One pass: counts, and if this monitor holds the lock, recovery, unblocking,
    /// re-announcing and retention.
    pub async fn tick(&self) -> Result<MonitorReport> {
        let mut report = MonitorReport {
            leader: self.lead().await?,
            ..Default::default()
        };
        if report.leader {
            // Schedules that cannot be read do not hold the repairs back.
            match self.fire_schedules(Utc::now()).await {
                Ok(fired) => {
                    report.scheduled = fired.fired;
                    report.skipped_occurrences = fired.skipped;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not read the schedules; trying again next pass")
                }
            }
            self.recover_stale(&mut report).await?;
            self.unblock_waiting(&mut report).await?;
            self.reannounce_pending(&mut report).await?;
            let r = &self.config.retention;
            if r.max_age.is_some() || r.max_count.is_some() {
                report.purged = self.backends.registry.purge_finished(r).await?;
            }
            // Snapshots and the like, retention or not (RabbitMQ's view was never snapshotted
            // without one, and every new process replayed the whole log).
            self.backends.registry.maintain().await?;
        } else {
            // Another monitor acts: what this one handled of the schedules may be old when
            // it acts again.
            self.scheduler.forget();
        }
        report.counts = self.snapshot().await?;
        Ok(report)
    }

    /// Dispatches the schedules' occurrences due at `now` (docs/design.md, "Schedules"), as
    /// the acting monitor does at the start of every pass, with this monitor's memory of what
    /// it handled. It does not check the monitor lock: dispatching an occurrence twice is
    /// harmless (its task id is fixed), only wasted work. Public for tests and for a service
    /// that keeps its own clock.
    pub async fn fire_schedules(&self, now: DateTime<Utc>) -> Result<SchedulePass> {
        let grace = self
            .config
            .schedule_grace
            .max(self.config.interval.saturating_mul(4));
        self.scheduler.fire_due(&self.backends, now, grace).await
    }

    async fn recover_stale(&self, report: &mut MonitorReport) -> Result<()> {
        let b = &self.backends;
        let stale = b
            .registry
            .stale_running(Utc::now(), self.config.batch)
            .await?;
        for listed in stale {
            // Read again before acting: the stale query may lag (NATS answers it from an
            // in-process view), and a heartbeat keeps the status and attempt the
            // compare-and-set checks, so only a fresh read tells a renewed lease.
            let Some(task) = b.registry.get(&listed.task_id).await? else {
                continue;
            };
            let now = Utc::now();
            if task.state.status != TaskStatus::Running || !task.lease_expired(now) {
                continue; // renewed or finished meanwhile
            }
            let retry = task.attempts_left();
            let who = task.state.worker_id.as_deref().unwrap_or("?");
            let next = if retry {
                TaskState {
                    status: TaskStatus::Pending,
                    error: Some(format!(
                        "lease expired on attempt {} (worker {who} died or hung); handed back",
                        task.state.attempt
                    )),
                    lease_until: None,
                    updated_at: now,
                    ..task.state.clone()
                }
            } else {
                TaskState {
                    status: TaskStatus::Failed,
                    error: Some(format!(
                        "timeout: lease expired on attempt {} of {} (worker {who} died or hung)",
                        task.charged_attempts(),
                        task.max_attempts
                    )),
                    lease_until: None,
                    finished_at: Some(now),
                    updated_at: now,
                    ..task.state.clone()
                }
            };
            let updated = match b
                .registry
                .transition(&task.task_id, task.expect(), next)
                .await
            {
                Ok(t) => t,
                Err(Error::Conflict { .. }) => continue, // renewed or finished meanwhile
                Err(e) => return Err(e),
            };
            crate::bus::publish_event(b.bus.as_ref(), &updated).await;
            if retry {
                tracing::warn!(task_id = %task.task_id, attempt = task.state.attempt, worker = who, "stale task recovered");
                flow::announce(b, &updated, Duration::ZERO).await?;
                report.recovered += 1;
            } else {
                tracing::warn!(task_id = %task.task_id, "stale task failed: attempts spent");
                flow::parent_finished(b, &updated).await?;
                report.timed_out += 1;
            }
        }
        Ok(())
    }

    async fn unblock_waiting(&self, report: &mut MonitorReport) -> Result<()> {
        let b = &self.backends;
        let filter = TaskFilter {
            status: Some(TaskStatus::Waiting),
            queue: None,
        };
        let page = b.registry.list(&filter, None, self.config.batch).await?;
        for task in page.tasks {
            flow::resolve_waiting(b, &task).await?;
            if let Some(t) = b.registry.get(&task.task_id).await? {
                if t.state.status != TaskStatus::Waiting {
                    report.unblocked += 1;
                }
            }
        }
        Ok(())
    }

    async fn reannounce_pending(&self, report: &mut MonitorReport) -> Result<()> {
        let Some(after) = self.config.reannounce_pending_after else {
            return Ok(());
        };
        let b = &self.backends;
        let cutoff = crate::clock::before(Utc::now(), after);
        let filter = TaskFilter {
            status: Some(TaskStatus::Pending),
            queue: None,
        };
        let page = b.registry.list(&filter, None, self.config.batch).await?;
        let mut idle_queues: std::collections::HashMap<crate::model::QueueName, bool> =
            Default::default();
        for task in page.tasks {
            if task.state.updated_at > cutoff {
                break; // the index is ordered by last change: the rest are younger
            }
            if task.state.ready_at.is_some_and(|r| r > cutoff) {
                continue; // its message is delayed (a dispatch delay, a retry's backoff)
            }
            // A PENDING task is orphaned (its message was lost, e.g. the dispatcher died between
            // registering and announcing) only if its queue holds no message at all: with
            // messages waiting, delayed or in flight, one of them may be its own.
            let idle = match idle_queues.get(&task.queue) {
                Some(idle) => *idle,
                None => {
                    let s = b.bus.stats(&task.queue).await?;
                    let idle = s.waiting == 0 && s.in_flight == 0;
                    idle_queues.insert(task.queue.clone(), idle);
                    idle
                }
            };
            if !idle {
                continue;
            }
            let next = TaskState {
                updated_at: Utc::now(),
                ..task.state.clone()
            };
            match b
                .registry
                .transition(&task.task_id, task.expect(), next)
                .await
            {
                Ok(t) => {
                    tracing::warn!(task_id = %t.task_id, "re-announcing a PENDING task whose message was lost");
                    flow::announce(b, &t, Duration::ZERO).await?;
                    report.reannounced += 1;
                }
                Err(Error::Conflict { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Runs passes every `interval` until the handle is shut down; each report goes to
    /// `on_report`.
    pub fn start(
        self,
        on_report: impl Fn(&MonitorReport) + Send + Sync + 'static,
    ) -> Result<MonitorHandle> {
        self.config.validate()?;
        let (stop_tx, mut stop_rx) = watch::channel(false);
        let monitor = self.clone();
        let join = tokio::spawn(async move {
            let mut every = tokio::time::interval(monitor.config.interval);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop_rx.changed() => break,
                    _ = every.tick() => {}
                }
                match monitor.tick().await {
                    Ok(r) => {
                        tracing::info!(counts = %r.counts, leader = r.leader, recovered = r.recovered, timed_out = r.timed_out, "monitor pass");
                        on_report(&r);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "monitor pass failed; trying again next interval")
                    }
                }
            }
            if let Err(e) = monitor.step_down().await {
                tracing::warn!(error = %e, "could not release the monitor lock; it ends with its TTL");
            }
        });
        Ok(MonitorHandle { stop_tx, join })
    }
}

/// A running monitor.
#[derive(Debug)]
pub struct MonitorHandle {
    stop_tx: watch::Sender<bool>,
    join: tokio::task::JoinHandle<()>,
}

impl MonitorHandle {
    /// Stops after the current pass and releases the lock.
    pub async fn shutdown(self) {
        let _ = self.stop_tx.send(true);
        let _ = self.join.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::tests::Wrapped;
    use std::sync::atomic::Ordering;

    /// The acting monitor gives the registry its housekeeping on every pass, with no retention
    /// set (RabbitMQ's snapshots used to be written only from a retention's purge).
    #[tokio::test]
    async fn every_acting_pass_maintains_the_registry_without_a_retention() {
        let b = Backends::memory();
        let registry = Arc::new(Wrapped::new(b.registry.clone()));
        let b = Backends::new(b.bus.clone(), registry.clone(), b.locks.clone());
        let monitor = Monitor::new(b, MonitorConfig::default());
        assert!(monitor.config.retention.max_age.is_none());
        assert!(monitor.config.retention.max_count.is_none());
        for _ in 0..3 {
            assert!(monitor.tick().await.unwrap().leader);
        }
        assert_eq!(registry.maintained.load(Ordering::Relaxed), 3);
    }

    /// A stale query that lags (it lists a task whose lease a heartbeat has just renewed) does
    /// not make the monitor hand a live task on: it reads the task again first. The heartbeat
    /// keeps the status and attempt, so the compare-and-set alone would not notice.
    #[tokio::test]
    async fn a_lagging_stale_query_does_not_hand_a_renewed_task_on() {
        let mem = Backends::memory();
        let registry = Arc::new(Wrapped::new(mem.registry.clone()));
        let b = Backends::new(mem.bus.clone(), registry.clone(), mem.locks.clone());
        let task = crate::model::Task::new(
            crate::model::QueueName::parse("q").unwrap(),
            serde_json::json!({}),
            crate::model::Priority::default(),
            3,
            vec![],
            &crate::model::Limits::default(),
        )
        .unwrap();
        b.registry.create(&task).await.unwrap();
        let past = Utc::now() - chrono::Duration::seconds(10);
        let mut s = task.state.clone();
        s.status = TaskStatus::Running;
        s.attempt = 1;
        s.lease_until = Some(past);
        let expired = b
            .registry
            .transition(&task.task_id, task.expect(), s)
            .await
            .unwrap();
        // The heartbeat renews the lease; the stale query still lists the expired copy.
        let mut s = expired.state.clone();
        s.lease_until = Some(Utc::now() + chrono::Duration::seconds(30));
        b.registry
            .transition(&task.task_id, expired.expect(), s)
            .await
            .unwrap();
        *registry.stale.lock() = Some(vec![expired.clone()]);
        let monitor = Monitor::new(b.clone(), MonitorConfig::default());
        let report = monitor.tick().await.unwrap();
        assert_eq!(report.recovered, 0, "{report:?}");
        let now = b.registry.get(&task.task_id).await.unwrap().unwrap();
        assert_eq!(now.state.status, TaskStatus::Running);
        assert_eq!(now.state.attempt, 1);
        // Once the lease really ends, the same listing is acted on.
        let mut s = now.state.clone();
        s.lease_until = Some(past);
        b.registry
            .transition(&task.task_id, now.expect(), s)
            .await
            .unwrap();
        let report = monitor.tick().await.unwrap();
        assert_eq!(report.recovered, 1, "{report:?}");
    }
}
