//! Dilated convolutions computed as undilated ones (`Strategy::Sublattice`).
//!
//! With stride 1 and, on every dilated axis, padding `p` and input size multiples of the
//! dilation `d`, an output voxel `o = d·q + r` reads input voxels `o + d·t − p = d·(q + t −
//! p/d) + r` only: the inputs of its residue class `r`, through the *undilated* filter with
//! padding `p/d`. So the input splits into `d_z·d_y·d_x` sub-lattices (a batch of smaller
//! volumes), one undilated plan computes them all — Winograd where it applies, 3.4× fewer
//! multiplies than the direct kernel the dilated shape would take — and the results
//! interleave back into the output. Each output is the same sum as the undilated plan's, so
//! results stay bit-identical across thread counts.
//!
//! Memory: the sub-lattice input and output (the size of the input and of the output) for
//! the run, plus the undilated plan's workspace; a streaming run also holds the whole output
//! before handing out its slabs.

use std::ops::{ControlFlow, Range};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::buffer::{scratch_give, scratch_take_stale};
use crate::{par, Conv3dParams, Conv3dShape, KernelError};

use super::{Conv3dPlan, Filters};

/// The undilated problem of `shape`'s sub-lattices (`None` where the split does not apply):
/// batch `N·D` (item `n·D + class`, class `(r_z·d_y + r_y)·d_x + r_x`), every axis divided
/// by its dilation, padding `p/d`, dilation 1.
pub(super) fn inner_shape(shape: &Conv3dShape) -> Option<Conv3dShape> {
    let p = shape.params;
    if p.stride != [1; 3] || p.dilation == [1; 3] {
        return None;
    }
    let [n, c_in, d, h, w] = shape.input;
    let dims = [d, h, w];
    if (0..3).any(|a| {
        !dims[a].is_multiple_of(p.dilation[a]) || !p.padding[a].is_multiple_of(p.dilation[a])
    }) {
        return None;
    }
    let classes = p.dilation.iter().product::<usize>();
    let inner = Conv3dShape::new(
        [
            n.checked_mul(classes)?,
            c_in,
            d / p.dilation[0],
            h / p.dilation[1],
            w / p.dilation[2],
        ],
        shape.filters,
        Conv3dParams {
            stride: [1; 3],
            padding: std::array::from_fn(|a| p.padding[a] / p.dilation[a]),
            dilation: [1; 3],
        },
    )
    .ok()?;
    // Each class's outputs interleave into exactly the dilated output.
    let (outer, sub) = (shape.out_dims(), inner.out_dims());
    (0..3)
        .all(|a| sub[a] * p.dilation[a] == outer[a])
        .then_some(inner)
}

/// Why [`inner_shape`] is `None` for `shape`.
pub(super) fn unsupported_reason(shape: &Conv3dShape) -> String {
    let p = shape.params;
    format!(
        "needs stride 1, a dilation above 1, and on each dilated axis padding and input size \
         multiples of the dilation (this shape: input {:?}, stride {:?}, padding {:?}, \
         dilation {:?})",
        &shape.input[2..],
        p.stride,
        p.padding,
        p.dilation
    )
}

/// Receives a finished slab: batch item, depth planes, data (as `run::Slab`).
pub(super) type SlabSink<'a> = dyn FnMut(usize, Range<usize>, &[f32]) -> ControlFlow<()> + 'a;

