//! The sub-pixel (phase) form of a strided ConvTranspose3d, dilation 1.
//!
//! Along an axis with stride `s`, output `o = i·s − pad_begin + t` splits by its residue
//! `r = o mod s` into `s` phases. In phase `r` only the taps `t ≡ r + pad_begin (mod s)`
//! reach the output, `t0, t0 + s, …` (`T` of them, `T ≤ ⌈k / s⌉`), and output `q`-th of the
//! phase (`o = r + q·s`) reads input `i = c + q − j` for tap `t0 + j·s`, `c = ⌊(r + pad_begin) / s⌋`.
//! That is an ordinary stride-1 convolution (cross-correlation) of the input with the
//! reversed sub-filter `g[u] = w[t0 + (T − 1 − u)·s]`, read from input `q + c − (T − 1)`. It
//! runs through [`Conv3dPlan`] (any of its strategies, bias and activation fused) with a
//! symmetric zero padding wide enough for both ends; the outputs the phase needs are a
//! window of the convolution's output, copied (interleaved) into every `s`-th output voxel.
//!
//! Compared with the pointwise GEMM + col2im scatter: the same multiplies (every tap of
//! every output exactly once), no `C_out·k³`-row intermediate and no scatter-add; the
//! convolutions thread and are bit-identical at any thread count, the copy is a copy. A
//! phase with no tap along some axis (stride > kernel) is `activation(bias)`.

use std::sync::atomic::AtomicBool;

use crate::transpose::ConvTranspose3dShape;
use crate::{Activation, Conv3dParams, Conv3dPlan, Conv3dShape, KernelError, PackedFilters};

/// One axis of one phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PhaseAxis {
    /// The output residue: this phase's outputs along the axis are `first + q·stride`.
    pub first: usize,
    /// How many (`q` in `0..count`).
    pub count: usize,
    /// The first tap reaching them, and how many (`tap0 + j·stride`, `j < taps`).
    pub tap0: usize,
    pub taps: usize,
    /// The phase convolution's symmetric zero padding, and the first of its outputs kept.
    pub pad: usize,
    pub skip: usize,
}

/// The geometry of phase `r` along one axis (input extent `x`, kernel `k`, stride `s`,
/// leading padding `pad_begin`, output extent `o`); `None` when no output has residue `r`.
pub(crate) fn phase_axis(
    x: usize,
    k: usize,
    s: usize,
    pad_begin: usize,
    o: usize,
    r: usize,
) -> Option<PhaseAxis> {
    if r >= o || s == 0 {
        return None;
    }
    let count = (o - r).div_ceil(s);
    let tap0 = (r + pad_begin) % s;
    let taps = if tap0 < k { (k - 1 - tap0) / s + 1 } else { 0 };
    if taps == 0 {
        return Some(PhaseAxis {
            first: r,
            count,
            tap0,
            taps,
            pad: 0,
            skip: 0,
        });
    }
    // All small: a validated shape's extents fit an isize (checked when it was built).
    let c = ((r + pad_begin) / s) as isize;
    let off = c - (taps as isize - 1);
    let pad = 0isize
        .max(-off)
        .max(count as isize - 1 + off + taps as isize - x as isize);
    Some(PhaseAxis {
        first: r,
        count,
        tap0,
        taps,
        pad: pad as usize,
        skip: (off + pad) as usize,
    })
}

/// One phase: its three axes and, when every axis has taps, its convolution.
#[derive(Clone, Debug)]
pub(crate) struct Phase {
    pub axes: [PhaseAxis; 3],
    pub conv: Option<(Conv3dPlan, PackedFilters)>,
}

/// Every phase of a transposed convolution.
#[derive(Clone, Debug)]
pub(crate) struct SubPixel {
    pub phases: Vec<Phase>,
    /// A copy of the phase convolution with the most taps (for its strategy and tiling).
    main: Conv3dPlan,
}

/// Below this many output values per extra thread, the interleaving copy stays on one thread.
const COPY_MIN_PER_THREAD: usize = 1 << 18;

