//! The `orchestra` command-line tool: the lab end to end (`demo`), task operations
//! (`dispatch`, `task get`, `tasks list`, `stats`, `cancel`, `retry`, `dead-letters`), long
//! runners (`worker`, `monitor`) and `bench`. See `orchestra --help` and docs/cli.md.

#[path = "../cli/mod.rs"]
mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
