//! The registry's in-process index: a [`TaskTable`] of what the index headers say of each task
//! (status, time of the last change, lease end, queue), with the revision of each task.
//!
//! It follows the task bucket's stream with an ordered push consumer that delivers headers only
//! (the index fields travel as headers on every write, so no payload is ever shipped), starting
//! from the last revision of every key. Reads first ask the stream for its last sequence and
//! wait until the index has applied it, so a read sees every write that was acknowledged before
//! it started. Cost: one stream-info round trip per query, plus each write's headers delivered
//! once to each process that holds a view (only processes that count, list or look for stale
//! tasks: the monitor and the CLI).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{push, DeliverPolicy};
use async_nats::HeaderMap;
use futures::StreamExt;
use parking_lot::Mutex;
use tokio::sync::watch;

use super::kv::{is_marker, Bucket};
use super::names::decode_key;
use super::BACKEND;
use crate::error::{Error, Result};
use crate::model::{QueueName, TaskId, TaskStatus};
use crate::task_table::{Row, TaskTable};

/// Header with the task's status.
pub(crate) const STATUS_HEADER: &str = "Orch-Status";
/// Header with the time of the last change, in microseconds since the epoch.
pub(crate) const UPDATED_HEADER: &str = "Orch-Updated";
/// Header with the end of the lease of a RUNNING task, in microseconds since the epoch.
pub(crate) const LEASE_HEADER: &str = "Orch-Lease";
/// Header with the task's queue.
pub(crate) const QUEUE_HEADER: &str = "Orch-Queue";
/// Header saying whether some task may depend on this one (`1`) or none does (`0`). Revisions
/// written by older versions have none.
pub(crate) const DEPS_HEADER: &str = "Orch-Deps";
/// How long a query waits for the index to catch up before giving up (temporarily).
const SYNC_TIMEOUT: Duration = Duration::from_secs(10);

/// What the index knows of one task.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Indexed {
    pub(crate) id: TaskId,
    pub(crate) status: TaskStatus,
    pub(crate) updated: i64,
    pub(crate) lease: Option<i64>,
    pub(crate) queue: QueueName,
    pub(crate) revision: u64,
    pub(crate) blob: Option<String>,
    /// `Orch-Deps` of the revision (`None`: not written).
    pub(crate) deps: Option<bool>,
}

impl Row for Indexed {
    fn id(&self) -> &TaskId {
        &self.id
    }

    fn status(&self) -> TaskStatus {
        self.status
    }

    fn queue(&self) -> &QueueName {
        &self.queue
    }

    fn changed_at(&self) -> i64 {
        self.updated
    }

    fn lease_until(&self) -> Option<i64> {
        self.lease
    }
}

/// The index itself.
#[derive(Debug, Default)]
pub(crate) struct Index {
    /// What the headers say of each task (dependents live in their own bucket).
    pub(crate) table: TaskTable<Indexed>,
    /// The last stream sequence applied.
    seen: u64,
}

impl Index {
    /// Applies one write of the bucket.
    fn apply(&mut self, key: &str, seq: u64, headers: Option<&HeaderMap>) {
        self.seen = self.seen.max(seq);
        let id = match TaskId::parse(&decode_key(key)) {
            Ok(id) => id,
            Err(_) => return,
        };
        if is_marker(headers) {
            self.table.remove(&id);
            return;
        }
        match parse_indexed(&id, headers, seq) {
            Some(entry) => {
                self.table.upsert(entry);
            }
            None => {
                tracing::debug!(key, "task write without index headers; not indexed");
                self.table.remove(&id);
            }
        }
    }
}

fn parse_indexed(id: &TaskId, headers: Option<&HeaderMap>, revision: u64) -> Option<Indexed> {
    let h = headers?;
    let get = |name: &str| h.get(name).map(|v| v.as_str());
    Some(Indexed {
        id: id.clone(),
        status: get(STATUS_HEADER)?.parse().ok()?,
        updated: get(UPDATED_HEADER)?.parse().ok()?,
        lease: get(LEASE_HEADER).and_then(|v| v.parse().ok()),
        queue: QueueName::parse(get(QUEUE_HEADER)?).ok()?,
        revision,
        blob: get(super::blob::BLOB_HEADER).map(str::to_string),
        deps: get(DEPS_HEADER).map(|v| v != "0"),
    })
}

/// Aborts the follower when the view is dropped.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A followed index of one task bucket.
#[derive(Debug)]
pub(crate) struct View {
    index: Arc<Mutex<Index>>,
    seen: watch::Receiver<u64>,
    bucket: Bucket,
    _follower: AbortOnDrop,
}

impl View {
    /// Starts following `bucket`.
    pub(crate) fn start(bucket: Bucket, client: async_nats::Client) -> View {
        let index = Arc::new(Mutex::new(Index::default()));
        let (tx, rx) = watch::channel(0u64);
        let follower = tokio::spawn(follow(bucket.clone(), client, index.clone(), tx));
        View {
            index,
            seen: rx,
            bucket,
            _follower: AbortOnDrop(follower),
        }
    }

