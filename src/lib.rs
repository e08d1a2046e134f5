//! voxconv: 3-D convolution (Conv3D) on medical volumes.
//!
//! # Layout
//!
//! * [`kernel`]: pure numerics. Output geometry with checked arithmetic, the f64 reference,
//!   tiled 3-D im2col and the [`kernel::Conv3dPlan`] that runs one GEMM per tile on a
//!   caller-chosen number of threads and hands finished output slabs over in order. Imports
//!   nothing from the rest of the crate.
//! * [`tensor`]: `.npy` and NIfTI input and output, wire dtypes.
//! * [`model`]: models (layers, built-ins, the repository and its reload).
//! * [`pool`]: the worker pool (memory budget, bounded queue, cancellation).
//! * [`service`], [`server`]: the gRPC API (`voxconv.v1`, KServe v2), health, reflection.
//! * [`metrics`], [`telemetry`], [`security`]: Prometheus, logs + OTLP traces, TLS/tokens/audit.
//! * [`cli`]: the `voxconv` subcommands.
//!
//! See the README and `DESIGN.md` for the whole picture.

pub mod cli;
pub mod config;
/// The numerics, a crate of their own (`crates/voxconv-kernel`).
pub use voxconv_kernel as kernel;
pub mod metrics;
pub mod model;
pub mod pool;
pub mod proto;
pub mod security;
pub mod server;
pub mod service;
pub mod shm;
pub mod telemetry;
pub mod tensor;
