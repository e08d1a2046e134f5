//! Tensor operations besides convolution, for ONNX U-Nets: instance and group normalization,
//! softmax over channels, Resize (nearest / trilinear), Pad, max and average pooling with
//! padding, dilation and ceil mode, and global average pooling.
//!
//! f32, PyTorch layout (`[N, C, D, H, W]` or `[N, C, spatial]`), C order. Every function checks
//! its shape, parameters and buffer lengths with checked arithmetic before it allocates, and
//! answers bad input with a [`KernelError`], never a panic. Every dimension must be at least 1:
//! an empty tensor is [`KernelError::EmptyDimension`]. Output buffers are reserved with
//! `try_reserve_exact`, so an allocation the machine cannot serve is an error too.
//!
//! Semantics follow ONNX (opset 13–19) and PyTorch where they agree; where they differ the
//! function's documentation says which one it follows.

use super::shape::AXES;
use super::{ChannelAct, KernelError};
use crate::check_len;

/// Names of the five dimensions of an `[N, C, D, H, W]` tensor, as errors report them.
const DIMS5: [&str; 5] = ["N", "C", "D", "H", "W"];

/// Values per block of positions in [`softmax_channels`] (a block of every channel stays in
/// cache between the passes).
const SOFTMAX_BLOCK: usize = 256;

// ---------------------------------------------------------------------------------------------
// Helpers

fn product(dims: &[usize], what: &'static str) -> Result<usize, KernelError> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or(KernelError::Overflow { what })
}

