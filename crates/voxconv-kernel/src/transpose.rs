//! ConvTranspose3d (PyTorch layout, f32, groups = 1), computed with the crate's fast
//! convolution ([`Conv3dPlan`]) rather than a GEMM of its own.
//!
//! * [`ConvTranspose3dShape`]: output geometry with checked arithmetic. Per axis
//!   `o = (x − 1)·s − pad_begin − pad_end + dil·(k − 1) + output_padding + 1`, padding given
//!   per side as in ONNX (`pads_begin`, `pads_end`): PyTorch's symmetric `padding = p` is
//!   `pads_begin = pads_end = p`.
//! * [`ConvTranspose3dPlan`]: planned once per (shape, filters); the filters are rearranged
//!   at construction, never per call. Three strategies ([`TransposeStrategy`]):
//!   - `PatchGemm` (stride = kernel, no padding, dilation 1: U-Net upsampling): the kernel
//!     taps never overlap, so one pointwise convolution with filters
//!     `[C_out·kD·kH·kW, C_in, 1, 1, 1]` computes every tap of every input voxel, streamed
//!     slab by slab ([`Conv3dPlan::run_slabs`]) and scattered into the output, each input
//!     voxel writing its `kD×kH×kW` block, bias and activation applied in the scatter.
//!     Output-padding voxels (which no tap reaches) get `activation(bias)`.
//!   - `Col2im` (the default for every other shape): the same pointwise GEMM, streamed the
//!     same way, then a col2im scatter-*add* of each slab into the output: tap `(a, b, c)` of
//!     input voxel `(d, h, w)` adds to output voxel
//!     `(d·sD − padD + a·dilD, h·sH − padH + b·dilH, w·sW − padW + c·dilW)`, dropped where
//!     that falls outside the (cropped) output. The valid input range of every tap is
//!     precomputed per axis, so the scatter is branch-free loops adding strided rows of `W`
//!     input voxels into output rows. Output planes are zeroed just before the first slab
//!     that can reach them, and get bias and activation as soon as no later slab can reach
//!     them (so the output is walked about once, near the slab that fills it).
//!   - `General`: the equivalent direct convolution of the input with `stride − 1` zeros
//!     inserted between voxels, padded by `dil·(k − 1) − pad_begin` before and
//!     `dil·(k − 1) − pad_end + output_padding` after (a negative amount crops), with the
//!     filters flipped in the three spatial axes and transposed to `[C_out, C_in, k…]`,
//!     dilation kept, bias and activation fused by the [`Conv3dPlan`]. The symmetric part
//!     of that padding is left to the convolution; only the rest (and the zero insertion) is
//!     staged into a workspace, one batch item at a time. With stride 1 and symmetric
//!     padding nothing is staged. Never chosen by default (with stride > 1 it multiplies
//!     the inserted zeros too), but it can be forced
//!     ([`ConvTranspose3dPlan::with_strategy`]) to compare.
//!   - `SubPixel` (dilation 1, only when forced): the output split by its residue modulo
//!     the stride into phases, each a stride-1 convolution of the input with the taps that
//!     reach it, interleaved into the output ([`crate::subpixel`]).
//! * [`conv_transpose3d_reference`]: the definition, scattered in f64, the oracle.
//!
//! Results are bit-identical across thread counts: the convolution is, the staging is
//! sequential, the patch scatter (each output value written once) is split by output
//! channel, and the col2im
//! scatter of a slab (run in lockstep with the GEMM, each using every thread in turn) is
//! split over threads by (output channel, range of output planes), each value's additions
//! in the order one thread makes them.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::shape::AXES;
use crate::{
    check_len, Activation, Conv3dParams, Conv3dPlan, Conv3dShape, KernelError, PackedFilters,
    Tiling,
};

/// Stride, padding (begin/end per axis, as ONNX pads), output padding and dilation per
/// spatial axis `[d, h, w]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvTranspose3dParams {
    pub stride: [usize; 3],
    pub pads_begin: [usize; 3],
    pub pads_end: [usize; 3],
    pub output_padding: [usize; 3],
    pub dilation: [usize; 3],
}

impl Default for ConvTranspose3dParams {
    /// Stride 1, no padding, no output padding, dilation 1.
    fn default() -> Self {
        Self {
            stride: [1; 3],
            pads_begin: [0; 3],
            pads_end: [0; 3],
            output_padding: [0; 3],
            dilation: [1; 3],
        }
    }
}

/// A validated ConvTranspose3d problem: input `[N, C_in, D, H, W]`, filters
/// `[C_in, C_out, kD, kH, kW]` (PyTorch's ConvTranspose3d layout, groups = 1), output
/// `[N, C_out, oD, oH, oW]`. Every buffer size derived from it fits in `usize` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvTranspose3dShape {
    pub input: [usize; 5],
    pub filters: [usize; 5],
    pub params: ConvTranspose3dParams,
    pub output: [usize; 5],
}

/// One output extent, `(x − 1)·s − pad_begin − pad_end + dil·(k − 1) + output_padding + 1`,
/// with checked arithmetic and PyTorch's rule on the output padding.
#[allow(clippy::too_many_arguments)]
pub fn transpose_output_dim(
    axis: usize,
    x: usize,
    k: usize,
    stride: usize,
    pad_begin: usize,
    pad_end: usize,
    output_padding: usize,
    dil: usize,
) -> Result<usize, KernelError> {
    let name = AXES[axis];
    if stride == 0 {
        return Err(KernelError::ZeroStride { axis: name });
    }
    if dil == 0 {
        return Err(KernelError::ZeroDilation { axis: name });
    }
    if output_padding >= stride && output_padding >= dil {
        return Err(KernelError::Unsupported {
            what: format!("output_padding {output_padding} along {name}"),
            reason: format!(
                "output padding must be smaller than either the stride ({stride}) or the \
                 dilation ({dil})"
            ),
        });
    }
    let overflow = || KernelError::Overflow {
        what: "transposed convolution output extent",
    };
    // The full extent before cropping: (x − 1)·s + dil·(k − 1) + 1 + output_padding.
    let full = x
        .checked_sub(1)
        .and_then(|x1| x1.checked_mul(stride))
        .and_then(|v| {
            k.checked_sub(1)
                .and_then(|k1| k1.checked_mul(dil))
                .and_then(|e| v.checked_add(e))
        })
        .and_then(|v| v.checked_add(1))
        .and_then(|v| v.checked_add(output_padding))
        .ok_or_else(overflow)?;
    let pads = pad_begin.checked_add(pad_end).ok_or_else(overflow)?;
    if pads >= full {
        return Err(KernelError::Unsupported {
            what: format!("padding {pad_begin}+{pad_end} along {name}"),
            reason: format!(
                "it crops the whole {full}-voxel transposed output, leaving no output voxel"
            ),
        });
    }
    Ok(full - pads)
}

fn fits_bytes(dims: &[usize], what: &'static str) -> Result<usize, KernelError> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|n| n.checked_mul(4).is_some())
        .ok_or(KernelError::Overflow { what })
}

