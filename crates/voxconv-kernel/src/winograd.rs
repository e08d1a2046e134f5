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
//! Lanes: 16 horizontally adjacent output blocks of one block row form a *lane group*
//! (one zmm); three lane groups form the 48 columns of one microkernel call.

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
/// Stride between channels in the transformed buffers: all 64 positions × 48 columns, plus
/// one cache line so channel rows never sit a multiple of 4 KiB apart (L1 aliasing when the
/// microkernel walks down a column).
pub const CH_STRIDE: usize = XI * COLS + 16;

/// Whether a shape can use this transform.
pub fn eligible(shape: &Conv3dShape) -> bool {
    let p = shape.params;
    shape.kernel_dims() == [3, 3, 3] && p.stride == [1; 3] && p.dilation == [1; 3]
}

/// Share of the transform's lanes that compute real outputs: a block row of `⌈oW/2⌉`
/// blocks fills lane groups of 16, and odd output sizes leave half-empty 2×2×2 blocks. An
/// 8-wide output fills 4 lanes of 16 (0.25): the 3.4× fewer multiplies are then lost.
pub fn lane_use(shape: &Conv3dShape) -> f64 {
    let [od, oh, ow] = shape.out_dims();
    let lane_cols = 2 * LANES * ow.div_ceil(2).div_ceil(LANES);
    let pairs = |n: usize| n as f64 / (2 * n.div_ceil(2)) as f64;
    ow as f64 / lane_cols as f64 * pairs(oh) * pairs(od)
}

/// Up to 16 output blocks of one block row: output planes `z0, z0+1`, rows `2·ty, 2·ty+1`,
/// columns `2·tx0 ..` (`lanes` blocks).
#[derive(Clone, Copy, Debug, Default)]
pub struct LaneGroup {
    pub z0: usize,
    pub ty: usize,
    pub tx0: usize,
    pub lanes: usize,
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
/// position ξ, column `g·16 + lane` at `ci·CH_STRIDE + ξ·COLS + g·16 + lane` (zero padding
/// outside the input).
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
        input_transform_body(shape, input_n, groups, v)
    }
    #[target_feature(enable = "avx2,fma")]
    fn avx2(shape: &Conv3dShape, input_n: &[f32], groups: &[LaneGroup], v: &mut [f32]) {
        input_transform_body(shape, input_n, groups, v)
    }
    // SAFETY: the CPU supports `isa` (caller's contract).
    unsafe {
        match isa {
            crate::plan::GemmImpl::Avx512 => avx512(shape, input_n, groups, v),
            _ => avx2(shape, input_n, groups, v),
        }
    }
}

#[inline(always)]
fn input_transform_body(shape: &Conv3dShape, input_n: &[f32], groups: &[LaneGroup], v: &mut [f32]) {
    let [_, c_in, d, h, w] = shape.input;
    let [pd, ph, pw] = shape.params.padding;
    for ci in 0..c_in {
        for (gi, grp) in groups.iter().enumerate() {
            // Patch [i][j][l][lane].
            let mut p = [[[[0f32; LANES]; 4]; 4]; 4];
            let x_start = (2 * grp.tx0) as isize - pw as isize;
            let span = 2 * grp.lanes + 2;
            for (i, pi) in p.iter_mut().enumerate() {
                let iz = (grp.z0 + i) as isize - pd as isize;
                if iz < 0 || iz >= d as isize {
                    continue;
                }
                for (j, pij) in pi.iter_mut().enumerate() {
                    let iy = (2 * grp.ty + j) as isize - ph as isize;
                    if iy < 0 || iy >= h as isize {
                        continue;
                    }
                    let row = &input_n[((ci * d + iz as usize) * h + iy as usize) * w..][..w];
                    let mut seg = [0f32; 2 * LANES + 2];
                    let lo = (-x_start).clamp(0, span as isize) as usize;
                    let hi = (w as isize - x_start).clamp(lo as isize, span as isize) as usize;
                    if hi > lo {
                        let s0 = (x_start + lo as isize) as usize;
                        super::im2col::copy_run(&mut seg[lo..hi], &row[s0..s0 + (hi - lo)]);
                    }
                    for (l, pijl) in pij.iter_mut().enumerate() {
                        for (k, x) in pijl.iter_mut().enumerate() {
                            *x = seg[2 * k + l];
                        }
                    }
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
                        store(v, ci * CH_STRIDE + xi * COLS + gi * LANES, &t[i]);
                    }
                }
            }
        }
    }
}

