//! Server configuration: one struct, flags with `VOXCONV_*` environment equivalents, defaults
//! in one place, validated completely before anything binds.

use std::net::SocketAddr;
use std::time::Duration;

use bytesize::ByteSize;
use clap::{Args, ValueEnum};

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// `voxconv serve` settings. Every flag has a `VOXCONV_*` environment variable.
#[derive(Clone, Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on (use 0.0.0.0:50051 in containers).
    #[arg(long, env = "VOXCONV_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Jobs computed at the same time (dedicated worker threads).
    #[arg(long, env = "VOXCONV_WORKERS", default_value_t = 1)]
    pub workers: usize,
    /// Kernel threads per job (default: available cores). workers × threads-per-job above
    /// the core count oversubscribes the CPU.
    #[arg(long, env = "VOXCONV_THREADS_PER_JOB")]
    pub threads_per_job: Option<usize>,
    /// Jobs waiting for a worker before new ones are refused (RESOURCE_EXHAUSTED).
    #[arg(long, env = "VOXCONV_QUEUE_LEN", default_value_t = 16)]
    pub queue_len: usize,
    /// Memory for requests in flight (inputs, intermediates, workspace, output buffers);
    /// a request that can never fit is refused at once.
    #[arg(long, env = "VOXCONV_MEMORY_BUDGET", default_value = "4GiB")]
    pub memory_budget: ByteSize,
    /// Output chunk size of InferStream (clients may ask for less).
    #[arg(long, env = "VOXCONV_CHUNK_BYTES", default_value = "1MiB")]
    pub chunk_bytes: ByteSize,
    /// Largest gRPC message accepted or sent (Infer's whole tensors; InferStream chunks).
    #[arg(long, env = "VOXCONV_MAX_MESSAGE_BYTES", default_value = "4MiB")]
    pub max_message_bytes: ByteSize,
    /// Output chunks buffered per stream before the producer waits (backpressure).
    #[arg(long, env = "VOXCONV_STREAM_BUFFER", default_value_t = 4)]
    pub stream_buffer: usize,
    /// Time in-flight calls get to finish after SIGTERM/SIGINT.
    #[arg(long, env = "VOXCONV_SHUTDOWN_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    /// Log format.
    #[arg(long, env = "VOXCONV_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax, e.g. `info` or `voxconv=debug`).
    #[arg(long, env = "VOXCONV_LOG", default_value = "info")]
    pub log: String,
    /// Model repository: each subdirectory holds model.toml + weights.safetensors. Reloaded
    /// on SIGHUP.
    #[arg(long, env = "VOXCONV_MODEL_REPOSITORY")]
    pub model_repository: Option<std::path::PathBuf>,
    /// Also reload the repository at this interval (e.g. 30s); unchanged models are kept.
    #[arg(long, env = "VOXCONV_MODEL_POLL_INTERVAL", value_parser = humantime::parse_duration)]
    pub model_poll_interval: Option<Duration>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 0.0.0.0:9090); off when unset.
    #[arg(long, env = "VOXCONV_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Export traces over OTLP/gRPC to this collector (e.g. http://otel-collector:4317);
    /// off when unset. A caller's W3C `traceparent` becomes the parent of the `rpc` span.
    #[arg(long, env = "VOXCONV_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

/// Validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub workers: usize,
    pub threads_per_job: usize,
    pub queue_len: usize,
    pub memory_budget: u64,
    pub chunk_bytes: usize,
    pub max_message_bytes: usize,
    pub stream_buffer: usize,
    pub shutdown_grace: Duration,
    pub log_format: LogFormat,
    pub log: String,
    pub model_repository: Option<std::path::PathBuf>,
    pub model_poll_interval: Option<Duration>,
    pub metrics_listen: Option<SocketAddr>,
    pub otlp_endpoint: Option<String>,
}

