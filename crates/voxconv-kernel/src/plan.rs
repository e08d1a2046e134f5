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

use std::ops::{ControlFlow, Range};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::avx512;
use super::im2col::im2col_tile;
use super::winograd;
use super::{check_buffers, Activation, Conv3dShape, KernelError};

/// How a plan computes its tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// General path: 3-D im2col of each tile (in reduction chunks), one GEMM per chunk.
    Im2colGemm,
    /// 1×1×1 kernel, stride 1, no padding: the input already is the column matrix, so the
    /// GEMM reads it in place (no im2col, no workspace).
    Pointwise,
    /// Width stride 1 or 2 on AVX-512: the microkernel reads input rows in place for every
    /// tap (masked loads give the zero padding), so no im2col at all.
    Direct,
    /// 3×3×3, stride 1, dilation 1 on AVX-512: Winograd F(2×2×2, 3×3×3), 3.4× fewer
    /// multiplies, one microkernel GEMM per transform position.
    Winograd,
}

impl Strategy {
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Im2colGemm => "im2col+gemm",
            Strategy::Pointwise => "pointwise-1x1x1",
            Strategy::Direct => "direct-avx512",
            Strategy::Winograd => "winograd-f2x3",
        }
    }
}

/// Which GEMM computes the tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmImpl {
    /// Our AVX-512 microkernel (48 voxels × 8 channels), reading the im2col buffer in place.
    Avx512,
    /// The portable `gemm` crate (any CPU).
    Portable,
}

impl GemmImpl {
    pub fn name(self) -> &'static str {
        match self {
            GemmImpl::Avx512 => "avx512",
            GemmImpl::Portable => "gemm-crate",
        }
    }
}

/// Tile geometry. Defaults come from [`Tiling::for_shape`]; tests and benchmarks may override.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiling {
    /// Output voxels per tile (GEMM `n`).
    pub tile_cols: usize,
    /// Reduction rows per GEMM (GEMM `k`); the im2col buffer is `k_chunk × tile_cols`.
    pub k_chunk: usize,
    /// Output depth planes per slab.
    pub slab_depth: usize,
}

/// Target size of one thread's im2col buffer: comfortably inside a 1 MiB L2.
const COL_BUFFER_BYTES: usize = 384 * 1024;
/// Preferred tile width before rounding to whole output rows.
const TARGET_TILE_COLS: usize = 1024;
/// Target size of one output slab (all channels). Streaming sends each channel's part of a
/// slab as its own chunks, so this sets the message size: for a 16-channel output, 8 MiB
/// slabs give 512 KiB chunks, 2 MiB ones 128 KiB; on loopback a 128 MiB stream took 12-18%
/// less time with 8 MiB than with 2 MiB, and more again with 16 MiB (interleaved runs).
const SLAB_BYTES: usize = 8 * 1024 * 1024;
/// Winograd is the default when input and output channels reach this (below, the
/// transforms cost more than the multiplies they save).
const WINOGRAD_MIN_CHANNELS: usize = 16;
/// The direct strategy is the default from this reduction length on ...
const DIRECT_MIN_K: usize = 64;
/// ... or for output rows shorter than this.
const DIRECT_SHORT_ROW: usize = 48;
/// Work (FLOPs) below which another thread costs more to start than it saves.
const MIN_FLOPS_PER_THREAD: f64 = 16e6;
/// Padding (in f32) after each im2col row.
const COL_ROW_PAD: usize = 16;
/// Slab buffers in flight in streaming mode (one being delivered, the rest being computed).
const RING_SLABS: usize = 3;

impl Tiling {
    /// Default tiling for a shape: independent of the thread count (determinism).
    pub fn for_shape(shape: &Conv3dShape) -> Self {
        let [od, oh, ow] = shape.out_dims();
        let plane = oh * ow;
        let slab_vox_target = (SLAB_BYTES / 4 / shape.c_out()).max(1);
        let slab_depth = (slab_vox_target / plane).clamp(1, od);
        let slab_vox = slab_depth * plane;
        // Whole output rows per tile when rows are short enough.
        let mut tile_cols = TARGET_TILE_COLS.min(slab_vox);
        if ow <= tile_cols {
            tile_cols = tile_cols / ow * ow;
        }
        let k = shape.reduction_len();
        let k_chunk = (COL_BUFFER_BYTES / 4 / tile_cols)
            .clamp(16, k.max(16))
            .min(k);
        Self {
            tile_cols,
            k_chunk,
            slab_depth,
        }
    }

    fn sanitized(self, shape: &Conv3dShape) -> Self {
        let [od, oh, ow] = shape.out_dims();
        let slab_depth = self.slab_depth.clamp(1, od);
        Self {
            tile_cols: self.tile_cols.clamp(1, slab_depth * oh * ow),
            k_chunk: self.k_chunk.clamp(1, shape.reduction_len()),
            slab_depth,
        }
    }
}

/// A finished slab of output: depth planes `depth` of batch item `batch`, all channels,
/// laid out `[C_out, depth.len(), oH, oW]`.
#[derive(Debug)]
pub struct Slab<'a> {
    pub batch: usize,
    pub depth: Range<usize>,
    pub data: &'a [f32],
}

