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
mod stream_writes;
mod task_writes;
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
