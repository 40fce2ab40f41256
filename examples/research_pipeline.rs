//! The lab's Researcher → Writer pipeline, without polling: the Writer's task depends on the
//! Researcher's, waits in WAITING until it completes, and reads its result from the context.
//!
//! `cargo run --example research_pipeline` (memory), or with `ORCHESTRA_URL` set.

use std::time::Duration;

use agent_orchestra::connect::drop_namespace;
use agent_orchestra::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Research {
    topic: String,
}

#[derive(Serialize, Deserialize)]
struct Findings {
    topic: String,
    findings: Vec<String>,
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

    let researcher = typed(|r: Research, _ctx: TaskContext| async move {
        Ok::<_, TaskError>(Findings {
            findings: vec![
                format!("{} is moving fast", r.topic),
                "three vendors lead".into(),
            ],
            topic: r.topic,
        })
    });
    let writer = handler_fn(|ctx: TaskContext| async move {
        // The Researcher's result, typed: a result of another shape fails the task at once.
        let research: Findings = ctx.parent_result().await?;
        let draft = format!(
            "A report on {}: {}.",
            research.topic,
            research.findings.join("; ")
        );
        Ok(serde_json::json!({ "draft": draft }))
    });
    let worker = Worker::new(backends.clone(), config.worker_config())
        .handle("research_tasks", researcher)?
        .handle("writing_tasks", writer)?
        .start()?;

    let dispatcher = Dispatcher::new(backends.clone()).with_limits(config.limits());
    let research = dispatcher
        .task("research_tasks")
        .payload(&Research {
            topic: "quantum computing".into(),
        })
        .send()
        .await?;
    let draft = dispatcher
        .task("writing_tasks")
        .after([research.clone()])
        .send()
        .await?;

    let done = dispatcher.wait(&draft, Duration::from_secs(30)).await?;
    println!(
        "writer {}: {}",
        done.state.status,
        done.state.result.unwrap_or_default()["draft"]
    );

    worker.shutdown().await;
    if scratch {
        drop_namespace(
            &config.backend_urls(),
            &config.connect_options(),
            &[
                QueueName::parse("research_tasks")?,
                QueueName::parse("writing_tasks")?,
            ],
        )
        .await?;
    }
    Ok(())
}
