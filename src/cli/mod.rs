//! The `orchestra` CLI: argument parsing, configuration layering, logging and exit codes.
//!
//! Exit codes: 0 success; 1 a task failed, was not found, or the operation failed at run time
//! (a broker unreachable, a timeout); 2 a usage or configuration error (bad flag, bad value,
//! bad URL, a backend whose cargo feature is off).

mod agents;
mod bench;
mod commands;
#[cfg(feature = "dashboard")]
mod dashboard;
mod demo;
mod metrics;
mod output;
mod queues;
mod schedule;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use agent_orchestra::config::{parse_duration, Config};
use agent_orchestra::redact_url;
use agent_orchestra::{Backends, Error, QueueName};
use clap::{ArgAction, Args, Parser, Subcommand};

pub use output::Output;

/// Event-driven task orchestration for independent agents over Redis, NATS JetStream,
/// RabbitMQ or memory.
#[derive(Parser)]
#[command(name = "orchestra", version, propagate_version = true)]
#[command(
    after_help = "Configuration: defaults < TOML file (--config or ORCHESTRA_CONFIG) < environment (ORCHESTRA_URL, ...) < flags.\nExit codes: 0 success, 1 task failed / not found / runtime error, 2 usage or configuration error."
)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

/// Flags every subcommand accepts.
#[derive(Args)]
struct GlobalArgs {
    /// One URL for bus, registry and locks: memory://, redis://, nats://, amqp:// ...
    #[arg(long, global = true, value_name = "URL")]
    url: Option<String>,
    /// The bus's URL (overrides --url for the bus).
    #[arg(long, global = true, value_name = "URL")]
    bus_url: Option<String>,
    /// The registry's URL (overrides --url for the registry).
    #[arg(long, global = true, value_name = "URL")]
    registry_url: Option<String>,
    /// The lock manager's URL (overrides --url for the locks).
    #[arg(long, global = true, value_name = "URL")]
    locks_url: Option<String>,
    /// Namespace for every key, stream, subject and queue.
    #[arg(long, global = true)]
    prefix: Option<String>,
    /// A TOML configuration file (else $ORCHESTRA_CONFIG).
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    json: bool,
    /// More logs on stderr (-v info, -vv debug, -vvv trace); RUST_LOG also works.
    #[arg(short, long, global = true, action = ArgAction::Count)]
    verbose: u8,
    /// Runtime threads (else $ORCHESTRA_THREADS; default: 1 on a broker, one per core on
    /// memory://).
    #[arg(long, global = true, value_name = "N")]
    threads: Option<String>,
}

/// The most runtime threads `--threads` accepts.
const MAX_THREADS: usize = 256;

/// The runtime's worker threads: `--threads`, else `ORCHESTRA_THREADS`, else one when any
/// backend is a broker (the CLI's agents wait on I/O, and a second thread mostly adds
/// cross-thread wake-ups: see docs/performance.md) and one per core on memory:// (where the
/// process is the broker).
fn runtime_threads(
    flag: Option<&str>,
    env: Option<String>,
    config: &Config,
) -> Result<usize, CliError> {
    // An empty variable counts as unset, as for every ORCHESTRA_* variable.
    let env = env.filter(|v| !v.trim().is_empty());
    let (source, value) = match (flag, env) {
        (Some(f), _) => ("--threads", f.to_string()),
        (None, Some(e)) => ("ORCHESTRA_THREADS", e),
        (None, None) => {
            return Ok(if config.is_memory() {
                std::thread::available_parallelism().map_or(1, |n| n.get())
            } else {
                1
            })
        }
    };
    match value.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_THREADS).contains(&n) => Ok(n),
        _ => Err(CliError::Usage(format!(
            "{source} must be a whole number of threads from 1 to {MAX_THREADS}, got {value:?}"
        ))),
    }
}

