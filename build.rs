//! Compiles the protobuf API with protox (pure Rust: no system protoc) and tonic-prost-build.
//! The encoded descriptor set is kept for gRPC server reflection.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/voxconv/v1/voxconv.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("voxconv_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .bytes(".voxconv.v1")
        .compile_fds(fds)?;
    Ok(())
}
