//! Built-in models, so a fresh server is useful with no configuration.

use super::{ConvLayer, Model};
use crate::kernel::{Activation, Conv3dParams};

/// Every built-in model.
pub fn all() -> Vec<Model> {
    vec![sobel3d(), gaussian3d(1.0)]
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
    Model {
        name: "sobel3d".into(),
        description: "3-D Sobel gradient: 1 channel in, 3 out (d/dz, d/dy, d/dx), same size \
                      (zero padding 1); a ramp of slope s along an axis gives s"
            .into(),
        layers: vec![ConvLayer {
            filter_shape: [3, 1, 3, 3, 3],
            weights,
            bias: None,
            params: Conv3dParams {
                padding: [1; 3],
                ..Conv3dParams::default()
            },
            activation: Activation::None,
        }],
    }
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
    Model {
        name: "gaussian3d".into(),
        description: format!(
            "3-D Gaussian smoothing (sigma {sigma} voxel, 5x5x5): 1 channel in, 1 out, same \
             size (zero padding 2)"
        ),
        layers: vec![ConvLayer {
            filter_shape: [1, 1, 5, 5, 5],
            weights,
            bias: None,
            params: Conv3dParams {
                padding: [2; 3],
                ..Conv3dParams::default()
            },
            activation: Activation::None,
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sobel_of_a_ramp_is_its_slope() {
        let m = sobel3d();
        let n = 6;
        // f(z, y, x) = 2z + 3y − x
        let x: Vec<f32> = (0..n * n * n)
            .map(|i| {
                let (z, y, xx) = (i / (n * n), (i / n) % n, i % n);
                2.0 * z as f32 + 3.0 * y as f32 - xx as f32
            })
            .collect();
        let plan = m.plan([1, 1, n, n, n]).unwrap();
        let mut out = vec![f32::NAN; plan.output_len()];
        plan.plans[0]
            .run_into(&x, &m.layers[0].weights, None, &mut out, 1, None)
            .unwrap();
        // An interior voxel (no padding effects).
        let at = |c: usize| out[((c * n + 2) * n + 3) * n + 2];
        assert!(
            (at(0) - 2.0).abs() < 1e-5 && (at(1) - 3.0).abs() < 1e-5 && (at(2) + 1.0).abs() < 1e-5
        );
    }

    #[test]
    fn gaussian_preserves_a_constant_inside() {
        let m = gaussian3d(1.0);
        let s: f32 = m.layers[0].weights.iter().sum();
        assert!((s - 1.0).abs() < 1e-6);
        assert_eq!(m.receptive_field(), [5, 5, 5]);
    }
}
