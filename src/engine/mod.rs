//! The transport-free core of a call: validate and plan it ([`Engine::prepare`]), admit it
//! (memory budget, queue), run it on a pool worker, whole ([`Engine::run_whole`]) or streamed
//! ([`Engine::run_stream`]), and record it ([`Engine::finish_call`]). No tonic types: the
//! handlers in `service` convert protobuf to the types here and back.

pub mod slabs;

use std::future::Future;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, Instrument, Span};

use crate::config::Config;
use crate::error::ServiceError;
use crate::model::repo::ModelRegistry;
use crate::model::sliding::{labels_fit_u8, InputFeed, PlanError, WindowOutput, WindowRequest};
use crate::model::{LayerTiming, Model, ModelPlan, ProgressHook};
use crate::obs::audit::AuditLog;
use crate::obs::calls::{record_call, FinishedCall};
use crate::obs::metrics::{CallTimes, Metrics};
use crate::pool::{Pool, PoolError};
use crate::shm::{Region, SharedMemory};
use crate::tensor::dtype::{self, DType, StreamDecoder};
use crate::wire::code_name;
use crate::wire::deadline::before;

impl From<PoolError> for ServiceError {
    fn from(e: PoolError) -> Self {
        match e {
            PoolError::QueueFull { .. } | PoolError::TooLarge { .. } => {
                Self::ResourceExhausted(e.to_string())
            }
            PoolError::Skipped => Self::Cancelled(e.to_string()),
            PoolError::Panicked => Self::Internal("internal error while computing".into()),
        }
    }
}

/// The state shared by every call of both APIs.
pub struct Engine {
    /// The models served.
    pub models: Arc<ModelRegistry>,
    pool: Arc<Pool>,
    pub config: Arc<Config>,
    metrics: Arc<Metrics>,
    audit: Option<Arc<AuditLog>>,
    /// Registered shared-memory regions (`--shared-memory-dir`).
    pub shm: Arc<SharedMemory>,
    /// Float32 output slab buffers, kept between calls (bounded).
    slab_pool: Arc<slabs::Recycler>,
}

