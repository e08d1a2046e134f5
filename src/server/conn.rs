//! Connections, from accept to close: admission (a total budget, a share per peer address,
//! room made by closing the oldest connection that has not sent its preface), the preface
//! deadline, TLS, and the HTTP/2 serve loop. A connection ends with GOAWAY when it has had
//! no open stream for `--idle-connection-timeout`, when it reaches `--max-connection-age`
//! (closed after `--max-connection-age-grace` if calls are still running), or at shutdown.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::either::Either;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::body::Body;
use tonic::transport::server::TcpConnectInfo;
use tracing::debug;

use crate::auth::PeerCerts;

/// How connections are admitted and how long each may live.
#[derive(Clone, Copy, Debug)]
pub struct ConnLimits {
    pub max: usize,
    pub per_ip: usize,
    /// Time a new connection gets to send its HTTP/2 preface and first frame header
    /// (with TLS: to start its handshake, and again after the handshake for the preface).
    pub preface_timeout: Duration,
    /// A connection with no open stream for this long is sent GOAWAY and closed.
    pub idle_timeout: Option<Duration>,
    /// GOAWAY at this age; closed `age_grace` later if calls are still running.
    pub max_age: Duration,
    pub age_grace: Duration,
    /// After the shutdown signal: GOAWAY at once, closed after this.
    pub shutdown_grace: Duration,
}

/// Plaintext HTTP/2: the connection preface (24 bytes) and the header of the SETTINGS
/// frame that must follow it (9 bytes).
pub const PLAINTEXT_PREFACE_BYTES: usize = 24 + 9;
/// TLS: a ClientHello (about 200 bytes or more) is under way.
pub const TLS_PREFACE_BYTES: usize = 160;

/// TLS on accepted connections: the acceptor and the longest a handshake may take.
#[derive(Clone)]
pub struct TlsServe {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub handshake_timeout: Duration,
}

/// Connections open now, in all and per peer address, and the ones still owing their
/// preface (oldest first), which a full budget closes before refusing a newcomer.
#[derive(Default)]
struct Budget {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
    pending: VecDeque<Weak<CancellationToken>>,
    /// Connections being served (oldest first): when no connection owes its preface, a
    /// full budget asks the oldest with no open call to go away (GOAWAY; its client
    /// reconnects when it next calls).
    served: VecDeque<Weak<Served>>,
}

/// A served connection as the budget sees it: its open calls, and the signal that asks it
/// to go away.
struct Served {
    open: watch::Receiver<usize>,
    evict: CancellationToken,
}

/// One line per interval for refused connections (a flood must not become a flood of log
/// lines), with the count and the reason.
struct RefusalLog {
    /// When the last line was written (`None`: never; the first refusal logs at once).
    last: Option<Instant>,
    refused: u64,
    evicted: u64,
    evicted_idle: u64,
    accept_errors: u64,
}

const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

enum Refusal {
    Refused,
    Evicted,
    EvictedIdle,
    AcceptError,
}

/// The connection budget, shared by the accept loop and every connection's slot.
pub struct Admission {
    limits: ConnLimits,
    budget: Mutex<Budget>,
    log: Mutex<RefusalLog>,
}