impl ConvTranspose3dShape {
    /// Validates an input shape, a filter shape (`[C_in, C_out, kD, kH, kW]`) and parameters,
    /// and derives the output shape. Every error is a [`KernelError`]: `EmptyDimension`,
    /// `ChannelMismatch`, `ZeroStride`, `ZeroDilation`, `Overflow`, and `Unsupported` for an
    /// output padding not smaller than the stride or the dilation, or padding that leaves no
    /// output.
    pub fn new(
        input: [usize; 5],
        filters: [usize; 5],
        params: ConvTranspose3dParams,
    ) -> Result<Self, KernelError> {
        const IN: [&str; 5] = ["N", "C_in", "D", "H", "W"];
        const FI: [&str; 5] = ["C_in", "C_out", "kD", "kH", "kW"];
        for (i, &d) in input.iter().enumerate() {
            if d == 0 {
                return Err(KernelError::EmptyDimension {
                    tensor: "input",
                    dim: IN[i],
                });
            }
        }
        for (i, &d) in filters.iter().enumerate() {
            if d == 0 {
                return Err(KernelError::EmptyDimension {
                    tensor: "filters",
                    dim: FI[i],
                });
            }
        }
        if input[1] != filters[0] {
            return Err(KernelError::ChannelMismatch {
                input: input[1],
                filters: filters[0],
            });
        }
        let mut out_sp = [0usize; 3];
        for (a, o) in out_sp.iter_mut().enumerate() {
            *o = transpose_output_dim(
                a,
                input[2 + a],
                filters[2 + a],
                params.stride[a],
                params.pads_begin[a],
                params.pads_end[a],
                params.output_padding[a],
                params.dilation[a],
            )?;
        }
        let output = [input[0], filters[1], out_sp[0], out_sp[1], out_sp[2]];
        fits_bytes(&input, "input elements")?;
        fits_bytes(&filters, "filter elements")?;
        fits_bytes(&output, "output elements")?;
        Ok(Self {
            input,
            filters,
            params,
            output,
        })
    }

    pub fn batch(&self) -> usize {
        self.input[0]
    }
    pub fn c_in(&self) -> usize {
        self.input[1]
    }
    pub fn c_out(&self) -> usize {
        self.filters[1]
    }
    /// Input spatial dims `[D, H, W]`.
    pub fn in_dims(&self) -> [usize; 3] {
        [self.input[2], self.input[3], self.input[4]]
    }
    /// Kernel extents `[kD, kH, kW]`.
    pub fn kernel_dims(&self) -> [usize; 3] {
        [self.filters[2], self.filters[3], self.filters[4]]
    }
    /// Output spatial dims `[oD, oH, oW]`.
    pub fn out_dims(&self) -> [usize; 3] {
        [self.output[2], self.output[3], self.output[4]]
    }
    /// Voxels of one input channel.
    pub fn in_voxels(&self) -> usize {
        self.input[2] * self.input[3] * self.input[4]
    }
    /// Voxels of one output channel.
    pub fn out_voxels(&self) -> usize {
        self.output[2] * self.output[3] * self.output[4]
    }
    /// Taps of one filter, `kD·kH·kW`.
    pub fn kernel_taps(&self) -> usize {
        self.filters[2] * self.filters[3] * self.filters[4]
    }
    pub fn input_len(&self) -> usize {
        self.input.iter().product()
    }
    pub fn filters_len(&self) -> usize {
        self.filters.iter().product()
    }
    pub fn output_len(&self) -> usize {
        self.output.iter().product()
    }
    /// `2·N·C_in·D·H·W·C_out·kD·kH·kW` as f64: the multiply-adds of the definition (taps that
    /// land in the cropped padding included; the zeros the general strategy inserts not).
    pub fn flops(&self) -> f64 {
        2.0 * self.input_len() as f64 * self.c_out() as f64 * self.kernel_taps() as f64
    }
}

/// How a plan computes a transposed convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TransposeStrategy {
    /// Stride = kernel, no padding, dilation 1 (the U-Net upsampling case; any valid output
    /// padding): one pointwise GEMM `[C_out·k³ × C_in] · [C_in × voxels]`, then a scatter of
    /// non-overlapping blocks; no col2im.
    PatchGemm,
    /// Any shape (the default for all but the patch case): the same pointwise GEMM, then a
    /// col2im scatter-add of the overlapping, strided, dilated and cropped taps.
    Col2im,
    /// Any shape, only when forced: the equivalent direct convolution of the zero-inserted,
    /// padded input with the flipped filters.
    General,
    /// Dilation 1, only when forced: the output split by its residue modulo the stride into
    /// up to `sD·sH·sW` phases, each an ordinary stride-1 convolution of the input with a
    /// sub-filter (the taps that reach it), interleaved into the output
    /// ([`crate::subpixel`]): the same multiplies, no scatter-add.
    SubPixel,
}

impl TransposeStrategy {
    /// Every strategy, for tests and benchmarks.
    pub const ALL: [TransposeStrategy; 4] = [
        TransposeStrategy::PatchGemm,
        TransposeStrategy::Col2im,
        TransposeStrategy::General,
        TransposeStrategy::SubPixel,
    ];

    pub fn name(self) -> &'static str {
        match self {
            TransposeStrategy::PatchGemm => "transpose-patch-gemm",
            TransposeStrategy::Col2im => "transpose-col2im",
            TransposeStrategy::General => "transpose-general",
            TransposeStrategy::SubPixel => "transpose-subpixel",
        }
    }

    /// The strategy a plan uses for `shape`: `PatchGemm` where it applies, else `Col2im`.
    /// (`SubPixel` is not a default: on the MONAI UNet up-convolutions at 96³ its small
    /// phase convolutions ran at 0.3-1.1× col2im's speed, slowest with 3 output channels.)
    pub fn for_shape(shape: &ConvTranspose3dShape) -> Self {
        if TransposeStrategy::PatchGemm.supports(shape) {
            TransposeStrategy::PatchGemm
        } else {
            TransposeStrategy::Col2im
        }
    }

    /// Whether this strategy can run `shape`: `Col2im` and `General` run any shape,
    /// `PatchGemm` only stride = kernel with no padding and dilation 1, `SubPixel` dilation 1
    /// where some output is reached by a tap.
    pub fn supports(self, shape: &ConvTranspose3dShape) -> bool {
        self.unsupported_reason(shape).is_none()
    }

    fn unsupported_reason(self, shape: &ConvTranspose3dShape) -> Option<String> {
        let p = &shape.params;
        match self {
            TransposeStrategy::PatchGemm
                if p.stride != shape.kernel_dims()
                    || p.pads_begin != [0; 3]
                    || p.pads_end != [0; 3]
                    || p.dilation != [1; 3] =>
            {
                Some(format!(
                    "needs stride = kernel, no padding and dilation 1; this shape has stride \
                     {:?}, kernel {:?}, pads {:?}/{:?}, dilation {:?}",
                    p.stride,
                    shape.kernel_dims(),
                    p.pads_begin,
                    p.pads_end,
                    p.dilation
                ))
            }
            TransposeStrategy::SubPixel if p.dilation != [1; 3] => Some(format!(
                "needs dilation 1; this shape has dilation {:?}",
                p.dilation
            )),
            TransposeStrategy::SubPixel if !Self::some_tap_lands(shape) => {
                Some("no output voxel is reached by a tap (every output is the bias)".to_string())
            }
            _ => None,
        }
    }

    /// Whether along every axis some output residue (modulo the stride) is reached by a tap.
    fn some_tap_lands(shape: &ConvTranspose3dShape) -> bool {
        let p = &shape.params;
        (0..3).all(|a| {
            (0..p.stride[a]).any(|r| {
                crate::subpixel::phase_axis(
                    shape.in_dims()[a],
                    shape.kernel_dims()[a],
                    p.stride[a],
                    p.pads_begin[a],
                    shape.out_dims()[a],
                    r,
                )
                .is_some_and(|x| x.taps > 0)
            })
        })
    }
}

