//! `voxconv model-bench`: whole-network latency in process (no server, no transport), for a
//! model of a repository at its declared input shape or a given one.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;

use crate::model::repo::load_model;
use crate::model::LayerPlan;

#[derive(Debug, Args)]
pub struct ModelBenchArgs {
    /// The model repository (a directory of model directories).
    #[arg(long)]
    pub model_repository: PathBuf,
    /// Which model (default: every model of the repository, in name order).
    #[arg(long)]
    pub model: Option<String>,
    /// Input shape N,C,D,H,W (default: the shape the model's graph declares).
    #[arg(long)]
    pub shape: Option<String>,
    /// Kernel threads.
    #[arg(long, default_value_t = crate::kernel::default_threads())]
    pub threads: usize,
    /// Timed runs (after one warm-up run).
    #[arg(long, default_value_t = 5)]
    pub repeat: usize,
    /// One JSON object per model on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
    /// After the timed runs, one more run timed step by step (ONNX graphs): print the N
    /// slowest steps (node, op, strategy, output shape, ms) and the time per op type.
    #[arg(long, value_name = "N")]
    pub steps: Option<usize>,
}

fn parse_shape(s: &str) -> Result<[usize; 5], String> {
    let v: Vec<usize> = s
        .split(',')
        .map(|p| {
            p.trim()
                .parse()
                .map_err(|_| format!("--shape: expected N,C,D,H,W integers, got {s:?}"))
        })
        .collect::<Result<_, _>>()?;
    v.try_into()
        .map_err(|_| format!("--shape: expected 5 dimensions N,C,D,H,W, got {s:?}"))
}

pub fn run(a: ModelBenchArgs) -> Result<(), Box<dyn std::error::Error>> {
    if a.threads == 0 || a.repeat == 0 {
        return Err("--threads and --repeat must be at least 1".into());
    }
    let shape_arg = a.shape.as_deref().map(parse_shape).transpose()?;
    let mut names: Vec<String> = match &a.model {
        Some(m) => vec![m.clone()],
        None => std::fs::read_dir(&a.model_repository)
            .map_err(|e| format!("--model-repository {}: {e}", a.model_repository.display()))?
            .filter_map(Result::ok)
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect(),
    };
    names.sort();
    if !a.json {
        println!(
            "{:<28} {:>22} {:>6} {:>10} {:>10} {:>10} {:>12} {:>8}",
            "model", "input", "thr", "median ms", "min ms", "max ms", "working MiB", "GFLOP/s"
        );
    }
    for name in names {
        let m = load_model(&a.model_repository.join(&name), &name)?;
        let shape = match shape_arg.or_else(|| m.graph().and_then(|g| g.declared_input())) {
            Some(s) => s,
            None => {
                return Err(format!(
                    "model {name}: its input shape is not fixed; give --shape N,C,D,H,W"
                )
                .into())
            }
        };
        let plan = m.plan(shape).map_err(|e| format!("model {name}: {e}"))?;
        let x = crate::kernel::seeded(shape.iter().product(), 7);
        let mut out = vec![0f32; plan.output_len()];
        let mut times = Vec::with_capacity(a.repeat);
        let mut breakdown = Vec::new();
        for i in 0..=a.repeat {
            let t0 = Instant::now();
            let t = plan.run_to(&m, x.clone(), a.threads, None, &mut out)?;
            if i > 0 {
                times.push(t0.elapsed().as_secs_f64() * 1e3);
                breakdown = t;
            }
        }
        let mut sorted = times.clone();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[sorted.len() / 2];
        let gflops = plan.flops() / (median * 1e6);
        let working = plan.working_bytes(a.threads) as f64 / (1 << 20) as f64;
        if a.json {
            let stages: Vec<serde_json::Value> = breakdown
                .iter()
                .map(|t| serde_json::json!({"strategy": t.strategy, "ms": t.compute_ms}))
                .collect();
            println!(
                "{}",
                serde_json::json!({
                    "model": name, "input": shape, "threads": a.threads,
                    "median_ms": median, "min_ms": sorted[0], "max_ms": sorted[sorted.len() - 1],
                    "runs_ms": times, "working_bytes": plan.working_bytes(a.threads),
                    "flops": plan.flops(), "gflops": gflops, "stages": stages,
                })
            );
        } else {
            println!(
                "{:<28} {:>22} {:>6} {:>10.2} {:>10.2} {:>10.2} {:>12.1} {:>8.1}",
                name,
                format!("{shape:?}"),
                a.threads,
                median,
                sorted[0],
                sorted[sorted.len() - 1],
                working,
                gflops
            );
            for t in &breakdown {
                println!(
                    "    {:<26} {:>10.2} ms (last run)",
                    t.strategy, t.compute_ms
                );
            }
        }
        if let Some(top) = a.steps {
            print_steps(&plan, &x, a.threads, top, a.json)?;
        }
    }
    Ok(())
}

/// One run of a graph timed step by step: the `top` slowest steps and the time per op type.
fn print_steps(
    plan: &crate::model::ModelPlan,
    x: &[f32],
    threads: usize,
    top: usize,
    json: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let graphs = plan.plans.iter().filter_map(|p| match p {
        LayerPlan::Graph(g) => Some(g),
        _ => None,
    });
    for g in graphs {
        let (_, mut steps) = g.run_profiled(x.to_vec(), threads)?;
        let mut per_op: Vec<(&'static str, f64, usize)> = Vec::new();
        for s in &steps {
            match per_op.iter_mut().find(|(o, ..)| *o == s.op) {
                Some(e) => {
                    e.1 += s.ms;
                    e.2 += 1;
                }
                None => per_op.push((s.op, s.ms, 1)),
            }
        }
        per_op.sort_by(|a, b| b.1.total_cmp(&a.1));
        steps.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        steps.truncate(top);
        if json {
            let st: Vec<serde_json::Value> = steps
                .iter()
                .map(|s| {
                    serde_json::json!({"node": s.node, "op": s.op, "strategy": s.strategy,
                        "shape": s.shape, "ms": s.ms})
                })
                .collect();
            let ops: Vec<serde_json::Value> = per_op
                .iter()
                .map(|(o, ms, n)| serde_json::json!({"op": o, "ms": ms, "steps": n}))
                .collect();
            println!(
                "{}",
                serde_json::json!({"slowest_steps": st, "per_op": ops})
            );
        } else {
            println!("  per op type (one profiled run):");
            for (o, ms, n) in &per_op {
                println!("    {o:<26} {ms:>10.2} ms in {n} step(s)");
            }
            println!("  slowest {} step(s):", steps.len());
            for s in &steps {
                println!(
                    "    {:>9.2} ms  {:<22} {:<20} {:<30} {:?}",
                    s.ms, s.op, s.strategy, s.node, s.shape
                );
            }
        }
    }
    Ok(())
}
