//! Built-in models, so a fresh server is useful with no configuration.

use super::{ConvLayer, Model};
use crate::kernel::{Activation, Conv3dParams};

/// Every built-in model.
pub fn all() -> Vec<Model> {
    let mut models = vec![sobel3d(), gaussian3d(1.0), filterbank16()];
    models.extend(bench_models());
    models
}

/// One model per reference workload (`bench-<workload>`): its filter shape, stride, padding
/// and dilation, seeded random weights and bias, so `voxconv bench --workload NAME` and the
/// ghz configs load the server with exactly the shapes the kernel benchmarks report on.
pub fn bench_models() -> Vec<Model> {
    let file = crate::kernel::workloads::WorkloadFile::builtin();
    file.workload
        .iter()
        .map(|w| {
            let d = Conv3dParams::default();
            let f = w.filters;
            Model::single(
                &format!("bench-{}", w.name),
                format!(
                    "load-test model for workload {:?}: input {:?}, filters {:?}, seeded random \
                     weights",
                    w.name, w.input, w.filters
                ),
                ConvLayer {
                    filter_shape: f,
                    weights: crate::kernel::workloads::seeded(f.iter().product(), 2),
                    bias: Some(crate::kernel::workloads::seeded(f[0], 3)),
                    params: Conv3dParams {
                        stride: w.stride.unwrap_or(d.stride),
                        padding: w.padding.unwrap_or(d.padding),
                        dilation: w.dilation.unwrap_or(d.dilation),
                    },
                    activation: Activation::None,
                },
            )
        })
        .collect()
}

/// A one-layer model without bias or activation, padded to keep the volume's size.
fn same_size(
    name: &str,
    description: String,
    filter_shape: [usize; 5],
    weights: Vec<f32>,
) -> Model {
    let pad = |k: usize| (k - 1) / 2;
    Model::single(
        name,
        description,
        ConvLayer {
            filter_shape,
            weights,
            bias: None,
            params: Conv3dParams {
                padding: [
                    pad(filter_shape[2]),
                    pad(filter_shape[3]),
                    pad(filter_shape[4]),
                ],
                ..Conv3dParams::default()
            },
            activation: Activation::None,
        },
    )
}

/// Separable 3×3×3 kernel `fz ⊗ fy ⊗ fx`.
fn separable(fz: [f32; 3], fy: [f32; 3], fx: [f32; 3]) -> Vec<f32> {
    let mut k = Vec::with_capacity(27);
    for a in fz {
        for b in fy {
            for c in fx {
                k.push(a * b * c);
            }
        }
    }
    k
}

/// A first-layer feature bank, 1 → 16 channels, 3×3×3, padding 1 (same size): smoothing,
/// the 3 gradients, the 6 Hessian entries, the Laplacian and 5 diagonal derivatives, all
/// from Sobel-style derivative and `[1, 2, 1]/4` smoothing taps. The shape of a typical
/// first Conv3d layer (`mri-t1-first-layer`), with filters that mean something.
pub fn filterbank16() -> Model {
    let s = [0.25f32, 0.5, 0.25]; // smoothing
    let d = [-0.5f32, 0.0, 0.5]; // first derivative
    let dd = [1.0f32, -2.0, 1.0]; // second derivative
    let add = |a: &[f32], b: &[f32], w: f32| -> Vec<f32> {
        a.iter().zip(b).map(|(x, y)| x + w * y).collect()
    };
    let gz = separable(d, s, s);
    let gy = separable(s, d, s);
    let gx = separable(s, s, d);
    let hzz = separable(dd, s, s);
    let hyy = separable(s, dd, s);
    let hxx = separable(s, s, dd);
    let lap = add(&add(&hzz, &hyy, 1.0), &hxx, 1.0);
    let inv2 = std::f32::consts::FRAC_1_SQRT_2;
    let inv3 = 1.0 / 3f32.sqrt();
    let filters = [
        separable(s, s, s),
        gz.clone(),
        gy.clone(),
        gx.clone(),
        hzz,
        hyy,
        hxx,
        separable(d, d, s),
        separable(d, s, d),
        separable(s, d, d),
        lap,
        add(&gz, &gy, 1.0).iter().map(|v| v * inv2).collect(),
        add(&gz, &gy, -1.0).iter().map(|v| v * inv2).collect(),
        add(&gz, &gx, 1.0).iter().map(|v| v * inv2).collect(),
        add(&gy, &gx, 1.0).iter().map(|v| v * inv2).collect(),
        add(&add(&gz, &gy, 1.0), &gx, 1.0)
            .iter()
            .map(|v| v * inv3)
            .collect(),
    ];
    same_size(
        "filterbank16",
        "first-layer feature bank: 1 channel in, 16 out (smoothing, 3 gradients, 6 Hessian \
         entries, Laplacian, 5 diagonal derivatives), 3x3x3, same size (zero padding 1)"
            .into(),
        [16, 1, 3, 3, 3],
        filters.concat(),
    )
}

