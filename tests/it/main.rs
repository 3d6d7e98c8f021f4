//! Integration tests: the real binary and the real store against the local
//! PostgreSQL server, a fresh database per test.

mod bench;
mod decoding;
mod deployment;
mod faults;
mod helpers;
mod hostile;
mod rotator;
mod store;
mod telemetry;
mod worker;
