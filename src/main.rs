//! The `rotation-worker` binary: parses the command line and hands over to
//! the library.

// The system allocator. mimalloc cost about 15% less CPU per drained event
// but held 7–10 MB more at the drain's peak, over the 30 MB target.
// Measured with `rotation-bench`; see docs/performance.md.

fn main() -> std::process::ExitCode {
    tune_allocator();
    rotation_worker::cli::main()
}

/// Turns off glibc's "fast bins". A batch frees a few hundred blocks of
/// the same few sizes at once; more than the per-thread cache keeps go to
/// the fast bins, and the next larger allocation stops to merge them all
/// (`malloc_consolidate`). Without fast bins a freed block is merged when
/// it is freed: about 10% less of the worker's CPU per drained event at
/// the same peak memory (`GLIBC_TUNABLES=glibc.malloc.mxfast=0`, measured
/// with `rotation-bench`; see docs/performance.md). Set before any
/// other thread starts.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_allocator() {
    // SAFETY: `mallopt` only sets a parameter of the allocator; no other
    // thread exists yet. A refusal (0) leaves the default, which works.
    let _ = unsafe { libc::mallopt(libc::M_MXFAST, 0) };
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}
