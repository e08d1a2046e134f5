//! Connection-level abuse: undecodable messages are the client's mistake on every unary RPC
//! of both APIs; silent connections are closed at the preface deadline; one address cannot
//! take the whole connection budget; a full budget closes a connection that never sent its
//! preface rather than refusing a client that does.

use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;
use voxconv::config::Config;

use crate::common::{models, TestServer};

/// Sends the given bytes as the message, whatever they are.
#[derive(Default)]
struct RawCodec;
struct RawEncoder;
struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

/// The unary RPCs of both APIs, read from the proto files (a new one is covered by itself).
fn unary_rpcs() -> Vec<String> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut paths = Vec::new();
    for (file, service) in [
        ("proto/voxconv/v1/voxconv.proto", "voxconv.v1.Inference"),
        (
            "proto/inference/grpc_service.proto",
            "inference.GRPCInferenceService",
        ),
    ] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        for line in text.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("rpc ") {
                if !line.contains("(stream ") {
                    let name = rest.split('(').next().unwrap().trim();
                    paths.push(format!("/{service}/{name}"));
                }
            }
        }
    }
    paths
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_messages_are_invalid_argument_on_every_unary_rpc() {
    let srv = TestServer::start_with_metrics(Config::for_tests(), models()).await;
    let channel = tonic::transport::Endpoint::from_shared(srv.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let rpcs = unary_rpcs();
    assert!(rpcs.len() >= 14, "{rpcs:?}");
    // A truncated varint key; a length-delimited field 1 claiming more bytes than follow.
    for body in [&b"\xff"[..], &b"\x0a\x7fabc"[..]] {
        for path in &rpcs {
            let mut grpc = tonic::client::Grpc::new(channel.clone());
            grpc.ready().await.unwrap();
            let r = grpc
                .unary(
                    tonic::Request::new(Bytes::from_static(body)),
                    path.parse().unwrap(),
                    RawCodec,
                )
                .await;
            let s = r.expect_err(path);
            assert_eq!(s.code(), tonic::Code::InvalidArgument, "{path}: {s:?}");
            assert!(
                s.message().contains("do not decode as"),
                "{path}: {}",
                s.message()
            );
        }
    }
    // Counted as the client's errors, though no handler ran (2 bodies per method).
    let (_, _, body) = crate::metrics::scrape(&srv).await;
    for method in ["Infer", "ModelInfer"] {
        let key = format!(
            r#"voxconv_requests_total{{method="{method}",model="_unknown",code="INVALID_ARGUMENT"}} 2"#
        );
        assert!(body.contains(&key), "{key} not in\n{body}");
    }
    // The server is still fine.
    let mut c = srv.client().await;
    c.list_models(voxconv::proto::voxconv::v1::ListModelsRequest {})
        .await
        .unwrap();
}

/// Sends one request over a bare HTTP/2 connection, with the given headers and an empty
/// gRPC message as its body; returns the answer's HTTP status and headers.
async fn raw_call(
    srv: &TestServer,
    path: &str,
    headers: &[(&str, &str)],
) -> (http::StatusCode, http::HeaderMap) {
    let mut send = srv.h2().await;
    let mut req = http::Request::post(format!("{}{path}", srv.url()));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(tonic::body::Body::new(http_body_util::Full::new(
            Bytes::from_static(&[0, 0, 0, 0, 0]),
        )))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    (resp.status(), resp.headers().clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_content_type_or_unknown_compression_is_the_clients_error() {
    let srv = TestServer::start_with_metrics(Config::for_tests(), models()).await;
    let rpcs = unary_rpcs();
    for path in &rpcs {
        for ct in [Some("application/json"), Some("text/plain"), None] {
            let mut h = vec![("te", "trailers")];
            h.extend(ct.map(|c| ("content-type", c)));
            let (status, headers) = raw_call(&srv, path, &h).await;
            // The gRPC HTTP/2 protocol: a server answers a non-gRPC content-type 415.
            assert_eq!(
                status,
                http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "{path} {ct:?}"
            );
            assert_eq!(
                headers["grpc-status"], "3",
                "{path} {ct:?}: INVALID_ARGUMENT"
            );
            let msg = headers["grpc-message"].to_str().unwrap();
            assert!(msg.starts_with("content-type"), "{path}: {msg}");
        }
        let h = [
            ("te", "trailers"),
            ("content-type", "application/grpc"),
            ("grpc-encoding", "snappy"),
        ];
        let (status, headers) = raw_call(&srv, path, &h).await;
        assert_eq!(status, http::StatusCode::OK, "{path}");
        assert_eq!(headers["grpc-status"], "12", "{path}: UNIMPLEMENTED");
        assert!(headers["grpc-message"].to_str().unwrap().contains("snappy"));
        assert!(headers.contains_key("grpc-accept-encoding"));
    }
    // Recorded as client errors under their method (3 content-types + 1 compression).
    let (_, _, body) = crate::metrics::scrape(&srv).await;
    for method in ["Infer", "ModelInfer"] {
        for (code, n) in [("INVALID_ARGUMENT", 3), ("UNIMPLEMENTED", 1)] {
            let key = format!(
                r#"voxconv_requests_total{{method="{method}",model="_unknown",code="{code}"}} {n}"#
            );
            assert!(body.contains(&key), "{key} not in\n{body}");
        }
    }
    println!(
        "protocol: wrong or missing content-type on {} unary RPCs answered HTTP 415 + \
         INVALID_ARGUMENT, unknown grpc-encoding UNIMPLEMENTED naming what is accepted",
        rpcs.len()
    );
}

/// Connects from `source` (another loopback address stands for another host).
async fn connect_from(source: &str, to: std::net::SocketAddr) -> tokio::net::TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{source}:0").parse().unwrap()).unwrap();
    sock.connect(to).await.unwrap()
}

/// Seconds until the server closes `s` (EOF or reset), at most `limit`.
async fn closed_after(mut s: tokio::net::TcpStream, limit: Duration) -> Option<f64> {
    let t0 = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((t0 + limit).into(), s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(t0.elapsed().as_secs_f64()),
            Ok(Ok(_)) => {} // the server's SETTINGS
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_half_preface_connections_close_at_the_deadline() {
    let mut config = Config::for_tests();
    config.limits.http2_preface_timeout = Duration::from_millis(500);
    let srv = TestServer::start(config, models()).await;
    let silent = connect_from("127.0.0.2", srv.addr).await;
    let mut half = connect_from("127.0.0.2", srv.addr).await;
    half.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    // A client that sends its preface stays.
    let mut c = srv.client().await;
    let limit = Duration::from_secs(3);
    let (a, b) = tokio::join!(closed_after(silent, limit), closed_after(half, limit));
    for (what, t) in [("silent", a), ("half preface", b)] {
        let t = t.unwrap_or_else(|| panic!("{what}: still open after {limit:?}"));
        assert!((0.45..1.5).contains(&t), "{what}: closed after {t:.2} s");
        println!("preface deadline: {what} connection closed after {t:.2} s (deadline 0.5 s)");
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    c.list_models(voxconv::proto::voxconv::v1::ListModelsRequest {})
        .await
        .expect("a connection that sent its preface outlives the deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_is_capped_while_another_is_served() {
    let mut config = Config::for_tests();
    config.limits.max_connections = 8;
    config.limits.max_connections_per_ip = 4;
    config.limits.http2_preface_timeout = Duration::from_secs(30);
    let srv = TestServer::start(config, models()).await;
    // 10 silent connections from one address: 4 stay, 6 are closed at once.
    let mut from_one = Vec::new();
    for _ in 0..10 {
        from_one.push(connect_from("127.0.0.2", srv.addr).await);
    }
    let closed = futures_closed(from_one, Duration::from_millis(500)).await;
    assert_eq!(
        closed, 6,
        "connections beyond the per-address cap are closed"
    );
    // Another address is served meanwhile.
    let mut c = srv.client().await;
    c.list_models(voxconv::proto::voxconv::v1::ListModelsRequest {})
        .await
        .unwrap();
}

/// How many of `conns` the server closes within `wait`.
async fn futures_closed(conns: Vec<tokio::net::TcpStream>, wait: Duration) -> usize {
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|s| tokio::spawn(closed_after(s, wait)))
        .collect();
    let mut n = 0;
    for t in tasks {
        if t.await.unwrap().is_some() {
            n += 1;
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_budget_closes_the_oldest_silent_connection_for_a_new_client() {
    let mut config = Config::for_tests();
    config.limits.max_connections = 6;
    config.limits.max_connections_per_ip = 6;
    config.limits.http2_preface_timeout = Duration::from_secs(30);
    let srv = TestServer::start(config, models()).await;
    // The budget, filled with silent connections from several addresses.
    let mut silent = Vec::new();
    for i in 0..6 {
        silent.push(connect_from(&format!("127.0.0.{}", 2 + i % 3), srv.addr).await);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A real client still gets in: the oldest silent connection makes room.
    let t0 = Instant::now();
    let mut c = srv.client().await;
    c.list_models(voxconv::proto::voxconv::v1::ListModelsRequest {})
        .await
        .expect("a new client is served although the budget was full of silent connections");
    println!(
        "full budget: a new client served after {:.1} ms",
        t0.elapsed().as_secs_f64() * 1e3
    );
    let oldest = silent.remove(0);
    assert!(
        closed_after(oldest, Duration::from_secs(2)).await.is_some(),
        "the oldest silent connection was closed"
    );
}

/// Reads HTTP/2 frames from `s` until the server closes it or `limit` passes: seconds until
/// the first GOAWAY frame, and until the close.
async fn goaway_then_close(
    mut s: tokio::net::TcpStream,
    limit: Duration,
) -> (Option<f64>, Option<f64>) {
    let t0 = Instant::now();
    let (mut buf, mut chunk) = (Vec::new(), [0u8; 4096]);
    let mut goaway = None;
    loop {
        match tokio::time::timeout_at((t0 + limit).into(), s.read(&mut chunk)).await {
            Err(_) => return (goaway, None),
            Ok(Ok(0)) | Ok(Err(_)) => return (goaway, Some(t0.elapsed().as_secs_f64())),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
        // Whole frames: 3-byte length, type, flags, stream id, payload.
        while buf.len() >= 9 {
            let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
            if buf.len() < 9 + len {
                break;
            }
            if buf[3] == 0x7 && goaway.is_none() {
                goaway = Some(t0.elapsed().as_secs_f64());
            }
            buf.drain(..9 + len);
        }
    }
}

const PREFACE_AND_SETTINGS: &[u8] =
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_sent_goaway_and_closed() {
    let mut config = Config::for_tests();
    config.limits.idle_connection_timeout = Some(Duration::from_millis(600));
    let srv = TestServer::start(config, models()).await;
    // An HTTP/2 client that says hello and then opens no stream.
    let mut s = connect_from("127.0.0.2", srv.addr).await;
    s.write_all(PREFACE_AND_SETTINGS).await.unwrap();
    let (goaway, closed) = goaway_then_close(s, Duration::from_secs(5)).await;
    let goaway = goaway.expect("a GOAWAY frame before the close");
    let closed = closed.expect("closed within 5 s");
    assert!((0.55..2.0).contains(&goaway), "GOAWAY after {goaway:.2} s");
    assert!(
        closed >= goaway,
        "closed at {closed:.2} s, GOAWAY at {goaway:.2} s"
    );
    println!(
        "idle connection: GOAWAY after {goaway:.2} s, closed after {closed:.2} s \
         (--idle-connection-timeout 600 ms)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_in_progress_keeps_its_connection_past_the_idle_timeout() {
    use crate::common::{chunks, header};
    use voxconv::proto::voxconv::v1 as pb;
    let mut config = Config::for_tests();
    config.limits.idle_connection_timeout = Some(Duration::from_millis(400));
    let srv = TestServer::start(config, models()).await;
    let mut c = srv.client().await;
    // An InferStream whose client waits 3 idle timeouts between its header and its data.
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(header(
        "sobel3d",
        &[1, 1, 8, 8, 8],
        pb::DType::Fp32,
        1 << 20,
    ))
    .await
    .unwrap();
    let call = tokio::spawn(async move {
        let mut s = c
            .infer_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        let mut summary = false;
        while let Some(m) = s.message().await? {
            summary |= matches!(m.msg, Some(pb::infer_stream_response::Msg::Summary(_)));
        }
        Ok::<_, Status>((summary, c))
    });
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let data = Bytes::from(vec![0u8; 4 * 512]);
    for m in chunks(&data, 1024) {
        tx.send(m).await.unwrap();
    }
    drop(tx);
    let (summary, mut c) = call
        .await
        .unwrap()
        .expect("a call open longer than the idle timeout is not cut");
    assert!(summary, "the stream ended with its Summary");
    // Idle now: the connection goes away, and the client's next call reconnects.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    c.list_models(pb::ListModelsRequest {})
        .await
        .expect("the client reconnects after its idle connection was closed");
    println!(
        "idle connection: a stream open 1.2 s (3x --idle-connection-timeout 400 ms) completed; \
         the client's next call after the idle close was served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_budget_of_idle_http2_connections_makes_room_for_a_new_client() {
    let mut config = Config::for_tests();
    config.limits.max_connections = 6;
    config.limits.max_connections_per_ip = 6;
    let srv = TestServer::start(config, models()).await;
    // The budget, filled with connections that said hello (preface + SETTINGS) and then
    // opened no stream, from several addresses; the idle timeout (5 min) is far off.
    let mut idle = Vec::new();
    for i in 0..6 {
        let mut s = connect_from(&format!("127.0.0.{}", 2 + i % 3), srv.addr).await;
        s.write_all(PREFACE_AND_SETTINGS).await.unwrap();
        idle.push(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t0 = Instant::now();
    let mut c = srv.client().await;
    c.list_models(voxconv::proto::voxconv::v1::ListModelsRequest {})
        .await
        .expect("a new client is served although the budget was full of idle connections");
    let served_ms = t0.elapsed().as_secs_f64() * 1e3;
    // One idle connection (the oldest the server registered) was asked to go away.
    let ends: Vec<_> = idle
        .into_iter()
        .map(|s| tokio::spawn(goaway_then_close(s, Duration::from_secs(3))))
        .collect();
    let mut gone = 0;
    for e in ends {
        if let (Some(_), Some(_)) = e.await.unwrap() {
            gone += 1;
        }
    }
    assert_eq!(gone, 1, "one idle connection got GOAWAY and was closed");
    println!(
        "full budget of idle HTTP/2 connections: a new client served after {served_ms:.1} ms; \
         one idle connection (of 6) sent GOAWAY and closed"
    );
}
