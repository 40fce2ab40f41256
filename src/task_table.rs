//! The in-process task table, written once for every registry that keeps its tasks (or an index
//! of them) in the process: the memory registry, RabbitMQ's view of its registry log and NATS's
//! index of its task bucket.
//!
//! A [`TaskTable`] owns the rows by id and, in the same step as every change, keeps one ordered
//! set per status of `(last change in µs, id)`, the RUNNING rows ordered by lease end, and the
//! dependents of each parent. From these it answers pages walked with an opaque cursor, counts
//! per status, the stale-lease query and the retention query, without looking at every row.
//! The cursor format ([`encode_cursor`]) is shared with Redis, whose indexes live in the server.

use std::collections::BTreeSet;
use std::ops::Bound;

use chrono::{DateTime, Utc};
use rustc_hash::FxHashMap as HashMap;

use crate::clock::micros;
use crate::error::{Error, Result};
use crate::model::{QueueName, Task, TaskId, TaskStatus};
use crate::registry::{Retention, StatusCounts, TaskFilter};

/// What the table needs to know of a row to index it.
pub(crate) trait Row {
    /// The task's id (the row's key).
    fn id(&self) -> &TaskId;
    /// The task's status.
    fn status(&self) -> TaskStatus;
    /// The task's queue (for [`TaskFilter::queue`]).
    fn queue(&self) -> &QueueName;
    /// When the task last changed, in µs since the epoch.
    fn changed_at(&self) -> i64;
    /// When the lease of a RUNNING task ends, in µs since the epoch (read only for RUNNING rows;
    /// one without a lease end counts as expired at once).
    fn lease_until(&self) -> Option<i64>;
    /// The tasks this one depends on, for [`TaskTable::dependents`]. A table whose dependents
    /// are kept elsewhere gives none.
    fn parents(&self) -> &[TaskId] {
        &[]
    }
}

impl Row for Task {
    fn id(&self) -> &TaskId {
        &self.task_id
    }

    fn status(&self) -> TaskStatus {
        self.state.status
    }

    fn queue(&self) -> &QueueName {
        &self.queue
    }

    fn changed_at(&self) -> i64 {
        micros(self.state.updated_at)
    }

    fn lease_until(&self) -> Option<i64> {
        self.state.lease_until.map(micros)
    }

    fn parents(&self) -> &[TaskId] {
        &self.depends_on
    }
}

/// An index entry: (time in µs since the epoch, task id).
type IndexKey = (i64, TaskId);

/// The position of `s` in [`TaskStatus::ALL`]: the status part of a cursor, and the order in
/// which a list of every status walks them.
pub(crate) fn slot(s: TaskStatus) -> usize {
    TaskStatus::ALL.iter().position(|x| *x == s).unwrap_or(0)
}

/// The cursor of a page that ended at `id`, changed at `at` (µs), in the status at `slot`.
pub(crate) fn encode_cursor(slot: usize, at: i64, id: &TaskId) -> String {
    format!("{slot}|{at}|{id}")
}

/// Reads a cursor written by [`encode_cursor`]: `(slot, at, id)`. Anything else is an
/// [`Error::InvalidInput`](crate::Error) naming `cursor`.
pub(crate) fn decode_cursor(c: &str) -> Result<(usize, i64, TaskId)> {
    let bad = || Error::invalid("cursor", format!("{c:?} is not a cursor returned by list"));
    let mut parts = c.splitn(3, '|');
    let slot: usize = parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    let at: i64 = parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    let id = TaskId::parse(parts.next().ok_or_else(bad)?).map_err(|_| bad())?;
    if slot >= TaskStatus::ALL.len() {
        return Err(bad());
    }
    Ok((slot, at, id))
}

/// The statuses a purge by retention deletes from.
const FINISHED: [TaskStatus; 3] = [
    TaskStatus::Completed,
    TaskStatus::Failed,
    TaskStatus::Cancelled,
];

