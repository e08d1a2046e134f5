//! Caller authentication (bearer tokens, client certificates), the audit log, and the
//! connection cap.
//!
//! Tokens are checked by a tower layer on the HTTP/2 request head, before any service runs,
//! so an unauthenticated call is refused without its body being read or decoded (a 64 MiB
//! body costs what a 1 KiB one does). The token file holds SHA-256 hashes, never tokens;
//! a presented token is hashed and compared with every entry in constant time.
//! `grpc.health.v1.Health` stays open for probes.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::SystemTime;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};

/// Who made a call, as the audit log names it: `token:<id>`, `cert:<subject CN>`, both, or
/// `anonymous`. Inserted into each request's extensions by [`FrontLayer`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller(pub String);

/// The hashed tokens of `--auth-tokens`: one `ID SHA256-HEX` per line, `#` comments.
#[derive(Debug, Default)]
pub struct TokenSet {
    entries: Vec<(String, [u8; 32])>,
}

/// SHA-256 of a token, as stored in the token file.
pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The token-file line for `id` and `token`.
pub fn token_line(id: &str, token: &str) -> String {
    format!("{id} {}", hex(&hash_token(token)))
}

impl TokenSet {
    /// Parses a token file; errors name the line and what was expected.
    pub fn parse(text: &str, path: &str) -> Result<Self, String> {
        let mut entries = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(id), Some(h), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(format!(
                    "--auth-tokens {path}, line {}: expected \"ID SHA256-HEX\", got {} fields",
                    i + 1,
                    line.split_whitespace().count()
                ));
            };
            let bytes = (0..h.len())
                .step_by(2)
                .map(|j| h.get(j..j + 2).and_then(|d| u8::from_str_radix(d, 16).ok()))
                .collect::<Option<Vec<u8>>>()
                .filter(|b| b.len() == 32 && h.len() == 64)
                .ok_or_else(|| {
                    format!(
                        "--auth-tokens {path}, line {}: expected a 64-digit hex SHA-256, got {} \
                         characters",
                        i + 1,
                        h.len()
                    )
                })?;
            let mut hash = [0u8; 32];
            hash.copy_from_slice(&bytes);
            entries.push((id.to_string(), hash));
        }
        if entries.is_empty() {
            return Err(format!(
                "--auth-tokens {path}: expected at least one token, got none"
            ));
        }
        Ok(Self { entries })
    }

    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--auth-tokens {}: {e}", path.display()))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// The id of the token, comparing its hash with every entry in constant time.
    pub fn verify(&self, token: &str) -> Option<&str> {
        let h = hash_token(token);
        let mut found = None;
        for (id, want) in &self.entries {
            if bool::from(want.ct_eq(&h)) {
                found = Some(id.as_str());
            }
        }
        found
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// One JSON line per call, to its own file (never the debug log): UTC time, caller, peer,
/// method, model, sizes, status, latency. Nothing of the volume, no patient identifiers.
pub struct AuditLog {
    out: Mutex<BufWriter<File>>,
}

/// What the audit log records of a call.
#[derive(Debug, serde::Serialize)]
pub struct AuditRecord<'a> {
    pub time: String,
    pub caller: &'a str,
    pub peer: Option<String>,
    pub method: &'a str,
    pub model: &'a str,
    pub input_bytes: u64,
    pub output_bytes: u64,
    pub status: &'a str,
    pub latency_ms: f64,
}

impl AuditLog {
    pub fn open(path: &Path) -> Result<Self, String> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("--audit-log {}: {e}", path.display()))?;
        Ok(Self {
            out: Mutex::new(BufWriter::new(f)),
        })
    }

    /// Appends one line and flushes it (an audit trail must survive a crash).
    pub fn write(&self, r: &AuditRecord<'_>) {
        let Ok(line) = serde_json::to_string(r) else {
            return;
        };
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

/// The current time as RFC 3339 UTC with milliseconds.
pub fn now_utc() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// Authentication settings shared by every request.
pub struct Auth {
    pub tokens: Option<Arc<TokenSet>>,
    pub audit: Option<Arc<AuditLog>>,
}

/// Common name (or the whole subject) of a DER certificate.
fn cert_subject(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let cn = subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok().map(str::to_string));
    Some(cn.unwrap_or_else(|| subject.to_string()))
}

fn peer_of<B>(req: &http::Request<B>) -> Option<SocketAddr> {
    let ext = req.extensions();
    ext.get::<TcpConnectInfo>()
        .and_then(|i| i.remote_addr())
        .or_else(|| {
            ext.get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|i| i.get_ref().remote_addr())
        })
}

