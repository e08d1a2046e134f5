//! Strategies and tiling: which strategies can compute a shape, which one a plan picks by
//! default, and the tile geometry (with the constants it is derived from).

use crate::{avx512, winograd, Conv3dShape};

use super::Conv3dPlan;

/// How a plan computes its tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// General path: 3-D im2col of each tile (in reduction chunks), one GEMM per chunk.
    Im2colGemm,
    /// 1×1×1 kernel, stride 1, no padding: the input already is the column matrix, so the
    /// GEMM reads it in place (no im2col, no workspace).
    Pointwise,
    /// Width stride 1 or 2 on AVX-512: the microkernel reads, for every tap, the rows of a
    /// small zero-padded copy of the input each run of a tile reads (its input box), so no
    /// im2col at all.
    Direct,
    /// 3×3×3, stride 1, dilation 1 on AVX-512: Winograd F(2×2×2, 3×3×3), 3.4× fewer
    /// multiplies, one microkernel GEMM per transform position.
    Winograd,
    /// Dilated, stride 1, padding and input size multiples of the dilation: the input's
    /// sub-lattices (one per residue class of the dilation) as a batch of an undilated
    /// convolution, whose plan picks its own strategy (see `plan::sublattice`).
    Sublattice,
}

impl Strategy {
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Im2colGemm => "im2col+gemm",
            Strategy::Pointwise => "pointwise-1x1x1",
            Strategy::Direct => "direct-avx512",
            Strategy::Winograd => "winograd-f2x3",
            Strategy::Sublattice => "dilated-sublattice",
        }
    }
}

/// Which GEMM computes the tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmImpl {
    /// Our AVX-512 microkernel (48 voxels × 8 channels), reading the im2col buffer in place.
    Avx512,
    /// The same microkernel in AVX2 + FMA (same blocks, packing and bits), for CPUs
    /// without AVX-512.
    Avx2,
    /// The portable `gemm` crate (any CPU).
    Portable,
}