impl Admission {
    pub fn new(limits: ConnLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            budget: Mutex::new(Budget::default()),
            log: Mutex::new(RefusalLog {
                last: None,
                refused: 0,
                evicted: 0,
                evicted_idle: 0,
                accept_errors: 0,
            }),
        })
    }

    fn note(&self, what: Refusal) {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        match what {
            Refusal::Refused => log.refused += 1,
            Refusal::Evicted => log.evicted += 1,
            Refusal::EvictedIdle => log.evicted_idle += 1,
            Refusal::AcceptError => log.accept_errors += 1,
        }
        if log.last.is_none_or(|t| t.elapsed() >= REFUSAL_LOG_INTERVAL) {
            tracing::warn!(
                refused = log.refused,
                closed_before_preface = log.evicted,
                idle_sent_goaway = log.evicted_idle,
                accept_errors = log.accept_errors,
                since_last_line_s = log.last.map_or(0.0, |t| t.elapsed().as_secs_f64()),
                max_connections = self.limits.max,
                max_connections_per_ip = self.limits.per_ip,
                "connections refused (--max-connections / --max-connections-per-ip), closed \
                 to make room (no preface yet, or idle: GOAWAY) or failed to accept (file \
                 descriptors?)"
            );
            *log = RefusalLog {
                last: Some(Instant::now()),
                refused: 0,
                evicted: 0,
                evicted_idle: 0,
                accept_errors: 0,
            };
        }
    }

    /// A slot for a connection from `ip`, or `None` (refused). A full budget first closes
    /// the oldest connection that has not sent its preface, else asks the oldest served
    /// connection with no open call to go away; the newcomer then takes its place (the
    /// victim's slot frees as it closes, so the total may pass `max` by the victims still
    /// closing, never by more than a quarter).
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<(Slot, Arc<CancellationToken>)> {
        let mut b = self.budget.lock().unwrap_or_else(|e| e.into_inner());
        if b.per_ip.get(&ip).copied().unwrap_or(0) >= self.limits.per_ip {
            drop(b);
            self.note(Refusal::Refused);
            return None;
        }
        if b.total >= self.limits.max {
            let ceiling = self.limits.max + self.limits.max.div_ceil(4);
            if b.total >= ceiling {
                drop(b);
                self.note(Refusal::Refused);
                return None;
            }
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
            let made_room = match victim {
                Some(t) => {
                    t.cancel();
                    Some(Refusal::Evicted)
                }
                None => {
                    b.served.retain(|w| w.strong_count() > 0);
                    let idle = b.served.iter().position(|w| {
                        w.upgrade()
                            .is_some_and(|c| !c.evict.is_cancelled() && *c.open.borrow() == 0)
                    });
                    idle.and_then(|i| b.served.remove(i))
                        .and_then(|w| w.upgrade())
                        .map(|c| {
                            c.evict.cancel();
                            Refusal::EvictedIdle
                        })
                }
            };
            drop(b);
            match made_room {
                Some(how) => self.note(how),
                None => {
                    self.note(Refusal::Refused);
                    return None;
                }
            }
            b = self.budget.lock().unwrap_or_else(|e| e.into_inner());
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

    /// Registers a connection being served, as a candidate to go away when the budget is
    /// full and it has no open call.
    fn served(&self, c: &Arc<Served>) {
        let mut b = self.budget.lock().unwrap_or_else(|e| e.into_inner());
        b.served.retain(|w| w.strong_count() > 0);
        b.served.push_back(Arc::downgrade(c));
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

impl Preface {
    fn new(need: usize, timeout: Duration, kill: &Arc<CancellationToken>) -> Self {
        Self {
            seen: 0,
            need,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            killed: Box::pin((**kill).clone().cancelled_owned()),
            _kill: Arc::clone(kill),
        }
    }
}

/// A stream whose reads fail (closing the connection) when `need` bytes have not arrived
/// by the deadline, or when the connection is closed to make room; after that, a plain
/// pass-through.
pub struct Gate<T> {
    io: T,
    preface: Option<Preface>,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Gate<T> {
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

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Gate<T> {
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

/// The open streams of one connection: counted from a request's head until its response
/// body is finished or dropped.
struct StreamGuard(Arc<watch::Sender<usize>>);

impl StreamGuard {
    fn new(open: &Arc<watch::Sender<usize>>) -> Self {
        open.send_modify(|n| *n += 1);
        Self(Arc::clone(open))
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// A response body that keeps its stream counted as open until it is done.
struct Guarded {
    inner: Body,
    _guard: StreamGuard,
}

impl http_body::Body for Guarded {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The service of one connection: puts the peer's address (and TLS certificates) on each
/// request, as tonic's own server does, and counts the connection's open streams.
struct ConnService<S> {
    inner: S,
    info: TcpConnectInfo,
    certs: Option<PeerCerts>,
    open: Arc<watch::Sender<usize>>,
}

impl<S: Routes> hyper::service::Service<http::Request<hyper::body::Incoming>> for ConnService<S> {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn call(&self, req: http::Request<hyper::body::Incoming>) -> Self::Future {
        let mut req = req.map(Body::new);
        req.extensions_mut().insert(self.info.clone());
        if let Some(c) = &self.certs {
            req.extensions_mut().insert(c.clone());
        }
        let guard = StreamGuard::new(&self.open);
        let mut svc = self.inner.clone();
        Box::pin(async move {
            std::future::poll_fn(|cx| svc.poll_ready(cx)).await?;
            let resp = svc.call(req).await?;
            Ok(resp.map(|inner| {
                Body::new(Guarded {
                    inner,
                    _guard: guard,
                })
            }))
        })
    }
}

/// Resolves once the connection has had no open stream for `timeout` (never without one).
async fn idle_for(open: &mut watch::Receiver<usize>, timeout: Option<Duration>) {
    let Some(timeout) = timeout else {
        return std::future::pending().await;
    };
    loop {
        let none_open = open.wait_for(|&n| n == 0).await.is_ok();
        if !none_open {
            return std::future::pending().await;
        }
        let reopened = tokio::select! {
            _ = tokio::time::sleep(timeout) => return,
            r = open.wait_for(|&n| n > 0) => r.is_ok(),
        };
        if !reopened {
            return std::future::pending().await;
        }
    }
}

/// The service every connection serves: tonic's routes behind our front layer.
pub trait Routes:
    tower_service::Service<
        http::Request<Body>,
        Response = http::Response<Body>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> Routes for S where
    S: tower_service::Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + Sync
        + 'static
{
}

/// What every connection task shares.
pub struct Serve<S> {
    pub limits: ConnLimits,
    pub tls: Option<TlsServe>,
    pub http2: hyper::server::conn::http2::Builder<TokioExecutor>,
    pub service: S,
}

/// The HTTP/2 settings of every connection.
pub struct Http2Settings {
    pub max_concurrent_streams: u32,
    pub keepalive_interval: Option<Duration>,
    pub keepalive_timeout: Duration,
    pub max_pending_resets: usize,
    pub max_header_list_size: u32,
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_frame: u32,
}

impl Http2Settings {
    pub fn builder(&self) -> hyper::server::conn::http2::Builder<TokioExecutor> {
        let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        b.timer(TokioTimer::new())
            .initial_stream_window_size(self.stream_window)
            .initial_connection_window_size(self.connection_window)
            .adaptive_window(false)
            .max_frame_size(self.max_frame)
            .max_concurrent_streams(self.max_concurrent_streams)
            .keep_alive_interval(self.keepalive_interval)
            .keep_alive_timeout(self.keepalive_timeout)
            .max_pending_accept_reset_streams(self.max_pending_resets)
            .max_header_list_size(self.max_header_list_size);
        b
    }
}

/// After GOAWAY, a connection with no open call is closed once it has stayed so this long
/// (time for the client to see the GOAWAY; calls it opened before are served).
const AFTER_GOAWAY: Duration = Duration::from_secs(1);

/// Why a connection was asked to go away (debug log only).
#[derive(Clone, Copy, Debug)]
enum Ending {
    Idle,
    /// The budget was full and this connection had no open call.
    MadeRoom,
    Age,
    Shutdown,
}

/// A listener for [`serve`], with an accept queue deeper than tokio's default (1024): a
/// burst of connects past the queue is not refused by the kernel but left half-open (the
/// final ACK dropped), unseen by the connection budget until the client retries, so a flood
/// of silent connections could outlive the preface deadline. The kernel caps the depth at
/// `net.core.somaxconn`.
pub fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    const ACCEPT_QUEUE: u32 = 8192;
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(ACCEPT_QUEUE)
}

/// Accepts on `listener` until `shutdown` resolves, then stops accepting (the socket is
/// closed), sends GOAWAY on every connection and waits for them to close (each is closed
/// by force after `limits.shutdown_grace`).
pub async fn serve<S: Routes>(
    listener: TcpListener,
    serve: Serve<S>,
    shutdown: impl Future<Output = ()>,
) {
    let admission = Admission::new(serve.limits);
    let serve = Arc::new(serve);
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    {
        let listener = listener;
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((tcp, remote)) => {
                        let Some((slot, kill)) = admission.admit(remote.ip()) else {
                            continue; // refused: dropping `tcp` closes it
                        };
                        let _ = tcp.set_nodelay(true);
                        let local = tcp.local_addr().ok();
                        tokio::spawn(connection(
                            tcp,
                            TcpConnectInfo {
                                local_addr: local,
                                remote_addr: Some(remote),
                            },
                            slot,
                            kill,
                            Arc::clone(&serve),
                            stop_rx.clone(),
                        ));
                    }
                    Err(e) => {
                        admission.note(Refusal::AcceptError);
                        debug!(error = %e, "accept failed");
                        // Out of file descriptors (or memory): give closing connections a
                        // moment instead of spinning on the error.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                },
            }
        }
    }
    let _ = stop_tx.send(true);
    drop(stop_rx);
    // Every connection task holds a receiver.
    stop_tx.closed().await;
}

async fn connection<S: Routes>(
    tcp: TcpStream,
    info: TcpConnectInfo,
    slot: Slot,
    kill: Arc<CancellationToken>,
    serve: Arc<Serve<S>>,
    mut stop: watch::Receiver<bool>,
) {
    let limits = &serve.limits;
    let gate = |io, need| Gate {
        io,
        preface: Some(Preface::new(need, limits.preface_timeout, &kill)),
    };
    let (io, certs) = match &serve.tls {
        None => (Either::Left(gate(tcp, PLAINTEXT_PREFACE_BYTES)), None),
        Some(tls) => {
            let raw = gate(tcp, TLS_PREFACE_BYTES);
            // A connection still in its handshake has not sent its preface either: closed
            // to make room as one that never spoke.
            let handshake = tokio::time::timeout(tls.handshake_timeout, tls.acceptor.accept(raw));
            let stream = tokio::select! {
                r = handshake => match r {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        debug!(error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        debug!("TLS handshake timed out (--tls-handshake-timeout)");
                        return;
                    }
                },
                _ = kill.cancelled() => {
                    debug!("closed in its TLS handshake to make room");
                    return;
                }
            };
            let certs =
                stream.get_ref().1.peer_certificates().map(|c| {
                    PeerCerts(Arc::new(c.iter().map(|c| c.clone().into_owned()).collect()))
                });
            // The HTTP/2 preface, decrypted, within its own deadline after the handshake.
            let gate = Gate {
                io: stream,
                preface: Some(Preface::new(
                    PLAINTEXT_PREFACE_BYTES,
                    limits.preface_timeout,
                    &kill,
                )),
            };
            (Either::Right(gate), certs)
        }
    };
    drop(kill);
    let (open_tx, mut open_rx) = watch::channel(0usize);
    let served = Arc::new(Served {
        open: open_rx.clone(),
        evict: CancellationToken::new(),
    });
    slot.admission.served(&served);
    let svc = ConnService {
        inner: serve.service.clone(),
        info,
        certs,
        open: Arc::new(open_tx),
    };
    let conn = serve.http2.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let age = tokio::time::sleep(limits.max_age);
    tokio::pin!(age);
    // Set once GOAWAY is sent: the connection is closed by force at this deadline.
    let mut reason: Option<Ending> = None;
    let force = tokio::time::sleep(Duration::MAX);
    tokio::pin!(force);
    loop {
        let going = reason.is_some();
        let (ending, grace) = tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = &mut force, if going => {
                debug!(?reason, "connection closed by force after GOAWAY and its grace");
                return;
            }
            _ = &mut age, if !going => (Ending::Age, limits.age_grace),
            // After GOAWAY, hyper waits for the client to answer a PING before it closes;
            // a client that never answers is not waited for once no call is open.
            _ = idle_for(&mut open_rx, if going { Some(AFTER_GOAWAY) } else { limits.idle_timeout }) => {
                if going {
                    debug!(?reason, "connection closed after GOAWAY: no call open");
                    return;
                }
                (Ending::Idle, limits.age_grace)
            }
            _ = async { stop.wait_for(|&s| s).await.is_ok() }, if !going => {
                (Ending::Shutdown, limits.shutdown_grace)
            }
            _ = served.evict.cancelled(), if !going => (Ending::MadeRoom, limits.age_grace),
        };
        debug!(reason = ?ending, "GOAWAY");
        conn.as_mut().graceful_shutdown();
        reason = Some(ending);
        force.as_mut().reset(tokio::time::Instant::now() + grace);
    }
}
