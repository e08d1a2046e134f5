//! Winograd F(2×2×2, 3×3×3) for 3×3×3 kernels with stride 1 and dilation 1.
//!
//! Each 2×2×2 block of output voxels comes from a 4×4×4 input patch: `V = Bᵀ d B` (per axis),
//! the filters are transformed once, `U = G g Gᵀ`, and for each of the 64 transform
//! positions ξ one GEMM `M[ξ] = U[ξ] · V[ξ]` (C_out × C_in times C_in × tiles) replaces
//! 27 of them: 8 multiplies per output and input channel instead of 27 (3.4× fewer). The
//! output is `Y = Aᵀ M A` per axis. The transforms only add, subtract and halve, so the
//! result stays within a small multiple of the direct method's rounding error (the tests
//! bound it against the f64 reference).
//!
//! Lanes: 16 output blocks form a *lane group* (one zmm), taken in order along block rows,
//! then down block rows and plane pairs; three lane groups form the 48 columns of one
//! microkernel call.

// Transform code indexes several small arrays with the same loop variables; index loops are
// clearer here than zipped iterators.
#![allow(clippy::needless_range_loop)]

use super::avx512::NC;
use super::Conv3dShape;

/// Output blocks per lane group.
pub const LANES: usize = 16;
/// Lane groups per GEMM block (48 columns).
pub const GROUPS: usize = 3;
/// Columns of a GEMM block.
pub const COLS: usize = LANES * GROUPS;
/// Transform positions.
pub const XI: usize = 64;
/// Stride between transform positions in the GEMM products M (`channels` = C_out): position
/// ξ holds a C_out × 48 matrix, rows 48 values apart, so each GEMM writes one contiguous
/// panel; plus one cache line so positions never sit a multiple of 4 KiB apart.
pub const fn xi_stride(channels: usize) -> usize {
    channels * COLS + 16
}

/// Stride between input channels in the transformed input V: all 64 positions × 48 columns,
/// plus one cache line so channel rows never sit a multiple of 4 KiB apart (L1 aliasing
/// when the microkernel walks down a column). The input transform writes one channel's 64
/// positions together, so they sit together.
pub const V_CH_STRIDE: usize = XI * COLS + 16;

/// Whether a shape can use this transform.
pub fn eligible(shape: &Conv3dShape) -> bool {
    let p = shape.params;
    shape.kernel_dims() == [3, 3, 3] && p.stride == [1; 3] && p.dilation == [1; 3]
}

/// Share of the transform's lanes that compute real outputs: odd output sizes leave
/// half-empty 2×2×2 blocks, and a tile's last lane group may be partly empty (blocks fill
/// lane groups of 16 across block rows and plane pairs, see [`LaneGroup`]).
pub fn lane_use(shape: &Conv3dShape) -> f64 {
    let [od, oh, ow] = shape.out_dims();
    let pairs = |n: usize| n as f64 / (2 * n.div_ceil(2)) as f64;
    let blocks = od.div_ceil(2) * oh.div_ceil(2) * ow.div_ceil(2);
    let groups = blocks.div_ceil(LANES).max(1);
    pairs(od) * pairs(oh) * pairs(ow) * blocks as f64 / (groups * LANES) as f64
}

/// Consecutive output blocks of one block row: output planes `z0, z0+1`, rows `2·ty,
/// 2·ty+1`, columns `2·tx0 ..` (`len` blocks), held by lanes `lane .. lane + len` of a lane
/// group.
#[derive(Clone, Copy, Debug, Default)]
pub struct BlockRun {
    pub z0: usize,
    pub ty: usize,
    pub tx0: usize,
    pub len: usize,
    pub lane: usize,
}

/// Up to 16 output blocks, one a lane: the blocks of a tile in order (plane pair, block
/// row, block column) cut into groups of 16, so a group may span block rows and plane
/// pairs. Small outputs fill every lane (an 8³ output: 64 blocks, four full groups) where
/// one block row a group would leave most lanes empty.
#[derive(Clone, Copy, Debug, Default)]
pub struct LaneGroup {
    pub runs: [BlockRun; LANES],
    pub n_runs: usize,
}

