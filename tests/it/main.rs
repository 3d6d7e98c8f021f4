//! Integration tests: the real binary and the real store against the local
//! PostgreSQL server, a fresh database per test.

mod decoding;
mod faults;
mod helpers;
mod hostile;
mod rotator;
mod store;
mod telemetry;
mod worker;