/// Who made a call and from where, for the audit log (set by the auth layer).
#[derive(Clone, Debug, Default)]
pub struct Origin {
    pub caller: Option<String>,
    pub peer: Option<std::net::SocketAddr>,
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
pub struct Prepared {
    pub model: Arc<Model>,
    pub plan: ModelPlan,
    pub in_dtype: DType,
    pub out_dtype: DType,
    pub input_elems: usize,
    pub input_bytes: usize,
    pub output_bytes: usize,
    /// Stage times, set once when the call's summary is built (for metrics).
    times: std::sync::OnceLock<CallTimes>,
}

/// The output dtype of a sliding-window call: labels as UINT8 (up to 256 classes) or
/// UINT16, unless the client asked for UINT16; float outputs as asked (FP32 by default).
fn window_out_dtype(plan: &ModelPlan, asked: Option<(&str, DType)>) -> Result<DType, ServiceError> {
    let field = asked.map_or("output_dtype", |a| a.0);
    let asked = asked.map(|a| a.1);
    let Some(w) = &plan.window else {
        return Ok(asked.unwrap_or(DType::F32));
    };
    let fits = labels_fit_u8(w.classes);
    match (w.opts.output, asked) {
        (WindowOutput::Labels, None) => Ok(if fits { DType::U8 } else { DType::U16 }),
        (WindowOutput::Labels, Some(DType::U16)) => Ok(DType::U16),
        (WindowOutput::Labels, Some(DType::U8)) if fits => Ok(DType::U8),
        (WindowOutput::Labels, Some(d)) => Err(ServiceError::invalid(format!(
            "{field}: labels of {} classes are {}, got {}",
            w.classes,
            if fits { "UINT8 or UINT16" } else { "UINT16" },
            d.name()
        ))),
        (_, None) => Ok(DType::F32),
        (kind, Some(d)) if !d.is_output() => Err(ServiceError::invalid(format!(
            "{field}: {} are FP32 or FP16, got {} (UINT8/UINT16 are for labels)",
            kind.name(),
            d.name()
        ))),
        (_, Some(d)) => Ok(d),
    }
}

/// What a finished call reports to its client: sizes, work and stage times.
#[derive(Clone, Debug)]
pub struct CallSummary {
    pub input_bytes: u64,
    pub output_bytes: u64,
    pub flops: f64,
    pub receive: Duration,
    pub queue: Duration,
    pub compute: Duration,
    pub total: Duration,
    pub layers: Vec<LayerTiming>,
    /// Sliding-window calls: windows computed.
    pub windows: u64,
}

/// What a streamed call sends, in order: one header, the output's chunks, one summary.
#[derive(Debug)]
pub enum StreamEvent {
    Header {
        dtype: DType,
        shape: [usize; 5],
        total_bytes: u64,
    },
    Chunk {
        offset: u64,
        data: Bytes,
    },
    Summary(CallSummary),
    /// Sliding-window progress: windows done of the total.
    Progress {
        done: u64,
        total: u64,
    },
}

/// One piece of a streamed input: its byte offset and bytes.
pub struct InputChunk {
    pub offset: u64,
    pub data: Bytes,
}

/// How a stream's bytes travel: output chunk size, response queue depth (chunks), and the
/// shared-memory regions (with byte offsets) its input comes from and its output goes to
/// instead of the socket.
pub struct Route {
    pub chunk: usize,
    pub depth: usize,
    pub input: Option<(Arc<Region>, u64)>,
    pub output: Option<(Arc<Region>, u64)>,
}

/// The events of a streamed call, or the error that ended it (then nothing follows).
pub type Outbound = mpsc::Sender<Result<StreamEvent, ServiceError>>;

/// Runs `fut` until the deadline, if any; `stage` names what the call was doing.
pub async fn until<T>(
    deadline: Option<Instant>,
    stage: &str,
    fut: impl Future<Output = T>,
) -> Result<T, ServiceError> {
    match deadline {
        None => Ok(fut.await),
        Some(d) => before(d, fut)
            .await
            .map_err(|()| ServiceError::DeadlineExceeded(format!("deadline passed while {stage}"))),
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

impl Prepared {
    /// The call's summary; also keeps its stage times for the metrics.
    fn summary(
        &self,
        receive: Duration,
        queue: Duration,
        compute: Duration,
        started: Instant,
        layers: Vec<LayerTiming>,
    ) -> CallSummary {
        let total = started.elapsed();
        let _ = self.times.set(CallTimes {
            receive,
            queue,
            compute,
            total,
            im2col: layers.iter().map(|l| l.stages.im2col).sum(),
            gemm: layers.iter().map(|l| l.stages.gemm).sum(),
            epilogue: layers.iter().map(|l| l.stages.epilogue).sum(),
        });
        CallSummary {
            input_bytes: self.input_bytes as u64,
            output_bytes: self.output_bytes as u64,
            flops: self.plan.flops(),
            receive,
            queue,
            compute,
            total,
            layers,
            windows: self.plan.window.as_ref().map_or(0, |w| w.windows_total()),
        }
    }
}

impl Engine {
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

    /// An engine over the built-in models with test-sized settings (fuzzing, tests).
    pub fn for_validation() -> Self {
        let config = Arc::new(Config::for_tests());
        let pool = Arc::new(Pool::new(1, 4, 1 << 30, 1));
        let metrics = Arc::new(Metrics::new(pool.stats(), 1, 4, 1 << 30));
        let models = Arc::new(ModelRegistry::fixed(crate::model::ModelSet::builtin()));
        Engine::new(models, pool, config, metrics, None)
    }

    /// Validates model, dtypes and shape (checked arithmetic, before any allocation).
    /// `model_field` and `shape_field` name the request fields in messages; `out_dtype` and
    /// `window` come with theirs.
    #[allow(clippy::too_many_arguments)]
    pub fn prepare(
        &self,
        model_field: &str,
        shape_field: &str,
        model: &str,
        in_dtype: DType,
        shape: &[u64],
        out_dtype: Option<(&str, DType)>,
        window: Option<(&str, &WindowRequest)>,
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
        if m.in_channels() != 0 && dims[1] != m.in_channels() {
            return Err(ServiceError::invalid(format!(
                "{field}[1] (channels): model {} expects {}, got {}",
                m.name,
                m.in_channels(),
                dims[1]
            )));
        }
        let (plan, out_dtype) = match window {
            None => {
                let out = match out_dtype {
                    None => DType::F32,
                    Some((_, d)) if d.is_output() => d,
                    Some((f, d)) => {
                        return Err(ServiceError::invalid(format!(
                            "{f}: expected FP32 or FP16, got {} (UINT8/UINT16 are for \
                             sliding-window labels)",
                            d.name()
                        )))
                    }
                };
                (
                    m.plan(dims).map_err(|e| ServiceError::kernel(&field, e))?,
                    out,
                )
            }
            Some((window_field, request)) => {
                let plan = m
                    .plan_sliding(dims, request, self.config.window_lanes)
                    .map_err(|e| match e {
                        PlanError::Window(w) => {
                            ServiceError::invalid(format!("{window_field}.{w}"))
                        }
                        PlanError::Kernel(k) => ServiceError::kernel(&field, k),
                    })?;
                let out = window_out_dtype(&plan, out_dtype)?;
                (plan, out)
            }
        };
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

    /// Memory a sliding-window call over `scan` (`[N, C, D, H, W]`) with the model's
    /// defaults reserves (GetModel): its decoded input and working set.
    pub fn scan_working_bytes(
        &self,
        field: &str,
        m: &Model,
        scan: &[u64],
    ) -> Result<u64, ServiceError> {
        let dims: [usize; 5] = scan
            .iter()
            .map(|&v| usize::try_from(v).ok())
            .collect::<Option<Vec<_>>>()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| {
                ServiceError::invalid(format!(
                    "{field}: expected 5 dimensions [N, C, D, H, W], got {scan:?}"
                ))
            })?;
        let plan = m
            .plan_sliding(dims, &WindowRequest::default(), self.config.window_lanes)
            .map_err(|e| match e {
                PlanError::Window(w) => ServiceError::invalid(format!("{field}: {w}")),
                PlanError::Kernel(k) => ServiceError::kernel(field, k),
            })?;
        // Streamed over the socket, a single-channel scan is consumed as it arrives.
        let input = plan
            .window
            .as_ref()
            .map_or(u64::MAX, |w| w.input_bytes_held(true) as u64);
        Ok(input.saturating_add(plan.working_bytes(self.pool.threads_per_job()) as u64))
    }

    /// Working memory of a call, reserved before its input buffer is allocated.
    fn memory_needed(&self, p: &Prepared, output_buffers: usize) -> u64 {
        self.memory_with_input(p, (p.input_elems as u64).saturating_mul(4), output_buffers)
    }

    /// Like [`memory_needed`](Self::memory_needed), with `input` bytes of decoded input held
    /// (less than the whole scan where it is consumed as it arrives).
    fn memory_with_input(&self, p: &Prepared, input: u64, output_buffers: usize) -> u64 {
        let threads = self.pool.threads_per_job();
        input
            .saturating_add(p.plan.working_bytes(threads) as u64)
            .saturating_add(output_buffers as u64)
    }

    /// A model name fit for logs and spans: the name when the server knows the model,
    /// `_unknown` otherwise (a client may send anything there).
    pub fn loggable_model(&self, name: &str) -> String {
        match self.models.snapshot().get(name) {
            Some(m) => m.name.clone(),
            None => "_unknown".into(),
        }
    }

    /// The region `r` (name, offset) names, checked to hold `bytes` at its offset; `field`
    /// names the request field in errors.
    pub fn shm_target(
        &self,
        field: &str,
        r: Option<(&str, u64)>,
        bytes: usize,
    ) -> Result<Option<(Arc<Region>, u64)>, ServiceError> {
        let Some((name, offset)) = r else {
            return Ok(None);
        };
        let region = self.shm.get(&format!("{field}.region"), name)?;
        region.check_window(field, offset, bytes as u64)?;
        Ok(Some((region, offset)))
    }

    /// The route of a stream: chunk size (the client's, clamped to ours), queue depth, and
    /// its shared-memory regions.
    pub fn route(
        &self,
        p: &Prepared,
        max_chunk_bytes: u64,
        input: Option<(Arc<Region>, u64)>,
        output: Option<(Arc<Region>, u64)>,
    ) -> Route {
        let chunk = match max_chunk_bytes {
            0 => self.config.chunk_bytes,
            n => usize::try_from(n)
                .unwrap_or(usize::MAX)
                .clamp(4096, self.config.chunk_bytes),
        };
        Route {
            chunk,
            depth: slabs::queue_depth(
                output.is_some(),
                p.plan.owned_slab_bytes(),
                p.plan.output[1],
                chunk,
                self.config.stream_buffer,
            ),
            input,
            output,
        }
    }

    /// One line per call (sizes, shapes, durations and status; never values or
    /// identifiers) and the call's metrics.
    pub fn finish_call(
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

    /// A whole-tensor call (voxconv.v1 Infer, KServe ModelInfer): validate, reserve memory,
    /// decode + compute + encode on a worker. `fields` names the model, shape and data
    /// fields in messages. The output must fit one message.
    #[allow(clippy::too_many_arguments)]
    pub async fn run_whole(
        &self,
        fields: (&str, &str, &str),
        model: &str,
        in_dtype: DType,
        shape: &[u64],
        data: Bytes,
        out_dtype: Option<(&str, DType)>,
        window: Option<(&str, &WindowRequest)>,
        deadline: Option<Instant>,
        started: Instant,
    ) -> Result<(Prepared, Vec<u8>, CallSummary), ServiceError> {
        let (model_field, shape_field, data_field) = fields;
        let p = self.prepare(
            model_field,
            shape_field,
            model,
            in_dtype,
            shape,
            out_dtype,
            window,
        )?;
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
            // The whole output, NCDHW, written in place by the last layer.
            let mut y = vec![0f32; plan.output_len()];
            let r = plan.run_to(&model, x, ctx.threads, Some(&ctx.cancel), &mut y);
            let mut bytes = Vec::new();
            info_span!("encode").in_scope(|| dtype::encode(out_dtype, &y, &mut bytes));
            (r, bytes, ctx.queue_wait, t0.elapsed())
        })?;
        let (r, bytes, queue, compute) = until(deadline, "computing", job)
            .await?
            .map_err(|_| ServiceError::Internal("worker dropped the job".into()))??;
        let layers = r.map_err(|e| ServiceError::kernel("input", e))?;
        log_layers(&layers);
        let summary = p.summary(Duration::ZERO, queue, compute, started, layers);
        Ok((p, bytes, summary))
    }

    /// Everything of a streamed call after its header: memory, upload (from `inbound`, or
    /// the input region), compute, and the events sent to `out`. On failure the error is
    /// sent to `out` last (if the client still listens) and returned.
    pub async fn run_stream<S>(
        &self,
        p: Prepared,
        mut inbound: S,
        out: Outbound,
        route: Route,
        deadline: Option<Instant>,
        started: Instant,
    ) -> (Result<(), ServiceError>, Prepared)
    where
        S: Stream<Item = Result<InputChunk, ServiceError>> + Unpin + Send,
    {
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
            // A single-channel scan in sliding windows over the socket is consumed as it
            // arrives: a ring of rows, not the whole scan.
            let notify = Arc::new(tokio::sync::Notify::new());
            let feed = match (&p.plan.window, &route.input) {
                (Some(w), None) => {
                    let n = Arc::clone(&notify);
                    InputFeed::new(w, Box::new(move || n.notify_one())).map(Arc::new)
                }
                _ => None,
            };
            let held = match (&p.plan.window, &feed) {
                (Some(w), Some(_)) => w.input_bytes_held(true) as u64,
                _ => (p.input_elems as u64).saturating_mul(4),
            };
            let need = self.memory_with_input(&p, held, in_flight);
            let reservation = until(deadline, "waiting for memory", self.pool.reserve(need))
                .instrument(info_span!("queue_wait", stage = "memory"))
                .await??;

            let t_recv = Instant::now();
            let (input, receive) = if feed.is_some() {
                (Vec::new(), Duration::ZERO)
            } else {
            // Upload: ordered chunks, decoded as they arrive.
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
                        m = until(deadline, "receiving the input", inbound.next()) => m?,
                        _ = out.closed() => return Err(ServiceError::Cancelled("client went away".into())),
                    };
                    let Some(msg) = msg else {
                        return Err(ServiceError::invalid(format!(
                            "chunk: input ended after {} of {} bytes",
                            dec.bytes_received(),
                            dec.bytes_expected()
                        )));
                    };
                    let c = msg?;
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
                Ok(())
            }
            .instrument(info_span!("decode", bytes = p.input_bytes))
            .await?;
            let input = dec.finish().ok_or_else(|| ServiceError::Internal("input incomplete".into()))?;
            (input, t_recv.elapsed())
            };

            let header = StreamEvent::Header {
                dtype: p.out_dtype,
                shape: p.plan.output,
                total_bytes: p.output_bytes as u64,
            };
            until(deadline, "sending the output", out.send(Ok(header)))
                .await?
                .map_err(|_| ServiceError::Cancelled("client went away".into()))?;

            // Compute on a worker; finished slabs go straight to the response stream. The
            // bounded channel is the backpressure: a slow reader slows the worker down.
            let (model, mut plan, out_dtype, output) = (Arc::clone(&p.model), p.plan.clone(), p.out_dtype, p.plan.output);
            let tx = out.clone();
            let job_cancel = cancel.clone();
            let rt = tokio::runtime::Handle::current();
            plan.feed = feed.clone();
            if plan.window.is_some() {
                // Progress between chunks, with the chunks' backpressure.
                let (tx, cancel, rt) = (out.clone(), cancel.clone(), rt.clone());
                plan.progress = Some(ProgressHook(Arc::new(move |done, total| {
                    rt.block_on(async {
                        tokio::select! {
                            _ = tx.send(Ok(StreamEvent::Progress { done, total })) => {}
                            _ = cancel.token.cancelled() => {}
                        }
                    })
                })));
            }
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
                            let msg = Ok(StreamEvent::Chunk { offset, data });
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
            let outcome = match &feed {
                None => tokio::select! {
                    r = until(deadline, "computing", job) => r?,
                    _ = out.closed() => return Err(ServiceError::Cancelled("client went away".into())),
                },
                Some(feed) => {
                    // The upload runs beside the windows: a failed upload stops them.
                    let job = until(deadline, "computing", job);
                    let upload = receive_into_feed(feed, &notify, p.in_dtype, p.input_bytes, &mut inbound, deadline)
                        .instrument(info_span!("decode", bytes = p.input_bytes));
                    tokio::pin!(job, upload);
                    let mut uploaded = false;
                    loop {
                        tokio::select! {
                            r = &mut upload, if !uploaded => {
                                uploaded = true;
                                if let Err(e) = r {
                                    feed.close();
                                    return Err(e);
                                }
                            }
                            r = &mut job => {
                                feed.close();
                                break r?;
                            }
                            _ = out.closed() => {
                                feed.close();
                                return Err(ServiceError::Cancelled("client went away".into()));
                            }
                        }
                    }
                }
            };
            let receive = if feed.is_some() { t_recv.elapsed() } else { receive };
            let (r, queue, compute, write_failed) = outcome
                .map_err(|_| ServiceError::Internal("worker dropped the job".into()))??;
            if let Some(kind) = write_failed {
                return Err(ServiceError::Internal(format!(
                    "header.output_shared_memory: writing the output into the region failed ({kind})"
                )));
            }
            let layers = r.map_err(|e| ServiceError::kernel("input", e))?;
            log_layers(&layers);
            let s = p.summary(receive, queue, compute, started, layers);
            // The queue may still hold a slab's chunks the client has not read: the deadline
            // bounds this wait too, and the reservation lasts until the summary is queued.
            until(deadline, "sending the output", out.send(Ok(StreamEvent::Summary(s))))
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
            let _ = tokio::time::timeout(Duration::from_secs(1), out.send(Err(e.clone()))).await;
        }
        (result, p)
    }
}