impl LaneGroup {
    pub fn runs(&self) -> &[BlockRun] {
        &self.runs[..self.n_runs]
    }

    fn lanes(&self) -> usize {
        self.runs().last().map_or(0, |r| r.lane + r.len)
    }
}

/// The lane groups of output plane pairs `z_pairs` (first planes `2·p`) of a `oh × ow`
/// output, appended to `out`.
pub fn lane_groups(
    z_pairs: std::ops::Range<usize>,
    oh: usize,
    ow: usize,
    out: &mut Vec<LaneGroup>,
) {
    let (nty, ntx) = (oh.div_ceil(2), ow.div_ceil(2));
    let mut g = LaneGroup::default();
    for zp in z_pairs {
        for ty in 0..nty {
            let mut tx0 = 0;
            while tx0 < ntx {
                let lane = g.lanes();
                let len = (LANES - lane).min(ntx - tx0);
                g.runs[g.n_runs] = BlockRun {
                    z0: 2 * zp,
                    ty,
                    tx0,
                    len,
                    lane,
                };
                g.n_runs += 1;
                tx0 += len;
                if lane + len == LANES {
                    out.push(g);
                    g = LaneGroup::default();
                }
            }
        }
    }
    if g.n_runs > 0 {
        out.push(g);
    }
}

/// `U = G g Gᵀ` for every (C_out, C_in) pair, computed in f64, packed for the microkernel:
/// position ξ, channel group g, input channel ci, lane j at `((ξ·groups + g)·C_in + ci)·NC + j`.
pub fn transform_filters(filters: &[f32], c_out: usize, c_in: usize) -> Vec<f32> {
    const G: [[f64; 3]; 4] = [
        [1.0, 0.0, 0.0],
        [0.5, 0.5, 0.5],
        [0.5, -0.5, 0.5],
        [0.0, 0.0, 1.0],
    ];
    let groups = c_out.div_ceil(NC);
    let mut out = vec![0f32; XI * groups * c_in * NC];
    for co in 0..c_out {
        for ci in 0..c_in {
            let g = &filters[(co * c_in + ci) * 27..][..27];
            // Separable: apply G along depth, then height, then width (444 multiplies per
            // filter instead of 1728; this runs on every call).
            let mut t1 = [[[0f64; 3]; 3]; 4];
            for i in 0..4 {
                for b in 0..3 {
                    for c in 0..3 {
                        t1[i][b][c] = (0..3)
                            .map(|a| G[i][a] * f64::from(g[(a * 3 + b) * 3 + c]))
                            .sum();
                    }
                }
            }
            let mut t2 = [[[0f64; 3]; 4]; 4];
            for i in 0..4 {
                for j in 0..4 {
                    for c in 0..3 {
                        t2[i][j][c] = (0..3).map(|b| G[j][b] * t1[i][b][c]).sum();
                    }
                }
            }
            for i in 0..4 {
                for j in 0..4 {
                    for l in 0..4 {
                        let u: f64 = (0..3).map(|c| G[l][c] * t2[i][j][c]).sum();
                        let xi = (i * 4 + j) * 4 + l;
                        out[((xi * groups + co / NC) * c_in + ci) * NC + co % NC] = u as f32;
                    }
                }
            }
        }
    }
    out
}

type Lanes = [f32; LANES];

/// 16 values at `at` as an array (a fixed-size copy: no call into `memcpy`).
#[inline(always)]
fn load(v: &[f32], at: usize) -> Lanes {
    v[at..at + LANES].try_into().expect("16 values")
}

/// Stores 16 values at `at` (a fixed-size copy).
#[inline(always)]
fn store(v: &mut [f32], at: usize, x: &Lanes) {
    let d: &mut Lanes = (&mut v[at..at + LANES]).try_into().expect("16 values");
    *d = *x;
}

