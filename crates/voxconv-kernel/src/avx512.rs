//! AVX-512 GEMM microkernel specialised for Conv3D tiles.
//!
//! Computes a block of 48 output voxels × 8 output channels: 24 zmm accumulators, three vector
//! loads of the column matrix (48 consecutive voxels of one reduction row) and eight broadcast
//! weights per reduction step. The column matrix is read in place at any row stride (`lda`),
//! so the im2col buffer, or the input itself for a pointwise kernel, needs no packing; the
//! weights are packed once per run into groups of 8 channels (`[group][k][8]`).
//!
//! Each output value is accumulated over the reduction in order, one FMA per step, so results
//! do not depend on which thread computes a block.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Output voxels per microkernel block.
pub const MV: usize = 48;
/// Output channels per microkernel block.
pub const NC: usize = 8;

/// True when this CPU can run the microkernel.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Packs `filters` (`c_out × k`, row-major) into groups of [`NC`] channels: element
/// `(g, r, j)` at `(g·k + r)·NC + j` is channel `g·NC + j`, reduction row `r` (0 past `c_out`).
pub fn pack_weights(filters: &[f32], c_out: usize, k: usize) -> Vec<f32> {
    let groups = c_out.div_ceil(NC);
    let mut out = vec![0f32; groups * k * NC];
    for co in 0..c_out {
        let (g, j) = (co / NC, co % NC);
        for r in 0..k {
            out[(g * k + r) * NC + j] = filters[co * k + r];
        }
    }
    out
}

/// One block: `dst[j·ldd + i] = src[j·lds + i] (or 0) + Σ_r a[r·lda + i]·b[r·NC + j] (+ bias[j])`
/// for voxels `i < nvox` and channels `j < nch`.
///
/// # Safety
/// The CPU must support AVX-512F. `a` must be readable for `kc` rows of `nvox` values at
/// stride `lda` (loads are masked to `nvox`); `b` for `kc·NC` values; `src` (if not null)
/// and `dst` for `nch` rows of `nvox` values at strides `lds` / `ldd`; `bias` (if not null)
/// for `nch` values.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn block_48x8(
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
    // SAFETY: forwarded contract. Only the vectors that hold voxels are computed: a block of
    // 32 voxels costs two thirds of a full one, not all of it (Winograd's 32-block tiles,
    // every tile's last block; block_48x8 alone in cache, kc = 256, AMD Zen 4, 2026-12-07:
    // 6,211 cycles for 32 voxels and 6,328 for 16 when they ran as 48).
    unsafe {
        match nvox.div_ceil(16) {
            0 | 1 => block_vc::<1, NC>(kc, a, lda, b, src, lds, dst, ldd, nch, nvox, bias),
            2 => block_vc::<2, NC>(kc, a, lda, b, src, lds, dst, ldd, nch, nvox, bias),
            _ => block_vc::<3, NC>(kc, a, lda, b, src, lds, dst, ldd, nch, nvox, bias),
        }
    }
}

/// [`block_48x8`] over `V` vectors of 16 voxels (`nvox <= 16·V`) × `C` channels (`nch <=
/// C <= NC`; `b` keeps its `NC` values per reduction row).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_vc<const V: usize, const C: usize>(
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
    let lanes = |i: usize| -> __mmask16 {
        let n = nvox.saturating_sub(16 * i).min(16);
        if n == 16 {
            0xFFFF
        } else {
            ((1u32 << n) - 1) as __mmask16
        }
    };
    let m: [__mmask16; V] = std::array::from_fn(lanes);
    let mut acc = [[_mm512_setzero_ps(); V]; C];
    if !src.is_null() {
        for (j, row) in acc.iter_mut().enumerate() {
            if j < nch {
                for (i, v) in row.iter_mut().enumerate() {
                    // SAFETY: masked load of row j, lanes < nvox (caller's contract).
                    *v = unsafe { _mm512_maskz_loadu_ps(m[i], src.add(j * lds + 16 * i)) };
                }
            }
        }
    }
    let mut a = a;
    let mut b = b;
    for _ in 0..kc {
        // SAFETY: rows of `a` and `b` within the caller's bounds (kc rows).
        unsafe {
            let mut x = [_mm512_setzero_ps(); V];
            for (i, xi) in x.iter_mut().enumerate() {
                *xi = _mm512_maskz_loadu_ps(m[i], a.add(16 * i));
            }
            for (j, row) in acc.iter_mut().enumerate() {
                let bj = _mm512_set1_ps(*b.add(j));
                for (i, v) in row.iter_mut().enumerate() {
                    *v = _mm512_fmadd_ps(x[i], bj, *v);
                }
            }
            a = a.add(lda);
            b = b.add(NC);
        }
    }
    for (j, row) in acc.iter_mut().enumerate() {
        if j < nch {
            if !bias.is_null() {
                // SAFETY: bias has nch values (caller's contract).
                let bj = _mm512_set1_ps(unsafe { *bias.add(j) });
                for v in row.iter_mut() {
                    *v = _mm512_add_ps(*v, bj);
                }
            }
            for (i, v) in row.iter().enumerate() {
                // SAFETY: masked store of row j, lanes < nvox (caller's contract).
                unsafe { _mm512_mask_storeu_ps(dst.add(j * ldd + 16 * i), m[i], *v) };
            }
        }
    }
}

