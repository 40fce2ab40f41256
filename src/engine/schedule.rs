//! Schedules in the engine: [`Schedules`], the library's way to add, list, pause and remove
//! them, and the scheduler the acting [`Monitor`](super::Monitor) runs on every pass.
//!
//! Each occurrence is dispatched with the task id [`Schedule::task_id`] derives from the
//! schedule's name and the occurrence's time, and a dispatch is idempotent by id
//! ([`DispatchOptions::task_id`]): a second monitor, or one that crashed mid-dispatch and came
//! back, dispatching the same occurrence gets the same task. The scheduler remembers, in
//! memory, the last occurrence it handled of each schedule; a monitor that has just become
//! the acting one knows nothing yet and finds it from the registry: the most recent
//! occurrence whose task exists (dispatched again, which finishes a dispatch its predecessor
//! may have left half done). What is older than the grace is late, and the schedule's
//! [`CatchUp`](crate::schedule::CatchUp) decides about it.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use serde::Serialize;

use crate::bundle::Backends;
use crate::error::{Error, Result};
use crate::schedule::{Schedule, ScheduleName, MAX_CATCH_UP};

use super::dispatcher::{DispatchOptions, Dispatcher};

/// Adds, lists, pauses and removes the [`Schedule`]s of a namespace (stored in the registry:
/// [`Registry::put_schedule`](crate::Registry::put_schedule)). The acting monitor fires them.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use agent_orchestra::engine::Schedules;
/// use agent_orchestra::schedule::{Recurrence, Schedule};
/// use agent_orchestra::Backends;
///
/// let schedules = Schedules::new(Backends::memory());
/// let every_5_min = Schedule::new("digest", Recurrence::cron("*/5 * * * *")?, "digests",
///     serde_json::json!({"kind": "digest"}))?;
/// assert!(schedules.add(every_5_min).await?, "a new schedule");
/// let listed = schedules.list().await?;
/// assert_eq!(listed[0].schedule.name.as_str(), "digest");
/// assert!(listed[0].next_at.is_some());
/// assert!(schedules.remove("digest").await?);
/// assert!(schedules.list().await?.is_empty());
/// # Ok::<(), agent_orchestra::Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone, Debug)]
pub struct Schedules {
    dispatcher: Dispatcher,
}

/// A stored schedule and when it fires next.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ScheduleInfo {
    /// The schedule.
    #[serde(flatten)]
    pub schedule: Schedule,
    /// Its next occurrence after now (`None` while paused).
    pub next_at: Option<DateTime<Utc>>,
}

impl Schedules {
    /// The schedules of `backends`' namespace.
    pub fn new(backends: Backends) -> Self {
        Schedules {
            dispatcher: Dispatcher::new(backends),
        }
    }

    /// Stores `schedule` (replacing one of the same name), stamped with the time now: only
    /// occurrences after now are fired. Returns whether it is new. Checks it first, and that
    /// its task could be dispatched (queue, priority, payload size, attempts):
    /// [`Error::InvalidInput`]. A backend that cannot store schedules:
    /// [`Error::Unsupported`].
    pub async fn add(&self, mut schedule: Schedule) -> Result<bool> {
        schedule.validate()?;
        self.dispatcher.build(
            schedule.queue.as_str(),
            schedule.payload.clone(),
            i64::from(schedule.priority.get()),
            &options(&schedule, None),
        )?;
        schedule.updated_at = Utc::now();
        self.registry().put_schedule(&schedule).await
    }

    /// Every schedule, sorted by name, with its next occurrence.
    pub async fn list(&self) -> Result<Vec<ScheduleInfo>> {
        let now = Utc::now();
        Ok(self
            .registry()
            .schedules()
            .await?
            .into_iter()
            .map(|s| ScheduleInfo {
                next_at: (!s.paused).then(|| s.next_after(now)).flatten(),
                schedule: s,
            })
            .collect())
    }

    /// The schedule named `name`, if any.
    pub async fn get(&self, name: &str) -> Result<Option<Schedule>> {
        let name = ScheduleName::parse(name)?;
        let all = self.registry().schedules().await?;
        Ok(all.into_iter().find(|s| s.name == name))
    }

    /// Deletes the schedule named `name`; returns whether there was one. The tasks it already
    /// dispatched stay.
    pub async fn remove(&self, name: &str) -> Result<bool> {
        self.registry()
            .remove_schedule(&ScheduleName::parse(name)?)
            .await
    }

    /// Pauses (or resumes) the schedule named `name`: a paused schedule fires nothing, and
    /// what would have fired while it was paused is never fired (a resume is stored as a
    /// change, and only occurrences after a change fire). Returns whether the flag changed;
    /// [`Error::InvalidInput`] when there is no such schedule.
    pub async fn set_paused(&self, name: &str, paused: bool) -> Result<bool> {
        let Some(schedule) = self.get(name).await? else {
            return Err(Error::invalid(
                "schedule",
                format!("there is no schedule named {name:?}"),
            ));
        };
        if schedule.paused == paused {
            return Ok(false);
        }
        self.add(schedule.with_paused(paused)).await?;
        Ok(true)
    }