impl SubPixel {
    /// Plans every phase of `shape` (dilation 1) with `filters` (`[C_in, C_out, kD, kH, kW]`).
    pub fn new(
        shape: &ConvTranspose3dShape,
        filters: &[f32],
        activation: Activation,
    ) -> Result<Self, KernelError> {
        let p = &shape.params;
        let [c_in, c_out, kd, kh, kw] = shape.filters;
        let k = shape.kernel_dims();
        let x = shape.in_dims();
        let o = shape.out_dims();
        let mut per_axis: [Vec<PhaseAxis>; 3] = Default::default();
        for a in 0..3 {
            per_axis[a] = (0..p.stride[a])
                .filter_map(|r| phase_axis(x[a], k[a], p.stride[a], p.pads_begin[a], o[a], r))
                .collect();
        }
        let mut phases = Vec::new();
        for &ad in &per_axis[0] {
            for &ah in &per_axis[1] {
                for &aw in &per_axis[2] {
                    let axes = [ad, ah, aw];
                    let conv = if axes.iter().all(|a| a.taps > 0) {
                        let t = [ad.taps, ah.taps, aw.taps];
                        let conv_shape = Conv3dShape::new(
                            shape.input,
                            [c_out, c_in, t[0], t[1], t[2]],
                            Conv3dParams {
                                stride: [1; 3],
                                padding: [ad.pad, ah.pad, aw.pad],
                                dilation: [1; 3],
                            },
                        )?;
                        // g[co][ci][u] = W[ci][co][tap0 + (T − 1 − u)·s] per axis.
                        let taps = t[0] * t[1] * t[2];
                        let mut g = vec![0f32; c_out * c_in * taps];
                        for co in 0..c_out {
                            for ci in 0..c_in {
                                let src =
                                    &filters[(ci * c_out + co) * kd * kh * kw..][..kd * kh * kw];
                                let dst = &mut g[(co * c_in + ci) * taps..][..taps];
                                for ud in 0..t[0] {
                                    let a = ad.tap0 + (t[0] - 1 - ud) * p.stride[0];
                                    for uh in 0..t[1] {
                                        let b = ah.tap0 + (t[1] - 1 - uh) * p.stride[1];
                                        for uw in 0..t[2] {
                                            let c = aw.tap0 + (t[2] - 1 - uw) * p.stride[2];
                                            dst[(ud * t[1] + uh) * t[2] + uw] =
                                                src[(a * kh + b) * kw + c];
                                        }
                                    }
                                }
                            }
                        }
                        let conv = Conv3dPlan::new(conv_shape, activation.clone());
                        let packed = conv.pack_filters(&g)?;
                        Some((conv, packed))
                    } else {
                        None
                    };
                    phases.push(Phase { axes, conv });
                }
            }
        }
        let main = phases
            .iter()
            .filter_map(|p| p.conv.as_ref().map(|(c, _)| c))
            .max_by_key(|c| c.shape().filters_len())
            .cloned()
            .ok_or_else(|| KernelError::Unsupported {
                what: "transposed convolution strategy transpose-subpixel".into(),
                reason: "no output voxel is reached by a tap".into(),
            })?;
        Ok(Self { phases, main })
    }

    /// The largest phase output (the scratch buffer of a run), in values.
    pub fn scratch_len(&self) -> usize {
        self.phases
            .iter()
            .filter_map(|p| p.conv.as_ref().map(|(c, _)| c.shape().output_len()))
            .max()
            .unwrap_or(0)
    }

    /// Bytes of every phase's packed filters.
    pub fn packed_bytes(&self) -> usize {
        self.phases
            .iter()
            .filter_map(|p| p.conv.as_ref().map(|(_, f)| f.bytes()))
            .sum()
    }

    /// The phase convolutions, mutably (tests and tuning set their threads and tiling).
    pub fn convs_mut(&mut self) -> impl Iterator<Item = &mut Conv3dPlan> {
        self.phases
            .iter_mut()
            .filter_map(|p| p.conv.as_mut().map(|(c, _)| c))
            .chain(std::iter::once(&mut self.main))
    }

    /// The phase convolution with the most taps (planning guarantees one: `new` fails
    /// where no phase has taps).
    pub fn first_conv(&self) -> &Conv3dPlan {
        &self.main
    }

    /// Runs every phase into `output` (fully overwritten).
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        shape: &ConvTranspose3dShape,
        input: &[f32],
        output: &mut [f32],
        bias: Option<&[f32]>,
        bias_values: &[f32],
        activation: &Activation,
        threads: usize,
        cancel: Option<&AtomicBool>,
    ) -> Result<(), KernelError> {
        let mut scratch = vec![0f32; self.scratch_len()];
        let constant: Vec<f32> = bias_values
            .iter()
            .enumerate()
            .map(|(co, &b)| activation.channel(co).apply(b))
            .collect();
        for ph in &self.phases {
            match &ph.conv {
                Some((conv, packed)) => {
                    let len = conv.shape().output_len();
                    let buf = &mut scratch[..len];
                    conv.run_into(input, packed, bias, buf, threads, cancel)?;
                    let m = conv.shape().out_dims();
                    interleave(shape, &ph.axes, output, threads, Src::Conv { buf, m });
                }
                None => interleave(shape, &ph.axes, output, threads, Src::Const(&constant)),
            }
        }
        Ok(())
    }
}