/// `Bᵀ d` for one axis.
#[inline(always)]
fn bt(d: [Lanes; 4]) -> [Lanes; 4] {
    let mut v = [[0f32; LANES]; 4];
    for k in 0..LANES {
        v[0][k] = d[0][k] - d[2][k];
        v[1][k] = d[1][k] + d[2][k];
        v[2][k] = d[2][k] - d[1][k];
        v[3][k] = d[1][k] - d[3][k];
    }
    v
}

/// `Aᵀ m` for one axis.
#[inline(always)]
fn at(m: [Lanes; 4]) -> [Lanes; 2] {
    let mut y = [[0f32; LANES]; 2];
    for k in 0..LANES {
        y[0][k] = m[0][k] + m[1][k] + m[2][k];
        y[1][k] = m[1][k] - m[2][k] - m[3][k];
    }
    y
}

/// Input transform of up to three lane groups of one batch item into `v`: input channel ci,
/// position ξ, column `g·16 + lane` at `ci·V_CH_STRIDE + ξ·COLS + g·16 + lane` (zero
/// padding outside the input).
///
/// # Safety
/// The CPU must support `isa` (the plan checked it); the transform is compiled for each ISA
/// so the lane arithmetic uses its vectors. It only adds and subtracts, so every ISA gives
/// the same bits.
#[cfg(target_arch = "x86_64")]
pub unsafe fn input_transform(
    isa: crate::plan::GemmImpl,
    shape: &Conv3dShape,
    input_n: &[f32],
    groups: &[LaneGroup],
    v: &mut [f32],
) {
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn avx512(shape: &Conv3dShape, input_n: &[f32], groups: &[LaneGroup], v: &mut [f32]) {
        input_transform_body::<true>(shape, input_n, groups, v)
    }
    #[target_feature(enable = "avx2,fma")]
    fn avx2(shape: &Conv3dShape, input_n: &[f32], groups: &[LaneGroup], v: &mut [f32]) {
        input_transform_body::<false>(shape, input_n, groups, v)
    }
    // SAFETY: the CPU supports `isa` (caller's contract).
    unsafe {
        match isa {
            crate::plan::GemmImpl::Avx512 => avx512(shape, input_n, groups, v),
            _ => avx2(shape, input_n, groups, v),
        }
    }
}

/// An input patch: `[i][j][l][lane]`.
type Patch = [[[Lanes; 4]; 4]; 4];

/// Calls `f(p[i][j], row)` for every row `(i, j)` of `run`'s 4×4 patch rows that lies inside
/// the input: `row` is channel `ci`'s input row `(z0 + i − pd, 2·ty + j − ph)` (`w` values).
/// Rows in the padding are skipped (their entries of `p` are left as they are).
#[inline(always)]
fn patch_rows<P>(
    p: &mut [[P; 4]; 4],
    run: &BlockRun,
    input_n: &[f32],
    ci: usize,
    [d, h, w]: [usize; 3],
    [pd, ph]: [usize; 2],
    mut f: impl FnMut(&mut P, &[f32]),
) {
    for (i, pi) in p.iter_mut().enumerate() {
        let iz = (run.z0 + i) as isize - pd as isize;
        if iz < 0 || iz >= d as isize {
            continue;
        }
        for (j, pij) in pi.iter_mut().enumerate() {
            let iy = (2 * run.ty + j) as isize - ph as isize;
            if iy < 0 || iy >= h as isize {
                continue;
            }
            f(
                pij,
                &input_n[((ci * d + iz as usize) * h + iy as usize) * w..][..w],
            );
        }
    }
}

