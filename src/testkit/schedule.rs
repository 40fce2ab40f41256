//! Schedules on every backend: the registry stores, lists, replaces and removes them; bad
//! input is refused with typed errors; the monitor fires each occurrence once, across a
//! monitor killed mid-run; late occurrences follow the catch-up policy; a paused schedule fires
//! nothing. Listed in [`engine_suite!`](crate::engine_suite).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use parking_lot::Mutex;
use serde_json::json;

use crate::bundle::Backends;
use crate::engine::{
    handler_fn, Monitor, MonitorConfig, Schedules, TaskContext, TaskError, Worker, WorkerConfig,
};
use crate::error::Error;
use crate::model::{QueueName, Task, TaskId, TaskStatus};
use crate::registry::TaskFilter;
use crate::schedule::{CatchUp, Recurrence, Schedule, ScheduleName};
use crate::testkit::{eventually, must};

const LIMIT: Duration = Duration::from_secs(60);

fn every(name: &str, interval: Duration, queue: &str) -> Schedule {
    let r = Recurrence::every(interval).unwrap_or_else(|e| panic!("interval: {e}"));
    Schedule::new(name, r, queue, json!({"schedule": name}))
        .unwrap_or_else(|e| panic!("schedule {name}: {e}"))
}

fn monitor(b: &Backends, id: &str) -> Monitor {
    Monitor::new(
        b.clone(),
        MonitorConfig {
            monitor_id: id.into(),
            interval: Duration::from_millis(200),
            lock_key: "schedule_monitor".into(),
            reannounce_pending_after: None,
            schedule_grace: Duration::from_secs(60),
            ..MonitorConfig::default()
        },
    )
}