/// A finished slab in a buffer its consumer now owns (see [`Conv3dPlan::run_slabs_owned`]):
/// `data.len()` is `C_out · depth.len() · oH · oW`, laid out as in [`Slab`].
#[derive(Debug)]
pub struct OwnedSlab {
    pub batch: usize,
    pub depth: Range<usize>,
    pub data: Vec<f32>,
}

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

/// Adds the time since `since` to `slot` and restarts `since`.
fn lap(slot: &AtomicU64, since: &mut Instant) {
    let now = Instant::now();
    slot.fetch_add((now - *since).as_nanos() as u64, Ordering::Relaxed);
    *since = now;
}

/// The tensors of one run; `packed` holds the filters packed for the AVX-512 microkernel
/// (empty for the portable GEMM).
struct Operands<'a> {
    input: &'a [f32],
    filters: &'a [f32],
    packed: Vec<f32>,
    bias: Option<&'a [f32]>,
}

/// One thread's reusable buffers: the im2col tile and, when the reduction is split into
/// chunks, the tile's running sums.
struct Scratch {
    col: Vec<f32>,
    acc: Vec<f32>,
    segments: Vec<avx512::Segment>,
    /// Winograd: transformed inputs and products of one 48-column block, and lane groups.
    wino_v: Vec<f32>,
    wino_m: Vec<f32>,
    lane_groups: Vec<winograd::LaneGroup>,
}

/// Where a slab's tiles are written: `base` is output voxel `slab_start` of channel 0, and
/// channel `c` starts `c·row_stride` values later.
#[derive(Clone, Copy)]
struct Dest {
    base: *mut f32,
    row_stride: usize,
}

/// A raw pointer that may cross threads; what it points to is split between threads by the
/// tile protocol (see SAFETY notes at the uses).
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: the pointer is only dereferenced under the tile/slab protocol of `run_parallel`:
// each tile writes a region no other thread touches until the slab is delivered.
unsafe impl Send for SendPtr {}
// SAFETY: as above; shared references to `SendPtr` only copy the address.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// `self + off` elements (a method, so closures capture the whole `SendPtr`).
    fn offset(self, off: usize) -> *mut f32 {
        self.0.wrapping_add(off)
    }
}

struct SlabInfo {
    /// Position in output order.
    index: usize,
    batch: usize,
    depth: Range<usize>,
    /// First output voxel (within the batch item) and voxel count.
    start: usize,
    voxels: usize,
    /// Index of the slab's first tile in the global tile sequence.
    first_tile: usize,
    tiles: usize,
}

impl Conv3dPlan {
    /// Plans a validated shape: the cheapest strategy this CPU supports, default tiling.
    pub fn new(shape: Conv3dShape, activation: Activation) -> Self {
        let gemm = if avx512::available() {
            GemmImpl::Avx512
        } else {
            GemmImpl::Portable
        };
        let mut plan = Self {
            shape,
            activation,
            strategy: Strategy::Im2colGemm,
            gemm,
            tiling: Tiling::for_shape(&shape),
            min_flops_per_thread: MIN_FLOPS_PER_THREAD,
            clock: Arc::default(),
        };
        plan.strategy = if plan.supports(Strategy::Pointwise) {
            Strategy::Pointwise
        } else if plan.supports(Strategy::Winograd)
            && shape.c_in() >= WINOGRAD_MIN_CHANNELS
            && shape.c_out() >= WINOGRAD_MIN_CHANNELS
        {
            Strategy::Winograd
        } else if plan.supports(Strategy::Direct)
            && (shape.reduction_len() >= DIRECT_MIN_K || shape.out_dims()[2] < DIRECT_SHORT_ROW)
        {
            // Measured (docs/kernel-performance.md): direct wins where im2col is a large
            // share (short rows, small C_out) and ties on long reductions; for very short
            // reductions over long rows (single-channel first layers) im2col+GEMM is faster.
            Strategy::Direct
        } else {
            Strategy::Im2colGemm
        };
        plan.tiling = plan.adapt_tiling(plan.tiling);
        plan
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
        self
    }

    /// Chooses the GEMM; `Avx512` is honoured only where the CPU has it.
    pub fn with_gemm(mut self, gemm: GemmImpl) -> Self {
        if gemm == GemmImpl::Portable || avx512::available() {
            self.gemm = gemm;
        }
        if matches!(self.strategy, Strategy::Direct | Strategy::Winograd)
            && gemm == GemmImpl::Portable
        {
            self.strategy = Strategy::Im2colGemm;
            self.tiling = Tiling::for_shape(&self.shape);
        }
        self
    }

    pub fn gemm_impl(&self) -> GemmImpl {
        self.gemm
    }

    /// Overrides the tiling (clamped to the shape). For tests and tuning.
    pub fn with_tiling(mut self, tiling: Tiling) -> Self {
        self.tiling = self.adapt_tiling(tiling);
        self
    }