    /// Replaces the input limits a schedule's task is checked against when it is added.
    pub fn with_limits(mut self, limits: crate::model::Limits) -> Self {
        self.dispatcher = self.dispatcher.with_limits(limits);
        self
    }

    fn registry(&self) -> &dyn crate::Registry {
        self.dispatcher.backends().registry.as_ref()
    }
}

/// The dispatch options of one occurrence (`at`), or of none (to validate the schedule).
fn options(schedule: &Schedule, at: Option<DateTime<Utc>>) -> DispatchOptions {
    let mut o = DispatchOptions {
        task_id: at.map(|t| schedule.task_id(t)),
        ..DispatchOptions::default()
    };
    if let Some(n) = schedule.max_attempts {
        o.max_attempts = n;
    }
    o
}

/// What one scheduler pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SchedulePass {
    /// Occurrences dispatched (again, for one a previous monitor may have left half done).
    pub fired: u64,
    /// Late occurrences skipped by their schedule's catch-up policy.
    pub skipped: u64,
}

/// The acting monitor's scheduler: the last occurrence handled of each schedule, known while
/// this monitor acts.
#[derive(Debug, Default)]
pub(crate) struct Scheduler {
    handled: Mutex<HashMap<ScheduleName, DateTime<Utc>>>,
}

impl Scheduler {
    /// Forgets what was handled: another monitor may act meanwhile.
    pub(crate) fn forget(&self) {
        self.handled.lock().clear();
    }

    /// Dispatches the occurrences due at `now` of every active schedule; late ones (older
    /// than `grace`) as their catch-up policy says. A schedule whose dispatch fails is tried
    /// again at the next pass; the others go on.
    pub(crate) async fn fire_due(
        &self,
        backends: &Backends,
        now: DateTime<Utc>,
        grace: Duration,
    ) -> Result<SchedulePass> {
        let schedules = backends.registry.schedules().await?;
        let dispatcher = Dispatcher::new(backends.clone());
        let mut pass = SchedulePass::default();
        let mut handled = std::mem::take(&mut *self.handled.lock());
        handled.retain(|name, _| schedules.iter().any(|s| &s.name == name));
        for s in schedules.iter().filter(|s| !s.paused) {
            let known = handled.get(&s.name).copied();
            match self
                .fire_one(&dispatcher, s, known, now, grace, &mut pass)
                .await
            {
                Ok(last) => {
                    handled.insert(s.name.clone(), last);
                }
                Err(e) => {
                    tracing::warn!(schedule = %s.name, error = %e, "could not fire the schedule; trying again next pass")
                }
            }
        }
        *self.handled.lock() = handled;
        Ok(pass)
    }

    /// Fires what is due of one schedule; returns the last occurrence now handled.
    async fn fire_one(
        &self,
        dispatcher: &Dispatcher,
        s: &Schedule,
        known: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
        grace: Duration,
        pass: &mut SchedulePass,
    ) -> Result<DateTime<Utc>> {
        let after = known.map_or(s.updated_at, |k| k.max(s.updated_at));
        let mut due = s.occurrences(after, now, MAX_CATCH_UP);
        let mut last = after;
        if known.is_none() {
            // Just became the acting monitor: what did the previous one dispatch?
            if let Some(i) = newest_dispatched(dispatcher, s, &due).await? {
                last = due[i];
                fire(dispatcher, s, last).await?;
                pass.fired += 1;
                due.drain(..=i);
            }
        }
        let chosen = s.catch_up.select(&due, now, grace);
        for at in &chosen {
            fire(dispatcher, s, *at).await?;
            pass.fired += 1;
        }
        let skipped = (due.len() - chosen.len()) as u64;
        if skipped > 0 {
            tracing::warn!(schedule = %s.name, skipped, catch_up = %s.catch_up, "late occurrences skipped");
        }
        pass.skipped += skipped;
        Ok(due.last().copied().unwrap_or(last))
    }
}

/// The index in `due` of the most recent occurrence whose task exists.
async fn newest_dispatched(
    dispatcher: &Dispatcher,
    s: &Schedule,
    due: &[DateTime<Utc>],
) -> Result<Option<usize>> {
    let registry = &dispatcher.backends().registry;
    for (i, at) in due.iter().enumerate().rev() {
        if registry.get(&s.task_id(*at)).await?.is_some() {
            return Ok(Some(i));
        }
    }
    Ok(None)
}

/// Dispatches the occurrence at `at`. Its id taken by another task (one the schedule made
/// before it was changed) counts as fired.
async fn fire(dispatcher: &Dispatcher, s: &Schedule, at: DateTime<Utc>) -> Result<()> {
    let result = dispatcher
        .dispatch(
            s.queue.as_str(),
            s.payload.clone(),
            i64::from(s.priority.get()),
            options(s, Some(at)),
        )
        .await;
    match result {
        Ok(id) => {
            tracing::info!(schedule = %s.name, task_id = %id, occurrence = %at, "scheduled task dispatched");
            Ok(())
        }
        Err(Error::TaskExists(id)) => {
            tracing::debug!(schedule = %s.name, task_id = %id, "occurrence already dispatched by an earlier version of the schedule");
            Ok(())
        }
        Err(e) => Err(e),
    }
}
