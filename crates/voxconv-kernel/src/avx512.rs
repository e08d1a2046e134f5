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
#[target_feature(enable = "avx512f")]
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
    let lanes = |i: usize| -> __mmask16 {
        let n = nvox.saturating_sub(16 * i).min(16);
        if n == 16 {
            0xFFFF
        } else {
            ((1u32 << n) - 1) as __mmask16
        }
    };
    let m = [lanes(0), lanes(1), lanes(2)];
    let mut acc = [[_mm512_setzero_ps(); 3]; NC];
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
            let a0 = _mm512_maskz_loadu_ps(m[0], a);
            let a1 = _mm512_maskz_loadu_ps(m[1], a.add(16));
            let a2 = _mm512_maskz_loadu_ps(m[2], a.add(32));
            for (j, row) in acc.iter_mut().enumerate() {
                let bj = _mm512_set1_ps(*b.add(j));
                row[0] = _mm512_fmadd_ps(a0, bj, row[0]);
                row[1] = _mm512_fmadd_ps(a1, bj, row[1]);
                row[2] = _mm512_fmadd_ps(a2, bj, row[2]);
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

/// Maximum kernel width of the direct path (one mask per tap column is kept per segment).
pub const DIRECT_MAX_KW: usize = 8;
/// Segments (row pieces of at most 16 voxels) per direct block.
pub const DIRECT_SEGS: usize = 3;

/// A piece of one output row: at most 16 voxels `ow0 .. ow0 + len` of row `(oz, oy)`, stored
/// at column `col` of the tile.
#[derive(Clone, Copy, Debug, Default)]
pub struct Segment {
    pub oz: usize,
    pub oy: usize,
    pub ow0: usize,
    pub len: usize,
    pub col: usize,
}

/// Geometry the direct kernel needs (stride along width 1 or 2).
#[derive(Clone, Copy, Debug)]
pub struct DirectGeom {
    pub c_in: usize,
    pub dims: [usize; 3],
    pub kernel: [usize; 3],
    /// Strides along depth, height and width.
    pub stride: [usize; 3],
    pub padding: [usize; 3],
    pub dilation: [usize; 3],
}

/// Width strides the direct kernel supports.
pub fn direct_supports_width_stride(s: usize) -> bool {
    s == 1 || s == 2
}

/// Direct convolution of up to three row segments × 8 output channels, reading the input rows
/// in place (no im2col): for every tap `(ci, a, b, c)`, in filter order, one masked load per
/// segment (two and a permute for width stride 2; lanes outside the input are zero: the
/// padding) and eight broadcast FMAs.
///
/// # Safety
/// The CPU must support AVX-512F. `input_n` must hold one batch item (`c_in·D·H·W` values);
/// `b` the packed weights of one channel group (`c_in·kD·kH·kW·NC` values); `dst` must be
/// writable for `nch` rows at stride `ldd`, each covering every segment's columns; `bias`
/// (if not null) must hold `nch` values; `segs.len() <= DIRECT_SEGS`, each `len <= 16`;
/// `geom.kernel[2] <= DIRECT_MAX_KW`; `geom.stride[2]` is 1 or 2.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn block_direct(
    geom: &DirectGeom,
    input_n: *const f32,
    segs: &[Segment],
    b: *const f32,
    dst: *mut f32,
    ldd: usize,
    nch: usize,
    bias: *const f32,
) {
    // SAFETY: forwarded contract; the width stride selects the instantiation.
    unsafe {
        if geom.stride[2] == 2 {
            block_direct_sw::<2>(geom, input_n, segs, b, dst, ldd, nch, bias)
        } else {
            block_direct_sw::<1>(geom, input_n, segs, b, dst, ldd, nch, bias)
        }
    }
}

