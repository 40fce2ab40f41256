//! The lab's Researcher → Writer pipeline, without polling: the Writer's task depends on the
//! Researcher's, waits in WAITING until it completes, and reads its result from the context.
//!
//! `cargo run --example research_pipeline` (memory), or with `ORCHESTRA_URL` set.

use std::time::Duration;

use agent_orchestra::config::Config;
use agent_orchestra::engine::{
    handler_fn, typed, DispatchOptions, Dispatcher, TaskContext, TaskError, Worker,
};
use agent_orchestra::Retention;
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct Research {
    topic: String,
}

#[derive(Serialize)]
struct Findings {
    topic: String,
    findings: Vec<String>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = Config::load(None)?;
    if !config.is_memory() && config.prefix.is_empty() {
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
        let parents = ctx.parent_results().await?;
        let (_, research) = parents
            .first()
            .ok_or_else(|| TaskError::permanent("no research"))?;
        let topic = research["topic"].as_str().unwrap_or("?");
        let findings: Vec<&str> = research["findings"]
            .as_array()
            .map(|f| f.iter().filter_map(|x| x.as_str()).collect())
            .unwrap_or_default();
        Ok(serde_json::json!({ "draft": format!("A report on {topic}: {}.", findings.join("; ")) }))
    });
    let worker = Worker::new(backends.clone(), config.worker_config())
        .handle("research_tasks", researcher)?
        .handle("writing_tasks", writer)?
        .start()?;

    let dispatcher = Dispatcher::new(backends.clone()).with_limits(config.limits());
    let research = dispatcher
        .dispatch(
            "research_tasks",
            serde_json::json!({"topic": "quantum computing"}),
            5,
            DispatchOptions::default(),
        )
        .await?;
    let draft = dispatcher
        .dispatch(
            "writing_tasks",
            serde_json::json!({}),
            5,
            DispatchOptions::default().after([research.clone()]),
        )
        .await?;

    let done = dispatcher.wait(&draft, Duration::from_secs(30)).await?;
    println!(
        "writer {}: {}",
        done.state.status,
        done.state.result.unwrap_or_default()["draft"]
    );

    worker.shutdown().await;
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
