//! 3-D im2col of one output tile into a caller-owned buffer.
//!
//! For a tile of output voxels `[start, start + cols)` (flattened `(od, oh, ow)` of one batch
//! item) and a range of reduction rows `[r0, r1)` (row `r = ((ci·kD + a)·kH + b)·kW + c`, the
//! filter layout), the buffer receives a row-major `(r1 − r0) × cols` matrix: entry
//! `(r − r0, j)` is the input value under tap `r` for output voxel `start + j`, or 0 in the
//! zero padding. The full im2col matrix is never built: the caller reuses one small buffer.

use super::Conv3dShape;

/// `dst.copy_from_slice(src)` without a call into `memcpy` for the short runs that small
/// volumes produce (a 14-voxel output row costs more in call overhead than in copying).
#[inline]
pub(crate) fn copy_run(dst: &mut [f32], src: &[f32]) {
    let n = dst.len();
    if n >= 64 {
        dst.copy_from_slice(src);
        return;
    }
    let mut i = 0;
    while i + 16 <= n {
        let v: [f32; 16] = src[i..i + 16].try_into().expect("16 values");
        dst[i..i + 16].copy_from_slice(&v);
        i += 16;
    }
    if i + 8 <= n {
        let v: [f32; 8] = src[i..i + 8].try_into().expect("8 values");
        dst[i..i + 8].copy_from_slice(&v);
        i += 8;
    }
    while i < n {
        dst[i] = src[i];
        i += 1;
    }
}

/// Copies `dst.len()` taps along one output row: `dst[j] = src[(ow0 + j)·stride + off]`, or 0
/// where that index falls outside `src`.
#[inline]
fn fill_row(dst: &mut [f32], src: &[f32], ow0: usize, stride: usize, off: isize) {
    let len = dst.len();
    let w = src.len() as isize;
    // First input index of this run, and the valid range of j: 0 <= first + j·stride < w.
    let first = (ow0 * stride) as isize + off;
    if stride == 1 && first >= 0 && first + len as isize <= w {
        // Inside the row (the common case): one copy, no padding.
        let f = first as usize;
        copy_run(dst, &src[f..f + len]);
        return;
    }
    let (j_lo, j_hi) = if stride == 1 {
        // The common case, without divisions.
        (
            (-first).clamp(0, len as isize) as usize,
            (w - first).clamp(0, len as isize) as usize,
        )
    } else if stride == 2 {
        // 0 <= first + 2j < w, without divisions: j >= ceil(-first / 2), j < ceil((w -
        // first) / 2) (arithmetic shifts round toward −∞).
        (
            ((1 - first) >> 1).clamp(0, len as isize) as usize,
            ((w - first + 1) >> 1).clamp(0, len as isize) as usize,
        )
    } else {
        let s = stride as isize;
        let lo = if first >= 0 {
            0
        } else {
            ((-first + s - 1) / s) as usize
        };
        let hi = if first >= w {
            0
        } else {
            (((w - 1 - first) / s) + 1) as usize
        };
        (lo.min(len), hi.min(len))
    };
    let j_hi = j_hi.max(j_lo);
    dst[..j_lo].fill(0.0);
    if j_hi > j_lo {
        let base = (first + (j_lo * stride) as isize) as usize;
        if stride == 1 {
            copy_run(&mut dst[j_lo..j_hi], &src[base..base + (j_hi - j_lo)]);
        } else if stride == 2 && crate::avx512::available() {
            // SAFETY: AVX-512F detected.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                crate::avx512::copy_stride2(&mut dst[j_lo..j_hi], &src[base..])
            };
        } else {
            for (d, &v) in dst[j_lo..j_hi]
                .iter_mut()
                .zip(src[base..].iter().step_by(stride))
            {
                *d = v;
            }
        }
    }
    dst[j_hi..].fill(0.0);
}

/// Prefetches the part of input row `src` that [`fill_row`] reads for `len` taps from
/// output column `ow0` at width stride `stride` (one request per cache line).
#[inline]
fn prefetch_row(src: &[f32], ow0: usize, stride: usize, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let lo = (ow0 * stride).min(src.len());
        let hi = ((ow0 + len) * stride).min(src.len());
        for at in (lo..hi).step_by(16) {
            // SAFETY: a prefetch never faults and changes no memory; `at` is inside `src`.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    src[at..].as_ptr() as *const i8,
                )
            };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (src, ow0, stride, len);
}

/// One run of a tile along a single output row `(oz, oy)`: output columns `ow0 .. ow0 + len`,
/// stored from column `col` of the tile.
#[derive(Clone, Copy, Debug, Default)]
pub struct Run {
    oz: usize,
    oy: usize,
    ow0: usize,
    len: usize,
    col: usize,
}