#[derive(Subcommand)]
enum Command {
    /// The lab end to end: pub/sub, a task's life, Researcher -> Writer, priorities, recovery.
    Demo,
    /// Registers a task and announces it on its queue.
    Dispatch(commands::DispatchArgs),
    /// One task.
    Task {
        #[command(subcommand)]
        command: commands::TaskCommand,
    },
    /// Many tasks.
    Tasks {
        #[command(subcommand)]
        command: commands::TasksCommand,
    },
    /// Task counts by status, and queue sizes for the queues named with --queue.
    Stats(commands::StatsArgs),
    /// Lists the live workers (id, host, queues, running tasks), as heard on the bus.
    Workers(commands::WorkersArgs),
    /// Runs the monitor (recovery of crashed workers' tasks) and prints its snapshots.
    Monitor(commands::MonitorArgs),
    /// Runs built-in agents (echo, sleep, fail) on named queues until Ctrl-C.
    Worker(agents::WorkerArgs),
    /// Cancels a WAITING, PENDING or RUNNING task (a running handler is asked to stop).
    Cancel {
        /// The task's id.
        id: String,
    },
    /// Puts a FAILED or CANCELLED task back on its queue (a PENDING one is announced again).
    Retry {
        /// The task's id.
        id: String,
    },
    /// The dead letters of a queue: lists them, or puts them back (--requeue) or deletes them
    /// (--delete).
    DeadLetters(queues::DeadLettersArgs),
    /// Lists the queues (sizes, paused or not, limits, tasks by status); pauses, resumes or
    /// limits one.
    Queues(queues::QueuesArgs),
    /// Schedules: tasks dispatched on a cron expression or at a fixed interval by the acting
    /// monitor (add, list, pause, resume, remove).
    Schedule {
        #[command(subcommand)]
        command: schedule::ScheduleCommand,
    },
    /// Deletes finished (COMPLETED, FAILED, CANCELLED) tasks beyond a retention.
    Purge(commands::PurgeArgs),
    /// Deletes everything under --prefix on the brokers: queues, messages, dead letters, tasks,
    /// locks. Irreversible; needs --yes.
    DropNamespace(commands::DropNamespaceArgs),
    /// Throughput and latency of the full task lifecycle, producer and workers in one process.
    Bench(bench::BenchArgs),
    /// Prints the effective configuration (secrets redacted).
    Config,
    /// Serves the web dashboard (live tasks, queues, workers, dead letters) until Ctrl-C.
    #[cfg(feature = "dashboard")]
    Dashboard(dashboard::DashboardArgs),
}

/// What a command needs: the effective configuration and the output mode.
pub struct Ctx {
    /// The configuration after every layer.
    pub config: Config,
    /// Human or JSON output.
    pub out: Output,
}

impl Ctx {
    /// Connects the backends; on memory, notes on stderr that state ends with this process.
    pub async fn connect_shared(&self) -> Result<Backends, CliError> {
        if self.config.is_memory() {
            eprintln!(
                "note: memory:// keeps tasks inside this process only; pass --url (or set ORCHESTRA_URL) to use a broker"
            );
        }
        Ok(self.config.connect().await?)
    }

    /// For a command that only reads: backends to read with, and whether each of `queues`
    /// exists. Opening a broker's backend declares what its roles need (NATS buckets,
    /// RabbitMQ queues), so the brokers are asked first ([`Config::footprint`]); when nothing
    /// asked about exists under the prefix (a mistyped `--prefix`, a namespace not used yet),
    /// the answer comes from an empty in-memory set instead and nothing is created: a note on
    /// stderr says so. A queue that does not exist must be answered for by the caller, without
    /// asking the bus.
    pub async fn connect_to_read(
        &self,
        queues: &[QueueName],
    ) -> Result<(Backends, Vec<bool>), CliError> {
        if self.config.is_memory() {
            return Ok((self.connect_shared().await?, vec![true; queues.len()]));
        }
        let found = self.config.footprint(queues).await?;
        if found.registry || found.queues.iter().any(|q| *q) {
            return Ok((self.config.connect().await?, found.queues));
        }
        eprintln!(
            "note: nothing exists under the prefix {:?} on this broker (no tasks, no such queue); nothing was created",
            self.config.prefix
        );
        Ok((Backends::memory(), found.queues))
    }
}

/// Why a command did not succeed.
#[derive(Debug)]
pub enum CliError {
    /// An error from the library (mapped to exit 1 or 2 by its kind).
    Lib(Error),
    /// Bad usage (exit 2).
    Usage(String),
    /// A task failed, or an operation did not succeed (exit 1).
    Failed(String),
    /// Stopped by Ctrl-C or SIGTERM before it finished (exit 130, as a shell reports SIGINT).
    Interrupted(String),
}

impl From<Error> for CliError {
    fn from(e: Error) -> Self {
        CliError::Lib(e)
    }
}

impl CliError {
    fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => 2,
            CliError::Failed(_) => 1,
            CliError::Interrupted(_) => 130,
            CliError::Lib(e) => match e {
                Error::Config { .. }
                | Error::InvalidInput { .. }
                | Error::UnsupportedUrl { .. }
                | Error::FeatureDisabled { .. } => 2,
                _ => 1,
            },
        }
    }

    fn message(&self) -> String {
        match self {
            CliError::Lib(e) => e.to_string(),
            CliError::Usage(m) | CliError::Failed(m) | CliError::Interrupted(m) => m.clone(),
        }
    }
}

