//! Schedules on NATS: one key `schedule:<name>` per schedule (its JSON) in the control bucket
//! `{prefix}orch_tasks_control` (control.rs; created by the first write, reads create
//! nothing). Each write is a compare-and-set on the key's revision, so concurrent writers
//! of one schedule leave one of them whole; the listing reads the keys the bucket's stream
//! names.

use async_nats::HeaderMap;
use futures::StreamExt;

use super::control::bucket;
use super::errors::nats_err;
use super::kv::{Bucket, Write};
use super::names::encode_key;
use super::Shared;
use crate::error::{Error, Result};
use crate::schedule::{Schedule, ScheduleName};

/// Tries of a compare-and-set on one schedule before giving up (temporary).
const CAS_TRIES: usize = 50;

/// The key of a schedule (not yet encoded).
fn key(name: &ScheduleName) -> String {
    format!("schedule:{name}")
}

/// [`Registry::schedules`](crate::Registry::schedules): every `schedule:` key of the bucket,
/// read; a value that is no schedule (written by hand) is skipped with a warning.
pub(crate) async fn schedules(shared: &Shared) -> Result<Vec<Schedule>> {
    let Some(bucket) = bucket(shared, false).await? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for key in schedule_keys(&bucket).await? {
        let Some(entry) = bucket.get(&key).await? else {
            continue; // deleted meanwhile
        };
        if !entry.live {
            continue;
        }
        match serde_json::from_slice::<Schedule>(entry.value()) {
            Ok(s) => out.push(s),
            Err(e) => tracing::warn!(key, error = %e, "a stored schedule is not readable; skipped"),
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The (decoded) schedule keys the bucket's stream holds, deleted ones included.
async fn schedule_keys(bucket: &Bucket) -> Result<Vec<String>> {
    let what = "cannot list the schedules";
    let mut subjects = bucket
        .stream()
        .info_with_subjects(bucket.all_keys())
        .await
        .map_err(|e| nats_err(what, e))?;
    let prefix = encode_key("schedule:");
    let mut keys = Vec::new();
    while let Some(entry) = subjects.next().await {
        let (subject, _) = entry.map_err(|e| nats_err(what, e))?;
        if let Some(name) = bucket
            .key_of(&subject)
            .and_then(|k| k.strip_prefix(prefix.as_str()))
        {
            if let Ok(name) = ScheduleName::parse(name) {
                keys.push(key(&name));
            }
        }
    }
    Ok(keys)
}

/// [`Registry::put_schedule`](crate::Registry::put_schedule): write over the revision read;
/// again when another writer came between.
pub(crate) async fn put(shared: &Shared, schedule: &Schedule) -> Result<bool> {
    let Some(bucket) = bucket(shared, true).await? else {
        return Err(gone());
    };
    let key = key(&schedule.name);
    let value = serde_json::to_vec(schedule).unwrap_or_default();
    for _ in 0..CAS_TRIES {
        let (revision, new) = match bucket.get(&key).await? {
            None => (0, true),
            Some(e) => (e.revision(), !e.live),
        };
        match bucket
            .put(&key, HeaderMap::new(), value.clone(), revision)
            .await?
        {
            Write::Done(_) => return Ok(new),
            Write::Stale => continue,
        }
    }
    Err(busy(&schedule.name))
}

/// [`Registry::remove_schedule`](crate::Registry::remove_schedule): a delete marker over the
/// revision read.
pub(crate) async fn remove(shared: &Shared, name: &ScheduleName) -> Result<bool> {
    let Some(bucket) = bucket(shared, false).await? else {
        return Ok(false); // nothing was ever stored here
    };
    let key = key(name);
    for _ in 0..CAS_TRIES {
        let entry = match bucket.get(&key).await? {
            Some(e) if e.live => e,
            _ => return Ok(false),
        };
        match bucket.delete(&key, entry.revision()).await? {
            Write::Done(_) => return Ok(true),
            Write::Stale => continue,
        }
    }
    Err(busy(name))
}

fn busy(name: &ScheduleName) -> Error {
    Error::temporary(
        super::BACKEND,
        format!("schedule {name} changed {CAS_TRIES} times while this write was made; try again"),
        None,
    )
}

fn gone() -> Error {
    Error::temporary(
        super::BACKEND,
        "the control bucket could not be opened",
        None,
    )
}
