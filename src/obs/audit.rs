//! The audit log: one JSON line per call, to its own file.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::SystemTime;

/// One JSON line per call, to its own file (never the debug log): UTC time, caller, peer,
/// method, model, sizes, status, latency. Nothing of the volume, no patient identifiers.
pub struct AuditLog {
    out: Mutex<BufWriter<File>>,
}

/// What the audit log records of a call.
#[derive(Debug, serde::Serialize)]
pub struct AuditRecord<'a> {
    pub time: String,
    pub caller: &'a str,
    pub peer: Option<String>,
    pub method: &'a str,
    pub model: &'a str,
    pub input_bytes: u64,
    pub output_bytes: u64,
    pub status: &'a str,
    pub latency_ms: f64,
}

impl AuditLog {
    pub fn open(path: &Path) -> Result<Self, String> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("--audit-log {}: {e}", path.display()))?;
        Ok(Self {
            out: Mutex::new(BufWriter::new(f)),
        })
    }

    /// Appends one line and flushes it (an audit trail must survive a crash).
    pub fn write(&self, r: &AuditRecord<'_>) {
        let Ok(line) = serde_json::to_string(r) else {
            return;
        };
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

/// The current time as RFC 3339 UTC with milliseconds.
pub fn now_utc() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// Audit lines grouped by status, for tests: `{status: count}`.
pub fn audit_summary(text: &str) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for line in text.lines() {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
            if let Some(s) = v["status"].as_str() {
                *m.entry(s.to_string()).or_default() += 1;
            }
        }
    }
    m
}
