//! Observability: Prometheus metrics, logs and OTLP traces, the audit log, and the one
//! record of a finished call that feeds all three.

pub mod audit;
pub mod calls;
pub mod metrics;
pub mod telemetry;
