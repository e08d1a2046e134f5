//! `Conv3dPlan`: a validated problem, its strategy and its tiling, computed once.
//!
//! Work unit: a *tile* is a run of `tile_cols` consecutive output voxels (flattened
//! `(od, oh, ow)`) of one batch item, for all output channels. A *slab* is a range of output
//! depth planes of one batch item; tiles never cross a slab. Tiles and slabs depend only on
//! the shape, never on the thread count, and each tile is computed by one thread with a
//! single-threaded GEMM, so every output value is summed in the same order whatever the
//! number of threads: results are bit-identical across thread counts.
//!
//! Per tile (strategy `Im2colGemm`): for each chunk of `k_chunk` reduction rows, im2col the
//! chunk into the thread's buffer (sized to stay in L2) and accumulate one GEMM
//! `W[:, chunk] · cols` straight into the destination; then the epilogue adds the bias and
//! applies the activation while the tile is still in cache.
//!
//! Layout: this file holds the plan itself (constructor, builders, accessors, sizes);
//! `strategy` the strategies, GEMMs and tiling and which of them a shape can run; `tile` the
//! work of one tile; `run` the public entry points; `schedule` the slab/tile decomposition
//! and the multi-threaded scheduler.

mod packed;
mod run;
mod schedule;
mod strategy;
mod sublattice;
mod tile;

pub use packed::{Filters, PackedFilters};
pub use run::{OwnedSlab, Slab};
pub use strategy::{GemmImpl, Strategy, Tiling};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::buffer::LineBuf;
use crate::{avx512, winograd, Activation, Conv3dShape, KernelError};
use schedule::MIN_FLOPS_PER_THREAD;
use strategy::COL_ROW_PAD;

/// A validated Conv3D with its strategy and tiling.
#[derive(Clone, Debug)]
pub struct Conv3dPlan {
    shape: Conv3dShape,
    activation: Activation,
    strategy: Strategy,
    gemm: GemmImpl,
    tiling: Tiling,
    min_flops_per_thread: f64,
    /// Time spent per stage, summed over threads and runs of this plan (and its clones).
    clock: Arc<StageClock>,
    /// `Strategy::Sublattice`'s undilated plan of the sub-lattices (sharing `clock`).
    inner: Option<Arc<Conv3dPlan>>,
}

/// Nanoseconds per stage, summed over every thread.
#[derive(Debug, Default)]
struct StageClock {
    im2col: AtomicU64,
    gemm: AtomicU64,
    epilogue: AtomicU64,
}

/// Thread time per stage: building columns (im2col, or Winograd's input transform), the
/// multiplies (GEMM, direct microkernel), and the epilogue (bias/activation, Winograd's
/// output transform). Summed over threads, so it can exceed wall time.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StageTimes {
    pub im2col: Duration,
    pub gemm: Duration,
    pub epilogue: Duration,
}

impl Conv3dPlan {
    /// Plans a validated shape: the cheapest strategy this CPU supports, default tiling.
    pub fn new(shape: Conv3dShape, activation: Activation) -> Self {
        let gemm = GemmImpl::best_available();
        let mut plan = Self {
            shape,
            activation,
            strategy: Strategy::Im2colGemm,
            gemm,
            tiling: Tiling::for_shape(&shape),
            min_flops_per_thread: MIN_FLOPS_PER_THREAD,
            clock: Arc::default(),
            inner: None,
        };
        plan.strategy = plan.default_strategy();
        plan.tiling = plan.default_tiling();
        plan.attach_inner();
        plan
    }

    /// Builds `Strategy::Sublattice`'s undilated plan (same activation, GEMM, thread rule
    /// and stage clock), or drops it for any other strategy.
    fn attach_inner(&mut self) {
        self.inner = None;
        if self.strategy != Strategy::Sublattice {
            return;
        }
        let inner = sublattice::inner_shape(&self.shape).and_then(|s| {
            let mut p = Conv3dPlan::new(s, self.activation.clone())
                .with_gemm(self.gemm)
                .ok()?;
            p.min_flops_per_thread = self.min_flops_per_thread;
            p.clock = self.clock.clone();
            Some(p)
        });
        match inner {
            Some(p) => self.inner = Some(Arc::new(p)),
            // Unreachable: `supports(Sublattice)` means the undilated shape is valid.
            None => {
                self.strategy = Strategy::Im2colGemm;
                self.tiling = self.default_tiling();
            }
        }
    }

    /// Thread time per stage of every run of this plan so far (clones share it).
    pub fn stage_times(&self) -> StageTimes {
        let d = |a: &AtomicU64| Duration::from_nanos(a.load(Ordering::Relaxed));
        StageTimes {
            im2col: d(&self.clock.im2col),
            gemm: d(&self.clock.gemm),
            epilogue: d(&self.clock.epilogue),
        }
    }

