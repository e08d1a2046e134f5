//! voxconv: 3-D convolution (Conv3D) on medical volumes.
//!
//! # Layout
//!
//! * [`kernel`]: pure numerics. Output geometry with checked arithmetic, the f64 reference,
//!   tiled 3-D im2col and the [`kernel::Conv3dPlan`] that runs one GEMM per tile on a
//!   caller-chosen number of threads and hands finished output slabs over in order. Imports
//!   nothing from the rest of the crate.
//! * [`tensor`]: `.npy` input and output for the command line.
//! * [`cli`]: the `voxconv` subcommands (`conv3d`, `kernel-bench`).
//!
//! The gRPC service, worker pool and model repository described in `DESIGN.md` are not built
//! yet; see the README's "Status" section.

pub mod cli;
pub mod config;
pub mod kernel;
pub mod metrics;
pub mod model;
pub mod pool;
pub mod proto;
pub mod security;
pub mod server;
pub mod service;
pub mod telemetry;
pub mod tensor;
pub mod workloads;