/// Output transform of `m` (channel co, position ξ, column at `co·CH_STRIDE + ξ·COLS + col`)
/// into the destination: output plane `z`, row `y`, column `x` of channel `co` at
/// `dst[co·rs + (z − tile_z0)·oH·oW + y·oW + x]`, with bias and activation applied.
///
/// # Safety
/// The CPU must support `isa`. `dst` must be writable at every such index for the planes
/// of the lane groups that exist (`z < oD`, `y < oH`, `x < oW`), and no other thread may
/// access them meanwhile.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn output_transform(
    isa: crate::plan::GemmImpl,
    shape: &Conv3dShape,
    m: &[f32],
    groups: &[LaneGroup],
    bias: Option<&[f32]>,
    activation: super::Activation,
    dst: *mut f32,
    rs: usize,
    tile_z0: usize,
) {
    type Args<'a> = (
        &'a Conv3dShape,
        &'a [f32],
        &'a [LaneGroup],
        Option<&'a [f32]>,
        super::Activation,
    );
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn avx512(a: Args<'_>, dst: *mut f32, rs: usize, tile_z0: usize) {
        // SAFETY: forwarded contract.
        unsafe { output_transform_body(a.0, a.1, a.2, a.3, a.4, dst, rs, tile_z0) }
    }
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2(a: Args<'_>, dst: *mut f32, rs: usize, tile_z0: usize) {
        // SAFETY: forwarded contract.
        unsafe { output_transform_body(a.0, a.1, a.2, a.3, a.4, dst, rs, tile_z0) }
    }
    let a = (shape, m, groups, bias, activation);
    // SAFETY: the CPU supports `isa`; the rest is the caller's contract.
    unsafe {
        match isa {
            crate::plan::GemmImpl::Avx512 => avx512(a, dst, rs, tile_z0),
            _ => avx2(a, dst, rs, tile_z0),
        }
    }
}

/// # Safety
/// As [`output_transform`], without the ISA.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn output_transform_body(
    shape: &Conv3dShape,
    m: &[f32],
    groups: &[LaneGroup],
    bias: Option<&[f32]>,
    activation: super::Activation,
    dst: *mut f32,
    rs: usize,
    tile_z0: usize,
) {
    let c_out = shape.c_out();
    let [od, oh, ow] = shape.out_dims();
    for co in 0..c_out {
        let b = bias.map_or(0.0, |b| b[co]);
        for (gi, grp) in groups.iter().enumerate() {
            // Aᵀ along x while loading: 4×4×4 → 4×4×2 per lane.
            let base = co * CH_STRIDE + gi * LANES;
            let mut r = [[[[0f32; LANES]; 2]; 4]; 4];
            for i in 0..4 {
                for j in 0..4 {
                    let xi = (i * 4 + j) * 4;
                    r[i][j] = at([
                        load(m, base + xi * COLS),
                        load(m, base + (xi + 1) * COLS),
                        load(m, base + (xi + 2) * COLS),
                        load(m, base + (xi + 3) * COLS),
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
            let x0 = 2 * grp.tx0;
            let n = (2 * grp.lanes).min(ow - x0);
            for y in 0..2 {
                for x in 0..2 {
                    let t = at([s[0][y][x], s[1][y][x], s[2][y][x], s[3][y][x]]);
                    s[0][y][x] = t[0];
                    s[1][y][x] = t[1];
                }
            }
            for dz in 0..2 {
                let z = grp.z0 + dz;
                if z >= od {
                    continue;
                }
                for dy in 0..2 {
                    let y = 2 * grp.ty + dy;
                    if y >= oh {
                        continue;
                    }
                    let mut row = [0f32; 2 * LANES];
                    for k in 0..LANES {
                        row[2 * k] = s[dz][dy][0][k];
                        row[2 * k + 1] = s[dz][dy][1][k];
                    }
                    activation.bias_apply(&mut row[..n], b);
                    let off = co * rs + (z - tile_z0) * oh * ow + y * ow + x0;
                    // SAFETY: n values of row y of plane z, inside the tile (caller's
                    // contract); `row` is a local array, so the ranges cannot overlap.
                    unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), dst.add(off), n) };
                }
            }
        }
    }
}
