//! A backlog with mixed priorities, drained by one worker with one slot: urgent tasks (priority
//! 1) run first. A monitor prints its snapshot (counts by status) while the backlog drains.
//!
//! `cargo run --example priorities_with_monitor` (memory), or with `ORCHESTRA_URL` set.

use std::time::Duration;

use agent_orchestra::connect::drop_namespace;
use agent_orchestra::prelude::*;

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

    // Dispatched while no worker runs: the tasks wait on the queue, none is lost.
    let mut ids = Vec::new();
    for (priority, title) in [
        (5, "weekly report"),
        (9, "newsletter"),
        (1, "outage"),
        (3, "bug triage"),
        (1, "security alert"),
        (10, "cleanup"),
    ] {
        ids.push(
            dispatcher
                .task("triage")
                .json(serde_json::json!({ "title": title }))
                .priority(priority)
                .send()
                .await?,
        );
    }

    let monitor = Monitor::new(
        backends.clone(),
        MonitorConfig {
            interval: Duration::from_millis(100),
            ..config.monitor_config()
        },
    )
    .start(|report| println!("  monitor: {}", report.counts))?;
    let worker = Worker::new(
        backends.clone(),
        WorkerConfig {
            concurrency: 1,
            ..config.worker_config()
        },
    )
    .handle(
        "triage",
        handler_fn(|ctx| async move {
            println!(
                "running p{} {}",
                ctx.task.priority,
                ctx.task.payload["title"].as_str().unwrap_or("?")
            );
            tokio::time::sleep(Duration::from_millis(60)).await;
            Ok(serde_json::Value::Null)
        }),
    )?
    .start()?;

    for id in &ids {
        dispatcher.wait(id, Duration::from_secs(30)).await?;
    }
    worker.shutdown().await;
    monitor.shutdown().await;
    if scratch {
        drop_namespace(
            &config.backend_urls(),
            &config.connect_options(),
            &[QueueName::parse("triage")?],
        )
        .await?;
    }
    Ok(())
}
