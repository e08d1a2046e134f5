//! Conv3D numerics: PyTorch layout, f32, stride / zero padding / dilation per axis, bias and a
//! fused activation.
//!
//! Pure numerics: std, ndarray-free slices and the `gemm` crate; nothing async, no tracing.
//!
//! * [`shape`]: output geometry with checked arithmetic.
//! * [`reference`]: direct loops with f64 accumulation, the oracle.
//! * [`im2col`]: 3-D im2col of one output tile into a reusable buffer.
//! * [`plan`]: [`Conv3dPlan`], validated once, names its [`Strategy`], runs tile by tile on a
//!   caller-chosen number of threads and hands finished output slabs over in order.

mod activation;
pub mod avx2;
pub mod avx512;
pub mod buffer;
pub mod im2col;
pub mod maxpool;
pub mod ops;
pub mod par;
pub mod plan;
pub mod reference;
pub mod shape;
mod subpixel;
pub mod transpose;
pub mod winograd;
pub mod workloads;

pub use plan::{
    Conv3dPlan, Filters, GemmImpl, OwnedSlab, PackedFilters, Slab, StageTimes, Strategy, Tiling,
};
pub use reference::conv3d_reference;
pub use shape::{Conv3dParams, Conv3dShape};
pub use workloads::{default_threads, seeded, Workload, WorkloadFile};

/// Every way a Conv3D request can be wrong, as data (never a panic).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum KernelError {
    #[error("stride along {axis} must be at least 1, got 0")]
    ZeroStride { axis: &'static str },
    #[error("dilation along {axis} must be at least 1, got 0")]
    ZeroDilation { axis: &'static str },
    #[error(
        "kernel along {axis} spans {effective} voxels (dilation included) but the padded input \
         has only {padded}"
    )]
    KernelTooLarge {
        axis: &'static str,
        effective: usize,
        padded: usize,
    },
    #[error("filters expect C_in = {filters} input channels, input has {input}")]
    ChannelMismatch { input: usize, filters: usize },
    #[error("{tensor} dimension {dim} must be at least 1, got 0")]
    EmptyDimension {
        tensor: &'static str,
        dim: &'static str,
    },
    #[error("{what} overflow the address space")]
    Overflow { what: &'static str },
    #[error("{what} buffer holds {got} values, expected {expected}")]
    BufferLength {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("thread count must be at least 1, got 0")]
    ZeroThreads,
    /// A strategy or GEMM was forced that this shape or CPU cannot run: an error, never a
    /// silent fallback, so a benchmark never measures another path than the one it asked for.
    #[error("cannot use {what}: {reason}")]
    Unsupported { what: String, reason: String },
    /// An input that does not fit a model's graph (a shape a node cannot take), named by
    /// the node.
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
    #[error("cancelled")]
    Cancelled,
}

pub use activation::{Activation, ChannelAct};

/// `BufferLength` unless a buffer `what` holds exactly `expected` values.
pub fn check_len(what: &'static str, expected: usize, got: usize) -> Result<(), KernelError> {
    if expected == got {
        Ok(())
    } else {
        Err(KernelError::BufferLength {
            what,
            expected,
            got,
        })
    }
}

/// Checks that the buffers have exactly the lengths the shape implies.
pub fn check_buffers(
    shape: &Conv3dShape,
    input: &[f32],
    filters: &[f32],
    bias: Option<&[f32]>,
) -> Result<(), KernelError> {
    let check = check_len;
    check("input", shape.input_len(), input.len())?;
    check("filters", shape.filters_len(), filters.len())?;
    if let Some(b) = bias {
        check("bias", shape.c_out(), b.len())?;
    }
    Ok(())
}

/// One-call convenience: plans, allocates the output and runs the fast path.
pub fn conv3d(
    shape: &Conv3dShape,
    input: &[f32],
    filters: &[f32],
    bias: Option<&[f32]>,
    activation: Activation,
    threads: usize,
) -> Result<Vec<f32>, KernelError> {
    let plan = Conv3dPlan::new(*shape, activation);
    let mut out = vec![0f32; shape.output_len()];
    plan.run_into(input, filters, bias, &mut out, threads, None)?;
    Ok(out)
}
