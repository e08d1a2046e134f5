//! voxconv: 3-D convolution (Conv3D) on medical volumes, served over gRPC.
//!
//! The modules sit on layers, each importing only from the layers below it (enforced by
//! `tests/architecture.rs`); `docs/ARCHITECTURE.md` has the map, one line per module, and
//! the path of a streamed call through them. From the bottom up:
//!
//! * [`kernel`]: the numerics, the crate `crates/voxconv-kernel`.
//! * [`proto`], [`tensor`]: generated protocol code; dtypes, `.npy` and NIfTI.
//! * [`error`], [`wire`]: every way a call fails, as data; the vocabulary both sides of the
//!   protocol share (dtype and status names, tensor names, HTTP/2 sizes, deadlines).
//! * [`model`], [`pool`]: models and their plans; workers, memory budget, queue.
//! * [`shm`], [`obs`], [`auth`]: shared memory; metrics, telemetry, audit; tokens.
//! * [`config`]: the validated configuration.
//! * [`engine`]: the transport-free core of a call.
//! * [`service`]: thin tonic handlers (voxconv.v1, KServe v2); errors → statuses.
//! * [`server`], [`client`]: the server builder and front layer; the client library.
//! * [`cli`]: the `voxconv` subcommands.
//!
//! No `unsafe` here but the one mapping of sealed shared memory (`shm::map`); the kernel
//! crate holds the rest, each block with a `// SAFETY:` comment.
#![deny(unsafe_code)]

pub mod auth;
pub mod cli;
pub mod client;
pub mod config;
pub mod engine;
pub mod error;
/// The numerics, a crate of their own (`crates/voxconv-kernel`).
pub use voxconv_kernel as kernel;
pub mod model;
pub mod obs;
pub mod pool;
pub mod proto;
pub mod server;
pub mod service;
pub mod shm;
pub mod tensor;
pub mod wire;
