//! Generates the gRPC code and the reflection descriptor set from `proto/`.
//!
//! The protos are compiled in-process by protox, so a fresh machine needs no system `protoc`.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTO_ROOT: &str = "proto";
const PROTO_FILES: &[&str] = &[
    "leasehold/v1/types.proto",
    "leasehold/v1/worker_service.proto",
    "leasehold/v1/task_service.proto",
    "leasehold/v1/admin_service.proto",
    // Not imported by leasehold's protos: compiled so that reflection can describe the error
    // details every error carries.
    "google/rpc/error_details.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO_ROOT}");
    // sqlx::migrate! embeds migrations/ at compile time; a new file must rebuild the crate.
    println!("cargo:rerun-if-changed=migrations");
    let descriptors = protox::compile(PROTO_FILES, [PROTO_ROOT])?;

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("leasehold_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;

    tonic_prost_build::configure()
        // EnqueueTasks reports per-item errors as google.rpc.Status; reuse tonic-types' type so
        // it converts to and from tonic::Status with the library's helpers.
        .extern_path(".google.rpc.Status", "::tonic_types::pb::Status")
        .extern_path(".google.rpc.ErrorInfo", "::tonic_types::pb::ErrorInfo")
        .extern_path(".google.rpc.BadRequest", "::tonic_types::pb::BadRequest")
        .compile_fds(descriptors)?;
    Ok(())
}
