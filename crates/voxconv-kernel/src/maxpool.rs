//! 3-D max pooling (PyTorch `MaxPool3d` without padding, dilation or ceil mode).

use super::shape::AXES;
use super::KernelError;

/// Output shape of max pooling `[N, C, D, H, W]` with `kernel` and `stride` per axis:
/// `o = (x − k) / s + 1`.
pub fn maxpool3d_shape(
    input: [usize; 5],
    kernel: [usize; 3],
    stride: [usize; 3],
) -> Result<[usize; 5], KernelError> {
    let mut out = input;
    for a in 0..3 {
        if stride[a] == 0 {
            return Err(KernelError::ZeroStride { axis: AXES[a] });
        }
        if kernel[a] == 0 || kernel[a] > input[2 + a] {
            return Err(KernelError::KernelTooLarge {
                axis: AXES[a],
                effective: kernel[a],
                padded: input[2 + a],
            });
        }
        out[2 + a] = (input[2 + a] - kernel[a]) / stride[a] + 1;
    }
    Ok(out)
}

/// Max pooling of `input` (`[N, C, D, H, W]`, C order); returns the pooled tensor.
pub fn maxpool3d(
    input: &[f32],
    shape: [usize; 5],
    kernel: [usize; 3],
    stride: [usize; 3],
) -> Result<Vec<f32>, KernelError> {
    let out_shape = maxpool3d_shape(shape, kernel, stride)?;
    let [n, c, d, h, w] = shape;
    if input.len() != n * c * d * h * w {
        return Err(KernelError::BufferLength {
            what: "input",
            expected: n * c * d * h * w,
            got: input.len(),
        });
    }
    let [_, _, od, oh, ow] = out_shape;
    let mut out = Vec::with_capacity(out_shape.iter().product());
    for plane in input.chunks_exact(d * h * w) {
        for z in 0..od {
            for y in 0..oh {
                for x in 0..ow {
                    let mut m = f32::NEG_INFINITY;
                    for a in 0..kernel[0] {
                        for b in 0..kernel[1] {
                            let row = ((z * stride[0] + a) * h + y * stride[1] + b) * w;
                            for v in &plane[row + x * stride[2]..row + x * stride[2] + kernel[2]] {
                                // NaN propagates, as in PyTorch.
                                if *v > m || v.is_nan() {
                                    m = *v;
                                }
                            }
                        }
                    }
                    out.push(m);
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_windows_and_rejects_bad_sizes() {
        let x: Vec<f32> = (0..4 * 4 * 4).map(|i| i as f32).collect();
        let y = maxpool3d(&x, [1, 1, 4, 4, 4], [2, 2, 2], [2, 2, 2]).unwrap();
        assert_eq!(y, vec![21.0, 23.0, 29.0, 31.0, 53.0, 55.0, 61.0, 63.0]);
        assert!(matches!(
            maxpool3d_shape([1, 1, 1, 4, 4], [2, 2, 2], [2, 2, 2]),
            Err(KernelError::KernelTooLarge { axis: "depth", .. })
        ));
        assert!(matches!(
            maxpool3d_shape([1, 1, 4, 4, 4], [2, 2, 2], [1, 0, 1]),
            Err(KernelError::ZeroStride { axis: "height" })
        ));
    }
}
