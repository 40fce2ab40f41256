//! `orchestra dashboard`: serves the web dashboard ([`agent_orchestra::dashboard`]) until
//! Ctrl-C or SIGTERM.

use std::net::SocketAddr;

use agent_orchestra::dashboard::{self, DashboardOptions};
use agent_orchestra::QueueName;
use clap::Args;

use super::{CliError, Ctx};

/// Arguments of `orchestra dashboard`.
#[derive(Args)]
pub struct DashboardArgs {
    /// The address to serve on (IP:PORT). Anything but a loopback address needs --token.
    #[arg(long, default_value = "127.0.0.1:8080", value_parser = super::metrics::addr_arg)]
    listen: SocketAddr,
    /// The token that state-changing requests (cancel, retry) must carry, at least 16
    /// characters; with it, the page asks for it before an action.
    #[arg(long, env = "ORCHESTRA_DASHBOARD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A queue to show from the start (repeatable); others appear as their tasks' events or
    /// their workers are heard.
    #[arg(long = "queue", short = 'q', value_name = "QUEUE")]
    queues: Vec<String>,
}

pub async fn run(ctx: &Ctx, a: DashboardArgs) -> Result<(), CliError> {
    let queues = a
        .queues
        .iter()
        .map(|q| QueueName::parse(q))
        .collect::<Result<Vec<_>, _>>()?;
    let mut options = DashboardOptions::default()
        .with_queues(queues)
        .with_urls(ctx.config.backend_urls());
    if let Some(t) = a.token.filter(|t| !t.is_empty()) {
        options = options.with_token(t);
    }
    // Before connecting: a refused address or token is a usage error (exit 2), at once.
    dashboard::check_listen(a.listen, &options)?;
    let backends = ctx.connect_shared().await?;
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .map_err(|e| CliError::Failed(format!("--listen: cannot listen on {}: {e}", a.listen)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| CliError::Failed(format!("--listen: {e}")))?;
    let url = format!("http://{addr}/");
    if ctx.out.json {
        ctx.out.json(&serde_json::json!({ "listening": url }));
    } else {
        println!("dashboard on {url} (Ctrl-C to stop)");
    }
    let app = dashboard::router(backends, options);
    // Not a graceful shutdown: the pages' event streams never end by themselves.
    tokio::select! {
        served = async { axum::serve(listener, app).await } => {
            served.map_err(|e| CliError::Failed(format!("dashboard: {e}")))
        }
        _ = super::shutdown_signal() => Ok(()),
    }
}
