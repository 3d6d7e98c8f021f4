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

pub mod allocator;
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