/// Rows by id with their per-status, lease and dependents indexes (see the module
/// documentation). Rows change only through [`insert`](TaskTable::insert),
/// [`upsert`](TaskTable::upsert) and [`remove`](TaskTable::remove), so the indexes always
/// match the rows.
#[derive(Debug, PartialEq)]
pub(crate) struct TaskTable<R> {
    rows: HashMap<TaskId, R>,
    /// Per status (in [`TaskStatus::ALL`] order): (last change in µs, id).
    by_status: [BTreeSet<IndexKey>; 6],
    /// RUNNING rows by lease end (µs; `i64::MIN` without one).
    leases: BTreeSet<IndexKey>,
    /// The children of each parent, in the order they were added.
    dependents: HashMap<TaskId, Vec<TaskId>>,
}

impl<R> Default for TaskTable<R> {
    fn default() -> Self {
        TaskTable {
            rows: HashMap::default(),
            by_status: Default::default(),
            leases: BTreeSet::new(),
            dependents: HashMap::default(),
        }
    }
}

impl<R: Row> TaskTable<R> {
    /// How many rows the table holds.
    pub(crate) fn len(&self) -> usize {
        self.rows.len()
    }

    /// The row of `id`.
    pub(crate) fn get(&self, id: &TaskId) -> Option<&R> {
        self.rows.get(id)
    }

    /// Every row, in no particular order (a snapshot of the view, the queues of the memory
    /// registry).
    pub(crate) fn rows(&self) -> impl Iterator<Item = &R> {
        self.rows.values()
    }

    /// The tasks that named `parent` among their dependencies, in the order they were added.
    pub(crate) fn dependents(&self, parent: &TaskId) -> &[TaskId] {
        self.dependents.get(parent).map_or(&[], Vec::as_slice)
    }

    /// Adds `row` unless its id is already present (then nothing changes). Returns whether it
    /// was added.
    pub(crate) fn insert(&mut self, row: R) -> bool {
        if self.rows.contains_key(row.id()) {
            return false;
        }
        self.index(&row);
        self.link(&row);
        self.rows.insert(row.id().clone(), row);
        true
    }

    /// Puts `row` in place of the row with its id (or adds it), moving it in the indexes.
    /// Returns the row it replaced.
    #[cfg(any(feature = "nats", feature = "rabbitmq", test))]
    pub(crate) fn upsert(&mut self, row: R) -> Option<R> {
        let old = self.rows.remove(row.id());
        match &old {
            Some(old) => {
                self.unindex(old);
                if old.parents() != row.parents() {
                    self.unlink(old);
                    self.link(&row);
                }
            }
            None => self.link(&row),
        }
        self.index(&row);
        self.rows.insert(row.id().clone(), row);
        old
    }

    /// Changes the row of `id` in place with `change`, moving it in the indexes; returns what
    /// `change` returned and the row as it is now, or `None` (and no change) without such a
    /// row. The hot path of a compare-and-set: no copy of the row and no re-insertion, unlike
    /// [`upsert`](TaskTable::upsert). `change` must not change the row's id.
    pub(crate) fn update<T>(
        &mut self,
        id: &TaskId,
        change: impl FnOnce(&mut R) -> T,
    ) -> Option<(T, &R)> {
        let TaskTable {
            rows,
            by_status,
            leases,
            dependents,
        } = self;
        let row = rows.get_mut(id)?;
        unindex_in(by_status, leases, row);
        // Without dependencies (the common case) this copies nothing.
        let parents_before: Vec<TaskId> = row.parents().to_vec();
        let out = change(row);
        debug_assert_eq!(row.id(), id, "update must not change a row's id");
        if parents_before.as_slice() != row.parents() {
            unlink_in(dependents, id, &parents_before);
            link_in(dependents, row);
        }
        index_in(by_status, leases, row);
        Some((out, row))
    }

    /// Removes the row of `id` and its index entries.
    pub(crate) fn remove(&mut self, id: &TaskId) -> Option<R> {
        let row = self.rows.remove(id)?;
        self.unindex(&row);
        self.unlink(&row);
        Some(row)
    }