/// Gathers the input of `run`'s blocks (channel `ci`) into its lanes of `p` (zero outside
/// the input). `MASKED`: leave the other lanes as they are; else the lanes after the run
/// get whatever its columns hold there.
#[inline(always)]
fn gather<const MASKED: bool>(
    p: &mut Patch,
    run: &BlockRun,
    input_n: &[f32],
    ci: usize,
    [d, h, w]: [usize; 3],
    [pd, ph, pw]: [usize; 3],
) {
    let x_start = (2 * run.tx0) as isize - pw as isize;
    let span = 2 * run.len + 2;
    let keep: [bool; LANES] =
        std::array::from_fn(|k| !MASKED || k.wrapping_sub(run.lane) < run.len);
    patch_rows(p, run, input_n, ci, [d, h, w], [pd, ph], |pij, row| {
        // The run's input columns, placed so that lane k reads `seg[2k + l]` (they end by
        // 2·(lane + len) + 2 <= 2·LANES + 2).
        let mut seg = [0f32; 2 * LANES + 2];
        let lo = (-x_start).clamp(0, span as isize) as usize;
        let hi = (w as isize - x_start).clamp(lo as isize, span as isize) as usize;
        if hi > lo {
            let s0 = (x_start + lo as isize) as usize;
            let at = 2 * run.lane;
            super::im2col::copy_run(&mut seg[at + lo..at + hi], &row[s0..s0 + (hi - lo)]);
        }
        // All 16 lanes at once (vectorized), kept in the run's lanes only.
        for (l, pijl) in pij.iter_mut().enumerate() {
            for (k, x) in pijl.iter_mut().enumerate() {
                let v = seg[2 * k + l];
                *x = if keep[k] { v } else { *x };
            }
        }
    });
}

