//! The operator's controls on NATS: the paused queues, as a JSON list in the one key `paused`
//! of the bucket `{prefix}orch_tasks_control` (created by the first pause; reads create
//! nothing), changed by compare-and-set on its revision; the queues' runtime limits, likewise
//! a JSON map (queue → limits) in the key `limits` of the same bucket; and the removal of dead letters from a
//! queue's dead-letter stream (`STREAM.MSG.DELETE` of each named one, found by its id header,
//! with its payload's blob).

use std::collections::{BTreeMap, BTreeSet};

use async_nats::HeaderMap;
use futures::future::join_all;

use super::blob::{BlobRef, Blobs};
use super::bus::js_not_found;
use super::errors::{js_code, nats_err};
use super::kv::{Bucket, Write};
use super::queue::{header, ID_HEADER};
use super::Shared;
use crate::error::{Error, Result};
use crate::model::QueueName;
use crate::queue_limits::{apply_limits, QueueLimits};

/// The key holding the paused queues.
const PAUSED_KEY: &str = "paused";
/// The key holding the queues' limits.
const LIMITS_KEY: &str = "limits";
/// Tries of a compare-and-set on the paused queues before giving up (temporary).
const CAS_TRIES: usize = 50;
/// Dead letters read at once while looking for those to delete.
const SCAN_CHUNK: u64 = 256;

fn bucket_name(shared: &Shared) -> String {
    format!("{}_control", shared.names.task_bucket())
}

/// The control bucket; `None` when it does not exist and `create` is false.
pub(super) async fn bucket(shared: &Shared, create: bool) -> Result<Option<Bucket>> {
    let name = bucket_name(shared);
    if !create {
        match shared.js.get_stream(format!("KV_{name}")).await {
            Ok(_) => {}
            Err(e) if js_not_found(&e.kind()) => return Ok(None),
            Err(e) => return Err(nats_err("look for the control bucket", e)),
        }
    }
    Bucket::open(shared.clone(), name, None).await.map(Some)
}

/// The paused queues as stored, and the revision to write over (0: no key yet).
async fn read(bucket: &Bucket) -> Result<(BTreeSet<QueueName>, u64)> {
    let Some(entry) = bucket.get(PAUSED_KEY).await? else {
        return Ok((BTreeSet::new(), 0));
    };
    if !entry.live {
        return Ok((BTreeSet::new(), entry.revision()));
    }
    let names: Vec<String> = serde_json::from_slice(entry.value()).map_err(|e| {
        Error::permanent(
            super::BACKEND,
            format!(
                "the paused queues in {} are not a JSON list: {e}",
                bucket.bucket
            ),
            None,
        )
    })?;
    let set = names
        .iter()
        .filter_map(|n| QueueName::parse(n).ok())
        .collect();
    Ok((set, entry.revision()))
}

/// [`Registry::paused_queues`](crate::Registry::paused_queues).
pub(crate) async fn paused_queues(shared: &Shared) -> Result<BTreeSet<QueueName>> {
    match bucket(shared, false).await? {
        Some(b) => Ok(read(&b).await?.0),
        None => Ok(BTreeSet::new()),
    }
}

/// [`Registry::set_queue_paused`](crate::Registry::set_queue_paused): read, change, write by
/// compare-and-set on the revision read; again when another writer came between.
pub(crate) async fn set_paused(shared: &Shared, queue: &QueueName, paused: bool) -> Result<bool> {
    let Some(bucket) = bucket(shared, paused).await? else {
        // Nothing was ever paused here.
        return Ok(false);
    };
    for _ in 0..CAS_TRIES {
        let (mut set, revision) = read(&bucket).await?;
        let changed = match paused {
            true => set.insert(queue.clone()),
            false => set.remove(queue),
        };
        if !changed {
            return Ok(false);
        }
        let names: Vec<&str> = set.iter().map(|q| q.as_str()).collect();
        let value = serde_json::to_vec(&names).unwrap_or_default();
        match bucket
            .put(PAUSED_KEY, HeaderMap::new(), value, revision)
            .await?
        {
            Write::Done(_) => return Ok(true),
            Write::Stale => continue,
        }
    }
    Err(Error::temporary(
        super::BACKEND,
        format!(
            "the paused queues changed {CAS_TRIES} times while this pause was written; try again"
        ),
        None,
    ))
}