/// Where the general strategy puts input voxel `i` along one axis of its staging buffer:
/// `i·stride + offset`, kept when inside `0..extent`.
#[derive(Clone, Copy, Debug)]
struct StageAxis {
    stride: usize,
    offset: isize,
    extent: usize,
}

impl StageAxis {
    /// The input indices that land inside the buffer, and the buffer position of the first.
    fn kept(&self, x: usize) -> Option<(std::ops::Range<usize>, usize)> {
        let s = self.stride as isize;
        // First i with i·s + offset >= 0.
        let lo = if self.offset >= 0 {
            0
        } else {
            ((-self.offset) + s - 1) / s
        } as usize;
        // Last i with i·s + offset < extent.
        let top = self.extent as isize - 1 - self.offset;
        if top < 0 {
            return None;
        }
        let hi = ((top / s) as usize + 1).min(x);
        (lo < hi).then(|| (lo..hi, (lo as isize * s + self.offset) as usize))
    }
}

/// The input voxels along one axis whose tap lands inside the output: `inputs`, the first
/// of which lands at output index `first` (the next ones `stride` apart).
#[derive(Clone, Debug, PartialEq, Eq)]
struct TapSpan {
    inputs: std::ops::Range<usize>,
    first: usize,
}

/// Per axis, per tap: where the tap's contributions land (`None`: nowhere, all cropped).
type TapSpans = [Vec<Option<TapSpan>>; 3];

#[derive(Clone, Debug)]
enum Inner {
    Patch {
        /// Pointwise convolution `[N, C_in, D, H, W] → [N, C_out·kD·kH·kW, D, H, W]`, no bias,
        /// no activation.
        conv: Conv3dPlan,
        /// `[C_out·kD·kH·kW, C_in]`: row `((co·kD + a)·kH + b)·kW + c` is tap `(a, b, c)` of
        /// output channel `co`.
        filters: Vec<f32>,
    },
    Col2im {
        /// The same pointwise convolution as `Patch`.
        conv: Conv3dPlan,
        /// As `Patch`.
        filters: Vec<f32>,
        /// Where each tap lands, per axis.
        spans: TapSpans,
    },
    General {
        /// Direct convolution, bias and activation fused; on one batch item when staging.
        conv: Conv3dPlan,
        /// `[C_out, C_in, kD, kH, kW]`, flipped in the three spatial axes.
        filters: Vec<f32>,
        /// The zero-insertion / padding / cropping of the input, per axis; `None` where the
        /// convolution reads the input as it is (stride 1, symmetric padding).
        stage: Option<[StageAxis; 3]>,
    },
    Phases {
        /// Every phase, with its convolution and packed sub-filters.
        sub: crate::subpixel::SubPixel,
        /// The filters as given (`[C_in, C_out, kD, kH, kW]`).
        filters: Vec<f32>,
    },
}

/// A validated ConvTranspose3d with its filters rearranged for its strategy.
#[derive(Clone, Debug)]
pub struct ConvTranspose3dPlan {
    shape: ConvTranspose3dShape,
    activation: Activation,
    /// `C_out` values (zeros without a bias).
    bias: Vec<f32>,
    has_bias: bool,
    /// Set by [`with_min_flops_per_thread`](ConvTranspose3dPlan::with_min_flops_per_thread),
    /// kept across [`with_strategy`](ConvTranspose3dPlan::with_strategy).
    min_flops_per_thread: Option<f64>,
    /// Set by [`with_tiling`](ConvTranspose3dPlan::with_tiling), kept likewise.
    tiling: Option<Tiling>,
    inner: Inner,
    /// The inner convolution's filters packed for its strategy and GEMM, once per plan
    /// (`SubPixel`'s phases hold their own: `None`).
    packed: Option<PackedFilters>,
}

/// Scatter-adds per extra col2im thread of a slab (below that, one thread does it all).
const COL2IM_MIN_ADDS_PER_THREAD: usize = 1 << 17;

/// Adds `src` into every `stride`-th value of `dst`, from `dst[0]` (`dst` holds at least
/// `(src.len() − 1)·stride + 1` values).
#[inline]
fn add_strided(dst: &mut [f32], src: &[f32], stride: usize) {
    if stride == 1 {
        dst.iter_mut().zip(src).for_each(|(d, &v)| *d += v);
    } else {
        dst.iter_mut()
            .step_by(stride)
            .zip(src)
            .for_each(|(d, &v)| *d += v);
    }
}

impl ConvTranspose3dPlan {
    /// Plans `shape` with `filters` (`[C_in, C_out, kD, kH, kW]`) and an optional bias
    /// (`C_out` values): checks their lengths, picks the strategy
    /// ([`TransposeStrategy::for_shape`]) and rearranges the filters for it.
    pub fn new(
        shape: ConvTranspose3dShape,
        filters: &[f32],
        bias: Option<&[f32]>,
        activation: Activation,
    ) -> Result<Self, KernelError> {
        check_len("filters", shape.filters_len(), filters.len())?;
        if let Some(b) = bias {
            check_len("bias", shape.c_out(), b.len())?;
        }
        activation.check(shape.c_out())?;
        let strategy = TransposeStrategy::for_shape(&shape);
        let inner = Self::plan_inner(&shape, filters, &activation, strategy)?;
        let packed = Self::pack(&inner)?;
        Ok(Self {
            shape,
            activation,
            bias: bias.map_or_else(|| vec![0.0; shape.c_out()], <[f32]>::to_vec),
            has_bias: bias.is_some(),
            min_flops_per_thread: None,
            tiling: None,
            inner,
            packed,
        })
    }

    /// Re-plans with another strategy (tests and benchmarks compare them), the filters
    /// rearranged anew. One that cannot run this shape (`PatchGemm` outside stride = kernel,
    /// no padding, dilation 1) is an error ([`KernelError::Unsupported`]), never a silent
    /// fallback.
    pub fn with_strategy(self, strategy: TransposeStrategy) -> Result<Self, KernelError> {
        if let Some(reason) = strategy.unsupported_reason(&self.shape) {
            return Err(KernelError::Unsupported {
                what: format!("strategy {}", strategy.name()),
                reason,
            });
        }
        if strategy == self.strategy() {
            return Ok(self);
        }
        let filters = self.original_filters();
        let inner = Self::plan_inner(&self.shape, &filters, &self.activation, strategy)?;
        let packed = Self::pack(&inner)?;
        let mut plan = Self {
            inner,
            packed,
            ..self
        };
        if let Some(flops) = plan.min_flops_per_thread {
            plan = plan.with_min_flops_per_thread(flops);
        }
        if let Some(tiling) = plan.tiling {
            plan = plan.with_tiling(tiling);
        }
        Ok(plan)
    }

    /// The inner convolution's filters packed for it (`SubPixel`'s phases hold their own).
    fn pack(inner: &Inner) -> Result<Option<PackedFilters>, KernelError> {
        match inner {
            Inner::Patch { conv, filters }
            | Inner::Col2im { conv, filters, .. }
            | Inner::General { conv, filters, .. } => conv.pack_filters(filters).map(Some),
            Inner::Phases { .. } => Ok(None),
        }
    }

    /// The packed filters of the single inner convolution (a bug if missing).
    fn packed(&self) -> Result<&PackedFilters, KernelError> {
        self.packed.as_ref().ok_or_else(|| KernelError::Invalid {
            what: "transposed convolution plan".into(),
            reason: format!("{} has no packed filters", self.strategy().name()),
        })
    }

