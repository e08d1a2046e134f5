//! Prometheus metrics: a real server with `/metrics` on 127.0.0.1:0, scraped over HTTP
//! before and after real calls.

use std::collections::HashMap;

use crate::common::{chunks, f32_bytes, header, models, unary, TestServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use voxconv::config::Config;
use voxconv::proto::voxconv::v1 as pb;

/// GET /metrics with a plain HTTP/1.1 request; returns (status line, content type, body).
pub(crate) async fn scrape(srv: &TestServer) -> (String, String, String) {
    let addr = srv.metrics_addr.expect("metrics listener");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.lines().next().unwrap().to_string();
    let ctype = head
        .lines()
        .find_map(|l| l.strip_prefix("content-type: "))
        .unwrap_or_default()
        .to_string();
    (status, ctype, body.to_string())
}

/// Sample lines `name{labels} value` as a map from `name{labels}` to value.
fn samples(body: &str) -> HashMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn get(m: &HashMap<String, f64>, key: &str) -> f64 {
    m.get(key).copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_and_histograms_move_with_their_labels() {
    let mut config = Config::for_tests();
    config.workers = 2;
    let srv = TestServer::start_with_metrics(config, models()).await;
    let (status, ctype, body) = scrape(&srv).await;
    assert!(status.contains("200"), "{status}");
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    let before = samples(&body);
    assert_eq!(get(&before, "voxconv_workers"), 2.0);
    assert_eq!(get(&before, "voxconv_queue_capacity"), 16.0);
    assert_eq!(
        get(&before, "voxconv_memory_budget_bytes"),
        (1u64 << 30) as f64
    );
    assert_eq!(get(&before, "voxconv_queue_length"), 0.0);

    let mut client = srv.client().await;
    let shape = [1u64, 1, 10, 9, 8];
    let x = f32_bytes(&voxconv::kernel::seeded(720, 1));
    // Two unary calls and one stream that succeed.
    for _ in 0..2 {
        client
            .infer(unary("c16", pb::DType::Fp32, &shape, x.clone()))
            .await
            .unwrap();
    }
    let msgs: Vec<_> = std::iter::once(header("sobel3d", &shape, pb::DType::Fp32, 0))
        .chain(chunks(&x, 1000))
        .collect();
    let mut s = client
        .infer_stream(tokio_stream::iter(msgs))
        .await
        .unwrap()
        .into_inner();
    while s.message().await.unwrap().is_some() {}
    // Failures: an unknown model (its name must not become a label) and a bad shape.
    let e = client
        .infer(unary(
            "no-such-model-123",
            pb::DType::Fp32,
            &shape,
            x.clone(),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let e = client
        .infer(unary(
            "c16",
            pb::DType::Fp32,
            &[1, 2, 4, 4, 4],
            Default::default(),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);

    // The stream's task records its call after the last message; wait for it to show.
    let key = r#"voxconv_requests_total{method="InferStream",model="sobel3d",code="OK"}"#;
    let mut after = samples(&scrape(&srv).await.2);
    for _ in 0..500 {
        if get(&after, key) >= 1.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        after = samples(&scrape(&srv).await.2);
    }
    let moved = |k: &str| get(&after, k) - get(&before, k);
    assert_eq!(
        moved(r#"voxconv_requests_total{method="Infer",model="c16",code="OK"}"#),
        2.0
    );
    assert_eq!(moved(key), 1.0);
    assert_eq!(
        moved(r#"voxconv_requests_total{method="Infer",model="_unknown",code="NOT_FOUND"}"#),
        1.0
    );
    assert_eq!(
        moved(r#"voxconv_requests_total{method="Infer",model="c16",code="INVALID_ARGUMENT"}"#),
        1.0
    );
    assert!(!after.keys().any(|k| k.contains("no-such-model")));
    // Stage histograms: one observation per successful call and stage.
    for stage in ["receive", "queue", "compute", "total"] {
        assert_eq!(
            moved(&format!(
                r#"voxconv_stage_duration_seconds_count{{method="Infer",stage="{stage}"}}"#
            )),
            2.0,
            "{stage}"
        );
        assert_eq!(
            moved(&format!(
                r#"voxconv_stage_duration_seconds_count{{method="InferStream",stage="{stage}"}}"#
            )),
            1.0,
            "{stage}"
        );
    }
    assert_eq!(moved("voxconv_queue_wait_seconds_count"), 3.0);
    // Work done: 3 calls of 720 output voxels per channel (16 + 16 + 3 channels).
    assert_eq!(
        moved("voxconv_output_voxels_total"),
        (720 * (16 + 16 + 3)) as f64
    );
    let flops = 2.0 * 720.0 * 27.0 * (16.0 + 16.0 + 3.0);
    assert!(
        (moved("voxconv_flops_total") - flops).abs() < 1.0,
        "{after:?}"
    );
    assert_eq!(moved("voxconv_input_bytes_total"), 3.0 * 720.0 * 4.0);
    assert!(moved(r#"voxconv_kernel_thread_seconds_total{stage="gemm"}"#) >= 0.0);
    assert!(after.contains_key(r#"voxconv_kernel_thread_seconds_total{stage="gemm"}"#));
    // Idle again: nothing queued, busy or reserved.
    assert_eq!(get(&after, "voxconv_workers_busy"), 0.0);
    assert_eq!(get(&after, "voxconv_memory_reserved_bytes"), 0.0);
}

/// A call whose deadline passes before its handler has finished it is still counted and
/// audited, exactly once: a unary Infer whose body never completes is answered by the front
/// layer (the handler never runs); an InferStream whose header never comes, by the handler
/// or the front layer, whichever fires first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_whose_deadline_passes_before_the_handler_finishes_are_recorded_once() {
    use http_body_util::StreamBody;
    use hyper::body::Frame;
    use tokio_stream::StreamExt;

    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let mut config = Config::for_tests();
    config.audit_log = Some(audit.clone());
    let srv = TestServer::start_with_metrics(config, models()).await;

    // Unary: five bytes of a gRPC frame announcing 1000, then nothing.
    let mut send = srv.h2().await;
    let prefix = bytes::Bytes::from_static(&[0, 0, 0, 0x03, 0xe8]);
    let frames = tokio_stream::iter([Ok::<_, std::convert::Infallible>(Frame::data(prefix))])
        .chain(tokio_stream::pending());
    let req = http::Request::post(format!("{}/voxconv.v1.Inference/Infer", srv.url()))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "150m")
        .body(tonic::body::Body::new(StreamBody::new(frames)))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(
        resp.headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap()),
        Some("4"),
        "trailers-only DEADLINE_EXCEEDED: {:?}",
        resp.headers()
    );

    // InferStream: no header ever.
    let mut c = srv.client_without_deadline_timer().await;
    let mut req = tonic::Request::new(tokio_stream::pending::<pb::InferStreamRequest>());
    req.set_timeout(std::time::Duration::from_millis(150));
    let code = match c.infer_stream(req).await {
        Ok(r) => r.into_inner().message().await.unwrap_err().code(),
        Err(s) => s.code(),
    };
    assert_eq!(code, tonic::Code::DeadlineExceeded);

    let m = samples(&scrape(&srv).await.2);
    for method in ["Infer", "InferStream"] {
        let key = format!(
            r#"voxconv_requests_total{{method="{method}",model="_unknown",code="DEADLINE_EXCEEDED"}}"#
        );
        assert_eq!(get(&m, &key), 1.0, "{key}");
    }
    let lines = std::fs::read_to_string(&audit).unwrap();
    for method in ["Infer", "InferStream"] {
        let n = lines
            .lines()
            .filter(|l| {
                l.contains(&format!(r#""method":"{method}""#)) && l.contains("DEADLINE_EXCEEDED")
            })
            .count();
        assert_eq!(n, 1, "{method} audited once: {lines}");
    }
}

/// Server-created shared memory shows as a gauge next to its limit, so regions clients
/// forget to unregister are visible; off (0) without --shared-memory-dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_created_shared_memory_is_a_gauge_beside_its_limit() {
    let off = TestServer::start_with_metrics(Config::for_tests(), models()).await;
    let m = samples(&scrape(&off).await.2);
    assert_eq!(get(&m, "voxconv_shared_memory_create_limit_bytes"), 0.0);

    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::for_tests();
    config.shared_memory_dir = Some(dir.path().to_path_buf());
    config.shared_memory_create_limit = 1 << 20;
    let srv = TestServer::start_with_metrics(config, models()).await;
    let mut c = srv.client().await;
    let m = samples(&scrape(&srv).await.2);
    assert_eq!(
        get(&m, "voxconv_shared_memory_create_limit_bytes"),
        (1u64 << 20) as f64
    );
    assert_eq!(get(&m, "voxconv_shared_memory_created_bytes"), 0.0);
    c.create_shared_memory(pb::CreateSharedMemoryRequest {
        name: "g".into(),
        byte_size: 12288,
    })
    .await
    .unwrap();
    let m = samples(&scrape(&srv).await.2);
    assert_eq!(get(&m, "voxconv_shared_memory_created_bytes"), 12288.0);
    c.unregister_shared_memory(pb::UnregisterSharedMemoryRequest { name: "g".into() })
        .await
        .unwrap();
    let m = samples(&scrape(&srv).await.2);
    assert_eq!(get(&m, "voxconv_shared_memory_created_bytes"), 0.0);
}