/// Voxels per block of [`block_96x4`].
pub const MV_NARROW: usize = 96;

/// [`block_48x8`] for a channel group of at most 4 channels, over twice the voxels: six
/// vectors × 4 channels (24 accumulators, every FMA computing an output), for 1×1×1 heads
/// into a few classes, whose input streams from memory once. `dst[j·ldd + i] = Σ_r
/// a[r·lda + i]·b[r·NC + j] (+ bias[j])` for voxels `i < nvox <= 96` and channels `j < nch
/// <= 4`; the same order of operations per output as `block_48x8` (the same bits).
///
/// # Safety
/// As [`block_48x8`] with `nvox <= 96` and `nch <= 4`.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn block_96x4(
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
    unsafe { block_vc::<{ MV_NARROW / 16 }, 4>(kc, a, lda, b, src, lds, dst, ldd, nch, nvox, bias) }
}

/// `dst[j] = src[2j]` for every `j < dst.len()`: two masked loads and one permute per 16
/// values (im2col of width stride 2, where the scalar strided copy cost 2 ns a value).
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub unsafe fn copy_stride2(dst: &mut [f32], src: &[f32]) {
    let n = dst.len();
    if n == 0 {
        return;
    }
    assert!(2 * (n - 1) < src.len(), "copy_stride2: source too short");
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let mut j = 0;
    while j < n {
        let k = (n - j).min(16);
        // Source elements 0 .. 2k − 1 of this chunk (the last needed is 2(k − 1)).
        let e = (2 * k - 1) as isize;
        let p = src[2 * j..].as_ptr();
        // SAFETY: the masks enable source elements 2j .. 2j + e − 1 <= 2(n − 1) (checked
        // above) and destination elements j .. j + k − 1 < n.
        unsafe {
            let lo = _mm512_maskz_loadu_ps(bits(0, e), p);
            let hi = _mm512_maskz_loadu_ps(bits(0, e - 16), p.wrapping_add(16));
            let r = _mm512_permutex2var_ps(lo, even, hi);
            _mm512_mask_storeu_ps(dst[j..].as_mut_ptr(), bits(0, k as isize), r);
        }
        j += 16;
    }
}

/// Vectors (16 consecutive tile columns each) per direct block.
pub const DIRECT_SEGS: usize = 3;
/// Most output rows one vector of the direct kernel reads from.
pub const DIRECT_MAX_PIECES: usize = 2;

/// A piece of one output row inside a vector: voxels `ow0 .. ow0 + len` of row `(oz, oy)`,
/// in lanes `lane .. lane + len`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Piece {
    pub oz: usize,
    pub oy: usize,
    pub ow0: usize,
    pub len: usize,
    pub lane: usize,
}

/// Up to 16 consecutive output voxels of a tile (stored at tile columns `col .. col + len`),
/// read as `n` row pieces: on short rows one vector covers two rows, so its lanes are not
/// left idle at each row's end.
#[derive(Clone, Copy, Debug, Default)]
pub struct Segment {
    pub col: usize,
    pub len: usize,
    pub n: usize,
    pub pieces: [Piece; DIRECT_MAX_PIECES],
}