/// Parses a duration argument (`250ms`, `30s`, `1m30s`, `2h`; see `config::parse_duration`).
pub fn duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s)
}

/// Runs the CLI and returns its exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    let out = Output {
        json: cli.global.json,
    };
    let quiet_default = matches!(cli.command, Command::Demo);
    init_logging(cli.global.verbose, quiet_default);
    let config = match load_config(&cli.global) {
        Ok(c) => c,
        Err(e) => return report(out, &e),
    };
    let threads = match runtime_threads(
        cli.global.threads.as_deref(),
        std::env::var("ORCHESTRA_THREADS").ok(),
        &config,
    ) {
        Ok(n) => n,
        Err(e) => return report(out, &e),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return report(out, &CliError::Failed(format!("cannot start tokio: {e}"))),
    };
    let ctx = Ctx { config, out };
    let result = runtime.block_on(run(&ctx, cli.command));
    // Background tasks of brokers' clients must not keep the process alive.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => report(out, &e),
    }
}

/// A command line clap refused (or `--help`, `--version`): clap's text, or with `--json` (its
/// parse failed, so the raw arguments are asked) the same one-line JSON as every other error.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    let shown = matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    );
    let json = std::env::args_os()
        .skip(1)
        .take_while(|a| a != "--")
        .any(|a| a == "--json");
    if shown || !json {
        e.exit() // 2 for usage errors, 0 for --help / --version
    }
    let text = e.kind().to_string();
    let first = e.to_string();
    let message = first
        .lines()
        .next()
        .map(|l| l.strip_prefix("error: ").unwrap_or(l).trim().to_string())
        .filter(|l| !l.is_empty())
        .unwrap_or(text);
    report(Output { json: true }, &CliError::Usage(message))
}

/// Gives `config` a fresh namespace of its own under the user's prefix (`<prefix><kind>_<8 hex>_`),
/// for a run that deletes everything under it afterwards; the error says how long the user's
/// prefix may be.
pub(crate) fn fresh_namespace(config: &mut Config, kind: &str) -> Result<(), CliError> {
    let added = format!("{kind}_{:08x}_", rand::random::<u32>());
    let room = 64usize.saturating_sub(added.len());
    if config.prefix.len() > room {
        return Err(CliError::Usage(format!(
            "--prefix: {kind} adds {kind}_<8 hex digits>_ for a namespace of its own, so the prefix may have at most {room} characters here, not {}",
            config.prefix.len()
        )));
    }
    config.prefix.push_str(&added);
    Ok(())
}

/// Refuses a configuration whose roles mix the in-memory backend with a broker for a command
/// that ends with its process: what the memory roles held (a task dispatched into a memory
/// registry, say) would be gone when it exits, while the broker roles kept the rest.
fn check_roles(config: &Config) -> Result<(), CliError> {
    let on_memory = config.roles_on_memory();
    if on_memory.is_empty() || config.is_memory() {
        return Ok(());
    }
    Err(CliError::Usage(format!(
        "memory:// (this process only) holds the {} while the rest is on a broker: what this command left there would be gone when it exits; give every role a broker (--url, or --bus-url, --registry-url and --locks-url together)",
        on_memory.join(" and ")
    )))
}

fn report(out: Output, e: &CliError) -> ExitCode {
    let code = e.exit_code();
    if out.json {
        eprintln!(
            "{}",
            serde_json::json!({"error": e.message(), "exit_code": code})
        );
    } else {
        eprintln!("error: {}", e.message());
    }
    ExitCode::from(code)
}

