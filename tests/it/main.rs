//! Integration tests: the real binary and the real store, on PostgreSQL (the
//! local server, a fresh database per test) and on SQLite (a file per test).

mod bench;
mod boundary;
mod chaos;
mod cli;
mod cluster;
mod decoding;
mod deployment;
mod docs;
mod failover;
mod faults;
mod helpers;
mod hostile;
mod keys;
mod kubernetes;
mod lifecycle;
mod ops;
mod renewal;
mod rotator;
mod round_trips;
mod safety;
mod secure;
mod store;
mod telemetry;
mod vault;
mod worker;
