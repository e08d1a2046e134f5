//! `voxconv.v1.Inference`: thin handlers (validate → convert → submit → stream). Numerics
//! run on the pool's worker threads; errors become statuses in [`error`].

pub mod error;
pub mod kserve;
pub mod slabs;

use std::future::Future;
use std::ops::ControlFlow;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, info_span, Instrument, Span};

use crate::metrics::{CallRecord, CallTimes, Metrics};
use crate::security::{now_utc, AuditLog, AuditRecord, Caller};

pub use error::ServiceError;

use crate::config::Config;
use crate::model::repo::ModelRegistry;
use crate::model::{Layer, LayerTiming, Model, ModelPlan};
use crate::pool::Pool;
use crate::proto::voxconv::v1 as pb;
use crate::shm::{Region, SharedMemory};
use crate::tensor::dtype::{self, DType, StreamDecoder};

/// The service state shared by all calls.
#[derive(Clone)]
pub struct InferenceService {
    /// The models served (also by the KServe service).
    pub(crate) models: Arc<ModelRegistry>,
    pool: Arc<Pool>,
    pub(crate) config: Arc<Config>,
    metrics: Arc<Metrics>,
    audit: Option<Arc<AuditLog>>,
    /// Registered shared-memory regions (`--shared-memory-dir`).
    shm: Arc<SharedMemory>,
    /// Float32 output slab buffers, kept between calls (bounded).
    slab_pool: Arc<slabs::Recycler>,
}

/// Who made a call and from where, for the audit log (set by the auth layer).
#[derive(Clone, Debug, Default)]
pub(crate) struct Origin {
    caller: Option<String>,
    peer: Option<std::net::SocketAddr>,
}

impl Origin {
    pub(crate) fn of<T>(r: &Request<T>) -> Self {
        Self {
            caller: r.extensions().get::<Caller>().map(|c| c.0.clone()),
            peer: r.remote_addr(),
        }
    }
}

/// Cancels a call's job when the call ends for any reason (client gone, deadline, error):
/// dropped with the handler's future or task.
struct CancelOnDrop(Cancel);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// A call's cancellation: a flag for the kernel (checked between tiles) and a token for
/// async waits.
#[derive(Clone, Default)]
struct Cancel {
    flag: Arc<AtomicBool>,
    token: CancellationToken,
}

impl Cancel {
    fn cancel(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.token.cancel();
    }
}

/// A validated request: model, its plan for the input shape, dtypes, sizes.
pub(crate) struct Prepared {
    model: Arc<Model>,
    plan: ModelPlan,
    in_dtype: DType,
    out_dtype: DType,
    input_elems: usize,
    input_bytes: usize,
    output_bytes: usize,
    /// Stage times, set once when the call's summary is built (for metrics).
    times: std::sync::OnceLock<CallTimes>,
}

pub(crate) fn to_dtype(field: &str, v: i32, output: bool) -> Result<DType, ServiceError> {
    let d = match pb::DType::try_from(v) {
        Ok(pb::DType::Fp32) => DType::F32,
        Ok(pb::DType::Fp16) => DType::F16,
        Ok(pb::DType::Bf16) => DType::BF16,
        Ok(pb::DType::Int16) => DType::I16,
        Ok(pb::DType::Uint16) => DType::U16,
        Ok(pb::DType::Uint8) => DType::U8,
        Ok(pb::DType::DtypeUnspecified) if output => DType::F32,
        Ok(pb::DType::DtypeUnspecified) | Err(_) => {
            return Err(ServiceError::invalid(format!(
                "{field}: expected one of FP32, FP16, BF16, INT16, UINT16, UINT8, got {v}"
            )))
        }
    };
    if output && !d.is_output() {
        return Err(ServiceError::invalid(format!(
            "{field}: expected FP32 or FP16, got {}",
            d.name()
        )));
    }
    Ok(d)
}

pub fn to_pb_dtype(d: DType) -> pb::DType {
    match d {
        DType::F32 => pb::DType::Fp32,
        DType::F16 => pb::DType::Fp16,
        DType::BF16 => pb::DType::Bf16,
        DType::I16 => pb::DType::Int16,
        DType::U16 => pb::DType::Uint16,
        DType::U8 => pb::DType::Uint8,
    }
}

/// A call's deadline, worked out once by the layer in front of every service
/// (`security::FrontService`) when the request head arrives, before the body is read.
#[derive(Clone, Copy, Debug)]
pub struct CallDeadline(pub Option<Instant>);

/// How much earlier than the client's `grpc-timeout` our own deadline fires. tonic's server
/// runs its own timer from the same header and, when it wins, drops the handler and answers
/// CANCELLED "Timeout expired"; firing first lets us stop the job and answer
/// DEADLINE_EXCEEDED naming the stage the call was in.
const DEADLINE_MARGIN: Duration = Duration::from_millis(2);

/// Parses a `grpc-timeout` value (`<1-8 digits><H|M|S|m|u|n>`).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    if num.is_empty() || num.len() > 8 || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The deadline for a call whose head arrived at `arrived` with these headers: the client's
/// `grpc-timeout` less [`DEADLINE_MARGIN`]; none without a (valid, representable) timeout.
pub fn deadline_from(headers: &http::HeaderMap, arrived: Instant) -> Option<Instant> {
    let d = parse_grpc_timeout(headers.get("grpc-timeout")?.to_str().ok()?)?;
    let at = arrived.checked_add(d)?;
    Some(
        at.checked_sub(DEADLINE_MARGIN)
            .unwrap_or(arrived)
            .max(arrived),
    )
}

/// The call's deadline as set by the front layer; a request that did not pass through it
/// (a handler called directly) is timed from now.
pub(crate) fn deadline<T>(request: &Request<T>) -> Option<Instant> {
    match request.extensions().get::<CallDeadline>() {
        Some(d) => d.0,
        None => deadline_from(request.metadata().as_ref(), Instant::now()),
    }
}