    fn plan_inner(
        shape: &ConvTranspose3dShape,
        filters: &[f32],
        activation: &Activation,
        strategy: TransposeStrategy,
    ) -> Result<Inner, KernelError> {
        Ok(match strategy {
            TransposeStrategy::PatchGemm => {
                let (conv, filters) = Self::plan_pointwise(shape, filters)?;
                Inner::Patch { conv, filters }
            }
            TransposeStrategy::Col2im => {
                let (conv, filters) = Self::plan_pointwise(shape, filters)?;
                let spans = Self::tap_spans(shape)?;
                Inner::Col2im {
                    conv,
                    filters,
                    spans,
                }
            }
            TransposeStrategy::General => Self::plan_general(shape, filters, activation.clone())?,
            TransposeStrategy::SubPixel => Inner::Phases {
                sub: crate::subpixel::SubPixel::new(shape, filters, activation.clone())?,
                filters: filters.to_vec(),
            },
        })
    }

    /// The pointwise convolution `[N, C_in, D, H, W] → [N, C_out·kD·kH·kW, D, H, W]` and its
    /// filters `[C_out·kD·kH·kW, C_in]`.
    fn plan_pointwise(
        shape: &ConvTranspose3dShape,
        filters: &[f32],
    ) -> Result<(Conv3dPlan, Vec<f32>), KernelError> {
        let [c_in, c_out, ..] = shape.filters;
        let rows = c_out
            .checked_mul(shape.kernel_taps())
            .ok_or(KernelError::Overflow {
                what: "patch GEMM rows",
            })?;
        let conv_shape =
            Conv3dShape::new(shape.input, [rows, c_in, 1, 1, 1], Conv3dParams::default())?;
        // W[ci][co][tap] → P[co·taps + tap][ci].
        let mut packed = vec![0f32; filters.len()];
        for ci in 0..c_in {
            for r in 0..rows {
                packed[r * c_in + ci] = filters[ci * rows + r];
            }
        }
        Ok((Conv3dPlan::new(conv_shape, Activation::None), packed))
    }

    /// Per axis and tap `t`: the input indices `i` with `i·s − pad_begin + t·dil` inside the
    /// output, and where the first lands.
    fn tap_spans(shape: &ConvTranspose3dShape) -> Result<TapSpans, KernelError> {
        let p = &shape.params;
        let overflow = || KernelError::Overflow {
            what: "col2im tap offsets",
        };
        let to_i = |v: usize| isize::try_from(v).map_err(|_| overflow());
        let mut spans: TapSpans = Default::default();
        for (a, axis_spans) in spans.iter_mut().enumerate() {
            let x = shape.in_dims()[a];
            let s = p.stride[a];
            // Every i·s + t·dil below must fit an isize.
            let reach = (x - 1)
                .checked_mul(s)
                .and_then(|v| v.checked_add(p.dilation[a] * (shape.kernel_dims()[a] - 1)))
                .ok_or_else(overflow)?;
            to_i(reach)?;
            to_i(s)?;
            let pad = to_i(p.pads_begin[a])?;
            for t in 0..shape.kernel_dims()[a] {
                let axis = StageAxis {
                    stride: s,
                    offset: to_i(t * p.dilation[a])? - pad,
                    extent: shape.out_dims()[a],
                };
                axis_spans.push(
                    axis.kept(x)
                        .map(|(inputs, first)| TapSpan { inputs, first }),
                );
            }
        }
        Ok(spans)
    }

    /// The filters as given to [`new`](Self::new) (`[C_in, C_out, kD, kH, kW]`), recovered
    /// from their rearrangement.
    fn original_filters(&self) -> Vec<f32> {
        let [c_in, c_out, kd, kh, kw] = self.shape.filters;
        let taps = kd * kh * kw;
        let mut original = vec![0f32; self.shape.filters_len()];
        match &self.inner {
            Inner::Patch { filters, .. } | Inner::Col2im { filters, .. } => {
                let rows = c_out * taps;
                for ci in 0..c_in {
                    for r in 0..rows {
                        original[ci * rows + r] = filters[r * c_in + ci];
                    }
                }
            }
            Inner::General { filters, .. } => {
                for ci in 0..c_in {
                    for co in 0..c_out {
                        let src = &filters[(co * c_in + ci) * taps..][..taps];
                        let dst = &mut original[(ci * c_out + co) * taps..][..taps];
                        for (t, v) in dst.iter_mut().enumerate() {
                            *v = src[taps - 1 - t];
                        }
                    }
                }
            }
            Inner::Phases { filters, .. } => original.copy_from_slice(filters),
        }
        original
    }

    fn plan_general(
        shape: &ConvTranspose3dShape,
        filters: &[f32],
        activation: Activation,
    ) -> Result<Inner, KernelError> {
        let [c_in, c_out, kd, kh, kw] = shape.filters;
        let p = &shape.params;
        let overflow = KernelError::Overflow {
            what: "zero-inserted input of the transposed convolution",
        };
        let to_i = |v: usize| isize::try_from(v).map_err(|_| overflow.clone());
        let mut padding = [0usize; 3];
        let mut axes = [StageAxis {
            stride: 1,
            offset: 0,
            extent: 0,
        }; 3];
        let mut staged = false;
        for a in 0..3 {
            let x = shape.in_dims()[a];
            let s = p.stride[a];
            // dil·(k − 1) fits: the shape's output extent contains it.
            let reach = to_i(p.dilation[a] * (shape.kernel_dims()[a] - 1))?;
            let left = reach - to_i(p.pads_begin[a])?;
            let right = reach - to_i(p.pads_end[a])? + to_i(p.output_padding[a])?;
            // The symmetric part is the convolution's own zero padding.
            let sym = left.min(right).max(0);
            let (l, r) = (left - sym, right - sym);
            // (x − 1)·s + 1 + l + r: the padded extent minus 2·sym, at least 1 since the
            // output is not empty.
            let inserted = to_i(x - 1)?
                .checked_mul(to_i(s)?)
                .and_then(|v| v.checked_add(1))
                .ok_or_else(|| overflow.clone())?;
            let extent = inserted
                .checked_add(l)
                .and_then(|v| v.checked_add(r))
                .filter(|&e| e >= 1)
                .ok_or_else(|| overflow.clone())?;
            padding[a] = sym as usize;
            axes[a] = StageAxis {
                stride: s,
                offset: l,
                extent: extent as usize,
            };
            staged |= s != 1 || l != 0 || r != 0;
        }
        let conv_params = Conv3dParams {
            stride: [1; 3],
            padding,
            dilation: p.dilation,
        };
        let conv_input = if staged {
            [1, c_in, axes[0].extent, axes[1].extent, axes[2].extent]
        } else {
            shape.input
        };
        let conv_shape = Conv3dShape::new(conv_input, [c_out, c_in, kd, kh, kw], conv_params)?;
        debug_assert_eq!(conv_shape.out_dims(), shape.out_dims());
        // W[ci][co][a][b][c] → F[co][ci][kd−1−a][kh−1−b][kw−1−c].
        let taps = kd * kh * kw;
        let mut flipped = vec![0f32; filters.len()];
        for ci in 0..c_in {
            for co in 0..c_out {
                let src = &filters[(ci * c_out + co) * taps..][..taps];
                let dst = &mut flipped[(co * c_in + ci) * taps..][..taps];
                for a in 0..kd {
                    for b in 0..kh {
                        for c in 0..kw {
                            dst[((kd - 1 - a) * kh + (kh - 1 - b)) * kw + (kw - 1 - c)] =
                                src[(a * kh + b) * kw + c];
                        }
                    }
                }
            }
        }
        Ok(Inner::General {
            conv: Conv3dPlan::new(conv_shape, activation),
            filters: flipped,
            stage: staged.then_some(axes),
        })
    }