/// `AVX512`: the gathers use AVX-512 loads and permutes (set only where the CPU has it).
/// The input transform of one lane group and input channel by AVX-512 (the same values
/// and operations as [`gather`] + `bt` in [`input_transform_body`], so the same bits):
/// masked loads and one permute per 16 lanes gather each patch row, `Bᵀ` runs along x,
/// y and z on whole vectors, and the 64 positions go to `v` at `at + ξ·COLS`.
///
/// # Safety
/// The CPU must support AVX-512F; `v` must hold `at + 63·COLS + 16` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn group_transform_avx512(
    grp: &LaneGroup,
    input_n: &[f32],
    ci: usize,
    [d, h, w]: [usize; 3],
    [pd, ph, pw]: [usize; 3],
    v: &mut [f32],
    at: usize,
) {
    use std::arch::x86_64::*;
    let bt = |x: [__m512; 4]| {
        [
            _mm512_sub_ps(x[0], x[2]),
            _mm512_add_ps(x[1], x[2]),
            _mm512_sub_ps(x[2], x[1]),
            _mm512_sub_ps(x[1], x[3]),
        ]
    };
    use super::avx512::bits;
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    // Span element e (0..48) of a run's row is input column `base + e`; lane k of tap
    // column l takes element 2k + l. Elements load only inside the run's span (its lanes'
    // elements and the two after) and inside the row: three loads and two alignments give
    // all four tap columns (each element loaded once, not once per tap column: input
    // transform 4.4 → 3.8 ms of 16→16 over 48³ at one thread).
    let span = |run: &BlockRun| {
        let base = (2 * run.tx0) as isize - pw as isize - (2 * run.lane) as isize;
        let lo = (-base).max((2 * run.lane) as isize);
        let hi = (w as isize - base).min((2 * (run.lane + run.len) + 2) as isize);
        (
            base,
            [bits(lo, hi), bits(lo - 16, hi - 16), bits(lo - 32, hi - 32)],
        )
    };
    // One patch row after Bᵀ along x.
    let x_row = |row: &[f32], base: isize, m: [__mmask16; 3]| {
        let q = row.as_ptr().wrapping_offset(base);
        // SAFETY: the masks enable only columns inside [0, w) of this row.
        let [v0, v1, v2] = unsafe {
            [
                _mm512_maskz_loadu_ps(m[0], q),
                _mm512_maskz_loadu_ps(m[1], q.wrapping_add(16)),
                _mm512_maskz_loadu_ps(m[2], q.wrapping_add(32)),
            ]
        };
        // Elements 2.. of the span.
        let a0 = _mm512_castsi512_ps(_mm512_alignr_epi32(
            _mm512_castps_si512(v1),
            _mm512_castps_si512(v0),
            2,
        ));
        let a1 = _mm512_castsi512_ps(_mm512_alignr_epi32(
            _mm512_castps_si512(v2),
            _mm512_castps_si512(v1),
            2,
        ));
        bt([
            _mm512_permutex2var_ps(v0, even, v1),
            _mm512_permutex2var_ps(v0, odd, v1),
            _mm512_permutex2var_ps(a0, even, a1),
            _mm512_permutex2var_ps(a0, odd, a1),
        ])
    };
    // Patch [i][j][l] after Bᵀ along x; rows outside the input are zero.
    let runs = grp.runs();
    let mut p = if runs.len() == 1 && runs[0].lane == 0 && runs[0].len == LANES {
        // One run over all 16 lanes (most groups): every row written once, no zeroed patch
        // first (its 4 KiB memset per group and channel was 7 % of 16→16 over 48³).
        let run = &runs[0];
        let (base, m) = span(run);
        let mut p = std::mem::MaybeUninit::<[[[__m512; 4]; 4]; 4]>::uninit();
        let rows = p.as_mut_ptr() as *mut [__m512; 4];
        for i in 0..4 {
            let iz = (run.z0 + i) as isize - pd as isize;
            for j in 0..4 {
                let iy = (2 * run.ty + j) as isize - ph as isize;
                let t = if iz < 0 || iz >= d as isize || iy < 0 || iy >= h as isize {
                    [_mm512_setzero_ps(); 4]
                } else {
                    let at = ((ci * d + iz as usize) * h + iy as usize) * w;
                    x_row(&input_n[at..at + w], base, m)
                };
                // SAFETY: row i·4 + j of the 16 rows of `p`.
                unsafe { rows.add(i * 4 + j).write(t) };
            }
        }
        // SAFETY: all 16 rows, so every element, were written just above.
        unsafe { p.assume_init() }
    } else {
        let mut p = [[[_mm512_setzero_ps(); 4]; 4]; 4];
        for run in runs {
            let (base, m) = span(run);
            let lanes = bits(run.lane as isize, (run.lane + run.len) as isize);
            patch_rows(&mut p, run, input_n, ci, [d, h, w], [pd, ph], |pij, row| {
                let t = x_row(row, base, m);
                for l in 0..4 {
                    pij[l] = _mm512_mask_mov_ps(pij[l], lanes, t[l]);
                }
            });
        }
        p
    };
    // Bᵀ along y, then z.
    for pi in p.iter_mut() {
        for l in 0..4 {
            let t = bt([pi[0][l], pi[1][l], pi[2][l], pi[3][l]]);
            for j in 0..4 {
                pi[j][l] = t[j];
            }
        }
    }
    let out = &mut v[at..at + 63 * COLS + LANES];
    for j in 0..4 {
        for l in 0..4 {
            let t = bt([p[0][j][l], p[1][j][l], p[2][j][l], p[3][j][l]]);
            for i in 0..4 {
                let xi = (i * 4 + j) * 4 + l;
                // SAFETY: 16 values at xi·COLS <= 63·COLS inside `out`.
                unsafe { _mm512_storeu_ps(out[xi * COLS..].as_mut_ptr(), t[i]) };
            }
        }
    }
}

