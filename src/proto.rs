//! Generated protobuf and gRPC code (one module for all of it).

#![allow(clippy::all, missing_docs)]

pub mod voxconv {
    pub mod v1 {
        tonic::include_proto!("voxconv.v1");
    }
}

/// Encoded descriptor set of our API, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/voxconv_descriptor.bin"));
