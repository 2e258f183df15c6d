//! The integration suite: one binary, a real server over real gRPC. Conformance tests run on
//! both stores (a fresh PostgreSQL database per test via `#[sqlx::test]`, which reads
//! `DATABASE_URL`, and the embedded memory store); the rest are about PostgreSQL or the server.

// A test binary exports nothing, so every `pub` here is "unreachable" by definition.
#![allow(unreachable_pub)]
// Test code panics on purpose: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

// First: it defines the `conformance!` macro the other modules use.
#[macro_use]
mod harness;

mod auth;
mod bench;
mod bulk;
mod claim_dealing;
mod cli;
mod coalesce;
mod console;
mod deploy;
mod differential;
mod errors;
mod fuzz;
mod grpcurl;
mod hostile;
mod leadership;
mod lifecycle;
mod listing;
mod liveness;
mod metrics;
mod operations;
mod pgbouncer;
mod plans;
mod process;
mod proxy;
mod python;
mod races;
mod redis;
mod retention;
mod schema_functions;
mod service;
mod shared_claims;
mod signs_of_life;
mod soak;
mod streams;
mod task_calls;
mod tls;
mod worker_sdk;
