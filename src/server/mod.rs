//! Builds and runs the server: services, health, reflection, connections, graceful shutdown.

pub mod conn;
pub mod front;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tonic::codec::CompressionEncoding;
use tonic_health::ServingStatus;
use tracing::{info, warn};

use crate::auth::Auth;
use crate::config::Config;
use crate::engine::Engine;
use crate::model::repo::ModelRegistry;
use crate::obs::audit::AuditLog;
use crate::obs::metrics::Metrics;
use crate::pool::{Pool, PoolStats};
use crate::proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use crate::proto::voxconv::v1::inference_server::InferenceServer;
use crate::service::kserve::KserveService;
use crate::service::InferenceService;
use crate::wire::{HTTP2_CONNECTION_WINDOW, HTTP2_MAX_FRAME, HTTP2_STREAM_WINDOW};
use front::FrontLayer;

/// The gRPC service name of our API (health reports it by this name too).
pub const SERVICE_NAME: &str = "voxconv.v1.Inference";

/// Sets the overall status ("") and our service's together.
async fn set_health(health: &tonic_health::server::HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    health.set_service_status(SERVICE_NAME, status).await;
}

/// Health per model, as service `model/<name>`: SERVING when loaded, NOT_SERVING when its
/// load failed with no earlier version serving, or when it was removed.
async fn sync_model_health(
    models: &ModelRegistry,
    health: &tonic_health::server::HealthReporter,
    known: &mut std::collections::BTreeSet<String>,
) {
    let set = models.snapshot();
    let mut now = std::collections::BTreeSet::new();
    for m in set.iter() {
        health
            .set_service_status(format!("model/{}", m.name), ServingStatus::Serving)
            .await;
        now.insert(m.name.clone());
    }
    for (name, _) in set.broken() {
        if set.get(name).is_none() {
            health
                .set_service_status(format!("model/{name}"), ServingStatus::NotServing)
                .await;
        }
    }
    for gone in known.difference(&now) {
        if set.error(gone).is_none() {
            health
                .set_service_status(format!("model/{gone}"), ServingStatus::NotServing)
                .await;
        }
    }
    *known = now;
}

