//! `rotation-worker` keeps the stored HashiCorp Vault AppRole `secret_id` of
//! each vault integration up to date.
//!
//! Rotation pipelines announce a rotation on NATS; the worker authenticates
//! the announcement, applies the documented update ("rotate the stored
//! AppRole secret_id of integration {id}") to the [`store`] once, and
//! publishes the resulting record. The binary is a thin shell over
//! [`cli::main`]; everything it does is reachable from this library so that
//! tests drive the real code.

#![deny(unsafe_code)]
#![warn(unreachable_pub, clippy::unwrap_used, clippy::expect_used)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod auth;
pub mod cli;
pub mod config;
pub mod crashpoint;
pub mod crypto;
pub mod dlq;
pub mod domain;
pub mod endpoints;
pub mod event;
pub mod rotator;
pub mod store;
pub mod telemetry;
pub mod vault;
pub mod wire;
pub mod worker;

/// Turns off glibc's "fast bins"; call first thing in `main`, before any
/// other thread starts (the worker's binary and `rotation-bench`, so that
/// what the benchmark does alone pays the allocator as the worker does).
/// A batch frees a few hundred blocks of the same few sizes at once; more
/// than the per-thread cache keeps go to the fast bins, and the next
/// larger allocation stops to merge them all (`malloc_consolidate`).
/// Without fast bins a freed block is merged when it is freed: about 10%
/// less of the worker's CPU per drained event at the same peak memory
/// (`GLIBC_TUNABLES=glibc.malloc.mxfast=0`, measured with
/// `rotation-bench`; see docs/performance.md).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn tune_allocator() {
    // SAFETY: `mallopt` only sets a parameter of the allocator; called
    // before any other thread exists. A refusal (0) leaves the default,
    // which works.
    let _ = unsafe { libc::mallopt(libc::M_MXFAST, 0) };
}

/// Nothing to tune outside glibc.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn tune_allocator() {}