/// Runs `fut` until `at`; `Err(())` once `at` has passed.
///
/// Besides its own timer, every poll compares the clock with `at`: tokio's timer wheel is
/// sharded per worker, so tonic's later timer (see [`DEADLINE_MARGIN`]) can wake the call
/// before ours has been fired; the clock check makes the earlier deadline win regardless.
pub async fn before<F: Future>(at: Instant, fut: F) -> Result<F::Output, ()> {
    let mut fut = std::pin::pin!(fut);
    let mut timer = std::pin::pin!(tokio::time::sleep_until(at.into()));
    std::future::poll_fn(|cx| {
        if let std::task::Poll::Ready(v) = fut.as_mut().poll(cx) {
            return std::task::Poll::Ready(Ok(v));
        }
        if Instant::now() >= at || timer.as_mut().poll(cx).is_ready() {
            return std::task::Poll::Ready(Err(()));
        }
        std::task::Poll::Pending
    })
    .await
}

/// Runs `fut` until the deadline, if any.
async fn until<T>(
    deadline: Option<Instant>,
    stage: &str,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, ServiceError> {
    match deadline {
        None => Ok(fut.await),
        Some(d) => before(d, fut)
            .await
            .map_err(|()| ServiceError::DeadlineExceeded(format!("deadline passed while {stage}"))),
    }
}

impl InferenceService {
    pub fn new(
        models: Arc<ModelRegistry>,
        pool: Arc<Pool>,
        config: Arc<Config>,
        metrics: Arc<Metrics>,
        audit: Option<Arc<AuditLog>>,
    ) -> Self {
        let shm = Arc::new(SharedMemory::new(
            config.shared_memory_dir.clone(),
            config.shared_memory_create_limit,
        ));
        metrics.watch_shared_memory(shm.created_counter(), shm.create_limit());
        Self {
            models,
            pool,
            config,
            metrics,
            audit,
            shm,
            slab_pool: Arc::new(slabs::Recycler::default()),
        }
    }

    /// Validates model, dtypes and shape (checked arithmetic, before any allocation).
    /// `model_field` and `shape_field` name the request fields in messages.
    pub(crate) fn prepare(
        &self,
        model_field: &str,
        shape_field: &str,
        model: &str,
        in_dtype: DType,
        shape: &[u64],
        out_dtype: DType,
    ) -> Result<Prepared, ServiceError> {
        let _span = info_span!("validate").entered();
        let models = self.models.snapshot();
        let m = models.get(model).ok_or_else(|| {
            let names: Vec<&str> = models.iter().map(|m| m.name.as_str()).collect();
            ServiceError::NotFound(format!(
                "{model_field}: no model named {model:?} (available: {})",
                names.join(", ")
            ))
        })?;
        let field = shape_field.to_string();
        if shape.len() != 5 {
            return Err(ServiceError::invalid(format!(
                "{field}: expected 5 dimensions [N, C, D, H, W], got {} ({shape:?})",
                shape.len()
            )));
        }
        let mut dims = [0usize; 5];
        for (d, &s) in dims.iter_mut().zip(shape) {
            *d = usize::try_from(s).map_err(|_| {
                ServiceError::invalid(format!("{field}: dimension {s} is too large"))
            })?;
        }
        if dims[1] != m.in_channels() {
            return Err(ServiceError::invalid(format!(
                "{field}[1] (channels): model {} expects {}, got {}",
                m.name,
                m.in_channels(),
                dims[1]
            )));
        }
        let plan = m.plan(dims).map_err(|e| ServiceError::kernel(&field, e))?;
        let too_big = || ServiceError::invalid(format!("{field}: {shape:?} is too large"));
        let input_elems = dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(too_big)?;
        let input_bytes = input_elems
            .checked_mul(in_dtype.size())
            .ok_or_else(too_big)?;
        let output_bytes = plan
            .output_len()
            .checked_mul(out_dtype.size())
            .ok_or_else(too_big)?;
        Ok(Prepared {
            model: m,
            plan,
            in_dtype,
            out_dtype,
            input_elems,
            input_bytes,
            output_bytes,
            times: std::sync::OnceLock::new(),
        })
    }

    /// Working memory of a call, reserved before its input buffer is allocated.
    fn memory_needed(&self, p: &Prepared, output_buffers: usize) -> u64 {
        let threads = self.pool.threads_per_job();
        (p.input_elems as u64)
            .saturating_mul(4)
            .saturating_add(p.plan.working_bytes(threads) as u64)
            .saturating_add(output_buffers as u64)
    }
}

/// One event per layer with its stage times (inside the call's `rpc` span).
fn log_layers(layers: &[LayerTiming]) {
    for (i, l) in layers.iter().enumerate() {
        tracing::debug!(
            target: "voxconv::compute",
            layer = i,
            strategy = l.strategy,
            compute_ms = l.compute_ms,
            im2col_ms = l.stages.im2col.as_secs_f64() * 1e3,
            gemm_ms = l.stages.gemm.as_secs_f64() * 1e3,
            epilogue_ms = l.stages.epilogue.as_secs_f64() * 1e3,
            "layer"
        );
    }
}

fn summary(
    p: &Prepared,
    receive: Duration,
    queue: Duration,
    compute: Duration,
    started: Instant,
    layers: &[LayerTiming],
) -> pb::Summary {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let total = started.elapsed();
    let _ = p.times.set(CallTimes {
        receive,
        queue,
        compute,
        total,
        im2col: layers.iter().map(|l| l.stages.im2col).sum(),
        gemm: layers.iter().map(|l| l.stages.gemm).sum(),
        epilogue: layers.iter().map(|l| l.stages.epilogue).sum(),
    });
    pb::Summary {
        input_bytes: p.input_bytes as u64,
        output_bytes: p.output_bytes as u64,
        flops: p.plan.flops(),
        receive_ms: ms(receive),
        queue_ms: ms(queue),
        compute_ms: ms(compute),
        total_ms: ms(total),
        layers: layers
            .iter()
            .map(|l| pb::LayerTiming {
                strategy: l.strategy.to_string(),
                compute_ms: l.compute_ms,
                im2col_ms: ms(l.stages.im2col),
                gemm_ms: ms(l.stages.gemm),
                epilogue_ms: ms(l.stages.epilogue),
            })
            .collect(),
    }
}

impl InferenceService {
    /// One line per call (sizes, shapes, durations and status; never values or
    /// identifiers) and the call's metrics.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn finish_call(
        &self,
        origin: &Origin,
        method: &str,
        model: &str,
        p: Option<&Prepared>,
        result: &Result<(), ServiceError>,
        started: Instant,
    ) {
        let code = match result {
            Ok(()) => "OK",
            Err(e) => code_name(e.code()),
        };
        // Only names the server knows become label values or log fields: a client could
        // send anything as a model name, a patient identifier included.
        let known = match p {
            Some(p) => Some(p.model.name.clone()),
            None => self.models.snapshot().get(model).map(|m| m.name.clone()),
        };
        let ok = result.is_ok();
        record_call(
            self.audit.as_deref(),
            &self.metrics,
            &FinishedCall {
                method,
                model: known.as_deref(),
                caller: origin.caller.as_deref().unwrap_or("anonymous"),
                peer: origin.peer,
                code,
                shapes: p.map(|p| (p.plan.input, p.plan.output)),
                times: p.and_then(|p| p.times.get().copied()),
                input_bytes: p.map_or(0, |p| p.input_bytes as u64),
                // Output, voxels and FLOPs count only for calls that produced them.
                output_bytes: p.filter(|_| ok).map_or(0, |p| p.output_bytes as u64),
                voxels: p
                    .filter(|_| ok)
                    .map_or(0, |p| p.plan.output.iter().product::<usize>() as u64),
                flops: p.filter(|_| ok).map_or(0.0, |p| p.plan.flops()),
                total: started.elapsed(),
            },
        );
    }
}