    /// Sets the work per extra thread of the inner convolution (`0` uses every thread
    /// offered; tests use it to drive the parallel scheduler on small shapes).
    pub fn with_min_flops_per_thread(mut self, flops: f64) -> Self {
        self.min_flops_per_thread = Some(flops);
        for conv in self.convs_mut() {
            *conv = conv.clone().with_min_flops_per_thread(flops);
        }
        self
    }

    /// Overrides the inner convolution's tiling (clamped to its shape), for tests and
    /// tuning: a small `slab_depth` makes `PatchGemm` and `Col2im` stream several slabs per
    /// batch item on small shapes.
    pub fn with_tiling(mut self, tiling: Tiling) -> Self {
        self.tiling = Some(tiling);
        for conv in self.convs_mut() {
            *conv = conv.clone().with_tiling(tiling);
        }
        self
    }

    /// Every inner convolution (one, or one per `SubPixel` phase with taps).
    fn convs_mut(&mut self) -> Vec<&mut Conv3dPlan> {
        match &mut self.inner {
            Inner::Patch { conv, .. }
            | Inner::Col2im { conv, .. }
            | Inner::General { conv, .. } => vec![conv],
            Inner::Phases { sub, .. } => sub.convs_mut().collect(),
        }
    }
    pub fn shape(&self) -> &ConvTranspose3dShape {
        &self.shape
    }

    pub fn strategy(&self) -> TransposeStrategy {
        match self.inner {
            Inner::Patch { .. } => TransposeStrategy::PatchGemm,
            Inner::Col2im { .. } => TransposeStrategy::Col2im,
            Inner::General { .. } => TransposeStrategy::General,
            Inner::Phases { .. } => TransposeStrategy::SubPixel,
        }
    }

    pub fn activation(&self) -> &Activation {
        &self.activation
    }

    /// The convolution that does the multiplies (its strategy, GEMM and stage times); for
    /// `SubPixel`, the phase convolution with the most taps.
    pub fn conv_plan(&self) -> &Conv3dPlan {
        match &self.inner {
            Inner::Patch { conv, .. }
            | Inner::Col2im { conv, .. }
            | Inner::General { conv, .. } => conv,
            Inner::Phases { sub, .. } => sub.first_conv(),
        }
    }

    /// Bytes of the staging buffer of the general strategy (one batch item of the
    /// zero-inserted, padded input), 0 when the input is read as it is.
    pub fn staging_bytes(&self) -> usize {
        match &self.inner {
            Inner::General {
                stage: Some(axes), ..
            } => self.shape.c_in() * axes.iter().map(|a| a.extent).product::<usize>() * 4,
            _ => 0,
        }
    }

    /// Extra memory [`run_into`](Self::run_into) allocates besides input and output, in
    /// bytes, for `threads` threads: `PatchGemm` and `Col2im`, the inner convolution's slab
    /// ring (at most 3 slabs of `C_out·k³` channels, about 8 MiB each, whatever the volume)
    /// and scratch (`Col2im` scatters straight into the output, nothing more); `General`,
    /// the staging buffer ([`staging_bytes`](Self::staging_bytes)) and the convolution's
    /// scratch. The packed filters belong to the plan ([`packed_bytes`](Self::packed_bytes)),
    /// not to a run.
    pub fn workspace_bytes(&self, threads: usize) -> usize {
        let threads = threads.max(1);
        let conv = self.conv_plan();
        match &self.inner {
            Inner::Patch { .. } | Inner::Col2im { .. } => conv.streaming_workspace_bytes(threads),
            Inner::General { .. } => self.staging_bytes() + conv.workspace_bytes(threads),
            Inner::Phases { sub, .. } => {
                sub.scratch_len() * 4
                    + sub
                        .phases
                        .iter()
                        .filter_map(|p| p.conv.as_ref())
                        .map(|(c, _)| c.workspace_bytes(threads))
                        .max()
                        .unwrap_or(0)
            }
        }
    }

    /// Bytes of the filters packed for the inner convolution, held by the plan.
    pub fn packed_bytes(&self) -> usize {
        match &self.inner {
            Inner::Phases { sub, .. } => sub.packed_bytes(),
            _ => self.packed.as_ref().map_or(0, PackedFilters::bytes),
        }
    }

    /// Runs the transposed convolution of `input` (`[N, C_in, D, H, W]`) into `output`
    /// (`[N, C_out, oD, oH, oW]`, fully overwritten: it may hold anything, NaN included) on
    /// `threads` threads. Returns `Cancelled` if `cancel` is set before the end (`output`
    /// is then partly written).
    pub fn run_into(
        &self,
        input: &[f32],
        output: &mut [f32],
        threads: usize,
        cancel: Option<&AtomicBool>,
    ) -> Result<(), KernelError> {
        if threads == 0 {
            return Err(KernelError::ZeroThreads);
        }
        check_len("input", self.shape.input_len(), input.len())?;
        check_len("output", self.shape.output_len(), output.len())?;
        let cancelled = || cancel.is_some_and(|c| c.load(Ordering::Relaxed));
        if cancelled() {
            return Err(KernelError::Cancelled);
        }
        match &self.inner {
            Inner::Patch { conv, .. }
                if self.shape.batch() == 1
                    && conv.shape().output_len() * 4 <= conv.slab_bytes() =>
            {
                // The whole GEMM output fits one slab (deep, small volumes): computed in one
                // call on every thread, the calling one included, then scattered; the
                // streaming path's extra delivering thread made 2 threads 2.5x slower than 1
                // here (320 -> 320 channels over 4³).
                let mut buf = crate::buffer::scratch_take(conv.shape().output_len());
                conv.run_into(input, self.packed()?, None, &mut buf, threads, cancel)?;
                let slab = crate::Slab {
                    batch: 0,
                    depth: 0..self.shape.in_dims()[0],
                    data: &buf,
                };
                self.scatter_patches(&slab, output, threads);
                crate::buffer::scratch_give(buf);
                self.fill_output_padding(output);
                Ok(())
            }
            Inner::Patch { conv, .. } => {
                // In lockstep, the scatter split over output channels: GEMM and scatter
                // each use every thread in turn.
                conv.run_slabs_lockstep(
                    input,
                    self.packed()?,
                    None,
                    threads,
                    cancel,
                    &mut |slab| {
                        self.scatter_patches(&slab, output, threads);
                        ControlFlow::Continue(())
                    },
                )?;
                self.fill_output_padding(output);
                Ok(())
            }
            Inner::Col2im { conv, spans, .. } => {
                // Per batch item: output planes zeroed so far, and planes finished (bias,
                // activation) so far; both only grow, slab by slab.
                let n_b = self.shape.batch();
                let mut zeroed = vec![0usize; n_b];
                let mut finished = vec![0usize; n_b];
                // In lockstep: the GEMM of a slab and its scatter each get every thread in
                // turn (overlapped, they oversubscribed the cores: 2 threads were slower
                // than 1 on the MONAI UNet up-convolutions).
                conv.run_slabs_lockstep(
                    input,
                    self.packed()?,
                    None,
                    threads,
                    cancel,
                    &mut |slab| {
                        let n = slab.batch;
                        let (reach, done) = self.col2im_planes(&slab.depth);
                        // Planes between the taps (stride > dilated kernel) are reached by no
                        // slab: zero them too before they are finished.
                        let reach = reach.max(done);
                        let zero = zeroed[n]..reach.max(zeroed[n]);
                        let finish = finished[n]..done.max(finished[n]);
                        self.col2im_deliver(&slab, spans, output, zero, finish, threads);
                        zeroed[n] = zeroed[n].max(reach);
                        finished[n] = finished[n].max(done);
                        ControlFlow::Continue(())
                    },
                )?;
                // Nothing is left in practice (the last slab of an item finishes it all),
                // but make sure.
                let od = self.shape.out_dims()[0];
                for n in 0..n_b {
                    self.for_planes(output, n, zeroed[n]..od, |rows, _| rows.fill(0.0));
                    self.finish_planes(output, n, finished[n]..od);
                }
                Ok(())
            }
            Inner::General {
                conv, stage: None, ..
            } => conv.run_into(input, self.packed()?, self.bias(), output, threads, cancel),
            Inner::General {
                conv,
                stage: Some(axes),
                ..
            } => {
                let in_item = self.shape.c_in() * self.shape.in_voxels();
                let out_item = self.shape.c_out() * self.shape.out_voxels();
                let mut staging = vec![0f32; conv.shape().input_len()];
                for n in 0..self.shape.batch() {
                    if cancelled() {
                        return Err(KernelError::Cancelled);
                    }
                    self.stage(&input[n * in_item..][..in_item], axes, &mut staging);
                    conv.run_into(
                        &staging,
                        self.packed()?,
                        self.bias(),
                        &mut output[n * out_item..][..out_item],
                        threads,
                        cancel,
                    )?;
                }
                Ok(())
            }
            Inner::Phases { sub, .. } => sub.run(
                &self.shape,
                input,
                output,
                self.bias(),
                &self.bias,
                &self.activation,
                threads,
                cancel,
            ),
        }
    }

