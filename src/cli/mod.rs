//! The `voxconv` command line.

mod conv3d;
mod kernel_bench;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub use conv3d::Conv3dArgs;
pub use kernel_bench::{seeded, KernelBenchArgs, Workload, WorkloadFile};

#[derive(Debug, Parser)]
#[command(
    name = "voxconv",
    version,
    about = "3-D convolution for medical volumes"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one Conv3D on .npy files with the fast kernel.
    Conv3d(Conv3dArgs),
    /// Time the kernel on the workloads of a TOML file.
    KernelBench(KernelBenchArgs),
}

/// Runs a parsed command; errors are printed as one line on stderr.
pub fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Conv3d(a) => conv3d::run(a),
        Command::KernelBench(a) => kernel_bench::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("voxconv: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Parses `D,H,W` (three non-negative integers).
pub fn parse_triple(s: &str) -> Result<[usize; 3], String> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    if parts.len() != 3 {
        return Err(format!("expected D,H,W (three integers), got {s:?}"));
    }
    let mut out = [0usize; 3];
    for (o, p) in out.iter_mut().zip(&parts) {
        *o = p
            .parse()
            .map_err(|_| format!("expected a non-negative integer, got {p:?} in {s:?}"))?;
    }
    Ok(out)
}

/// Default thread count: the cores this process may use.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