    /// Sets the work per extra thread (`0` uses every thread offered; tests use it to drive
    /// the parallel scheduler on small shapes).
    pub fn with_min_flops_per_thread(mut self, flops: f64) -> Self {
        self.min_flops_per_thread = flops;
        if let Some(inner) = &mut self.inner {
            Arc::make_mut(inner).min_flops_per_thread = flops;
        }
        self
    }

    /// Chooses the GEMM. One the CPU cannot run (`Avx512` without AVX-512F, `Avx2` without
    /// AVX2 + FMA) is an error ([`KernelError::Unsupported`]), never a silent fallback.
    /// Choosing `Portable` also moves a plan on `Direct` or `Winograd` (which need our
    /// microkernel; `Direct` needs AVX-512) to `Im2colGemm` with the default tiling, and
    /// `Avx2` moves `Direct` likewise: forcing either afterwards is an error.
    pub fn with_gemm(mut self, gemm: GemmImpl) -> Result<Self, KernelError> {
        if !gemm.available() {
            return Err(KernelError::Unsupported {
                what: format!("GEMM {}", gemm.name()),
                reason: match gemm {
                    GemmImpl::Avx512 => "needs AVX-512 (avx512f), which this CPU lacks".into(),
                    _ => "needs AVX2 and FMA, which this CPU lacks".into(),
                },
            });
        }
        self.gemm = gemm;
        if matches!(self.strategy, Strategy::Direct | Strategy::Winograd)
            && !self.supports(self.strategy)
        {
            self.strategy = Strategy::Im2colGemm;
            self.tiling = self.default_tiling();
        }
        self.attach_inner();
        Ok(self)
    }

    pub fn gemm_impl(&self) -> GemmImpl {
        self.gemm
    }

    /// Overrides the tiling (clamped to the shape). For tests and tuning.
    pub fn with_tiling(mut self, tiling: Tiling) -> Self {
        self.tiling = self.adapt_tiling(tiling);
        // A sub-lattice plan's tiles are its undilated plan's.
        if let Some(inner) = self.inner.take() {
            self.inner = Some(Arc::new(inner.as_ref().clone().with_tiling(tiling)));
        }
        self
    }

    /// Chooses the strategy (tests and benchmarks compare them). One this shape, CPU or GEMM
    /// cannot run (see [`supports`](Self::supports)) is an error
    /// ([`KernelError::Unsupported`], saying why), never a silent fallback: a benchmark must
    /// never measure another path than the one it asked for.
    pub fn with_strategy(mut self, strategy: Strategy) -> Result<Self, KernelError> {
        if let Some(reason) = self.unsupported_reason(strategy) {
            return Err(KernelError::Unsupported {
                what: format!("strategy {}", strategy.name()),
                reason,
            });
        }
        // A default tiling becomes the new strategy's default; one set by `with_tiling`
        // is kept (adapted to the strategy's constraints).
        let default = self.tiling == self.default_tiling();
        self.strategy = strategy;
        self.tiling = if default {
            self.default_tiling()
        } else {
            self.adapt_tiling(self.tiling)
        };
        self.attach_inner();
        Ok(self)
    }

    pub fn shape(&self) -> &Conv3dShape {
        &self.shape
    }

    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    pub fn tiling(&self) -> Tiling {
        self.tiling
    }

    pub fn activation(&self) -> &Activation {
        &self.activation
    }

    /// Bytes of the per-thread scratch buffers for `threads` threads.
    pub fn im2col_bytes(&self, threads: usize) -> usize {
        let lens = [
            self.col_len(),
            self.acc_len(),
            self.wino_v_len(),
            self.wino_m_len(),
            self.zero_row_len(),
            self.direct_box_len(),
        ];
        threads * lens.into_iter().map(LineBuf::bytes).sum::<usize>()
    }

    fn wino_v_len(&self) -> usize {
        match self.strategy {
            Strategy::Winograd => self.shape.c_in() * winograd::V_CH_STRIDE,
            _ => 0,
        }
    }

    fn wino_m_len(&self) -> usize {
        match self.strategy {
            Strategy::Winograd => winograd::XI * winograd::xi_stride(self.shape.c_out()),
            _ => 0,
        }
    }

    /// Whether the pointwise strategy runs a k×1×1 filter (or a 1×1×1 one with depth
    /// padding) as passes over depth-shifted planes (`depth_passes_tile`).
    pub(super) fn depth_passes(&self) -> bool {
        self.strategy == Strategy::Pointwise
            && (self.shape.kernel_dims()[0] > 1 || self.shape.params.padding[0] > 0)
    }

    /// A row of zeros the pointwise strategy reads for a k×1×1 filter's taps in the depth
    /// padding (one tile wide, whole microkernel blocks).
    fn zero_row_len(&self) -> usize {
        if self.depth_passes() {
            self.tiling.tile_cols.next_multiple_of(avx512::MV)
        } else {
            0
        }
    }

