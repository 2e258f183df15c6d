//! The generated protobuf and tonic code of `leasehold.v1`, in a module of its own: the server's
//! gRPC adapters (`grpc`), the worker SDK (`client`), the CLI, the bench and the soak all import
//! it from here, so no client code depends on the server's adapter layer.

#![allow(unreachable_pub, clippy::all, clippy::pedantic, missing_docs)]

tonic::include_proto!("leasehold.v1");

/// The encoded descriptors of every leasehold proto (and its imports), for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/leasehold_descriptor.bin"));