/// Mask of bits `lo..hi` (clamped to 16).
#[inline(always)]
fn bits(lo: isize, hi: isize) -> u16 {
    let lo = lo.clamp(0, 16) as u32;
    let hi = hi.clamp(0, 16) as u32;
    if hi > lo {
        (((1u32 << hi) - 1) & !((1u32 << lo) - 1)) as u16
    } else {
        0
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_direct_sw<const SW: usize>(
    geom: &DirectGeom,
    input_n: *const f32,
    segs: &[Segment],
    b: *const f32,
    dst: *mut f32,
    ldd: usize,
    nch: usize,
    bias: *const f32,
) {
    let [d, h, w] = geom.dims;
    let [kd, kh, kw] = geom.kernel;
    let [pd, ph, pw] = geom.padding;
    let [dd, dh, dw] = geom.dilation;
    let plane = d * h * w;
    // Per (tap column, segment): the first input column and load masks. Lane j of a segment
    // reads input column first + SW·j; with SW = 2, two loads cover elements q = 0..32 of
    // the span and the even ones are kept.
    let mut masks = [[[0 as __mmask16; 2]; DIRECT_SEGS]; DIRECT_MAX_KW];
    let mut store = [0 as __mmask16; DIRECT_SEGS];
    let mut xoff = [[0isize; DIRECT_SEGS]; DIRECT_MAX_KW];
    for (s, seg) in segs.iter().enumerate() {
        store[s] = bits(0, seg.len as isize);
        for c in 0..kw {
            let first = (seg.ow0 * SW + c * dw) as isize - pw as isize;
            // Span elements q with 0 <= first + q < w and q <= SW·(len − 1).
            let q_lo = -first;
            let q_hi = (w as isize - first).min((SW * (seg.len - 1) + 1) as isize);
            masks[c][s] = [bits(q_lo, q_hi), bits(q_lo - 16, q_hi - 16)];
            xoff[c][s] = first;
        }
    }
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let mut acc = [[_mm512_setzero_ps(); DIRECT_SEGS]; NC];
    let mut b = b;
    for ci in 0..geom.c_in {
        for a in 0..kd {
            for bb in 0..kh {
                // Row of each segment for taps (a, bb), or none in the padding.
                let mut row = [0isize; DIRECT_SEGS];
                let mut row_ok = [false; DIRECT_SEGS];
                for (s, seg) in segs.iter().enumerate() {
                    let iz = (seg.oz * geom.stride[0] + a * dd) as isize - pd as isize;
                    let iy = (seg.oy * geom.stride[1] + bb * dh) as isize - ph as isize;
                    if iz >= 0 && iy >= 0 && (iz as usize) < d && (iy as usize) < h {
                        row[s] = (ci * plane + (iz as usize * h + iy as usize) * w) as isize;
                        row_ok[s] = true;
                    }
                }
                for c in 0..kw {
                    let mut x = [_mm512_setzero_ps(); DIRECT_SEGS];
                    for s in 0..DIRECT_SEGS {
                        if row_ok[s] {
                            let p = input_n.wrapping_offset(row[s] + xoff[c][s]);
                            // SAFETY: lanes enabled by the masks read input columns inside
                            // [0, w) of an existing row; masked-off lanes are not accessed.
                            x[s] = unsafe {
                                if SW == 1 {
                                    _mm512_maskz_loadu_ps(masks[c][s][0], p)
                                } else {
                                    let lo = _mm512_maskz_loadu_ps(masks[c][s][0], p);
                                    let hi =
                                        _mm512_maskz_loadu_ps(masks[c][s][1], p.wrapping_add(16));
                                    _mm512_permutex2var_ps(lo, even, hi)
                                }
                            };
                        }
                    }
                    for (j, accj) in acc.iter_mut().enumerate() {
                        // SAFETY: b holds NC weights for this tap (caller's contract).
                        let bj = _mm512_set1_ps(unsafe { *b.add(j) });
                        for s in 0..DIRECT_SEGS {
                            accj[s] = _mm512_fmadd_ps(x[s], bj, accj[s]);
                        }
                    }
                    // SAFETY: advancing within the packed group (one tap = NC values).
                    b = unsafe { b.add(NC) };
                }
            }
        }
    }
    for (j, accj) in acc.iter_mut().enumerate() {
        if j < nch {
            let bj = if bias.is_null() {
                _mm512_setzero_ps()
            } else {
                // SAFETY: bias holds nch values.
                _mm512_set1_ps(unsafe { *bias.add(j) })
            };
            for (s, seg) in segs.iter().enumerate() {
                let v = _mm512_add_ps(accj[s], bj);
                // SAFETY: row j, columns seg.col .. seg.col + seg.len of the destination.
                unsafe { _mm512_mask_storeu_ps(dst.add(j * ldd + seg.col), store[s], v) };
            }
        }
    }
}