    fn bias(&self) -> Option<&[f32]> {
        self.has_bias.then_some(&self.bias[..])
    }

    /// Copies one batch item into the staging buffer (zero-inserted, padded, cropped). The
    /// positions written depend only on the geometry, so the zeros between them stay zero
    /// from one item to the next.
    fn stage(&self, item: &[f32], axes: &[StageAxis; 3], staging: &mut [f32]) {
        let [d, h, w] = self.shape.in_dims();
        let [ed, eh, ew] = [axes[0].extent, axes[1].extent, axes[2].extent];
        let (Some((zr, z0)), Some((yr, y0)), Some((xr, x0))) =
            (axes[0].kept(d), axes[1].kept(h), axes[2].kept(w))
        else {
            return;
        };
        let [sd, sh, sw] = [axes[0].stride, axes[1].stride, axes[2].stride];
        for ci in 0..self.shape.c_in() {
            let src_c = &item[ci * d * h * w..][..d * h * w];
            let dst_c = &mut staging[ci * ed * eh * ew..][..ed * eh * ew];
            for (iz, z) in zr.clone().enumerate() {
                let pz = z0 + iz * sd;
                for (iy, y) in yr.clone().enumerate() {
                    let py = y0 + iy * sh;
                    let src = &src_c[(z * h + y) * w..][..w];
                    let dst = &mut dst_c[(pz * eh + py) * ew..][..ew];
                    if sw == 1 {
                        dst[x0..x0 + xr.len()].copy_from_slice(&src[xr.clone()]);
                    } else {
                        for (ix, x) in xr.clone().enumerate() {
                            dst[x0 + ix * sw] = src[x];
                        }
                    }
                }
            }
        }
    }

    /// Scatters one slab of the pointwise convolution (`[C_out·k³, planes, H, W]` of input
    /// depth planes `slab.depth`) into its output blocks, adding the bias and applying the
    /// activation.
    fn scatter_patches(&self, slab: &crate::Slab<'_>, output: &mut [f32], threads: usize) {
        let [_, c_out, od, oh, ow] = self.shape.output;
        let [_, h, w] = self.shape.in_dims();
        let [kd, kh, kw] = self.shape.kernel_dims();
        let planes = slab.depth.len();
        let chan = planes * h * w;
        let vox = od * oh * ow;
        let out_n = &mut output[slab.batch * c_out * vox..][..c_out * vox];
        let row_len = w * kw;
        // One output channel: its own part of the output, written by its own taps only.
        let channel = |co: usize, out_c: &mut [f32]| {
            let bias = self.bias[co];
            let act = self.activation.channel(co);
            for a in 0..kd {
                for b in 0..kh {
                    // Channels (co, a, b, c) for c in 0..kW, consecutive.
                    let base = ((co * kd + a) * kh + b) * kw;
                    for (pz, z) in slab.depth.clone().enumerate() {
                        for y in 0..h {
                            let oz = z * kd + a;
                            let oy = y * kh + b;
                            let dst = &mut out_c[(oz * oh + oy) * ow..][..row_len];
                            let src =
                                |c: usize| &slab.data[(base + c) * chan + (pz * h + y) * w..][..w];
                            match kw {
                                1 => dst.copy_from_slice(src(0)),
                                // The U-Net case: both taps interleaved in one pass over the
                                // row (two strided passes took as long as the GEMM).
                                2 => {
                                    for ((d, &u), &v) in
                                        dst.chunks_exact_mut(2).zip(src(0)).zip(src(1))
                                    {
                                        d[0] = u;
                                        d[1] = v;
                                    }
                                }
                                _ => {
                                    for (x, d) in dst.chunks_exact_mut(kw).enumerate() {
                                        for (c, v) in d.iter_mut().enumerate() {
                                            *v = src(c)[x];
                                        }
                                    }
                                }
                            }
                            act.bias_apply(dst, bias);
                        }
                    }
                }
            }
        };
        // Values written per extra thread: at least COL2IM_MIN_ADDS_PER_THREAD.
        let groups = threads
            .min(slab.data.len() / COL2IM_MIN_ADDS_PER_THREAD)
            .max(1);
        crate::par::par_blocks(out_n, vox, groups, |first, out| {
            for (j, out_c) in out.chunks_mut(vox).enumerate() {
                channel(first + j, out_c);
            }
        });
    }

    /// For a slab of input depth planes `depth`: the output planes it can reach end before
    /// the first value (so everything below must be zeroed before its scatter), and the
    /// output planes no later slab can reach end before the second (they are final after
    /// its scatter).
    fn col2im_planes(&self, depth: &std::ops::Range<usize>) -> (usize, usize) {
        let p = &self.shape.params;
        let [od, ..] = self.shape.out_dims();
        let (s, pad) = (p.stride[0], p.pads_begin[0]);
        let span = p.dilation[0] * (self.shape.kernel_dims()[0] - 1);
        // Highest plane reached: (end − 1)·s + span − pad (fits: see `tap_spans`).
        let reach = ((depth.end - 1) * s + span + 1).saturating_sub(pad).min(od);
        let done = if depth.end == self.shape.in_dims()[0] {
            od
        } else {
            // The lowest plane a later input plane (>= end) reaches: end·s − pad.
            (depth.end * s).saturating_sub(pad).min(od)
        };
        (reach, done)
    }

