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

/// ONNX model files (`proto/onnx/onnx.proto`, vendored from onnx 1.23).
pub mod onnx {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

/// Encoded descriptor set of our APIs (voxconv.v1 and inference), for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/voxconv_descriptor.bin"));
