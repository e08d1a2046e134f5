//! Server configuration: one struct, flags with `VOXCONV_*` environment equivalents, defaults
//! in one place, validated completely before anything binds.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytesize::ByteSize;
use clap::Args;
use tokio_rustls::rustls;

pub use crate::obs::telemetry::LogFormat;

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
    /// Sliding-window calls: network calls run at once over different windows, each on
    /// threads-per-job / window-lanes threads (default: threads-per-job, i.e. one thread
    /// per window: U-Nets scale better over windows than inside one). Each lane holds its
    /// own windows and network working memory; 1 is the smallest footprint.
    #[arg(long, env = "VOXCONV_WINDOW_LANES")]
    pub window_lanes: Option<usize>,
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
    /// Once serving, write the bound addresses to this file (`listen=ADDR`, and
    /// `metrics=ADDR` with --metrics-listen), so scripts can bind port 0 and read the port.
    #[arg(long, env = "VOXCONV_PORT_FILE")]
    pub port_file: Option<std::path::PathBuf>,
    /// Export traces over OTLP/gRPC to this collector (e.g. http://otel-collector:4317);
    /// off when unset. A caller's W3C `traceparent` becomes the parent of the `rpc` span.
    #[arg(long, env = "VOXCONV_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// TLS certificate chain (PEM); with --tls-key, the server speaks only TLS.
    #[arg(long, env = "VOXCONV_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "VOXCONV_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// CA (PEM) that client certificates must chain to: mutual TLS, clients without a valid
    /// certificate are refused during the handshake.
    #[arg(long, env = "VOXCONV_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<std::path::PathBuf>,
    /// Longest a TLS handshake may take before the connection is dropped.
    #[arg(long, env = "VOXCONV_TLS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub tls_handshake_timeout: Duration,
    /// Token file: one "ID SHA256-HEX" line per caller (`voxconv token-hash --id ID` makes
    /// one). Every call except health must carry `authorization: Bearer <token>`.
    #[arg(long, env = "VOXCONV_AUTH_TOKENS")]
    pub auth_tokens: Option<std::path::PathBuf>,
    /// Audit log file: one JSON line per call (time, caller, peer, method, model, sizes,
    /// status, latency), appended and flushed per line.
    #[arg(long, env = "VOXCONV_AUDIT_LOG")]
    pub audit_log: Option<std::path::PathBuf>,
    /// Same-host shared memory: clients on this host may register files of this directory
    /// (normally /dev/shm, where POSIX shm_open keys live) and have InferStream write the
    /// output there instead of over the socket. Off when unset; when set, any caller may
    /// make the server write into files of this directory that the server's user can open.
    #[arg(long, env = "VOXCONV_SHARED_MEMORY_DIR")]
    pub shared_memory_dir: Option<std::path::PathBuf>,
    /// With shared memory on: total size of the regions clients may ask the server to create
    /// (CreateSharedMemory: sealed memory the server maps, so the kernel writes the output
    /// straight into it). Allocated when created; 0 turns such regions off.
    #[arg(
        long,
        env = "VOXCONV_SHARED_MEMORY_CREATE_LIMIT",
        default_value = "1GiB"
    )]
    pub shared_memory_create_limit: ByteSize,
    /// Concurrent streams (calls) per HTTP/2 connection.
    #[arg(long, env = "VOXCONV_MAX_CONCURRENT_STREAMS", default_value_t = 32)]
    pub max_concurrent_streams: u32,
    /// Open connections at most; further ones are closed at once.
    #[arg(long, env = "VOXCONV_MAX_CONNECTIONS", default_value_t = 256)]
    pub max_connections: usize,
    /// Open connections from one peer address at most, so one client cannot take the
    /// whole --max-connections budget; further ones are closed at once (default: 64, or
    /// --max-connections when that is smaller).
    #[arg(long, env = "VOXCONV_MAX_CONNECTIONS_PER_IP")]
    pub max_connections_per_ip: Option<usize>,
    /// Time a new connection gets to send its HTTP/2 preface (plaintext: the preface and
    /// the first frame header; TLS: the start of its handshake) before it is closed.
    #[arg(long, env = "VOXCONV_HTTP2_PREFACE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub http2_preface_timeout: Duration,
    /// A connection with no open call for this long is sent GOAWAY and closed (0s: never).
    /// Clients reconnect on their next call.
    #[arg(long, env = "VOXCONV_IDLE_CONNECTION_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    pub idle_connection_timeout: Duration,
    /// HTTP/2 PING interval on idle connections (0s: off).
    #[arg(long, env = "VOXCONV_HTTP2_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub http2_keepalive_interval: Duration,
    /// Time a PING may go unanswered before the connection is closed.
    #[arg(long, env = "VOXCONV_HTTP2_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub http2_keepalive_timeout: Duration,
    /// Connections are asked to go away (GOAWAY) after this age, so silent or hoarding
    /// clients cannot hold one for ever.
    #[arg(long, env = "VOXCONV_MAX_CONNECTION_AGE", default_value = "30m", value_parser = humantime::parse_duration)]
    pub max_connection_age: Duration,
    /// After GOAWAY, time in-flight calls of an old connection get before it is closed.
    #[arg(long, env = "VOXCONV_MAX_CONNECTION_AGE_GRACE", default_value = "5m", value_parser = humantime::parse_duration)]
    pub max_connection_age_grace: Duration,
    /// Streams reset by a client but not yet accepted, per connection, before the
    /// connection is closed (HTTP/2 rapid-reset defence).
    #[arg(long, env = "VOXCONV_MAX_PENDING_RESETS", default_value_t = 20)]
    pub max_pending_resets: usize,
}

