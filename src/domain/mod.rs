//! Pure types and rules: identities, task states, fencing, retry policy, errors, validation.
//! Nothing here does I/O or knows about gRPC or SQL.

pub mod auth;
pub mod error;
pub mod fence;
pub mod ids;
pub mod liveness;
pub mod retry;
pub mod task;
pub mod transitions;
pub mod validate;

pub use error::{Error, RefusedWrite, Result};
pub use fence::{OwnerWrite, Refusal, Verdict};
pub use ids::{ClaimToken, RuntimeId, TaskId};
pub use retry::RetryBackoff;
pub use task::{
    ClaimEnd, ClaimedTask, FailureReason, PreviousClaim, QueueInfo, Runtime, RuntimeStatus,
    StatusCounts, Task, TaskStatus,
};
