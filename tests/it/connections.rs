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
    let srv = TestServer::start(Config::for_tests(), models()).await;
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
    // The server is still fine.
    let mut c = srv.client().await;
    c.list_models(voxconv::proto::voxconv::v1::ListModelsRequest {})
        .await
        .unwrap();
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
