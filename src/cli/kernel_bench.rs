//! `voxconv kernel-bench`: the kernel on named workloads, seeded random data, medians.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use serde::Serialize;

use crate::kernel::{seeded, WorkloadFile};

use crate::kernel::{Conv3dPlan, GemmImpl, Strategy, Tiling};

#[derive(Debug, Args)]
pub struct KernelBenchArgs {
    /// Workload file (format of benches/workloads.toml).
    #[arg(long)]
    pub workloads: PathBuf,
    /// Threads (default: available cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Timed runs per workload (after one warm-up run).
    #[arg(long, default_value_t = 5)]
    pub repeat: usize,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
    /// Only the named workloads (repeatable).
    #[arg(long = "only")]
    pub only: Vec<String>,
    /// The fused activation: none, relu, leaky_relu[:A], sigmoid, elu[:A], prelu:S[,S...]
    /// (one slope, or one per output channel).
    #[arg(long, default_value = "none")]
    pub activation: crate::kernel::Activation,
    /// Override tile width in output voxels (tuning).
    #[arg(long, hide = true)]
    pub tile_cols: Option<usize>,
    /// Override reduction rows per GEMM (tuning).
    #[arg(long, hide = true)]
    pub k_chunk: Option<usize>,
    /// Override output channels per tile (tuning).
    #[arg(long, hide = true)]
    pub chan_block: Option<usize>,
    /// Force a strategy: im2col | direct | pointwise | winograd | sublattice (comparison); one a workload
    /// or this CPU cannot run is an error.
    #[arg(long, hide = true)]
    pub strategy: Option<String>,
    /// Pack the filters in every timed run instead of once before them.
    #[arg(long, hide = true)]
    pub pack_per_call: bool,
    /// Use the portable gemm crate instead of the AVX-512 microkernel (comparison).
    #[arg(long, hide = true)]
    pub portable_gemm: bool,
}

#[derive(Debug, Serialize)]
struct BenchLine<'a> {
    name: &'a str,
    threads: usize,
    threads_used: usize,
    strategy: &'static str,
    gemm: &'static str,
    median_ms: f64,
    min_ms: f64,
    gflops: f64,
    workspace_bytes: usize,
    runs: usize,
    /// Thread time per run by stage (ms, summed over threads, warm-up included in none).
    stages_ms: Stages,
}

#[derive(Debug, Serialize)]
struct Stages {
    im2col: f64,
    gemm: f64,
    epilogue: f64,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub fn run(a: KernelBenchArgs) -> Result<(), Box<dyn std::error::Error>> {
    let file = WorkloadFile::load(&a.workloads)?;
    let threads = a.threads.unwrap_or_else(crate::kernel::default_threads);
    let repeat = a.repeat.max(1);
    if !a.json {
        println!(
            "{:<24} {:>7} {:>16} {:>11} {:>9} {:>14}",
            "workload", "threads", "strategy", "median ms", "GFLOP/s", "workspace B"
        );
    }
    for w in file.workload.iter() {
        if !a.only.is_empty() && !a.only.contains(&w.name) {
            continue;
        }
        let shape = w.shape().map_err(|e| format!("workload {}: {e}", w.name))?;
        let mut plan = Conv3dPlan::new(shape, a.activation.clone());
        if a.tile_cols.is_some() || a.k_chunk.is_some() || a.chan_block.is_some() {
            let t = plan.tiling();
            plan = plan.with_tiling(Tiling {
                tile_cols: a.tile_cols.unwrap_or(t.tile_cols),
                k_chunk: a.k_chunk.unwrap_or(t.k_chunk),
                slab_depth: t.slab_depth,
                chan_block: a.chan_block.unwrap_or(t.chan_block),
            });
        }
        if a.portable_gemm {
            plan = plan
                .with_gemm(GemmImpl::Portable)
                .map_err(|e| format!("--portable-gemm: workload {}: {e}", w.name))?;
        }
        if let Some(name) = a.strategy.as_deref() {
            let strategy = match name {
                "im2col" => Strategy::Im2colGemm,
                "direct" => Strategy::Direct,
                "pointwise" => Strategy::Pointwise,
                "winograd" => Strategy::Winograd,
                "sublattice" => Strategy::Sublattice,
                other => return Err(format!("unknown strategy {other:?}").into()),
            };
            // Never a silent fallback: a strategy this workload or CPU cannot run fails the
            // command instead of measuring another path.
            plan = plan
                .with_strategy(strategy)
                .map_err(|e| format!("--strategy {name}: workload {}: {e}", w.name))?;
        }
        let input = seeded(shape.input_len(), 1);
        let filters = seeded(shape.filters_len(), 2);
        let bias = seeded(shape.c_out(), 3);
        // Filters are packed once, before the timed runs, as a model packs them at load;
        // `--pack-per-call` times the packing too.
        let packed = if a.pack_per_call {
            None
        } else {
            Some(plan.pack_filters(&filters)?)
        };
        let mut out = vec![0f32; shape.output_len()];
        let mut times = Vec::with_capacity(repeat);
        let mut before = plan.stage_times();
        for i in 0..=repeat {
            if i == 1 {
                before = plan.stage_times();
            }
            let t0 = Instant::now();
            match &packed {
                Some(p) => plan.run_into(&input, p, Some(&bias), &mut out, threads, None)?,
                None => plan.run_into(&input, &filters, Some(&bias), &mut out, threads, None)?,
            }
            if i > 0 {
                times.push(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        let after = plan.stage_times();
        let per_run = |a: std::time::Duration, b: std::time::Duration| {
            (a - b).as_secs_f64() * 1e3 / repeat.max(1) as f64
        };
        let stages_ms = Stages {
            im2col: per_run(after.im2col, before.im2col),
            gemm: per_run(after.gemm, before.gemm),
            epilogue: per_run(after.epilogue, before.epilogue),
        };
        let min_ms = times.iter().copied().fold(f64::INFINITY, f64::min);
        let median_ms = median(&mut times);
        let line = BenchLine {
            name: &w.name,
            threads,
            threads_used: threads.min(plan.useful_threads()),
            strategy: plan.strategy().name(),
            gemm: plan.gemm_impl().name(),
            median_ms,
            min_ms,
            gflops: shape.flops() / (median_ms * 1e6),
            workspace_bytes: plan.workspace_bytes(threads),
            runs: repeat,
            stages_ms,
        };
        if a.json {
            println!("{}", serde_json::to_string(&line)?);
        } else {
            println!(
                "{:<24} {:>7} {:>16} {:>11.2} {:>9.1} {:>14}",
                line.name,
                line.threads,
                line.strategy,
                line.median_ms,
                line.gflops,
                line.workspace_bytes
            );
        }
    }
    Ok(())
}
