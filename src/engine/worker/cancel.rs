//! Cancelling a running task: the worker's side.
//!
//! [`Dispatcher::cancel`](crate::engine::Dispatcher::cancel) moves a RUNNING task to CANCELLED
//! by compare-and-set (which fences the running attempt off: its outcome can no longer be
//! recorded), then publishes a [`CancelNotice`] on the bus topic [`CANCELS_TOPIC`]. Each worker
//! listens to that topic and sets the cancellation signal of the attempt it runs. A notice is an
//! event (at-most-once): a worker that missed it finds out at the attempt's next heartbeat,
//! whose compare-and-set fails on the CANCELLED task. Either way the handler gets
//! [`WorkerConfig::cancel_grace`] to return, and is dropped after that.

use serde::{Deserialize, Serialize};

use super::*;

/// The bus topic cancellations of running tasks are announced on.
pub const CANCELS_TOPIC: &str = "cancels";

/// "Attempt `attempt` of task `task_id` was cancelled": sent after the registry says so.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelNotice {
    /// The task.
    pub task_id: TaskId,
    /// The attempt that was running when it was cancelled.
    pub attempt: u32,
}

impl CancelNotice {
    pub(crate) fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// The cancellation signals of the attempts a worker runs, by task.
pub(super) type Signals = parking_lot::Mutex<HashMap<TaskId, (u32, watch::Sender<bool>)>>;

/// Keeps an attempt's cancellation signal reachable by notices while alive.
pub(super) struct Reachable<'a>(&'a Inner, TaskId);

impl<'a> Reachable<'a> {
    pub(super) fn enter(
        inner: &'a Inner,
        task: &Task,
    ) -> (Self, watch::Sender<bool>, Cancellation) {
        let (tx, signal) = Cancellation::channel();
        inner
            .cancels
            .lock()
            .insert(task.task_id.clone(), (task.state.attempt, tx.clone()));
        (Reachable(inner, task.task_id.clone()), tx, signal)
    }
}

impl Drop for Reachable<'_> {
    fn drop(&mut self) {
        self.0.cancels.lock().remove(&self.1);
    }
}

/// Sets the signal of the attempt a notice names, if this worker runs it.
pub(super) fn deliver(inner: &Inner, notice: &CancelNotice) {
    if let Some((attempt, tx)) = inner.cancels.lock().get(&notice.task_id) {
        if *attempt == notice.attempt {
            tracing::info!(task_id = %notice.task_id, attempt, "cancelled by an operator; signalling the handler");
            let _ = tx.send(true);
        }
    }
}

/// Listens to cancel notices until `kill` flips or the worker's handle drops the task.
/// A subscription that ends (the bus reconnected) is made again after a short pause.
pub(super) async fn listen(inner: Arc<Inner>, mut kill: watch::Receiver<bool>) {
    loop {
        let sub = tokio::select! {
            s = inner.backends.bus.subscribe(CANCELS_TOPIC) => s,
            _ = kill.changed() => return,
        };
        match sub {
            Ok(mut sub) => loop {
                let next = tokio::select! {
                    n = sub.recv() => n,
                    _ = kill.changed() => return,
                };
                let Some(bytes) = next else { break };
                if let Ok(notice) = serde_json::from_slice::<CancelNotice>(&bytes) {
                    deliver(&inner, &notice);
                }
            },
            Err(e) => {
                tracing::warn!(worker_id = %inner.worker_id, error = %e, "cannot listen for cancellations now (a cancelled task is still stopped at its next heartbeat); trying again");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = kill.changed() => return,
        }
    }
}
