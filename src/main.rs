//! The `rotation-worker` binary: parses the command line and hands over to
//! the library.

// The system allocator. mimalloc cost about 15% less CPU per drained event
// but held 7–10 MB more at the drain's peak (35–39 MB against 28–29 at
// the default window); with either, the drain clears 20,000/s now that
// the database connections set TCP_NODELAY. Measured with
// `rotation-bench`; see the README, Performance.

fn main() -> std::process::ExitCode {
    rotation_worker::cli::main()
}