/// Every task of `queue`, whatever its status.
async fn tasks_of(b: &Backends, queue: &str) -> Vec<Task> {
    let q = QueueName::parse(queue).unwrap_or_else(|e| panic!("{e}"));
    let mut out = Vec::new();
    for status in TaskStatus::ALL {
        let filter = TaskFilter {
            status: Some(status),
            queue: Some(q.clone()),
        };
        let mut cursor: Option<String> = None;
        loop {
            let page = must("list", b.registry.list(&filter, cursor.as_deref(), 500)).await;
            out.extend(page.tasks);
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
    }
    out
}

/// The occurrence times of `schedule`'s tasks in `queue`, sorted.
async fn fired(b: &Backends, schedule: &Schedule) -> Vec<DateTime<Utc>> {
    let mut at: Vec<DateTime<Utc>> = tasks_of(b, schedule.queue.as_str())
        .await
        .iter()
        .filter_map(|t| occurrence_of(schedule, &t.task_id))
        .collect();
    at.sort();
    at
}

/// The occurrence a task id of `schedule` names.
fn occurrence_of(schedule: &Schedule, id: &TaskId) -> Option<DateTime<Utc>> {
    let stamp = id
        .as_str()
        .strip_prefix(&format!("sched:{}:", schedule.name))?;
    let naive = chrono::NaiveDateTime::parse_from_str(stamp, "%Y%m%dT%H%M%SZ").ok()?;
    Some(naive.and_utc())
}

/// The registry stores schedules whole, lists them by name, replaces one stored under the
/// same name and removes them.
pub async fn schedules_are_stored_listed_replaced_and_removed(b: &Backends) {
    let reg = b.registry.as_ref();
    assert!(must("schedules", reg.schedules()).await.is_empty());
    let nightly = Schedule::new(
        "nightly",
        Recurrence::cron("30 2 * * *").unwrap_or_else(|e| panic!("{e}")),
        "reports",
        json!({"kind": "nightly", "big": 12345678901234_u64, "text": "ünïcødé"}),
    )
    .and_then(|s| s.with_time_zone("Europe/Paris"))
    .and_then(|s| s.with_priority(2))
    .unwrap_or_else(|e| panic!("{e}"))
    .with_max_attempts(5)
    .with_catch_up(CatchUp::All);
    let ticker = every("a_ticker", Duration::from_secs(30), "ticks");
    assert!(must("put nightly", reg.put_schedule(&nightly)).await, "new");
    assert!(must("put ticker", reg.put_schedule(&ticker)).await, "new");
    let listed = must("schedules", reg.schedules()).await;
    assert_eq!(
        listed,
        vec![ticker.clone(), nightly.clone()],
        "sorted by name"
    );
    let changed = nightly
        .clone()
        .with_paused(true)
        .with_catch_up(CatchUp::None);
    assert!(
        !must("replace nightly", reg.put_schedule(&changed)).await,
        "a put under a taken name replaces"
    );
    let listed = must("schedules", reg.schedules()).await;
    assert_eq!(listed, vec![ticker.clone(), changed]);
    assert!(must("remove nightly", reg.remove_schedule(&nightly.name)).await);
    assert!(!must("remove nightly again", reg.remove_schedule(&nightly.name)).await);
    let never = ScheduleName::parse("never_stored").unwrap_or_else(|e| panic!("{e}"));
    assert!(!must("remove one never stored", reg.remove_schedule(&never)).await);
    assert_eq!(
        must("schedules", reg.schedules()).await,
        vec![ticker.clone()]
    );
    assert!(must("remove ticker", reg.remove_schedule(&ticker.name)).await);
    assert!(must("schedules", reg.schedules()).await.is_empty());
}

/// Bad names, expressions, zones, intervals and task settings are refused with
/// [`Error::InvalidInput`] naming the field, and nothing is stored.
pub async fn bad_schedules_are_refused_with_typed_errors(b: &Backends) {
    let schedules = Schedules::new(b.clone());
    let field = |e: Error| match e {
        Error::InvalidInput { field, .. } => field,
        other => panic!("expected invalid input, got {other:?}"),
    };
    assert_eq!(
        field(Recurrence::cron("*/5 * * *").unwrap_err()),
        "cron",
        "four fields"
    );
    assert_eq!(field(Recurrence::cron("0 25 * * *").unwrap_err()), "cron");
    assert_eq!(
        field(Recurrence::every(Duration::from_millis(500)).unwrap_err()),
        "every"
    );
    let ok = every("fine", Duration::from_secs(60), "q");
    assert_eq!(
        field(ok.clone().with_time_zone("Nowhere/Atlantis").unwrap_err()),
        "time_zone"
    );
    assert_eq!(
        field(
            Schedule::new(
                "bad name",
                Recurrence::Every(Duration::from_secs(1)),
                "q",
                json!(1)
            )
            .unwrap_err()
        ),
        "schedule"
    );
    assert_eq!(field(ok.clone().with_priority(11).unwrap_err()), "priority");
    // Fields set by hand are checked when the schedule is added.
    let mut raw = ok.clone();
    raw.recurrence = Recurrence::Cron("not cron".into());
    assert_eq!(field(schedules.add(raw).await.unwrap_err()), "cron");
    let mut raw = ok.clone();
    raw.recurrence = Recurrence::Every(Duration::from_millis(10));
    assert_eq!(field(schedules.add(raw).await.unwrap_err()), "every");
    let raw = ok.clone().with_max_attempts(0);
    assert_eq!(field(schedules.add(raw).await.unwrap_err()), "max_attempts");
    assert_eq!(
        field(schedules.remove("no/such").await.unwrap_err()),
        "schedule"
    );
    assert_eq!(
        field(schedules.set_paused("missing", true).await.unwrap_err()),
        "schedule"
    );
    assert!(
        must("list", schedules.list()).await.is_empty(),
        "nothing stored"
    );
    assert!(must("add the good one", schedules.add(ok)).await);
}

/// Two monitors, the acting one killed mid-run (its task aborted, its lock left to expire):
/// the other takes over and every occurrence of a schedule firing every second, from the
/// first after it was added to the last before the check, is dispatched and run once.
pub async fn a_schedule_fires_each_occurrence_once_across_a_killed_monitor(b: &Backends) {
    let runs: Arc<Mutex<HashMap<TaskId, u32>>> = Arc::default();
    let seen = runs.clone();
    let worker = Worker::new(
        b.clone(),
        WorkerConfig {
            worker_id: "schedule-worker".into(),
            concurrency: 4,
            fetch_wait: Duration::from_millis(200),
            ..WorkerConfig::default()
        },
    )
    .handle(
        "every_second",
        handler_fn(move |ctx: TaskContext| {
            let seen = seen.clone();
            async move {
                *seen.lock().entry(ctx.task.task_id.clone()).or_default() += 1;
                Ok::<_, TaskError>(json!("ran"))
            }
        }),
    )
    .and_then(|w| w.start())
    .unwrap_or_else(|e| panic!("worker: {e}"));
    let schedules = Schedules::new(b.clone());
    let s = every("each_second", Duration::from_secs(1), "every_second");
    must("add", schedules.add(s)).await;
    let s = must("get", schedules.get("each_second"))
        .await
        .unwrap_or_else(|| panic!("the schedule was stored"));
    let first = s
        .next_after(s.updated_at)
        .unwrap_or_else(|| panic!("an interval has a next occurrence"));

    let run = |m: Monitor| {
        tokio::spawn(async move {
            loop {
                let _ = m.tick().await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let a = monitor(b, "schedule-monitor-a");
    let acting = run(a);
    eventually("monitor a fires two occurrences", LIMIT, || async {
        let n = fired(b, &s).await.len();
        if n >= 2 {
            Ok(())
        } else {
            Err(format!("{n} fired"))
        }
    })
    .await;
    let standby = run(monitor(b, "schedule-monitor-b"));
    let before_kill = fired(b, &s).await.len();
    eventually("one more occurrence with two monitors", LIMIT, || async {
        let n = fired(b, &s).await.len();
        if n > before_kill {
            Ok(())
        } else {
            Err(format!("{n} fired"))
        }
    })
    .await;
    acting.abort(); // a crash: the lock is not released
    let _ = acting.await;
    let killed = fired(b, &s).await.len();
    eventually("the standby monitor fires four more", LIMIT, || async {
        let n = fired(b, &s).await.len();
        if n >= killed + 4 {
            Ok(())
        } else {
            Err(format!("{n} fired, {killed} at the kill"))
        }
    })
    .await;
    standby.abort();
    let _ = standby.await;

    let times = fired(b, &s).await;
    assert_eq!(
        times.first(),
        Some(&first),
        "the first occurrence after the add"
    );
    for pair in times.windows(2) {
        assert_eq!(
            pair[1] - pair[0],
            TimeDelta::seconds(1),
            "an occurrence is missing or doubled between {} and {}: {times:?}",
            pair[0],
            pair[1]
        );
    }
    let ids: BTreeSet<TaskId> = times.iter().map(|t| s.task_id(*t)).collect();
    eventually("every occurrence's task ran", LIMIT, || async {
        let done = tasks_of(b, "every_second")
            .await
            .iter()
            .filter(|t| t.state.status == TaskStatus::Completed)
            .count();
        if done >= ids.len() {
            Ok(())
        } else {
            Err(format!("{done} of {} completed", ids.len()))
        }
    })
    .await;
    worker.shutdown().await;
    let runs = runs.lock().clone();
    for id in &ids {
        assert_eq!(
            runs.get(id),
            Some(&1),
            "task {id} ran {:?} times",
            runs.get(id)
        );
    }
}

/// After an outage (no monitor for five hourly occurrences), `latest` fires the most recent
/// late one, `all` every one, `none` none; a second pass, and a monitor that has just taken
/// over, fire nothing more; the next occurrence, on time, fires under every policy.
pub async fn late_occurrences_follow_the_catch_up_policy(b: &Backends) {
    let hour = TimeDelta::hours(1);
    let now = Utc::now()
        .duration_trunc(hour)
        .unwrap_or_else(|e| panic!("{e}"))
        + TimeDelta::minutes(30);
    let outage_began = now - TimeDelta::minutes(330);
    let schedules = Schedules::new(b.clone());
    let mut stored = Vec::new();
    for (name, policy) in [
        ("late_latest", CatchUp::Latest),
        ("late_all", CatchUp::All),
        ("late_none", CatchUp::None),
    ] {
        let s = every(name, Duration::from_secs(3600), name).with_catch_up(policy);
        must("add", schedules.add(s)).await;
        let mut s = must("get", schedules.get(name))
            .await
            .unwrap_or_else(|| panic!("stored"));
        // Stored before the outage began.
        s.updated_at = outage_began;
        must("put", b.registry.put_schedule(&s)).await;
        stored.push(s);
    }
    let hours_before = |n: i64| now - TimeDelta::minutes(30) - hour * (n as i32);
    let m = monitor(b, "catch-up");
    let pass = must("fire", m.fire_schedules(now)).await;
    assert_eq!(pass.fired, 1 + 5, "{pass:?}");
    assert_eq!(pass.skipped, 4 + 5, "{pass:?}");
    let expect = [
        vec![hours_before(0)],
        (0..5).rev().map(hours_before).collect::<Vec<_>>(),
        vec![],
    ];
    for (s, want) in stored.iter().zip(&expect) {
        assert_eq!(&fired(b, s).await, want, "{} ({})", s.name, s.catch_up);
    }
    let again = must("fire again", m.fire_schedules(now)).await;
    assert_eq!(again.fired, 0, "{again:?}");
    // A monitor that has just taken over finds what was dispatched.
    let fresh = monitor(b, "catch-up-fresh");
    must("fire from a fresh monitor", fresh.fire_schedules(now)).await;
    for (s, want) in stored.iter().zip(&expect) {
        assert_eq!(&fired(b, s).await, want, "{} after a takeover", s.name);
    }
    // The next occurrence is seen ten seconds after its time: on time for every policy.
    let next = now + TimeDelta::minutes(30);
    must(
        "fire on time",
        m.fire_schedules(next + TimeDelta::seconds(10)),
    )
    .await;
    for (s, want) in stored.iter().zip(&expect) {
        let mut want = want.clone();
        want.push(next);
        assert_eq!(fired(b, s).await, want, "{} on time", s.name);
    }
}

/// A paused schedule fires nothing and shows no next time; resumed, it fires only what comes
/// after the resume.
pub async fn a_paused_schedule_fires_nothing_and_resumes_without_the_past(b: &Backends) {
    let schedules = Schedules::new(b.clone());
    let s = every("paused_one", Duration::from_secs(1), "paused_q").with_paused(true);
    must("add", schedules.add(s.clone())).await;
    let listed = must("list", schedules.list()).await;
    assert_eq!(listed.len(), 1);
    assert!(listed[0].schedule.paused);
    assert_eq!(
        listed[0].next_at, None,
        "a paused schedule has no next time"
    );
    let m = monitor(b, "paused");
    let pass = must("fire", m.fire_schedules(Utc::now() + TimeDelta::seconds(5))).await;
    assert_eq!(pass.fired, 0, "{pass:?}");
    assert!(fired(b, &s).await.is_empty());
    assert!(!must("pause again", schedules.set_paused("paused_one", true)).await);
    assert!(must("resume", schedules.set_paused("paused_one", false)).await);
    let resumed = must("get", schedules.get("paused_one"))
        .await
        .unwrap_or_else(|| panic!("stored"));
    assert!(!resumed.paused);
    let pass = must(
        "fire",
        m.fire_schedules(resumed.updated_at + TimeDelta::seconds(3)),
    )
    .await;
    let times = fired(b, &s).await;
    assert!(
        !times.is_empty() && pass.fired as usize == times.len(),
        "{pass:?} {times:?}"
    );
    assert!(
        times.iter().all(|t| *t > resumed.updated_at),
        "only occurrences after the resume: {times:?} (resumed at {})",
        resumed.updated_at
    );
}
