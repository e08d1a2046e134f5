//! A real server on 127.0.0.1:0 with a shutdown handle, and helpers for its clients.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use voxconv::config::Config;
use voxconv::kernel::{Activation, Conv3dParams};
use voxconv::model::repo::ModelRegistry;
use voxconv::model::{ConvLayer, Layer, Model, ModelSet};
use voxconv::pool::PoolStats;
use voxconv::proto::voxconv::v1 as pb;
use voxconv::proto::voxconv::v1::inference_client::InferenceClient;

pub struct TestServer {
    pub addr: SocketAddr,
    pub stats: Arc<PoolStats>,
    /// Where `/metrics` is served (servers started with `start_with_metrics`).
    pub metrics_addr: Option<SocketAddr>,
    shutdown: Option<oneshot::Sender<()>>,
    pub join: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl TestServer {
    pub async fn start(config: Config, models: ModelSet) -> Self {
        Self::start_registry(config, Arc::new(ModelRegistry::fixed(models))).await
    }

    pub async fn start_registry(config: Config, models: Arc<ModelRegistry>) -> Self {
        Self::start_inner(config, models, false).await
    }

    /// Also serves Prometheus metrics on another 127.0.0.1 port.
    pub async fn start_with_metrics(config: Config, models: ModelSet) -> Self {
        Self::start_inner(config, Arc::new(ModelRegistry::fixed(models)), true).await
    }

    async fn start_inner(config: Config, models: Arc<ModelRegistry>, metrics: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics_listener = if metrics {
            Some(TcpListener::bind("127.0.0.1:0").await.unwrap())
        } else {
            None
        };
        let (tx, rx) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = oneshot::channel();
        let join = tokio::spawn(voxconv::server::run(
            listener,
            metrics_listener,
            config,
            models,
            async move {
                let _ = rx.await;
            },
            move |state| {
                let _ = ready_tx.send(state);
            },
        ));
        let state = ready_rx.await.unwrap();
        Self {
            addr,
            stats: state.stats,
            metrics_addr: state.metrics_addr,
            shutdown: Some(tx),
            join,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn client(&self) -> InferenceClient<tonic::transport::Channel> {
        InferenceClient::connect(self.url())
            .await
            .unwrap()
            .max_decoding_message_size(64 << 20)
    }

    /// A client over a bare hyper HTTP/2 connection. tonic's `Channel` runs its own timer
    /// from a request's `grpc-timeout` header and answers CANCELLED locally when it passes;
    /// this one waits for whatever the server answers.
    pub async fn client_without_deadline_timer(&self) -> InferenceClient<RawH2> {
        let send = self.h2().await;
        let origin: http::Uri = self.url().parse().unwrap();
        InferenceClient::with_origin(RawH2(send), origin).max_decoding_message_size(64 << 20)
    }

    /// A bare hyper HTTP/2 connection to the server (requests with any headers and body).
    pub async fn h2(&self) -> hyper::client::conn::http2::SendRequest<tonic::body::Body> {
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let (send, conn) =
            hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        send
    }

    /// Begins graceful shutdown.
    pub fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A hyper HTTP/2 connection as a tower service (see `client_without_deadline_timer`).
#[derive(Clone)]
pub struct RawH2(hyper::client::conn::http2::SendRequest<tonic::body::Body>);

impl tower_service::Service<http::Request<tonic::body::Body>> for RawH2 {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(req))
    }
}

/// Polls `cond` until it holds or `limit` passes (a bounded wait on an observable condition,
/// not a sleep that orders events).
pub async fn wait_for(what: &str, limit: Duration, cond: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Built-in models plus test ones: `c16` (1 → 16 channels, 3×3×3, padding 1, bias, ReLU) and
/// `nopad` (1 → 1, 3×3×3, no padding).
pub fn models() -> ModelSet {
    let mut set = ModelSet::builtin();
    set.insert(Model {
        name: "c16".into(),
        description: "test: 16 random filters".into(),
        layers: vec![Layer::Conv(ConvLayer {
            filter_shape: [16, 1, 3, 3, 3],
            weights: voxconv::kernel::seeded(16 * 27, 5),
            bias: Some(voxconv::kernel::seeded(16, 6)),
            params: Conv3dParams {
                padding: [1; 3],
                ..Conv3dParams::default()
            },
            activation: Activation::Relu,
        })],
        window_defaults: Default::default(),
    });
    set.insert(Model {
        name: "nopad".into(),
        description: "test: no padding".into(),
        layers: vec![Layer::Conv(ConvLayer {
            filter_shape: [1, 1, 3, 3, 3],
            weights: voxconv::kernel::seeded(27, 7),
            bias: None,
            params: Conv3dParams::default(),
            activation: Activation::None,
        })],
        window_defaults: Default::default(),
    });
    set
}

/// A unary Infer request.
pub fn unary(model: &str, dtype: pb::DType, shape: &[u64], data: Bytes) -> pb::InferRequest {
    pb::InferRequest {
        model: model.into(),
        input: Some(pb::Tensor {
            dtype: dtype as i32,
            shape: shape.to_vec(),
            data,
        }),
        output_dtype: 0,
        sliding_window: None,
    }
}

pub fn f32_bytes(v: &[f32]) -> Bytes {
    Bytes::from(v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())
}

/// Little-endian float32 bytes back to values (the inverse of [`f32_bytes`]).
pub fn floats(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Little-endian float16 bytes as float32 values.
pub fn halves(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(2)
        .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect()
}

pub fn header(
    model: &str,
    shape: &[u64],
    dtype: pb::DType,
    max_chunk: u64,
) -> pb::InferStreamRequest {
    pb::InferStreamRequest {
        msg: Some(pb::infer_stream_request::Msg::Header(pb::StreamHeader {
            model: model.into(),
            input_dtype: dtype as i32,
            input_shape: shape.to_vec(),
            output_dtype: pb::DType::Fp32 as i32,
            max_chunk_bytes: max_chunk,
            ..Default::default()
        })),
    }
}

pub fn chunks(data: &Bytes, size: usize) -> Vec<pb::InferStreamRequest> {
    voxconv::client::stream::input_chunks(data.clone(), size).collect()
}

/// The kernel's own result for a model on an f32 input (the reference for the service).
pub fn kernel_output(models: &ModelSet, name: &str, shape: [usize; 5], x: &[f32]) -> Vec<f32> {
    let m = models.get(name).unwrap();
    let plan = m.plan(shape).unwrap();
    let l = m.convs().next().unwrap();
    let mut out = vec![0f32; plan.output_len()];
    plan.conv(0)
        .unwrap()
        .run_into(x, &l.weights, l.bias.as_deref(), &mut out, 1, None)
        .unwrap();
    out
}