impl InferenceService {
    /// Validates a whole-tensor request as `Infer` does before any allocation: dtypes, model,
    /// shape, data length. For fuzzing and property tests; never panics.
    pub fn validate_infer(&self, req: &pb::InferRequest) -> Result<(), Status> {
        let empty = pb::Tensor::default();
        let input = req.input.as_ref().unwrap_or(&empty);
        let in_dtype = to_dtype("input.dtype", input.dtype, false)?;
        let out_dtype = to_dtype("output_dtype", req.output_dtype, true)?;
        let p = self.prepare(
            "model",
            "input.shape",
            &req.model,
            in_dtype,
            &input.shape,
            out_dtype,
        )?;
        if input.data.len() != p.input_bytes {
            return Err(ServiceError::invalid(format!(
                "input.data: expected {} bytes, got {}",
                p.input_bytes,
                input.data.len()
            ))
            .into());
        }
        Ok(())
    }

    /// Validates an `InferStream` header as the handler does. For fuzzing; never panics.
    pub fn validate_stream_header(&self, h: &pb::StreamHeader) -> Result<(), Status> {
        let i = to_dtype("header.input_dtype", h.input_dtype, false)?;
        let o = to_dtype("header.output_dtype", h.output_dtype, true)?;
        self.prepare(
            "header.model",
            "header.input_shape",
            &h.model,
            i,
            &h.input_shape,
            o,
        )?;
        Ok(())
    }

    /// A service over the built-in models with test-sized settings (fuzzing, tests).
    pub fn for_validation() -> Self {
        let config = Arc::new(Config::for_tests());
        let pool = Arc::new(Pool::new(1, 4, 1 << 30, 1));
        let metrics = Arc::new(Metrics::new(pool.stats(), 1, 4, 1 << 30));
        let models = Arc::new(ModelRegistry::fixed(crate::model::ModelSet::builtin()));
        InferenceService::new(models, pool, config, metrics, None)
    }

    /// A model name fit for logs and spans: the name when the server knows the model,
    /// `_unknown` otherwise (a client may send anything there).
    pub(crate) fn loggable_model(&self, name: &str) -> String {
        match self.models.snapshot().get(name) {
            Some(m) => m.name.clone(),
            None => "_unknown".into(),
        }
    }
}

