//! The `rotation-worker` binary: parses the command line and hands over to
//! the library.

/// mimalloc instead of glibc's malloc: a drained event costs about 30% less
/// CPU (allocation is spread over every span, log line and message); peak
/// RSS is about 10 MB higher. Transparent huge pages are off (`no_thp`):
/// with them the peak RSS doubled. Measured with `rotation-bench`; see the
/// README, Performance.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    rotation_worker::cli::main()
}