    /// Whether `strategy` can compute this shape on this CPU.
    pub fn supports(&self, strategy: Strategy) -> bool {
        let p = self.shape.params;
        match strategy {
            Strategy::Im2colGemm => true,
            Strategy::Pointwise => {
                self.shape.kernel_dims() == [1, 1, 1] && p.stride == [1; 3] && p.padding == [0; 3]
            }
            Strategy::Direct => {
                self.gemm == GemmImpl::Avx512
                    && avx512::direct_supports_width_stride(p.stride[2])
                    && self.shape.kernel_dims()[2] <= avx512::DIRECT_MAX_KW
            }
            Strategy::Winograd => self.gemm == GemmImpl::Avx512 && winograd::eligible(&self.shape),
        }
    }

    /// Winograd works on pairs of output planes: tiles of whole plane pairs (enough for
    /// about 24 lane groups), slabs of an even number of planes.
    fn winograd_tiling(&self, t: Tiling) -> Tiling {
        let [od, oh, ow] = self.shape.out_dims();
        let plane = oh * ow;
        let groups_per_pair = oh.div_ceil(2) * ow.div_ceil(2).div_ceil(winograd::LANES);
        let pairs = 24usize.div_ceil(groups_per_pair).max(1);
        let slab_depth = t
            .slab_depth
            .next_multiple_of(2)
            .max(2 * pairs)
            .min(od.next_multiple_of(2));
        let slab_depth = slab_depth
            .next_multiple_of(2 * pairs)
            .min(od.next_multiple_of(2));
        Tiling {
            tile_cols: 2 * pairs * plane,
            k_chunk: t.k_chunk,
            slab_depth,
        }
    }

    /// Chooses the strategy where supported (tests and benchmarks compare them); otherwise
    /// the plan is unchanged.
    pub fn with_strategy(mut self, strategy: Strategy) -> Self {
        if self.supports(strategy) {
            self.strategy = strategy;
            self.tiling = self.adapt_tiling(self.tiling);
        }
        self
    }

