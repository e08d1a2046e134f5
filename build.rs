//! Compiles the protobuf API with protox (pure Rust: no system protoc) and tonic-prost-build.
//! The encoded descriptor set is kept for gRPC server reflection.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    // The KServe protos import each other by bare file name, as Triton's do, so their
    // directory is an include root of its own (listed first: each file gets one name).
    let fds = protox::compile(
        [
            "proto/voxconv/v1/voxconv.proto",
            "proto/inference/grpc_service.proto",
        ],
        ["proto/inference", "proto"],
    )?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("voxconv_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        // Undecodable messages are the client's mistake (INVALID_ARGUMENT), not ours.
        .codec_path("crate::proto::codec::StrictCodec")
        .bytes(".voxconv.v1")
        .bytes(".inference")
        .compile_fds(fds)?;
    // ONNX model files (vendored onnx.proto, proto2): messages only, no services; tensor
    // bytes as `Bytes`, so a decoded model shares the file's buffer.
    let onnx = protox::compile(["proto/onnx/onnx.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(false)
        .bytes(".onnx.TensorProto.raw_data")
        .compile_fds(onnx)?;
    Ok(())
}