    /// Waits until the index has applied every write acknowledged before this call.
    pub(crate) async fn sync(&self) -> Result<()> {
        let target = self.bucket.last_sequence().await?;
        let mut rx = self.seen.clone();
        let waited = tokio::time::timeout(SYNC_TIMEOUT, async {
            rx.wait_for(|seen| *seen >= target).await.map(|_| ())
        })
        .await;
        match waited {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Error::temporary(
                BACKEND,
                "the registry index stopped",
                None,
            )),
            Err(_) => Err(Error::temporary(
                BACKEND,
                format!(
                    "the registry index is still catching up (at {}, stream at {target})",
                    *self.seen.borrow()
                ),
                None,
            )),
        }
    }

    /// Reads the index.
    pub(crate) fn read<R>(&self, f: impl FnOnce(&Index) -> R) -> R {
        f(&self.index.lock())
    }
}

async fn follow(
    bucket: Bucket,
    client: async_nats::Client,
    index: Arc<Mutex<Index>>,
    tx: watch::Sender<u64>,
) {
    let mut first = true;
    loop {
        let seen = index.lock().seen;
        let deliver_policy = if first {
            DeliverPolicy::LastPerSubject
        } else {
            DeliverPolicy::ByStartSequence {
                start_sequence: seen + 1,
            }
        };
        let config = push::OrderedConfig {
            deliver_subject: client.new_inbox(),
            filter_subject: bucket.all_keys(),
            deliver_policy,
            headers_only: true,
            ..Default::default()
        };
        let consumer = match bucket.stream().create_consumer(config).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(bucket = %bucket.bucket, error = %e, "cannot start following the task bucket; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let mut messages = match consumer.messages().await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(bucket = %bucket.bucket, error = %e, "cannot follow the task bucket; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        first = false;
        while let Some(m) = messages.next().await {
            match m {
                Ok(m) => {
                    let Ok(seq) = m.info().map(|i| i.stream_sequence) else {
                        continue;
                    };
                    let Some(key) = bucket.key_of(m.subject.as_str()) else {
                        continue;
                    };
                    let seen = {
                        let mut idx = index.lock();
                        idx.apply(key, seq, m.headers.as_ref());
                        idx.seen
                    };
                    tx.send_replace(seen);
                }
                Err(e) => {
                    tracing::warn!(bucket = %bucket.bucket, error = %e, "error while following the task bucket");
                }
            }
        }
        tracing::warn!(bucket = %bucket.bucket, "task bucket follower ended; restarting");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, Utc};

    use super::*;
    use crate::registry::TaskFilter;

    fn headers(status: &str, updated: i64, lease: Option<i64>, queue: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(STATUS_HEADER, status);
        h.insert(UPDATED_HEADER, updated.to_string().as_str());
        if let Some(l) = lease {
            h.insert(LEASE_HEADER, l.to_string().as_str());
        }
        h.insert(QUEUE_HEADER, queue);
        h
    }

    fn at(micros: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_micros(micros).expect("time")
    }

    #[test]
    fn writes_of_the_bucket_move_tasks_through_the_shared_table() {
        let mut index = Index::default();
        index.apply("a", 1, Some(&headers("PENDING", 10, None, "q")));
        index.apply("b", 2, Some(&headers("RUNNING", 20, Some(500), "q")));
        index.apply("c", 3, Some(&headers("RUNNING", 30, None, "other")));
        assert_eq!(index.seen, 3);
        let counts = index.table.counts();
        assert_eq!(
            (
                counts.get(TaskStatus::Pending),
                counts.get(TaskStatus::Running)
            ),
            (1, 2)
        );
        // Without a lease end a RUNNING task is stale at once; `b` only after its lease.
        let stale = |index: &Index, t| -> Vec<String> {
            index
                .table
                .expired(at(t), 10)
                .iter()
                .map(|r| r.id.to_string())
                .collect()
        };
        assert_eq!(stale(&index, 100), ["c"]);
        assert_eq!(stale(&index, 501), ["c", "b"]);

        // A renewed lease (a new revision) replaces the old row in every index.
        index.apply("b", 4, Some(&headers("RUNNING", 40, Some(900), "q")));
        assert_eq!(stale(&index, 501), ["c"]);
        assert_eq!(
            index
                .table
                .get(&TaskId::parse("b").expect("id"))
                .map(|r| r.revision),
            Some(4)
        );

        let filter = TaskFilter {
            status: Some(TaskStatus::Running),
            queue: Some(QueueName::parse("q").expect("queue")),
        };
        let (rows, _) = index.table.page(&filter, None, 10).expect("page");
        assert_eq!(rows.len(), 1);

        // A delete marker, and a write without index headers, both drop the task.
        let mut marker = HeaderMap::new();
        marker.insert("KV-Operation", "DEL");
        index.apply("b", 5, Some(&marker));
        index.apply("c", 6, None);
        assert_eq!(index.table.len(), 1);
        assert_eq!(stale(&index, 10_000), Vec::<String>::new());
        assert_eq!(index.seen, 6);
    }
}
