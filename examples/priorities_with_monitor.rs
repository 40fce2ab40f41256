//! A backlog with mixed priorities, drained by one worker with one slot: urgent tasks (priority
//! 1) run first. A monitor prints its snapshot (counts by status) while the backlog drains.
//!
//! `cargo run --example priorities_with_monitor` (memory), or with `ORCHESTRA_URL` set.

use std::time::Duration;

use agent_orchestra::config::Config;
use agent_orchestra::engine::{
    handler_fn, DispatchOptions, Dispatcher, Monitor, MonitorConfig, Worker, WorkerConfig,
};
use agent_orchestra::Retention;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = Config::load(None)?;
    if !config.is_memory() && config.prefix.is_empty() {
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
                .dispatch(
                    "triage",
                    serde_json::json!({"title": title}),
                    priority,
                    DispatchOptions::default(),
                )
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
    if !config.is_memory() {
        backends
            .registry
            .purge_finished(&Retention {
                max_age: None,
                max_count: Some(0),
            })
            .await?;
    }
    Ok(())
}
