//! Schedules: a task dispatched again and again, on a cron expression or at a fixed interval.
//!
//! A [`Schedule`] is stored in the [`Registry`](crate::Registry)
//! ([`Registry::put_schedule`](crate::Registry::put_schedule)) and fired by the acting monitor
//! ([`Monitor`](crate::Monitor)): each *occurrence* (a time the schedule names) becomes one task
//! whose id is derived from the schedule's name and the occurrence's time
//! ([`Schedule::task_id`]), so that two monitors, or a monitor that crashed and came back,
//! dispatching the same occurrence get the same task. What happens to occurrences missed
//! during an outage is the schedule's [`CatchUp`] policy. The reasoning: docs/design.md,
//! "Schedules".
//!
//! ```
//! use agent_orchestra::schedule::{CatchUp, Recurrence, Schedule};
//! let nightly = Schedule::new("nightly_report", Recurrence::cron("0 3 * * *")?, "reports",
//!     serde_json::json!({"kind": "daily"}))?
//!     .with_time_zone("Europe/Paris")?
//!     .with_priority(2)?
//!     .with_catch_up(CatchUp::All);
//! let at = "2026-07-01T01:00:00Z".parse()?; // 03:00 in Paris (summer time)
//! assert_eq!(nightly.next_after("2026-06-30T12:00:00Z".parse()?), Some(at));
//! assert_eq!(nightly.task_id(at).as_str(), "sched:nightly_report:20260701T010000Z");
//! assert!(Recurrence::cron("61 * * * *").is_err());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds, Year};
use croner::{Cron, Direction};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::{validate_name, Priority, QueueName, TaskId};

/// The most missed occurrences one pass looks back at (and fires, with [`CatchUp::All`]): an
/// outage longer than that many occurrences loses the older ones.
pub const MAX_CATCH_UP: usize = 100;

/// The longest fixed interval: a year.
pub const MAX_INTERVAL: Duration = Duration::from_secs(366 * 86_400);

/// The name of a schedule: 1..=64 characters from `[A-Za-z0-9_-]`, starting with a letter or
/// digit (the rules of a [`QueueName`]), so that it fits in a task id and in every backend's
/// keys.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ScheduleName(String);

impl ScheduleName {
    /// Validates a schedule name.
    ///
    /// ```
    /// use agent_orchestra::schedule::ScheduleName;
    /// assert!(ScheduleName::parse("nightly_report").is_ok());
    /// assert!(ScheduleName::parse("every day").is_err());
    /// ```
    pub fn parse(s: &str) -> Result<Self> {
        validate_name(s, 64, &['_', '-'])
            .map_err(|reason| Error::invalid("schedule", format!("{reason} (got {s:?})")))?;
        Ok(ScheduleName(s.to_string()))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ScheduleName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for ScheduleName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        ScheduleName::parse(s)
    }
}

impl TryFrom<String> for ScheduleName {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        ScheduleName::parse(&s)
    }
}

impl From<ScheduleName> for String {
    fn from(n: ScheduleName) -> String {
        n.0
    }
}

/// When a schedule's occurrences are.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Recurrence {
    /// A cron expression, read in the schedule's time zone: five fields (minute, hour, day of
    /// month, month, day of week), or six with seconds first; names (`MON`, `JAN`), ranges,
    /// steps, `L`, `W`, `#` and the nicknames (`@daily`, `@hourly`, ...) are accepted. As in
    /// Vixie cron, a restricted day of month and day of week match when either does.
    Cron(String),
    /// Every so many whole seconds (at least one), counted from the Unix epoch (1970-01-01
    /// 00:00:00 UTC): `every 1h` fires on the hour, `every 1d` at midnight UTC, on every
    /// process alike, whenever the schedule was stored. Real time: no time zone applies.
    Every(#[serde(with = "crate::clock::duration_serde")] Duration),
}

impl Recurrence {
    /// A cron expression, checked; [`Error::InvalidInput`] (field `cron`) says what is wrong.
    pub fn cron(expression: &str) -> Result<Recurrence> {
        parse_cron(expression)?;
        Ok(Recurrence::Cron(expression.trim().to_string()))
    }

    /// A fixed interval, checked: whole seconds, from 1s to a year.
    pub fn every(interval: Duration) -> Result<Recurrence> {
        if interval < Duration::from_secs(1)
            || interval.subsec_nanos() != 0
            || interval > MAX_INTERVAL
        {
            return Err(Error::invalid(
                "every",
                format!(
                    "must be whole seconds from 1s to 366d, got {}",
                    crate::clock::format_duration(interval)
                ),
            ));
        }
        Ok(Recurrence::Every(interval))
    }
}