    fn lease_key(row: &R) -> Option<IndexKey> {
        (row.status() == TaskStatus::Running)
            .then(|| (row.lease_until().unwrap_or(i64::MIN), row.id().clone()))
    }

    fn index(&mut self, row: &R) {
        index_in(&mut self.by_status, &mut self.leases, row);
    }

    fn unindex(&mut self, row: &R) {
        unindex_in(&mut self.by_status, &mut self.leases, row);
    }

    fn link(&mut self, row: &R) {
        link_in(&mut self.dependents, row);
    }

    fn unlink(&mut self, row: &R) {
        unlink_in(&mut self.dependents, row.id(), row.parents());
    }

    /// One page of rows matching `filter`: the given status (or all, in [`TaskStatus::ALL`]
    /// order), oldest change first, after `cursor`, at most `limit`. Returns the rows and the
    /// cursor of the next page (`None` at the end); a cursor this table did not write is an
    /// [`Error::InvalidInput`](crate::Error).
    pub(crate) fn page(
        &self,
        filter: &TaskFilter,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<&R>, Option<String>)> {
        let after = cursor.map(decode_cursor).transpose()?;
        let slots: Vec<usize> = match filter.status {
            Some(s) => vec![slot(s)],
            None => (0..TaskStatus::ALL.len()).collect(),
        };
        let mut rows = Vec::new();
        let mut last: Option<(usize, &IndexKey)> = None;
        'outer: for s in slots {
            let range: Box<dyn Iterator<Item = &IndexKey>> = match &after {
                Some((cs, _, _)) if s < *cs => continue,
                Some((cs, at, id)) if *cs == s => Box::new(
                    self.by_status[s].range((Bound::Excluded((*at, id.clone())), Bound::Unbounded)),
                ),
                _ => Box::new(self.by_status[s].iter()),
            };
            for key in range {
                let Some(row) = self.rows.get(&key.1) else {
                    continue;
                };
                if filter.queue.as_ref().is_some_and(|q| q != row.queue()) {
                    continue;
                }
                if rows.len() == limit {
                    break 'outer;
                }
                rows.push(row);
                last = Some((s, key));
            }
        }
        let next = if rows.len() == limit && limit > 0 {
            last.map(|(s, (at, id))| encode_cursor(s, *at, id))
        } else {
            None
        };
        Ok((rows, next))
    }

    /// Rows per status.
    pub(crate) fn counts(&self) -> StatusCounts {
        StatusCounts(
            TaskStatus::ALL
                .iter()
                .map(|s| (*s, self.by_status[slot(*s)].len() as u64))
                .collect(),
        )
    }

    /// RUNNING rows whose lease ended before `before` (or that have no lease end), the
    /// earliest lease end first, at most `limit`.
    pub(crate) fn expired(&self, before: DateTime<Utc>, limit: usize) -> Vec<&R> {
        let cut = micros(before);
        self.leases
            .iter()
            .take_while(|(until, _)| *until < cut)
            .filter_map(|(_, id)| self.rows.get(id))
            .take(limit)
            .collect()
    }

    /// Finished rows (COMPLETED, FAILED, CANCELLED) beyond `retention` at `now`: per status,
    /// the oldest beyond `max_count`, and those that changed longer ago than `max_age`.
    pub(crate) fn beyond_retention(&self, retention: &Retention, now: DateTime<Utc>) -> Vec<&R> {
        let cut = retention
            .max_age
            .map(|age| micros(crate::clock::before(now, age)));
        let mut doomed = Vec::new();
        for status in FINISHED {
            let index = &self.by_status[slot(status)];
            let by_count = retention
                .max_count
                .map_or(0, |keep| index.len().saturating_sub(keep as usize));
            for (i, (at, id)) in index.iter().enumerate() {
                let too_many = i < by_count;
                let too_old = cut.is_some_and(|c| *at < c);
                if !(too_many || too_old) {
                    break;
                }
                doomed.extend(self.rows.get(id));
            }
        }
        doomed
    }

    /// Removes the rows [`beyond_retention`](TaskTable::beyond_retention) gives. Returns how
    /// many.
    pub(crate) fn purge(&mut self, retention: &Retention, now: DateTime<Utc>) -> u64 {
        let doomed: Vec<TaskId> = self
            .beyond_retention(retention, now)
            .into_iter()
            .map(|r| r.id().clone())
            .collect();
        for id in &doomed {
            self.remove(id);
        }
        doomed.len() as u64
    }
}

