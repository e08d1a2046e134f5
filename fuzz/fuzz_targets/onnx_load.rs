//! The ONNX loader: arbitrary bytes as `model.onnx` (no external data), then, for a graph
//! that loads and declares a small input, planning it. Must never panic, hang or allocate
//! by a size the file merely announces.
//!
//!     cargo +nightly fuzz run onnx_load -- -max_total_time=60

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(graph) = voxconv::model::onnx::decode(bytes::Bytes::copy_from_slice(data), None) else {
        return;
    };
    if let Some(shape) = graph.declared_input() {
        if shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .is_some_and(|n| n <= 1 << 16)
        {
            let _ = graph.plan(shape);
        }
    }
});