impl fmt::Display for Recurrence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Recurrence::Cron(e) => write!(f, "cron {e:?}"),
            Recurrence::Every(d) => write!(f, "every {}", crate::clock::format_duration(*d)),
        }
    }
}

fn parse_cron(expression: &str) -> Result<Cron> {
    let bad = |reason: String| Error::invalid("cron", format!("{expression:?}: {reason}"));
    let fields = expression.split_whitespace().count();
    if !expression.trim_start().starts_with('@') && !(5..=6).contains(&fields) {
        return Err(bad(format!(
            "has {fields} fields; a cron expression has 5 (minute hour day-of-month month day-of-week), or 6 with seconds first"
        )));
    }
    let cron = CronParser::builder()
        .seconds(Seconds::Optional)
        .year(Year::Disallowed)
        .build()
        .parse(expression)
        .map_err(|e| bad(e.to_string()))?;
    // A pattern that matches no date (the 30th of February) would search until year 5000
    // on every pass: refuse it now.
    if cron.find_next_occurrence(&Utc::now(), false).is_err() {
        return Err(bad("matches no date".into()));
    }
    Ok(cron)
}

/// What a pass does with the occurrences that an outage (no acting monitor) made late.
///
/// An occurrence is *on time* when a pass sees it no later than the monitor's grace
/// ([`MonitorConfig::schedule_grace`](crate::MonitorConfig), at least four monitor
/// intervals: the time a standby monitor takes to act after the acting one died) after its
/// time; on-time occurrences are always fired. The policy decides about the *late* ones.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CatchUp {
    /// Fire the most recent late occurrence, only when no occurrence is on time, and skip the
    /// others: a job that must run after an outage, once (Celery beat's behaviour). The
    /// default.
    #[default]
    Latest,
    /// Fire every late occurrence, oldest first, at most the [`MAX_CATCH_UP`] most recent.
    All,
    /// Skip every late occurrence.
    None,
}

impl CatchUp {
    /// The name as written in JSON and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            CatchUp::Latest => "latest",
            CatchUp::All => "all",
            CatchUp::None => "none",
        }
    }

    /// Which of `due` (occurrences not yet handled, oldest first) a pass at `now` fires:
    /// those at most `grace` old, and the late ones this policy keeps. Oldest first.
    ///
    /// ```
    /// use std::time::Duration;
    /// use agent_orchestra::schedule::CatchUp;
    /// let t = |s: &str| s.parse::<chrono::DateTime<chrono::Utc>>().unwrap();
    /// let due = [t("2026-01-01T08:00:00Z"), t("2026-01-01T09:00:00Z"), t("2026-01-01T10:00:00Z")];
    /// let now = t("2026-01-01T10:00:30Z");
    /// let grace = Duration::from_secs(60);
    /// assert_eq!(CatchUp::Latest.select(&due, now, grace), vec![due[2]]);
    /// assert_eq!(CatchUp::All.select(&due, now, grace), due.to_vec());
    /// assert_eq!(CatchUp::None.select(&due, now, grace), vec![due[2]]);
    /// let later = t("2026-01-01T12:00:00Z"); // all three are late now
    /// assert_eq!(CatchUp::Latest.select(&due, later, grace), vec![due[2]]);
    /// assert!(CatchUp::None.select(&due, later, grace).is_empty());
    /// ```
    pub fn select(
        self,
        due: &[DateTime<Utc>],
        now: DateTime<Utc>,
        grace: Duration,
    ) -> Vec<DateTime<Utc>> {
        let cutoff = crate::clock::before(now, grace);
        let first_on_time = due.partition_point(|t| *t < cutoff);
        let (late, on_time) = due.split_at(first_on_time);
        let late: &[DateTime<Utc>] = match self {
            CatchUp::All => &late[late.len().saturating_sub(MAX_CATCH_UP)..],
            CatchUp::Latest if on_time.is_empty() => &late[late.len().saturating_sub(1)..],
            CatchUp::Latest | CatchUp::None => &[],
        };
        late.iter().chain(on_time).copied().collect()
    }
}

impl fmt::Display for CatchUp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CatchUp {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "latest" => Ok(CatchUp::Latest),
            "all" => Ok(CatchUp::All),
            "none" => Ok(CatchUp::None),
            _ => Err(Error::invalid(
                "catch_up",
                format!("must be latest, all or none, got {s:?}"),
            )),
        }
    }
}