/// TLS material, read and checked during validation. The key is never printed.
#[derive(Clone)]
pub struct TlsSettings {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    pub client_ca: Option<Vec<u8>>,
    pub handshake_timeout: Duration,
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings")
            .field("cert_bytes", &self.cert.len())
            .field("key", &"<redacted>")
            .field("mutual", &self.client_ca.is_some())
            .field("handshake_timeout", &self.handshake_timeout)
            .finish()
    }
}

/// What part of the TLS material rustls refused, and why.
#[derive(Debug)]
pub enum TlsMaterialError {
    /// The certificate chain or the key.
    Identity(String),
    /// The client CA.
    ClientCa(String),
}

impl std::fmt::Display for TlsMaterialError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TlsMaterialError::Identity(why) => write!(f, "{why}"),
            TlsMaterialError::ClientCa(why) => write!(f, "client CA: {why}"),
        }
    }
}

impl std::error::Error for TlsMaterialError {}

impl TlsSettings {
    /// The rustls server configuration (ring, TLS 1.2 and 1.3, ALPN `h2`; with a client CA,
    /// client certificates are required and checked against it), or what is wrong.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsMaterialError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        use TlsMaterialError::{ClientCa, Identity};
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = CertificateDer::pem_slice_iter(&self.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Identity(format!("certificate chain: {e}")))?;
        if certs.is_empty() {
            return Err(Identity("certificate chain: no CERTIFICATE block".into()));
        }
        let key =
            PrivateKeyDer::from_pem_slice(&self.key).map_err(|e| Identity(format!("key: {e}")))?;
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| Identity(e.to_string()))?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in CertificateDer::pem_slice_iter(ca) {
                    let c = c.map_err(|e| ClientCa(e.to_string()))?;
                    roots.add(c).map_err(|e| ClientCa(e.to_string()))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .map_err(|e| ClientCa(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| Identity(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

/// HTTP/2 and connection limits.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_concurrent_streams: u32,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub http2_preface_timeout: Duration,
    /// `None`: idle connections are kept.
    pub idle_connection_timeout: Option<Duration>,
    pub http2_keepalive_interval: Option<Duration>,
    pub http2_keepalive_timeout: Duration,
    pub max_connection_age: Duration,
    pub max_connection_age_grace: Duration,
    pub max_pending_resets: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_concurrent_streams: 32,
            max_connections: 256,
            max_connections_per_ip: 64,
            http2_preface_timeout: Duration::from_secs(5),
            idle_connection_timeout: Some(Duration::from_secs(5 * 60)),
            http2_keepalive_interval: Some(Duration::from_secs(30)),
            http2_keepalive_timeout: Duration::from_secs(10),
            max_connection_age: Duration::from_secs(30 * 60),
            max_connection_age_grace: Duration::from_secs(5 * 60),
            max_pending_resets: 20,
        }
    }
}

/// Validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub workers: usize,
    pub threads_per_job: usize,
    pub window_lanes: usize,
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
    pub port_file: Option<std::path::PathBuf>,
    pub otlp_endpoint: Option<String>,
    pub tls: Option<TlsSettings>,
    pub auth_tokens: Option<std::sync::Arc<crate::auth::TokenSet>>,
    pub audit_log: Option<std::path::PathBuf>,
    pub shared_memory_dir: Option<std::path::PathBuf>,
    pub shared_memory_create_limit: u64,
    pub limits: Limits,
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
            window_lanes: 1,
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
            port_file: None,
            otlp_endpoint: None,
            tls: None,
            auth_tokens: None,
            audit_log: None,
            shared_memory_dir: None,
            shared_memory_create_limit: 1 << 30,
            limits: Limits::default(),
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
        let cores = crate::kernel::default_threads() as u64;
        let workers = bounded("workers", a.workers as u64, 1, 1024)? as usize;
        let threads_per_job = bounded(
            "threads-per-job",
            a.threads_per_job.map_or(cores, |t| t as u64),
            1,
            1024,
        )? as usize;
        let window_lanes = bounded(
            "window-lanes",
            a.window_lanes.map_or(threads_per_job as u64, |l| l as u64),
            1,
            threads_per_job as u64,
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
            window_lanes,
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
            port_file: a.port_file,
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
            tls: match (&a.tls_cert, &a.tls_key) {
                (Some(c), Some(k)) => Some(read_tls(
                    c,
                    k,
                    a.tls_client_ca.as_deref(),
                    a.tls_handshake_timeout,
                )?),
                _ => None,
            },
            auth_tokens: match &a.auth_tokens {
                Some(p) => Some(std::sync::Arc::new(
                    crate::auth::TokenSet::load(p).map_err(ConfigError)?,
                )),
                None => None,
            },
            audit_log: match a.audit_log {
                Some(p) => {
                    // Opened (created) now, so a bad path is a config error, not a runtime one.
                    crate::obs::audit::AuditLog::open(&p).map_err(ConfigError)?;
                    Some(p)
                }
                None => None,
            },
            shared_memory_dir: match a.shared_memory_dir {
                Some(p) if !p.is_dir() => {
                    return Err(ConfigError(format!(
                        "--shared-memory-dir: expected a directory, got {}",
                        p.display()
                    )))
                }
                p => p,
            },
            shared_memory_create_limit: bounded(
                "shared-memory-create-limit",
                a.shared_memory_create_limit.as_u64(),
                0,
                1 << 40,
            )?,
            limits: Limits {
                max_concurrent_streams: bounded(
                    "max-concurrent-streams",
                    u64::from(a.max_concurrent_streams),
                    1,
                    10_000,
                )? as u32,
                max_connections: bounded("max-connections", a.max_connections as u64, 1, 1_000_000)?
                    as usize,
                max_connections_per_ip: bounded(
                    "max-connections-per-ip",
                    a.max_connections_per_ip
                        .unwrap_or(a.max_connections.min(64)) as u64,
                    1,
                    a.max_connections as u64,
                )? as usize,
                http2_preface_timeout: match a.http2_preface_timeout {
                    d if d < Duration::from_millis(100) || d > Duration::from_secs(300) => {
                        return Err(ConfigError(format!(
                            "--http2-preface-timeout: expected 100ms..=5m, got {}",
                            humantime::format_duration(d)
                        )))
                    }
                    d => d,
                },
                idle_connection_timeout: match a.idle_connection_timeout {
                    d if d.is_zero() => None,
                    d if d < Duration::from_secs(1) => {
                        return Err(ConfigError(format!(
                            "--idle-connection-timeout: expected 0s (never) or at least 1s, got {}",
                            humantime::format_duration(d)
                        )))
                    }
                    d => Some(d),
                },
                http2_keepalive_interval: (!a.http2_keepalive_interval.is_zero())
                    .then_some(a.http2_keepalive_interval),
                http2_keepalive_timeout: a.http2_keepalive_timeout,
                max_connection_age: match a.max_connection_age {
                    d if d < Duration::from_secs(1) => {
                        return Err(ConfigError(format!(
                            "--max-connection-age: expected at least 1s, got {}",
                            humantime::format_duration(d)
                        )))
                    }
                    d => d,
                },
                max_connection_age_grace: a.max_connection_age_grace,
                max_pending_resets: bounded(
                    "max-pending-resets",
                    a.max_pending_resets as u64,
                    1,
                    10_000,
                )? as usize,
            },
        })
    }
}