/// A configuration error: one line naming the setting, the expected and the received value.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Defaults for tests and embedding: loopback port 0, small limits.
    pub fn for_tests() -> Self {
        Self {
            listen: "127.0.0.1:0".parse().expect("literal"),
            workers: 1,
            threads_per_job: 1,
            queue_len: 16,
            memory_budget: 1 << 30,
            chunk_bytes: 256 << 10,
            max_message_bytes: 4 << 20,
            stream_buffer: 4,
            shutdown_grace: Duration::from_secs(5),
            log_format: LogFormat::Text,
            log: "warn".into(),
            model_repository: None,
            model_poll_interval: None,
            metrics_listen: None,
            otlp_endpoint: None,
        }
    }
}

fn bounded(name: &str, value: u64, lo: u64, hi: u64) -> Result<u64, ConfigError> {
    if value < lo || value > hi {
        Err(ConfigError(format!(
            "--{name}: expected a value in {lo}..={hi}, got {value}"
        )))
    } else {
        Ok(value)
    }
}

impl TryFrom<ServeArgs> for Config {
    type Error = ConfigError;

    fn try_from(a: ServeArgs) -> Result<Self, ConfigError> {
        let cores = crate::cli::default_threads() as u64;
        let workers = bounded("workers", a.workers as u64, 1, 1024)? as usize;
        let threads_per_job = bounded(
            "threads-per-job",
            a.threads_per_job.map_or(cores, |t| t as u64),
            1,
            1024,
        )? as usize;
        let queue_len = bounded("queue-len", a.queue_len as u64, 1, 1 << 20)? as usize;
        let memory_budget = bounded(
            "memory-budget",
            a.memory_budget.as_u64(),
            1 << 20,
            u64::from(u32::MAX) * 1024,
        )?;
        let max_message_bytes = bounded(
            "max-message-bytes",
            a.max_message_bytes.as_u64(),
            64 << 10,
            1 << 30,
        )? as usize;
        // A chunk plus its framing must fit in one message.
        let chunk_bytes = bounded(
            "chunk-bytes",
            a.chunk_bytes.as_u64(),
            4 << 10,
            (max_message_bytes - 1024) as u64,
        )? as usize;
        let stream_buffer = bounded("stream-buffer", a.stream_buffer as u64, 1, 1024)? as usize;
        if a.shutdown_grace > Duration::from_secs(3600) {
            return Err(ConfigError(format!(
                "--shutdown-grace: expected at most 1h, got {}",
                humantime::format_duration(a.shutdown_grace)
            )));
        }
        tracing_subscriber::EnvFilter::try_new(&a.log).map_err(|e| {
            ConfigError(format!(
                "--log: expected a tracing filter, got {:?}: {e}",
                a.log
            ))
        })?;
        Ok(Self {
            listen: a.listen,
            workers,
            threads_per_job,
            queue_len,
            memory_budget,
            chunk_bytes,
            max_message_bytes,
            stream_buffer,
            shutdown_grace: a.shutdown_grace,
            log_format: a.log_format,
            log: a.log,
            model_repository: match a.model_repository {
                Some(d) if !d.is_dir() => {
                    return Err(ConfigError(format!(
                        "--model-repository: expected a directory, got {}",
                        d.display()
                    )))
                }
                d => d,
            },
            model_poll_interval: match a.model_poll_interval {
                Some(i) if i < Duration::from_millis(100) => {
                    return Err(ConfigError(format!(
                        "--model-poll-interval: expected at least 100ms, got {}",
                        humantime::format_duration(i)
                    )))
                }
                i => i,
            },
            metrics_listen: match a.metrics_listen {
                Some(m) if m == a.listen && m.port() != 0 => {
                    return Err(ConfigError(format!(
                        "--metrics-listen: expected an address other than --listen, got {m}"
                    )))
                }
                m => m,
            },
            otlp_endpoint: match a.otlp_endpoint {
                Some(e)
                    if !(e.starts_with("http://") || e.starts_with("https://"))
                        || e.parse::<tonic::transport::Uri>().is_err() =>
                {
                    return Err(ConfigError(format!(
                        "--otlp-endpoint: expected an http:// or https:// URL, got {e:?}"
                    )))
                }
                e => e,
            },
        })
    }
}