/// Longest pause in a sliding-window upload consumed as it arrives (see
/// [`receive_into_feed`]).
pub const FEED_STALL: Duration = Duration::from_secs(30);

/// Receives a stream's input chunks (in order, checked as for whole uploads) into `feed`,
/// waiting for room whenever the windows have not yet released enough rows.
async fn receive_into_feed<S>(
    feed: &InputFeed,
    released: &tokio::sync::Notify,
    dtype: DType,
    expected: usize,
    inbound: &mut S,
    deadline: Option<Instant>,
) -> Result<(), ServiceError>
where
    S: Stream<Item = Result<InputChunk, ServiceError>> + Unpin + Send,
{
    let mut dec = dtype::PieceDecoder::new(dtype);
    let mut values = Vec::new();
    let mut received = 0usize;
    while received < expected {
        // The windows hold a worker while they wait for rows: a client that stops sending
        // must not keep it from the others.
        let next = tokio::time::timeout(FEED_STALL, inbound.next());
        let Some(msg) = until(deadline, "receiving the input", next)
            .await?
            .map_err(|_| {
                ServiceError::DeadlineExceeded(format!(
                    "chunk: no input for {} s while the sliding windows wait for it ({received} \
                     of {expected} bytes received)",
                    FEED_STALL.as_secs()
                ))
            })?
        else {
            return Err(ServiceError::invalid(format!(
                "chunk: input ended after {received} of {expected} bytes"
            )));
        };
        let c = msg?;
        if c.offset != received as u64 {
            return Err(ServiceError::invalid(format!(
                "chunk.offset: expected {received} (chunks in order), got {}",
                c.offset
            )));
        }
        let end = received.saturating_add(c.data.len());
        if end > expected {
            return Err(ServiceError::invalid(format!(
                "chunk.data: input is {expected} bytes, this chunk ends at {end}"
            )));
        }
        received = end;
        values.clear();
        dec.push(&c.data, &mut values);
        let mut at = 0;
        while at < values.len() {
            let n = feed.push(&values[at..]);
            at += n;
            if n == 0 {
                // The windows hold every row: wait until they release some.
                until(deadline, "receiving the input", released.notified()).await?;
            }
        }
    }
    Ok(())
}

/// Logs a shared-memory region registered or created: names and keys may carry identifiers,
/// so only the size and the outcome.
pub fn log_region<T>(what: &'static str, byte_size: u64, result: &Result<T, ServiceError>) {
    let code = result
        .as_ref()
        .map_or_else(|e| e.code(), |_| tonic::Code::Ok);
    info!(
        byte_size,
        status = code_name(code),
        "shared-memory region {what}"
    );
}