fn check_nonzero(
    tensor: &'static str,
    dims: &[usize],
    names: &[&'static str],
) -> Result<(), KernelError> {
    match dims.iter().zip(names).find(|(&d, _)| d == 0) {
        Some((_, &dim)) => Err(KernelError::EmptyDimension { tensor, dim }),
        None => Ok(()),
    }
}

/// Validates an `[N, C, spatial]` view of `len` values; returns `C · spatial`.
fn check_ncs(len: usize, n: usize, c: usize, spatial: usize) -> Result<usize, KernelError> {
    check_nonzero("input", &[n, c, spatial], &["N", "C", "spatial"])?;
    let plane = product(&[c, spatial], "input")?;
    check_len("input", product(&[n, plane], "input")?, len)?;
    Ok(plane)
}

/// Validates a 5-D shape against a buffer of `len` values; returns `D · H · W`.
fn check_shape5(shape: [usize; 5], len: usize) -> Result<usize, KernelError> {
    check_nonzero("input", &shape, &DIMS5)?;
    let spatial = product(&shape[2..], "input")?;
    check_len(
        "input",
        product(&[shape[0], shape[1], spatial], "input")?,
        len,
    )?;
    Ok(spatial)
}

/// A vector with room for `len` values, or an error where `len` values cannot be allocated.
fn try_with_capacity<T>(len: usize, what: &'static str) -> Result<Vec<T>, KernelError> {
    if len
        .checked_mul(std::mem::size_of::<T>())
        .is_none_or(|bytes| bytes > isize::MAX as usize)
    {
        return Err(KernelError::Overflow { what });
    }
    let mut v = Vec::new();
    v.try_reserve_exact(len)
        .map_err(|e| KernelError::Unsupported {
            what: what.to_string(),
            reason: format!("cannot allocate {len} values: {e}"),
        })?;
    Ok(v)
}

fn try_filled(len: usize, value: f32, what: &'static str) -> Result<Vec<f32>, KernelError> {
    let mut v = try_with_capacity(len, what)?;
    v.resize(len, value);
    Ok(v)
}

/// Sum in f64 with eight independent accumulators (vectorisable, and more accurate than one).
fn sum_f64(v: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let chunks = v.chunks_exact(8);
    let tail = chunks.remainder();
    for ch in chunks {
        for (a, &x) in acc.iter_mut().zip(ch) {
            *a += f64::from(x);
        }
    }
    let mut s: f64 = acc.iter().sum();
    for &x in tail {
        s += f64::from(x);
    }
    s
}

/// Lanes of the f32 accumulators (vectorised by the compiler) and values per block, after
/// which a block's lane sums are added into f64.
const NORM_LANES: usize = 16;
const NORM_BLOCK: usize = 1024;

/// Mean and biased variance of `v` (non-empty) in one pass: the sums of `x − k` and
/// `(x − k)²`, with `k` the first value (so a channel whose values are far from zero but
/// close together loses nothing to cancellation), accumulated in f32 lanes within blocks of
/// 1024 values and in f64 across blocks. A constant `v` gives exactly its value and 0.
pub(crate) fn mean_var(v: &[f32]) -> (f64, f64) {
    let k = v[0];
    let (mut s1, mut s2) = (0f64, 0f64);
    for block in v.chunks(NORM_BLOCK) {
        let mut a1 = [0f32; NORM_LANES];
        let mut a2 = [0f32; NORM_LANES];
        let lanes = block.chunks_exact(NORM_LANES);
        let tail = lanes.remainder();
        for c in lanes {
            for i in 0..NORM_LANES {
                let d = c[i] - k;
                a1[i] += d;
                a2[i] += d * d;
            }
        }
        for &x in tail {
            let d = f64::from(x - k);
            s1 += d;
            s2 += d * d;
        }
        s1 += a1.iter().map(|&x| f64::from(x)).sum::<f64>();
        s2 += a2.iter().map(|&x| f64::from(x)).sum::<f64>();
    }
    let n = v.len() as f64;
    let m = s1 / n;
    (f64::from(k) + m, (s2 / n - m * m).max(0.0))
}

fn check_eps(eps: f32, op: &str) -> Result<f64, KernelError> {
    if eps.is_finite() && eps >= 0.0 {
        Ok(f64::from(eps))
    } else {
        Err(KernelError::Unsupported {
            what: format!("{op} epsilon {eps}"),
            reason: "epsilon must be finite and non-negative".into(),
        })
    }
}

/// `v ← (v − mean) · a + bias` with `a = scale / sqrt(var + eps)` (computed in f64), in f32:
/// a constant channel (whose mean is its value) gives exactly `bias`.
/// Then `act`, in the same pass.
#[allow(clippy::too_many_arguments)]
fn normalize(v: &mut [f32], mean: f64, var: f64, eps: f64, scale: f32, bias: f32, act: ChannelAct) {
    let a = (f64::from(scale) / (var + eps).sqrt()) as f32;
    let m = mean as f32;
    act.map_apply(v, |x| (x - m) * a + bias);
}

// ---------------------------------------------------------------------------------------------
// Normalization and softmax

/// InstanceNormalization (ONNX / PyTorch): for every `(n, c)`,
/// `y = scale[c] · (x − mean) / sqrt(var + eps) + bias[c]` with the mean and the biased variance
/// of the `spatial` values of that channel; in place. Statistics take one pass (f32 lanes
/// within blocks of 1024 values, f64 across blocks, shifted by the channel's first value),
/// the normalization a second, in f32.
///
/// `x` is `[N, C, spatial]` (any rank: `spatial` is the product of the dimensions after the first
/// two), `scale` and `bias` have `c` values, `eps` is finite and non-negative.
pub fn instance_norm(
    x: &mut [f32],
    n: usize,
    c: usize,
    spatial: usize,
    scale: &[f32],
    bias: &[f32],
    eps: f32,
) -> Result<(), KernelError> {
    instance_norm_act(x, n, c, spatial, scale, bias, eps, |_| ChannelAct::None)
}

/// [`instance_norm`], then channel `c`'s activation `act(c)` in the normalizing pass (an
/// activation after the norm costs no pass of its own).
#[allow(clippy::too_many_arguments)]
pub fn instance_norm_act(
    x: &mut [f32],
    n: usize,
    c: usize,
    spatial: usize,
    scale: &[f32],
    bias: &[f32],
    eps: f32,
    act: impl Fn(usize) -> ChannelAct,
) -> Result<(), KernelError> {
    let moments = |_: usize, chan: &[f32]| mean_var(chan);
    instance_norm_by(x, n, c, spatial, scale, bias, eps, act, moments)
}

/// The InstanceNormalization pass shared by [`instance_norm_act`] and
/// [`instance_norm_with_stats`]: `moments(i, chan)` gives plane `i`'s mean and variance.
#[allow(clippy::too_many_arguments)]
fn instance_norm_by(
    x: &mut [f32],
    n: usize,
    c: usize,
    spatial: usize,
    scale: &[f32],
    bias: &[f32],
    eps: f32,
    act: impl Fn(usize) -> ChannelAct,
    moments: impl Fn(usize, &[f32]) -> (f64, f64),
) -> Result<(), KernelError> {
    check_ncs(x.len(), n, c, spatial)?;
    check_len("scale", c, scale.len())?;
    check_len("bias", c, bias.len())?;
    let eps = check_eps(eps, "InstanceNormalization")?;
    for (i, chan) in x.chunks_exact_mut(spatial).enumerate() {
        let (mean, var) = moments(i, chan);
        normalize(chan, mean, var, eps, scale[i % c], bias[i % c], act(i % c));
    }
    Ok(())
}

/// [`instance_norm_act`] with every `(item, channel)`'s mean and biased variance already
/// known (`stats`, `n·c` pairs, item-major: what `Conv3dPlan::run_into_with_stats`
/// returns): the normalizing pass only.
#[allow(clippy::too_many_arguments)]
pub fn instance_norm_with_stats(
    x: &mut [f32],
    n: usize,
    c: usize,
    spatial: usize,
    stats: &[(f64, f64)],
    scale: &[f32],
    bias: &[f32],
    eps: f32,
    act: impl Fn(usize) -> ChannelAct,
) -> Result<(), KernelError> {
    // n·c fits: check_ncs (in instance_norm_by) bounds n·c·spatial, but the lengths are
    // compared first, so saturate.
    check_len("stats", n.saturating_mul(c), stats.len())?;
    instance_norm_by(x, n, c, spatial, scale, bias, eps, act, |i, _| stats[i])
}

/// GroupNormalization (PyTorch `group_norm`, ONNX opset 21): the `c` channels are split into
/// `groups` contiguous groups of `c / groups` channels; mean and biased variance are taken per
/// `(n, group)` over `c / groups · spatial` values (as [`instance_norm`] does), then every channel gets its
/// own `scale[c]` and `bias[c]`; in place. `groups` must divide `c`.
#[allow(clippy::too_many_arguments)]
pub fn group_norm(
    x: &mut [f32],
    n: usize,
    c: usize,
    spatial: usize,
    groups: usize,
    scale: &[f32],
    bias: &[f32],
    eps: f32,
) -> Result<(), KernelError> {
    group_norm_act(x, n, c, spatial, groups, scale, bias, eps, |_| {
        ChannelAct::None
    })
}

/// [`group_norm`], then channel `c`'s activation `act(c)` in the normalizing pass.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_act(
    x: &mut [f32],
    n: usize,
    c: usize,
    spatial: usize,
    groups: usize,
    scale: &[f32],
    bias: &[f32],
    eps: f32,
    act: impl Fn(usize) -> ChannelAct,
) -> Result<(), KernelError> {
    check_ncs(x.len(), n, c, spatial)?;
    if groups == 0 || !c.is_multiple_of(groups) {
        return Err(KernelError::Unsupported {
            what: format!("GroupNormalization with {groups} groups"),
            reason: format!("the number of groups must be at least 1 and divide C = {c}"),
        });
    }
    check_len("scale", c, scale.len())?;
    check_len("bias", c, bias.len())?;
    let eps = check_eps(eps, "GroupNormalization")?;
    let per_group = c / groups;
    // per_group · spatial ≤ c · spatial, which fits (checked above).
    for (g, group) in x.chunks_exact_mut(per_group * spatial).enumerate() {
        let (mean, var) = mean_var(group);
        let first = (g % groups) * per_group;
        for (j, chan) in group.chunks_exact_mut(spatial).enumerate() {
            let ch = first + j;
            normalize(chan, mean, var, eps, scale[ch], bias[ch], act(ch));
        }
    }
    Ok(())
}

