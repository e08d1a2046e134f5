//! The layer in front of every service (deadline, authentication) and the connection cap.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::{Connected, TcpConnectInfo};

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

/// How connections are admitted: a total budget, a share per peer address, and the time a
/// new connection gets to send its HTTP/2 preface.
#[derive(Clone, Copy, Debug)]
pub struct ConnLimits {
    pub max: usize,
    pub per_ip: usize,
    pub preface_timeout: Duration,
    /// Bytes a connection must send before its preface deadline ends: the 24-byte preface
    /// and its first frame header in plaintext; with TLS (counted encrypted), the start of
    /// a handshake, whose own timeout bounds the rest.
    pub preface_bytes: usize,
}

/// Plaintext HTTP/2: the connection preface (24 bytes) and the header of the SETTINGS
/// frame that must follow it (9 bytes).
pub const PLAINTEXT_PREFACE_BYTES: usize = 24 + 9;
/// TLS: a ClientHello (about 200 bytes or more) is under way.
pub const TLS_PREFACE_BYTES: usize = 160;

/// Connections open now, in all and per peer address, and the ones still owing their
/// preface (oldest first), which a full budget closes before refusing a newcomer.
#[derive(Default)]
struct Budget {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
    pending: VecDeque<Weak<CancellationToken>>,
}

/// One line per interval for refused connections (a flood must not become a flood of log
/// lines), with the count and the reason.
struct RefusalLog {
    /// When the last line was written (`None`: never; the first refusal logs at once).
    last: Option<Instant>,
    refused: u64,
    evicted: u64,
}

const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

struct Admission {
    limits: ConnLimits,
    budget: Mutex<Budget>,
    log: Mutex<RefusalLog>,
}

impl Admission {
    fn note(&self, refused: bool) {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if refused {
            log.refused += 1;
        } else {
            log.evicted += 1;
        }
        if log.last.is_none_or(|t| t.elapsed() >= REFUSAL_LOG_INTERVAL) {
            tracing::warn!(
                refused = log.refused,
                closed_before_preface = log.evicted,
                since_last_line_s = log.last.map_or(0.0, |t| t.elapsed().as_secs_f64()),
                max_connections = self.limits.max,
                max_connections_per_ip = self.limits.per_ip,
                "connections refused (--max-connections / --max-connections-per-ip) or closed \
                 to make room (no preface yet)"
            );
            *log = RefusalLog {
                last: Some(Instant::now()),
                refused: 0,
                evicted: 0,
            };
        }
    }

    /// A slot for a connection from `ip`, or `None` (refused). A full budget first closes
    /// the oldest connection that has not sent its preface; the newcomer then takes its
    /// place (the victim's slot frees as it closes, so the total may pass `max` by the
    /// victims still closing, never by more than a quarter).
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<(Slot, Arc<CancellationToken>)> {
        let mut b = self.budget.lock().unwrap_or_else(|e| e.into_inner());
        if b.per_ip.get(&ip).copied().unwrap_or(0) >= self.limits.per_ip {
            drop(b);
            self.note(true);
            return None;
        }
        if b.total >= self.limits.max {
            let ceiling = self.limits.max + self.limits.max.div_ceil(4);
            let victim = loop {
                match b.pending.pop_front() {
                    None => break None,
                    Some(w) => {
                        if let Some(t) = w.upgrade() {
                            if !t.is_cancelled() {
                                break Some(t);
                            }
                        }
                    }
                }
            };
            match victim {
                Some(t) if b.total < ceiling => {
                    t.cancel();
                    drop(b);
                    self.note(false);
                    b = self.budget.lock().unwrap_or_else(|e| e.into_inner());
                }
                other => {
                    if let Some(t) = other {
                        b.pending.push_front(Arc::downgrade(&t));
                    }
                    drop(b);
                    self.note(true);
                    return None;
                }
            }
        }
        b.total += 1;
        *b.per_ip.entry(ip).or_default() += 1;
        let kill = Arc::new(CancellationToken::new());
        b.pending.retain(|w| w.strong_count() > 0);
        b.pending.push_back(Arc::downgrade(&kill));
        Some((
            Slot {
                admission: Arc::clone(self),
                ip,
            },
            kill,
        ))
    }
}

/// A connection's place in the budget, given back when the connection closes.
struct Slot {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut b = self
            .admission
            .budget
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        b.total = b.total.saturating_sub(1);
        if let Some(n) = b.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                b.per_ip.remove(&self.ip);
            }
        }
    }
}

/// Until the preface has arrived: its deadline and the signal that closes the connection
/// early to make room.
struct Preface {
    seen: usize,
    need: usize,
    deadline: Pin<Box<tokio::time::Sleep>>,
    /// Cancelled to close the connection to make room. The budget's queue of connections
    /// still owing their preface holds it weakly: once the preface is in, this is dropped
    /// and the connection is no longer a candidate.
    _kill: Arc<CancellationToken>,
    killed: Pin<Box<WaitForCancellationFutureOwned>>,
}

/// A connection counted against `--max-connections` and `--max-connections-per-ip`; its
/// slot is released on close. Reads fail (closing the connection) when the preface has not
/// arrived by its deadline or the connection is closed to make room.
pub struct CappedConn<T> {
    io: T,
    _slot: Slot,
    preface: Option<Preface>,
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
        let this = &mut *self;
        if let Some(p) = &mut this.preface {
            if p.killed.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    "closed to make room: no HTTP/2 preface yet and the connection budget is full",
                )));
            }
            if p.deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no HTTP/2 preface within --http2-preface-timeout",
                )));
            }
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(p)) = (&r, &mut this.preface) {
            p.seen += buf.filled().len() - before;
            if p.seen >= p.need {
                this.preface = None;
            }
        }
        r
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

/// Admits accepted connections within `limits` (see [`ConnLimits`]); the others are closed
/// at once, counted in one log line per interval.
pub fn cap_connections<S, T, E>(
    incoming: S,
    limits: ConnLimits,
) -> impl tokio_stream::Stream<Item = Result<CappedConn<T>, E>>
where
    S: tokio_stream::Stream<Item = Result<T, E>>,
    T: Connected<ConnectInfo = TcpConnectInfo>,
{
    use tokio_stream::StreamExt;
    let admission = Arc::new(Admission {
        limits,
        budget: Mutex::new(Budget::default()),
        log: Mutex::new(RefusalLog {
            last: None,
            refused: 0,
            evicted: 0,
        }),
    });
    incoming.filter_map(move |conn| match conn {
        Err(e) => Some(Err(e)),
        Ok(io) => {
            let ip = io
                .connect_info()
                .remote_addr()
                .map_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), |a| a.ip());
            let (slot, kill) = admission.admit(ip)?; // refused: dropping `io` closes it
            let preface = Preface {
                seen: 0,
                need: limits.preface_bytes,
                deadline: Box::pin(tokio::time::sleep(limits.preface_timeout)),
                killed: Box::pin((*kill).clone().cancelled_owned()),
                _kill: kill,
            };
            Some(Ok(CappedConn {
                io,
                _slot: slot,
                preface: Some(preface),
            }))
        }
    })
}