#[inline(always)]
fn input_transform_body<const AVX512: bool>(
    shape: &Conv3dShape,
    input_n: &[f32],
    groups: &[LaneGroup],
    v: &mut [f32],
) {
    let [_, c_in, d, h, w] = shape.input;
    let [pd, ph, pw] = shape.params.padding;
    for ci in 0..c_in {
        for (gi, grp) in groups.iter().enumerate() {
            if AVX512 {
                // SAFETY: AVX512 is only set in the AVX-512 instantiation; v holds every
                // channel's 64 positions × COLS columns.
                unsafe {
                    group_transform_avx512(
                        grp,
                        input_n,
                        ci,
                        [d, h, w],
                        [pd, ph, pw],
                        v,
                        ci * V_CH_STRIDE + gi * LANES,
                    )
                };
                continue;
            }
            // Patch [i][j][l][lane]; lanes past the group's blocks stay zero.
            let mut p = [[[[0f32; LANES]; 4]; 4]; 4];
            // One run from lane 0 needs no mask: the lanes after it are never output.
            if grp.n_runs == 1 && grp.runs[0].lane == 0 {
                gather::<false>(&mut p, &grp.runs[0], input_n, ci, [d, h, w], [pd, ph, pw]);
            } else {
                for run in grp.runs() {
                    gather::<true>(&mut p, run, input_n, ci, [d, h, w], [pd, ph, pw]);
                }
            }
            // Bᵀ along x, then y, then z.
            for pi in p.iter_mut() {
                for pij in pi.iter_mut() {
                    *pij = bt(*pij);
                }
                for l in 0..4 {
                    let t = bt([pi[0][l], pi[1][l], pi[2][l], pi[3][l]]);
                    for j in 0..4 {
                        pi[j][l] = t[j];
                    }
                }
            }
            for j in 0..4 {
                for l in 0..4 {
                    let t = bt([p[0][j][l], p[1][j][l], p[2][j][l], p[3][j][l]]);
                    for i in 0..4 {
                        let xi = (i * 4 + j) * 4 + l;
                        store(v, ci * V_CH_STRIDE + xi * COLS + gi * LANES, &t[i]);
                    }
                }
            }
        }
    }
}

/// Output transform of `m` (channel co, position ξ, column at
/// `ξ·xi_stride(C_out) + co·COLS + col`) for the channels `chans` into the destination:
/// output plane `z`, row `y`, column `x` of channel `co` at
/// `dst[co·rs + (z − tile_z0)·oH·oW + y·oW + x]`, with bias and activation applied.
///
/// # Safety
/// The CPU must support `isa`. `dst` must be writable at every such index for the planes
/// of the lane groups that exist (`z < oD`, `y < oH`, `x < oW`) and the channels `chans`,
/// and no other thread may access them meanwhile.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn output_transform(
    isa: crate::plan::GemmImpl,
    shape: &Conv3dShape,
    m: &[f32],
    groups: &[LaneGroup],
    chans: std::ops::Range<usize>,
    bias: Option<&[f32]>,
    activation: &super::Activation,
    dst: *mut f32,
    rs: usize,
    tile_z0: usize,
) {
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2(a: OutputArgs<'_>) {
        // SAFETY: forwarded contract.
        unsafe { output_transform_body(a) }
    }
    let a = OutputArgs {
        shape,
        m,
        groups,
        chans,
        bias,
        activation,
        dst,
        rs,
        tile_z0,
    };
    // SAFETY: the CPU supports `isa`; the rest is the caller's contract.
    unsafe {
        match isa {
            crate::plan::GemmImpl::Avx512 => output_transform_avx512(a),
            _ => avx2(a),
        }
    }
}

/// [`output_transform`]'s operands, shared by its portable and AVX-512 bodies.
struct OutputArgs<'a> {
    shape: &'a Conv3dShape,
    m: &'a [f32],
    groups: &'a [LaneGroup],
    chans: std::ops::Range<usize>,
    bias: Option<&'a [f32]>,
    activation: &'a super::Activation,
    dst: *mut f32,
    rs: usize,
    tile_z0: usize,
}