/// Share of the lanes of one-row vectors that compute outputs, for rows of `ow` voxels.
pub fn direct_row_lane_use(ow: usize) -> f64 {
    ow as f64 / ow.max(1).next_multiple_of(16) as f64
}

/// Relative cost of a two-row vector against a one-row vector (its second piece's masks,
/// row checks and loads): AMD Zen 4, 2026-12-06, direct ms at one thread with one / two
/// pieces per vector: 16→32 over 20³ rows 3.45 / 2.67; 32→32 over 9³ 1.36 / 1.23;
/// 8→16 stride 2, 7-voxel rows 0.61 / 0.44; but 3→8 over 14-voxel rows 0.09 / 0.11 (three
/// and four pieces were slower than two on all of them).
pub const TWO_ROW_COST: f64 = 1.35;

/// Share of the lanes of two-row vectors that compute outputs (a vector loses lanes where
/// a row's tail and the next row's head are both short, and at tile ends).
pub const TWO_ROW_LANE_USE: f64 = 0.95;

/// Pieces per vector the direct kernel uses for output rows of `ow` voxels: two where
/// one-row vectors would leave enough lanes idle to pay for the second piece.
pub fn direct_pieces(ow: usize) -> usize {
    if direct_row_lane_use(ow) * TWO_ROW_COST < TWO_ROW_LANE_USE {
        2
    } else {
        1
    }
}

/// Splits tile columns `v0 .. v0 + cols` (flat output voxels of one item, rows of `ow`,
/// planes of `oh` rows) into vectors of at most 16 voxels and `pieces` row pieces each.
pub fn direct_segments(
    v0: usize,
    cols: usize,
    oh: usize,
    ow: usize,
    pieces: usize,
    out: &mut Vec<Segment>,
) {
    out.clear();
    let end = v0 + cols;
    let mut v = v0;
    // Voxel v's column, row and plane, advanced with v (divisions only once: for small
    // problems they were 8 % of small-batch-odd's time).
    let (mut ow0, row) = (v % ow, v / ow);
    let (mut oy, mut oz) = (row % oh, row / oh);
    while v < end {
        let mut seg = Segment {
            col: v - v0,
            ..Segment::default()
        };
        while seg.len < 16 && v < end && seg.n < pieces.clamp(1, DIRECT_MAX_PIECES) {
            let len = (ow - ow0).min(end - v).min(16 - seg.len);
            seg.pieces[seg.n] = Piece {
                oz,
                oy,
                ow0,
                len,
                lane: seg.len,
            };
            seg.n += 1;
            seg.len += len;
            v += len;
            ow0 += len;
            if ow0 == ow {
                ow0 = 0;
                oy += 1;
                if oy == oh {
                    oy = 0;
                    oz += 1;
                }
            }
        }
        out.push(seg);
    }
}

/// Geometry the direct kernel needs (stride along width 1 or 2).
#[derive(Clone, Copy, Debug)]
pub struct DirectGeom {
    pub c_in: usize,
    pub kernel: [usize; 3],
    /// Strides along depth, height and width.
    pub stride: [usize; 3],
    pub dilation: [usize; 3],
    /// Where the block's input lies: a zero-padded copy of the input its outputs read.
    pub halo: DirectBox,
    /// Prefetch the next block's destination lines for writing at a block's start: where
    /// the output is far larger than the caches, the line fills then overlap the taps (AMD Zen 4,
    /// 2026-12-06, one thread: unet-stem 61 → 54 ms, mri-t1-first-layer 32 → 28.6 ms); where
    /// it stays in cache they only cost instructions (1→32 at 32³: 0.77 → 0.82 ms).
    pub prefetch: bool,
}

/// The input box of a run of output voxels, copied with its padding made explicit: per input
/// channel, `planes` planes of `rows` rows of `row_len` values (channel stride `chan_len`).
/// Output voxel (plane `oz`, row `oy`, column `ow`) reads, for tap `(a, b, c)`, box plane
/// `oz·sd − origin[0] + a·dd`, row `oy·sh − origin[1] + b·dh`, column `ow·sw + c·dw`: every
/// load is a plain vector load, with no mask and no bounds check (the masked loads of
/// reading the input in place cost a vector-pipe slot each on AMD Zen 4).
#[derive(Clone, Copy, Debug, Default)]
pub struct DirectBox {
    pub origin: [usize; 2],
    pub planes: usize,
    pub rows: usize,
    pub row_len: usize,
    pub chan_len: usize,
}