fn index_in<R: Row>(
    by_status: &mut [BTreeSet<IndexKey>; 6],
    leases: &mut BTreeSet<IndexKey>,
    row: &R,
) {
    by_status[slot(row.status())].insert((row.changed_at(), row.id().clone()));
    if let Some(key) = TaskTable::<R>::lease_key(row) {
        leases.insert(key);
    }
}

fn unindex_in<R: Row>(
    by_status: &mut [BTreeSet<IndexKey>; 6],
    leases: &mut BTreeSet<IndexKey>,
    row: &R,
) {
    by_status[slot(row.status())].remove(&(row.changed_at(), row.id().clone()));
    if let Some(key) = TaskTable::<R>::lease_key(row) {
        leases.remove(&key);
    }
}

fn link_in<R: Row>(dependents: &mut HashMap<TaskId, Vec<TaskId>>, row: &R) {
    for parent in row.parents() {
        dependents
            .entry(parent.clone())
            .or_default()
            .push(row.id().clone());
    }
}

fn unlink_in(dependents: &mut HashMap<TaskId, Vec<TaskId>>, id: &TaskId, parents: &[TaskId]) {
    for parent in parents {
        if let Some(children) = dependents.get_mut(parent) {
            children.retain(|c| c != id);
            if children.is_empty() {
                dependents.remove(parent);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chrono::TimeDelta;

    use super::*;
    use crate::model::{Limits, Priority};

    fn id(s: &str) -> TaskId {
        TaskId::parse(s).expect("id")
    }

    fn queue(s: &str) -> QueueName {
        QueueName::parse(s).expect("queue")
    }

    /// A task on `q`, changed at `at` (seconds after a fixed epoch), depending on `parents`.
    fn task(name: &str, q: &str, at: i64, parents: &[&str]) -> Task {
        let mut t = Task::new(
            queue(q),
            serde_json::json!({ "name": name }),
            Priority::DEFAULT,
            3,
            parents.iter().map(|p| id(p)).collect(),
            &Limits::default(),
        )
        .expect("task");
        t.task_id = id(name);
        t.state.status = TaskStatus::Pending;
        t.state.updated_at = epoch() + TimeDelta::seconds(at);
        t
    }

    fn epoch() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).expect("time")
    }

    fn moved(t: &Task, status: TaskStatus, at: i64, lease: Option<i64>) -> Task {
        let mut next = t.clone();
        next.state.status = status;
        next.state.updated_at = epoch() + TimeDelta::seconds(at);
        next.state.lease_until = lease.map(|l| epoch() + TimeDelta::seconds(l));
        next
    }

    fn ids(rows: &[&Task]) -> Vec<String> {
        rows.iter().map(|t| t.task_id.to_string()).collect()
    }

    fn count(table: &TaskTable<Task>, s: TaskStatus) -> u64 {
        table.counts().get(s)
    }

    #[test]
    fn update_in_place_moves_the_row_in_every_index() {
        let mut table = TaskTable::default();
        let a = task("a", "q", 1, &["p"]);
        table.insert(a.clone());
        let (_, now) = table
            .update(&a.task_id, |t| {
                *t = moved(t, TaskStatus::Running, 2, Some(10));
            })
            .expect("present");
        assert_eq!(now.state.status, TaskStatus::Running);
        assert_eq!(count(&table, TaskStatus::Pending), 0);
        assert_eq!(count(&table, TaskStatus::Running), 1);
        assert_eq!(
            ids(&table.expired(epoch() + TimeDelta::seconds(11), 10)),
            ["a"]
        );
        assert_eq!(table.dependents(&id("p")), [id("a")]);
        // New parents move the row in the dependents index too.
        table.update(&a.task_id, |t| t.depends_on = vec![id("r")]);
        assert!(table.dependents(&id("p")).is_empty());
        assert_eq!(table.dependents(&id("r")), [id("a")]);
        assert!(table.update(&id("missing"), |_| ()).is_none());
        // The same table as one built by upsert.
        let mut other = TaskTable::default();
        other.insert(a.clone());
        other.upsert(table.get(&a.task_id).expect("a").clone());
        assert_eq!(table, other);
    }

    #[test]
    fn indexes_follow_every_status_change_and_removal() {
        let mut table = TaskTable::default();
        let a = task("a", "q", 1, &[]);
        assert!(table.insert(a.clone()));
        assert!(
            !table.insert(moved(&a, TaskStatus::Running, 9, None)),
            "first insert wins"
        );
        assert_eq!(table.get(&a.task_id), Some(&a));
        assert_eq!(count(&table, TaskStatus::Pending), 1);

        let running = moved(&a, TaskStatus::Running, 2, Some(10));
        assert_eq!(table.upsert(running.clone()), Some(a.clone()));
        assert_eq!(count(&table, TaskStatus::Pending), 0);
        assert_eq!(count(&table, TaskStatus::Running), 1);
        assert_eq!(
            ids(&table.expired(epoch() + TimeDelta::seconds(11), 10)),
            ["a"]
        );

        // A renewed lease moves the row in the lease index: no longer expired at 11.
        table.upsert(moved(&a, TaskStatus::Running, 3, Some(20)));
        assert!(table
            .expired(epoch() + TimeDelta::seconds(11), 10)
            .is_empty());

        // Leaving RUNNING leaves the lease index.
        table.upsert(moved(&a, TaskStatus::Completed, 4, Some(20)));
        assert!(table
            .expired(epoch() + TimeDelta::seconds(99), 10)
            .is_empty());
        assert_eq!(count(&table, TaskStatus::Running), 0);
        assert_eq!(count(&table, TaskStatus::Completed), 1);
        assert_eq!(table.counts().total(), 1);

        assert!(table.remove(&a.task_id).is_some());
        assert!(table.remove(&a.task_id).is_none());
        assert_eq!(table, TaskTable::default(), "no index entry left behind");
    }

    #[test]
    fn dependents_are_kept_through_changes_and_dropped_with_the_child() {
        let mut table = TaskTable::default();
        table.insert(task("p", "q", 1, &[]));
        let c1 = task("c1", "q", 2, &["p"]);
        let c2 = task("c2", "q", 3, &["p"]);
        table.insert(c1.clone());
        table.insert(c2.clone());
        table.upsert(moved(&c1, TaskStatus::Running, 4, Some(9)));
        assert_eq!(
            table.dependents(&id("p")),
            [id("c1"), id("c2")],
            "order kept"
        );
        table.remove(&id("c1"));
        assert_eq!(table.dependents(&id("p")), [id("c2")]);
        table.remove(&id("c2"));
        assert!(table.dependents(&id("p")).is_empty());
        assert!(table.dependents.is_empty(), "an empty list is dropped");
    }

    #[test]
    fn pages_walk_every_row_once_across_statuses_with_the_cursor() {
        let mut table = TaskTable::default();
        for i in 0..7 {
            let t = task(
                &format!("t{i}"),
                if i % 2 == 0 { "even" } else { "odd" },
                i,
                &[],
            );
            let t = if i >= 4 {
                moved(&t, TaskStatus::Running, 100 - i, Some(200))
            } else {
                t
            };
            table.insert(t);
        }
        let all = TaskFilter::default();
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        let mut pages = 0;
        loop {
            let (rows, next) = table.page(&all, cursor.as_deref(), 3).expect("page");
            seen.extend(ids(&rows));
            pages += 1;
            match next {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        assert_eq!(pages, 3);
        // PENDING first (oldest change first), then RUNNING (t6 changed first, at 94).
        assert_eq!(seen, ["t0", "t1", "t2", "t3", "t6", "t5", "t4"]);

        let pending = TaskFilter {
            status: Some(TaskStatus::Pending),
            queue: Some(queue("even")),
        };
        let (rows, next) = table.page(&pending, None, 10).expect("page");
        assert_eq!(ids(&rows), ["t0", "t2"]);
        assert_eq!(next, None, "a short page is the last");
        let (rows, next) = table.page(&pending, None, 2).expect("page");
        assert_eq!(ids(&rows), ["t0", "t2"]);
        let (rows, next) = table.page(&pending, next.as_deref(), 2).expect("page");
        assert!(rows.is_empty() && next.is_none());

        let (rows, next) = table.page(&all, None, 0).expect("page");
        assert!(rows.is_empty() && next.is_none());
    }

    #[test]
    fn cursors_round_trip_and_foreign_ones_are_typed_errors() {
        let c = encode_cursor(3, 1_700_000_000_000_000, &id("task_1"));
        assert_eq!(
            decode_cursor(&c).expect("cursor"),
            (3, 1_700_000_000_000_000, id("task_1"))
        );
        let table: TaskTable<Task> = TaskTable::default();
        for bad in [
            "",
            "garbage",
            "9|1|task",
            "x|1|task",
            "1|y|task",
            "1|2|bad id",
        ] {
            assert!(
                matches!(decode_cursor(bad), Err(Error::InvalidInput { .. })),
                "{bad}"
            );
            assert!(table.page(&TaskFilter::default(), Some(bad), 5).is_err());
        }
    }

    #[test]
    fn stale_query_takes_expired_leases_oldest_first_up_to_the_limit() {
        let mut table = TaskTable::default();
        for (name, lease) in [("late", Some(30)), ("early", Some(10)), ("none", None)] {
            let t = task(name, "q", 0, &[]);
            table.insert(moved(&t, TaskStatus::Running, 1, lease));
        }
        table.insert(task("pending", "q", 0, &[]));
        let at = |s| epoch() + TimeDelta::seconds(s);
        assert_eq!(ids(&table.expired(at(20), 10)), ["none", "early"]);
        assert_eq!(ids(&table.expired(at(20), 1)), ["none"]);
        assert_eq!(ids(&table.expired(at(31), 10)), ["none", "early", "late"]);
        assert!(table.expired(at(31), 0).is_empty());
        assert_eq!(
            ids(&table.expired(at(10), 10)),
            ["none"],
            "a lease ending at the cut is live"
        );
    }

    #[test]
    fn purge_deletes_finished_rows_beyond_count_or_age_only() {
        let mut table = TaskTable::default();
        for i in 0..5 {
            let t = task(&format!("done{i}"), "q", 0, &[]);
            table.insert(moved(&t, TaskStatus::Completed, i * 10, None));
        }
        table.insert(moved(
            &task("failed", "q", 0, &[]),
            TaskStatus::Failed,
            0,
            None,
        ));
        table.insert(task("old_pending", "q", 0, &[]));
        let now = epoch() + TimeDelta::seconds(45);

        let keep_all = Retention::default();
        assert_eq!(table.purge(&keep_all, now), 0);

        // At most 3 per status: the two oldest COMPLETED go; FAILED has one.
        let by_count = Retention {
            max_age: None,
            max_count: Some(3),
        };
        assert_eq!(
            ids(&table.beyond_retention(&by_count, now)),
            ["done0", "done1"]
        );
        assert_eq!(table.purge(&by_count, now), 2);
        assert_eq!(count(&table, TaskStatus::Completed), 3);

        // Changed more than 20 s before now (at 25): done2 (20), failed (0); not the PENDING one.
        let by_age = Retention {
            max_age: Some(Duration::from_secs(20)),
            max_count: None,
        };
        assert_eq!(table.purge(&by_age, now), 2);
        assert!(table.get(&id("done2")).is_none() && table.get(&id("failed")).is_none());
        assert!(table.get(&id("old_pending")).is_some());
        assert_eq!(table.counts().total(), 3);
    }
}
