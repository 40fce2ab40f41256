//! The per-status index shared by the registries that keep their index in process (memory, and
//! the NATS and RabbitMQ views): one ordered set per status of `(last change in µs, id)`, walked
//! in pages with an opaque cursor.

use std::collections::BTreeSet;
use std::ops::Bound;

use chrono::{DateTime, Utc};

use crate::error::{Error, Result};
use crate::model::{TaskId, TaskStatus};
use crate::registry::{Retention, StatusCounts};

/// An index entry: (time in µs since the epoch, task id).
pub(crate) type IndexKey = (i64, TaskId);

/// One ordered set per status, in [`TaskStatus::ALL`] order.
pub(crate) type StatusSets = [BTreeSet<IndexKey>; 6];

/// The position of `s` in [`TaskStatus::ALL`].
pub(crate) fn slot(s: TaskStatus) -> usize {
    TaskStatus::ALL.iter().position(|x| *x == s).unwrap_or(0)
}

fn encode_cursor(status: usize, key: &IndexKey) -> String {
    format!("{status}|{}|{}", key.0, key.1)
}

fn decode_cursor(c: &str) -> Result<(usize, IndexKey)> {
    let bad = || Error::invalid("cursor", format!("{c:?} is not a cursor returned by list"));
    let mut parts = c.splitn(3, '|');
    let status: usize = parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    let at: i64 = parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    let id = TaskId::parse(parts.next().ok_or_else(bad)?).map_err(|_| bad())?;
    if status >= TaskStatus::ALL.len() {
        return Err(bad());
    }
    Ok((status, (at, id)))
}

/// One page of ids from `sets`: the given status (or all, in life order), oldest change first,
/// after `cursor`, keeping only ids `keep` accepts, at most `limit`. Returns the ids and the
/// cursor of the next page (`None` at the end).
pub(crate) fn page(
    sets: &StatusSets,
    status: Option<TaskStatus>,
    cursor: Option<&str>,
    limit: usize,
    mut keep: impl FnMut(&TaskId) -> bool,
) -> Result<(Vec<TaskId>, Option<String>)> {
    let after = cursor.map(decode_cursor).transpose()?;
    let slots: Vec<usize> = match status {
        Some(s) => vec![slot(s)],
        None => (0..TaskStatus::ALL.len()).collect(),
    };
    let mut ids = Vec::new();
    let mut last: Option<(usize, &IndexKey)> = None;
    'outer: for s in slots {
        let range: Box<dyn Iterator<Item = &IndexKey>> = match &after {
            Some((cs, _)) if s < *cs => continue,
            Some((cs, key)) if *cs == s => {
                Box::new(sets[s].range((Bound::Excluded(key.clone()), Bound::Unbounded)))
            }
            _ => Box::new(sets[s].iter()),
        };
        for key in range {
            if !keep(&key.1) {
                continue;
            }
            if ids.len() == limit {
                break 'outer;
            }
            ids.push(key.1.clone());
            last = Some((s, key));
        }
    }
    let more = ids.len() == limit && limit > 0;
    let next = if more {
        last.map(|(s, k)| encode_cursor(s, k))
    } else {
        None
    };
    Ok((ids, next))
}

/// Tasks per status: the sizes of the sets.
pub(crate) fn counts(sets: &StatusSets) -> StatusCounts {
    StatusCounts(
        TaskStatus::ALL
            .iter()
            .map(|s| (*s, sets[slot(*s)].len() as u64))
            .collect(),
    )
}

/// Ids in a lease index `(lease end in µs, id)` whose lease ended before `before`, oldest
/// first, at most `limit`.
pub(crate) fn expired(
    leases: &BTreeSet<IndexKey>,
    before: DateTime<Utc>,
    limit: usize,
) -> Vec<TaskId> {
    let cut = before.timestamp_micros();
    leases
        .iter()
        .take_while(|(until, _)| *until < cut)
        .take(limit)
        .map(|(_, id)| id.clone())
        .collect()
}

/// Finished tasks (COMPLETED, FAILED, CANCELLED) beyond `retention` at `now`: per status, the
/// oldest beyond `max_count`, and those that changed longer ago than `max_age`.
pub(crate) fn beyond_retention(
    sets: &StatusSets,
    retention: &Retention,
    now: DateTime<Utc>,
) -> Vec<TaskId> {
    let cut = retention
        .max_age
        .map(|age| crate::clock::before(now, age).timestamp_micros());
    let mut doomed = Vec::new();
    for status in [
        TaskStatus::Completed,
        TaskStatus::Failed,
        TaskStatus::Cancelled,
    ] {
        let index = &sets[slot(status)];
        let by_count = retention
            .max_count
            .map_or(0, |keep| index.len().saturating_sub(keep as usize));
        for (i, (at, id)) in index.iter().enumerate() {
            let too_many = i < by_count;
            let too_old = cut.is_some_and(|c| *at < c);
            if !(too_many || too_old) {
                break;
            }
            doomed.push(id.clone());
        }
    }
    doomed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_follow_the_cursor_to_the_end_and_bad_cursors_are_typed_errors() {
        let mut sets: StatusSets = Default::default();
        for i in 0..7 {
            let id = TaskId::parse(&format!("t{i}")).unwrap();
            sets[slot(if i < 4 {
                TaskStatus::Pending
            } else {
                TaskStatus::Running
            })]
            .insert((i, id));
        }
        let mut seen = Vec::new();
        let mut cursor = None;
        loop {
            let (ids, next) = page(&sets, None, cursor.as_deref(), 3, |_| true).unwrap();
            seen.extend(ids);
            match next {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        assert_eq!(seen.len(), 7);
        let (pending, _) = page(&sets, Some(TaskStatus::Pending), None, 10, |_| true).unwrap();
        assert_eq!(pending.len(), 4);
        assert!(page(&sets, None, Some("garbage"), 3, |_| true).is_err());
    }
}
