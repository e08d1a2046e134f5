//! The gRPC service end to end: a real server on 127.0.0.1:0, real tonic clients.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::common::*;
use tonic::{Code, Request};
use voxconv::config::Config;
use voxconv::proto::voxconv::v1 as pb;

type Streamed = (Vec<u64>, Vec<f32>, pb::Summary);

/// Reads a whole InferStream response: header, chunks placed by offset, summary.
async fn collect(
    mut s: tonic::Streaming<pb::InferStreamResponse>,
) -> Result<Streamed, tonic::Status> {
    let mut shape = Vec::new();
    let mut out = Vec::new();
    let mut seen = 0usize;
    let mut summary = None;
    while let Some(m) = s.message().await? {
        match m.msg.unwrap() {
            pb::infer_stream_response::Msg::Header(h) => {
                assert!(out.is_empty(), "one header, first");
                shape = h.shape.clone();
                out = vec![f32::NAN; h.shape.iter().product::<u64>() as usize];
                assert_eq!(h.total_bytes as usize, out.len() * 4);
            }
            pb::infer_stream_response::Msg::Chunk(c) => {
                assert!(summary.is_none(), "chunks before the summary");
                let at = c.offset as usize / 4;
                out[at..at + c.data.len() / 4].copy_from_slice(&floats(&c.data));
                seen += c.data.len();
            }
            pb::infer_stream_response::Msg::Summary(s) => summary = Some(s),
            pb::infer_stream_response::Msg::Progress(p) => {
                assert!(summary.is_none(), "progress before the summary");
                assert!(p.windows_done <= p.windows_total);
            }
        }
    }
    let summary = summary.expect("a summary closes the stream");
    assert_eq!(seen as u64, summary.output_bytes, "every output byte once");
    Ok((shape, out, summary))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_and_streamed_results_equal_the_kernel() {
    let models = models();
    let server = TestServer::start(Config::for_tests(), models.clone()).await;
    let mut client = server.client().await;
    let shape = [1usize, 1, 19, 21, 23];
    let x = voxconv::kernel::seeded(shape.iter().product(), 42);
    let shape64: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    for model in ["sobel3d", "gaussian3d", "c16"] {
        let want = kernel_output(&models, model, shape, &x);
        let r = client
            .infer(unary(model, pb::DType::Fp32, &shape64, f32_bytes(&x)))
            .await
            .unwrap()
            .into_inner();
        let t = r.output.unwrap();
        let got = floats(&t.data);
        assert_eq!(got, want, "{model}: Infer");
        // Streamed, with chunks small enough to split slabs and elements of the input.
        let mut reqs = vec![header(model, &shape64, pb::DType::Fp32, 4096)];
        reqs.extend(chunks(&f32_bytes(&x), 4099));
        let s = client
            .infer_stream(tokio_stream::iter(reqs))
            .await
            .unwrap()
            .into_inner();
        let (out_shape, got, summary) = collect(s).await.unwrap();
        assert_eq!(out_shape, t.shape);
        assert_eq!(got, want, "{model}: InferStream");
        assert!(summary.flops > 0.0 && summary.total_ms >= summary.compute_ms);
        let layer = &summary.layers[0];
        assert!(
            layer.gemm_ms > 0.0,
            "{model}: stage times reported: {layer:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn integer_and_half_dtypes_round_trip() {
    let models = models();
    let server = TestServer::start(Config::for_tests(), models.clone()).await;
    let mut client = server.client().await;
    let shape = [1usize, 1, 8, 9, 10];
    let n: usize = shape.iter().product();
    let shape64: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    // INT16 CT-like values (Hounsfield units), sent as they are.
    let hu: Vec<i16> = (0..n).map(|i| (i as i16 * 37) % 2000 - 1000).collect();
    let raw: Vec<u8> = hu.iter().flat_map(|v| v.to_le_bytes()).collect();
    let as_f32: Vec<f32> = hu.iter().map(|&v| f32::from(v)).collect();
    let want = kernel_output(&models, "sobel3d", shape, &as_f32);
    let mut reqs = vec![header("sobel3d", &shape64, pb::DType::Int16, 0)];
    reqs.extend(chunks(&bytes::Bytes::from(raw.clone()), 333)); // odd: splits elements
    let s = client
        .infer_stream(tokio_stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(collect(s).await.unwrap().1, want);
    // FP16 output: the f32 result rounded to half.
    let mut req = unary("sobel3d", pb::DType::Int16, &shape64, raw.into());
    req.output_dtype = pb::DType::Fp16 as i32;
    let r = client
        .infer(req)
        .await
        .unwrap()
        .into_inner()
        .output
        .unwrap();
    assert_eq!(r.dtype, pb::DType::Fp16 as i32);
    let got = halves(&r.data);
    let want16: Vec<f32> = want
        .iter()
        .map(|&v| half::f16::from_f32(v).to_f32())
        .collect();
    assert_eq!(got, want16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_and_get_models() {
    let server = TestServer::start(Config::for_tests(), models()).await;
    let mut client = server.client().await;
    let list = client
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = list.models.iter().map(|m| m.name.as_str()).collect();
    assert!(
        names.contains(&"sobel3d") && names.contains(&"gaussian3d"),
        "{names:?}"
    );
    let sobel = client
        .get_model(pb::GetModelRequest {
            name: "sobel3d".into(),
            scan_shape: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((sobel.input_channels, sobel.output_channels), (1, 3));
    assert_eq!(sobel.layers[0].kernel, vec![3, 3, 3]);
    assert_eq!(sobel.receptive_field, vec![3, 3, 3]);
    assert_eq!(sobel.accepted_dtypes.len(), 6);
    assert!(
        sobel.output_shape.contains("[N, 3, oD, oH, oW]"),
        "{}",
        sobel.output_shape
    );
    let e = client
        .get_model(pb::GetModelRequest {
            name: "nope".into(),
            scan_shape: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

/// Expects `code` and every `words` in the message.
fn expect(e: tonic::Status, code: Code, words: &[&str]) {
    assert_eq!(e.code(), code, "{e:?}");
    for w in words {
        assert!(e.message().contains(w), "{w:?} not in {:?}", e.message());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_class_has_its_code_and_a_precise_message() {
    let mut config = Config::for_tests();
    config.memory_budget = 64 << 20;
    let server = TestServer::start(config, models()).await;
    let mut c = server.client().await;
    let x = f32_bytes(&[0.0; 1000]);
    let s = [1u64, 1, 10, 10, 10];
    let infer = |r| {
        let mut c = c.clone();
        async move { c.infer(r).await.unwrap_err() }
    };
    expect(
        infer(unary("nope", pb::DType::Fp32, &s, x.clone())).await,
        Code::NotFound,
        &["model", "nope", "sobel3d"],
    );
    expect(
        infer(unary(
            "sobel3d",
            pb::DType::Fp32,
            &[1, 10, 10, 10],
            x.clone(),
        ))
        .await,
        Code::InvalidArgument,
        &["input.shape", "5 dimensions", "got 4"],
    );
    expect(
        infer(unary(
            "sobel3d",
            pb::DType::Fp32,
            &[1, 2, 10, 10, 5],
            x.clone(),
        ))
        .await,
        Code::InvalidArgument,
        &["input.shape[1]", "expects 1", "got 2"],
    );
    expect(
        infer(unary(
            "sobel3d",
            pb::DType::Fp32,
            &s,
            f32_bytes(&[0.0; 999]),
        ))
        .await,
        Code::InvalidArgument,
        &["input.data", "expected 4000 bytes", "got 3996"],
    );
    expect(
        infer(unary("sobel3d", pb::DType::DtypeUnspecified, &s, x.clone())).await,
        Code::InvalidArgument,
        &["input.dtype", "FP32", "got 0"],
    );
    let mut bad_out = unary("sobel3d", pb::DType::Fp32, &s, x.clone());
    bad_out.output_dtype = pb::DType::Int16 as i32;
    expect(
        infer(bad_out).await,
        Code::InvalidArgument,
        &["output_dtype", "FP32 or FP16", "INT16"],
    );
    expect(
        infer(unary(
            "nopad",
            pb::DType::Fp32,
            &[1, 1, 2, 10, 50],
            f32_bytes(&[0.0; 1000]),
        ))
        .await,
        Code::InvalidArgument,
        &["input.shape", "depth", "3", "2"],
    );
    expect(
        infer(unary(
            "sobel3d",
            pb::DType::Fp32,
            &[1, 1, 0, 10, 10],
            bytes::Bytes::new(),
        ))
        .await,
        Code::InvalidArgument,
        &["input.shape", "D"],
    );
    expect(
        infer(unary(
            "sobel3d",
            pb::DType::Fp32,
            &[u64::MAX, 1, 1 << 40, 1 << 40, 1 << 40],
            x.clone(),
        ))
        .await,
        Code::InvalidArgument,
        &["input.shape"],
    );
    // Output larger than one message: refused, pointing at InferStream.
    let big = [1u64, 1, 64, 64, 64];
    expect(
        infer(unary(
            "c16",
            pb::DType::Uint8,
            &big,
            bytes::Bytes::from(vec![0u8; 64 * 64 * 64]),
        ))
        .await,
        Code::ResourceExhausted,
        &["output", "InferStream"],
    );
    // More memory than the whole budget: refused at once.
    let huge = [1u64, 1, 512, 512, 512];
    let t0 = Instant::now();
    let e = c
        .infer_stream(tokio_stream::iter(vec![header(
            "c16",
            &huge,
            pb::DType::Uint8,
            0,
        )]))
        .await;
    let e = match e {
        Err(e) => e,
        Ok(s) => collect(s.into_inner()).await.unwrap_err(),
    };
    expect(e, Code::ResourceExhausted, &["bytes", "budget"]);
    assert!(t0.elapsed() < Duration::from_secs(2));

    // Stream protocol errors.
    let stream_err = |reqs: Vec<pb::InferStreamRequest>| {
        let mut c = c.clone();
        async move {
            match c.infer_stream(tokio_stream::iter(reqs)).await {
                Err(e) => e,
                Ok(s) => collect(s.into_inner()).await.unwrap_err(),
            }
        }
    };
    expect(
        stream_err(chunks(&x, 100)).await,
        Code::InvalidArgument,
        &["header", "first message", "chunk"],
    );
    let mut reqs = vec![header("sobel3d", &s, pb::DType::Fp32, 0)];
    let mut cs = chunks(&x, 1000);
    cs.swap(1, 2);
    reqs.extend(cs);
    expect(
        stream_err(reqs).await,
        Code::InvalidArgument,
        &["chunk.offset", "expected 1000", "got 2000"],
    );
    let mut reqs = vec![header("sobel3d", &s, pb::DType::Fp32, 0)];
    reqs.extend(chunks(&f32_bytes(&[0.0; 1001]), 1002));
    expect(
        stream_err(reqs).await,
        Code::InvalidArgument,
        &["chunk.data", "4000 bytes", "ends at 4004"],
    );
    let mut reqs = vec![header("sobel3d", &s, pb::DType::Fp32, 0)];
    reqs.extend(chunks(&f32_bytes(&[0.0; 500]), 1000));
    expect(
        stream_err(reqs).await,
        Code::InvalidArgument,
        &["input ended after 2000 of 4000 bytes"],
    );
    let mut reqs = vec![
        header("sobel3d", &s, pb::DType::Fp32, 0),
        header("sobel3d", &s, pb::DType::Fp32, 0),
    ];
    reqs.extend(chunks(&x, 1000));
    expect(
        stream_err(reqs).await,
        Code::InvalidArgument,
        &["second header"],
    );

    // A deadline that passes while computing.
    // Sent as a raw grpc-timeout header over a client without its own deadline timer
    // (tonic's Channel would answer CANCELLED locally, racing the server's answer).
    // Both RPCs answer DEADLINE_EXCEEDED: the server's deadline fires a margin before tonic
    // server's own timer (which would answer CANCELLED "Timeout expired").
    // (A 6 GFLOP job on one thread, ~100 ms, against a 50 ms deadline: the header phase is
    // far shorter, so the deadline passes while computing.)
    let vol = bytes::Bytes::from(vec![1u8; 192 * 192 * 192]);
    let mut reqs = vec![header("c16", &[1, 1, 192, 192, 192], pb::DType::Uint8, 0)];
    reqs.extend(chunks(&vol, 1 << 20));
    let mut raw = server.client_without_deadline_timer().await;
    let mut req = Request::new(tokio_stream::iter(reqs));
    req.metadata_mut()
        .insert("grpc-timeout", "50m".parse().unwrap());
    let e = match raw.infer_stream(req).await {
        Err(e) => e,
        Ok(s) => {
            // Read (and drop) whatever arrives until the stream ends with its status.
            let mut s = s.into_inner();
            loop {
                match s.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => panic!("the stream ended without the deadline status"),
                    Err(e) => break e,
                }
            }
        }
    };
    expect(e, Code::DeadlineExceeded, &["deadline"]);
    let vol = bytes::Bytes::from(vec![1u8; 96 * 96 * 96]);
    let mut req = Request::new(unary(
        "gaussian3d",
        pb::DType::Uint8,
        &[1, 1, 96, 96, 96],
        vol,
    ));
    req.metadata_mut()
        .insert("grpc-timeout", "1m".parse().unwrap());
    let e = raw.infer(req).await.unwrap_err();
    expect(e, Code::DeadlineExceeded, &["deadline passed while"]);

    // The server still serves.
    c.infer(unary("sobel3d", pb::DType::Fp32, &s, x.clone()))
        .await
        .unwrap();
    wait_for("jobs to finish", Duration::from_secs(5), || {
        server.stats.busy.load(Ordering::SeqCst) == 0
            && server.stats.reserved_bytes.load(Ordering::SeqCst) == 0
    })
    .await;
}

/// A stream whose client never reads: the worker blocks on backpressure, so it stays busy
/// until the client goes away. The output (56 MiB, 7 slabs) is far larger than what the
/// response queue and the HTTP/2 windows hold together.
async fn stalled_stream(server: &TestServer) -> tonic::Streaming<pb::InferStreamResponse> {
    let mut c = server.client().await;
    let shape = [1u64, 1, 96, 96, 96];
    let mut reqs = vec![header("c16", &shape, pb::DType::Uint8, 4096)];
    reqs.extend(chunks(
        &bytes::Bytes::from(vec![3u8; 96 * 96 * 96]),
        1 << 16,
    ));
    c.infer_stream(tokio_stream::iter(reqs))
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_cancels_mid_stream_frees_its_worker_and_memory() {
    let mut config = Config::for_tests();
    config.stream_buffer = 1;
    let server = TestServer::start(config, models()).await;
    let mut s = stalled_stream(&server).await;
    // Read the header and one chunk, then stop reading.
    s.message().await.unwrap().unwrap();
    s.message().await.unwrap().unwrap();
    wait_for("the worker to be busy", Duration::from_secs(5), || {
        server.stats.busy.load(Ordering::SeqCst) == 1
    })
    .await;
    assert!(server.stats.reserved_bytes.load(Ordering::SeqCst) > 0);
    drop(s); // the client cancels (RST_STREAM)
    let t0 = Instant::now();
    wait_for("the worker to be freed", Duration::from_secs(2), || {
        server.stats.busy.load(Ordering::SeqCst) == 0
            && server.stats.reserved_bytes.load(Ordering::SeqCst) == 0
    })
    .await;
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "freed in {:?}",
        t0.elapsed()
    );
    // And the freed worker serves the next call.
    let mut c = server.client().await;
    let x = f32_bytes(&[1.0; 1000]);
    c.infer(unary("sobel3d", pb::DType::Fp32, &[1, 1, 10, 10, 10], x))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_is_refused_without_waiting() {
    let mut config = Config::for_tests();
    config.stream_buffer = 1;
    config.workers = 1;
    config.queue_len = 1;
    let server = TestServer::start(config, models()).await;
    let mut busy = stalled_stream(&server).await;
    busy.message().await.unwrap().unwrap();
    wait_for("the worker to be busy", Duration::from_secs(5), || {
        server.stats.busy.load(Ordering::SeqCst) == 1
    })
    .await;
    let mut queued = stalled_stream(&server).await;
    let _ = tokio::time::timeout(Duration::from_millis(200), queued.message()).await;
    wait_for("one job queued", Duration::from_secs(5), || {
        server.stats.queued.load(Ordering::SeqCst) == 1
    })
    .await;
    let mut c = server.client().await;
    let t0 = Instant::now();
    let x = f32_bytes(&[1.0; 1000]);
    let e = c
        .infer(unary("sobel3d", pb::DType::Fp32, &[1, 1, 10, 10, 10], x))
        .await
        .unwrap_err();
    expect(e, Code::ResourceExhausted, &["queue is full"]);
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "refused in {:?}",
        t0.elapsed()
    );
    drop(busy);
    drop(queued);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_calls_and_refuses_new_ones() {
    let mut config = Config::for_tests();
    config.stream_buffer = 1;
    let mut server = TestServer::start(config, models()).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        tonic::transport::Endpoint::from_shared(server.url())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let status = |r: tonic_health::pb::HealthCheckResponse| r.status;
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    for svc in ["", "voxconv.v1.Inference"] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: svc.into(),
            })
            .await
            .unwrap();
        assert_eq!(status(r.into_inner()), serving);
    }
    // An in-flight call, paused by backpressure.
    let mut s = stalled_stream(&server).await;
    s.message().await.unwrap().unwrap();
    wait_for("the worker to be busy", Duration::from_secs(5), || {
        server.stats.busy.load(Ordering::SeqCst) == 1
    })
    .await;
    server.shutdown();
    // The in-flight call still completes with every byte.
    let mut total = 0u64;
    let mut summary = None;
    while let Some(m) = s.message().await.unwrap() {
        match m.msg.unwrap() {
            pb::infer_stream_response::Msg::Chunk(c) => total += c.data.len() as u64,
            pb::infer_stream_response::Msg::Summary(x) => summary = Some(x),
            pb::infer_stream_response::Msg::Header(_)
            | pb::infer_stream_response::Msg::Progress(_) => {
                unreachable!()
            }
        }
    }
    assert_eq!(total, summary.unwrap().output_bytes);
    let url = server.url();
    server.join.await.unwrap().unwrap();
    // Nothing listens any more.
    assert!(
        voxconv::proto::voxconv::v1::inference_client::InferenceClient::connect(url)
            .await
            .is_err()
    );
}