/// 3-D Sobel gradient, 1 → 3 channels (d/dz, d/dy, d/dx), 3×3×3, padding 1 (same size).
/// Each kernel is the central difference `[-1, 0, 1]` along its axis times the smoothing
/// `[1, 2, 1]` along the other two, divided by 32, so a linear ramp of slope s gives s.
pub fn sobel3d() -> Model {
    let diff = [-1.0f32, 0.0, 1.0];
    let smooth = [1.0f32, 2.0, 1.0];
    let mut weights = Vec::with_capacity(3 * 27);
    for axis in 0..3 {
        for a in 0..3 {
            for b in 0..3 {
                for c in 0..3 {
                    let idx = [a, b, c];
                    let mut v = 1.0 / 32.0;
                    for (ax, &i) in idx.iter().enumerate() {
                        v *= if ax == axis { diff[i] } else { smooth[i] };
                    }
                    weights.push(v);
                }
            }
        }
    }
    same_size(
        "sobel3d",
        "3-D Sobel gradient: 1 channel in, 3 out (d/dz, d/dy, d/dx), same size (zero padding \
         1); a ramp of slope s along an axis gives s"
            .into(),
        [3, 1, 3, 3, 3],
        weights,
    )
}

/// 3-D Gaussian smoothing, σ voxels, 1 → 1 channel, kernel 5×5×5 (radius 2), padding 2
/// (same size), weights normalised to sum 1.
pub fn gaussian3d(sigma: f64) -> Model {
    let g: Vec<f64> = (-2i32..=2)
        .map(|x| (-(f64::from(x * x)) / (2.0 * sigma * sigma)).exp())
        .collect();
    let sum: f64 = g.iter().sum();
    let g: Vec<f64> = g.iter().map(|v| v / sum).collect();
    let mut weights = Vec::with_capacity(125);
    for a in &g {
        for b in &g {
            for c in &g {
                weights.push((a * b * c) as f32);
            }
        }
    }
    same_size(
        "gaussian3d",
        format!(
            "3-D Gaussian smoothing (sigma {sigma} voxel, 5x5x5): 1 channel in, 1 out, same \
             size (zero padding 2)"
        ),
        [1, 1, 5, 5, 5],
        weights,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a one-layer model on the ramp f(z, y, x) = 2z + 3y − x (6³) and returns each
    /// channel's value at the interior voxel (2, 3, 2), away from padding effects.
    fn at_interior_of_ramp(m: &Model) -> Vec<f32> {
        let n = 6;
        let x: Vec<f32> = (0..n * n * n)
            .map(|i| 2.0 * (i / (n * n)) as f32 + 3.0 * ((i / n) % n) as f32 - (i % n) as f32)
            .collect();
        let plan = m.plan([1, 1, n, n, n]).unwrap();
        let mut out = vec![f32::NAN; plan.output_len()];
        let weights = &m.convs().next().unwrap().weights;
        plan.conv(0)
            .unwrap()
            .run_into(&x, weights, None, &mut out, 1, None)
            .unwrap();
        (0..m.out_channels())
            .map(|c| out[((c * n + 2) * n + 3) * n + 2])
            .collect()
    }

    #[test]
    fn every_workload_has_a_bench_model_that_accepts_its_input() {
        let file = crate::kernel::workloads::WorkloadFile::builtin();
        let models = bench_models();
        assert_eq!(models.len(), file.workload.len());
        for (w, m) in file.workload.iter().zip(&models) {
            assert_eq!(m.name, format!("bench-{}", w.name));
            let plan = m
                .plan(w.input)
                .unwrap_or_else(|e| panic!("{}: {e}", m.name));
            assert_eq!(plan.output, w.shape().unwrap().output);
        }
    }

    #[test]
    fn sobel_of_a_ramp_is_its_slope() {
        let at = at_interior_of_ramp(&sobel3d());
        assert!(
            (at[0] - 2.0).abs() < 1e-5 && (at[1] - 3.0).abs() < 1e-5 && (at[2] + 1.0).abs() < 1e-5,
            "{at:?}"
        );
    }

    #[test]
    fn filterbank_gradient_of_a_ramp_is_its_slope() {
        let m = filterbank16();
        assert_eq!(m.convs().next().unwrap().weights.len(), 16 * 27);
        let at = at_interior_of_ramp(&m);
        let centre = 2.0 * 2.0 + 3.0 * 3.0 - 2.0;
        assert!(
            (at[0] - centre).abs() < 1e-4,
            "smoothing keeps a linear function"
        );
        assert!(
            (at[1] - 2.0).abs() < 1e-5 && (at[2] - 3.0).abs() < 1e-5 && (at[3] + 1.0).abs() < 1e-5
        );
        for (c, v) in at.iter().enumerate().take(11).skip(4) {
            assert!(
                v.abs() < 1e-4,
                "second derivatives of a ramp vanish (channel {c})"
            );
        }
    }

    #[test]
    fn gaussian_preserves_a_constant_inside() {
        let m = gaussian3d(1.0);
        let s: f32 = m.convs().next().unwrap().weights.iter().sum();
        assert!((s - 1.0).abs() < 1e-6);
        assert_eq!(m.receptive_field(), [5, 5, 5]);
    }
}
