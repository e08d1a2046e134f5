//! Output geometry with checked arithmetic.
//!
//! Per axis: `o = (x + 2·pad − dil·(k − 1) − 1) / stride + 1`. Every product and sum that
//! sizes a buffer is computed with checked arithmetic, so a hostile shape is a typed error,
//! never a panic or a wrapped allocation size.

use super::KernelError;

/// Axis names, in the order of the spatial dimensions `[D, H, W]`.
pub const AXES: [&str; 3] = ["depth", "height", "width"];

/// Stride, zero padding and dilation per spatial axis `[d, h, w]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv3dParams {
    pub stride: [usize; 3],
    pub padding: [usize; 3],
    pub dilation: [usize; 3],
}

impl Default for Conv3dParams {
    fn default() -> Self {
        Self {
            stride: [1; 3],
            padding: [0; 3],
            dilation: [1; 3],
        }
    }
}

/// A validated Conv3D problem: input `[N, C_in, D, H, W]`, filters `[C_out, C_in, kD, kH, kW]`,
/// output `[N, C_out, oD, oH, oW]`. Every size derived from it fits in `usize`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv3dShape {
    pub input: [usize; 5],
    pub filters: [usize; 5],
    pub params: Conv3dParams,
    pub output: [usize; 5],
}

/// One output extent: `(x + 2·pad − dil·(k − 1) − 1) / stride + 1`.
pub fn output_dim(
    axis: usize,
    x: usize,
    k: usize,
    pad: usize,
    dil: usize,
    stride: usize,
) -> Result<usize, KernelError> {
    let name = AXES[axis];
    if stride == 0 {
        return Err(KernelError::ZeroStride { axis: name });
    }
    if dil == 0 {
        return Err(KernelError::ZeroDilation { axis: name });
    }
    let overflow = || KernelError::Overflow {
        what: "padded input or dilated kernel extent",
    };
    let padded = pad
        .checked_mul(2)
        .and_then(|p| p.checked_add(x))
        .ok_or_else(overflow)?;
    let effective = k
        .checked_sub(1)
        .and_then(|k1| k1.checked_mul(dil))
        .and_then(|e| e.checked_add(1))
        .ok_or_else(overflow)?;
    if effective > padded {
        return Err(KernelError::KernelTooLarge {
            axis: name,
            effective,
            padded,
        });
    }
    Ok((padded - effective) / stride + 1)
}

fn product(dims: &[usize], what: &'static str) -> Result<usize, KernelError> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or(KernelError::Overflow { what })
}

impl Conv3dShape {
    /// Validates an input shape, a filter shape and parameters, and derives the output shape.
    pub fn new(
        input: [usize; 5],
        filters: [usize; 5],
        params: Conv3dParams,
    ) -> Result<Self, KernelError> {
        const IN: [&str; 5] = ["N", "C_in", "D", "H", "W"];
        const FI: [&str; 5] = ["C_out", "C_in", "kD", "kH", "kW"];
        for (i, &d) in input.iter().enumerate() {
            if d == 0 {
                return Err(KernelError::EmptyDimension {
                    tensor: "input",
                    dim: IN[i],
                });
            }
        }
        for (i, &d) in filters.iter().enumerate() {
            if d == 0 {
                return Err(KernelError::EmptyDimension {
                    tensor: "filters",
                    dim: FI[i],
                });
            }
        }
        if input[1] != filters[1] {
            return Err(KernelError::ChannelMismatch {
                input: input[1],
                filters: filters[1],
            });
        }
        let mut out_sp = [0usize; 3];
        for a in 0..3 {
            out_sp[a] = output_dim(
                a,
                input[2 + a],
                filters[2 + a],
                params.padding[a],
                params.dilation[a],
                params.stride[a],
            )?;
        }
        let output = [input[0], filters[0], out_sp[0], out_sp[1], out_sp[2]];
        // Every buffer size derived later must fit, in elements and in bytes.
        for (dims, what) in [
            (&input[..], "input elements"),
            (&filters[..], "filter elements"),
            (&output[..], "output elements"),
        ] {
            product(dims, what)?
                .checked_mul(4)
                .ok_or(KernelError::Overflow { what })?;
        }
        Ok(Self {
            input,
            filters,
            params,
            output,
        })
    }

    pub fn batch(&self) -> usize {
        self.input[0]
    }
    pub fn c_in(&self) -> usize {
        self.input[1]
    }
    pub fn c_out(&self) -> usize {
        self.filters[0]
    }
    /// Input spatial dims `[D, H, W]`.
    pub fn in_dims(&self) -> [usize; 3] {
        [self.input[2], self.input[3], self.input[4]]
    }
    /// Kernel extents `[kD, kH, kW]`.
    pub fn kernel_dims(&self) -> [usize; 3] {
        [self.filters[2], self.filters[3], self.filters[4]]
    }
    /// Output spatial dims `[oD, oH, oW]`.
    pub fn out_dims(&self) -> [usize; 3] {
        [self.output[2], self.output[3], self.output[4]]
    }
    /// Voxels of one input channel.
    pub fn in_voxels(&self) -> usize {
        self.input[2] * self.input[3] * self.input[4]
    }
    /// Voxels of one output channel.
    pub fn out_voxels(&self) -> usize {
        self.output[2] * self.output[3] * self.output[4]
    }
    /// Reduction length `K = C_in·kD·kH·kW`.
    pub fn reduction_len(&self) -> usize {
        self.filters[1] * self.filters[2] * self.filters[3] * self.filters[4]
    }
    pub fn input_len(&self) -> usize {
        self.input.iter().product()
    }
    pub fn filters_len(&self) -> usize {
        self.filters.iter().product()
    }
    pub fn output_len(&self) -> usize {
        self.output.iter().product()
    }
    /// `2·N·C_out·oD·oH·oW·C_in·kD·kH·kW` as f64 (it can exceed `u64` for absurd shapes).
    pub fn flops(&self) -> f64 {
        2.0 * self.output_len() as f64 * self.reduction_len() as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formula_matches_pytorch_examples() {
        // Conv3d(k=3, pad=1) keeps the size; stride 2 halves it (rounding down + 1).
        assert_eq!(output_dim(0, 128, 3, 1, 1, 1).unwrap(), 128);
        assert_eq!(output_dim(0, 96, 3, 1, 1, 2).unwrap(), 48);
        assert_eq!(output_dim(0, 7, 3, 0, 2, 1).unwrap(), 3);
        assert_eq!(output_dim(0, 5, 5, 0, 1, 3).unwrap(), 1);
    }
}
