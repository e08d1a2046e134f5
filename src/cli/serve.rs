//! `voxconv serve`: parse and validate config, set up logging, bind, run until a signal.

use std::process::ExitCode;

use crate::config::{Config, ServeArgs};
use std::sync::Arc;

use crate::model::repo::{ModelRegistry, ReloadReport};
use crate::model::ModelSet;

/// Exit code for bad configuration (EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;

pub fn run(args: ServeArgs) -> ExitCode {
    let config = match Config::try_from(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("voxconv: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("voxconv: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let telemetry = {
        let _rt = rt.enter();
        match crate::obs::telemetry::init(
            &config.log,
            config.log_format,
            config.otlp_endpoint.as_deref(),
        ) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("voxconv: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        }
    };
    let code = rt.block_on(async move {
        let listener = match crate::server::conn::listen(config.listen) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("voxconv: --listen {}: {e}", config.listen);
                return ExitCode::FAILURE;
            }
        };
        let metrics_listener = match config.metrics_listen {
            None => None,
            Some(addr) => match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => Some(l),
                Err(e) => {
                    eprintln!("voxconv: --metrics-listen {addr}: {e}");
                    return ExitCode::FAILURE;
                }
            },
        };
        let registry = match &config.model_repository {
            None => Arc::new(ModelRegistry::fixed(ModelSet::builtin())),
            Some(dir) => match ModelRegistry::with_repository(dir.clone()) {
                Ok((reg, report)) => {
                    log_report(&report);
                    Arc::new(reg)
                }
                Err(e) => {
                    eprintln!("voxconv: --model-repository {}: {e}", dir.display());
                    return ExitCode::from(EXIT_CONFIG);
                }
            },
        };
        if config.model_repository.is_some() {
            spawn_reloader(Arc::clone(&registry), config.model_poll_interval);
        }
        let port_file = config.port_file.clone().map(|p| {
            let listen = listener.local_addr().map_or_else(|_| "?".into(), |a| a.to_string());
            (p, listen)
        });
        let served = crate::server::run(
            listener,
            metrics_listener,
            config,
            registry,
            shutdown_signal(),
            move |state| {
                if let Some((path, listen)) = port_file {
                    if let Err(e) = write_port_file(&path, &listen, state.metrics_addr) {
                        tracing::error!(path = %path.display(), error = %e, "--port-file not written");
                    }
                }
            },
        )
        .await;
        match served {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("voxconv: server failed: {e}");
                ExitCode::FAILURE
            }
        }
    });
    // Export the spans still buffered, on the runtime the exporter lives on.
    {
        let _rt = rt.enter();
        telemetry.shutdown();
    }
    code
}

/// Writes the bound addresses, whole or not at all (a temporary file renamed into place):
/// a script waiting for the file never reads half of it.
fn write_port_file(
    path: &std::path::Path,
    listen: &str,
    metrics: Option<std::net::SocketAddr>,
) -> std::io::Result<()> {
    let mut text = format!("listen={listen}\n");
    if let Some(m) = metrics {
        text.push_str(&format!("metrics={m}\n"));
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

fn log_report(r: &ReloadReport) {
    tracing::info!(
        loaded = ?r.loaded,
        unchanged = r.unchanged.len(),
        removed = ?r.removed,
        failed = r.failed.len(),
        "model repository loaded"
    );
    for (name, error) in &r.failed {
        tracing::error!(model = %name, %error, "model failed to load");
    }
}

/// Reloads the repository on SIGHUP and, if set, every `poll` interval.
fn spawn_reloader(registry: Arc<ModelRegistry>, poll: Option<std::time::Duration>) {
    tokio::spawn(async move {
        #[cfg(unix)]
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut tick = poll.map(tokio::time::interval);
        if let Some(t) = tick.as_mut() {
            t.tick().await; // the first tick is immediate
        }
        loop {
            #[cfg(unix)]
            let hup_fut = async {
                match hup.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let hup_fut = std::future::pending::<()>();
            let tick_fut = async {
                match tick.as_mut() {
                    Some(t) => {
                        t.tick().await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = hup_fut => tracing::info!("SIGHUP: reloading the model repository"),
                _ = tick_fut => {}
            }
            let r = Arc::clone(&registry);
            if let Ok(report) = tokio::task::spawn_blocking(move || r.reload()).await {
                if !report.loaded.is_empty()
                    || !report.removed.is_empty()
                    || !report.failed.is_empty()
                {
                    log_report(&report);
                }
            }
        }
    });
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
