//! `voxconv conv3d`: one convolution on `.npy` files.

use std::path::PathBuf;

use clap::Args;

use crate::kernel::{Activation, Conv3dParams, Conv3dPlan, Conv3dShape};
use crate::tensor::{read_npy_rank, write_npy};

#[derive(Debug, Args)]
pub struct Conv3dArgs {
    /// Input volume, float32 [N, C_in, D, H, W].
    #[arg(long)]
    pub input: PathBuf,
    /// Filters, float32 [C_out, C_in, kD, kH, kW].
    #[arg(long)]
    pub filters: PathBuf,
    /// Bias, float32 [C_out].
    #[arg(long)]
    pub bias: Option<PathBuf>,
    /// Stride D,H,W.
    #[arg(long, value_parser = super::parse_triple, default_value = "1,1,1")]
    pub stride: [usize; 3],
    /// Zero padding D,H,W.
    #[arg(long, value_parser = super::parse_triple, default_value = "0,0,0")]
    pub padding: [usize; 3],
    /// Dilation D,H,W.
    #[arg(long, value_parser = super::parse_triple, default_value = "1,1,1")]
    pub dilation: [usize; 3],
    /// none | relu | leaky_relu:ALPHA | sigmoid
    #[arg(long, default_value = "none")]
    pub activation: Activation,
    /// Worker threads (default: available cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Output, float32 [N, C_out, oD, oH, oW].
    #[arg(long)]
    pub output: PathBuf,
}

pub fn run(a: Conv3dArgs) -> Result<(), Box<dyn std::error::Error>> {
    let input = read_npy_rank(&a.input, 5)?;
    let filters = read_npy_rank(&a.filters, 5)?;
    let bias = a.bias.as_deref().map(|p| read_npy_rank(p, 1)).transpose()?;
    let params = Conv3dParams {
        stride: a.stride,
        padding: a.padding,
        dilation: a.dilation,
    };
    let dims = |v: &[usize]| [v[0], v[1], v[2], v[3], v[4]];
    let shape = Conv3dShape::new(dims(&input.shape), dims(&filters.shape), params)?;
    let plan = Conv3dPlan::new(shape, a.activation);
    let mut out = vec![0f32; shape.output_len()];
    plan.run_into(
        &input.data,
        &filters.data,
        bias.as_ref().map(|b| b.data.as_slice()),
        &mut out,
        a.threads.unwrap_or_else(crate::kernel::default_threads),
        None,
    )?;
    drop(input);
    write_npy(&a.output, &shape.output, out)?;
    Ok(())
}
