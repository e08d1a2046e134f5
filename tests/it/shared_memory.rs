//! Same-host shared memory end to end: a real server with --shared-memory-dir on a temporary
//! directory, regions registered through the API, InferStream reading its input from and
//! writing its output into them.

use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::common::*;
use tonic::Code;
use voxconv::config::Config;
use voxconv::proto::voxconv::v1 as pb;

fn shm_config(dir: &Path) -> Config {
    Config {
        shared_memory_dir: Some(dir.to_path_buf()),
        ..Config::for_tests()
    }
}

fn register(name: &str, key: &str, offset: u64, byte_size: u64) -> pb::RegisterSharedMemoryRequest {
    pb::RegisterSharedMemoryRequest {
        name: name.into(),
        key: key.into(),
        offset,
        byte_size,
    }
}

fn at(region: &str, offset: u64) -> Option<pb::SharedMemoryRef> {
    Some(pb::SharedMemoryRef {
        region: region.into(),
        offset,
    })
}

/// Runs one InferStream whose header is `h` (plus `chunks`), and returns the messages it got.
async fn stream(
    client: &mut pb::inference_client::InferenceClient<tonic::transport::Channel>,
    h: pb::StreamHeader,
    chunks: Vec<pb::InferStreamRequest>,
) -> Result<Vec<pb::infer_stream_response::Msg>, tonic::Status> {
    let mut reqs = vec![pb::InferStreamRequest {
        msg: Some(pb::infer_stream_request::Msg::Header(h)),
    }];
    reqs.extend(chunks);
    let mut s = client
        .infer_stream(tokio_stream::iter(reqs))
        .await?
        .into_inner();
    let mut got = Vec::new();
    while let Some(m) = s.message().await? {
        got.push(m.msg.unwrap());
    }
    Ok(got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_and_output_through_shared_memory_equal_the_kernel() {
    let dir = tempfile::tempdir().unwrap();
    let models = models();
    let server = TestServer::start(shm_config(dir.path()), models.clone()).await;
    let mut client = server.client().await;
    let shape = [1usize, 1, 13, 17, 11];
    let shape64: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    let x = voxconv::kernel::seeded(shape.iter().product(), 7);
    let input = f32_bytes(&x);
    // One object: 100 bytes of something else, the input, then room for the largest output.
    let out_at = 4096 + input.len() as u64;
    let size = out_at + 16 * 4 * shape.iter().product::<usize>() as u64;
    let file = std::fs::File::create_new(dir.path().join("vol")).unwrap();
    file.set_len(size + 100).unwrap();
    file.write_all_at(&input, 100).unwrap();
    client
        .register_shared_memory(register("r1", "/vol", 100, size))
        .await
        .unwrap();

    for model in ["sobel3d", "gaussian3d", "c16"] {
        let want = kernel_output(&models, model, shape, &x);
        for (dtype, chunk) in [
            (pb::DType::Fp32, 0),
            (pb::DType::Fp32, 4096),
            (pb::DType::Fp16, 0),
        ] {
            // NaN-prefilled output window: every value must be written.
            file.write_all_at(&vec![0xffu8; want.len() * 4], 100 + out_at)
                .unwrap();
            let h = pb::StreamHeader {
                model: model.into(),
                input_dtype: pb::DType::Fp32 as i32,
                input_shape: shape64.clone(),
                output_dtype: dtype as i32,
                max_chunk_bytes: chunk,
                input_shared_memory: at("r1", 0),
                output_shared_memory: at("r1", out_at),
                sliding_window: None,
            };
            let msgs = stream(&mut client, h, vec![]).await.unwrap();
            assert_eq!(msgs.len(), 2, "{model}: a header and a summary, no chunks");
            let pb::infer_stream_response::Msg::Header(oh) = &msgs[0] else {
                panic!("{model}: header first")
            };
            let pb::infer_stream_response::Msg::Summary(s) = &msgs[1] else {
                panic!("{model}: summary last")
            };
            assert_eq!(s.output_bytes, oh.total_bytes);
            let mut raw = vec![0u8; oh.total_bytes as usize];
            file.read_exact_at(&mut raw, 100 + out_at).unwrap();
            let got: Vec<f32> = match dtype {
                pb::DType::Fp16 => halves(&raw),
                _ => floats(&raw),
            };
            let want: Vec<f32> = match dtype {
                pb::DType::Fp16 => want
                    .iter()
                    .map(|&v| half::f16::from_f32(v).to_f32())
                    .collect(),
                _ => want.clone(),
            };
            assert_eq!(got, want, "{model} {dtype:?} chunk {chunk}");
        }
    }

    // Mixed: input over the socket, output into shared memory.
    let want = kernel_output(&models, "c16", shape, &x);
    file.write_all_at(&vec![0xffu8; want.len() * 4], 100 + out_at)
        .unwrap();
    let h = pb::StreamHeader {
        model: "c16".into(),
        input_dtype: pb::DType::Fp32 as i32,
        input_shape: shape64.clone(),
        output_dtype: pb::DType::Fp32 as i32,
        output_shared_memory: at("r1", out_at),
        ..Default::default()
    };
    let msgs = stream(&mut client, h, chunks(&input, 5000)).await.unwrap();
    assert_eq!(msgs.len(), 2);
    let mut raw = vec![0u8; want.len() * 4];
    file.read_exact_at(&mut raw, 100 + out_at).unwrap();
    assert_eq!(floats(&raw), want);

    // And the other way: input from shared memory, output over the socket.
    let h = pb::StreamHeader {
        model: "c16".into(),
        input_dtype: pb::DType::Fp32 as i32,
        input_shape: shape64.clone(),
        output_dtype: pb::DType::Fp32 as i32,
        input_shared_memory: at("r1", 0),
        ..Default::default()
    };
    let msgs = stream(&mut client, h, vec![]).await.unwrap();
    let mut out = vec![f32::NAN; want.len()];
    for m in &msgs {
        if let pb::infer_stream_response::Msg::Chunk(c) = m {
            let at = c.offset as usize / 4;
            out[at..at + c.data.len() / 4].copy_from_slice(&floats(&c.data));
        }
    }
    assert_eq!(out, want);

    let status = client
        .shared_memory_status(pb::SharedMemoryStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.regions,
        vec![pb::SharedMemoryRegion {
            name: "r1".into(),
            key: "/vol".into(),
            offset: 100,
            byte_size: size,
            server_created: false,
        }]
    );
    client
        .unregister_shared_memory(pb::UnregisterSharedMemoryRequest { name: "r1".into() })
        .await
        .unwrap();
    let status = client
        .shared_memory_status(pb::SharedMemoryStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(status.regions.is_empty());
}

/// Checks code and that the message names `field`.
fn expect(r: Result<impl std::fmt::Debug, tonic::Status>, code: Code, field: &str) {
    let s = r.expect_err("an error");
    assert_eq!(s.code(), code, "{}", s.message());
    assert!(
        s.message().contains(field),
        "message names {field:?}: {}",
        s.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_memory_errors_name_the_field_and_the_server_keeps_serving() {
    let models = models();
    let shape64 = vec![1u64, 1, 6, 7, 8];
    let n: u64 = shape64.iter().product();
    let header = |input: Option<pb::SharedMemoryRef>, output: Option<pb::SharedMemoryRef>| {
        pb::StreamHeader {
            model: "c16".into(),
            input_dtype: pb::DType::Fp32 as i32,
            input_shape: shape64.clone(),
            output_dtype: pb::DType::Fp32 as i32,
            input_shared_memory: input,
            output_shared_memory: output,
            ..Default::default()
        }
    };

    // Off unless configured.
    let off = TestServer::start(Config::for_tests(), models.clone()).await;
    let mut c = off.client().await;
    expect(
        c.register_shared_memory(register("r", "/x", 0, 4)).await,
        Code::FailedPrecondition,
        "--shared-memory-dir",
    );
    expect(
        stream(&mut c, header(None, at("r", 0)), vec![]).await,
        Code::FailedPrecondition,
        "--shared-memory-dir",
    );

    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(shm_config(dir.path()), models.clone()).await;
    let mut c = server.client().await;
    let path = dir.path().join("vol");
    std::fs::write(&path, vec![0u8; (n * 4) as usize]).unwrap();
    expect(
        c.register_shared_memory(register("r", "/missing", 0, 4))
            .await,
        Code::NotFound,
        "key",
    );
    expect(
        c.register_shared_memory(register("r", "/../vol", 0, 4))
            .await,
        Code::InvalidArgument,
        "key",
    );
    expect(
        c.register_shared_memory(register("r", "/vol", 0, n * 4 + 1))
            .await,
        Code::InvalidArgument,
        "byte_size",
    );
    c.register_shared_memory(register("r", "/vol", 0, n * 4))
        .await
        .unwrap();
    expect(
        c.register_shared_memory(register("r", "/vol", 0, 4)).await,
        Code::AlreadyExists,
        "name",
    );
    // A region that does not exist, and one too small for the 16-channel output.
    expect(
        stream(&mut c, header(None, at("nope", 0)), vec![]).await,
        Code::NotFound,
        "header.output_shared_memory.region",
    );
    expect(
        stream(&mut c, header(None, at("r", 0)), vec![]).await,
        Code::InvalidArgument,
        "header.output_shared_memory",
    );
    expect(
        stream(&mut c, header(at("r", 4), None), vec![]).await,
        Code::InvalidArgument,
        "header.input_shared_memory",
    );
    // The client truncates the object after registering it: the input read fails cleanly.
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(0)
        .unwrap();
    expect(
        stream(&mut c, header(at("r", 0), None), vec![]).await,
        Code::InvalidArgument,
        "header.input_shared_memory",
    );
    expect(
        c.unregister_shared_memory(pb::UnregisterSharedMemoryRequest { name: "x".into() })
            .await,
        Code::NotFound,
        "name",
    );
    expect(
        c.shared_memory_status(pb::SharedMemoryStatusRequest { name: "x".into() })
            .await,
        Code::NotFound,
        "name",
    );

    // Still serving, over the socket.
    let x = voxconv::kernel::seeded(n as usize, 3);
    let msgs = stream(&mut c, header(None, None), chunks(&f32_bytes(&x), 1000))
        .await
        .unwrap();
    assert!(matches!(
        msgs.last(),
        Some(pb::infer_stream_response::Msg::Summary(_))
    ));
}

fn create(name: &str, byte_size: u64) -> pb::CreateSharedMemoryRequest {
    pb::CreateSharedMemoryRequest {
        name: name.into(),
        byte_size,
    }
}

/// Server-created regions: the client opens the server's sealed memory by the key it gets
/// (checking it is the right file), the output is computed in place (float32) or written in
/// (float16), and the memory is charged against --shared-memory-create-limit until the
/// region is unregistered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_created_regions_hold_outputs_computed_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let models = models();
    let shape = [1usize, 1, 13, 17, 11];
    let shape64: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    let n = shape.iter().product::<usize>();
    let x = voxconv::kernel::seeded(n, 8);
    let input = f32_bytes(&x);
    // Input at 0, the output 4 KiB after it (as clients lay it out), 16 channels of room.
    let out_at = (input.len() as u64).div_ceil(4096) * 4096;
    let size = out_at + 16 * 4 * n as u64;
    let server = TestServer::start(
        Config {
            shared_memory_create_limit: 3 * size,
            workers: 2,
            ..shm_config(dir.path())
        },
        models.clone(),
    )
    .await;
    let mut client = server.client().await;
    let made = client
        .create_shared_memory(create("m1", size))
        .await
        .unwrap()
        .into_inner();
    assert!(made.key.starts_with("/proc/"), "{}", made.key);
    let file = voxconv::client::shm::open_server_region(&made.key, &made.memfd_name).unwrap();
    assert_eq!(file.metadata().unwrap().len(), size);
    assert!(
        voxconv::client::shm::open_server_region(&made.key, "voxconv-elsewhere").is_err(),
        "a different file behind the key is refused"
    );
    // Sealed: the client cannot shrink (or grow) it under the server's mapping.
    assert!(file.set_len(0).is_err());
    assert!(file.set_len(size + 1).is_err());
    file.write_all_at(&input, 0).unwrap();

    for model in ["sobel3d", "gaussian3d", "c16"] {
        let want = kernel_output(&models, model, shape, &x);
        for dtype in [pb::DType::Fp32, pb::DType::Fp16] {
            file.write_all_at(&vec![0xffu8; want.len() * 4], out_at)
                .unwrap();
            let h = pb::StreamHeader {
                model: model.into(),
                input_dtype: pb::DType::Fp32 as i32,
                input_shape: shape64.clone(),
                output_dtype: dtype as i32,
                input_shared_memory: at("m1", 0),
                output_shared_memory: at("m1", out_at),
                ..Default::default()
            };
            let msgs = stream(&mut client, h, vec![]).await.unwrap();
            assert_eq!(msgs.len(), 2, "{model}: a header and a summary, no chunks");
            let pb::infer_stream_response::Msg::Summary(s) = &msgs[1] else {
                panic!("{model}: summary last")
            };
            let mut raw = vec![0u8; s.output_bytes as usize];
            file.read_exact_at(&mut raw, out_at).unwrap();
            let (got, want): (Vec<f32>, Vec<f32>) = match dtype {
                pb::DType::Fp16 => (
                    halves(&raw),
                    want.iter()
                        .map(|&v| half::f16::from_f32(v).to_f32())
                        .collect(),
                ),
                _ => (floats(&raw), want.clone()),
            };
            assert_eq!(got, want, "{model} {dtype:?}");
        }
    }

    // Two calls into one region at once (different windows, two workers): both are right,
    // whichever computes in place (the other, finding the region busy, has its output written
    // in; that fallback is checked deterministically in src/shm.rs).
    let want = kernel_output(&models, "c16", shape, &x);
    let half = 4 * want.len() as u64;
    let second = client
        .create_shared_memory(create("m2", out_at + 2 * half))
        .await
        .unwrap()
        .into_inner();
    let f2 = voxconv::client::shm::open_server_region(&second.key, &second.memfd_name).unwrap();
    f2.write_all_at(&input, 0).unwrap();
    f2.write_all_at(&vec![0xffu8; 2 * half as usize], out_at)
        .unwrap();
    let call = |off: u64| {
        let mut c = client.clone();
        let h = pb::StreamHeader {
            model: "c16".into(),
            input_dtype: pb::DType::Fp32 as i32,
            input_shape: shape64.clone(),
            output_dtype: pb::DType::Fp32 as i32,
            input_shared_memory: at("m2", 0),
            output_shared_memory: at("m2", off),
            ..Default::default()
        };
        async move { stream(&mut c, h, vec![]).await }
    };
    let (a, b) = tokio::join!(call(out_at), call(out_at + half));
    a.unwrap();
    b.unwrap();
    for off in [out_at, out_at + half] {
        let mut raw = vec![0u8; half as usize];
        f2.read_exact_at(&mut raw, off).unwrap();
        assert_eq!(floats(&raw), want, "window at {off}");
    }

    let status = client
        .shared_memory_status(pb::SharedMemoryStatusRequest { name: "m1".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.regions.len(), 1);
    assert!(status.regions[0].server_created);
    assert_eq!(status.regions[0].key, made.key);

    // The limit: 3 × size, of which m1 and m2 hold all but less than one size.
    expect(
        client.create_shared_memory(create("m3", size)).await,
        Code::ResourceExhausted,
        "byte_size",
    );
    expect(
        client.create_shared_memory(create("m1", 4)).await,
        Code::AlreadyExists,
        "name",
    );
    expect(
        client.create_shared_memory(create("m3", 0)).await,
        Code::InvalidArgument,
        "byte_size",
    );
    expect(
        client.create_shared_memory(create("a/b", 4)).await,
        Code::InvalidArgument,
        "name",
    );
    // Unregistering gives the memory back.
    client
        .unregister_shared_memory(pb::UnregisterSharedMemoryRequest { name: "m2".into() })
        .await
        .unwrap();
    client
        .create_shared_memory(create("m3", size))
        .await
        .unwrap();
    client
        .unregister_shared_memory(pb::UnregisterSharedMemoryRequest::default())
        .await
        .unwrap();

    // Off with the limit at 0, and with shared memory off altogether.
    let zero = Config {
        shared_memory_create_limit: 0,
        ..shm_config(dir.path())
    };
    for (config, field) in [
        (zero, "--shared-memory-create-limit"),
        (Config::for_tests(), "--shared-memory-dir"),
    ] {
        let srv = TestServer::start(config, models.clone()).await;
        expect(
            srv.client()
                .await
                .create_shared_memory(create("m", 4))
                .await,
            Code::FailedPrecondition,
            field,
        );
    }
}

/// The client's output geometry (from GetModel's layers, through the kernel's checked shape
/// functions) equals the server's plan for every built-in model; bad layer data is an error.
#[test]
fn client_output_shape_follows_the_layers_like_the_server_plan() {
    use voxconv::client::shm::{output_bytes, output_shape};
    let set = voxconv::model::ModelSet::builtin();
    let mut checked = 0;
    for m in set.iter() {
        let info = voxconv::service::model_info(m);
        for dims in [[1usize, 0, 17, 9, 12], [2, 0, 33, 40, 31]] {
            let mut dims = dims;
            dims[1] = m.in_channels();
            let Ok(plan) = m.plan(dims) else { continue };
            let input: Vec<u64> = dims.iter().map(|&d| d as u64).collect();
            let want: Vec<u64> = plan.output.iter().map(|&d| d as u64).collect();
            assert_eq!(
                output_shape(&info, &input).unwrap().to_vec(),
                want,
                "model {}",
                m.name
            );
            checked += 1;
        }
    }
    assert!(checked > 4, "{checked} shapes checked");
    let info = voxconv::service::model_info(set.get("sobel3d").unwrap().as_ref());
    // Too small for the kernel, too many dimensions, overflowing sizes, an unknown op.
    assert!(output_shape(&info, &[1, 1, 0, 4, 4]).is_err());
    assert!(output_shape(&info, &[1, 1, 4, 4]).is_err());
    assert!(output_bytes(&info, &[u64::MAX / 2, 1, 8, 8, 8], 4).is_err());
    let mut odd = info.clone();
    odd.layers[0].op = "conv9d".into();
    let e = output_shape(&odd, &[1, 1, 8, 8, 8])
        .unwrap_err()
        .to_string();
    assert!(e.contains("layers[0].op") && e.contains("conv9d"), "{e}");
    let mut zero = info;
    zero.layers[0].stride = vec![0, 1, 1];
    assert!(
        output_shape(&zero, &[1, 1, 8, 8, 8]).is_err(),
        "zero stride"
    );
}