    /// The direct strategy's input box of one run of a tile (`fill_direct_box`): at most
    /// the rows a part of one plane reads, or the whole planes a run of whole planes reads,
    /// over all input channels, and the slack its last vector loads may read.
    fn direct_box_len(&self) -> usize {
        if self.strategy != Strategy::Direct {
            return 0;
        }
        let shape = &self.shape;
        let [od, oh, ow] = shape.out_dims();
        let [kd, kh, kw] = shape.kernel_dims();
        let p = shape.params;
        let span = avx512::DirectBox::span;
        let cols = self.tiling.tile_cols;
        let plane = oh * ow;
        // A run inside one plane: at most a tile's voxels (or a plane's), so its rows.
        let part_rows = (cols.min(plane).div_ceil(ow) + 1).min(oh);
        let part =
            span(0, 1, kd, p.dilation[0]) * span(part_rows - 1, p.stride[1], kh, p.dilation[1]);
        // A run of whole planes: at most a tile's worth.
        let whole_planes = (cols / plane).min(od);
        let whole = if whole_planes > 0 {
            span(whole_planes - 1, p.stride[0], kd, p.dilation[0])
                * span(oh - 1, p.stride[1], kh, p.dilation[1])
        } else {
            0
        };
        let row_len = span(ow - 1, p.stride[2], kw, p.dilation[2]);
        shape.c_in() * part.max(whole) * row_len + avx512::DIRECT_BOX_SLACK
    }

    fn col_len(&self) -> usize {
        match self.strategy {
            Strategy::Pointwise | Strategy::Direct | Strategy::Winograd | Strategy::Sublattice => 0,
            Strategy::Im2colGemm => self.tiling.k_chunk * self.col_stride(),
        }
    }

    /// Reduction rows per pass over a tile: im2col's chunks (what its buffer holds), the
    /// pointwise kernel's passes over the input planes (with our microkernel; the portable
    /// GEMM takes the whole reduction at once).
    pub(super) fn pass_rows(&self) -> usize {
        let k = self.shape.reduction_len();
        match self.strategy {
            Strategy::Im2colGemm => self.tiling.k_chunk,
            // A k×1×1 filter's passes never cross a tap (see `depth_passes_tile`).
            Strategy::Pointwise if self.depth_passes() => {
                self.tiling.k_chunk.min(self.shape.c_in())
            }
            Strategy::Pointwise if self.gemm.is_microkernel() => self.tiling.k_chunk,
            Strategy::Pointwise | Strategy::Direct | Strategy::Winograd | Strategy::Sublattice => k,
        }
    }

    /// Reduction chunks per tile.
    fn chunked(&self) -> bool {
        self.pass_rows() < self.shape.reduction_len()
    }

    /// Whether a chunked tile keeps its partial sums in the output itself: a pointwise tile
    /// into one channel group, whose output rows are as few as the accumulator's would be.
    pub(super) fn sums_in_output(&self) -> bool {
        self.strategy == Strategy::Pointwise && self.shape.c_out() <= avx512::NC
    }

    fn acc_len(&self) -> usize {
        if self.gemm.is_microkernel() && self.chunked() && !self.sums_in_output() {
            self.shape.c_out() * self.col_stride()
        } else {
            0
        }
    }

    /// Row stride of the im2col buffer: the tile width rounded up to whole microkernel blocks
    /// plus one cache line, so rows never sit a multiple of 4 KiB apart (which would alias in
    /// L1 during the GEMM).
    fn col_stride(&self) -> usize {
        self.tiling.tile_cols.next_multiple_of(avx512::MV) + COL_ROW_PAD
    }

    /// Bytes of one slab buffer (all channels).
    pub fn slab_bytes(&self) -> usize {
        let [_, oh, ow] = self.shape.out_dims();
        self.shape.c_out() * self.tiling.slab_depth * oh * ow * 4
    }

    /// Workspace of [`run_into`](Self::run_into): the im2col buffers. Bounded by a constant
    /// per thread, whatever the volume size.
    /// A sub-lattice plan's: its undilated plan's workspace plus that plan's input and
    /// output.
    pub fn workspace_bytes(&self, threads: usize) -> usize {
        match &self.inner {
            Some(inner) => {
                inner.workspace_bytes(threads)
                    + (inner.shape.input_len() + inner.shape.output_len()) * 4
            }
            None => self.im2col_bytes(threads),
        }
    }

    /// Workspace of [`run_slabs`](Self::run_slabs): im2col buffers plus the slab ring (a
    /// sub-lattice plan: its `workspace_bytes`, the whole output and one slab).
    pub fn streaming_workspace_bytes(&self, threads: usize) -> usize {
        if self.inner.is_some() {
            return self.workspace_bytes(threads) + self.shape.output_len() * 4 + self.slab_bytes();
        }
        let ring = schedule::ring_slabs(threads);
        self.im2col_bytes(threads) + ring * self.slab_bytes()
    }
}
