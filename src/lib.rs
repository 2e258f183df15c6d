//! leasehold: a gRPC lease-coordination service. Producers enqueue tasks; worker runtimes
//! claim them under fenced leases, start, and complete or fail them.

pub mod domain;
pub mod store;