/// Softmax over the channel axis (axis 1) of `[N, C, spatial]`, in place; numerically stable
/// (the maximum over the channels is subtracted before `exp`). A NaN among the channels of a
/// position makes that position's outputs NaN, as in PyTorch.
pub fn softmax_channels(
    x: &mut [f32],
    n: usize,
    c: usize,
    spatial: usize,
) -> Result<(), KernelError> {
    let plane = check_ncs(x.len(), n, c, spatial)?;
    for batch in x.chunks_exact_mut(plane) {
        let mut s0 = 0;
        while s0 < spatial {
            let len = SOFTMAX_BLOCK.min(spatial - s0);
            let mut max = [f32::NEG_INFINITY; SOFTMAX_BLOCK];
            let mut sum = [0f32; SOFTMAX_BLOCK];
            let (max, sum) = (&mut max[..len], &mut sum[..len]);
            for ch in 0..c {
                let row = &batch[ch * spatial + s0..][..len];
                for (m, &v) in max.iter_mut().zip(row) {
                    *m = m.max(v);
                }
            }
            for ch in 0..c {
                let row = &mut batch[ch * spatial + s0..][..len];
                for ((v, &m), s) in row.iter_mut().zip(max.iter()).zip(sum.iter_mut()) {
                    *v = (*v - m).exp();
                    *s += *v;
                }
            }
            for ch in 0..c {
                let row = &mut batch[ch * spatial + s0..][..len];
                for (v, &s) in row.iter_mut().zip(sum.iter()) {
                    *v /= s;
                }
            }
            s0 += len;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Resize

/// ONNX Resize `coordinate_transformation_mode` (the ones a U-Net export uses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CoordMode {
    /// `x = (o + 0.5) / scale − 0.5` (PyTorch `align_corners=False`).
    HalfPixel,
    /// As `HalfPixel`, but `x = 0` where the output extent is 1.
    PytorchHalfPixel,
    /// `x = o · (in − 1) / (out − 1)`, `0` where the output extent is 1 (PyTorch
    /// `align_corners=True`).
    AlignCorners,
    /// `x = o / scale`.
    Asymmetric,
}

/// ONNX Resize `nearest_mode`: how a source coordinate is rounded to an index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NearestMode {
    RoundPreferFloor,
    RoundPreferCeil,
    Floor,
    Ceil,
}

/// ONNX Resize `mode`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ResizeMode {
    Nearest(NearestMode),
    /// Trilinear interpolation over D, H and W.
    Linear,
}

/// The source coordinate of output index `o`, in f32 as onnxruntime computes it.
fn source_coord(o: usize, scale: f32, in_len: usize, out_len: usize, coord: CoordMode) -> f32 {
    let of = o as f32;
    match coord {
        CoordMode::HalfPixel => (of + 0.5) / scale - 0.5,
        CoordMode::PytorchHalfPixel => {
            if out_len > 1 {
                (of + 0.5) / scale - 0.5
            } else {
                0.0
            }
        }
        CoordMode::AlignCorners => {
            if out_len == 1 {
                0.0
            } else {
                of * (in_len - 1) as f32 / (out_len - 1) as f32
            }
        }
        CoordMode::Asymmetric => of / scale,
    }
}

/// The input index nearest to source coordinate `x`, clamped to `[0, in_len − 1]`.
fn nearest_index(x: f32, mode: NearestMode, in_len: usize) -> usize {
    let tie = x == x.floor() + 0.5;
    let r = match mode {
        NearestMode::RoundPreferFloor if tie => x.floor(),
        NearestMode::RoundPreferCeil if tie => x.ceil(),
        NearestMode::RoundPreferFloor | NearestMode::RoundPreferCeil => x.round(),
        NearestMode::Floor => x.floor(),
        NearestMode::Ceil => x.ceil(),
    };
    // `as` saturates: negative and NaN become 0, too large becomes usize::MAX.
    (r as usize).min(in_len - 1)
}