/// A task dispatched at every occurrence of a [`Recurrence`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// Its name, unique in the namespace (storing another under it replaces it).
    pub name: ScheduleName,
    /// When it fires.
    #[serde(flatten)]
    pub recurrence: Recurrence,
    /// The IANA time zone a cron expression is read in (default UTC). Across a daylight-saving
    /// change: a time that does not exist (spring forward) fires at the first valid time after
    /// the gap for a fixed-time expression (`30 2 * * *`) and is skipped by a wildcard or step
    /// one (`*/15 * * * *`); a time that happens twice (fall back) fires once for a fixed-time
    /// expression and at each pass for a wildcard one (croner's rules, as in Vixie cron).
    pub time_zone: Tz,
    /// The queue of its tasks.
    pub queue: QueueName,
    /// The payload of each task.
    pub payload: Value,
    /// The priority of each task.
    pub priority: Priority,
    /// The attempt budget of each task (`None`: the dispatcher's default, 3).
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// What to do with occurrences an outage made late.
    #[serde(default)]
    pub catch_up: CatchUp,
    /// A paused schedule fires nothing; its occurrences while paused are never fired later.
    #[serde(default)]
    pub paused: bool,
    /// When it was stored last: only occurrences after this time are fired, so that a
    /// schedule added or changed now does not fire the past.
    pub updated_at: DateTime<Utc>,
}

impl Schedule {
    /// A schedule in UTC, priority 5, the default attempts, [`CatchUp::Latest`], active,
    /// stored now. Errors: [`Error::InvalidInput`] for the name or the queue.
    pub fn new(name: &str, recurrence: Recurrence, queue: &str, payload: Value) -> Result<Self> {
        Ok(Schedule {
            name: ScheduleName::parse(name)?,
            recurrence,
            time_zone: Tz::UTC,
            queue: QueueName::parse(queue)?,
            payload,
            priority: Priority::DEFAULT,
            max_attempts: None,
            catch_up: CatchUp::default(),
            paused: false,
            updated_at: Utc::now(),
        })
    }

    /// Sets the time zone by its IANA name (`Europe/Paris`, `America/New_York`, `UTC`).
    pub fn with_time_zone(mut self, zone: &str) -> Result<Self> {
        self.time_zone = parse_zone(zone)?;
        self.check_zone()?;
        Ok(self)
    }

    /// Sets the priority (1..=10).
    pub fn with_priority(mut self, priority: i64) -> Result<Self> {
        self.priority = Priority::new(priority)?;
        Ok(self)
    }

    /// Sets the attempt budget of each task.
    pub fn with_max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = Some(n);
        self
    }

    /// Sets the catch-up policy.
    pub fn with_catch_up(mut self, catch_up: CatchUp) -> Self {
        self.catch_up = catch_up;
        self
    }

    /// Pauses (or not) the schedule.
    pub fn with_paused(mut self, paused: bool) -> Self {
        self.paused = paused;
        self
    }

    /// Checks what a schedule built field by field (or read back) may have wrong: the cron
    /// expression, the interval, a time zone given to an interval. [`Error::InvalidInput`].
    pub fn validate(&self) -> Result<()> {
        match &self.recurrence {
            Recurrence::Cron(e) => parse_cron(e).map(|_| ()),
            Recurrence::Every(d) => Recurrence::every(*d).map(|_| ()),
        }?;
        self.check_zone()
    }

    fn check_zone(&self) -> Result<()> {
        if matches!(self.recurrence, Recurrence::Every(_)) && self.time_zone != Tz::UTC {
            return Err(Error::invalid(
                "time_zone",
                format!(
                    "an interval counts real time from the Unix epoch; a time zone ({}) applies to cron expressions only",
                    self.time_zone.name()
                ),
            ));
        }
        Ok(())
    }

    /// The first occurrence strictly after `t`; `None` when there is none (an expression
    /// that stopped matching, which [`Schedule::validate`] refuses).
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match &self.recurrence {
            Recurrence::Cron(e) => {
                let cron = parse_cron(e).ok()?;
                let local = t.with_timezone(&self.time_zone);
                let next = cron.find_next_occurrence(&local, false).ok()?;
                Some(next.with_timezone(&Utc))
            }
            Recurrence::Every(d) => {
                let step = d.as_secs().max(1) as i64;
                let k = t.timestamp().div_euclid(step) + 1;
                Utc.timestamp_opt(k.checked_mul(step)?, 0).single()
            }
        }
    }

    /// The occurrences after `after` and at or before `now`, oldest first: the `limit` most
    /// recent of them.
    pub fn occurrences(
        &self,
        after: DateTime<Utc>,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Vec<DateTime<Utc>> {
        let mut out = Vec::new();
        match &self.recurrence {
            Recurrence::Cron(e) => {
                let Ok(cron) = parse_cron(e) else {
                    return out;
                };
                let local = now.with_timezone(&self.time_zone);
                for t in cron.iter_from(local, Direction::Backward) {
                    let t = t.with_timezone(&Utc);
                    if t <= after || out.len() == limit {
                        break;
                    }
                    out.push(t);
                }
            }
            Recurrence::Every(d) => {
                let step = d.as_secs().max(1) as i64;
                let mut k = now.timestamp().div_euclid(step);
                while out.len() < limit {
                    let Some(t) = k
                        .checked_mul(step)
                        .and_then(|s| Utc.timestamp_opt(s, 0).single())
                    else {
                        break;
                    };
                    if t <= after {
                        break;
                    }
                    out.push(t);
                    k -= 1;
                }
            }
        }
        out.reverse();
        out
    }

    /// The id of the task of the occurrence at `at`: `sched:<name>:<UTC time, basic ISO 8601>`.
    /// The same on every process, so that dispatching an occurrence twice is idempotent.
    pub fn task_id(&self, at: DateTime<Utc>) -> TaskId {
        let id = format!("sched:{}:{}", self.name, at.format("%Y%m%dT%H%M%SZ"));
        // A schedule name and a formatted time always make a valid id.
        TaskId::parse(&id).unwrap_or_else(|_| TaskId::generate())
    }
}

