//! The one place a finished call is recorded: the `call finished` event, the audit line and
//! the metrics. Used by the handlers and by the server's front layer for calls it answers
//! itself.

use std::time::Duration;

use tracing::info;

use super::audit::{now_utc, AuditLog, AuditRecord};
use super::metrics::{CallRecord, CallTimes, Metrics};

/// One finished call, as logged, audited and counted.
pub struct FinishedCall<'a> {
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
pub fn record_call(audit: Option<&AuditLog>, metrics: &Metrics, c: &FinishedCall<'_>) {
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
