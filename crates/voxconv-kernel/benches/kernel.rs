//! Criterion benches of the Conv3D kernel on the shared workloads (`benches/workloads.toml`),
//! at 1 thread and at all available cores.
//!
//! `cargo bench --bench kernel` (all), `cargo bench --bench kernel -- mri-t1` (one).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use voxconv_kernel::{seeded, Activation, Conv3dPlan, WorkloadFile};

fn workloads(c: &mut Criterion) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../benches/workloads.toml");
    let file = WorkloadFile::load(std::path::Path::new(path)).expect("workloads.toml");
    let cores = voxconv_kernel::default_threads();
    let mut group = c.benchmark_group("conv3d");
    group.sample_size(10);
    for w in &file.workload {
        let shape = w.shape().expect("valid workload");
        let plan = Conv3dPlan::new(shape, Activation::None);
        let x = seeded(shape.input_len(), 1);
        let k = seeded(shape.filters_len(), 2);
        let b = seeded(shape.c_out(), 3);
        let mut out = vec![0f32; shape.output_len()];
        group.throughput(Throughput::Elements(shape.flops() as u64));
        let mut threads = vec![1];
        if cores > 1 {
            threads.push(cores);
        }
        for t in threads {
            group.bench_function(format!("{}/threads={t}", w.name), |bench| {
                bench.iter(|| plan.run_into(&x, &k, Some(&b), &mut out, t, None).unwrap())
            });
        }
    }
    group.finish();
}

criterion_group!(benches, workloads);
criterion_main!(benches);
