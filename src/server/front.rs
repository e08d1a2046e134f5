//! The layer in front of every service: the call's deadline and authentication.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

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
        let method = recorded_method(req.uri().path());
        if let Err((http_status, status)) = protocol_check(req.headers()) {
            if let Some(method) = method {
                let code = crate::wire::code_name(status.code());
                let who = ("unauthenticated".to_string(), peer_of(&req));
                record_front(
                    method,
                    code,
                    who,
                    arrived,
                    self.audit.clone(),
                    &self.metrics,
                );
            }
            let mut resp = status.into_http();
            *resp.status_mut() = http_status;
            if http_status == http::StatusCode::OK {
                // Unknown compression: say what we accept (gRPC's compression spec).
                resp.headers_mut().insert(
                    "grpc-accept-encoding",
                    http::HeaderValue::from_static("gzip,identity"),
                );
            }
            return Box::pin(async move { Ok(resp) });
        }
        let deadline = deadline_from(req.headers(), arrived);
        req.extensions_mut().insert(CallDeadline(deadline));
        match self.auth.check(&req) {
            Ok(caller) => {
                let who = (caller.0.clone(), peer_of(&req));
                req.extensions_mut().insert(caller);
                let call = self.inner.call(req);
                let (audit, metrics) = (self.audit.clone(), Arc::clone(&self.metrics));
                Box::pin(async move {
                    let mut resp = match deadline {
                        None => call.await?,
                        // Covers what happens before the handler can watch the deadline
                        // itself (reading and decoding a unary body); the handler's own
                        // timer fires at the same instant and, polled first, answers with
                        // the stage it was in. The handler then never finishes the call,
                        // so it is recorded here.
                        Some(at) => match before(at, call).await {
                            Ok(r) => r?,
                            Err(()) => {
                                if let Some(method) = method {
                                    record_front(
                                        method,
                                        "DEADLINE_EXCEEDED",
                                        who,
                                        arrived,
                                        audit,
                                        &metrics,
                                    );
                                }
                                return Ok(tonic::Status::deadline_exceeded(
                                    "deadline passed while receiving the request",
                                )
                                .into_http());
                            }
                        },
                    };
                    // A unary message that did not decode is answered by the codec before
                    // any handler runs; it marks its answer so the call is counted here.
                    if resp.headers_mut().remove(DECODE_REFUSED).is_some() {
                        if let Some(method) = method {
                            record_front(method, "INVALID_ARGUMENT", who, arrived, audit, &metrics);
                        }
                    }
                    Ok(resp)
                })
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

use crate::proto::codec::DECODE_REFUSED;

/// The request head as gRPC requires it: `content-type` `application/grpc` or
/// `application/grpc+proto` (we speak protobuf only), and a `grpc-encoding` we accept.
/// A wrong content-type is answered HTTP 415 with grpc-status INVALID_ARGUMENT (as the gRPC
/// HTTP/2 protocol asks of servers), an unknown compression UNIMPLEMENTED (gRPC's
/// compression spec); both name what was expected and what came.
fn protocol_check(h: &http::HeaderMap) -> Result<(), (http::StatusCode, tonic::Status)> {
    let shown = |v: &http::HeaderValue| -> String {
        let s: String = String::from_utf8_lossy(v.as_bytes())
            .chars()
            .filter(|c| c.is_ascii_graphic() || *c == ' ')
            .take(64)
            .collect();
        format!("{s:?}")
    };
    let ct = h.get(http::header::CONTENT_TYPE);
    let ok = ct.and_then(|v| v.to_str().ok()).is_some_and(|v| {
        let base = v.split(';').next().unwrap_or("").trim();
        base.eq_ignore_ascii_case("application/grpc")
            || base.eq_ignore_ascii_case("application/grpc+proto")
    });
    if !ok {
        return Err((
            http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            tonic::Status::invalid_argument(format!(
                "content-type: expected application/grpc or application/grpc+proto, got {}",
                ct.map_or_else(|| "none".to_string(), shown)
            )),
        ));
    }
    if let Some(enc) = h.get("grpc-encoding") {
        let known = enc
            .to_str()
            .is_ok_and(|e| matches!(e.trim(), "identity" | "gzip"));
        if !known {
            return Err((
                http::StatusCode::OK,
                tonic::Status::unimplemented(format!(
                    "grpc-encoding: expected gzip or identity, got {}",
                    shown(enc)
                )),
            ));
        }
    }
    Ok(())
}

/// Records a call the front layer answered itself (deadline passed before the handler could,
/// a head that is not gRPC, a message that did not decode), as the handlers record theirs:
/// log event, audit line, metrics (no model: its name was never read).
fn record_front(
    method: &'static str,
    code: &'static str,
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
            code,
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
