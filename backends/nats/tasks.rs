//! [`NatsTaskQueue`]: the worker's hot path when the bus and the registry share a connection.
//!
//! Every step is [`Composed`]'s, with one shortcut in `claim`: a message this connection
//! enqueued, on its first delivery, names a task this process created, so the registry's own
//! copy of the task is almost surely the latest. The claim is then one compare-and-set at that
//! copy's revision, without reading the task first (one round trip and one server read fewer
//! per task). If another process changed the task meanwhile, the compare-and-set fails on the
//! revision and the claim goes the usual way (read, decide, compare-and-set), so the outcome is
//! always the one a fresh read would have given.

use std::sync::Arc;

use async_trait::async_trait;

use super::{NatsBus, NatsRegistry, Shared};
use crate::bus::{Bus, Delivery, FetchOptions};
use crate::error::Result;
use crate::model::{QueueName, Task, TaskState};
use crate::registry::Registry;
use crate::task_queue::{Claim, ClaimSpec, Composed, Recorded, Settle, TaskQueue};
use crate::wire::TaskMessage;

/// The NATS [`TaskQueue`].
#[derive(Debug)]
pub struct NatsTaskQueue {
    shared: Shared,
    bus: Arc<NatsBus>,
    registry: Arc<NatsRegistry>,
    composed: Composed,
}

impl NatsTaskQueue {
    pub(crate) fn new(shared: Shared, bus: Arc<NatsBus>, registry: Arc<NatsRegistry>) -> Self {
        NatsTaskQueue {
            composed: Composed::new(
                bus.clone() as Arc<dyn Bus>,
                registry.clone() as Arc<dyn Registry>,
            ),
            shared,
            bus,
            registry,
        }
    }

    /// Whether this connection enqueued the delivered message and this is its first delivery.
    fn fresh(&self, delivery: &Delivery) -> bool {
        delivery.delivery_count == 1 && delivery.message_id.starts_with(&*self.shared.origin)
    }
}

#[async_trait]
impl TaskQueue for NatsTaskQueue {
    async fn submit(&self, tasks: &[Task]) -> Result<Vec<Result<()>>> {
        self.composed.submit(tasks).await
    }

    async fn fetch_claim(
        &self,
        queue: &QueueName,
        options: FetchOptions,
        spec: &ClaimSpec,
    ) -> Result<Vec<(Delivery, Option<Claim>)>> {
        self.composed.fetch_claim(queue, options, spec).await
    }

    async fn claim(&self, delivery: &Delivery, spec: &ClaimSpec) -> Result<Claim> {
        if self.fresh(delivery) {
            if let Ok(m) = TaskMessage::decode(&delivery.payload) {
                if let Some(claimed) = self.registry.claim_cached(&m.task_id, spec).await {
                    let running = claimed?;
                    crate::bus::publish_event(self.bus.as_ref(), &running).await;
                    return Ok(Claim::Claimed(running));
                }
            }
        }
        self.composed.claim(delivery, spec).await
    }

    async fn record(
        &self,
        delivery: &Delivery,
        current: &Task,
        next: TaskState,
        settle: Settle,
    ) -> Result<Recorded> {
        self.composed.record(delivery, current, next, settle).await
    }
}