impl Conv3dPlan {
    /// The undilated plan's filters: raw ones as they are, packed ones as packed for it.
    fn inner_filters<'a>(&self, filters: Filters<'a>) -> Result<Filters<'a>, KernelError> {
        match filters {
            Filters::Raw(f) => Ok(Filters::Raw(f)),
            Filters::Packed(p) => p.inner().map(Filters::Packed).ok_or(KernelError::Invalid {
                what: "packed filters".into(),
                reason: "packed without the undilated plan's filters".into(),
            }),
        }
    }

    /// The sub-lattice input: `input` regrouped into the undilated plan's batch.
    fn gather_sublattices(&self, inner: &Conv3dShape, input: &[f32], threads: usize) -> Vec<f32> {
        let [_, c, d, h, w] = self.shape.input;
        let [dz, dy, dx] = self.shape.params.dilation;
        let [_, _, sd, sh, sw] = inner.input;
        let sub_vox = sd * sh * sw;
        let mut out = scratch_take_stale(inner.input_len());
        // One unit = the `dx` classes (r_z, r_y, 0..dx) of one item, all channels: adjacent
        // in the undilated batch, and filled from the same input rows.
        par::par_blocks(&mut out, dx * c * sub_vox, threads, |first, part| {
            for (i, unit) in part.chunks_mut(dx * c * sub_vox).enumerate() {
                let u = first + i;
                let (item, zy) = (u / (dz * dy), u % (dz * dy));
                let (rz, ry) = (zy / dy, zy % dy);
                for ch in 0..c {
                    let src = &input[(item * c + ch) * d * h * w..][..d * h * w];
                    for z in 0..sd {
                        for y in 0..sh {
                            let row = &src[((z * dz + rz) * h + y * dy + ry) * w..][..w];
                            let at = |rx: usize| (rx * c + ch) * sub_vox + (z * sh + y) * sw;
                            if dx == 2 {
                                // Splitting a row into its even and odd voxels: vectorized.
                                let (lo, hi) = unit.split_at_mut(at(1));
                                let (even, odd) = (&mut lo[at(0)..][..sw], &mut hi[..sw]);
                                for ((e, o), pair) in
                                    even.iter_mut().zip(odd.iter_mut()).zip(row.chunks_exact(2))
                                {
                                    *e = pair[0];
                                    *o = pair[1];
                                }
                            } else {
                                for rx in 0..dx {
                                    let dst = &mut unit[at(rx)..][..sw];
                                    for (v, &x) in dst.iter_mut().zip(row[rx..].iter().step_by(dx))
                                    {
                                        *v = x;
                                    }
                                }
                            }
                        }
                    }
                }
            }
        });
        out
    }

    /// Interleaves the undilated plan's output `sub` into `output` (`[N, C_out, oD, oH, oW]`).
    fn scatter_sublattices(
        &self,
        inner: &Conv3dShape,
        sub: &[f32],
        output: &mut [f32],
        threads: usize,
    ) {
        let c_out = self.shape.c_out();
        let [od, oh, ow] = self.shape.out_dims();
        let [dz, dy, dx] = self.shape.params.dilation;
        let [sd, sh, sw] = inner.out_dims();
        let classes = dz * dy * dx;
        let sub_vox = sd * sh * sw;
        // One block = one (item, channel) output volume.
        par::par_blocks(output, od * oh * ow, threads, |first, part| {
            for (i, vol) in part.chunks_mut(od * oh * ow).enumerate() {
                let b = first + i;
                let (item, co) = (b / c_out, b % c_out);
                for z in 0..od {
                    for y in 0..oh {
                        let (rz, ry) = (z % dz, y % dy);
                        let row = &mut vol[(z * oh + y) * ow..][..ow];
                        let src = |rx: usize| {
                            let class = (rz * dy + ry) * dx + rx;
                            &sub[((item * classes + class) * c_out + co) * sub_vox
                                + ((z / dz) * sh + y / dy) * sw..][..sw]
                        };
                        if dx == 2 {
                            // Interleaving two rows: vectorized as unpacks.
                            let (a, b) = (src(0), src(1));
                            for (o, (&x0, &x1)) in row.chunks_exact_mut(2).zip(a.iter().zip(b)) {
                                o[0] = x0;
                                o[1] = x1;
                            }
                        } else {
                            for rx in 0..dx {
                                for (x, v) in src(rx).iter().enumerate() {
                                    row[x * dx + rx] = *v;
                                }
                            }
                        }
                    }
                }
            }
        });
    }

    /// `run_into` (and `run_into_with_stats` when `stats`) by the sub-lattice split, `inner`
    /// being the plan's undilated plan.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn run_sublattice(
        &self,
        inner: &Conv3dPlan,
        input: &[f32],
        filters: Filters<'_>,
        bias: Option<&[f32]>,
        output: &mut [f32],
        threads: usize,
        cancel: Option<&AtomicBool>,
        stats: bool,
    ) -> Result<Option<Vec<(f64, f64)>>, KernelError> {
        let filters = self.inner_filters(filters)?;
        let cancelled = || cancel.is_some_and(|c| c.load(Ordering::Relaxed));
        let sub_in = self.gather_sublattices(&inner.shape, input, threads);
        if cancelled() {
            scratch_give(sub_in);
            return Err(KernelError::Cancelled);
        }
        let mut sub_out = scratch_take_stale(inner.shape.output_len());
        let moments = if stats {
            inner
                .run_into_with_stats(&sub_in, filters, bias, &mut sub_out, threads, cancel)
                .map(Some)
        } else {
            inner
                .run_into(&sub_in, filters, bias, &mut sub_out, threads, cancel)
                .map(|()| None)
        };
        scratch_give(sub_in);
        if moments.is_ok() && !cancelled() {
            self.scatter_sublattices(&inner.shape, &sub_out, output, threads);
        }
        scratch_give(sub_out);
        let moments = moments?;
        if cancelled() {
            return Err(KernelError::Cancelled);
        }
        // Every class holds the same number of voxels: a channel's mean is the mean of the
        // classes' means, its variance theirs plus the spread of the means (in class order).
        Ok(moments.map(|m| {
            let c_out = self.shape.c_out();
            let classes = self.shape.params.dilation.iter().product::<usize>();
            let mut merged = Vec::with_capacity(self.shape.batch() * c_out);
            for item in 0..self.shape.batch() {
                for co in 0..c_out {
                    let of = |k: usize| m[(item * classes + k) * c_out + co];
                    let mean = (0..classes).map(|k| of(k).0).sum::<f64>() / classes as f64;
                    let var = (0..classes)
                        .map(|k| of(k).1 + (of(k).0 - mean) * (of(k).0 - mean))
                        .sum::<f64>()
                        / classes as f64;
                    merged.push((mean, var));
                }
            }
            merged
        }))
    }

    /// Streaming by the sub-lattice split: the whole output first, then its slabs in order,
    /// each copied into one buffer and lent to `deliver(batch, depth, data)`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn stream_sublattice(
        &self,
        inner: &Conv3dPlan,
        input: &[f32],
        filters: Filters<'_>,
        bias: Option<&[f32]>,
        threads: usize,
        cancel: Option<&AtomicBool>,
        deliver: &mut SlabSink<'_>,
    ) -> Result<(), KernelError> {
        let mut output = scratch_take_stale(self.shape.output_len());
        let run = self.run_sublattice(
            inner,
            input,
            filters,
            bias,
            &mut output,
            threads,
            cancel,
            false,
        );
        if let Err(e) = run {
            scratch_give(output);
            return Err(e);
        }
        let c_out = self.shape.c_out();
        let out_vox = self.shape.out_voxels();
        let mut slab = Vec::new();
        for s in self.slabs() {
            slab.clear();
            for co in 0..c_out {
                let at = (s.batch * c_out + co) * out_vox + s.start;
                slab.extend_from_slice(&output[at..at + s.voxels]);
            }
            if deliver(s.batch, s.depth.clone(), &slab).is_break() {
                scratch_give(output);
                return Err(KernelError::Cancelled);
            }
        }
        scratch_give(output);
        Ok(())
    }
}
