//! Generated protobuf and gRPC code (one module for all of it).

#![allow(clippy::all, missing_docs)]

pub mod codec;

pub mod voxconv {
    pub mod v1 {
        tonic::include_proto!("voxconv.v1");
    }
}

/// KServe v2 / Open Inference Protocol (Triton-compatible).
pub mod inference {
    tonic::include_proto!("inference");
}

/// Encoded descriptor set of our APIs (voxconv.v1 and inference), for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/voxconv_descriptor.bin"));
