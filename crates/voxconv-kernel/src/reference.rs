//! The oracle: obviously-correct direct loops, accumulated in f64.
//!
//! Slow by design (one multiply-add per filter tap per output voxel, with bounds checks). The
//! fast paths are tested against it.

use super::{Activation, Conv3dShape, KernelError};

/// Direct Conv3D. Returns the output `[N, C_out, oD, oH, oW]` and, per output element, the
/// sum of `|w·x|` over its reduction (used to derive a rounding-error bound for the fast path).
pub fn conv3d_reference_with_magnitude(
    shape: &Conv3dShape,
    input: &[f32],
    filters: &[f32],
    bias: Option<&[f32]>,
    activation: Activation,
) -> Result<(Vec<f32>, Vec<f64>), KernelError> {
    super::check_buffers(shape, input, filters, bias)?;
    let [n_b, c_in, d, h, w] = shape.input;
    let [c_out, _, kd, kh, kw] = shape.filters;
    let [od, oh, ow] = shape.out_dims();
    let p = shape.params;
    let mut out = Vec::with_capacity(shape.output_len());
    let mut mag = Vec::with_capacity(shape.output_len());
    for n in 0..n_b {
        for co in 0..c_out {
            for z in 0..od {
                for y in 0..oh {
                    for x in 0..ow {
                        let mut acc = 0f64;
                        let mut abs = 0f64;
                        for ci in 0..c_in {
                            for a in 0..kd {
                                for b in 0..kh {
                                    for c in 0..kw {
                                        // Position in the zero-padded input, then unpadded.
                                        let iz = (z * p.stride[0] + a * p.dilation[0]) as isize
                                            - p.padding[0] as isize;
                                        let iy = (y * p.stride[1] + b * p.dilation[1]) as isize
                                            - p.padding[1] as isize;
                                        let ix = (x * p.stride[2] + c * p.dilation[2]) as isize
                                            - p.padding[2] as isize;
                                        if iz < 0
                                            || iy < 0
                                            || ix < 0
                                            || iz >= d as isize
                                            || iy >= h as isize
                                            || ix >= w as isize
                                        {
                                            continue;
                                        }
                                        let xi = input[(((n * c_in + ci) * d + iz as usize) * h
                                            + iy as usize)
                                            * w
                                            + ix as usize];
                                        let wi = filters
                                            [(((co * c_in + ci) * kd + a) * kh + b) * kw + c];
                                        let prod = f64::from(xi) * f64::from(wi);
                                        acc += prod;
                                        abs += prod.abs();
                                    }
                                }
                            }
                        }
                        if let Some(b) = bias {
                            acc += f64::from(b[co]);
                            abs += f64::from(b[co]).abs();
                        }
                        out.push(activation.channel(co).apply_f64(acc) as f32);
                        mag.push(abs);
                    }
                }
            }
        }
    }
    Ok((out, mag))
}

/// Direct Conv3D, f64 accumulation; output `[N, C_out, oD, oH, oW]`.
pub fn conv3d_reference(
    shape: &Conv3dShape,
    input: &[f32],
    filters: &[f32],
    bias: Option<&[f32]>,
    activation: Activation,
) -> Result<Vec<f32>, KernelError> {
    conv3d_reference_with_magnitude(shape, input, filters, bias, activation).map(|(o, _)| o)
}