impl DirectBox {
    /// Input values along one axis that `n + 1` outputs at `stride` read through a filter
    /// `k` taps long at `dilation`.
    pub fn span(n: usize, stride: usize, k: usize, dilation: usize) -> usize {
        n * stride + (k - 1) * dilation + 1
    }
}

/// Values after a direct box that its last row's vector loads may read (their unused lanes:
/// up to 16 · width stride past a row's last column).
pub const DIRECT_BOX_SLACK: usize = 32;

/// Writes a direct box row: `row_len` values at `dst`, `src` from column `c0`, zeros
/// elsewhere, in whole 16-value vectors (the last may write up to 15 values past the row).
/// (A copy and two fills per row, with their calls, cost more than the row on short rows:
/// 2→4 stride 2 over 2 × 13×11×9, one thread, 0.015 → 0.011 ms, AMD Zen 4, 2026-12-07.)
///
/// # Safety
/// The CPU must support AVX-512F; `dst` must be writable for `row_len.next_multiple_of(16)`
/// values; `c0 + src.len() <= row_len`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub unsafe fn fill_box_row(dst: *mut f32, row_len: usize, src: &[f32], c0: usize) {
    let (lo, hi) = (c0 as isize, (c0 + src.len()) as isize);
    let from = src.as_ptr().wrapping_sub(c0);
    let mut j = 0;
    if src.is_empty() {
        // A row in the padding: no load at all (a masked load whose lanes are all off still
        // takes a slow path on AMD Zen 4 when its address is unmapped, as an empty slice's
        // may be: 2→4 stride 2 over 2 × 13×11×9 took 0.020 ms instead of 0.011).
        while j < row_len {
            // SAFETY: inside the caller's `row_len` rounded up to 16.
            unsafe { _mm512_storeu_ps(dst.add(j), _mm512_setzero_ps()) };
            j += 16;
        }
        return;
    }
    while j < row_len {
        let m = bits(lo - j as isize, hi - j as isize);
        // SAFETY: lanes enabled by `m` read src[j + l − c0] with c0 <= j + l < c0 + len;
        // the store stays inside the caller's `row_len` rounded up to 16.
        unsafe {
            let v = _mm512_maskz_loadu_ps(m, from.wrapping_add(j));
            _mm512_storeu_ps(dst.add(j), v);
        }
        j += 16;
    }
}

/// Outputs larger than this (bytes) are written by direct blocks that prefetch their
/// destination ([`DirectGeom::prefetch`]).
pub const DIRECT_PREFETCH_MIN_BYTES: usize = 16 << 20;

/// Width strides the direct kernel supports.
pub fn direct_supports_width_stride(s: usize) -> bool {
    s == 1 || s == 2
}

/// `filters` (`[C_out, C_in, kD, kH, kW]`) with their taps in the direct kernel's order,
/// `[C_out, kD, kH, C_in, kW]`: tap rows outside, input channels inside (each tap row's input
/// rows are then worked out once for all channels).
pub fn direct_tap_order(
    filters: &[f32],
    c_out: usize,
    c_in: usize,
    kernel: [usize; 3],
) -> Vec<f32> {
    let [kd, kh, kw] = kernel;
    let k = c_in * kd * kh * kw;
    let mut out = Vec::with_capacity(filters.len());
    for co in 0..c_out {
        for ab in 0..kd * kh {
            for ci in 0..c_in {
                let at = co * k + (ci * kd * kh + ab) * kw;
                out.extend_from_slice(&filters[at..at + kw]);
            }
        }
    }
    out
}

