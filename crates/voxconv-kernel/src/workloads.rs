//! The reference Conv3D workloads (`benches/workloads.toml`, a copy of the shared
//! `bench/workloads.toml`), embedded so `voxconv bench`, `voxconv ghz-data` and the built-in
//! `bench-*` models work without the file; `--workloads FILE` reads another.

use std::path::Path;

use rand::{Rng, SeedableRng};
use serde::Deserialize;

use crate::{Conv3dParams, Conv3dShape};

/// The workload file compiled into the binary.
pub const BUILTIN: &str = include_str!("../../../benches/workloads.toml");

/// A file of `[[workload]]` tables.
#[derive(Debug, Deserialize)]
pub struct WorkloadFile {
    pub workload: Vec<Workload>,
}

/// One Conv3D shape to benchmark.
#[derive(Debug, Clone, Deserialize)]
pub struct Workload {
    pub name: String,
    pub input: [usize; 5],
    pub filters: [usize; 5],
    pub stride: Option<[usize; 3]>,
    pub padding: Option<[usize; 3]>,
    pub dilation: Option<[usize; 3]>,
}

impl Workload {
    pub fn shape(&self) -> Result<Conv3dShape, crate::KernelError> {
        let d = Conv3dParams::default();
        Conv3dShape::new(
            self.input,
            self.filters,
            Conv3dParams {
                stride: self.stride.unwrap_or(d.stride),
                padding: self.padding.unwrap_or(d.padding),
                dilation: self.dilation.unwrap_or(d.dilation),
            },
        )
    }
}

impl WorkloadFile {
    /// The embedded `benches/workloads.toml`.
    pub fn builtin() -> Self {
        toml::from_str(BUILTIN).expect("benches/workloads.toml parses (checked by a test)")
    }

    /// The named workload.
    pub fn get(&self, name: &str) -> Result<&Workload, String> {
        self.workload
            .iter()
            .find(|w| w.name == name)
            .ok_or_else(|| {
                let names: Vec<&str> = self.workload.iter().map(|w| w.name.as_str()).collect();
                format!("--workload: expected one of {names:?}, got {name:?}")
            })
    }

    pub fn load(path: &Path) -> Result<Self, Box<dyn std::error::Error>> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?)
    }
}

/// Uniform values in [-1, 1) from a fixed seed.
pub fn seeded(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// Default thread count: the cores this process may use.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
