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
    no_transparent_huge_pages();
    cli::main()
}

/// mimalloc asks the kernel for transparent huge pages (`madvise`), so every page it touches
/// for the first time, or again after returning it to the kernel, is a 2 MiB page the kernel
/// zeroes on the spot: measured, 11 % of the bench's CPU time went to that zeroing
/// (`clear_page_erms`), and the whole process used 17 % less CPU with huge pages off
/// (docs/performance.md). Ordinary 4 KiB pages cost more page faults and much less zeroing.
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    {
        // prctl is variadic and the kernel reads each argument as an unsigned long (and refuses
        // PR_SET_THP_DISABLE unless the last three are 0): pass them at that width.
        let zero: libc::c_ulong = 0;
        // SAFETY: PR_SET_THP_DISABLE takes plain integers and only sets a flag on this process.
        // Its result is not needed: where it fails (a kernel before 3.15) the process is only
        // slower, never wrong.
        let _ = unsafe {
            libc::prctl(
                libc::PR_SET_THP_DISABLE,
                1 as libc::c_ulong,
                zero,
                zero,
                zero,
            )
        };
    }
}