/// Two taps of linear interpolation along one axis: `out = w0 · in[i0] + w1 · in[i1]`.
#[derive(Clone, Copy, Debug)]
struct Taps {
    i0: usize,
    i1: usize,
    w0: f32,
    w1: f32,
}

fn linear_taps(x: f32, in_len: usize) -> Taps {
    let last = in_len - 1;
    // Clamped to [0, in − 1] as onnxruntime does (`max` also maps NaN to 0).
    let xc = x.max(0.0).min(last as f32);
    let i0 = (xc as usize).min(last);
    let i1 = (i0 + 1).min(last);
    let w1 = xc - i0 as f32;
    Taps {
        i0,
        i1,
        w0: 1.0 - w1,
        w1,
    }
}

/// Linear interpolation along W: `src` holds rows of `w`, `dst` rows of `taps.len()`.
fn lerp_inner(src: &[f32], dst: &mut [f32], w: usize, taps: &[Taps]) {
    for (srow, drow) in src.chunks_exact(w).zip(dst.chunks_exact_mut(taps.len())) {
        for (o, t) in drow.iter_mut().zip(taps) {
            *o = srow[t.i0] * t.w0 + srow[t.i1] * t.w1;
        }
    }
}

/// Linear interpolation along an outer axis: `src` is blocks of `in_rows` rows of `row` values,
/// `dst` blocks of `taps.len()` rows; whole rows are blended (vectorisable).
fn lerp_outer(src: &[f32], dst: &mut [f32], in_rows: usize, row: usize, taps: &[Taps]) {
    let out_rows = taps.len();
    for (sblock, dblock) in src
        .chunks_exact(in_rows * row)
        .zip(dst.chunks_exact_mut(out_rows * row))
    {
        for (drow, t) in dblock.chunks_exact_mut(row).zip(taps) {
            let r0 = &sblock[t.i0 * row..][..row];
            let r1 = &sblock[t.i1 * row..][..row];
            for ((o, &a), &b) in drow.iter_mut().zip(r0).zip(r1) {
                *o = a * t.w0 + b * t.w1;
            }
        }
    }
}

/// ONNX Resize (opset 13–19) over D, H and W of `[N, C, D, H, W]` to `out_dhw`.
///
/// `scales` are the per-axis factors (out / in) the coordinate transform uses: ONNX uses the
/// given `scales` where the model gives them, else `out / in` (computed in f32), so pass
/// `out as f32 / in as f32` when the model gave sizes. `AlignCorners` ignores `scales`; they must
/// still be finite and positive. Coordinates are computed in f32 as onnxruntime does.
///
/// * `Nearest(m)`: the source coordinate is rounded by `m` and clamped to `[0, in − 1]`.
/// * `Linear`: trilinear, separable (W, then H, then D, skipping an axis that is the identity);
///   the source coordinate is clamped to `[0, in − 1]` as ONNX does.
pub fn resize3d(
    x: &[f32],
    shape: [usize; 5],
    out_dhw: [usize; 3],
    scales: [f32; 3],
    mode: ResizeMode,
    coord: CoordMode,
) -> Result<Vec<f32>, KernelError> {
    let out_len = resize3d_len(shape, x.len(), out_dhw)?;
    let mut out = try_filled(out_len, 0.0, "Resize output")?;
    resize3d_into(x, shape, out_dhw, scales, mode, coord, &mut out, 1)?;
    Ok(out)
}

/// The number of values [`resize3d`] of `shape` (holding `len` values) to `out_dhw` gives.
pub fn resize3d_len(
    shape: [usize; 5],
    len: usize,
    out_dhw: [usize; 3],
) -> Result<usize, KernelError> {
    check_shape5(shape, len)?;
    check_nonzero("output", &out_dhw, &DIMS5[2..])?;
    let out_plane = product(&out_dhw, "Resize output")?;
    product(&[shape[0], shape[1], out_plane], "Resize output")
}

