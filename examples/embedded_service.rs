//! agent-orchestra embedded in a service: one [`Config`] (file, environment), a worker and a
//! monitor in the background, and a graceful shutdown on Ctrl-C or SIGTERM that finishes (or
//! hands back) running tasks.
//!
//! ```text
//! cargo run --example embedded_service             # processes a demo batch, then stops
//! cargo run --example embedded_service -- --serve  # keeps serving until Ctrl-C
//! cargo run --example embedded_service -- --serve --for 3s
//! ```
//! With `ORCHESTRA_URL` (and friends) set, it serves a broker instead of memory.

use std::time::Duration;

use agent_orchestra::config::parse_duration;
use agent_orchestra::connect::drop_namespace;
use agent_orchestra::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Summarize {
    text: String,
}

#[derive(Serialize)]
struct Summary {
    words: usize,
}

async fn summarize(input: Summarize, _ctx: TaskContext) -> Result<Summary, TaskError> {
    tokio::time::sleep(Duration::from_millis(20)).await;
    Ok(Summary {
        words: input.text.split_whitespace().count(),
    })
}

/// Resolves on Ctrl-C, or SIGTERM on Unix (what a service manager sends).
async fn shutdown_signal() {
    #[cfg(unix)]
    if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    {
        tokio::select! { _ = tokio::signal::ctrl_c() => {}, _ = term.recv() => {} }
        return;
    }
    let _ = tokio::signal::ctrl_c().await;
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let serve = args.iter().any(|a| a == "--serve");
    let run_for = match args.iter().position(|a| a == "--for") {
        Some(i) => Some(parse_duration(
            args.get(i + 1).ok_or("--for needs a duration")?,
        )?),
        None => None,
    };

    let mut config = Config::load(None)?.or_url("memory://"); // ORCHESTRA_CONFIG, ORCHESTRA_URL, ...
                                                              // The self-contained demo batch gets a namespace of its own on a shared broker, deleted at
                                                              // the end; a service (--serve) keeps the configured one.
    let scratch = !serve && !config.is_memory() && config.prefix.is_empty();
    if scratch {
        config.prefix = format!("example_{:08x}_", rand::random::<u32>());
    }
    let backends = config.connect().await?;
    let worker = Worker::new(backends.clone(), config.worker_config())
        .handle("summaries", typed(summarize))?
        .start()?;
    let monitor = Monitor::new(backends.clone(), config.monitor_config()).start(|_| {})?;
    println!("serving queue `summaries` as {}", worker.worker_id());

    if serve {
        match run_for {
            Some(d) => {
                tokio::select! { _ = shutdown_signal() => {}, _ = tokio::time::sleep(d) => {} }
            }
            None => shutdown_signal().await,
        }
    } else {
        // The demo batch: dispatch, wait for every outcome (or Ctrl-C), then stop.
        let dispatcher = Dispatcher::new(backends.clone()).with_limits(config.limits());
        let mut ids = Vec::new();
        for i in 0..20 {
            let text = format!("request number {i} asks for a short summary");
            ids.push(
                dispatcher
                    .task("summaries")
                    .payload(&Summarize { text })
                    .send()
                    .await?,
            );
        }
        let all_done = async {
            for id in &ids {
                dispatcher.wait(id, Duration::from_secs(60)).await?;
            }
            Ok::<_, agent_orchestra::Error>(())
        };
        tokio::select! { r = all_done => r?, _ = shutdown_signal() => println!("interrupted") }
        println!("processed the demo batch of {}", ids.len());
    }

    let report = worker.shutdown().await;
    monitor.shutdown().await;
    if scratch {
        drop_namespace(
            &config.backend_urls(),
            &config.connect_options(),
            &[QueueName::parse("summaries")?],
        )
        .await?;
    }
    println!(
        "stopped: clean = {}, handed back = {}",
        report.clean, report.handed_back
    );
    Ok(())
}