/// The canonical name of a status code (`INVALID_ARGUMENT`, ...).
pub fn code_name(c: tonic::Code) -> &'static str {
    use tonic::Code;
    match c {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

type Outbound = mpsc::Sender<Result<pb::InferStreamResponse, Status>>;

/// How a stream's bytes travel: output chunk size, response queue depth (chunks), and the
/// shared-memory regions (with byte offsets) its input comes from and its output goes to
/// instead of the socket.
struct Route {
    chunk: usize,
    depth: usize,
    input: Option<(Arc<Region>, u64)>,
    output: Option<(Arc<Region>, u64)>,
}

impl InferenceService {
    /// The region `r` names, checked to hold `bytes` at its offset; `field` names the
    /// header field in errors.
    fn shm_target(
        &self,
        field: &str,
        r: Option<&pb::SharedMemoryRef>,
        bytes: usize,
    ) -> Result<Option<(Arc<Region>, u64)>, ServiceError> {
        let Some(r) = r else { return Ok(None) };
        let region = self.shm.get(&format!("{field}.region"), &r.region)?;
        region.check_window(field, r.offset, bytes as u64)?;
        Ok(Some((region, r.offset)))
    }

    /// A whole-tensor call (voxconv.v1 Infer, KServe ModelInfer): validate, reserve memory,
    /// decode + compute + encode on a worker. `fields` names the model, shape and data
    /// fields in messages. The output must fit one message.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn run_whole(
        &self,
        fields: (&str, &str, &str),
        model: &str,
        in_dtype: DType,
        shape: &[u64],
        data: Bytes,
        out_dtype: DType,
        deadline: Option<Instant>,
        started: Instant,
    ) -> Result<(Prepared, Vec<u8>, pb::Summary), ServiceError> {
        let (model_field, shape_field, data_field) = fields;
        let p = self.prepare(model_field, shape_field, model, in_dtype, shape, out_dtype)?;
        if data.len() != p.input_bytes {
            return Err(ServiceError::invalid(format!(
                "{data_field}: expected {} bytes ({:?} x {} bytes per {}), got {}",
                p.input_bytes,
                p.plan.input,
                p.in_dtype.size(),
                p.in_dtype.name(),
                data.len()
            )));
        }
        let limit = self.config.max_message_bytes.saturating_sub(1024);
        if p.output_bytes > limit {
            return Err(ServiceError::ResourceExhausted(format!(
                "output: {} bytes exceed the message limit of {limit} bytes; use \
                 voxconv.v1.Inference/InferStream, which streams volumes of any size",
                p.output_bytes
            )));
        }
        let need = self.memory_needed(&p, p.plan.output_len() * 4 + p.output_bytes);
        let _reservation = until(deadline, "waiting for memory", self.pool.reserve(need))
            .instrument(info_span!("queue_wait", stage = "memory"))
            .await??;
        let cancel = Cancel::default();
        let _guard = CancelOnDrop(cancel.clone());
        let (model, plan, in_dtype, out_dtype) = (
            Arc::clone(&p.model),
            p.plan.clone(),
            p.in_dtype,
            p.out_dtype,
        );
        let elems = p.input_elems;
        let compute_span = info_span!(parent: Span::current(), "compute", flops = p.plan.flops());
        let job = self.pool.submit(Arc::clone(&cancel.flag), move |ctx| {
            let _e = compute_span.enter();
            let t0 = Instant::now();
            let mut x = vec![0f32; elems];
            info_span!("decode").in_scope(|| dtype::decode(in_dtype, &data, &mut x));
            drop(data);
            let [_, c_out, od, oh, ow] = plan.output;
            let mut y = vec![0f32; plan.output_len()];
            let r = plan.run(&model, x, ctx.threads, Some(&ctx.cancel), &mut |s| {
                let per = s.depth.len() * oh * ow;
                for c in 0..c_out {
                    let at = ((s.batch * c_out + c) * od + s.depth.start) * oh * ow;
                    y[at..at + per].copy_from_slice(&s.data[c * per..(c + 1) * per]);
                }
                ControlFlow::Continue(())
            });
            let mut bytes = Vec::new();
            info_span!("encode").in_scope(|| dtype::encode(out_dtype, &y, &mut bytes));
            (r, bytes, ctx.queue_wait, t0.elapsed())
        })?;
        let (r, bytes, queue, compute) = until(deadline, "computing", job)
            .await?
            .map_err(|_| ServiceError::Internal("worker dropped the job".into()))??;
        let layers = r.map_err(|e| ServiceError::kernel("input", e))?;
        log_layers(&layers);
        let summary = summary(&p, Duration::ZERO, queue, compute, started, &layers);
        Ok((p, bytes, summary))
    }

    /// Everything of InferStream after the header: memory, upload, compute, streaming.
    async fn stream_call(
        &self,
        p: Prepared,
        mut inbound: Streaming<pb::InferStreamRequest>,
        out: Outbound,
        route: Route,
        deadline: Option<Instant>,
        started: Instant,
    ) -> (Result<(), ServiceError>, Prepared) {
        let (chunk, depth) = (route.chunk, route.depth);
        let cancel = Cancel::default();
        let _guard = CancelOnDrop(cancel.clone());
        let result = async {
            // Admission: memory first (input buffer, intermediates, ring, output buffers).
            let zero_copy = slabs::zero_copy(p.out_dtype, p.plan.owned_slab_bytes());
            let in_flight = slabs::in_flight_bytes(
                zero_copy,
                p.plan.owned_slab_bytes(),
                p.plan.output[1],
                chunk,
                depth,
            );
            let need = self.memory_needed(&p, in_flight);
            let reservation = until(deadline, "waiting for memory", self.pool.reserve(need))
                .instrument(info_span!("queue_wait", stage = "memory"))
                .await??;

            // Upload: ordered chunks, decoded as they arrive.
            let t_recv = Instant::now();
            let mut dec = StreamDecoder::new(p.in_dtype, p.input_elems);
            if let Some((region, base)) = &route.input {
                // The input is in the client's shared memory: read it on a blocking thread.
                let (region, base) = (Arc::clone(region), *base);
                let read = tokio::task::spawn_blocking(move || region.read_into(base, &mut dec).map(|()| dec));
                dec = until(deadline, "reading the input", read)
                    .instrument(info_span!("decode", bytes = p.input_bytes))
                    .await?
                    .map_err(|_| ServiceError::Internal("the input reader stopped".into()))??;
            }
            async {
                while dec.bytes_received() < dec.bytes_expected() {
                    let msg = tokio::select! {
                        m = until(deadline, "receiving the input", inbound.message()) => m?,
                        _ = out.closed() => return Err(ServiceError::Cancelled("client went away".into())),
                    };
                    let msg = msg.map_err(|s| ServiceError::input_stream(&s))?;
                    let Some(msg) = msg else {
                        return Err(ServiceError::invalid(format!(
                            "chunk: input ended after {} of {} bytes",
                            dec.bytes_received(),
                            dec.bytes_expected()
                        )));
                    };
                    match msg.msg {
                        Some(pb::infer_stream_request::Msg::Chunk(c)) => {
                            let at = dec.bytes_received() as u64;
                            if c.offset != at {
                                return Err(ServiceError::invalid(format!(
                                    "chunk.offset: expected {at} (chunks in order), got {}",
                                    c.offset
                                )));
                            }
                            let end = at.saturating_add(c.data.len() as u64);
                            if end > dec.bytes_expected() as u64 {
                                return Err(ServiceError::invalid(format!(
                                    "chunk.data: input is {} bytes, this chunk ends at {end}",
                                    dec.bytes_expected()
                                )));
                            }
                            dec.push(&c.data);
                        }
                        Some(pb::infer_stream_request::Msg::Header(_)) => {
                            return Err(ServiceError::invalid(
                                "header: expected chunks after the first header, got a second header",
                            ))
                        }
                        None => return Err(ServiceError::invalid("msg: expected header or chunk, got neither")),
                    }
                }
                Ok(())
            }
            .instrument(info_span!("decode", bytes = p.input_bytes))
            .await?;
            let input = dec.finish().ok_or_else(|| ServiceError::Internal("input incomplete".into()))?;
            let receive = t_recv.elapsed();

            let header = pb::InferStreamResponse {
                msg: Some(pb::infer_stream_response::Msg::Header(pb::OutputHeader {
                    dtype: to_pb_dtype(p.out_dtype) as i32,
                    shape: p.plan.output.iter().map(|&d| d as u64).collect(),
                    total_bytes: p.output_bytes as u64,
                })),
            };
            until(deadline, "sending the output", out.send(Ok(header)))
                .await?
                .map_err(|_| ServiceError::Cancelled("client went away".into()))?;

            // Compute on a worker; finished slabs go straight to the response stream. The
            // bounded channel is the backpressure: a slow reader slows the worker down.
            let (model, plan, out_dtype, output) = (Arc::clone(&p.model), p.plan.clone(), p.out_dtype, p.plan.output);
            let tx = out.clone();
            let job_cancel = cancel.clone();
            let rt = tokio::runtime::Handle::current();
            let slab_pool = Arc::clone(&self.slab_pool);
            let compute_span = info_span!(parent: Span::current(), "compute", flops = p.plan.flops());
            let job = self.pool.submit(Arc::clone(&cancel.flag), move |ctx| {
                let _e = compute_span.enter();
                let t0 = Instant::now();
                // A float32 output into a region the server created and maps: the kernel
                // writes it in place, no slabs, no copy.
                let direct = match (&route.output, out_dtype) {
                    (Some((region, base)), DType::F32) => region.direct_f32(*base, plan.output_len()),
                    _ => None,
                };
                if let Some(mut window) = direct {
                    let r = plan.run_to(&model, input, ctx.threads, Some(&ctx.cancel), window.floats());
                    return (r, ctx.queue_wait, t0.elapsed(), None);
                }
                let flow = |more: bool| if more { ControlFlow::Continue(()) } else { ControlFlow::Break(()) };
                let run = |send: &mut dyn FnMut(u64, Bytes) -> bool| {
                    if zero_copy {
                        let home = &slab_pool;
                        plan.run_owned(
                            &model,
                            input,
                            ctx.threads,
                            Some(&ctx.cancel),
                            &mut |len| home.take(len),
                            &mut |slab| flow(slabs::owned_f32_chunks(slab, home, output, chunk, &mut *send)),
                        )
                    } else {
                        plan.run(&model, input, ctx.threads, Some(&ctx.cancel), &mut |slab| {
                            flow(slabs::lent_chunks(&slab, output, out_dtype, chunk, &mut *send))
                        })
                    }
                };
                // Chunks go into the client's shared memory (written by a thread beside the
                // kernel's), or to the response stream.
                let (r, write_failed) = match &route.output {
                    Some((region, base)) => region.with_writer(*base, depth, run),
                    None => (
                        run(&mut |offset, data| {
                            let msg = Ok(pb::InferStreamResponse {
                                msg: Some(pb::infer_stream_response::Msg::Chunk(pb::Chunk { offset, data })),
                            });
                            rt.block_on(async {
                                tokio::select! {
                                    r = tx.send(msg) => r.is_ok(),
                                    _ = job_cancel.token.cancelled() => false,
                                }
                            })
                        }),
                        None,
                    ),
                };
                (r, ctx.queue_wait, t0.elapsed(), write_failed)
            })?;
            let outcome = tokio::select! {
                r = until(deadline, "computing", job) => r?,
                _ = out.closed() => return Err(ServiceError::Cancelled("client went away".into())),
            };
            let (r, queue, compute, write_failed) = outcome
                .map_err(|_| ServiceError::Internal("worker dropped the job".into()))??;
            if let Some(kind) = write_failed {
                return Err(ServiceError::Internal(format!(
                    "header.output_shared_memory: writing the output into the region failed ({kind})"
                )));
            }
            let layers = r.map_err(|e| ServiceError::kernel("input", e))?;
            log_layers(&layers);
            let s = summary(&p, receive, queue, compute, started, &layers);
            // The queue may still hold a slab's chunks the client has not read: the deadline
            // bounds this wait too, and the reservation lasts until the summary is queued.
            until(
                deadline,
                "sending the output",
                out.send(Ok(pb::InferStreamResponse {
                    msg: Some(pb::infer_stream_response::Msg::Summary(s)),
                })),
            )
            .instrument(info_span!("send"))
            .await?
            .map_err(|_| ServiceError::Cancelled("client went away".into()))?;
            drop(reservation);
            Ok(())
        }
        .await;
        if let Err(e) = &result {
            // The deadline or a failure: stop the worker, tell the client if it listens.
            cancel.cancel();
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                out.send(Err(Status::from(e.clone()))),
            )
            .await;
        }
        (result, p)
    }
}

