//! leasehold: a gRPC lease-coordination service. Producers enqueue tasks; worker runtimes
//! claim them under fenced leases, start, and complete or fail them.
//!
//! Data flows one way: [`grpc`] → [`coordinator`] → [`store`]. Nothing below the gRPC layer
//! knows about protobuf types; nothing in [`domain`] does I/O.

pub mod advisory;
pub mod app;
pub mod auth;
pub mod bench;
pub mod cli;
pub mod client;
pub mod config;
pub mod coordinator;
pub mod domain;
pub mod grpc;
pub mod proto;
pub mod shutdown;
pub mod signs_of_life;
pub mod soak;
pub mod store;
pub mod supervise;
pub mod sweeper;
pub mod telemetry;
pub mod tls;
pub mod wakeups;
pub mod web;
