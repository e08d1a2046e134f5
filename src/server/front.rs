//! The layer in front of every service (deadline, authentication) and the connection cap.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::transport::server::Connected;

use crate::auth::{peer_of, Auth};
use crate::obs::audit::{now_utc, AuditLog, AuditRecord};
use crate::obs::calls::{record_call, FinishedCall};
use crate::obs::metrics::Metrics;
use crate::wire::deadline::{before, deadline_from, CallDeadline};

/// Tower layer in front of every service, run on each request head: works out the call's
/// deadline ([`CallDeadline`]) and runs [`Auth::check`].
#[derive(Clone)]
pub struct FrontLayer {
    auth: Arc<Auth>,
    audit: Option<Arc<AuditLog>>,
    metrics: Arc<Metrics>,
}

impl FrontLayer {
    /// `metrics` counts the calls this layer answers itself (deadline passed before the
    /// handler could).
    pub fn new(auth: Arc<Auth>, audit: Option<Arc<AuditLog>>, metrics: Arc<Metrics>) -> Self {
        Self {
            auth,
            audit,
            metrics,
        }
    }
}

/// The name metrics and the audit trail give an inference RPC (the calls the handlers
/// record); other paths are not recorded, so a client's path never becomes a label.
fn recorded_method(path: &str) -> Option<&'static str> {
    match path {
        "/voxconv.v1.Inference/Infer" => Some("Infer"),
        "/voxconv.v1.Inference/InferStream" => Some("InferStream"),
        "/inference.GRPCInferenceService/ModelInfer" => Some("ModelInfer"),
        _ => None,
    }
}

impl<S> tower_layer::Layer<S> for FrontLayer {
    type Service = FrontService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        FrontService {
            inner,
            auth: Arc::clone(&self.auth),
            audit: self.audit.clone(),
            metrics: Arc::clone(&self.metrics),
        }
    }
}

#[derive(Clone)]
pub struct FrontService<S> {
    inner: S,
    auth: Arc<Auth>,
    audit: Option<Arc<AuditLog>>,
    metrics: Arc<Metrics>,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> tower_service::Service<http::Request<B>> for FrontService<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // The deadline counts from here, the head's arrival, not from when the handler starts
        // (a unary body is read and decoded in between).
        let arrived = std::time::Instant::now();
        let deadline = deadline_from(req.headers(), arrived);
        req.extensions_mut().insert(CallDeadline(deadline));
        match self.auth.check(&req) {
            Ok(caller) => {
                let method = recorded_method(req.uri().path());
                let who = (caller.0.clone(), peer_of(&req));
                req.extensions_mut().insert(caller);
                let call = self.inner.call(req);
                let (audit, metrics) = (self.audit.clone(), Arc::clone(&self.metrics));
                match deadline {
                    None => Box::pin(call),
                    // Covers what happens before the handler can watch the deadline itself
                    // (reading and decoding a unary body); the handler's own timer fires at
                    // the same instant and, polled first, answers with the stage it was in.
                    // The handler then never finishes the call, so it is recorded here.
                    Some(at) => Box::pin(async move {
                        match before(at, call).await {
                            Ok(r) => r,
                            Err(()) => {
                                if let Some(method) = method {
                                    record_front_deadline(method, who, arrived, audit, &metrics);
                                }
                                Ok(tonic::Status::deadline_exceeded(
                                    "deadline passed while receiving the request",
                                )
                                .into_http())
                            }
                        }
                    }),
                }
            }
            Err(status) => {
                if let Some(audit) = &self.audit {
                    audit.write(&AuditRecord {
                        time: now_utc(),
                        caller: "unauthenticated",
                        peer: peer_of(&req).map(|a| a.to_string()),
                        method: req.uri().path(),
                        model: "",
                        input_bytes: 0,
                        output_bytes: 0,
                        status: "UNAUTHENTICATED",
                        latency_ms: 0.0,
                    });
                }
                tracing::info!(
                    target: "voxconv::rpc",
                    path = req.uri().path(),
                    status = "UNAUTHENTICATED",
                    "call refused"
                );
                // Trailers-only answer; the request body is dropped unread.
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

/// Records a call the front layer answered DEADLINE_EXCEEDED, as the handlers record theirs:
/// log event, audit line, metrics (no model: its name was never read).
fn record_front_deadline(
    method: &'static str,
    (caller, peer): (String, Option<SocketAddr>),
    arrived: std::time::Instant,
    audit: Option<Arc<AuditLog>>,
    metrics: &Metrics,
) {
    record_call(
        audit.as_deref(),
        metrics,
        &FinishedCall {
            method,
            model: None,
            caller: &caller,
            peer,
            code: "DEADLINE_EXCEEDED",
            shapes: None,
            times: None,
            input_bytes: 0,
            output_bytes: 0,
            voxels: 0,
            flops: 0.0,
            total: arrived.elapsed(),
        },
    );
}

/// A connection counted against `--max-connections`; its permit is released on close.
pub struct CappedConn<T> {
    io: T,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl<T: Connected> Connected for CappedConn<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for CappedConn<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for CappedConn<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Accepted connections beyond `max` are closed at once.
pub fn cap_connections<S, T, E>(
    incoming: S,
    max: usize,
) -> impl tokio_stream::Stream<Item = Result<CappedConn<T>, E>>
where
    S: tokio_stream::Stream<Item = Result<T, E>>,
{
    use tokio_stream::StreamExt;
    let sem = Arc::new(tokio::sync::Semaphore::new(max));
    incoming.filter_map(move |conn| match conn {
        Err(e) => Some(Err(e)),
        Ok(io) => match Arc::clone(&sem).try_acquire_owned() {
            Ok(permit) => Some(Ok(CappedConn {
                io,
                _permit: permit,
            })),
            Err(_) => {
                tracing::warn!(max, "connection refused: --max-connections reached");
                None // dropping `io` closes the connection
            }
        },
    })
}
