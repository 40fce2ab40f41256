//! One task's life in the registry: PENDING, then RUNNING under a worker's lease, then
//! COMPLETED; and why a late write from a worker that lost its lease is refused.
//!
//! `cargo run --example registry_lifecycle` (memory), or with `ORCHESTRA_URL` set.

use std::time::Duration;

use agent_orchestra::connect::drop_namespace;
use agent_orchestra::prelude::*;
use agent_orchestra::{Expected, TaskEvent, EVENTS_TOPIC};

fn show(task: &Task) {
    println!(
        "{:<9} attempt {} worker {:<16} lease until {:?} result {}",
        task.state.status,
        task.state.attempt,
        task.state.worker_id.as_deref().unwrap_or("-"),
        task.state.lease_until,
        task.state.result.clone().unwrap_or_default()
    );
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = Config::load(None)?.or_url("memory://");
    // On a shared broker, a namespace of our own, deleted at the end.
    let scratch = !config.is_memory() && config.prefix.is_empty();
    if scratch {
        config.prefix = format!("example_{:08x}_", rand::random::<u32>());
    }
    let backends = config.connect().await?;
    let dispatcher = Dispatcher::new(backends.clone()).with_limits(config.limits());
    let mut events = backends.bus.subscribe(EVENTS_TOPIC).await?;

    let id = dispatcher
        .task("research_tasks")
        .json(serde_json::json!({ "topic": "quantum computing" }))
        .send()
        .await?;
    show(&dispatcher.get(&id).await?);

    let worker = Worker::new(backends.clone(), config.worker_config())
        .handle(
            "research_tasks",
            handler_fn(|ctx| async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                Ok(serde_json::json!({"summary": format!("notes on {}", ctx.task.payload["topic"].as_str().unwrap_or("?"))}))
            }),
        )?
        .start()?;

    // React to the task's events instead of polling the registry.
    while let Some(bytes) = tokio::time::timeout(Duration::from_secs(10), events.recv()).await? {
        let Some(event) = TaskEvent::decode(&bytes) else {
            continue;
        };
        if event.task_id == id && event.status == TaskStatus::Running {
            show(&dispatcher.get(&id).await?);
            break;
        }
    }
    let done = dispatcher.wait(&id, Duration::from_secs(10)).await?;
    show(&done);

    // A worker that still believes it runs attempt 1 cannot overwrite the finished task:
    // the compare-and-set on (status, attempt) refuses it.
    let late = backends
        .registry
        .transition(
            &id,
            Expected {
                status: TaskStatus::Running,
                attempt: 1,
            },
            done.state.clone(),
        )
        .await;
    println!(
        "a late write from attempt 1: {}",
        late.map(|_| "accepted".to_string())
            .unwrap_or_else(|e| e.to_string())
    );

    worker.shutdown().await;
    if scratch {
        drop_namespace(
            &config.backend_urls(),
            &config.connect_options(),
            &[QueueName::parse("research_tasks")?],
        )
        .await?;
    }
    Ok(())
}