/// Keeps per-model health in step with reloads.
fn spawn_model_health(
    models: Arc<ModelRegistry>,
    health: tonic_health::server::HealthReporter,
    mut known: std::collections::BTreeSet<String>,
) {
    let mut changes = models.subscribe();
    tokio::spawn(async move {
        while changes.changed().await.is_ok() {
            sync_model_health(&models, &health, &mut known).await;
        }
    });
}

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What the server shares with its embedder (tests, metrics).
#[derive(Clone)]
pub struct ServerState {
    pub stats: Arc<PoolStats>,
    pub metrics: Arc<Metrics>,
    /// Where `/metrics` is served, when a metrics listener was given.
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// Starts the pool, calls `on_ready` with the server's state, then serves on `listener`
/// (and Prometheus `/metrics` on `metrics_listener`, when given) until `shutdown` resolves;
/// then health turns NOT_SERVING, new calls are refused and in-flight calls get
/// `config.shutdown_grace` to finish. The one way the server is started (`voxconv serve`
/// and the tests, which bind `127.0.0.1:0`).
pub async fn run(
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    config: Config,
    models: Arc<ModelRegistry>,
    shutdown: impl Future<Output = ()> + Send,
    on_ready: impl FnOnce(ServerState),
) -> std::io::Result<()> {
    // Idle model arenas (buffers kept between requests) are capped like calls in flight.
    crate::model::graph::set_idle_arena_limit(
        usize::try_from(config.memory_budget).unwrap_or(usize::MAX),
    );
    let pool = Arc::new(Pool::new(
        config.workers,
        config.queue_len,
        config.memory_budget,
        config.threads_per_job,
    ));
    let metrics = Arc::new(Metrics::new(
        pool.stats(),
        config.workers,
        config.queue_len,
        pool.budget_bytes(),
    ));
    let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
    // Dropped (and so stopped) when this function returns.
    let _metrics_task = metrics_listener.map(|l| {
        let m = Arc::clone(&metrics);
        AbortOnDrop(tokio::spawn(async move {
            if let Err(e) = crate::obs::metrics::serve(l, m).await {
                warn!(error = %e, "metrics listener failed");
            }
        }))
    });
    let state = ServerState {
        stats: pool.stats(),
        metrics: Arc::clone(&metrics),
        metrics_addr,
    };
    let audit = match &config.audit_log {
        Some(p) => match AuditLog::open(p) {
            Ok(a) => Some(Arc::new(a)),
            Err(e) => {
                // Checked at validation; a file that vanished since is not worth a crash.
                warn!(error = %e, "audit log unavailable");
                None
            }
        },
        None => None,
    };
    let config = Arc::new(config);
    let engine = Arc::new(Engine::new(
        Arc::clone(&models),
        pool,
        Arc::clone(&config),
        Arc::clone(&metrics),
        audit.clone(),
    ));
    let service = InferenceService::new(Arc::clone(&engine));

    let (health, health_service) = tonic_health::server::health_reporter();
    // Not serving until everything below is built.
    set_health(&health, ServingStatus::NotServing).await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .expect("our descriptor sets are valid");
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .expect("our descriptor sets are valid");
    let kserve = GrpcInferenceServiceServer::new(KserveService::new(engine))
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes)
        .accept_compressed(CompressionEncoding::Gzip);
    let inference = InferenceServer::new(service)
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes)
        .accept_compressed(CompressionEncoding::Gzip);

    let draining = Arc::new(tokio::sync::Notify::new());
    let signal = {
        let health = health.clone();
        let draining = Arc::clone(&draining);
        async move {
            shutdown.await;
            info!("shutting down: refusing new calls, draining in-flight ones");
            set_health(&health, ServingStatus::NotServing).await;
            draining.notify_one();
        }
    };
    let addr = listener.local_addr().ok();
    let limits = &config.limits;
    let tls = match &config.tls {
        None => None,
        Some(tls) => Some(conn::TlsServe {
            acceptor: tokio_rustls::TlsAcceptor::from(
                tls.server_config()
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?,
            ),
            handshake_timeout: tls.handshake_timeout,
        }),
    };
    let auth = Arc::new(Auth {
        tokens: config.auth_tokens.clone(),
    });
    let routes = tonic::service::Routes::new(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(inference)
        .add_service(kserve)
        .prepare();
    let service =
        tower_layer::Layer::layer(&FrontLayer::new(auth, audit, Arc::clone(&metrics)), routes);
    let serve = conn::serve(
        listener,
        conn::Serve {
            limits: conn::ConnLimits {
                max: limits.max_connections,
                per_ip: limits.max_connections_per_ip,
                preface_timeout: limits.http2_preface_timeout,
                idle_timeout: limits.idle_connection_timeout,
                max_age: limits.max_connection_age,
                age_grace: limits.max_connection_age_grace,
                shutdown_grace: config.shutdown_grace,
            },
            tls,
            http2: conn::Http2Settings {
                max_concurrent_streams: limits.max_concurrent_streams,
                keepalive_interval: limits.http2_keepalive_interval,
                keepalive_timeout: limits.http2_keepalive_timeout,
                max_pending_resets: limits.max_pending_resets,
                max_header_list_size: 8 * 1024,
                stream_window: HTTP2_STREAM_WINDOW,
                connection_window: HTTP2_CONNECTION_WINDOW,
                max_frame: HTTP2_MAX_FRAME,
            }
            .builder(),
            service,
        },
        signal,
    );

    let mut known = std::collections::BTreeSet::new();
    sync_model_health(&models, &health, &mut known).await;
    spawn_model_health(Arc::clone(&models), health.clone(), known);
    set_health(&health, ServingStatus::Serving).await;
    info!(
        ?addr,
        ?metrics_addr,
        workers = config.workers,
        threads_per_job = config.threads_per_job,
        "serving"
    );
    on_ready(state);

    let grace = config.shutdown_grace;
    tokio::select! {
        () = serve => Ok(()),
        _ = async { draining.notified().await; tokio::time::sleep(grace).await } => {
            warn!(grace_s = grace.as_secs_f64(), "grace period over; closing the remaining calls");
            Ok(())
        }
    }
}
