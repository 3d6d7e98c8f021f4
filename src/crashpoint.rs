//! A test hook: `ROTATION_WORKER_CRASHPOINT=<name>` makes the process abort
//! at that point, as a SIGKILL would, so that the crash tests can hit the
//! narrow windows (after the unwrap, between commit, outcome and ack) every
//! time. Unset, it costs one load of a static. It lives apart so that the
//! rotator and the worker can both name their points without importing
//! each other. Never set it in production.

/// Aborts the process if `ROTATION_WORKER_CRASHPOINT` is `name`.
pub fn crashpoint(name: &str) {
    static POINT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let point = POINT.get_or_init(|| std::env::var("ROTATION_WORKER_CRASHPOINT").ok());
    if point.as_deref() == Some(name) {
        tracing::error!(crashpoint = name, "aborting at the configured crash point");
        crate::telemetry::log_writer::flush();
        std::process::abort();
    }
}
