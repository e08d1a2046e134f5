//! AVX2 + FMA version of the GEMM microkernel (see [`crate::avx512`]), for CPUs without
//! AVX-512: the same block geometry (48 voxels × 8 channels), the same packed weights and the
//! same contract, computed as four 24-voxel × 4-channel sub-blocks (12 ymm accumulators,
//! three column loads and four broadcasts per reduction step).
//!
//! Each output value is accumulated exactly as the AVX-512 kernel does it (its start value,
//! then one FMA per reduction step in order, then the bias), so both kernels give the same
//! bits, and results do not depend on which thread computes a block.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use crate::avx512::{MV, NC};

/// Voxels per sub-block (three ymm).
const SV: usize = 24;
/// Channels per sub-block.
const SC: usize = 4;

/// True when this CPU can run the microkernel (AVX2 and FMA).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One block, as [`crate::avx512::block_48x8`]:
/// `dst[j·ldd + i] = src[j·lds + i] (or 0) + Σ_r a[r·lda + i]·b[r·NC + j] (+ bias[j])`
/// for voxels `i < nvox` and channels `j < nch`.
///
/// # Safety
/// The CPU must support AVX2 and FMA. `nvox <= 48`, `nch <= 8`. `a` must be readable for
/// `kc` rows of `nvox` values at stride `lda` (loads are masked to `nvox`); `b` for
/// `kc·NC` values; `src` (if not null) and `dst` for `nch` rows of `nvox` values at strides
/// `lds` / `ldd`; `bias` (if not null) for `nch` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
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
    debug_assert!(nvox <= MV && nch <= NC);
    let mut v0 = 0;
    while v0 < nvox {
        let nv = (nvox - v0).min(SV);
        let mut c0 = 0;
        while c0 < nch {
            let nc = (nch - c0).min(SC);
            let s = if src.is_null() {
                src
            } else {
                src.wrapping_add(c0 * lds + v0)
            };
            let bias_c = if bias.is_null() {
                bias
            } else {
                bias.wrapping_add(c0)
            };
            let sub = if nv == SV {
                sub_block::<true>
            } else {
                sub_block::<false>
            };
            // SAFETY: the sub-block covers voxels v0..v0+nv < nvox and channels
            // c0..c0+nc < nch, inside every buffer of the caller's contract; `b + c0` keeps
            // the row stride NC with SC <= NC - c0 lanes per row; the CPU runs AVX2 + FMA.
            unsafe {
                sub(
                    kc,
                    a.add(v0),
                    lda,
                    b.add(c0),
                    s,
                    lds,
                    dst.add(c0 * ldd + v0),
                    ldd,
                    nc,
                    nv,
                    bias_c,
                )
            }
            c0 += SC;
        }
        v0 += SV;
    }
}

/// Lane masks for `nv` voxels over three ymm (lane active where its voxel exists).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn masks(nv: usize) -> [__m256i; 3] {
    let idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let m = |i: usize| {
        let n = nv.saturating_sub(8 * i).min(8) as i32;
        _mm256_cmpgt_epi32(_mm256_set1_epi32(n), idx)
    };
    [m(0), m(1), m(2)]
}

/// 24 voxels (or `nv` with `FULL = false`) × `nc <= 4` channels.
///
/// # Safety
/// As [`block_48x8`], for the sub-block's voxels and channels; `b` rows hold at least 4
/// readable values (the packed group is NC wide).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn sub_block<const FULL: bool>(
    kc: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    src: *const f32,
    lds: usize,
    dst: *mut f32,
    ldd: usize,
    nc: usize,
    nv: usize,
    bias: *const f32,
) {
    let m = masks(nv);
    let mut acc = [[_mm256_setzero_ps(); 3]; SC];
    if !src.is_null() {
        for (j, row) in acc.iter_mut().enumerate().take(nc) {
            for (i, v) in row.iter_mut().enumerate() {
                // SAFETY: row j of src, lanes < nv (masked; caller's contract).
                *v = unsafe { _mm256_maskload_ps(src.add(j * lds + 8 * i), m[i]) };
            }
        }
    }
    let mut a = a;
    let mut b = b;
    for _ in 0..kc {
        // SAFETY: row of `a` (nv values, masked unless FULL) and 4 values of the packed
        // row of `b`, within the caller's bounds (kc rows).
        unsafe {
            let (a0, a1, a2) = if FULL {
                (
                    _mm256_loadu_ps(a),
                    _mm256_loadu_ps(a.add(8)),
                    _mm256_loadu_ps(a.add(16)),
                )
            } else {
                (
                    _mm256_maskload_ps(a, m[0]),
                    _mm256_maskload_ps(a.add(8), m[1]),
                    _mm256_maskload_ps(a.add(16), m[2]),
                )
            };
            for (j, row) in acc.iter_mut().enumerate() {
                let bj = _mm256_broadcast_ss(&*b.add(j));
                row[0] = _mm256_fmadd_ps(a0, bj, row[0]);
                row[1] = _mm256_fmadd_ps(a1, bj, row[1]);
                row[2] = _mm256_fmadd_ps(a2, bj, row[2]);
            }
            a = a.add(lda);
            b = b.add(NC);
        }
    }
    for (j, row) in acc.iter_mut().enumerate().take(nc) {
        if !bias.is_null() {
            // SAFETY: bias holds nc values (caller's contract).
            let bj = _mm256_set1_ps(unsafe { *bias.add(j) });
            for v in row.iter_mut() {
                *v = _mm256_add_ps(*v, bj);
            }
        }
        for (i, v) in row.iter().enumerate() {
            // SAFETY: row j of dst, lanes < nv (masked unless FULL; caller's contract).
            unsafe {
                let p = dst.add(j * ldd + 8 * i);
                if FULL {
                    _mm256_storeu_ps(p, *v)
                } else {
                    _mm256_maskstore_ps(p, m[i], *v)
                }
            }
        }
    }
}
