//! The work of one tile, by strategy: im2col + GEMM (AVX-512 microkernel or the portable
//! `gemm` crate), pointwise, direct, Winograd, and the bias/activation epilogue.

use std::borrow::Cow;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::buffer::LineBuf;
use crate::im2col::{im2col_tile, Run};
use crate::{avx512, winograd};

use super::schedule::SlabInfo;
use super::{Conv3dPlan, Filters, GemmImpl, Strategy};

/// Adds the time since `since` to `slot` and restarts `since`.
fn lap(slot: &AtomicU64, since: &mut Instant) {
    let now = Instant::now();
    slot.fetch_add((now - *since).as_nanos() as u64, Ordering::Relaxed);
    *since = now;
}

/// The tensors of one run; `packed` holds the filters packed for the AVX-512 microkernel
/// (empty for the portable GEMM).
pub(super) struct Operands<'a> {
    input: &'a [f32],
    filters: &'a [f32],
    packed: Cow<'a, [f32]>,
    bias: Option<&'a [f32]>,
    /// Where each finished tile leaves its channels' moments, when the caller wants them.
    pub(super) stats: Option<&'a TileStats>,
}

/// Per voxel tile and output channel, the moments `(mean, M2)` of the tile's finished
/// values (`M2`: the sum of squared deviations from the mean), written once by the thread
/// that computed the tile; combined in tile order after the run, so the statistics do not
/// depend on the thread count.
pub(super) struct TileStats {
    c_out: usize,
    /// `[voxel tile][channel] → (mean, M2)` as f64 bits.
    slots: Vec<[AtomicU64; 2]>,
}

impl TileStats {
    pub(super) fn new(voxel_tiles: usize, c_out: usize) -> Self {
        Self {
            c_out,
            slots: (0..voxel_tiles * c_out)
                .map(|_| [AtomicU64::new(0), AtomicU64::new(0)])
                .collect(),
        }
    }

    fn put(&self, tile: usize, co: usize, mean: f64, m2: f64) {
        let s = &self.slots[tile * self.c_out + co];
        s[0].store(mean.to_bits(), Ordering::Relaxed);
        s[1].store(m2.to_bits(), Ordering::Relaxed);
    }

    pub(super) fn get(&self, tile: usize, co: usize) -> (f64, f64) {
        let s = &self.slots[tile * self.c_out + co];
        (
            f64::from_bits(s[0].load(Ordering::Relaxed)),
            f64::from_bits(s[1].load(Ordering::Relaxed)),
        )
    }
}

/// One thread's reusable buffers: the im2col tile and, when the reduction is split into
/// chunks, the tile's running sums (the large ones on cache lines, back to the kernel's
/// pool when dropped).
pub(super) struct Scratch {
    col: LineBuf,
    acc: LineBuf,
    segments: Vec<avx512::Segment>,
    /// im2col: the tile's output-row runs.
    runs: Vec<Run>,
    /// Winograd: transformed inputs and products of one 48-column block, and lane groups.
    wino_v: LineBuf,
    wino_m: LineBuf,
    /// Pointwise passes of a k×1×1 filter: zeros for taps in the depth padding.
    zero_row: LineBuf,
    lane_groups: Vec<winograd::LaneGroup>,
    /// Direct: a run's input box with its padding (`fill_direct_box`).
    halo: LineBuf,
}

/// Where a slab's tiles are written: `base` is output voxel `slab_start` of channel 0, and
/// channel `c` starts `c·row_stride` values later.
#[derive(Clone, Copy)]
pub(super) struct Dest {
    pub(super) base: *mut f32,
    pub(super) row_stride: usize,
}

/// Where one tile's values go: columns `v0 .. v0 + cols` (flat output voxels of one batch
/// item, whose input is `input_n`), channels `chans`, channel `c`'s row at `dst + c·rs`.
struct TileAt<'a> {
    input_n: &'a [f32],
    v0: usize,
    cols: usize,
    chans: Range<usize>,
    dst: *mut f32,
    rs: usize,
}