/// One finished call, as logged, audited and counted.
pub(crate) struct FinishedCall<'a> {
    pub method: &'a str,
    /// Only a model the server knows (a client could send anything as a name).
    pub model: Option<&'a str>,
    pub caller: &'a str,
    pub peer: Option<std::net::SocketAddr>,
    pub code: &'a str,
    /// Input and output shapes, when the call got as far as a plan.
    pub shapes: Option<([usize; 5], [usize; 5])>,
    pub times: Option<CallTimes>,
    pub input_bytes: u64,
    pub output_bytes: u64,
    pub voxels: u64,
    pub flops: f64,
    pub total: Duration,
}

/// The one place a finished call is recorded: the `call finished` event, the audit line and
/// the metrics. Used by the handlers and by the front layer for calls it answers itself.
pub(crate) fn record_call(audit: Option<&AuditLog>, metrics: &Metrics, c: &FinishedCall<'_>) {
    let total_ms = c.total.as_secs_f64() * 1e3;
    info!(
        target: "voxconv::rpc",
        method = c.method,
        model = c.model.unwrap_or("_unknown"),
        input_shape = ?c.shapes.map(|s| s.0),
        output_shape = ?c.shapes.map(|s| s.1),
        input_bytes = c.input_bytes,
        output_bytes = c.output_bytes,
        status = c.code,
        total_ms,
        "call finished"
    );
    if let Some(audit) = audit {
        audit.write(&AuditRecord {
            time: now_utc(),
            caller: c.caller,
            peer: c.peer.map(|a| a.to_string()),
            method: c.method,
            // A model name the server does not know is not echoed into the trail.
            model: c.model.unwrap_or(""),
            input_bytes: c.input_bytes,
            output_bytes: c.output_bytes,
            status: c.code,
            latency_ms: total_ms,
        });
    }
    metrics.record(&CallRecord {
        method: c.method,
        model: c.model,
        code: c.code,
        times: c.times,
        input_bytes: c.input_bytes,
        output_bytes: c.output_bytes,
        voxels: c.voxels,
        flops: c.flops,
    });
}