/// # Safety
/// As [`output_transform`], without the ISA.
#[inline(always)]
unsafe fn output_transform_body(a: OutputArgs<'_>) {
    let OutputArgs {
        shape,
        m,
        groups,
        chans,
        bias,
        activation,
        dst,
        rs,
        tile_z0,
    } = a;
    let [od, oh, ow] = shape.out_dims();
    let xs = xi_stride(shape.c_out());
    for co in chans {
        let b = bias.map_or(0.0, |b| b[co]);
        for (gi, grp) in groups.iter().enumerate() {
            // Aᵀ along x while loading: 4×4×4 → 4×4×2 per lane.
            let base = co * COLS + gi * LANES;
            let mut r = [[[[0f32; LANES]; 2]; 4]; 4];
            for i in 0..4 {
                for j in 0..4 {
                    let xi = (i * 4 + j) * 4;
                    r[i][j] = at([
                        load(m, base + xi * xs),
                        load(m, base + (xi + 1) * xs),
                        load(m, base + (xi + 2) * xs),
                        load(m, base + (xi + 3) * xs),
                    ]);
                }
            }
            let mut s = [[[[0f32; LANES]; 2]; 2]; 4];
            for i in 0..4 {
                for x in 0..2 {
                    let t = at([r[i][0][x], r[i][1][x], r[i][2][x], r[i][3][x]]);
                    s[i][0][x] = t[0];
                    s[i][1][x] = t[1];
                }
            }
            for y in 0..2 {
                for x in 0..2 {
                    let t = at([s[0][y][x], s[1][y][x], s[2][y][x], s[3][y][x]]);
                    s[0][y][x] = t[0];
                    s[1][y][x] = t[1];
                }
            }
            // Output rows (dz, dy) of all 16 lanes, interleaved once (vectorized); each run
            // takes its own share.
            let mut rows = [[[0f32; 2 * LANES]; 2]; 2];
            for dz in 0..2 {
                for dy in 0..2 {
                    for k in 0..LANES {
                        rows[dz][dy][2 * k] = s[dz][dy][0][k];
                        rows[dz][dy][2 * k + 1] = s[dz][dy][1][k];
                    }
                }
            }
            for run in grp.runs() {
                let x0 = 2 * run.tx0;
                let n = (2 * run.len).min(ow - x0);
                for dz in 0..2 {
                    let z = run.z0 + dz;
                    if z >= od {
                        continue;
                    }
                    for dy in 0..2 {
                        let y = 2 * run.ty + dy;
                        if y >= oh {
                            continue;
                        }
                        let row = &mut rows[dz][dy][2 * run.lane..2 * run.lane + n];
                        activation.channel(co).bias_apply(row, b);
                        let off = co * rs + (z - tile_z0) * oh * ow + y * ow + x0;
                        // SAFETY: n values of row y of plane z, inside the tile (caller's
                        // contract); `row` is a local array, so the ranges cannot overlap.
                        unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), dst.add(off), n) };
                    }
                }
            }
        }
    }
}