/// What a phase writes: a window of its convolution's output (`[N, C_out, mD, mH, mW]`), or
/// one value per channel.
enum Src<'a> {
    Conv { buf: &'a [f32], m: [usize; 3] },
    Const(&'a [f32]),
}

/// Writes one phase into every `stride`-th voxel of `output`. Split over threads by whole
/// (item, channel) pairs where the phase is large (a copy: the same bits on any thread
/// count).
fn interleave(
    shape: &ConvTranspose3dShape,
    axes: &[PhaseAxis; 3],
    output: &mut [f32],
    threads: usize,
    src: Src<'_>,
) {
    let [n_b, c_out, od, oh, ow] = shape.output;
    let [sd, sh, sw] = shape.params.stride;
    let vox = od * oh * ow;
    let chans = n_b * c_out;
    let work = |first: usize, out: &mut [f32]| {
        for (j, out_c) in out.chunks_mut(vox).enumerate() {
            let nc = first + j;
            for qd in 0..axes[0].count {
                let z = axes[0].first + qd * sd;
                for qh in 0..axes[1].count {
                    let y = axes[1].first + qh * sh;
                    let dst = out_c[(z * oh + y) * ow + axes[2].first..(z * oh + y + 1) * ow]
                        .iter_mut()
                        .step_by(sw)
                        .take(axes[2].count);
                    match &src {
                        Src::Conv { buf, m } => {
                            let plane = nc * m[0] + axes[0].skip + qd;
                            let row = plane * m[1] + axes[1].skip + qh;
                            let from = &buf[row * m[2] + axes[2].skip..][..axes[2].count];
                            dst.zip(from).for_each(|(d, &v)| *d = v);
                        }
                        Src::Const(values) => {
                            let v = values[nc % c_out];
                            dst.for_each(|d| *d = v);
                        }
                    }
                }
            }
        }
    };
    let phase_vals = axes.iter().map(|a| a.count).product::<usize>() * chans;
    let groups = threads.min(phase_vals / COPY_MIN_PER_THREAD).max(1);
    crate::par::par_blocks(output, vox, groups, work);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every output of an axis lies in exactly one phase, and each phase's window reads
    /// exactly the inputs the definition pairs with its taps.
    #[test]
    fn phases_cover_the_axis_and_read_the_right_inputs() {
        for (x, k, s, pb, pe, op) in [
            (6usize, 3usize, 2usize, 1usize, 1usize, 1usize),
            (5, 2, 2, 0, 0, 0),
            (7, 4, 3, 2, 1, 2),
            (4, 1, 3, 0, 0, 2),
            (3, 5, 2, 4, 3, 1),
            (9, 3, 1, 1, 1, 0),
        ] {
            let o = (x - 1) * s + k + op - pb - pe;
            let mut seen = vec![0; o];
            for r in 0..s {
                let Some(a) = phase_axis(x, k, s, pb, o, r) else {
                    continue;
                };
                let m = x + 2 * a.pad + 1 - a.taps.max(1);
                if a.taps > 0 {
                    assert!(
                        a.skip + a.count <= m,
                        "{x} {k} {s} {pb}: window past the end"
                    );
                }
                for q in 0..a.count {
                    let out = r + q * s;
                    seen[out] += 1;
                    // The definition: inputs i with i·s − pb + t = out.
                    let mut want: Vec<(usize, usize)> = (0..k)
                        .filter_map(|t| {
                            let v = out as isize + pb as isize - t as isize;
                            (v >= 0 && v % s as isize == 0 && ((v / s as isize) as usize) < x)
                                .then(|| (t, (v / s as isize) as usize))
                        })
                        .collect();
                    // The phase: conv output q + skip reads padded input (q + skip + u) − pad.
                    let mut got: Vec<(usize, usize)> = (0..a.taps)
                        .filter_map(|u| {
                            let i = (q + a.skip + u) as isize - a.pad as isize;
                            let t = a.tap0 + (a.taps - 1 - u) * s;
                            (i >= 0 && (i as usize) < x).then_some((t, i as usize))
                        })
                        .collect();
                    want.sort_unstable();
                    got.sort_unstable();
                    assert_eq!(got, want, "x {x} k {k} s {s} pb {pb}: output {out}");
                }
            }
            assert!(seen.iter().all(|&c| c == 1), "{x} {k} {s}: {seen:?}");
        }
    }
}