/// Fills the im2col rows `[r0, r1)` of output voxels `[start, start + cols)` of one batch
/// item into `col`, row `r − r0` starting at `(r − r0)·stride` (`stride >= cols`; a stride
/// that is not a multiple of 4 KiB keeps the GEMM's strided reads off a single cache set).
/// `input_n` is that item's `C_in·D·H·W` values; `runs` is reusable scratch.
///
/// Reduction rows outside, the tile's output-row runs inside: each row's tap is decoded
/// once, and each destination row is written front to back (small volumes have many short
/// runs, where per-run bookkeeping is what costs).
#[allow(clippy::too_many_arguments)]
pub fn im2col_tile(
    shape: &Conv3dShape,
    input_n: &[f32],
    start: usize,
    cols: usize,
    rows: std::ops::Range<usize>,
    col: &mut [f32],
    stride: usize,
    runs: &mut Vec<Run>,
) {
    debug_assert!(stride >= cols);
    let [_, _, d, h, w] = shape.input;
    let [_, _, kd, kh, kw] = shape.filters;
    let [_, oh, ow] = shape.out_dims();
    let p = shape.params;
    let n_rows = rows.end - rows.start;
    if n_rows == 0 || cols == 0 {
        return;
    }
    runs.clear();
    let end = start + cols;
    let mut v = start;
    while v < end {
        let ow0 = v % ow;
        let row = v / ow;
        let len = (ow - ow0).min(end - v);
        runs.push(Run {
            oz: row / oh,
            oy: row % oh,
            ow0,
            len,
            col: v - start,
        });
        v += len;
    }
    let plane = h * w;
    // The reduction row r0 as (ci, a, b, c); advanced with carries, no divisions per row.
    let r0 = rows.start;
    let (mut ci, mut a, mut b, mut c) = (
        r0 / (kw * kh * kd),
        (r0 / (kw * kh)) % kd,
        (r0 / kw) % kh,
        r0 % kw,
    );
    // Reduction row (ci, a, b, c) advanced to the next one, with carries.
    let next = |(ci, a, b, c): (usize, usize, usize, usize)| {
        if c + 1 < kw {
            (ci, a, b, c + 1)
        } else if b + 1 < kh {
            (ci, a, b + 1, 0)
        } else if a + 1 < kd {
            (ci, a + 1, 0, 0)
        } else {
            (ci + 1, 0, 0, 0)
        }
    };
    // Input rows read for one output row run (channel, plane offset, row offset), or None
    // in the padding.
    let source = |r: &Run, (ci, a, b): (usize, usize, usize)| {
        let iz = (r.oz * p.stride[0] + a * p.dilation[0]) as isize - p.padding[0] as isize;
        let iy = (r.oy * p.stride[1] + b * p.dilation[1]) as isize - p.padding[1] as isize;
        (iz >= 0 && iy >= 0 && iz < d as isize && iy < h as isize)
            .then(|| (ci * d + iz as usize) * plane + iy as usize * w)
    };
    for i in 0..n_rows {
        let dst_row = &mut col[i * stride..i * stride + cols];
        let chan = &input_n[ci * d * plane..(ci + 1) * d * plane];
        let x_off = (c * p.dilation[2]) as isize - p.padding[2] as isize;
        // Where the next reduction row starts another input channel (rows the caches have
        // not seen; every row of a 1×1×1 kernel), ask for its rows while this row is copied:
        // each run prefetches its successor's row one reduction row ahead. Strided 1×1×1
        // 32→64 over 64³ 4.08 → 3.47 ms at one thread (it reads them from memory); on
        // every change of tap row instead, 3×3×3 stride 2 32→48 over 64³ lost 3 % (those
        // rows are mostly in cache already).
        let (nci, na, nb, nc) = next((ci, a, b, c));
        let prefetch = i + 1 < n_rows && nci != ci;
        for r in runs.iter() {
            if prefetch {
                if let Some(s) = source(r, (nci, na, nb)) {
                    prefetch_row(&input_n[s..s + w], r.ow0, p.stride[2], r.len);
                }
            }
            let dst = &mut dst_row[r.col..r.col + r.len];
            match source(r, (0, a, b)) {
                None => dst.fill(0.0),
                Some(s) => fill_row(dst, &chan[s..s + w], r.ow0, p.stride[2], x_off),
            }
        }
        (ci, a, b, c) = (nci, na, nb, nc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_row_pads_both_edges_with_stride() {
        let src = [1.0, 2.0, 3.0, 4.0, 5.0];
        let mut dst = [9.0f32; 4];
        // positions: -1, 1, 3, 5 -> 0, 2, 4, 0
        fill_row(&mut dst, &src, 0, 2, -1);
        assert_eq!(dst, [0.0, 2.0, 4.0, 0.0]);
        let mut dst = [9.0f32; 7];
        fill_row(&mut dst, &src, 0, 1, -1);
        assert_eq!(dst, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 0.0]);
        // Entirely out of range on the right.
        let mut dst = [9.0f32; 2];
        fill_row(&mut dst, &src, 3, 2, 0);
        assert_eq!(dst, [0.0, 0.0]);
    }

    /// Every start, offset and length against the definition, for strides 1–3 (the stride-1
    /// and stride-2 bounds are worked out without divisions).
    #[test]
    fn fill_row_matches_its_definition() {
        for w in [1usize, 2, 5, 16, 33] {
            let src: Vec<f32> = (0..w).map(|i| i as f32 + 1.0).collect();
            for stride in 1..=3 {
                for off in -4isize..=4 {
                    for ow0 in 0..6 {
                        for len in 0..40 {
                            let mut dst = vec![f32::NAN; len];
                            fill_row(&mut dst, &src, ow0, stride, off);
                            for (j, &got) in dst.iter().enumerate() {
                                let at = ((ow0 + j) * stride) as isize + off;
                                let want = if at >= 0 && at < w as isize {
                                    src[at as usize]
                                } else {
                                    0.0
                                };
                                assert_eq!(
                                    got, want,
                                    "w {w} stride {stride} off {off} ow0 {ow0} len {len} j {j}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