/// [`output_transform`] in AVX-512 registers: `Aᵀ M A` on 16 lanes at a time (the same
/// additions in the same order as [`output_transform_body`], so the same bits), the two
/// output columns of each block interleaved by permutes, and every run's share written by
/// masked stores (no per-row `memcpy` calls and no zeroed stack arrays: at 16 channels those
/// were half the transform's time).
///
/// # Safety
/// As [`output_transform`], and the CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn output_transform_avx512(a: OutputArgs<'_>) {
    let OutputArgs {
        shape,
        m,
        groups,
        chans,
        bias,
        activation,
        dst,
        rs,
        tile_z0,
    } = a;
    use std::arch::x86_64::*;
    let at = |x: [__m512; 4]| {
        [
            _mm512_add_ps(_mm512_add_ps(x[0], x[1]), x[2]),
            _mm512_sub_ps(_mm512_sub_ps(x[1], x[2]), x[3]),
        ]
    };
    let [od, oh, ow] = shape.out_dims();
    let xs = xi_stride(shape.c_out());
    // Lanes k of the x = 0 and x = 1 results, interleaved: output columns 2k, 2k + 1.
    let lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for co in chans {
        let b = _mm512_set1_ps(bias.map_or(0.0, |b| b[co]));
        let act = activation.channel(co);
        for (gi, grp) in groups.iter().enumerate() {
            let base = co * COLS + gi * LANES;
            // The 64 loads: every index below is `base + ξ·xs` with ξ < 64, inside M.
            let src = m[base..base + 63 * xs + LANES].as_ptr();
            // Aᵀ along x, then along y, per patch plane i: t[i][y][x].
            let mut t = [[[_mm512_setzero_ps(); 2]; 2]; 4];
            for (i, ti) in t.iter_mut().enumerate() {
                let mut r = [[_mm512_setzero_ps(); 2]; 4];
                for (j, rj) in r.iter_mut().enumerate() {
                    let xi = (i * 4 + j) * 4;
                    // SAFETY: ξ + 3 < 64, so within the slice taken above.
                    let x: [__m512; 4] =
                        std::array::from_fn(|l| unsafe { _mm512_loadu_ps(src.add((xi + l) * xs)) });
                    *rj = at(x);
                }
                for x in 0..2 {
                    let y = at([r[0][x], r[1][x], r[2][x], r[3][x]]);
                    ti[0][x] = y[0];
                    ti[1][x] = y[1];
                }
            }
            // Along z, then bias, and the interleave of the two columns of every block.
            let mut rows = [[[0f32; 2 * LANES]; 2]; 2];
            for y in 0..2 {
                let z0 = at([t[0][y][0], t[1][y][0], t[2][y][0], t[3][y][0]]);
                let z1 = at([t[0][y][1], t[1][y][1], t[2][y][1], t[3][y][1]]);
                for dz in 0..2 {
                    let (c0, c1) = (_mm512_add_ps(z0[dz], b), _mm512_add_ps(z1[dz], b));
                    let row = rows[dz][y].as_mut_ptr();
                    // SAFETY: `row` holds 32 values.
                    unsafe {
                        _mm512_storeu_ps(row, _mm512_permutex2var_ps(c0, lo_idx, c1));
                        _mm512_storeu_ps(row.add(LANES), _mm512_permutex2var_ps(c0, hi_idx, c1));
                    }
                }
            }
            if act != super::activation::ChannelAct::None {
                for row in rows.iter_mut().flatten() {
                    // SAFETY: this function runs under AVX-512F.
                    unsafe { act.map_apply_avx512(row, |x| x) };
                }
            }
            for run in grp.runs() {
                let x0 = 2 * run.tx0;
                let n = (2 * run.len).min(ow - x0);
                let (lo, hi) = ((2 * run.lane) as isize, (2 * run.lane + n) as isize);
                let mask = super::avx512::span_bits(lo, hi);
                for dz in 0..2 {
                    let z = run.z0 + dz;
                    if z >= od {
                        continue;
                    }
                    for dy in 0..2 {
                        let y = 2 * run.ty + dy;
                        if y >= oh {
                            continue;
                        }
                        let row = rows[dz][dy].as_ptr();
                        let off = co * rs + (z - tile_z0) * oh * ow + y * ow + x0;
                        // Element e of `row` goes to `dst + off − 2·lane + e`, for the run's
                        // elements 2·lane .. 2·lane + n only (the masks).
                        let to = dst.wrapping_add(off).wrapping_sub(2 * run.lane);
                        // SAFETY: the enabled lanes write the n values of row y of plane z,
                        // inside the tile (caller's contract); `row` holds 32 values.
                        unsafe {
                            _mm512_mask_storeu_ps(to, mask[0], _mm512_loadu_ps(row));
                            _mm512_mask_storeu_ps(
                                to.wrapping_add(LANES),
                                mask[1],
                                _mm512_loadu_ps(row.add(LANES)),
                            );
                        }
                    }
                }
            }
        }
    }
}
