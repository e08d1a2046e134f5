//! Measures the AVX-512 microkernel with all operands in L1: its ceiling on this CPU.
//! `cargo run --release --example microkernel_peak`
use std::time::Instant;
fn main() {
    let kc = 256;
    let a = vec![1.0f32; kc * 64];
    let b = vec![0.5f32; kc * 8];
    let mut c = vec![0.0f32; 8 * 64];
    let iters = 200_000;
    let t = Instant::now();
    for _ in 0..iters {
        unsafe {
            voxconv::kernel::avx512::block_48x8(
                kc,
                a.as_ptr(),
                48,
                b.as_ptr(),
                std::ptr::null(),
                0,
                c.as_mut_ptr(),
                64,
                8,
                48,
                std::ptr::null(),
            )
        };
    }
    let s = t.elapsed().as_secs_f64();
    println!("{:.1} GFLOP/s", (iters * kc * 48 * 8 * 2) as f64 / s / 1e9);
}