/// The queues' limits as stored, and the revision to write over (0: no key yet).
async fn read_limits(bucket: &Bucket) -> Result<(BTreeMap<QueueName, QueueLimits>, u64)> {
    let Some(entry) = bucket.get(LIMITS_KEY).await? else {
        return Ok((BTreeMap::new(), 0));
    };
    if !entry.live {
        return Ok((BTreeMap::new(), entry.revision()));
    }
    let stored: BTreeMap<String, serde_json::Value> = serde_json::from_slice(entry.value())
        .map_err(|e| {
            Error::permanent(
                super::BACKEND,
                format!(
                    "the queues' limits in {} are not a JSON map: {e}",
                    bucket.bucket
                ),
                None,
            )
        })?;
    // An entry that is no queue or no limits (written by hand) is skipped.
    let map = stored
        .into_iter()
        .filter_map(|(q, l)| Some((QueueName::parse(&q).ok()?, serde_json::from_value(l).ok()?)))
        .collect();
    Ok((map, entry.revision()))
}

/// [`Registry::queue_limits`](crate::Registry::queue_limits).
pub(crate) async fn queue_limits(shared: &Shared) -> Result<BTreeMap<QueueName, QueueLimits>> {
    match bucket(shared, false).await? {
        Some(b) => Ok(read_limits(&b).await?.0),
        None => Ok(BTreeMap::new()),
    }
}

/// [`Registry::set_queue_limits`](crate::Registry::set_queue_limits): read, change, write by
/// compare-and-set on the revision read; again when another writer came between.
pub(crate) async fn set_limits(
    shared: &Shared,
    queue: &QueueName,
    limits: &QueueLimits,
) -> Result<bool> {
    limits.validate()?;
    let Some(bucket) = bucket(shared, !limits.is_unlimited()).await? else {
        // No limit was ever set here.
        return Ok(false);
    };
    for _ in 0..CAS_TRIES {
        let (mut map, revision) = read_limits(&bucket).await?;
        if !apply_limits(&mut map, queue, limits) {
            return Ok(false);
        }
        let value = serde_json::to_vec(&map).unwrap_or_default();
        match bucket
            .put(LIMITS_KEY, HeaderMap::new(), value, revision)
            .await?
        {
            Write::Done(_) => return Ok(true),
            Write::Stale => continue,
        }
    }
    Err(Error::temporary(
        super::BACKEND,
        format!(
            "the queues' limits changed {CAS_TRIES} times while this one was written; try again"
        ),
        None,
    ))
}

/// [`Bus::remove_dead_letters`](crate::Bus::remove_dead_letters): scans the dead-letter stream
/// for the named ids and deletes each one found (and its blob). O(dead letters).
pub(crate) async fn remove_dead_letters(
    shared: &Shared,
    blobs: &Blobs,
    queue: &QueueName,
    ids: &[String],
) -> Result<Vec<String>> {
    let mut wanted: BTreeSet<&str> = ids.iter().map(|s| s.as_str()).collect();
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let mut stream = match shared.js.get_stream(shared.names.dead_stream(queue)).await {
        Ok(s) => s,
        Err(e) if js_not_found(&e.kind()) => return Ok(Vec::new()),
        Err(e) => return Err(nats_err("cannot open the dead letters", e)),
    };
    let state = stream
        .info()
        .await
        .map_err(|e| nats_err("cannot read the dead letters", e))?
        .state
        .clone();
    let mut removed = Vec::new();
    if state.messages == 0 {
        return Ok(removed);
    }
    let stream = &stream;
    let mut seq = state.first_sequence.max(1);
    while seq <= state.last_sequence && !wanted.is_empty() {
        let end = (seq + SCAN_CHUNK - 1).min(state.last_sequence);
        let got = join_all((seq..=end).map(|s| async move {
            match stream.direct_get(s).await {
                Ok(m) => Ok(Some((s, m))),
                Err(e)
                    if e.kind() == async_nats::jetstream::stream::DirectGetErrorKind::NotFound =>
                {
                    Ok(None)
                }
                Err(e) => Err(nats_err("cannot read a dead letter", e)),
            }
        }))
        .await;
        for m in got {
            let Some((s, m)) = m? else { continue };
            let h = Some(&m.headers);
            let Some(id) = header(h, ID_HEADER) else {
                continue;
            };
            if !wanted.contains(id) {
                continue;
            }
            let blob = BlobRef::from_headers(h).ok().flatten();
            match stream.delete_message(s).await {
                Ok(_) => {}
                // Deleted meanwhile by another call: not ours to report.
                // (10037: no message found; 10057: the delete failed, the message being gone.)
                Err(e) if matches!(js_code(&e.kind()), Some(10037 | 10057)) => continue,
                Err(e) => return Err(nats_err("cannot delete a dead letter", e)),
            }
            if let Some(b) = blob {
                if let Err(e) = blobs.delete(&b).await {
                    tracing::warn!(error = %e, "a deleted dead letter's payload chunks stay");
                }
            }
            wanted.remove(id);
            removed.push(id.to_string());
        }
        seq = end + 1;
    }
    Ok(removed)
}
