//! Prometheus metrics (`--metrics-listen ADDR` serves them at `/metrics`).
//!
//! Every call is counted once, when it finishes, by method, model and gRPC status code; its
//! stage durations go into histograms. Pool gauges (queue length, busy workers, memory
//! reserved against the budget) are read from the pool when scraped. Labels carry only
//! method, model (a model the server knows: unknown names are counted as `_unknown`, so
//! clients cannot grow the label set), code and stage: never values or identifiers.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;

use crate::pool::PoolStats;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub method: String,
    pub model: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub method: String,
    pub stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KernelLabels {
    pub stage: String,
}

type HistFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 0.25 ms .. ~70 s.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 19))
}

/// Stage durations of one finished call.
#[derive(Clone, Copy, Debug, Default)]
pub struct CallTimes {
    pub receive: Duration,
    pub queue: Duration,
    pub compute: Duration,
    pub total: Duration,
    /// Thread time in the kernel's stages, summed over layers and threads.
    pub im2col: Duration,
    pub gemm: Duration,
    pub epilogue: Duration,
}

/// What a finished call adds to the metrics.
#[derive(Clone, Debug)]
pub struct CallRecord<'a> {
    pub method: &'a str,
    /// `None` when the model was not found (or the call failed before naming one).
    pub model: Option<&'a str>,
    pub code: &'a str,
    /// Present when the call got as far as planning.
    pub times: Option<CallTimes>,
    pub input_bytes: u64,
    pub output_bytes: u64,
    /// Output voxels computed and FLOPs (direct convolution) of a successful call.
    pub voxels: u64,
    pub flops: f64,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<CallLabels, Counter>,
    stage_seconds: HistFamily<StageLabels>,
    queue_wait: Histogram,
    kernel_seconds: Family<KernelLabels, Counter<f64, AtomicU64>>,
    input_bytes: Counter,
    output_bytes: Counter,
    voxels: Counter,
    flops: Counter<f64, AtomicU64>,
    queue_length: Gauge,
    workers_busy: Gauge,
    memory_reserved: Gauge,
    stats: Arc<PoolStats>,
    shm_created: Gauge,
    shm_limit: Gauge,
    /// Bytes of server-created shared memory alive now, read at each scrape.
    shm_source: std::sync::OnceLock<Arc<std::sync::atomic::AtomicU64>>,
}

impl Metrics {
    pub fn new(stats: Arc<PoolStats>, workers: usize, queue_len: usize, budget: u64) -> Self {
        let mut registry = Registry::with_prefix("voxconv");
        let requests = Family::<CallLabels, Counter>::default();
        registry.register(
            "requests",
            "Finished calls by method, model and gRPC status code",
            requests.clone(),
        );
        let stage_seconds: HistFamily<StageLabels> =
            Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register_with_unit(
            "stage_duration",
            "Wall-clock time per call stage: receive (input upload), queue (waiting for memory \
             and a worker), compute (the model on a worker), total",
            Unit::Seconds,
            stage_seconds.clone(),
        );
        let queue_wait = latency_histogram();
        registry.register_with_unit(
            "queue_wait",
            "Time calls waited for memory budget and a free worker",
            Unit::Seconds,
            queue_wait.clone(),
        );
        let kernel_seconds = Family::<KernelLabels, Counter<f64, AtomicU64>>::default();
        registry.register_with_unit(
            "kernel_thread",
            "Kernel thread time by stage (im2col / gemm / epilogue), summed over threads",
            Unit::Seconds,
            kernel_seconds.clone(),
        );
        let input_bytes = Counter::default();
        registry.register_with_unit(
            "input",
            "Input tensor bytes of calls that were planned",
            Unit::Bytes,
            input_bytes.clone(),
        );
        let output_bytes = Counter::default();
        registry.register_with_unit(
            "output",
            "Output tensor bytes of successful calls",
            Unit::Bytes,
            output_bytes.clone(),
        );
        let voxels = Counter::default();
        registry.register(
            "output_voxels",
            "Output voxels computed (rate() gives voxels/s)",
            voxels.clone(),
        );
        let flops = Counter::<f64, AtomicU64>::default();
        registry.register(
            "flops",
            "Floating-point operations of the direct convolutions computed (rate()/1e9 gives \
             GFLOP/s)",
            flops.clone(),
        );
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let queue_length = gauge(&mut registry, "queue_length", "Jobs waiting for a worker");
        let queue_capacity = gauge(
            &mut registry,
            "queue_capacity",
            "Most jobs that may wait (--queue-len)",
        );
        let workers_gauge = gauge(&mut registry, "workers", "Worker threads (--workers)");
        let workers_busy = gauge(&mut registry, "workers_busy", "Workers running a job");
        let memory_reserved = Gauge::default();
        registry.register_with_unit(
            "memory_reserved",
            "Bytes reserved from the memory budget by admitted calls",
            Unit::Bytes,
            memory_reserved.clone(),
        );
        let memory_budget: Gauge = Gauge::default();
        registry.register_with_unit(
            "memory_budget",
            "The memory budget (--memory-budget)",
            Unit::Bytes,
            memory_budget.clone(),
        );
        let shm_created: Gauge = Gauge::default();
        registry.register_with_unit(
            "shared_memory_created",
            "Bytes of server-created shared-memory regions alive (CreateSharedMemory)",
            Unit::Bytes,
            shm_created.clone(),
        );
        let shm_limit: Gauge = Gauge::default();
        registry.register_with_unit(
            "shared_memory_create_limit",
            "Most bytes of server-created shared memory (--shared-memory-create-limit; 0 \
             when shared memory is off)",
            Unit::Bytes,
            shm_limit.clone(),
        );
        queue_capacity.set(i64::try_from(queue_len).unwrap_or(i64::MAX));
        workers_gauge.set(i64::try_from(workers).unwrap_or(i64::MAX));
        memory_budget.set(i64::try_from(budget).unwrap_or(i64::MAX));
        Self {
            registry,
            requests,
            stage_seconds,
            queue_wait,
            kernel_seconds,
            input_bytes,
            output_bytes,
            voxels,
            flops,
            queue_length,
            workers_busy,
            memory_reserved,
            stats,
            shm_created,
            shm_limit,
            shm_source: std::sync::OnceLock::new(),
        }
    }