impl Conv3dPlan {
    pub(super) fn operands<'a>(
        &self,
        input: &'a [f32],
        filters: Filters<'a>,
        bias: Option<&'a [f32]>,
    ) -> Operands<'a> {
        let (filters, packed) = self.filter_operands(filters);
        Operands {
            input,
            filters,
            packed,
            bias,
            stats: None,
        }
    }

    pub(super) fn scratch(&self) -> Scratch {
        Scratch {
            col: LineBuf::zeroed(self.col_len()),
            acc: LineBuf::zeroed(self.acc_len()),
            segments: Vec::new(),
            runs: Vec::new(),
            wino_v: LineBuf::zeroed(self.wino_v_len()),
            wino_m: LineBuf::zeroed(self.wino_m_len()),
            zero_row: LineBuf::zeroed(self.zero_row_len()),
            lane_groups: Vec::new(),
            halo: LineBuf::zeroed(self.direct_box_len()),
        }
    }

    /// Computes the channels `chans` (whole channel blocks) of voxel tile `t` of `slab`: a
    /// tile, or on one thread several tiles of one voxel tile at once (Winograd: one input
    /// transform for them all). Each output's arithmetic is the same either way.
    ///
    /// # Safety
    /// `dest` must be valid for writes of `C_out` rows of `slab.voxels` values at stride
    /// `dest.row_stride`, and no other thread may access the columns of voxel tile `t` in
    /// the rows `chans` meanwhile.
    pub(super) unsafe fn compute_voxel_tile(
        &self,
        ops: &Operands<'_>,
        slab: &SlabInfo,
        t: usize,
        chans: Range<usize>,
        dest: Dest,
        scratch: &mut Scratch,
    ) {
        let (base, rs) = (dest.base, dest.row_stride);
        // SAFETY: forwarded caller's contract.
        unsafe { self.compute_voxel_tile_values(ops, slab, t, chans.clone(), dest, scratch) };
        let Some(stats) = ops.stats else {
            return;
        };
        // The tile's channels' moments while its rows are still in cache (an InstanceNorm
        // after the convolution then needs one pass, not two).
        let off = t * self.tiling.tile_cols;
        let cols = self.tiling.tile_cols.min(slab.voxels - off);
        let vtile = slab.first_tile / self.tiling.chan_blocks(self.shape.c_out()) + t;
        for co in chans {
            // SAFETY: row `co` of the tile just computed: `cols` values at
            // base + off + co·rs, inside the destination and owned by this thread.
            let row = unsafe { std::slice::from_raw_parts(base.add(off + co * rs), cols) };
            let (mean, var) = crate::ops::mean_var(row);
            stats.put(vtile, co, mean, var * cols as f64);
        }
    }

    /// The values of [`compute_voxel_tile`](Self::compute_voxel_tile).
    ///
    /// # Safety
    /// As [`compute_voxel_tile`](Self::compute_voxel_tile).
    unsafe fn compute_voxel_tile_values(
        &self,
        ops: &Operands<'_>,
        slab: &SlabInfo,
        t: usize,
        chans: Range<usize>,
        dest: Dest,
        scratch: &mut Scratch,
    ) {
        let shape = &self.shape;
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
        let at = TileAt {
            input_n,
            v0,
            cols,
            chans: chans.clone(),
            dst,
            rs,
        };
        let clock = &*self.clock;
        let mut since = Instant::now();
        if self.strategy == Strategy::Direct {
            // SAFETY: forwarded caller's contract (dst rows of `cols` values at stride rs).
            unsafe {
                self.direct_tile(ops, &at, &mut scratch.segments, scratch.halo.as_mut_slice())
            };
            lap(&clock.gemm, &mut since);
            self.activation_pass(dst, rs, cols, chans);
            lap(&clock.epilogue, &mut since);
            return;
        }
        if self.strategy == Strategy::Winograd {
            // SAFETY: forwarded caller's contract.
            unsafe { self.winograd_tile(ops, &at, scratch) };
            return;
        }
        let kc = self.pass_rows();
        // Partial sums between passes: in the output rows themselves or in the accumulator.
        let (acc, accs) = if self.sums_in_output() {
            (dst, rs)
        } else {
            (scratch.acc.as_mut_slice().as_mut_ptr(), self.col_stride())
        };
        if self.depth_passes() {
            // SAFETY: forwarded caller's contract; `acc` as above.
            unsafe {
                self.depth_passes_tile(ops, &at, (acc, accs), scratch.zero_row.as_mut_slice())
            };
            lap(&clock.gemm, &mut since);
            self.activation_pass(dst, rs, cols, chans);
            lap(&clock.epilogue, &mut since);
            return;
        }
        let stride = self.col_stride();
        let mut r0 = 0;
        while r0 < k {
            let r1 = (r0 + kc).min(k);
            // The chunk's column matrix: rows r0..r1, `cols` wide, row stride `lda`.
            let (a, lda) = match self.strategy {
                // (A sub-lattice plan never computes tiles itself: its undilated plan does.)
                Strategy::Pointwise
                | Strategy::Direct
                | Strategy::Winograd
                | Strategy::Sublattice => (
                    input_n[r0 * shape.in_voxels() + v0..].as_ptr(),
                    shape.in_voxels(),
                ),
                Strategy::Im2colGemm => {
                    let col = scratch.col.as_mut_slice();
                    im2col_tile(
                        shape,
                        input_n,
                        v0,
                        cols,
                        r0..r1,
                        col,
                        stride,
                        &mut scratch.runs,
                    );
                    lap(&clock.im2col, &mut since);
                    (col.as_ptr(), stride)
                }
            };
            match self.gemm {
                // SAFETY: `a` holds rows r0..r1 (each `cols` values) at stride lda; `packed`
                // holds all groups × k rows; dst per the caller's contract; `acc` is either
                // dst or the accumulator of c_out rows of `col_stride() >= cols` values.
                GemmImpl::Avx512 | GemmImpl::Avx2 => unsafe {
                    self.micro_chunk(ops, a, lda, r0..r1, cols, chans.clone(), dst, rs, acc, accs)
                },
                // SAFETY: lhs = filters[chans, r0..r1] (row stride k, in bounds); rhs = `a`
                // as above; dst rows `chans` per the caller's contract. The first chunk
                // overwrites dst (read_dst = false), later chunks accumulate in a fixed
                // order.
                GemmImpl::Portable => unsafe {
                    gemm::gemm(
                        chans.len(),
                        cols,
                        r1 - r0,
                        dst.add(chans.start * rs),
                        1,
                        rs as isize,
                        r0 > 0,
                        ops.filters.as_ptr().add(chans.start * k + r0),
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
            GemmImpl::Avx512 | GemmImpl::Avx2 => None,
            GemmImpl::Portable => ops.bias,
        };
        if bias.is_some() || !self.activation.is_none() {
            for co in chans {
                // SAFETY: row `co` of the tile: `cols` values at dst + co·row_stride, inside
                // the destination and owned by this tile (caller's contract).
                let row = unsafe { std::slice::from_raw_parts_mut(dst.add(co * rs), cols) };
                self.activation
                    .channel(co)
                    .bias_apply(row, bias.map_or(0.0, |b| b[co]));
            }
        }
        lap(&clock.epilogue, &mut since);
    }

    /// A tile of a k×1×1 filter (stride 1, padding and dilation only in depth) by pointwise
    /// passes: the tile cut at output planes; for each plane piece and tap `a`, the input
    /// plane `oz + a·dilation − padding` of every input channel is, voxel for voxel, the
    /// piece's column matrix (row stride one input channel), read in place; a plane in the
    /// padding reads `zero_row` (row stride 0). The weights are packed taps outside,
    /// channels inside, so each pass's rows are consecutive.
    ///
    /// # Safety
    /// As `compute_voxel_tile`; `acc` as in `micro_chunk` (the accumulator or `dst`);
    /// `zero_row` holds at least `cols` zeros.
    unsafe fn depth_passes_tile(
        &self,
        ops: &Operands<'_>,
        at: &TileAt<'_>,
        (acc, accs): (*mut f32, usize),
        zero_row: &[f32],
    ) {
        let TileAt {
            input_n,
            v0,
            cols,
            ref chans,
            dst,
            rs,
        } = *at;
        let chans = chans.clone();
        let shape = &self.shape;
        let k = shape.reduction_len();
        let c_in = shape.c_in();
        let [_, oh, ow] = shape.out_dims();
        let d = shape.in_dims()[0];
        let plane = oh * ow;
        let in_vox = shape.in_voxels();
        let (pd, dd) = (shape.params.padding[0], shape.params.dilation[0]);
        let kc = self.pass_rows();
        let mut p0 = 0;
        while p0 < cols {
            let v = v0 + p0;
            let (oz, in_plane) = (v / plane, v % plane);
            let len = (plane - in_plane).min(cols - p0);
            let mut r0 = 0;
            while r0 < k {
                let (a, ci) = (r0 / c_in, r0 % c_in);
                let r1 = (r0 + kc).min((a + 1) * c_in);
                let iz = (oz + a * dd) as isize - pd as isize;
                let (rows, lda) = if iz >= 0 && (iz as usize) < d {
                    let at = ci * in_vox + iz as usize * plane + in_plane;
                    (input_n[at..].as_ptr(), in_vox)
                } else {
                    (zero_row[..len].as_ptr(), 0)
                };
                // SAFETY: rows r0..r1 of the piece's column matrix: input channels ci..
                // ci + (r1 − r0) of plane iz from column `in_plane` (len values each, inside
                // the item's input), or the zero row; columns p0.. p0 + len of the tile's
                // destination and partial sums (caller's contract).
                unsafe {
                    self.micro_chunk(
                        ops,
                        rows,
                        lda,
                        r0..r1,
                        len,
                        chans.clone(),
                        dst.add(p0),
                        rs,
                        acc.add(p0),
                        accs,
                    )
                };
                r0 = r1;
            }
            p0 += len;
        }
    }

    /// Applies the activation to the channels `chans` of a finished tile (bias already
    /// added).
    fn activation_pass(&self, dst: *mut f32, rs: usize, cols: usize, chans: Range<usize>) {
        if self.activation.is_none() {
            return;
        }
        for co in chans {
            // SAFETY: row `co` of a tile this thread owns (see `compute_voxel_tile`).
            let row = unsafe { std::slice::from_raw_parts_mut(dst.add(co * rs), cols) };
            self.activation.channel(co).bias_apply(row, 0.0);
        }
    }

    /// A tile by the direct strategy, in runs of output voxels (the tile cut where it
    /// starts or ends inside an output plane): each run's input box is copied, padding made
    /// explicit, into `halo` (see [`avx512::DirectBox`]), then the run is split into vectors
    /// of at most 16 voxels (one or two row pieces each), three vectors × every 8-channel
    /// group of `chans` per microkernel call (whole groups of 8 but the last).
    ///
    /// # Safety
    /// As `compute_voxel_tile`; `halo` holds at least `direct_box_len()` values.
    unsafe fn direct_tile(
        &self,
        ops: &Operands<'_>,
        at: &TileAt<'_>,
        segments: &mut Vec<avx512::Segment>,
        halo: &mut [f32],
    ) {
        let TileAt {
            input_n, v0, dst, ..
        } = *at;
        #[cfg(target_arch = "x86_64")]
        {
            use avx512::{DirectGeom, DIRECT_SEGS, NC};
            let shape = &self.shape;
            let [_, oh, ow] = shape.out_dims();
            let plane = oh * ow;
            let p = shape.params;
            let groups = at.chans.start / NC..at.chans.end.div_ceil(NC);
            let bias = ops.bias.map_or(std::ptr::null(), |b| b.as_ptr());
            let prefetch = shape.output_len().saturating_mul(4) > avx512::DIRECT_PREFETCH_MIN_BYTES;
            let end = v0 + at.cols;
            let mut v = v0;
            while v < end {
                let e = direct_run_end(v, end, plane);
                let bx = self.direct_box(v, e);
                self.fill_direct_box(input_n, bx, halo);
                let geom = DirectGeom {
                    c_in: shape.c_in(),
                    kernel: shape.kernel_dims(),
                    stride: p.stride,
                    dilation: p.dilation,
                    halo: bx,
                    prefetch,
                };
                avx512::direct_segments(v, e - v, oh, ow, avx512::direct_pieces(ow), segments);
                // SAFETY: the run's columns start v − v0 into the tile.
                let dst = unsafe { dst.add(v - v0) };
                for segs in segments.chunks(DIRECT_SEGS) {
                    // SAFETY: `halo` holds the run's box and its slack (`fill_direct_box`);
                    // `packed` holds every group's k·NC weights; rows chans of the tile at
                    // stride rs cover every vector's columns (caller's contract); AVX-512F
                    // and the shape limits were checked by `supports(Direct)`.
                    unsafe {
                        avx512::block_direct(
                            &geom,
                            halo.as_ptr(),
                            segs,
                            ops.packed.as_ptr(),
                            groups.clone(),
                            at.chans.end,
                            dst,
                            at.rs,
                            bias,
                        )
                    };
                }
                v = e;
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (ops, input_n, v0, dst, segments, halo);
            unreachable!("Strategy::Direct is only chosen on x86_64");
        }
    }

    /// The box of input values that output voxels `v .. e` of one item read (`e` from
    /// [`direct_run_end`]: inside one plane, or whole planes): its planes and rows (all rows
    /// for whole planes), every column the output rows read.
    pub(super) fn direct_box(&self, v: usize, e: usize) -> avx512::DirectBox {
        let shape = &self.shape;
        let [_, oh, ow] = shape.out_dims();
        let [kd, kh, kw] = shape.kernel_dims();
        let p = shape.params;
        let plane = oh * ow;
        let (z0, z1) = (v / plane, (e - 1) / plane);
        let (y0, y1) = if z0 == z1 {
            ((v % plane) / ow, ((e - 1) % plane) / ow)
        } else {
            (0, oh - 1)
        };
        let span = avx512::DirectBox::span;
        let planes = span(z1 - z0, p.stride[0], kd, p.dilation[0]);
        let rows = span(y1 - y0, p.stride[1], kh, p.dilation[1]);
        let row_len = span(ow - 1, p.stride[2], kw, p.dilation[2]);
        avx512::DirectBox {
            origin: [z0 * p.stride[0], y0 * p.stride[1]],
            planes,
            rows,
            row_len,
            chan_len: planes * rows * row_len,
        }
    }

    /// Copies box `bx` from `input_n` into `halo`, the padding as zeros, row by row in
    /// whole vectors (a row's last vector runs on into the next row, written after it, or
    /// into the slack).
    pub(super) fn fill_direct_box(&self, input_n: &[f32], bx: avx512::DirectBox, halo: &mut [f32]) {
        let shape = &self.shape;
        let [d, h, w] = shape.in_dims();
        let [pd, ph, pw] = shape.params.padding;
        let in_vox = d * h * w;
        let row_len = bx.row_len;
        // Box column j is input column j − pw.
        let (c0, c1) = (pw.min(row_len), (pw + w).min(row_len));
        assert!(
            shape.c_in() * bx.chan_len + avx512::DIRECT_BOX_SLACK <= halo.len(),
            "the direct box exceeds its buffer"
        );
        let mut at = halo.as_mut_ptr();
        for ci in 0..shape.c_in() {
            for bz in 0..bx.planes {
                let iz = (bx.origin[0] + bz).checked_sub(pd).filter(|&z| z < d);
                for by in 0..bx.rows {
                    let iy = (bx.origin[1] + by).checked_sub(ph).filter(|&y| y < h);
                    let src = match (iz, iy) {
                        (Some(iz), Some(iy)) => {
                            let from = ci * in_vox + (iz * h + iy) * w;
                            &input_n[from..from + (c1 - c0)]
                        }
                        _ => &[],
                    };
                    // SAFETY: the row and the 15 values after it lie inside `halo` (checked
                    // above: rows in order, the slack after the last); `src` is a slice.
                    unsafe {
                        avx512::fill_box_row(at, row_len, src, c0);
                        at = at.add(row_len);
                    }
                }
            }
        }
    }

    /// A tile of whole output plane pairs by Winograd F(2×2×2, 3×3×3) for the channels
    /// `chans` (whole groups of 8 but the last), 48 columns (three lane groups) at a time:
    /// input transform, 64 microkernel GEMMs, output transform.
    ///
    /// # Safety
    /// As `compute_voxel_tile`.
    unsafe fn winograd_tile(&self, ops: &Operands<'_>, at: &TileAt<'_>, scratch: &mut Scratch) {
        let TileAt {
            input_n,
            v0,
            cols,
            ref chans,
            dst,
            rs,
        } = *at;
        let chans = chans.clone();
        #[cfg(target_arch = "x86_64")]
        {
            use avx512::NC;
            use winograd::{xi_stride, COLS, GROUPS, LANES, V_CH_STRIDE, XI};
            let shape = &self.shape;
            let [_, oh, ow] = shape.out_dims();
            let plane = oh * ow;
            let z_start = v0 / plane;
            let planes = cols.div_ceil(plane);
            let (c_in, c_out) = (shape.c_in(), shape.c_out());
            let n_groups = c_out.div_ceil(NC);
            let ms = xi_stride(c_out);
            let lane_groups = &mut scratch.lane_groups;
            lane_groups.clear();
            winograd::lane_groups(
                z_start / 2..(z_start + planes).div_ceil(2),
                oh,
                ow,
                lane_groups,
            );
            let clock = &*self.clock;
            let mut since = Instant::now();
            let wino_v = scratch.wino_v.as_mut_slice();
            let wino_m = scratch.wino_m.as_mut_slice();
            for block in lane_groups.chunks(GROUPS) {
                // SAFETY: AVX-512F was detected when the plan chose this strategy.
                unsafe { winograd::input_transform(self.gemm, shape, input_n, block, wino_v) };
                lap(&clock.im2col, &mut since);
                let nvox = block.len() * LANES;
                for xi in 0..XI {
                    for g in chans.start / NC..chans.end.div_ceil(NC) {
                        let nch = NC.min(chans.end - g * NC);
                        // SAFETY: V holds c_in channel rows (stride V_CH_STRIDE) with
                        // `nvox` values at position ξ; the packed U[ξ][g] holds c_in·NC
                        // weights; M's panel ξ rows g·NC.. g·NC+nch (stride COLS) are inside
                        // wino_m.
                        unsafe {
                            micro_block(
                                self.gemm,
                                c_in,
                                wino_v[xi * COLS..].as_ptr(),
                                V_CH_STRIDE,
                                ops.packed[(xi * n_groups + g) * c_in * NC..].as_ptr(),
                                std::ptr::null(),
                                0,
                                wino_m[xi * ms + g * NC * COLS..].as_mut_ptr(),
                                COLS,
                                nch,
                                nvox,
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
                        self.gemm,
                        shape,
                        wino_m,
                        block,
                        chans.clone(),
                        ops.bias,
                        &self.activation,
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
            let _ = (ops, input_n, v0, cols, chans, dst, rs, scratch);
            unreachable!("Strategy::Winograd is only chosen on x86_64");
        }
    }

    /// One reduction chunk `rows` of a tile's channels `chans` (whole groups of 8 but the
    /// last) with our microkernel. A single chunk
    /// writes `dst` directly (bias fused); otherwise the first chunks accumulate in `acc`
    /// and the last one adds bias and writes `dst`.
    ///
    /// # Safety
    /// As `compute_voxel_tile`; `a` holds the chunk's rows (`cols` values each) at stride `lda`;
    /// when the tile is chunked, `acc` holds c_out rows of (at least) `cols` values at stride
    /// `accs`: the accumulator, or `dst` itself (then `accs == rs`).
    #[allow(clippy::too_many_arguments)]
    unsafe fn micro_chunk(
        &self,
        ops: &Operands<'_>,
        a: *const f32,
        lda: usize,
        rows: Range<usize>,
        cols: usize,
        chans: Range<usize>,
        dst: *mut f32,
        rs: usize,
        acc: *mut f32,
        accs: usize,
    ) {
        #[cfg(target_arch = "x86_64")]
        {
            use avx512::{MV, NC};
            let k = self.shape.reduction_len();
            let first = rows.start == 0;
            let last = rows.end == k;
            // A block from channel c and column o: where its partial sums come from (none
            // in the first chunk) and where it writes (the destination in the last), with
            // their row strides.
            let sums = |c: usize, o: usize| {
                let (src, lds) = if first {
                    (std::ptr::null(), 0)
                } else {
                    (acc.wrapping_add(c * accs + o) as *const f32, accs)
                };
                let (out, ldo) = if last {
                    (dst.wrapping_add(c * rs + o), rs)
                } else {
                    (acc.wrapping_add(c * accs + o), accs)
                };
                (src, lds, out, ldo)
            };
            // A 1×1×1 head into at most 4 channels (one narrow group): blocks of 96 voxels ×
            // 4 channels, every FMA an output's.
            if self.gemm == GemmImpl::Avx512
                && self.strategy == super::Strategy::Pointwise
                && chans.len() <= 4
            {
                let b = ops.packed[(chans.start / NC * k + rows.start) * NC + chans.start % NC..]
                    .as_ptr();
                let bias = match (last, ops.bias) {
                    (true, Some(bias)) => bias[chans.start..].as_ptr(),
                    _ => std::ptr::null(),
                };
                for p in 0..cols.div_ceil(avx512::MV_NARROW) {
                    let o = p * avx512::MV_NARROW;
                    let nvox = avx512::MV_NARROW.min(cols - o);
                    // SAFETY: columns o..o + nvox of the tile, rows `chans` of the
                    // destination and of the partial sums (caller's contract); `b` is the
                    // group's packed weights from row rows.start and channel chans.start
                    // (rows.len() rows of NC values); AVX-512F checked by the plan's GEMM.
                    unsafe {
                        let (src, lds, out, ldo) = sums(chans.start, o);
                        avx512::block_96x4(
                            rows.len(),
                            a.add(o),
                            lda,
                            b,
                            src,
                            lds,
                            out,
                            ldo,
                            chans.len(),
                            nvox,
                            bias,
                        )
                    };
                }
                return;
            }
            // Voxel blocks outside, channel groups inside: one block's columns (kc rows of
            // 48 values) stay in L1 while every group's weights stream past them.
            for p in 0..cols.div_ceil(MV) {
                let nvox = MV.min(cols - p * MV);
                let o = p * MV;
                for g in chans.start / NC..chans.end.div_ceil(NC) {
                    let nch = NC.min(chans.end - g * NC);
                    let b = ops.packed[(g * k + rows.start) * NC..].as_ptr();
                    let bias = match (last, ops.bias) {
                        (true, Some(bias)) => bias[g * NC..].as_ptr(),
                        _ => std::ptr::null(),
                    };
                    // SAFETY: every pointer below stays inside the buffers described in this
                    // function's contract: block (g, p) covers channels g·NC.. g·NC+nch and
                    // columns o..o+nvox of the tile; the plan checked that the CPU runs
                    // its GEMM.
                    unsafe {
                        let (src, lds, out, ldo) = sums(g * NC, o);
                        micro_block(
                            self.gemm,
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
            let _ = (ops, a, lda, rows, cols, chans, dst, rs, acc, accs);
            unreachable!("our microkernel is only chosen on x86_64");
        }
    }
}

/// One microkernel block on `gemm`'s ISA (see [`avx512::block_48x8`]; both give the same
/// bits).
///
/// # Safety
/// `gemm` is `Avx512` or `Avx2` and the CPU runs it; the rest as `avx512::block_48x8`.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn micro_block(
    gemm: GemmImpl,
    kc: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    src: *const f32,
    lds: usize,
    dst: *mut f32,
    ldd: usize,
    nch: usize,
    nvox: usize,
    bias: *const f32,
) {
    // SAFETY: forwarded contract.
    unsafe {
        match gemm {
            GemmImpl::Avx512 => {
                avx512::block_48x8(kc, a, lda, b, src, lds, dst, ldd, nch, nvox, bias)
            }
            _ => crate::avx2::block_48x8(kc, a, lda, b, src, lds, dst, ldd, nch, nvox, bias),
        }
    }
}

/// Where the direct strategy's run of output voxels from `v` ends (`end` at most): at the
/// end of `v`'s plane if `v` starts inside one or less than a plane is left, else after the
/// whole planes left. A run's input box is then its rows of a few planes, or whole planes.
pub(super) fn direct_run_end(v: usize, end: usize, plane: usize) -> usize {
    let in_plane = v % plane;
    if in_plane != 0 || end - v < plane {
        end.min(v - in_plane + plane)
    } else {
        v + (end - v) / plane * plane
    }
}