    /// Calls `f(rows, co)` on output planes `planes` of channel `co` of batch item `n`
    /// (contiguous), for every channel.
    fn for_planes(
        &self,
        output: &mut [f32],
        n: usize,
        planes: std::ops::Range<usize>,
        mut f: impl FnMut(&mut [f32], usize),
    ) {
        if planes.is_empty() {
            return;
        }
        let [_, c_out, od, oh, ow] = self.shape.output;
        let plane = oh * ow;
        for co in 0..c_out {
            let out_c = &mut output[(n * c_out + co) * od * plane..][..od * plane];
            f(&mut out_c[planes.start * plane..planes.end * plane], co);
        }
    }

    /// Bias and activation on finished output planes of the col2im strategy.
    fn finish_planes(&self, output: &mut [f32], n: usize, planes: std::ops::Range<usize>) {
        if !self.has_bias && self.activation.is_none() {
            return;
        }
        self.for_planes(output, n, planes, |rows, co| {
            self.activation.channel(co).bias_apply(rows, self.bias[co]);
        });
    }

    /// One slab of the col2im strategy: per output channel, zeroes the planes `zero`,
    /// scatter-adds the slab, then applies bias and activation to the planes `finish`. Work
    /// items (a channel and a range of its output planes) write disjoint parts of the output,
    /// so with `threads > 1` and enough work they are split into contiguous groups run on
    /// scoped threads; each output value gets its additions in the same order as on one
    /// thread: the same bits.
    fn col2im_deliver(
        &self,
        slab: &crate::Slab<'_>,
        spans: &TapSpans,
        output: &mut [f32],
        zero: std::ops::Range<usize>,
        finish: std::ops::Range<usize>,
        threads: usize,
    ) {
        let [_, c_out, od, oh, ow] = self.shape.output;
        let plane = oh * ow;
        let vox = od * plane;
        let out_n = &mut output[slab.batch * c_out * vox..][..c_out * vox];
        // Adds per channel: taps × the slab's input voxels.
        let work = self.shape.kernel_taps()
            * slab.depth.len()
            * self.shape.in_dims()[1..].iter().product::<usize>();
        let threads = threads
            .min((c_out * work) / COL2IM_MIN_ADDS_PER_THREAD)
            .max(1);
        // Work items: (channel, range of output planes), so that few channels still split
        // evenly (3 output channels on 2 threads: 6 items, not 2 + 1 channels).
        let ranges = if threads > 1 {
            (2 * threads).div_ceil(c_out).min(od).max(1)
        } else {
            1
        };
        let per_range = od.div_ceil(ranges);
        let mut items: Vec<(usize, std::ops::Range<usize>, &mut [f32])> = Vec::new();
        for (co, mut out_c) in out_n.chunks_mut(vox).enumerate() {
            let mut z = 0;
            while z < od {
                let z1 = (z + per_range).min(od);
                let (head, tail) = std::mem::take(&mut out_c).split_at_mut((z1 - z) * plane);
                items.push((co, z..z1, head));
                out_c = tail;
                z = z1;
            }
        }
        let clip = |r: &std::ops::Range<usize>, p: &std::ops::Range<usize>| {
            let (a, b) = (r.start.max(p.start), r.end.min(p.end));
            (a < b).then(|| (a - p.start) * plane..(b - p.start) * plane)
        };
        let run = |(co, planes, out): (usize, std::ops::Range<usize>, &mut [f32])| {
            if let Some(r) = clip(&zero, &planes) {
                out[r].fill(0.0);
            }
            self.col2im_channel(slab, spans, out, co, &planes);
            if self.has_bias || !self.activation.is_none() {
                if let Some(r) = clip(&finish, &planes) {
                    self.activation
                        .channel(co)
                        .bias_apply(&mut out[r], self.bias[co]);
                }
            }
        };
        let blocks = threads.min(items.len()).max(1);
        if blocks <= 1 {
            items.into_iter().for_each(run);
            return;
        }
        let per = items.len().div_ceil(blocks);
        let mut groups: Vec<Vec<_>> = Vec::new();
        let mut it = items.into_iter().peekable();
        while it.peek().is_some() {
            groups.push(it.by_ref().take(per).collect());
        }
        std::thread::scope(|scope| {
            let mut groups = groups.into_iter();
            let first = groups.next();
            for g in groups {
                let run = &run;
                scope.spawn(move || g.into_iter().for_each(run));
            }
            if let Some(g) = first {
                g.into_iter().for_each(&run);
            }
        });
    }

    /// Adds one slab of the pointwise convolution (`[C_out·k³, planes, H, W]` of input depth
    /// planes `slab.depth`) into the output planes `planes` of channel `co` (`out_c`, those
    /// planes of `[oD, oH, oW]`; additions to other planes are skipped): for taps `(a, b)`, each
    /// input row `(d, h)` adds, for every tap `c`, its span of `W` values into output row
    /// `(d·sD − padD + a·dilD, h·sH − padH + b·dilH)`, `sW` apart from
    /// `spans[2][c].first`. The order of the additions depends only on the shape.
    fn col2im_channel(
        &self,
        slab: &crate::Slab<'_>,
        spans: &TapSpans,
        out_c: &mut [f32],
        co: usize,
        planes: &std::ops::Range<usize>,
    ) {
        let [_, _, _, oh, ow] = self.shape.output;
        let [_, h, w] = self.shape.in_dims();
        let [kd, kh, kw] = self.shape.kernel_dims();
        let [sd, sh, sw] = self.shape.params.stride;
        let depth = &slab.depth;
        let plane_in = h * w;
        let chan = depth.len() * plane_in;
        let plane_out = oh * ow;
        for (a, tz) in spans[0].iter().enumerate() {
            let Some(tz) = tz else { continue };
            // The tap's input planes within this slab.
            let z0 = tz.inputs.start.max(depth.start);
            let z1 = tz.inputs.end.min(depth.end);
            if z0 >= z1 {
                continue;
            }
            let oz0 = tz.first + (z0 - tz.inputs.start) * sd;
            for (b, ty) in spans[1].iter().enumerate() {
                let Some(ty) = ty else { continue };
                let row0 = ((co * kd + a) * kh + b) * kw;
                let taps = &slab.data[row0 * chan..][..kw * chan];
                for (iz, z) in (z0..z1).enumerate() {
                    let oz = oz0 + iz * sd;
                    if !planes.contains(&oz) {
                        continue;
                    }
                    let out_p = &mut out_c[(oz - planes.start) * plane_out..][..plane_out];
                    let in_off = (z - depth.start) * plane_in;
                    for (iy, y) in ty.inputs.clone().enumerate() {
                        let oy = ty.first + iy * sh;
                        let dst = &mut out_p[oy * ow..][..ow];
                        let src_row = in_off + y * w;
                        for (c, tx) in spans[2].iter().enumerate() {
                            let Some(tx) = tx else { continue };
                            let src = &taps[c * chan + src_row..][..w];
                            add_strided(&mut dst[tx.first..], &src[tx.inputs.clone()], sw);
                        }
                    }
                }
            }
        }
    }

