//! The integration suite: one binary, a real server over real gRPC, a fresh PostgreSQL
//! database per test (`#[sqlx::test]` reads `DATABASE_URL`).

// A test binary exports nothing, so every `pub` here is "unreachable" by definition.
#![allow(unreachable_pub)]
// Test code panics on purpose: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod errors;
mod harness;
mod lifecycle;
mod listing;
mod races;
mod service;
