//! The integration tests of the server, the client library and the CLI, as one test binary
//! (a module per area): one link instead of one per file. `otlp` (installs the global
//! subscriber) and `service_memory` (measures the process's peak RSS) keep their own binaries.

#[path = "../common/mod.rs"]
mod common;

mod cli;
mod clients;
mod connections;
mod kserve;
mod metrics;
mod onnx;
mod repository;
mod security;
mod service;
mod shared_memory;
mod sliding;
