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
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO_ROOT}");
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
        .compile_fds(descriptors)?;
    Ok(())
}
