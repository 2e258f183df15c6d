//! The gRPC surface: generated code, one module per service, and the error mapping.

mod access;
mod admin;
mod claim_stream;
mod convert;
mod deadline;
mod observe;
mod page_token;
mod shed;
pub mod status;
mod tasks;
mod typed_errors;
mod worker;

pub use access::AuthLayer;
pub use admin::AdminApi;
pub use observe::ObserveLayer;
pub use shed::ShedLayer;
pub use tasks::TaskApi;
pub use typed_errors::TypedErrorsLayer;
pub use worker::WorkerApi;

/// Generated protobuf and tonic code for `leasehold.v1`.
#[allow(unreachable_pub, clippy::all, clippy::pedantic, missing_docs)]
pub mod pb {
    tonic::include_proto!("leasehold.v1");

    /// The encoded descriptors of every leasehold proto (and its imports), for reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/leasehold_descriptor.bin"));
}