/// Logs a shared-memory region registered or created: names and keys may carry identifiers,
/// so only the size and the outcome.
fn log_region<T>(what: &'static str, byte_size: u64, result: &Result<T, ServiceError>) {
    let code = result
        .as_ref()
        .map_or_else(|e| e.code(), |_| tonic::Code::Ok);
    info!(
        byte_size,
        status = code_name(code),
        "shared-memory region {what}"
    );
}

type StreamOut = Pin<Box<dyn Stream<Item = Result<pb::InferStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::inference_server::Inference for InferenceService {
    async fn infer(
        &self,
        request: Request<pb::InferRequest>,
    ) -> Result<Response<pb::InferResponse>, Status> {
        let started = Instant::now();
        let deadline = deadline(&request);
        let origin = Origin::of(&request);
        let (metadata, _, req) = request.into_parts();
        let span = info_span!("rpc", method = "Infer", model = %self.loggable_model(&req.model));
        crate::telemetry::set_remote_parent(&span, &metadata);
        let mut prepared = None;
        let result: Result<pb::InferResponse, ServiceError> = async {
            let input = req.input.unwrap_or_default();
            let in_dtype = to_dtype("input.dtype", input.dtype, false)?;
            let out_dtype = to_dtype("output_dtype", req.output_dtype, true)?;
            let (p, bytes, summary) = self
                .run_whole(
                    ("model", "input.shape", "input.data"),
                    &req.model,
                    in_dtype,
                    &input.shape,
                    input.data,
                    out_dtype,
                    deadline,
                    started,
                )
                .await?;
            let resp = pb::InferResponse {
                model: p.model.name.clone(),
                output: Some(pb::Tensor {
                    dtype: to_pb_dtype(p.out_dtype) as i32,
                    shape: p.plan.output.iter().map(|&d| d as u64).collect(),
                    data: Bytes::from(bytes),
                }),
                summary: Some(summary),
            };
            prepared = Some(p);
            Ok(resp)
        }
        .instrument(span.clone())
        .await;
        let _e = span.enter();
        match result {
            Ok(resp) => {
                self.finish_call(
                    &origin,
                    "Infer",
                    &req.model,
                    prepared.as_ref(),
                    &Ok(()),
                    started,
                );
                Ok(Response::new(resp))
            }
            Err(e) => {
                self.finish_call(
                    &origin,
                    "Infer",
                    &req.model,
                    prepared.as_ref(),
                    &Err(e.clone()),
                    started,
                );
                Err(e.into())
            }
        }
    }

    type InferStreamStream = StreamOut;

    async fn infer_stream(
        &self,
        request: Request<Streaming<pb::InferStreamRequest>>,
    ) -> Result<Response<Self::InferStreamStream>, Status> {
        let started = Instant::now();
        let deadline = deadline(&request);
        let origin = Origin::of(&request);
        let (metadata, _, mut inbound) = request.into_parts();
        let header = async {
            let first = until(deadline, "waiting for the header", inbound.message())
                .await?
                .map_err(|s| ServiceError::input_stream(&s))?;
            match first.and_then(|m| m.msg) {
                Some(pb::infer_stream_request::Msg::Header(h)) => Ok(h),
                Some(pb::infer_stream_request::Msg::Chunk(_)) => Err(ServiceError::invalid(
                    "header: expected a header as the first message, got a chunk",
                )),
                None => Err(ServiceError::invalid(
                    "header: expected a header as the first message, got none",
                )),
            }
        }
        .await;
        let header = match header {
            Ok(h) => h,
            Err(e) => {
                // Recorded like every other failed call (no model named yet).
                self.finish_call(&origin, "InferStream", "", None, &Err(e.clone()), started);
                return Err(e.into());
            }
        };
        let span = info_span!(
            "rpc",
            method = "InferStream",
            model = %self.loggable_model(&header.model)
        );
        crate::telemetry::set_remote_parent(&span, &metadata);
        let p = {
            let _e = span.enter();
            to_dtype("header.input_dtype", header.input_dtype, false)
                .and_then(|i| {
                    let o = to_dtype("header.output_dtype", header.output_dtype, true)?;
                    self.prepare(
                        "header.model",
                        "header.input_shape",
                        &header.model,
                        i,
                        &header.input_shape,
                        o,
                    )
                })
                .and_then(|p| {
                    let chunk = match header.max_chunk_bytes {
                        0 => self.config.chunk_bytes,
                        n => usize::try_from(n)
                            .unwrap_or(usize::MAX)
                            .clamp(4096, self.config.chunk_bytes),
                    };
                    let output = self.shm_target(
                        "header.output_shared_memory",
                        header.output_shared_memory.as_ref(),
                        p.output_bytes,
                    )?;
                    let route = Route {
                        chunk,
                        depth: slabs::queue_depth(
                            output.is_some(),
                            p.plan.owned_slab_bytes(),
                            p.plan.output[1],
                            chunk,
                            self.config.stream_buffer,
                        ),
                        input: self.shm_target(
                            "header.input_shared_memory",
                            header.input_shared_memory.as_ref(),
                            p.input_bytes,
                        )?,
                        output,
                    };
                    Ok((p, route))
                })
        };
        let (p, route) = match p {
            Ok(p) => p,
            Err(e) => {
                let _e = span.enter();
                self.finish_call(
                    &origin,
                    "InferStream",
                    &header.model,
                    None,
                    &Err(e.clone()),
                    started,
                );
                return Err(e.into());
            }
        };
        let (tx, rx) = mpsc::channel(route.depth);
        let this = self.clone();
        let model_name = header.model.clone();
        tokio::spawn(
            async move {
                let (result, p) = this
                    .stream_call(p, inbound, tx, route, deadline, started)
                    .await;
                this.finish_call(
                    &origin,
                    "InferStream",
                    &model_name,
                    Some(&p),
                    &result,
                    started,
                );
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn register_shared_memory(
        &self,
        request: Request<pb::RegisterSharedMemoryRequest>,
    ) -> Result<Response<pb::RegisterSharedMemoryResponse>, Status> {
        let r = request.into_inner();
        let result = self.shm.register(&r.name, &r.key, r.offset, r.byte_size);
        log_region("registered", r.byte_size, &result);
        result?;
        Ok(Response::new(pb::RegisterSharedMemoryResponse {}))
    }

    async fn create_shared_memory(
        &self,
        request: Request<pb::CreateSharedMemoryRequest>,
    ) -> Result<Response<pb::CreateSharedMemoryResponse>, Status> {
        let r = request.into_inner();
        // Creating allocates and maps (up to --shared-memory-create-limit): off the runtime.
        let shm = Arc::clone(&self.shm);
        let (name, byte_size) = (r.name, r.byte_size);
        let result = tokio::task::spawn_blocking(move || shm.create(&name, byte_size))
            .await
            .unwrap_or_else(|_| Err(ServiceError::Internal("creating the region stopped".into())));
        log_region("created", byte_size, &result);
        let (key, memfd_name) = result?;
        Ok(Response::new(pb::CreateSharedMemoryResponse {
            key,
            memfd_name,
        }))
    }

    async fn unregister_shared_memory(
        &self,
        request: Request<pb::UnregisterSharedMemoryRequest>,
    ) -> Result<Response<pb::UnregisterSharedMemoryResponse>, Status> {
        self.shm.unregister(&request.into_inner().name)?;
        Ok(Response::new(pb::UnregisterSharedMemoryResponse {}))
    }

    async fn shared_memory_status(
        &self,
        request: Request<pb::SharedMemoryStatusRequest>,
    ) -> Result<Response<pb::SharedMemoryStatusResponse>, Status> {
        let regions = self
            .shm
            .status(&request.into_inner().name)?
            .iter()
            .map(|r| pb::SharedMemoryRegion {
                name: r.name.clone(),
                key: r.key.clone(),
                offset: r.offset,
                byte_size: r.byte_size,
                server_created: r.server_created(),
            })
            .collect();
        Ok(Response::new(pb::SharedMemoryStatusResponse { regions }))
    }

    async fn list_models(
        &self,
        _request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let set = self.models.snapshot();
        let mut models: Vec<pb::ModelInfo> = set
            .iter()
            .map(|m| {
                let mut info = model_info(m);
                info.error = set.error(&m.name).cloned().unwrap_or_default();
                info
            })
            .collect();
        // Models that failed to load and have no earlier version serving.
        for (name, error) in set.broken() {
            if set.get(name).is_none() {
                models.push(pb::ModelInfo {
                    name: name.clone(),
                    ready: false,
                    error: error.clone(),
                    ..Default::default()
                });
            }
        }
        Ok(Response::new(pb::ListModelsResponse { models }))
    }

    async fn get_model(
        &self,
        request: Request<pb::GetModelRequest>,
    ) -> Result<Response<pb::ModelInfo>, Status> {
        let name = request.into_inner().name;
        let set = self.models.snapshot();
        let m = set.get(&name).ok_or_else(|| match set.error(&name) {
            Some(e) => Status::from(ServiceError::Unavailable(format!(
                "name: model {name:?} failed to load: {e}"
            ))),
            None => Status::from(ServiceError::NotFound(format!(
                "name: no model named {name:?}"
            ))),
        })?;
        let mut info = model_info(&m);
        info.error = set.error(&name).cloned().unwrap_or_default();
        Ok(Response::new(info))
    }
}

fn activation_name(a: crate::kernel::Activation) -> String {
    match a {
        crate::kernel::Activation::None => "none".into(),
        crate::kernel::Activation::Relu => "relu".into(),
        crate::kernel::Activation::LeakyRelu(a) => format!("leaky_relu:{a}"),
        crate::kernel::Activation::Sigmoid => "sigmoid".into(),
    }
}

/// A model's description for ListModels / GetModel.
pub fn model_info(m: &Model) -> pb::ModelInfo {
    let u = |v: &[usize]| v.iter().map(|&x| x as u32).collect::<Vec<u32>>();
    pb::ModelInfo {
        name: m.name.clone(),
        description: m.description.clone(),
        input_channels: m.in_channels() as u32,
        output_channels: m.out_channels() as u32,
        layers: m
            .layers
            .iter()
            .map(|l| match l {
                Layer::Conv(c) => pb::LayerInfo {
                    op: "conv3d".into(),
                    in_channels: c.filter_shape[1] as u32,
                    out_channels: c.filter_shape[0] as u32,
                    kernel: u(&c.filter_shape[2..]),
                    stride: u(&c.params.stride),
                    padding: u(&c.params.padding),
                    dilation: u(&c.params.dilation),
                    bias: c.bias.is_some(),
                    activation: activation_name(c.activation),
                },
                Layer::MaxPool(p) => pb::LayerInfo {
                    op: "maxpool3d".into(),
                    kernel: u(&p.kernel),
                    stride: u(&p.stride),
                    activation: activation_name(p.activation),
                    ..Default::default()
                },
            })
            .collect(),
        accepted_dtypes: DType::ALL.iter().map(|&d| to_pb_dtype(d) as i32).collect(),
        output_shape: m.output_shape_rule(),
        receptive_field: u(&m.receptive_field()),
        ready: true,
        error: String::new(),
    }
}

#[cfg(test)]
mod deadline_tests {
    use super::*;

    #[test]
    fn grpc_timeout_units_and_malformed_values() {
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("50m"), Some(Duration::from_millis(50)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in [
            "",
            "m",
            "5",
            "5x",
            "-5m",
            "+5m",
            "123456789m",
            "5 m",
            "1.5S",
        ] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn deadline_fires_a_margin_before_the_clients_and_never_before_arrival() {
        let t0 = Instant::now();
        let mut h = http::HeaderMap::new();
        assert_eq!(deadline_from(&h, t0), None);
        h.insert("grpc-timeout", "100m".parse().unwrap());
        assert_eq!(
            deadline_from(&h, t0),
            Some(t0 + Duration::from_millis(100) - DEADLINE_MARGIN)
        );
        h.insert("grpc-timeout", "1m".parse().unwrap());
        assert_eq!(deadline_from(&h, t0), Some(t0));
        h.insert("grpc-timeout", "soon".parse().unwrap());
        assert_eq!(deadline_from(&h, t0), None);
    }
}

#[cfg(test)]
mod validation_props {
    //! Request validation never panics and accepts exactly the consistent requests: a
    //! known model, five positive dimensions, the model's channel count, and sizes that fit
    //! the address space (checked here independently, in u128).
    use super::*;
    use proptest::prelude::*;

    fn service() -> InferenceService {
        InferenceService::for_validation()
    }

    /// (name, C_in, C_out, kernel, stride, padding) of the models the property draws from.
    const MODELS: [(&str, u128, u128, u128, u128, u128); 3] = [
        ("sobel3d", 1, 3, 3, 1, 1),
        ("gaussian3d", 1, 1, 5, 1, 2),
        ("bench-strided-downsample", 16, 32, 3, 2, 1),
    ];

    fn dim() -> impl Strategy<Value = u64> {
        prop_oneof![
            8 => 1u64..40,
            1 => Just(0u64),
            1 => 1u64 << 20..1u64 << 42,
            1 => Just(u64::MAX),
        ]
    }

    fn consistent(model: usize, shape: &[u64], in_size: u128, out_size: u128) -> bool {
        let Some(&(_, c_in, c_out, k, s, p)) = MODELS.get(model) else {
            return false; // unknown model
        };
        if shape.len() != 5 || shape.contains(&0) {
            return false;
        }
        let d: Vec<u128> = shape.iter().map(|&v| u128::from(v)).collect();
        if d[1] != c_in || d.iter().any(|&v| v > usize::MAX as u128) {
            return false;
        }
        let out_sp: Vec<u128> = d[2..].iter().map(|&x| (x + 2 * p - k) / s + 1).collect();
        let fits = |v: Option<u128>| v.is_some_and(|v| v <= usize::MAX as u128);
        let input = d.iter().try_fold(1u128, |a, &x| a.checked_mul(x));
        let output = out_sp
            .iter()
            .try_fold(d[0] * c_out, |a, &x| a.checked_mul(x));
        fits(input)
            && fits(input.and_then(|v| v.checked_mul(in_size)))
            && fits(output)
            && fits(output.and_then(|v| v.checked_mul(out_size)))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]
        /// The fuzz target's body on stable: arbitrary bytes, and a valid request with bytes
        /// flipped, decoded and validated, never panic.
        #[test]
        fn decoding_and_validating_arbitrary_bytes_never_panics(
            raw in proptest::collection::vec(any::<u8>(), 0..256),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        ) {
            use prost::Message;
            let svc = service();
            let valid = pb::InferRequest {
                model: "sobel3d".into(),
                input: Some(pb::Tensor {
                    dtype: pb::DType::Fp32 as i32,
                    shape: vec![1, 1, 2, 2, 2],
                    data: vec![0u8; 32].into(),
                }),
                output_dtype: 0,
            };
            prop_assert!(svc.validate_infer(&valid).is_ok());
            let mut mutated = valid.encode_to_vec();
            for (at, b) in flips {
                let n = mutated.len();
                mutated[at % n] ^= b;
            }
            for bytes in [&raw[..], &mutated[..]] {
                if let Ok(r) = pb::InferRequest::decode(bytes) {
                    let _ = svc.validate_infer(&r);
                }
                if let Ok(r) = pb::InferStreamRequest::decode(bytes) {
                    if let Some(pb::infer_stream_request::Msg::Header(h)) = r.msg {
                        let _ = svc.validate_stream_header(&h);
                    }
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]
        #[test]
        fn validation_accepts_exactly_the_consistent_requests(
            model in 0usize..4,
            len in prop_oneof![8 => Just(5usize), 1 => 0usize..8],
            dims in proptest::collection::vec(dim(), 8),
            channel_hit in any::<bool>(),
            in_dtype in proptest::sample::select(DType::ALL.to_vec()),
            out_f16 in any::<bool>(),
        ) {
            let svc = service();
            let mut shape: Vec<u64> = dims[..len].to_vec();
            if channel_hit && shape.len() > 1 {
                if let Some(m) = MODELS.get(model) {
                    shape[1] = m.1 as u64;
                }
            }
            let name = MODELS.get(model).map_or("no-such-model", |m| m.0);
            let out = if out_f16 { DType::F16 } else { DType::F32 };
            let got = svc.prepare("model", "shape", name, in_dtype, &shape, out);
            let want = consistent(model, &shape, in_dtype.size() as u128, out.size() as u128);
            prop_assert_eq!(got.is_ok(), want, "shape {:?} model {} -> {:?}", shape, name,
                got.as_ref().err());
            if let Ok(p) = got {
                prop_assert_eq!(p.input_bytes as u128,
                    shape.iter().map(|&v| u128::from(v)).product::<u128>() * in_dtype.size() as u128);
            }
        }
    }
}
