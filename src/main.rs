//! The `rotation-worker` binary: parses the command line and hands over to
//! the library.

fn main() -> std::process::ExitCode {
    rotation_worker::allocator::install();
    rotation_worker::cli::main()
}