    /// Tiling constraints of the strategy (Winograd: whole plane pairs).
    fn adapt_tiling(&self, t: Tiling) -> Tiling {
        let t = t.sanitized(&self.shape);
        match self.strategy {
            Strategy::Winograd => self.winograd_tiling(t),
            _ => t,
        }
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
    pub fn activation(&self) -> Activation {
        self.activation
    }

    /// Bytes of the per-thread scratch buffers for `threads` threads.
    pub fn im2col_bytes(&self, threads: usize) -> usize {
        threads * (self.col_len() + self.acc_len() + self.wino_v_len() + self.wino_m_len()) * 4
    }

    fn wino_v_len(&self) -> usize {
        match self.strategy {
            Strategy::Winograd => self.shape.c_in() * winograd::CH_STRIDE,
            _ => 0,
        }
    }

    fn wino_m_len(&self) -> usize {
        match self.strategy {
            Strategy::Winograd => self.shape.c_out() * winograd::CH_STRIDE,
            _ => 0,
        }
    }

    fn col_len(&self) -> usize {
        match self.strategy {
            Strategy::Pointwise | Strategy::Direct | Strategy::Winograd => 0,
            Strategy::Im2colGemm => self.tiling.k_chunk * self.col_stride(),
        }
    }

    /// Reduction chunks per tile.
    fn chunked(&self) -> bool {
        self.strategy == Strategy::Im2colGemm && self.tiling.k_chunk < self.shape.reduction_len()
    }

    fn acc_len(&self) -> usize {
        if self.gemm == GemmImpl::Avx512 && self.chunked() {
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

    fn operands<'a>(
        &self,
        input: &'a [f32],
        filters: &'a [f32],
        bias: Option<&'a [f32]>,
    ) -> Operands<'a> {
        let packed = match (self.gemm, self.strategy) {
            (GemmImpl::Avx512, Strategy::Winograd) => {
                winograd::transform_filters(filters, self.shape.c_out(), self.shape.c_in())
            }
            (GemmImpl::Avx512, _) => {
                avx512::pack_weights(filters, self.shape.c_out(), self.shape.reduction_len())
            }
            (GemmImpl::Portable, _) => Vec::new(),
        };
        Operands {
            input,
            filters,
            packed,
            bias,
        }
    }

    fn scratch(&self) -> Scratch {
        Scratch {
            col: vec![0f32; self.col_len()],
            acc: vec![0f32; self.acc_len()],
            segments: Vec::new(),
            wino_v: vec![0f32; self.wino_v_len()],
            wino_m: vec![0f32; self.wino_m_len()],
            lane_groups: Vec::new(),
        }
    }

    /// Most threads worth starting for this problem: about one per `MIN_FLOPS_PER_THREAD`,
    /// and never more than there are tiles.
    pub fn useful_threads(&self) -> usize {
        let by_work = if self.min_flops_per_thread > 0.0 {
            (self.shape.flops() / self.min_flops_per_thread)
                .ceil()
                .max(1.0) as usize
        } else {
            usize::MAX
        };
        let tiles: usize = self.slabs().iter().map(|s| s.tiles).sum();
        by_work.min(tiles).max(1)
    }

    /// Bytes of one slab buffer (all channels).
    pub fn slab_bytes(&self) -> usize {
        let [_, oh, ow] = self.shape.out_dims();
        self.shape.c_out() * self.tiling.slab_depth * oh * ow * 4
    }

    /// Workspace of [`run_into`](Self::run_into): the im2col buffers. Bounded by a constant
    /// per thread, whatever the volume size.
    pub fn workspace_bytes(&self, threads: usize) -> usize {
        self.im2col_bytes(threads)
    }

    /// Workspace of [`run_slabs`](Self::run_slabs): im2col buffers plus the slab ring.
    pub fn streaming_workspace_bytes(&self, threads: usize) -> usize {
        let ring = if threads <= 1 { 1 } else { RING_SLABS };
        self.im2col_bytes(threads) + ring * self.slab_bytes()
    }

    fn slabs(&self) -> Vec<SlabInfo> {
        let [od, oh, ow] = self.shape.out_dims();
        let plane = oh * ow;
        let mut out = Vec::new();
        let mut first_tile = 0;
        for batch in 0..self.shape.batch() {
            let mut d0 = 0;
            while d0 < od {
                let d1 = (d0 + self.tiling.slab_depth).min(od);
                let voxels = (d1 - d0) * plane;
                let tiles = voxels.div_ceil(self.tiling.tile_cols);
                out.push(SlabInfo {
                    index: out.len(),
                    batch,
                    depth: d0..d1,
                    start: d0 * plane,
                    voxels,
                    first_tile,
                    tiles,
                });
                first_tile += tiles;
                d0 = d1;
            }
        }
        out
    }

    /// Computes tile `t` of `slab` into `dest`, using `scratch` as workspace.
    ///
    /// # Safety
    /// `dest` must be valid for writes of `C_out` rows of `slab.voxels` values at stride
    /// `dest.row_stride`, and no other thread may access the columns of tile `t` meanwhile.
    unsafe fn compute_tile(
        &self,
        ops: &Operands<'_>,
        slab: &SlabInfo,
        t: usize,
        dest: Dest,
        scratch: &mut Scratch,
    ) {
        let shape = &self.shape;
        let c_out = shape.c_out();
        let k = shape.reduction_len();
        let in_item = shape.c_in() * shape.in_voxels();
        let input_n = &ops.input[slab.batch * in_item..(slab.batch + 1) * in_item];
        let off = t * self.tiling.tile_cols;
        let cols = self.tiling.tile_cols.min(slab.voxels - off);
        let v0 = slab.start + off;
        // SAFETY: `off < slab.voxels`, so the tile's first column lies inside the slab's
        // destination rows (caller's contract).
        let dst = unsafe { dest.base.add(off) };
        let rs = dest.row_stride;
        let clock = &*self.clock;
        let mut since = Instant::now();
        if self.strategy == Strategy::Direct {
            // SAFETY: forwarded caller's contract (dst rows of `cols` values at stride rs).
            unsafe { self.direct_tile(ops, input_n, v0, cols, dst, rs, &mut scratch.segments) };
            lap(&clock.gemm, &mut since);
            self.activation_pass(dst, rs, cols);
            lap(&clock.epilogue, &mut since);
            return;
        }
        if self.strategy == Strategy::Winograd {
            // SAFETY: forwarded caller's contract.
            unsafe { self.winograd_tile(ops, input_n, v0, cols, dst, rs, scratch) };
            return;
        }
        let kc = match self.strategy {
            Strategy::Pointwise | Strategy::Direct | Strategy::Winograd => k,
            Strategy::Im2colGemm => self.tiling.k_chunk,
        };
        let stride = self.col_stride();
        let mut r0 = 0;
        while r0 < k {
            let r1 = (r0 + kc).min(k);
            // The chunk's column matrix: rows r0..r1, `cols` wide, row stride `lda`.
            let (a, lda) = match self.strategy {
                Strategy::Pointwise | Strategy::Direct | Strategy::Winograd => {
                    (input_n[v0..].as_ptr(), shape.in_voxels())
                }
                Strategy::Im2colGemm => {
                    im2col_tile(shape, input_n, v0, cols, r0..r1, &mut scratch.col, stride);
                    lap(&clock.im2col, &mut since);
                    (scratch.col.as_ptr(), stride)
                }
            };
            match self.gemm {
                // SAFETY: `a` holds rows r0..r1 (each `cols` values) at stride lda; `packed`
                // holds all groups × k rows; dst per the caller's contract; `acc` holds
                // c_out rows of `stride >= cols` values.
                GemmImpl::Avx512 => unsafe {
                    self.avx512_chunk(ops, a, lda, r0..r1, cols, dst, rs, &mut scratch.acc)
                },
                // SAFETY: lhs = filters[:, r0..r1] (row stride k, in bounds); rhs = `a` as
                // above; dst per the caller's contract. The first chunk overwrites dst
                // (read_dst = false), later chunks accumulate in a fixed order.
                GemmImpl::Portable => unsafe {
                    gemm::gemm(
                        c_out,
                        cols,
                        r1 - r0,
                        dst,
                        1,
                        rs as isize,
                        r0 > 0,
                        ops.filters.as_ptr().add(r0),
                        1,
                        k as isize,
                        a,
                        1,
                        lda as isize,
                        1.0f32,
                        1.0f32,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    )
                },
            }
            lap(&clock.gemm, &mut since);
            r0 = r1;
        }
        // Epilogue: (bias, unless the microkernel added it) + activation, tile still hot.
        let bias = match self.gemm {
            GemmImpl::Avx512 => None,
            GemmImpl::Portable => ops.bias,
        };
        if bias.is_some() || self.activation != Activation::None {
            for co in 0..c_out {
                // SAFETY: row `co` of the tile: `cols` values at dst + co·row_stride, inside
                // the destination and owned by this tile (caller's contract).
                let row = unsafe { std::slice::from_raw_parts_mut(dst.add(co * rs), cols) };
                self.activation.bias_apply(row, bias.map_or(0.0, |b| b[co]));
            }
        }
        lap(&clock.epilogue, &mut since);
    }

    /// Applies the activation to a finished tile (bias already added).
    fn activation_pass(&self, dst: *mut f32, rs: usize, cols: usize) {
        if self.activation == Activation::None {
            return;
        }
        for co in 0..self.shape.c_out() {
            // SAFETY: row `co` of a tile this thread owns (see `compute_tile`).
            let row = unsafe { std::slice::from_raw_parts_mut(dst.add(co * rs), cols) };
            self.activation.bias_apply(row, 0.0);
        }
    }

    /// A tile by the direct strategy: split into row segments of at most 16 voxels, three
    /// segments × 8 channels per microkernel call.
    ///
    /// # Safety
    /// As `compute_tile`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn direct_tile(
        &self,
        ops: &Operands<'_>,
        input_n: &[f32],
        v0: usize,
        cols: usize,
        dst: *mut f32,
        rs: usize,
        segments: &mut Vec<avx512::Segment>,
    ) {
        #[cfg(target_arch = "x86_64")]
        {
            use avx512::{DirectGeom, Segment, DIRECT_SEGS, NC};
            let shape = &self.shape;
            let [_, oh, ow] = shape.out_dims();
            let p = shape.params;
            segments.clear();
            let mut v = v0;
            while v < v0 + cols {
                let (ow0, row) = (v % ow, v / ow);
                let len = (ow - ow0).min(v0 + cols - v).min(16);
                segments.push(Segment {
                    oz: row / oh,
                    oy: row % oh,
                    ow0,
                    len,
                    col: v - v0,
                });
                v += len;
            }
            let geom = DirectGeom {
                c_in: shape.c_in(),
                dims: shape.in_dims(),
                kernel: shape.kernel_dims(),
                stride: p.stride,
                padding: p.padding,
                dilation: p.dilation,
            };
            let c_out = shape.c_out();
            let k = shape.reduction_len();
            for g in 0..c_out.div_ceil(NC) {
                let nch = NC.min(c_out - g * NC);
                let b = ops.packed[g * k * NC..].as_ptr();
                let bias = ops.bias.map_or(std::ptr::null(), |b| b[g * NC..].as_ptr());
                for segs in segments.chunks(DIRECT_SEGS) {
                    // SAFETY: packed group g holds k·NC weights; rows g·NC.. g·NC+nch of the
                    // tile at stride rs cover every segment's columns (caller's contract);
                    // AVX-512F and the shape limits were checked by `supports(Direct)`.
                    unsafe {
                        avx512::block_direct(
                            &geom,
                            input_n.as_ptr(),
                            segs,
                            b,
                            dst.add(g * NC * rs),
                            rs,
                            nch,
                            bias,
                        )
                    };
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (ops, input_n, v0, cols, dst, rs, segments);
            unreachable!("Strategy::Direct is only chosen on x86_64");
        }
    }

    /// A tile of whole output plane pairs by Winograd F(2×2×2, 3×3×3), 48 columns (three
    /// lane groups) at a time: input transform, 64 microkernel GEMMs, output transform.
    ///
    /// # Safety
    /// As `compute_tile`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn winograd_tile(
        &self,
        ops: &Operands<'_>,
        input_n: &[f32],
        v0: usize,
        cols: usize,
        dst: *mut f32,
        rs: usize,
        scratch: &mut Scratch,
    ) {
        #[cfg(target_arch = "x86_64")]
        {
            use avx512::NC;
            use winograd::{LaneGroup, CH_STRIDE, COLS, GROUPS, LANES, XI};
            let shape = &self.shape;
            let [_, oh, ow] = shape.out_dims();
            let plane = oh * ow;
            let z_start = v0 / plane;
            let planes = cols.div_ceil(plane);
            let (c_in, c_out) = (shape.c_in(), shape.c_out());
            let n_groups = c_out.div_ceil(NC);
            let lane_groups = &mut scratch.lane_groups;
            lane_groups.clear();
            for z0 in (z_start..z_start + planes).step_by(2) {
                for ty in 0..oh.div_ceil(2) {
                    let ntx = ow.div_ceil(2);
                    for tx0 in (0..ntx).step_by(LANES) {
                        lane_groups.push(LaneGroup {
                            z0,
                            ty,
                            tx0,
                            lanes: LANES.min(ntx - tx0),
                        });
                    }
                }
            }
            let clock = &*self.clock;
            let mut since = Instant::now();
            for block in lane_groups.chunks(GROUPS) {
                // SAFETY: AVX-512F was detected when the plan chose this strategy.
                unsafe { winograd::input_transform(shape, input_n, block, &mut scratch.wino_v) };
                lap(&clock.im2col, &mut since);
                for xi in 0..XI {
                    for g in 0..n_groups {
                        let nch = NC.min(c_out - g * NC);
                        // SAFETY: V holds c_in channel rows (stride CH_STRIDE) with COLS values
                        // at position ξ; the packed U[ξ][g] holds c_in·NC weights; M rows
                        // g·NC.. g·NC+nch (stride CH_STRIDE) are inside wino_m.
                        unsafe {
                            avx512::block_48x8(
                                c_in,
                                scratch.wino_v[xi * COLS..].as_ptr(),
                                CH_STRIDE,
                                ops.packed[(xi * n_groups + g) * c_in * NC..].as_ptr(),
                                std::ptr::null(),
                                0,
                                scratch.wino_m[g * NC * CH_STRIDE + xi * COLS..].as_mut_ptr(),
                                CH_STRIDE,
                                nch,
                                COLS,
                                std::ptr::null(),
                            )
                        };
                    }
                }
                lap(&clock.gemm, &mut since);
                // SAFETY: the lane groups lie in this tile's planes (caller's contract);
                // AVX-512F was detected when the plan chose this strategy.
                unsafe {
                    winograd::output_transform(
                        shape,
                        &scratch.wino_m,
                        block,
                        ops.bias,
                        self.activation,
                        dst,
                        rs,
                        z_start,
                    )
                };
                lap(&clock.epilogue, &mut since);
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (ops, input_n, v0, cols, dst, rs, scratch);
            unreachable!("Strategy::Winograd is only chosen on x86_64");
        }
    }

    /// One reduction chunk `rows` of a tile with the AVX-512 microkernel. A single chunk
    /// writes `dst` directly (bias fused); otherwise the first chunks accumulate in `acc`
    /// and the last one adds bias and writes `dst`.
    ///
    /// # Safety
    /// As `compute_tile`; `a` holds the chunk's rows (`cols` values each) at stride `lda`;
    /// `acc` holds `c_out · col_stride()` values when the tile is chunked.
    #[allow(clippy::too_many_arguments)]
    unsafe fn avx512_chunk(
        &self,
        ops: &Operands<'_>,
        a: *const f32,
        lda: usize,
        rows: Range<usize>,
        cols: usize,
        dst: *mut f32,
        rs: usize,
        acc: &mut [f32],
    ) {
        #[cfg(target_arch = "x86_64")]
        {
            use avx512::{MV, NC};
            let c_out = self.shape.c_out();
            let k = self.shape.reduction_len();
            let first = rows.start == 0;
            let last = rows.end == k;
            let accs = self.col_stride();
            let acc = acc.as_mut_ptr();
            for g in 0..c_out.div_ceil(NC) {
                let nch = NC.min(c_out - g * NC);
                let b = ops.packed[(g * k + rows.start) * NC..].as_ptr();
                let bias = match (last, ops.bias) {
                    (true, Some(bias)) => bias[g * NC..].as_ptr(),
                    _ => std::ptr::null(),
                };
                for p in 0..cols.div_ceil(MV) {
                    let nvox = MV.min(cols - p * MV);
                    let o = p * MV;
                    // SAFETY: every pointer below stays inside the buffers described in this
                    // function's contract: block (g, p) covers channels g·NC.. g·NC+nch and
                    // columns o..o+nvox of the tile; AVX-512F was detected when the plan
                    // chose `GemmImpl::Avx512`.
                    unsafe {
                        let (src, lds) = if first {
                            (std::ptr::null(), 0)
                        } else {
                            (acc.add(g * NC * accs + o) as *const f32, accs)
                        };
                        let (out, ldo) = if last {
                            (dst.add(g * NC * rs + o), rs)
                        } else {
                            (acc.add(g * NC * accs + o), accs)
                        };
                        avx512::block_48x8(
                            rows.len(),
                            a.add(o),
                            lda,
                            b,
                            src,
                            lds,
                            out,
                            ldo,
                            nch,
                            nvox,
                            bias,
                        );
                    }
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (ops, a, lda, rows, cols, dst, rs, acc);
            unreachable!("GemmImpl::Avx512 is only chosen on x86_64");
        }
    }

    fn check(
        &self,
        input: &[f32],
        filters: &[f32],
        bias: Option<&[f32]>,
        threads: usize,
    ) -> Result<(), KernelError> {
        if threads == 0 {
            return Err(KernelError::ZeroThreads);
        }
        check_buffers(&self.shape, input, filters, bias)
    }

    /// Runs the convolution into `output` (`[N, C_out, oD, oH, oW]`, fully overwritten) on
    /// `threads` threads. Returns `Cancelled` if `cancel` is set before the end.
    pub fn run_into(
        &self,
        input: &[f32],
        filters: &[f32],
        bias: Option<&[f32]>,
        output: &mut [f32],
        threads: usize,
        cancel: Option<&AtomicBool>,
    ) -> Result<(), KernelError> {
        self.check(input, filters, bias, threads)?;
        if output.len() != self.shape.output_len() {
            return Err(KernelError::BufferLength {
                what: "output",
                expected: self.shape.output_len(),
                got: output.len(),
            });
        }
        let out_vox = self.shape.out_voxels();
        let item = self.shape.c_out() * out_vox;
        let base = SendPtr(output.as_mut_ptr());
        let dest_of = move |s: &SlabInfo| Dest {
            // SAFETY (of the arithmetic): batch·item + start < output.len().
            base: base.offset(s.batch * item + s.start),
            row_stride: out_vox,
        };
        self.drive(
            input,
            filters,
            bias,
            threads,
            cancel,
            usize::MAX,
            &dest_of,
            &mut |_| ControlFlow::Continue(()),
        )
    }

    /// Runs the convolution and hands each finished slab, in output order, to `on_slab`.
    /// Memory: `streaming_workspace_bytes(threads)`, not the output size. `on_slab` may
    /// return `Break` to stop early (the result is then `Cancelled`).
    pub fn run_slabs(
        &self,
        input: &[f32],
        filters: &[f32],
        bias: Option<&[f32]>,
        threads: usize,
        cancel: Option<&AtomicBool>,
        on_slab: &mut dyn FnMut(Slab<'_>) -> ControlFlow<()>,
    ) -> Result<(), KernelError> {
        self.check(input, filters, bias, threads)?;
        let ring = if threads <= 1 { 1 } else { RING_SLABS };
        let slab_len = self.slab_bytes() / 4;
        let mut buffers = vec![0f32; ring * slab_len];
        let base = SendPtr(buffers.as_mut_ptr());
        // Slab k lives in ring slot k % ring.
        let dest_of = move |s: &SlabInfo| Dest {
            base: base.offset((s.index % ring) * slab_len),
            row_stride: s.voxels,
        };
        let result = self.drive(
            input,
            filters,
            bias,
            threads,
            cancel,
            ring,
            &dest_of,
            &mut |s| {
                // SAFETY: the slab is complete and its ring slot is not written again until
                // `drive` marks it delivered, after this callback returns.
                let data = unsafe {
                    std::slice::from_raw_parts(dest_of(s).base, self.shape.c_out() * s.voxels)
                };
                on_slab(Slab {
                    batch: s.batch,
                    depth: s.depth.clone(),
                    data,
                })
            },
        );
        drop(buffers);
        result
    }

    /// Like [`run_slabs`](Self::run_slabs), but each finished slab is handed over in its
    /// own buffer instead of being lent from a ring: tiles are computed straight into
    /// buffers from `fresh(len)` (at least `len` values; recycled ones save page faults),
    /// so a consumer that sends the values on needs no copy. Memory is the same ring of
    /// [`slab_bytes`](Self::slab_bytes) buffers plus whatever the consumer keeps.
    #[allow(clippy::too_many_arguments)]
    pub fn run_slabs_owned(
        &self,
        input: &[f32],
        filters: &[f32],
        bias: Option<&[f32]>,
        threads: usize,
        cancel: Option<&AtomicBool>,
        fresh: &mut dyn FnMut(usize) -> Vec<f32>,
        on_slab: &mut dyn FnMut(OwnedSlab) -> ControlFlow<()>,
    ) -> Result<(), KernelError> {
        self.check(input, filters, bias, threads)?;
        let ring = if threads <= 1 { 1 } else { RING_SLABS };
        let slab_len = self.slab_bytes() / 4;
        let count = self.slabs().len();
        let mut sized = |len: usize| {
            let mut v = fresh(len);
            v.resize(len.max(v.len()), 0.0);
            v
        };
        let mut owned: Vec<Vec<f32>> = (0..ring.min(count)).map(|_| sized(slab_len)).collect();
        // Slab k is computed into the buffer of ring slot k % ring; a slot's buffer is
        // replaced when its slab is delivered, before any tile of slab k + ring may start
        // (`drive` publishes each delivery with a SeqCst store the workers wait on).
        let slots: Vec<AtomicPtr<f32>> = owned
            .iter_mut()
            .map(|b| AtomicPtr::new(b.as_mut_ptr()))
            .collect();
        let dest_of = |s: &SlabInfo| Dest {
            base: slots[s.index % ring].load(Ordering::Acquire),
            row_stride: s.voxels,
        };
        let c_out = self.shape.c_out();
        self.drive(
            input,
            filters,
            bias,
            threads,
            cancel,
            ring,
            &dest_of,
            &mut |s| {
                let slot = s.index % ring;
                let next = if s.index + ring < count {
                    sized(slab_len)
                } else {
                    Vec::new()
                };
                let mut data = std::mem::replace(&mut owned[slot], next);
                slots[slot].store(owned[slot].as_mut_ptr(), Ordering::Release);
                data.truncate(c_out * s.voxels);
                on_slab(OwnedSlab {
                    batch: s.batch,
                    depth: s.depth.clone(),
                    data,
                })
            },
        )
    }

    /// The scheduler. Sequential for one thread; otherwise `threads` workers take tiles in
    /// order from a shared counter while the calling thread delivers slabs in order. At most
    /// `ring` slabs are in flight (computed but not delivered).
    #[allow(clippy::too_many_arguments)]
    fn drive(
        &self,
        input: &[f32],
        filters: &[f32],
        bias: Option<&[f32]>,
        threads: usize,
        cancel: Option<&AtomicBool>,
        ring: usize,
        dest_of: &(dyn Fn(&SlabInfo) -> Dest + Sync),
        deliver: &mut dyn FnMut(&SlabInfo) -> ControlFlow<()>,
    ) -> Result<(), KernelError> {
        let slabs = self.slabs();
        let ops = self.operands(input, filters, bias);
        let ops = &ops;
        let cancelled = || cancel.is_some_and(|c| c.load(Ordering::Relaxed));
        // `threads` is an upper bound: spawning costs tens of microseconds, so tiny problems
        // stay on fewer threads. Tiling does not depend on it, so neither do the results.
        let threads = threads.min(self.useful_threads());
        if threads == 1 {
            let mut scratch = self.scratch();
            for s in &slabs {
                for t in 0..s.tiles {
                    if cancelled() {
                        return Err(KernelError::Cancelled);
                    }
                    // SAFETY: one thread; dest_of gives the slab's own rows.
                    unsafe { self.compute_tile(ops, s, t, dest_of(s), &mut scratch) };
                }
                if deliver(s).is_break() {
                    return Err(KernelError::Cancelled);
                }
            }
            return Ok(());
        }

        let total_tiles: usize = slabs.iter().map(|s| s.tiles).sum();
        let next_tile = AtomicUsize::new(0);
        let done: Vec<AtomicUsize> = slabs.iter().map(|_| AtomicUsize::new(0)).collect();
        let delivered = AtomicUsize::new(0);
        let abort = AtomicBool::new(false);
        let lock = Mutex::new(());
        let cv = Condvar::new();
        let notify = || {
            drop(lock.lock().unwrap_or_else(|e| e.into_inner()));
            cv.notify_all();
        };
        // Wakes everyone if a worker unwinds, so the deliverer never waits forever.
        struct PanicGuard<'a>(&'a AtomicBool, &'a dyn Fn());
        impl Drop for PanicGuard<'_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    self.0.store(true, Ordering::SeqCst);
                    (self.1)();
                }
            }
        }
        let wait_until = |ready: &dyn Fn() -> bool| {
            let mut g = lock.lock().unwrap_or_else(|e| e.into_inner());
            while !ready() && !abort.load(Ordering::SeqCst) {
                if cancelled() {
                    abort.store(true, Ordering::SeqCst);
                    cv.notify_all();
                    break;
                }
                g = cv
                    .wait_timeout(g, Duration::from_millis(20))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        };

        let mut outcome = Ok(());
        let work = || {
            let _guard = PanicGuard(&abort, &notify);
            let mut scratch = self.scratch();
            loop {
                if abort.load(Ordering::Relaxed) {
                    break;
                }
                if cancelled() {
                    abort.store(true, Ordering::SeqCst);
                    notify();
                    break;
                }
                let g = next_tile.fetch_add(1, Ordering::Relaxed);
                if g >= total_tiles {
                    break;
                }
                let si = slabs.partition_point(|s| s.first_tile <= g) - 1;
                let s = &slabs[si];
                if ring != usize::MAX {
                    wait_until(&|| si < delivered.load(Ordering::SeqCst) + ring);
                    if abort.load(Ordering::SeqCst) {
                        break;
                    }
                }
                // SAFETY: tile g is taken by this thread alone (atomic counter); its
                // slab's ring slot is free (waited above) and stays reserved until
                // the slab is delivered, which needs this tile to finish.
                unsafe { self.compute_tile(ops, s, g - s.first_tile, dest_of(s), &mut scratch) };
                if done[si].fetch_add(1, Ordering::SeqCst) + 1 == s.tiles {
                    notify();
                }
            }
        };
        // Writing straight into the output (no ring), the calling thread computes too and
        // delivers afterwards; streaming, it only delivers, so a slow consumer never holds
        // up a tile.
        let calling_thread_works = ring == usize::MAX;
        std::thread::scope(|scope| {
            let helpers = if calling_thread_works {
                threads - 1
            } else {
                threads
            };
            for _ in 0..helpers {
                scope.spawn(work);
            }
            if calling_thread_works {
                work();
            }
            for (si, s) in slabs.iter().enumerate() {
                wait_until(&|| done[si].load(Ordering::SeqCst) == s.tiles);
                if abort.load(Ordering::SeqCst) {
                    outcome = Err(KernelError::Cancelled);
                    break;
                }
                if deliver(s).is_break() {
                    abort.store(true, Ordering::SeqCst);
                    notify();
                    outcome = Err(KernelError::Cancelled);
                    break;
                }
                delivered.store(si + 1, Ordering::SeqCst);
                notify();
            }
        });
        outcome
    }
}