impl GemmImpl {
    pub fn name(self) -> &'static str {
        match self {
            GemmImpl::Avx512 => "avx512",
            GemmImpl::Avx2 => "avx2",
            GemmImpl::Portable => "gemm-crate",
        }
    }

    /// Our own microkernel (AVX-512 or AVX2), as opposed to the `gemm` crate.
    pub fn is_microkernel(self) -> bool {
        matches!(self, GemmImpl::Avx512 | GemmImpl::Avx2)
    }

    /// Whether this CPU can run it.
    pub fn available(self) -> bool {
        match self {
            GemmImpl::Avx512 => avx512::available(),
            GemmImpl::Avx2 => crate::avx2::available(),
            GemmImpl::Portable => true,
        }
    }

    /// The fastest this CPU runs: AVX-512, else AVX2, else the portable GEMM.
    pub fn best_available() -> Self {
        [GemmImpl::Avx512, GemmImpl::Avx2]
            .into_iter()
            .find(|g| g.available())
            .unwrap_or(GemmImpl::Portable)
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
    /// Output channels per tile (a multiple of the microkernel's 8, or all of them): where
    /// a shape has few voxel tiles (deep stages, small volumes), tiles also split the output
    /// channels, so threads share the work instead of one thread taking it all.
    pub chan_block: usize,
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
/// Winograd is the default from this many input channels into at least 8 output channels,
/// and from 8 input channels into at least 12 ([`winograd_channels`]). Since its transforms
/// run in AVX-512 registers (three loads per input row for all four tap columns, masked
/// stores of the output instead of per-row copies: 16→16 over 48³ 12.3 → 10.0 ms at one
/// thread), it beats the direct kernel nearly everywhere the input has 8 channels or more:
/// AMD Zen 4, 2026-12-07, 3×3×3 pad 1 over 48³, direct ms / Winograd ms at one thread:
/// 8→8 0.99, 12→8 0.97 (direct: its 8-channel groups are full), 16→8 1.09, 24→8 1.14;
/// 8→12 1.37, 8→16 1.30, 8→32 1.51, 16→16 1.43, 16→32 1.82; over 96³ 8→16 57 / 49,
/// 16→16 113 / 78, 8→32 115 / 84. Not from fewer input channels: 4→32 gains at 48³
/// (1.19) but loses over 128³ (143 / 149 ms, multimodal-first-layer 141 / 153), where
/// writing the 268 MB output dominates and the direct kernel's prefetched stores win.
const WINOGRAD_MIN_CHANNELS: usize = 16;

/// Whether a `c_in → c_out` 3×3×3 shape has the channels for Winograd (see
/// [`WINOGRAD_MIN_CHANNELS`]).
fn winograd_channels(c_in: usize, c_out: usize) -> bool {
    (c_in >= 8 && c_out >= 12) || (c_in >= WINOGRAD_MIN_CHANNELS && c_out >= 8)
}
/// ... and at least this share of its lanes compute real outputs (`winograd::lane_use`;
/// measured on unet-deep, 8³ outputs at 0.25: 2.7× slower than im2col + GEMM).
const WINOGRAD_MIN_LANE_USE: f64 = 0.5;
/// The direct strategy is the default wherever it runs (and Winograd does not), whatever the
/// reduction length, if at least this share of its 16-lane row segments compute real
/// outputs (unet-deep, 8-voxel rows at 0.5: direct 65 ms, im2col + GEMM 29 ms at one
/// thread). Short reductions over long rows used to go to im2col + GEMM (K < 64); measured
/// again with today's direct kernel (AMD Zen 4, 2026-12-06, direct / im2col ms at 1 and 2
/// threads): 1→32 at 128³ 58.6 / 65.5 and 29.8 / 33.5; 1→32 at 64³ 6.9 / 8.8 and 3.6 / 4.4;
/// 2→32 at 96³ 38.6 / 43.1 and 21.3 / 23.0; 1→8 at 128³ 14.1 / 17.7 and 9.1 / 9.2; 2→16 at
/// 96³ 19.4 / 23.3 and 11.3 / 11.7; 4→16 1×3×3 over 32×128² 8.5 / 10.8 and 5.2 / 5.1; 1×1×1
/// stride 2 16→32 1.5 / 2.2 and 1.0 / 1.0; 1→32 dilation 2 23.6 / 26.7 and 13.4 / 13.6;
/// the one loss, 1→16 at 128³, 30.1 / 28.4 and 15.1 / 14.5.
const DIRECT_MIN_LANE_USE: f64 = 0.75;
/// ... unless the output has fewer channels than this: im2col's cost per output grows as
/// the channels that share each column shrink (small-batch-odd, 5 channels, 7-voxel rows:
/// direct 0.33 ms, im2col + GEMM 1.2 ms).
const DIRECT_IDLE_LANES_MAX_COUT: usize = 64;
/// A strided 1×1×1 kernel into at least this many channels goes to im2col + GEMM (its im2col
/// is one strided gather, done once) rather than the direct kernel (which gathers the strided
/// input again for every 8-channel group): AMD Zen 4, 2026-12-07, 1×1×1 stride 2, direct /
/// im2col ms at 1 and 2 threads: 32→64 over 64³ 4.5–4.7 / 3.8–3.9 and 2.1–2.2 / 1.7–2.0;
/// 16→32 over 2 × 40³ 0.48–0.50 / 0.58–0.71 and 0.24–0.26 / 0.17–0.20.
const STRIDED_POINTWISE_IM2COL_MIN_COUT: usize = 64;
/// The sub-lattice split is the default for dilated shapes from this many input and output
/// channels (see `sublattice_wins`): 16→16 3×3×3 dilation 2 over 48³ (AMD Zen 4,
/// 2026-12-07, one thread): direct 14.6 ms, split 12.9–13.4 (16.2 before the Winograd
/// transforms went to registers).
const SUBLATTICE_MIN_CHANNELS: usize = 16;
/// A small volume's Winograd tile is split in voxels while the parts keep at least this
/// share of the whole tile's lane use (`winograd_tiling`).
const WINOGRAD_SPLIT_LANE_USE: f64 = 0.9;
/// Winograd's channel blocks, where a shape has few voxel tiles, hold at least this many
/// channels: each block repeats the tile's input transform.
const WINOGRAD_MIN_CHAN_BLOCK: usize = 128;
/// A shape with fewer voxel tiles than this splits its output channels into blocks ...
const MIN_TILES: usize = 16;
/// ... of at least this many channels (smaller blocks reread the columns too often) ...
const MIN_CHAN_BLOCK: usize = 32;
/// ... or, for im2col + GEMM, narrows its tiles down to this many voxels (unet-deep, 8³
/// outputs, 1 and 2 threads: 256 beat 512, 128 and 64, and beat channel blocks of 128).
const MIN_IM2COL_TILE_COLS: usize = 256;
/// Voxels per direct tile (whole rows where they fit) where the shape has `MIN_TILES` of
/// them: each tile copies its input box, whose rows overlap the next tile's by the filter's
/// height (1×3×3 8→16 over 24×160², one thread, AMD Zen 4, 2026-12-07: 17.2 ms at 1,024
/// voxels a tile, 16.4 at 4,096; reading the input in place, before the box, 15.5).
const DIRECT_TILE_COLS: usize = 4096;
/// Padding (in f32) after each im2col row.
pub(super) const COL_ROW_PAD: usize = 16;

impl Tiling {
    /// Default tiling for a shape, before any strategy's preferences: one channel block,
    /// independent of the thread count (determinism).
    pub fn for_shape(shape: &Conv3dShape) -> Self {
        let [od, oh, ow] = shape.out_dims();
        let plane = oh * ow;
        let slab_vox_target = (SLAB_BYTES / 4 / shape.c_out()).max(1);
        let slab_depth = (slab_vox_target / plane).clamp(1, od);
        let slab_vox = slab_depth * plane;
        // Whole output rows per tile when rows are short enough.
        Self::with_cols(
            shape,
            slab_depth,
            whole_rows(TARGET_TILE_COLS.min(slab_vox), ow),
        )
    }

    /// `tile_cols` wide tiles in slabs of `slab_depth` planes, the im2col buffer's rows to fit.
    fn with_cols(shape: &Conv3dShape, slab_depth: usize, tile_cols: usize) -> Self {
        let k = shape.reduction_len();
        let k_chunk = (COL_BUFFER_BYTES / 4 / tile_cols)
            .clamp(16, k.max(16))
            .min(k);
        Self {
            tile_cols,
            k_chunk,
            slab_depth,
            chan_block: shape.c_out(),
        }
    }

    /// Voxel tiles of the whole output (all batch items).
    fn voxel_tiles(&self, shape: &Conv3dShape) -> usize {
        let [od, oh, ow] = shape.out_dims();
        let slab_vox = self.slab_depth.min(od) * oh * ow;
        shape.batch()
            * od.div_ceil(self.slab_depth.max(1))
            * slab_vox.div_ceil(self.tile_cols.max(1))
    }

    /// The default tiling of `strategy` (Winograd adapts it further: whole plane pairs).
    /// Shapes with few voxel tiles (deep stages, small volumes) get more tiles so threads
    /// share them: im2col + GEMM narrows its tiles (down to `MIN_IM2COL_TILE_COLS`; splitting
    /// channels would repeat the im2col per block), the direct and pointwise paths, which
    /// read the input in place (direct: through a box of a run's input), split the output
    /// channels; direct tiles grow to `DIRECT_TILE_COLS` while 16 remain. Independent of
    /// the thread count.
    pub fn for_strategy(shape: &Conv3dShape, strategy: Strategy) -> Self {
        let mut t = Self::for_shape(shape);
        match strategy {
            Strategy::Im2colGemm => {
                let ow = shape.out_dims()[2];
                while t.voxel_tiles(shape) < MIN_TILES && t.tile_cols >= 2 * MIN_IM2COL_TILE_COLS {
                    t = Self::with_cols(shape, t.slab_depth, whole_rows(t.tile_cols / 2, ow));
                }
            }
            Strategy::Pointwise => {
                t = pointwise_tiling(shape, t);
                t.chan_block = chan_block_for(shape.c_out(), t.voxel_tiles(shape), MIN_CHAN_BLOCK);
            }
            Strategy::Direct => {
                // Wider tiles (fewer box rows copied twice) while the shape keeps enough
                // tiles for the threads.
                let [_, oh, ow] = shape.out_dims();
                let slab_vox = t.slab_depth * oh * ow;
                let mut target = DIRECT_TILE_COLS;
                while target > t.tile_cols {
                    let cols = whole_rows(target.min(slab_vox), ow).max(t.tile_cols);
                    let wide = Self::with_cols(shape, t.slab_depth, cols);
                    if wide.voxel_tiles(shape) >= MIN_TILES {
                        t = wide;
                        break;
                    }
                    target /= 2;
                }
                t.chan_block = chan_block_for(shape.c_out(), t.voxel_tiles(shape), MIN_CHAN_BLOCK);
            }
            // Its tiles are the undilated plan's; its own only cut the streamed slabs.
            Strategy::Sublattice => {}
            Strategy::Winograd => {
                // Each channel block repeats the tile's input transform.
                t = winograd_tiling(shape, t);
                t.chan_block =
                    chan_block_for(shape.c_out(), t.voxel_tiles(shape), WINOGRAD_MIN_CHAN_BLOCK);
            }
        }
        t
    }

    fn sanitized(self, shape: &Conv3dShape) -> Self {
        let [od, oh, ow] = shape.out_dims();
        let slab_depth = self.slab_depth.clamp(1, od);
        let c_out = shape.c_out();
        let chan_block = self
            .chan_block
            .clamp(1, c_out)
            .next_multiple_of(avx512::NC)
            .min(c_out);
        Self {
            tile_cols: self.tile_cols.clamp(1, slab_depth * oh * ow),
            k_chunk: self.k_chunk.clamp(1, shape.reduction_len()),
            slab_depth,
            chan_block,
        }
    }

    /// Channel blocks per voxel tile.
    pub fn chan_blocks(&self, c_out: usize) -> usize {
        c_out.div_ceil(self.chan_block.max(1))
    }
}

/// A 1×1×1 convolution streams its input planes from memory, every plane at once in the
/// microkernel's reduction loop: past about a dozen concurrent streams (input planes plus
/// output rows) the core's prefetchers stop keeping up and the loop waits on memory. So the
/// reduction runs in passes of a few input planes over a long tile, the partial sums kept
/// between passes (through the output itself for one channel group, in the L2-sized
/// accumulator for several). AMD Zen 4, 2026-12-07, one thread, ms: 16→4 over 128³ 12.4 →
/// 7.6 (passes of 8 planes over 32,768-voxel tiles; 16 planes at once 12.1, 4 at once 9.1);
/// 32→16 over 64³ 7.2 → 6.0, 128→64 over 32³ 9.9 → 7.6, 64→32 over 48³ 8.3 → 6.7 (passes of
/// 16 over 1,024–2,048-voxel tiles; 8 cost more in accumulator traffic than they saved).
///
/// Input planes per pass into one channel group (partial sums through the output).
const POINTWISE_NARROW_PASS_ROWS: usize = 8;
/// Voxels per tile into one channel group (each input plane's run long enough for the
/// prefetcher to follow it).
const POINTWISE_NARROW_TILE_COLS: usize = 32 * 1024;
/// Input planes per pass into several channel groups (partial sums in the accumulator).
const POINTWISE_WIDE_PASS_ROWS: usize = 16;
/// Voxels per tile into several channel groups, at most: the accumulator (`c_out` rows of a
/// tile) stays within `POINTWISE_ACC_BYTES` ...
const POINTWISE_WIDE_TILE_COLS: usize = 2048;
/// ... of the core's L2.
const POINTWISE_ACC_BYTES: usize = 512 * 1024;

/// The pointwise strategy's tiles and reduction passes (see `POINTWISE_NARROW_PASS_ROWS`):
/// long tiles for one channel group, L2-sized ones for several, never fewer than
/// `MIN_TILES` tiles where the volume allows it (threads share them). Independent of the
/// thread count.
fn pointwise_tiling(shape: &Conv3dShape, t: Tiling) -> Tiling {
    let [od, oh, ow] = shape.out_dims();
    let slab_vox = t.slab_depth * oh * ow;
    let voxels = shape.batch() * od * oh * ow;
    let k = shape.reduction_len();
    let (max_cols, pass) = if shape.c_out() <= avx512::NC {
        (POINTWISE_NARROW_TILE_COLS, POINTWISE_NARROW_PASS_ROWS)
    } else {
        let acc_cols = POINTWISE_ACC_BYTES / 4 / shape.c_out();
        (
            acc_cols.clamp(MIN_IM2COL_TILE_COLS, POINTWISE_WIDE_TILE_COLS),
            POINTWISE_WIDE_PASS_ROWS,
        )
    };
    // Whole microkernel blocks, enough tiles for the threads, no more than a slab.
    let cols = (voxels / MIN_TILES)
        .min(max_cols)
        .max(MIN_IM2COL_TILE_COLS)
        .next_multiple_of(avx512::MV)
        .min(slab_vox);
    // An input the caches hold is read from them however many planes the loop walks at
    // once: one pass, no partial sums (see `POINTWISE_CACHED_INPUT_BYTES`).
    let pass = if shape.c_in() * shape.in_voxels() * 4 <= POINTWISE_CACHED_INPUT_BYTES {
        k
    } else {
        pass
    };
    // (A k×1×1 filter's passes also stop at each tap: `Conv3dPlan::pass_rows`.)
    Tiling {
        tile_cols: cols,
        k_chunk: pass.min(k),
        ..t
    }
}

/// Input channels from which a k×1×1 filter runs as k pointwise passes (below, the direct
/// kernel, whose reduction is short enough).
const DEPTH_PASSES_MIN_CIN: usize = 8;

/// A batch item's input up to this size (bytes) stays in the caches (L2, or L3 after the
/// layer that wrote it): the pointwise reduction then runs in one pass. AMD Zen 4,
/// 2026-12-07, one thread, alternating processes (medians, noisy machine): 256→128 over 8³
/// (0.5 MiB) 0.43 → 0.31 ms, 320→320 over 6³ 0.57 → 0.41, 128→64 over 16³ (2 MiB) 0.72 →
/// 0.65, 32→32 over 32³ (4 MiB) 1.30 → 0.91, 64→32 over 32³ (8 MiB) level by median, 2.36 →
/// 1.99 by minimum; 128→64 over 32³ (16 MiB) is faster in passes (7.0 against 8.3 ms, by
/// minimum).
const POINTWISE_CACHED_INPUT_BYTES: usize = 8 << 20;

/// Output channels per tile for `c_out` channels over `voxel_tiles` voxel tiles: all of them,
/// unless there are fewer than `MIN_TILES` voxel tiles; then blocks of at least
/// `MIN_CHAN_BLOCK` channels (multiples of the microkernel's 8), enough of them for about
/// `MIN_TILES` tiles in all. Depends on the shape only (determinism).
fn chan_block_for(c_out: usize, voxel_tiles: usize, min_block: usize) -> usize {
    if voxel_tiles >= MIN_TILES || c_out < 2 * min_block {
        return c_out;
    }
    let blocks = MIN_TILES
        .div_ceil(voxel_tiles)
        .min(c_out / min_block)
        .max(1);
    c_out
        .div_ceil(blocks)
        .next_multiple_of(avx512::NC)
        .min(c_out)
}

/// `cols` cut down to whole output rows of `ow` voxels where a row fits.
fn whole_rows(cols: usize, ow: usize) -> usize {
    if ow <= cols {
        cols / ow * ow
    } else {
        cols
    }
}

/// Share of the direct kernel's lanes that compute real outputs, discounted by the extra
/// cost of vectors that span two rows where it uses them (`avx512::direct_pieces`).
fn direct_lane_use(shape: &Conv3dShape) -> f64 {
    let ow = shape.out_dims()[2];
    let one_row = avx512::direct_row_lane_use(ow);
    if avx512::direct_pieces(ow) > 1 {
        one_row.max(avx512::TWO_ROW_LANE_USE / avx512::TWO_ROW_COST)
    } else {
        one_row
    }
}

impl Conv3dPlan {
    /// The default strategy for the plan's shape and GEMM: the cheapest one it supports.
    pub(super) fn default_strategy(&self) -> Strategy {
        let shape = &self.shape;
        if self.supports(Strategy::Pointwise)
            && (shape.kernel_dims()[0] == 1 || shape.c_in() >= DEPTH_PASSES_MIN_CIN)
        {
            Strategy::Pointwise
        } else if self.sublattice_wins() {
            Strategy::Sublattice
        } else if self.supports(Strategy::Winograd)
            && winograd_channels(shape.c_in(), shape.c_out())
            && winograd::lane_use(shape) >= WINOGRAD_MIN_LANE_USE
        {
            Strategy::Winograd
        } else if shape.kernel_dims() == [1, 1, 1]
            && shape.params.stride != [1; 3]
            && shape.c_out() >= STRIDED_POINTWISE_IM2COL_MIN_COUT
        {
            // Strided pointwise: im2col's gather is done once for all output channels.
            // (Strided 3×3×3 layers from many channels went to im2col too until the direct
            // kernel read an input box: now direct / im2col ms at 1 and 2 threads, AMD Zen 4,
            // 2026-12-07, alternating: 32→64 over 64³ 37.7 / 44.9 and 19.3 / 23.3, 32→48
            // over 64³ 30.2 / 36.3 and 14.5 / 18.4, 64→128 over 32³ 20.5 / 20.8 and 10.3 /
            // 11.0, 64→64 over 23×37×41 14.1 / 14.9 and 7.1 / 7.6, 32→64 stride 1×2×2 over
            // 16×96² 43.8 / 53.6 and 25.0 / 27.3; one loss, 32→64 over 48³ 22.3 / 21.1 and
            // 11.4 / 10.8.)
            Strategy::Im2colGemm
        } else if self.supports(Strategy::Direct)
            && (direct_lane_use(shape) >= DIRECT_MIN_LANE_USE
                || shape.c_out() < DIRECT_IDLE_LANES_MAX_COUT)
        {
            Strategy::Direct
        } else {
            Strategy::Im2colGemm
        }
    }

    /// Whether `strategy` can compute this shape on this CPU.
    pub fn supports(&self, strategy: Strategy) -> bool {
        let p = self.shape.params;
        match strategy {
            Strategy::Im2colGemm => true,
            Strategy::Pointwise => {
                let [kd, kh, kw] = self.shape.kernel_dims();
                let in_plane = kh == 1
                    && kw == 1
                    && p.stride == [1; 3]
                    && p.padding[1..] == [0, 0]
                    && p.dilation[1..] == [1, 1];
                // A k×1×1 filter: k pointwise passes over depth-shifted planes (our
                // microkernel only; the portable GEMM reads one uniform row stride).
                in_plane && (kd == 1 && p.padding[0] == 0 || self.gemm.is_microkernel())
            }
            Strategy::Direct => {
                self.gemm == GemmImpl::Avx512 && avx512::direct_supports_width_stride(p.stride[2])
            }
            Strategy::Winograd => self.gemm.is_microkernel() && winograd::eligible(&self.shape),
            Strategy::Sublattice => super::sublattice::inner_shape(&self.shape).is_some(),
        }
    }

    /// A dilated shape splits into sub-lattices by default where their undilated plan runs
    /// Winograd and the channels are enough to pay for the split's two copies (input and
    /// output): 32→32 3×3×3 dilation 2 over 64³, one thread (AMD Zen 4, 2026-12-07): direct
    /// 160 ms, split 93 ms (the sub-lattices' Winograd 76 ms); over 48³ 55.9 / 41.7 ms, at
    /// two threads 29.1 / 23.6; 16→16 over 48³ 14.6 / 13.2 ms. Where the undilated plan
    /// would take the direct kernel too, the split only adds its copies (and shorter rows:
    /// 16→16 over 48³, split with direct sub-lattices 19.3 ms).
    fn sublattice_wins(&self) -> bool {
        let shape = &self.shape;
        if shape.c_in().min(shape.c_out()) < SUBLATTICE_MIN_CHANNELS {
            return false;
        }
        super::sublattice::inner_shape(shape).is_some_and(|s| {
            Conv3dPlan::new(s, self.activation.clone())
                .with_gemm(self.gemm)
                .is_ok_and(|p| p.strategy() == Strategy::Winograd)
        })
    }

    /// Why `strategy` cannot compute this shape on this CPU with this GEMM (`None` where
    /// [`supports`](Self::supports) is true): the shape's limits first, then the GEMM.
    pub(super) fn unsupported_reason(&self, strategy: Strategy) -> Option<String> {
        if self.supports(strategy) {
            return None;
        }
        let p = self.shape.params;
        let kernel = self.shape.kernel_dims();
        match strategy {
            Strategy::Im2colGemm => {}
            Strategy::Pointwise => {
                return Some(format!(
                    "needs a 1x1x1 filter with stride 1 and no padding, or (with our \
                     microkernel) a kx1x1 filter with stride 1, padding and dilation only in \
                     depth (this shape: {} filter, stride {}, padding {}, dilation {}; GEMM {})",
                    xyz(kernel),
                    xyz(p.stride),
                    xyz(p.padding),
                    xyz(p.dilation),
                    self.gemm.name()
                ));
            }
            Strategy::Direct => {
                if !avx512::direct_supports_width_stride(p.stride[2]) {
                    return Some(format!(
                        "needs width stride 1 or 2 (this shape: {})",
                        p.stride[2]
                    ));
                }
            }
            Strategy::Sublattice => {
                return Some(super::sublattice::unsupported_reason(&self.shape));
            }
            Strategy::Winograd => {
                if !winograd::eligible(&self.shape) {
                    return Some(format!(
                        "needs a 3x3x3 filter, stride 1 and dilation 1 (this shape: {} filter, \
                         stride {}, dilation {})",
                        xyz(kernel),
                        xyz(p.stride),
                        xyz(p.dilation)
                    ));
                }
            }
        }
        // The shape fits: what is missing is the GEMM.
        let need = match strategy {
            Strategy::Direct => GemmImpl::Avx512,
            _ => GemmImpl::best_available(),
        };
        Some(
            match (strategy, need.available() && need.is_microkernel()) {
                (Strategy::Direct, false) => "needs AVX-512 (avx512f), which this CPU lacks".into(),
                (Strategy::Direct, true) => format!(
                    "needs the AVX-512 GEMM, but this plan uses {}",
                    self.gemm.name()
                ),
                (_, true) => format!(
                    "needs our microkernel ({}), but this plan uses the portable GEMM",
                    need.name()
                ),
                (_, false) => "needs AVX-512 or AVX2 + FMA, which this CPU lacks".into(),
            },
        )
    }

    /// The default tiling of the plan's shape and strategy.
    pub(super) fn default_tiling(&self) -> Tiling {
        self.adapt_tiling(Tiling::for_strategy(&self.shape, self.strategy))
    }

    /// Tiling constraints of the strategy (Winograd: whole plane pairs).
    pub(super) fn adapt_tiling(&self, t: Tiling) -> Tiling {
        let t = t.sanitized(&self.shape);
        match self.strategy {
            Strategy::Winograd => winograd_tiling(&self.shape, t),
            _ => t,
        }
    }
}

/// Winograd works on pairs of output planes: tiles of whole plane pairs (enough for about
/// 24 lane groups), slabs of an even number of planes; the channel blocks as given.
fn winograd_tiling(shape: &Conv3dShape, t: Tiling) -> Tiling {
    let [od, oh, ow] = shape.out_dims();
    let plane = oh * ow;
    // Blocks fill lane groups across block rows and plane pairs.
    let blocks_per_pair = oh.div_ceil(2) * ow.div_ceil(2);
    let mut pairs = (24 * winograd::LANES).div_ceil(blocks_per_pair).max(1);
    // Small volumes (deep stages) in more than one voxel tile, so threads can share them by
    // voxels (each doing its own tiles' input transforms) rather than only by channel
    // blocks (each repeating the transform of the whole tile): n balanced tiles of at least
    // two lane groups, while their lanes stay as full (unet-deep, 8³ outputs: one 64-block
    // tile → two of 32).
    let item_pairs = od.div_ceil(2);
    let lane_use = |p: usize| {
        let blocks = p * blocks_per_pair;
        blocks as f64 / blocks.next_multiple_of(winograd::LANES) as f64
    };
    let whole = pairs.min(item_pairs);
    let min_pairs = (2 * winograd::LANES).div_ceil(blocks_per_pair).max(1);
    let mut n = 2;
    while shape.batch() * item_pairs.div_ceil(pairs) < MIN_TILES && n <= item_pairs {
        let cand = item_pairs.div_ceil(n);
        if cand < min_pairs || lane_use(cand) < WINOGRAD_SPLIT_LANE_USE * lane_use(whole) {
            break;
        }
        pairs = pairs.min(cand);
        n += 1;
    }
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
        chan_block: t.chan_block,
    }
}

/// `[a, b, c]` as `axbxc`.
fn xyz(v: [usize; 3]) -> String {
    format!("{}x{}x{}", v[0], v[1], v[2])
}