/// [`resize3d`] into `out` (of [`resize3d_len`] values, every one overwritten), the
/// `N·C` planes split over up to `threads` threads (planes are independent: the same bits
/// on any thread count).
#[allow(clippy::too_many_arguments)]
pub fn resize3d_into(
    x: &[f32],
    shape: [usize; 5],
    out_dhw: [usize; 3],
    scales: [f32; 3],
    mode: ResizeMode,
    coord: CoordMode,
    out: &mut [f32],
    threads: usize,
) -> Result<(), KernelError> {
    let out_len = resize3d_len(shape, x.len(), out_dhw)?;
    check_len("Resize output", out_len, out.len())?;
    for a in 0..3 {
        if !(scales[a].is_finite() && scales[a] > 0.0) {
            return Err(KernelError::Unsupported {
                what: format!("Resize scale {} along {}", scales[a], AXES[a]),
                reason: "scales must be finite and positive".into(),
            });
        }
    }
    let [_, _, d, h, w] = shape;
    let [_, oh, ow] = out_dhw;
    let in_plane = d * h * w;
    // Non-zero: checked by resize3d_len.
    let out_plane = product(&out_dhw, "Resize output")?;
    let ins = [d, h, w];
    // Small outputs are not worth a thread.
    let threads = if out_len < 1 << 16 { 1 } else { threads };

    match mode {
        ResizeMode::Nearest(nm) => {
            let mut index: [Vec<usize>; 3] = Default::default();
            for a in 0..3 {
                index[a] = try_with_capacity(out_dhw[a], "Resize index table")?;
                index[a].extend((0..out_dhw[a]).map(|o| {
                    let xs = source_coord(o, scales[a], ins[a], out_dhw[a], coord);
                    nearest_index(xs, nm, ins[a])
                }));
            }
            let index = &index;
            crate::par::par_blocks(out, out_plane, threads, |first, part| {
                for (k, dst) in part.chunks_exact_mut(out_plane).enumerate() {
                    let src = &x[(first + k) * in_plane..][..in_plane];
                    let mut rows = dst.chunks_exact_mut(ow);
                    for &iz in &index[0] {
                        for &iy in &index[1] {
                            let srow = &src[(iz * h + iy) * w..][..w];
                            // One output row per (z, y); `rows` has exactly od · oh of them.
                            if let Some(drow) = rows.next() {
                                for (o, &ix) in drow.iter_mut().zip(&index[2]) {
                                    *o = srow[ix];
                                }
                            }
                        }
                    }
                }
            });
        }
        ResizeMode::Linear => {
            let mut taps: [Vec<Taps>; 3] = Default::default();
            let mut identity = [false; 3];
            for a in 0..3 {
                taps[a] = try_with_capacity(out_dhw[a], "Resize tap table")?;
                taps[a].extend((0..out_dhw[a]).map(|o| {
                    linear_taps(
                        source_coord(o, scales[a], ins[a], out_dhw[a], coord),
                        ins[a],
                    )
                }));
                identity[a] = out_dhw[a] == ins[a]
                    && taps[a]
                        .iter()
                        .enumerate()
                        .all(|(o, t)| t.i0 == o && t.w1 == 0.0);
            }
            // Intermediate planes: [D, H, oW] after W, [D, oH, oW] after H (per thread).
            let len1 = if identity[2] {
                0
            } else {
                product(&[d, h, ow], "Resize intermediate")?
            };
            let len2 = if identity[1] {
                0
            } else {
                product(&[d, oh, ow], "Resize intermediate")?
            };
            let groups = threads.clamp(1, (out_len / out_plane).max(1));
            let mut scratch = Vec::new();
            for _ in 0..groups {
                scratch.push((
                    try_filled(len1, 0.0, "Resize intermediate")?,
                    try_filled(len2, 0.0, "Resize intermediate")?,
                ));
            }
            let scratch: Vec<std::sync::Mutex<(Vec<f32>, Vec<f32>)>> =
                scratch.into_iter().map(std::sync::Mutex::new).collect();
            let (taps, scratch) = (&taps, &scratch);
            let planes = out_len / out_plane;
            let per = planes.div_ceil(groups);
            crate::par::par_blocks(out, out_plane, groups, |first, part| {
                // Each part is one group's run of planes: its own scratch, never contended.
                let mut guard = scratch[first / per.max(1)]
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                let (buf1, buf2) = &mut *guard;
                for (k, dst) in part.chunks_exact_mut(out_plane).enumerate() {
                    let src = &x[(first + k) * in_plane..][..in_plane];
                    let s1: &[f32] = if identity[2] {
                        src
                    } else {
                        lerp_inner(src, buf1, w, &taps[2]);
                        buf1
                    };
                    let s2: &[f32] = if identity[1] {
                        s1
                    } else {
                        lerp_outer(s1, buf2, h, ow, &taps[1]);
                        buf2
                    };
                    if identity[0] {
                        dst.copy_from_slice(s2);
                    } else {
                        lerp_outer(s2, dst, d, oh * ow, &taps[0]);
                    }
                }
            });
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Pad

/// ONNX Pad `mode` (the value of `Constant` fills the border).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PadMode {
    Constant(f32),
    /// Repeats the edge value (PyTorch `replicate`).
    Edge,
    /// Mirrors without repeating the edge (PyTorch `reflect`); every pad must be smaller than
    /// its dimension.
    Reflect,
}

/// The input index that output index `o` copies along an axis, `None` for a constant border.
fn pad_source(o: usize, pb: usize, dim: usize, mode: PadMode) -> Option<usize> {
    if o < pb {
        match mode {
            PadMode::Constant(_) => None,
            PadMode::Edge => Some(0),
            PadMode::Reflect => Some(pb - o),
        }
    } else if o - pb < dim {
        Some(o - pb)
    } else {
        let beyond = o - pb - dim;
        match mode {
            PadMode::Constant(_) => None,
            PadMode::Edge => Some(dim - 1),
            PadMode::Reflect => Some(dim - 2 - beyond),
        }
    }
}

/// ONNX Pad on the spatial axes D, H and W of `[N, C, D, H, W]`: `pads_begin[a]` values before
/// and `pads_end[a]` after axis `a`. Returns the padded tensor and its shape. `Reflect` requires
/// every pad to be smaller than its dimension (as ONNX and PyTorch do).
pub fn pad3d(
    x: &[f32],
    shape: [usize; 5],
    pads_begin: [usize; 3],
    pads_end: [usize; 3],
    mode: PadMode,
) -> Result<(Vec<f32>, [usize; 5]), KernelError> {
    let in_plane = check_shape5(shape, x.len())?;
    let mut out_shape = shape;
    for a in 0..3 {
        let dim = shape[2 + a];
        if mode == PadMode::Reflect && (pads_begin[a] >= dim || pads_end[a] >= dim) {
            return Err(KernelError::Unsupported {
                what: format!(
                    "reflect padding ({}, {}) along {}",
                    pads_begin[a], pads_end[a], AXES[a]
                ),
                reason: format!("each pad must be smaller than the dimension {dim}"),
            });
        }
        out_shape[2 + a] = dim
            .checked_add(pads_begin[a])
            .and_then(|v| v.checked_add(pads_end[a]))
            .ok_or(KernelError::Overflow {
                what: "padded shape",
            })?;
    }
    let out_plane = product(&out_shape[2..], "padded output")?;
    let out_len = product(&[shape[0], shape[1], out_plane], "padded output")?;
    let fill = match mode {
        PadMode::Constant(v) => v,
        _ => 0.0,
    };
    let mut out = try_filled(out_len, fill, "padded output")?;
    let [_, _, d, h, w] = shape;
    let [_, _, _, oh, ow] = out_shape;
    let pbw = pads_begin[2];
    for (src, dst) in x
        .chunks_exact(in_plane)
        .zip(out.chunks_exact_mut(out_plane))
    {
        for (z, dplane) in dst.chunks_exact_mut(oh * ow).enumerate() {
            let Some(sz) = pad_source(z, pads_begin[0], d, mode) else {
                continue;
            };
            for (y, drow) in dplane.chunks_exact_mut(ow).enumerate() {
                let Some(sy) = pad_source(y, pads_begin[1], h, mode) else {
                    continue;
                };
                let srow = &src[(sz * h + sy) * w..][..w];
                drow[pbw..pbw + w].copy_from_slice(srow);
                if !matches!(mode, PadMode::Constant(_)) {
                    for (i, v) in drow[..pbw].iter_mut().enumerate() {
                        // Some: Edge and Reflect map every index.
                        *v = pad_source(i, pbw, w, mode).map_or(fill, |s| srow[s]);
                    }
                    for (j, v) in drow[pbw + w..].iter_mut().enumerate() {
                        *v = pad_source(pbw + w + j, pbw, w, mode).map_or(fill, |s| srow[s]);
                    }
                }
            }
        }
    }
    Ok((out, out_shape))
}

// ---------------------------------------------------------------------------------------------
// Pooling

/// Pooling geometry with ONNX semantics, per spatial axis `[d, h, w]`: kernel, strides, pads
/// before and after, dilations (max pooling only; average pooling requires 1) and `ceil_mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pool3d {
    pub kernel: [usize; 3],
    pub stride: [usize; 3],
    pub pads_begin: [usize; 3],
    pub pads_end: [usize; 3],
    pub dilation: [usize; 3],
    pub ceil_mode: bool,
}

/// Output shape of pooling `input` (`[N, C, D, H, W]`) with `p`: per axis
/// `o = floor_or_ceil((x + pb + pe − dil·(k − 1) − 1) / s) + 1`, and with `ceil_mode` the last
/// window must start inside the input or the left padding (else it is dropped), as ONNX and
/// PyTorch do.
pub fn pool3d_shape(input: [usize; 5], p: &Pool3d) -> Result<[usize; 5], KernelError> {
    check_nonzero("input", &input, &DIMS5)?;
    let mut out = input;
    for a in 0..3 {
        let axis = AXES[a];
        let (x, k, s, dil) = (input[2 + a], p.kernel[a], p.stride[a], p.dilation[a]);
        if s == 0 {
            return Err(KernelError::ZeroStride { axis });
        }
        if dil == 0 {
            return Err(KernelError::ZeroDilation { axis });
        }
        if k == 0 {
            return Err(KernelError::EmptyDimension {
                tensor: "kernel",
                dim: axis,
            });
        }
        let overflow = || KernelError::Overflow {
            what: "padded input or dilated kernel extent",
        };
        let left = x.checked_add(p.pads_begin[a]).ok_or_else(overflow)?;
        let padded = left.checked_add(p.pads_end[a]).ok_or_else(overflow)?;
        let effective = (k - 1)
            .checked_mul(dil)
            .and_then(|e| e.checked_add(1))
            .ok_or_else(overflow)?;
        if effective > padded {
            return Err(KernelError::KernelTooLarge {
                axis,
                effective,
                padded,
            });
        }
        let span = padded - effective;
        let mut o = if p.ceil_mode {
            span.div_ceil(s)
        } else {
            span / s
        } + 1;
        if p.ceil_mode && (o - 1).checked_mul(s).is_none_or(|start| start >= left) {
            o -= 1;
        }
        out[2 + a] = o;
    }
    Ok(out)
}

/// One pooling window along one axis: the input index of its first tap inside the input, how
/// many of its taps fall inside the input (`taps`, spaced by the dilation), and how many lie
/// inside the padded input (`clipped`, the count_include_pad divisor).
#[derive(Clone, Copy, Debug)]
struct Window {
    first: usize,
    taps: usize,
    clipped: usize,
}

/// The windows along axis `a` of an output of `o_len`, validated by [`pool3d_shape`].
fn axis_windows(
    x: usize,
    a: usize,
    o_len: usize,
    p: &Pool3d,
    need_taps: Option<&str>,
) -> Result<Vec<Window>, KernelError> {
    let (k, s, pb, dil) = (p.kernel[a], p.stride[a], p.pads_begin[a], p.dilation[a]);
    // pool3d_shape checked that x + pb + pe fits and that every window starts inside it.
    let left = x + pb;
    let padded = left + p.pads_end[a];
    let mut v = try_with_capacity(o_len, "pooling window table")?;
    for o in 0..o_len {
        let start = o * s; // in padded coordinates, start < padded
                           // Taps at start + j·dil for j < k; inside the input when pb <= tap < pb + x.
        let j_lo = if start >= pb {
            0
        } else {
            (pb - start).div_ceil(dil)
        };
        let j_hi = left.saturating_sub(start).div_ceil(dil).min(k);
        let taps = j_hi.saturating_sub(j_lo);
        let first = if taps > 0 { start + j_lo * dil - pb } else { 0 };
        let clipped = start.saturating_add(k).min(padded) - start;
        if taps == 0 {
            if let Some(op) = need_taps {
                return Err(KernelError::Unsupported {
                    what: format!("{op} window {o} along {}", AXES[a]),
                    reason: "the window lies entirely in the padding".into(),
                });
            }
        }
        v.push(Window {
            first,
            taps,
            clipped,
        });
    }
    Ok(v)
}

/// Validates a pooling call; returns the output shape, the zeroed output and the windows.
#[allow(clippy::type_complexity)]
fn pool_setup(
    x: &[f32],
    shape: [usize; 5],
    p: &Pool3d,
    need_taps: Option<&str>,
) -> Result<([usize; 5], Vec<f32>, [Vec<Window>; 3]), KernelError> {
    check_shape5(shape, x.len())?;
    let out_shape = pool3d_shape(shape, p)?;
    let out_len = product(&out_shape, "pooling output")?;
    let out = try_filled(out_len, 0.0, "pooling output")?;
    let mut win: [Vec<Window>; 3] = Default::default();
    for a in 0..3 {
        win[a] = axis_windows(shape[2 + a], a, out_shape[2 + a], p, need_taps)?;
    }
    Ok((out_shape, out, win))
}

/// Max pooling of `[N, C, D, H, W]` with padding, dilation and ceil mode (ONNX MaxPool,
/// PyTorch `max_pool3d`). Padding never wins (it is −inf); a NaN in a window makes its output
/// NaN. A window that lies entirely in the padding is [`KernelError::Unsupported`] (PyTorch
/// forbids such geometry; onnxruntime would answer `f32::MIN`).
pub fn maxpool3d_padded(x: &[f32], shape: [usize; 5], p: &Pool3d) -> Result<Vec<f32>, KernelError> {
    maxpool3d_padded_threads(x, shape, p, 1)
}

/// [`maxpool3d_padded`] on up to `threads` threads, split by whole `(n, c)` planes: the same
/// bits on any thread count. Each output row is pooled at once: where the windows along
/// the width are all whole (no padding reached), every tap is one strided pass over the
/// row, which the compiler vectorises.
pub fn maxpool3d_padded_threads(
    x: &[f32],
    shape: [usize; 5],
    p: &Pool3d,
    threads: usize,
) -> Result<Vec<f32>, KernelError> {
    let (out_shape, mut out, [wz, wy, wx]) = pool_setup(x, shape, p, Some("MaxPool"))?;
    let [_, _, d, h, w] = shape;
    let [dz, dy, dx] = p.dilation;
    let (kx, sx) = (p.kernel[2], p.stride[2]);
    let ow = out_shape[4];
    let out_plane = out_shape[2] * out_shape[3] * ow;
    let in_plane = d * h * w;
    // NaN propagates, as in PyTorch: the value taken when it is larger or NaN, the taps of
    // a window in (z, y, x) order.
    let step = |m: f32, v: f32| if v > m || v.is_nan() { v } else { m };
    // Whole windows along the width: window i starts at x0 + i·sx and has every tap.
    let x0 = wx.first().map_or(0, |w| w.first);
    let uniform = wx
        .iter()
        .enumerate()
        .all(|(i, win)| win.taps == kx && win.first == x0 + i * sx);
    let planes = |src: &[f32], dst: &mut [f32]| {
        for (src, dst) in src
            .chunks_exact(in_plane)
            .zip(dst.chunks_exact_mut(out_plane))
        {
            let mut rows = dst.chunks_exact_mut(ow.max(1));
            for z in &wz {
                for y in &wy {
                    let Some(acc) = rows.next() else { return };
                    acc.fill(f32::NEG_INFINITY);
                    for jz in 0..z.taps {
                        let iz = z.first + jz * dz;
                        for jy in 0..y.taps {
                            let iy = y.first + jy * dy;
                            let row = &src[(iz * h + iy) * w..][..w];
                            if uniform {
                                for jx in 0..kx {
                                    let from = &row[x0 + jx * dx..];
                                    if sx == 1 {
                                        for (a, &v) in acc.iter_mut().zip(from) {
                                            *a = step(*a, v);
                                        }
                                    } else {
                                        for (a, &v) in acc.iter_mut().zip(from.iter().step_by(sx)) {
                                            *a = step(*a, v);
                                        }
                                    }
                                }
                            } else {
                                for (a, xw) in acc.iter_mut().zip(&wx) {
                                    for &v in row[xw.first..].iter().step_by(dx).take(xw.taps) {
                                        *a = step(*a, v);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    // At least ~1 MiB of input per extra thread; whole (n, c) planes each.
    let threads = threads.min((x.len() / (1 << 18)).max(1));
    if out_plane > 0 {
        crate::par::par_blocks(&mut out, out_plane, threads, |first, dst| {
            planes(&x[first * in_plane..], dst);
        });
    }
    Ok(out)
}

/// Average pooling of `[N, C, D, H, W]` (ONNX AveragePool, PyTorch `avg_pool3d`); dilation must
/// be 1. Sums in f64. With `count_include_pad` the divisor is the window clipped to the padded
/// input (so a ceil-mode window hanging past the end pad counts only its part inside, as PyTorch
/// does); without it, the number of input values in the window, and a window entirely in the
/// padding is [`KernelError::Unsupported`].
pub fn avgpool3d(
    x: &[f32],
    shape: [usize; 5],
    p: &Pool3d,
    count_include_pad: bool,
) -> Result<Vec<f32>, KernelError> {
    if let Some(a) = (0..3).find(|&a| p.dilation[a] != 1) {
        return Err(KernelError::Unsupported {
            what: format!("AveragePool dilation {} along {}", p.dilation[a], AXES[a]),
            reason: "average pooling supports dilation 1 only".into(),
        });
    }
    let need = if count_include_pad {
        None
    } else {
        Some("AveragePool")
    };
    let (out_shape, mut out, [wz, wy, wx]) = pool_setup(x, shape, p, need)?;
    let [_, _, d, h, w] = shape;
    let out_plane = out_shape[2] * out_shape[3] * out_shape[4];
    for (src, dst) in x
        .chunks_exact(d * h * w)
        .zip(out.chunks_exact_mut(out_plane))
    {
        let mut o = dst.iter_mut();
        for z in &wz {
            for y in &wy {
                for xw in &wx {
                    let mut sum = 0f64;
                    for iz in z.first..z.first + z.taps {
                        for iy in y.first..y.first + y.taps {
                            let row = &src[(iz * h + iy) * w..][..w];
                            sum += row[xw.first..xw.first + xw.taps]
                                .iter()
                                .map(|&v| f64::from(v))
                                .sum::<f64>();
                        }
                    }
                    let count = if count_include_pad {
                        z.clipped as f64 * y.clipped as f64 * xw.clipped as f64
                    } else {
                        z.taps as f64 * y.taps as f64 * xw.taps as f64
                    };
                    if let Some(slot) = o.next() {
                        *slot = (sum / count) as f32;
                    }
                }
            }
        }
    }
    Ok(out)
}

/// GlobalAveragePool: the mean of every `(n, c)` over its `spatial` values (f64 accumulation);
/// `[N, C, spatial]` → `[N, C]`.
pub fn global_avgpool(
    x: &[f32],
    n: usize,
    c: usize,
    spatial: usize,
) -> Result<Vec<f32>, KernelError> {
    check_ncs(x.len(), n, c, spatial)?;
    let mut out = try_with_capacity(n * c, "GlobalAveragePool output")?;
    out.extend(
        x.chunks_exact(spatial)
            .map(|chan| (sum_f64(chan) / spatial as f64) as f32),
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rounding_and_clamping() {
        use NearestMode::*;
        assert_eq!(nearest_index(2.5, RoundPreferFloor, 10), 2);
        assert_eq!(nearest_index(2.5, RoundPreferCeil, 10), 3);
        assert_eq!(nearest_index(2.4, RoundPreferCeil, 10), 2);
        assert_eq!(nearest_index(2.6, RoundPreferFloor, 10), 3);
        assert_eq!(nearest_index(-0.5, RoundPreferCeil, 10), 0);
        assert_eq!(nearest_index(f32::INFINITY, Floor, 10), 9);
        assert_eq!(nearest_index(f32::NAN, Ceil, 10), 0);
        assert_eq!(nearest_index(9.2, Ceil, 10), 9);
    }

    #[test]
    fn pad_source_maps_borders() {
        // dim 4, pad 2 each side: reflect 2 1 | 0 1 2 3 | 2 1, edge 0 0 | .. | 3 3
        let r: Vec<_> = (0..8)
            .map(|o| pad_source(o, 2, 4, PadMode::Reflect).unwrap())
            .collect();
        assert_eq!(r, [2, 1, 0, 1, 2, 3, 2, 1]);
        let e: Vec<_> = (0..8)
            .map(|o| pad_source(o, 2, 4, PadMode::Edge).unwrap())
            .collect();
        assert_eq!(e, [0, 0, 0, 1, 2, 3, 3, 3]);
        assert_eq!(pad_source(1, 2, 4, PadMode::Constant(0.0)), None);
    }
}