fn init_logging(verbose: u8, quiet_default: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = match verbose {
        0 => EnvFilter::try_from_default_env().unwrap_or_else(|_| {
            // The demo narrates warnings (a killed worker, a recovered task) itself. lapin's own
            // logs are off: the RabbitMQ backend reports its failures itself, as typed errors and
            // its own warnings, and lapin's say misleading things ("Exponential backoff attempts
            // exhausted" for a refused login). `-v` or RUST_LOG shows them.
            EnvFilter::new(if quiet_default {
                "error,lapin=off"
            } else {
                "warn,lapin=off"
            })
        }),
        1 => EnvFilter::new("info"),
        2 => EnvFilter::new("debug"),
        _ => EnvFilter::new("trace"),
    };
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// Defaults < file < environment < flags, then validation.
fn load_config(g: &GlobalArgs) -> Result<Config, CliError> {
    let mut config = Config::from_layers(g.config.as_deref(), |k| std::env::var(k).ok())?;
    config.set_urls(
        g.url.clone(),
        g.bus_url.clone(),
        g.registry_url.clone(),
        g.locks_url.clone(),
    );
    if let Some(p) = &g.prefix {
        config.prefix = p.clone();
    }
    // The command line runs on memory:// when no URL is given, and says so on stderr
    // (Ctx::connect_shared); the library's Config::connect refuses to guess.
    let config = config.or_url(agent_orchestra::config::DEFAULT_URL);
    config.validate()?;
    tracing::debug!(
        bus = %redact_url(&config.backend_urls().bus),
        registry = %redact_url(&config.backend_urls().registry),
        locks = %redact_url(&config.backend_urls().locks),
        prefix = %config.prefix,
        "configuration loaded"
    );
    Ok(config)
}

async fn run(ctx: &Ctx, command: Command) -> Result<(), CliError> {
    // The demo and the bench run every role in this one process; `config` only prints.
    if !matches!(command, Command::Demo | Command::Bench(_) | Command::Config) {
        check_roles(&ctx.config)?;
    }
    match command {
        Command::Demo => demo::run(ctx).await,
        Command::Dispatch(a) => commands::dispatch(ctx, a).await,
        Command::Task { command } => commands::task(ctx, command).await,
        Command::Tasks { command } => commands::tasks(ctx, command).await,
        Command::Stats(a) => commands::stats(ctx, a).await,
        Command::Monitor(a) => commands::monitor(ctx, a).await,
        Command::Workers(a) => commands::workers(ctx, a).await,
        Command::Worker(a) => agents::run(ctx, a).await,
        Command::Cancel { id } => commands::cancel(ctx, &id).await,
        Command::Retry { id } => commands::retry(ctx, &id).await,
        Command::DeadLetters(a) => queues::dead_letters(ctx, a).await,
        Command::Queues(a) => queues::queues(ctx, a).await,
        Command::Schedule { command } => schedule::schedule(ctx, command).await,
        Command::Purge(a) => commands::purge(ctx, a).await,
        Command::DropNamespace(a) => commands::drop_namespace(ctx, a).await,
        Command::Bench(a) => bench::run(ctx, a).await,
        #[cfg(feature = "dashboard")]
        Command::Dashboard(a) => dashboard::run(ctx, a).await,
        Command::Config => {
            if ctx.out.json {
                ctx.out.json(&ctx.config.redacted());
            } else {
                print!("{}", ctx.config.to_toml_redacted());
            }
            Ok(())
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn runtime_threads_come_from_the_flag_then_the_environment_then_the_backend() {
        let memory = Config::default();
        assert!(memory.is_memory());
        let mut broker = Config::default();
        broker.set_urls(Some("redis://127.0.0.1:6379".into()), None, None, None);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(runtime_threads(None, None, &memory).unwrap(), cores);
        assert_eq!(runtime_threads(None, None, &broker).unwrap(), 1);
        assert_eq!(runtime_threads(None, Some("3".into()), &broker).unwrap(), 3);
        assert_eq!(
            runtime_threads(Some("2"), Some("3".into()), &broker).unwrap(),
            2
        );
        for bad in ["0", "-1", "two", "", "100000"] {
            let e = runtime_threads(Some(bad), None, &broker).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad:?}");
            assert!(e.message().contains("--threads"), "{}", e.message());
        }
        assert_eq!(runtime_threads(None, Some(" ".into()), &broker).unwrap(), 1);
        let e = runtime_threads(None, Some("x".into()), &memory).unwrap_err();
        assert!(e.message().contains("ORCHESTRA_THREADS"), "{}", e.message());
    }

    #[test]
    fn library_errors_map_to_the_documented_exit_codes() {
        let usage = [
            Error::config("worker.lease", "bad"),
            Error::invalid("priority", "bad"),
            Error::FeatureDisabled {
                scheme: "redis".into(),
                feature: "redis",
            },
            Error::UnsupportedUrl {
                url: "x".into(),
                reason: "bad".into(),
            },
        ];
        for e in usage {
            assert_eq!(CliError::Lib(e).exit_code(), 2);
        }
        let id = agent_orchestra::TaskId::parse("task_1").unwrap();
        assert_eq!(CliError::Lib(Error::TaskNotFound(id)).exit_code(), 1);
        assert_eq!(
            CliError::Lib(Error::temporary("redis", "down", None)).exit_code(),
            1
        );
    }
}