    /// Output-padding voxels of the patch strategy (past `D·kD`, `H·kH` or `W·kW`), which no
    /// tap reaches: `activation(bias)`.
    fn fill_output_padding(&self, output: &mut [f32]) {
        let [n_b, c_out, od, oh, ow] = self.shape.output;
        let [d, h, w] = self.shape.in_dims();
        let [kd, kh, kw] = self.shape.kernel_dims();
        let (cd, ch, cw) = (d * kd, h * kh, w * kw);
        if (cd, ch, cw) == (od, oh, ow) {
            return;
        }
        for n in 0..n_b {
            for co in 0..c_out {
                let value = self.activation.channel(co).apply(self.bias[co]);
                let out_c = &mut output[(n * c_out + co) * od * oh * ow..][..od * oh * ow];
                for z in 0..od {
                    for y in 0..oh {
                        let row = &mut out_c[(z * oh + y) * ow..][..ow];
                        let from = if z < cd && y < ch { cw } else { 0 };
                        row[from..].fill(value);
                    }
                }
            }
        }
    }
}

/// One-call convenience: plans, allocates the output and runs.
pub fn conv_transpose3d(
    shape: &ConvTranspose3dShape,
    input: &[f32],
    filters: &[f32],
    bias: Option<&[f32]>,
    activation: Activation,
    threads: usize,
) -> Result<Vec<f32>, KernelError> {
    let plan = ConvTranspose3dPlan::new(*shape, filters, bias, activation)?;
    let mut out = vec![0f32; shape.output_len()];
    plan.run_into(input, &mut out, threads, None)?;
    Ok(out)
}

/// The oracle: the definition, scattered with f64 accumulation. Every input voxel `i` adds
/// `x[i]·w[tap]` at output position `i·s − pad_begin + tap·dil` (dropped where that falls
/// outside the output); then bias and activation. Output `[N, C_out, oD, oH, oW]`.
///
/// # Panics
/// If a buffer's length does not match `shape` (it is for tests).
pub fn conv_transpose3d_reference(
    shape: &ConvTranspose3dShape,
    input: &[f32],
    filters: &[f32],
    bias: Option<&[f32]>,
    activation: Activation,
) -> Vec<f32> {
    assert_eq!(input.len(), shape.input_len(), "input length");
    assert_eq!(filters.len(), shape.filters_len(), "filters length");
    if let Some(b) = bias {
        assert_eq!(b.len(), shape.c_out(), "bias length");
    }
    let [n_b, c_in, d, h, w] = shape.input;
    let [_, c_out, kd, kh, kw] = shape.filters;
    let [od, oh, ow] = shape.out_dims();
    let p = &shape.params;
    // Output coordinate of input index `i`, tap `t` along axis `a`, if inside the output.
    let pos = |a: usize, i: usize, t: usize, extent: usize| -> Option<usize> {
        let o = (i * p.stride[a] + t * p.dilation[a]) as isize - p.pads_begin[a] as isize;
        (o >= 0 && (o as usize) < extent).then_some(o as usize)
    };
    let mut acc = vec![0f64; shape.output_len()];
    for n in 0..n_b {
        for ci in 0..c_in {
            for z in 0..d {
                for y in 0..h {
                    for x in 0..w {
                        let xv = f64::from(input[(((n * c_in + ci) * d + z) * h + y) * w + x]);
                        for co in 0..c_out {
                            let out_c = (n * c_out + co) * od * oh * ow;
                            for a in 0..kd {
                                let Some(oz) = pos(0, z, a, od) else { continue };
                                for b in 0..kh {
                                    let Some(oy) = pos(1, y, b, oh) else { continue };
                                    for c in 0..kw {
                                        let Some(ox) = pos(2, x, c, ow) else { continue };
                                        let wv = filters
                                            [(((ci * c_out + co) * kd + a) * kh + b) * kw + c];
                                        acc[out_c + (oz * oh + oy) * ow + ox] += xv * f64::from(wv);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    let vox = od * oh * ow;
    acc.iter()
        .enumerate()
        .map(|(i, &v)| {
            let co = (i / vox) % c_out;
            let b = bias.map_or(0.0, |b| f64::from(b[co]));
            activation.channel(co).apply_f64(v + b) as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_formula_matches_pytorch_examples() {
        // U-Net upsampling: k = s = 2 doubles.
        assert_eq!(transpose_output_dim(0, 8, 2, 2, 0, 0, 0, 1).unwrap(), 16);
        // k = 3, s = 2, p = 1, output_padding = 1 doubles too.
        assert_eq!(transpose_output_dim(0, 8, 3, 2, 1, 1, 1, 1).unwrap(), 16);
        // Stride 1, k = 3, p = 1 keeps the size.
        assert_eq!(transpose_output_dim(0, 7, 3, 1, 1, 1, 0, 1).unwrap(), 7);
        // Dilation 2: (5 − 1) + 2·2 + 1 = 9.
        assert_eq!(transpose_output_dim(0, 5, 3, 1, 0, 0, 0, 2).unwrap(), 9);
        // output_padding 1 with stride 1 is allowed when the dilation exceeds it.
        assert_eq!(transpose_output_dim(0, 5, 3, 1, 0, 0, 1, 2).unwrap(), 10);
    }

    #[test]
    fn tap_spans_of_the_monai_case() {
        // x = 6, k = 3, s = 2, pad 1 (+ 1 end), output padding 1: 12 outputs. Tap t of input
        // i lands at 2·i − 1 + t.
        let params = ConvTranspose3dParams {
            stride: [2; 3],
            pads_begin: [1; 3],
            pads_end: [1; 3],
            output_padding: [1; 3],
            dilation: [1; 3],
        };
        let shape = ConvTranspose3dShape::new([1, 1, 6, 6, 6], [1, 1, 3, 3, 3], params).unwrap();
        let spans = ConvTranspose3dPlan::tap_spans(&shape).unwrap();
        let span = |inputs, first| Some(TapSpan { inputs, first });
        assert_eq!(spans[0], vec![span(1..6, 1), span(0..6, 0), span(0..6, 1)]);
        // Crops: pad 3 before, 5 outputs; dilation 2: tap t of input i lands at 2·i − 3 + 2·t.
        let params = ConvTranspose3dParams {
            stride: [2, 1, 1],
            pads_begin: [3, 0, 0],
            pads_end: [3, 0, 0],
            output_padding: [0; 3],
            dilation: [2, 1, 1],
        };
        let shape = ConvTranspose3dShape::new([1, 1, 4, 1, 1], [1, 1, 3, 1, 1], params).unwrap();
        assert_eq!(shape.out_dims()[0], 5);
        let spans = ConvTranspose3dPlan::tap_spans(&shape).unwrap();
        assert_eq!(spans[0], vec![span(2..4, 1), span(1..3, 1), span(0..2, 1)]);
        let plan = ConvTranspose3dPlan::new(shape, &[1.0; 3], None, Activation::None).unwrap();
        // Input planes 0..2 reach outputs up to 2·1 − 3 + 4 = 3 (0..4); later ones start at
        // 2·2 − 3 = 1 (0..1 final).
        assert_eq!(plan.col2im_planes(&(0..2)), (4, 1));
        assert_eq!(plan.col2im_planes(&(2..4)), (5, 5));
    }

    #[test]
    fn stage_axis_keeps_the_indices_inside() {
        let ax = StageAxis {
            stride: 2,
            offset: -3,
            extent: 6,
        };
        // i·2 − 3 in 0..6: i = 2 (1), 3 (3), 4 (5).
        assert_eq!(ax.kept(10), Some((2..5, 1)));
        assert_eq!(ax.kept(3), Some((2..3, 1)));
        assert_eq!(ax.kept(2), None);
        let ax = StageAxis {
            stride: 1,
            offset: 2,
            extent: 4,
        };
        assert_eq!(ax.kept(5), Some((0..2, 2)));
    }
}
