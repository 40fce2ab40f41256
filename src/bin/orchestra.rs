//! The `orchestra` command-line tool: the lab end to end (`demo`), task operations
//! (`dispatch`, `task get`, `tasks list`, `stats`, `cancel`, `retry`, `dead-letters`), long
//! runners (`worker`, `monitor`) and `bench`. See `orchestra --help` and docs/cli.md.

#[path = "../cli/mod.rs"]
mod cli;

/// The engine allocates many small objects per task: mimalloc handles that better than the
/// system allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cli::main()
}