/// Reads the TLS files and checks that rustls accepts them, naming the flag on error.
fn read_tls(
    cert: &std::path::Path,
    key: &std::path::Path,
    ca: Option<&std::path::Path>,
    handshake_timeout: Duration,
) -> Result<TlsSettings, ConfigError> {
    let read = |flag: &str, p: &std::path::Path| {
        std::fs::read(p).map_err(|e| ConfigError(format!("--{flag} {}: {e}", p.display())))
    };
    let pem = |flag: &str, p: &std::path::Path, bytes: &[u8]| {
        if bytes.windows(11).any(|w| w == b"-----BEGIN ") {
            Ok(())
        } else {
            Err(ConfigError(format!(
                "--{flag} {}: expected PEM (-----BEGIN ...), got {} bytes of something else",
                p.display(),
                bytes.len()
            )))
        }
    };
    let s = TlsSettings {
        cert: read("tls-cert", cert)?,
        key: read("tls-key", key)?,
        client_ca: ca.map(|p| read("tls-client-ca", p)).transpose()?,
        handshake_timeout,
    };
    pem("tls-cert", cert, &s.cert)?;
    pem("tls-key", key, &s.key)?;
    if let (Some(p), Some(b)) = (ca, &s.client_ca) {
        pem("tls-client-ca", p, b)?;
    }
    s.server_config().map_err(|e| match (e, ca) {
        (TlsMaterialError::ClientCa(why), Some(p)) => ConfigError(format!(
            "--tls-client-ca {}: not a usable CA certificate: {why}",
            p.display()
        )),
        (e, _) => ConfigError(format!(
            "--tls-cert/--tls-key: {} and {} are not a usable certificate and key: {e}",
            cert.display(),
            key.display()
        )),
    })?;
    Ok(s)
}