impl Auth {
    /// The caller of a request, or UNAUTHENTICATED. Health checks always pass.
    pub fn check<B>(&self, req: &http::Request<B>) -> Result<Caller, tonic::Status> {
        let cert = req
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|i| i.peer_certs())
            .and_then(|certs| certs.first().and_then(|c| cert_subject(c.as_ref())))
            .map(|s| format!("cert:{s}"));
        let Some(tokens) = &self.tokens else {
            return Ok(Caller(cert.unwrap_or_else(|| "anonymous".into())));
        };
        if req.uri().path().starts_with("/grpc.health.v1.Health/") {
            return Ok(Caller("health-probe".into()));
        }
        let header = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let token = match header {
            None => {
                return Err(tonic::Status::unauthenticated(
                    "authorization: expected \"Bearer <token>\" metadata, got none",
                ))
            }
            Some(h) => match h.strip_prefix("Bearer ") {
                Some(t) => t.trim(),
                None => {
                    return Err(tonic::Status::unauthenticated(
                        "authorization: expected the \"Bearer\" scheme, got another",
                    ))
                }
            },
        };
        match tokens.verify(token) {
            Some(id) => Ok(Caller(match cert {
                Some(c) => format!("{c} token:{id}"),
                None => format!("token:{id}"),
            })),
            None => Err(tonic::Status::unauthenticated(
                "authorization: the bearer token is not one of the server's tokens",
            )),
        }
    }
}

/// Tower layer in front of every service, run on each request head: works out the call's
/// deadline ([`crate::service::CallDeadline`]) and runs [`Auth::check`].
#[derive(Clone)]
pub struct FrontLayer {
    auth: Arc<Auth>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl FrontLayer {
    /// `metrics` counts the calls this layer answers itself (deadline passed before the
    /// handler could).
    pub fn new(auth: Arc<Auth>, metrics: Arc<crate::metrics::Metrics>) -> Self {
        Self { auth, metrics }
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
            metrics: Arc::clone(&self.metrics),
        }
    }
}

#[derive(Clone)]
pub struct FrontService<S> {
    inner: S,
    auth: Arc<Auth>,
    metrics: Arc<crate::metrics::Metrics>,
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
        let deadline = crate::service::deadline_from(req.headers(), arrived);
        req.extensions_mut()
            .insert(crate::service::CallDeadline(deadline));
        match self.auth.check(&req) {
            Ok(caller) => {
                let method = recorded_method(req.uri().path());
                let who = (caller.0.clone(), peer_of(&req));
                req.extensions_mut().insert(caller);
                let call = self.inner.call(req);
                let (audit, metrics) = (self.auth.audit.clone(), Arc::clone(&self.metrics));
                match deadline {
                    None => Box::pin(call),
                    // Covers what happens before the handler can watch the deadline itself
                    // (reading and decoding a unary body); the handler's own timer fires at
                    // the same instant and, polled first, answers with the stage it was in.
                    // The handler then never finishes the call, so it is recorded here.
                    Some(at) => Box::pin(async move {
                        match crate::service::before(at, call).await {
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
                if let Some(audit) = &self.auth.audit {
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
    metrics: &crate::metrics::Metrics,
) {
    crate::service::record_call(
        audit.as_deref(),
        metrics,
        &crate::service::FinishedCall {
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

/// Audit lines grouped by status, for tests: `{status: count}`.
pub fn audit_summary(text: &str) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for line in text.lines() {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
            if let Some(s) = v["status"].as_str() {
                *m.entry(s.to_string()).or_default() += 1;
            }
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_round_trip_and_errors() {
        let text = format!(
            "# pipeline tokens\n{}\n\n{}\n",
            token_line("pipeline-a", "s3cret-a"),
            token_line("pipeline-b", "s3cret-b")
        );
        let t = TokenSet::parse(&text, "t").unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t.verify("s3cret-a"), Some("pipeline-a"));
        assert_eq!(t.verify("s3cret-b"), Some("pipeline-b"));
        assert_eq!(t.verify("s3cret-c"), None);
        assert_eq!(t.verify(""), None);
        let e = TokenSet::parse("a b c\n", "t").unwrap_err();
        assert!(e.contains("line 1") && e.contains("3 fields"), "{e}");
        let e = TokenSet::parse("a abcd\n", "t").unwrap_err();
        assert!(e.contains("64-digit hex") && e.contains("got 4"), "{e}");
        assert!(TokenSet::parse("# none\n", "t")
            .unwrap_err()
            .contains("none"));
    }
}