/// Reads an IANA time zone name; [`Error::InvalidInput`] (field `time_zone`) otherwise.
pub fn parse_zone(zone: &str) -> Result<Tz> {
    zone.trim().parse::<Tz>().map_err(|_| {
        Error::invalid(
            "time_zone",
            format!("{zone:?} is not an IANA time zone name (examples: UTC, Europe/Paris, America/New_York)"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn cron(expr: &str, zone: &str) -> Schedule {
        Schedule::new("s", Recurrence::cron(expr).unwrap(), "q", json!({}))
            .unwrap()
            .with_time_zone(zone)
            .unwrap()
    }

    #[test]
    fn bad_expressions_zones_and_names_are_invalid_input() {
        for bad in [
            "",
            "* * * *",
            "61 * * * *",
            "* * * * * * *",
            "0 0 30 2 *",
            "hello",
        ] {
            match Recurrence::cron(bad) {
                Err(Error::InvalidInput { field: "cron", .. }) => {}
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        assert!(Recurrence::cron("*/5 * * * *").is_ok());
        assert!(Recurrence::cron("*/10 * * * * *").is_ok());
        assert!(Recurrence::cron("@daily").is_ok());
        for bad in [
            Duration::ZERO,
            Duration::from_millis(1500),
            MAX_INTERVAL * 2,
        ] {
            assert!(
                matches!(
                    Recurrence::every(bad),
                    Err(Error::InvalidInput { field: "every", .. })
                ),
                "{bad:?}"
            );
        }
        let s = Schedule::new("s", Recurrence::cron("@daily").unwrap(), "q", json!(1)).unwrap();
        assert!(matches!(
            s.clone().with_time_zone("Mars/Olympus"),
            Err(Error::InvalidInput {
                field: "time_zone",
                ..
            })
        ));
        let every = Schedule::new(
            "s",
            Recurrence::Every(Duration::from_secs(60)),
            "q",
            json!(1),
        );
        assert!(matches!(
            every.unwrap().with_time_zone("Europe/Paris"),
            Err(Error::InvalidInput {
                field: "time_zone",
                ..
            })
        ));
        assert!(matches!(
            Schedule::new(
                "a b",
                Recurrence::Every(Duration::from_secs(1)),
                "q",
                json!(1)
            ),
            Err(Error::InvalidInput {
                field: "schedule",
                ..
            })
        ));
        let mut raw = s;
        raw.recurrence = Recurrence::Every(Duration::from_millis(10));
        assert!(raw.validate().is_err());
    }

    #[test]
    fn a_schedule_round_trips_through_json() {
        let s = cron("0 9 * * MON-FRI", "America/New_York")
            .with_priority(2)
            .unwrap()
            .with_max_attempts(5)
            .with_catch_up(CatchUp::None);
        let text = serde_json::to_string(&s).unwrap();
        assert!(text.contains(r#""cron":"0 9 * * MON-FRI""#), "{text}");
        assert!(text.contains(r#""time_zone":"America/New_York""#), "{text}");
        assert_eq!(serde_json::from_str::<Schedule>(&text).unwrap(), s);
        let every = Schedule::new(
            "e",
            Recurrence::Every(Duration::from_secs(90)),
            "q",
            json!(1),
        )
        .unwrap();
        let text = serde_json::to_string(&every).unwrap();
        assert!(text.contains(r#""every":"90s""#), "{text}");
        assert_eq!(serde_json::from_str::<Schedule>(&text).unwrap(), every);
    }

    #[test]
    fn intervals_count_from_the_epoch() {
        let s = Schedule::new(
            "e",
            Recurrence::Every(Duration::from_secs(3600)),
            "q",
            json!(1),
        )
        .unwrap();
        assert_eq!(
            s.next_after(t("2026-03-01T10:20:00Z")),
            Some(t("2026-03-01T11:00:00Z"))
        );
        assert_eq!(
            s.next_after(t("2026-03-01T11:00:00Z")),
            Some(t("2026-03-01T12:00:00Z"))
        );
        assert_eq!(
            s.occurrences(t("2026-03-01T08:00:00Z"), t("2026-03-01T10:20:00Z"), 10),
            vec![t("2026-03-01T09:00:00Z"), t("2026-03-01T10:00:00Z")]
        );
        assert_eq!(
            s.occurrences(t("2026-03-01T00:00:00Z"), t("2026-03-01T10:00:00Z"), 2),
            vec![t("2026-03-01T09:00:00Z"), t("2026-03-01T10:00:00Z")]
        );
    }

    #[test]
    fn cron_is_read_in_its_time_zone_across_daylight_saving_changes() {
        // Paris springs forward on 2026-03-29 at 02:00 (to 03:00) and falls back on
        // 2026-10-25 at 03:00 (to 02:00).
        let fixed = cron("30 2 * * *", "Europe/Paris");
        // Winter: 02:30 CET is 01:30 UTC.
        assert_eq!(
            fixed.next_after(t("2026-03-27T12:00:00Z")),
            Some(t("2026-03-28T01:30:00Z"))
        );
        // 02:30 does not exist on the 29th: the first valid time after the gap, 03:00 CEST.
        assert_eq!(
            fixed.next_after(t("2026-03-28T12:00:00Z")),
            Some(t("2026-03-29T01:00:00Z"))
        );
        // 02:30 happens twice on 2026-10-25: fired once, at the first.
        let twice = fixed.occurrences(t("2026-10-24T12:00:00Z"), t("2026-10-25T12:00:00Z"), 10);
        assert_eq!(twice, vec![t("2026-10-25T00:30:00Z")]);
        // A wildcard expression runs through the repeated hour twice.
        let quarter = cron("*/30 * * * *", "Europe/Paris");
        let n = quarter
            .occurrences(t("2026-10-24T23:59:00Z"), t("2026-10-25T02:59:00Z"), 100)
            .len();
        assert_eq!(n, 6, "three real hours, every 30 minutes");
        // And skips the times of the gap.
        let spring = quarter.occurrences(t("2026-03-29T00:59:00Z"), t("2026-03-29T01:01:00Z"), 9);
        assert_eq!(spring, vec![t("2026-03-29T01:00:00Z")]);
    }

    #[test]
    fn catch_up_keeps_at_most_the_bound() {
        let now = t("2026-01-02T00:00:00Z");
        let due: Vec<_> = (1..=150)
            .map(|m| t("2026-01-01T00:00:00Z") + chrono::Duration::minutes(m))
            .collect();
        let all = CatchUp::All.select(&due, now, Duration::from_secs(60));
        assert_eq!(all.len(), MAX_CATCH_UP);
        assert_eq!(all.last(), due.last());
        assert_eq!(
            CatchUp::Latest.select(&due, now, Duration::from_secs(60)),
            vec![*due.last().unwrap()]
        );
        assert!(CatchUp::None
            .select(&due, now, Duration::from_secs(60))
            .is_empty());
        assert!(CatchUp::All.select(&[], now, Duration::ZERO).is_empty());
    }

    #[test]
    fn task_ids_are_derived_from_the_name_and_the_time() {
        let s = cron("* * * * *", "UTC");
        let at = t("2026-05-06T07:08:00Z");
        assert_eq!(s.task_id(at).as_str(), "sched:s:20260506T070800Z");
        assert_eq!(s.task_id(at), s.clone().task_id(at));
        assert_ne!(s.task_id(at), s.task_id(at + chrono::Duration::seconds(1)));
    }
}