/// Direct convolution of up to three vectors (only those given are computed: a tile's last
/// block of one vector costs a third of a full one) × the channel groups `groups` (8 channels
/// each; the last stops at channel `c_end`), reading the block's input box `halo` (see
/// [`DirectBox`]; no im2col): for every tap `(a, b, ci, c)` (the weights packed in that order,
/// see [`direct_tap_order`]), one load per vector piece (two and a permute for width stride
/// 2; a vector over two output rows loads each row's lanes under a mask) and eight
/// broadcast FMAs per vector.
///
/// # Safety
/// The CPU must support AVX-512F. `halo` must hold the box `geom.halo` of every piece of
/// `segs` (`c_in · chan_len` values) followed by [`DIRECT_BOX_SLACK`] readable values;
/// `packed` the packed weights of all groups (`k·NC` values per group, `k =
/// c_in·kD·kH·kW`); `dst` must be writable for rows `groups.start·NC .. c_end` at stride
/// `ldd`, each covering every vector's columns; `bias` (if not null) must hold `c_end`
/// values; `segs.len() <= DIRECT_SEGS`, each `len <= 16`, one piece each unless
/// `direct_pieces` allows two; `geom.stride[2]` is 1 or 2; `c_end <= groups.end·NC`.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn block_direct(
    geom: &DirectGeom,
    halo: *const f32,
    segs: &[Segment],
    packed: *const f32,
    groups: std::ops::Range<usize>,
    c_end: usize,
    dst: *mut f32,
    ldd: usize,
    bias: *const f32,
) {
    let pieces = segs.iter().map(|s| s.n).max().unwrap_or(1);
    // SAFETY: forwarded contract; the width stride and the pieces per vector select the
    // instantiation.
    unsafe {
        macro_rules! go {
            ($sw:literal, $p:literal) => {
                match segs.len() {
                    0 | 1 => block_direct_sw::<$sw, $p, 1>(
                        geom, halo, segs, packed, groups, c_end, dst, ldd, bias,
                    ),
                    2 => block_direct_sw::<$sw, $p, 2>(
                        geom, halo, segs, packed, groups, c_end, dst, ldd, bias,
                    ),
                    _ => block_direct_sw::<$sw, $p, 3>(
                        geom, halo, segs, packed, groups, c_end, dst, ldd, bias,
                    ),
                }
            };
        }
        match (geom.stride[2] == 2, pieces) {
            (false, 0 | 1) => go!(1, 1),
            (false, _) => go!(1, 2),
            (true, 0 | 1) => go!(2, 1),
            (true, _) => go!(2, 2),
        }
    }
}

/// The two 16-lane masks of span elements `lo..hi` of a 32-element span (two loads of 16),
/// clamped to the span: the width-stride-2 direct kernel's and Winograd's gathers.
#[inline(always)]
pub(crate) fn span_bits(lo: isize, hi: isize) -> [u16; 2] {
    [bits(lo, hi), bits(lo - 16, hi - 16)]
}