    /// Reports server-created shared memory: `created` is read at each scrape.
    pub fn watch_shared_memory(&self, created: Arc<std::sync::atomic::AtomicU64>, limit: u64) {
        self.shm_limit.set(i64::try_from(limit).unwrap_or(i64::MAX));
        let _ = self.shm_source.set(created);
    }

    /// Counts one finished call.
    pub fn record(&self, r: &CallRecord<'_>) {
        self.requests
            .get_or_create(&CallLabels {
                method: r.method.to_string(),
                model: r.model.unwrap_or("_unknown").to_string(),
                code: r.code.to_string(),
            })
            .inc();
        if let Some(t) = r.times {
            for (stage, d) in [
                ("receive", t.receive),
                ("queue", t.queue),
                ("compute", t.compute),
                ("total", t.total),
            ] {
                self.stage_seconds
                    .get_or_create(&StageLabels {
                        method: r.method.to_string(),
                        stage: stage.to_string(),
                    })
                    .observe(d.as_secs_f64());
            }
            self.queue_wait.observe(t.queue.as_secs_f64());
            for (stage, d) in [
                ("im2col", t.im2col),
                ("gemm", t.gemm),
                ("epilogue", t.epilogue),
            ] {
                self.kernel_seconds
                    .get_or_create(&KernelLabels {
                        stage: stage.to_string(),
                    })
                    .inc_by(d.as_secs_f64());
            }
        }
        self.input_bytes.inc_by(r.input_bytes);
        self.output_bytes.inc_by(r.output_bytes);
        self.voxels.inc_by(r.voxels);
        self.flops.inc_by(r.flops);
    }

    /// The text exposition (OpenMetrics), with pool gauges read now.
    pub fn encode(&self) -> String {
        let s = &self.stats;
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.queue_length
            .set(g(s.queued.load(Ordering::Relaxed) as u64));
        self.workers_busy
            .set(g(s.busy.load(Ordering::Relaxed) as u64));
        self.memory_reserved
            .set(g(s.reserved_bytes.load(Ordering::Relaxed)));
        if let Some(c) = self.shm_source.get() {
            self.shm_created.set(g(c.load(Ordering::Relaxed)));
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Serves `GET /metrics` on `listener` until the task is dropped or aborted.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) -> std::io::Result<()> {
    use axum::http::header::CONTENT_TYPE;
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let metrics = Arc::clone(&metrics);
            async move {
                (
                    [(
                        CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.encode(),
                )
            }
        }),
    );
    axum::serve(listener, app).await
}

/// Binds the metrics address (port 0 picks one).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
