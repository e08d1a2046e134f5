//! Models: stacks of Conv3D layers whose filters live on the server.
//!
//! A model is planned per input shape ([`Model::plan`]): every layer's shape is validated
//! with checked arithmetic before anything large is allocated. Execution keeps at most two
//! activations alive between layers and streams the last layer's output slab by slab.

pub mod builtin;

use std::ops::ControlFlow;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use crate::kernel::{Activation, Conv3dParams, Conv3dPlan, Conv3dShape, KernelError, Slab};

/// One Conv3D layer: filters `[C_out, C_in, kD, kH, kW]`, optional bias, fused activation.
#[derive(Clone, Debug)]
pub struct ConvLayer {
    pub filter_shape: [usize; 5],
    pub weights: Vec<f32>,
    pub bias: Option<Vec<f32>>,
    pub params: Conv3dParams,
    pub activation: Activation,
}

/// A named stack of layers.
#[derive(Clone, Debug)]
pub struct Model {
    pub name: String,
    pub description: String,
    pub layers: Vec<ConvLayer>,
}

/// A model planned for one input shape.
#[derive(Clone, Debug)]
pub struct ModelPlan {
    pub plans: Vec<Conv3dPlan>,
    pub input: [usize; 5],
    pub output: [usize; 5],
}

/// Time spent in one layer.
#[derive(Clone, Debug)]
pub struct LayerTiming {
    pub strategy: &'static str,
    pub compute_ms: f64,
}

impl Model {
    pub fn in_channels(&self) -> usize {
        self.layers.first().map_or(0, |l| l.filter_shape[1])
    }

    pub fn out_channels(&self) -> usize {
        self.layers.last().map_or(0, |l| l.filter_shape[0])
    }

    /// Validates `input` (`[N, C, D, H, W]`) through every layer.
    pub fn plan(&self, input: [usize; 5]) -> Result<ModelPlan, KernelError> {
        let mut plans = Vec::with_capacity(self.layers.len());
        let mut shape = input;
        for layer in &self.layers {
            let s = Conv3dShape::new(shape, layer.filter_shape, layer.params)?;
            shape = s.output;
            plans.push(Conv3dPlan::new(s, layer.activation));
        }
        Ok(ModelPlan {
            plans,
            input,
            output: shape,
        })
    }

    /// Receptive field of one output voxel, in input voxels `[d, h, w]`.
    pub fn receptive_field(&self) -> [usize; 3] {
        let mut rf = [1usize; 3];
        let mut jump = [1usize; 3];
        for l in &self.layers {
            for a in 0..3 {
                let k = l.filter_shape[2 + a];
                rf[a] += (k - 1) * l.params.dilation[a] * jump[a];
                jump[a] *= l.params.stride[a];
            }
        }
        rf
    }

    /// How the output shape follows from the input shape, in words.
    pub fn output_shape_rule(&self) -> String {
        let mut parts = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let p = l.params;
            parts.push(format!(
                "layer {i}: o = floor((x + 2*{:?} - {:?}*({:?} - 1) - 1) / {:?}) + 1 per [d,h,w]",
                p.padding,
                p.dilation,
                [l.filter_shape[2], l.filter_shape[3], l.filter_shape[4]],
                p.stride
            ));
        }
        format!(
            "[N, {}, D, H, W] -> [N, {}, oD, oH, oW]; {}",
            self.in_channels(),
            self.out_channels(),
            parts.join("; ")
        )
    }
}

impl ModelPlan {
    /// FLOPs of all layers (direct-convolution count).
    pub fn flops(&self) -> f64 {
        self.plans.iter().map(|p| p.shape().flops()).sum()
    }

    pub fn output_len(&self) -> usize {
        self.output.iter().product()
    }

    /// Peak bytes the run needs besides the caller's input: the largest pair of consecutive
    /// intermediate activations, plus the last layer's streaming workspace.
    pub fn working_bytes(&self, threads: usize) -> usize {
        let n = self.plans.len();
        let mut peak = 0usize;
        for i in 0..n.saturating_sub(1) {
            let cur = self.plans[i].shape().output_len() * 4;
            let prev = if i == 0 {
                0
            } else {
                self.plans[i - 1].shape().output_len() * 4
            };
            peak = peak.max(cur + prev + self.plans[i].workspace_bytes(threads));
        }
        let last = self.plans.last().map_or(0, |p| {
            let prev = if n >= 2 {
                self.plans[n - 2].shape().output_len() * 4
            } else {
                0
            };
            prev + p.streaming_workspace_bytes(threads)
        });
        peak.max(last)
    }

    /// Runs every layer on `input`; the last layer's finished slabs go to `on_slab` in
    /// order. Between layers only the previous and the current activation are alive.
    pub fn run(
        &self,
        model: &Model,
        input: Vec<f32>,
        threads: usize,
        cancel: Option<&AtomicBool>,
        on_slab: &mut dyn FnMut(Slab<'_>) -> ControlFlow<()>,
    ) -> Result<Vec<LayerTiming>, KernelError> {
        let mut timings = Vec::with_capacity(self.plans.len());
        let mut cur = input;
        let last = self.plans.len() - 1;
        for (i, (plan, layer)) in self.plans.iter().zip(&model.layers).enumerate() {
            let t0 = Instant::now();
            let bias = layer.bias.as_deref();
            if i == last {
                plan.run_slabs(&cur, &layer.weights, bias, threads, cancel, on_slab)?;
            } else {
                let mut out = vec![0f32; plan.shape().output_len()];
                plan.run_into(&cur, &layer.weights, bias, &mut out, threads, cancel)?;
                cur = out;
            }
            timings.push(LayerTiming {
                strategy: plan.strategy().name(),
                compute_ms: t0.elapsed().as_secs_f64() * 1e3,
            });
        }
        Ok(timings)
    }
}

/// The models a server offers, by name.
#[derive(Clone, Debug, Default)]
pub struct ModelSet {
    models: std::collections::BTreeMap<String, std::sync::Arc<Model>>,
}

impl ModelSet {
    /// The built-in models.
    pub fn builtin() -> Self {
        let mut set = Self::default();
        for m in builtin::all() {
            set.insert(m);
        }
        set
    }

    pub fn insert(&mut self, model: Model) {
        self.models
            .insert(model.name.clone(), std::sync::Arc::new(model));
    }

    pub fn get(&self, name: &str) -> Option<std::sync::Arc<Model>> {
        self.models.get(name).cloned()
    }

    pub fn iter(&self) -> impl Iterator<Item = &std::sync::Arc<Model>> {
        self.models.values()
    }
}