/// Mask of bits `lo..hi` (clamped to 16; empty when `hi <= lo`), without branches.
#[inline(always)]
pub(crate) fn bits(lo: isize, hi: isize) -> u16 {
    let lo = lo.clamp(0, 16) as u32;
    let hi = hi.clamp(0, 16) as u32;
    ((0xFFFFu32 >> (16 - hi)) & (0xFFFFu32 << lo)) as u16
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_direct_sw<const SW: usize, const P: usize, const V: usize>(
    geom: &DirectGeom,
    halo: *const f32,
    segs: &[Segment],
    packed: *const f32,
    groups: std::ops::Range<usize>,
    c_end: usize,
    dst: *mut f32,
    ldd: usize,
    bias: *const f32,
) {
    let [kd, kh, kw] = geom.kernel;
    let [dd, dh, dw] = geom.dilation;
    let bx = geom.halo;
    let plane_len = bx.rows * bx.row_len;
    let k = geom.c_in * kd * kh * kw;
    // Per (vector, piece): the box offset lane 0 reads at tap (0, 0, 0, 0), and (two pieces)
    // the piece's load masks. Lane j of a piece reads column first + SW·j; with SW = 2, two
    // loads cover elements q = 0..32 of the span and the even ones are kept.
    let mut off = [[0isize; P]; V];
    let mut masks = [[[0 as __mmask16; 2]; P]; V];
    let mut store = [0 as __mmask16; V];
    for (s, seg) in segs.iter().enumerate().take(V) {
        store[s] = bits(0, seg.len as isize);
        for (q, pc) in seg.pieces[..seg.n.min(P)].iter().enumerate() {
            let z = pc.oz * geom.stride[0] - bx.origin[0];
            let y = pc.oy * geom.stride[1] - bx.origin[1];
            off[s][q] =
                ((z * bx.rows + y) * bx.row_len + pc.ow0 * SW) as isize - (SW * pc.lane) as isize;
            let (lo, hi) = (SW * pc.lane, SW * (pc.lane + pc.len - 1) + 1);
            masks[s][q] = span_bits(lo as isize, hi as isize);
        }
    }
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    for g in groups {
        let nch = NC.min(c_end - g * NC);
        // SAFETY: rows g·NC .. g·NC + nch of the destination (caller's contract).
        let dst = unsafe { dst.add(g * NC * ldd) };
        // Ask for the next block's destination lines now (for writing), so their fills
        // overlap this block's taps instead of stalling its stores (one block ahead beat
        // this block's own lines: unet-stem 48.7 → 45.0 ms at one thread, 2026-12-07).
        // Past the tile's end they are the next tile's lines; prefetches never fault.
        for j in 0..if geom.prefetch { nch } else { 0 } {
            for seg in segs {
                let p = dst.wrapping_add(j * ldd + seg.col + DIRECT_SEGS * 16) as *const i8;
                _mm_prefetch::<_MM_HINT_ET0>(p);
                _mm_prefetch::<_MM_HINT_ET0>(p.wrapping_add(4 * seg.len - 4));
            }
        }
        let mut acc = [[_mm512_setzero_ps(); V]; NC];
        // SAFETY: group g's packed weights (caller's contract), taps in the order of the
        // loops below (see `direct_tap_order`).
        let mut b = unsafe { packed.add(g * k * NC) };
        // Tap rows outside, input channels inside (the packing order).
        let (mut a, mut bb) = (0, 0);
        for _ in 0..kd * kh {
            let tap_row = halo.wrapping_add(a * dd * plane_len + bb * dh * bx.row_len);
            bb += 1;
            if bb == kh {
                (a, bb) = (a + 1, 0);
            }
            for ci in 0..geom.c_in {
                let base = tap_row.wrapping_add(ci * bx.chan_len);
                for c in 0..kw {
                    let at = base.wrapping_add(c * dw);
                    let mut x = [_mm512_setzero_ps(); V];
                    for s in 0..V {
                        let mut lo = _mm512_setzero_ps();
                        let mut hi = _mm512_setzero_ps();
                        // SAFETY: the piece's lanes read box columns of one row of this
                        // tap's plane and channel; a one-piece vector's unused lanes read on
                        // into the following rows or the slack (caller's contract), a
                        // two-piece vector's are masked off and not accessed.
                        unsafe {
                            if P == 1 {
                                let p = at.wrapping_offset(off[s][0]);
                                lo = _mm512_loadu_ps(p);
                                if SW == 2 {
                                    hi = _mm512_loadu_ps(p.wrapping_add(16));
                                }
                            } else {
                                for q in 0..P {
                                    let p = at.wrapping_offset(off[s][q]);
                                    let m = masks[s][q];
                                    if m[0] != 0 {
                                        lo = _mm512_mask_loadu_ps(lo, m[0], p);
                                    }
                                    if SW == 2 && m[1] != 0 {
                                        hi = _mm512_mask_loadu_ps(hi, m[1], p.wrapping_add(16));
                                    }
                                }
                            }
                        }
                        x[s] = if SW == 1 {
                            lo
                        } else {
                            _mm512_permutex2var_ps(lo, even, hi)
                        };
                    }
                    for (j, accj) in acc.iter_mut().enumerate() {
                        // SAFETY: b holds NC weights for this tap (caller's contract).
                        let bj = _mm512_set1_ps(unsafe { *b.add(j) });
                        for s in 0..V {
                            accj[s] = _mm512_fmadd_ps(x[s], bj, accj[s]);
                        }
                    }
                    // SAFETY: advancing within the packed group (one tap = NC values).
                    b = unsafe { b.add(NC) };
                }
            }
        }
        for (j, accj) in acc.iter_mut().enumerate() {
            if j < nch {
                let bj = if bias.is_null() {
                    _mm512_setzero_ps()
                } else {
                    // SAFETY: bias holds c_end values.
                    _mm512_set1_ps(unsafe { *bias.add(g * NC + j) })
                };
                for (s, seg) in segs.iter().enumerate().take(V) {
                    let v = _mm512_add_ps(accj[s], bj);
                    // SAFETY: row j, columns seg.col .. seg.col + seg.len of the destination.
                    unsafe { _mm512_mask_storeu_ps(dst.add(j * ldd + seg.col), store[s], v) };
                }
            }
        }
    }
}
