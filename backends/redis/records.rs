//! Group commit of the worker's outcomes: [`Records`] sends the records of many worker slots in
//! one `record.lua` script per queue.
//!
//! Each [`TaskQueue::record`](crate::task_queue::TaskQueue::record) call hands its arguments to
//! a background task and waits for its own reply. That task takes whatever records are waiting
//! (at most [`BATCH_MAX`] of them, about [`BATCH_BYTES`] of arguments) as soon as fewer than
//! [`IN_FLIGHT`] batches are on their way. A lone record therefore goes out at once, as before;
//! under load the records of the slots that finished during one round trip share the next one.
//! Redis then pays a script call, its argument set-up and the index updates once per batch
//! instead of once per task (docs/performance.md has the figures).
//!
//! Two records of one task never share a batch (the script makes the index moves of a batch
//! once, after its loop): the second waits for the next batch.

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::Mutex;
use redis::Value;
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::conn::{Conn, BACKEND};
use super::scripts;
use crate::error::{Error, Result};
use crate::model::{QueueName, TaskId};

use super::bus::RedisBus;

/// Most records in one script.
pub(crate) const BATCH_MAX: usize = 64;
/// Most argument bytes in one batch (a batch's first record is always taken, however large).
pub(crate) const BATCH_BYTES: usize = 1024 * 1024;
/// Batches on their way at once.
pub(crate) const IN_FLIGHT: usize = 1;

/// One record waiting for its batch.
struct Job {
    queue: QueueName,
    id: TaskId,
    /// The record's arguments (see record.lua), without the script's fixed ones.
    args: redis::Cmd,
    bytes: usize,
    reply: oneshot::Sender<Result<Value>>,
}

/// The batcher of one Redis connection.
pub(crate) struct Records {
    conn: Conn,
    bus: Arc<RedisBus>,
    /// The running batcher's queue; replaced when its task is gone (the runtime that ran it
    /// shut down).
    tx: Mutex<Option<mpsc::UnboundedSender<Job>>>,
}

impl std::fmt::Debug for Records {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Records").finish_non_exhaustive()
    }
}

impl Records {
    pub(crate) fn new(conn: Conn, bus: Arc<RedisBus>) -> Self {
        Records {
            conn,
            bus,
            tx: Mutex::new(None),
        }
    }

    /// Runs one record (its arguments from [`record_args`]) in the next batch of its queue and
    /// returns its own reply.
    pub(crate) async fn run(
        &self,
        queue: &QueueName,
        id: &TaskId,
        args: redis::Cmd,
    ) -> Result<Value> {
        let (reply, rx) = oneshot::channel();
        let bytes = args.args_iter().map(|a| match a {
            redis::Arg::Simple(b) => b.len() + 8,
            _ => 8,
        });
        let mut job = Job {
            queue: queue.clone(),
            id: id.clone(),
            bytes: bytes.sum(),
            args,
            reply,
        };
        // At most two tries: a queue whose batcher is gone is replaced once.
        for _ in 0..2 {
            let tx = self.sender();
            match tx.send(job) {
                Ok(()) => {
                    return rx.await.unwrap_or_else(|_| {
                        Err(Error::temporary(
                            BACKEND,
                            "record: the batch was dropped before it ran (runtime shutting down)",
                            None,
                        ))
                    })
                }
                Err(mpsc::error::SendError(j)) => {
                    job = j;
                    let mut slot = self.tx.lock();
                    if slot.as_ref().is_some_and(|s| s.same_channel(&tx)) {
                        *slot = None;
                    }
                }
            }
        }
        Err(Error::temporary(
            BACKEND,
            "record: could not start the record batcher",
            None,
        ))
    }

    fn sender(&self) -> mpsc::UnboundedSender<Job> {
        let mut slot = self.tx.lock();
        if let Some(tx) = slot.as_ref().filter(|tx| !tx.is_closed()) {
            return tx.clone();
        }
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(batcher(self.conn.clone(), self.bus.clone(), rx));
        *slot = Some(tx.clone());
        tx
    }
}

/// Takes waiting records into batches while fewer than [`IN_FLIGHT`] batches are on their way;
/// ends when every sender is gone.
async fn batcher(conn: Conn, bus: Arc<RedisBus>, mut rx: mpsc::UnboundedReceiver<Job>) {
    let in_flight = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut carry: Option<Job> = None;
    loop {
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let first = match carry.take() {
            Some(j) => j,
            None => match rx.recv().await {
                Some(j) => j,
                None => return,
            },
        };
        let mut bytes = first.bytes;
        let mut jobs = vec![first];
        while jobs.len() < BATCH_MAX {
            let Ok(j) = rx.try_recv() else { break };
            if bytes + j.bytes > BATCH_BYTES || jobs.iter().any(|o| o.id == j.id) {
                carry = Some(j);
                break;
            }
            bytes += j.bytes;
            jobs.push(j);
        }
        let (conn, bus) = (conn.clone(), bus.clone());
        tokio::spawn(async move {
            let _permit = permit;
            run_batch(&conn, &bus, jobs).await;
        });
    }
}

/// One script per queue of the batch, run at once; each record gets its own reply.
async fn run_batch(conn: &Conn, bus: &RedisBus, jobs: Vec<Job>) {
    let mut by_queue: BTreeMap<QueueName, Vec<Job>> = BTreeMap::new();
    for j in jobs {
        by_queue.entry(j.queue.clone()).or_default().push(j);
    }
    futures::future::join_all(
        by_queue
            .into_iter()
            .map(|(queue, jobs)| run_queue(conn, bus, queue, jobs)),
    )
    .await;
}

async fn run_queue(conn: &Conn, bus: &RedisBus, queue: QueueName, jobs: Vec<Job>) {
    let k = bus.keys(&queue);
    let mut cmd = scripts::RECORD.evalsha(6);
    cmd.arg(&k.leases)
        .arg(&k.ready)
        .arg(&k.delayed)
        .arg(&k.inflight)
        .arg(&k.seq)
        .arg(&k.bodies)
        .arg(&k.wake)
        .arg(conn.script_events_channel())
        .arg(&k.task_prefix)
        .arg(&k.status_prefix)
        .arg(&k.dependents_prefix);
    for j in &jobs {
        for a in j.args.args_iter() {
            if let redis::Arg::Simple(b) = a {
                cmd.arg(b);
            }
        }
    }
    match conn.eval_cmd::<Vec<Value>>("record", &cmd).await {
        Ok(replies) if replies.len() == jobs.len() => {
            for (j, r) in jobs.into_iter().zip(replies) {
                let _ = j.reply.send(Ok(r));
            }
        }
        Ok(replies) => {
            let n = replies.len();
            for j in jobs {
                let _ = j.reply.send(Err(Error::permanent(
                    BACKEND,
                    format!("record returned {n} replies for a batch of another size"),
                    None,
                )));
            }
        }
        Err(e) => {
            for j in jobs {
                let _ = j.reply.send(Err(same_error(&e)));
            }
        }
    }
}

/// A copy of a batch's error for each of its records (same kind, same text).
fn same_error(e: &Error) -> Error {
    match e {
        Error::Timeout(what) => Error::Timeout(what.clone()),
        Error::Backend {
            backend,
            temporary,
            message,
            ..
        } => Error::Backend {
            backend,
            temporary: *temporary,
            message: message.clone(),
            source: None,
        },
        e => Error::permanent(BACKEND, e.to_string(), None),
    }
}
