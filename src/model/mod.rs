//! Models: stacks of Conv3D layers whose filters live on the server.
//!
//! A model is planned per input shape ([`Model::plan`]): every layer's shape is validated
//! with checked arithmetic before anything large is allocated. Execution keeps at most two
//! activations alive between layers and streams the last layer's output slab by slab.

pub mod builtin;
pub mod graph;
pub mod onnx;
pub mod repo;
pub mod sliding;

use std::ops::ControlFlow;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use crate::kernel::maxpool::{maxpool3d, maxpool3d_shape};
use crate::kernel::{
    Activation, Conv3dParams, Conv3dPlan, Conv3dShape, KernelError, OwnedSlab, Slab,
};

/// One Conv3D layer: filters `[C_out, C_in, kD, kH, kW]`, optional bias, fused activation.
#[derive(Clone, Debug)]
pub struct ConvLayer {
    pub filter_shape: [usize; 5],
    pub weights: Vec<f32>,
    pub bias: Option<Vec<f32>>,
    pub params: Conv3dParams,
    pub activation: Activation,
}

/// 3-D max pooling (no padding), then an activation (monotonic, so it commutes with the
/// max: an activation after pooling is fused here).
#[derive(Clone, Debug, PartialEq)]
pub struct MaxPoolLayer {
    pub kernel: [usize; 3],
    pub stride: [usize; 3],
    pub activation: Activation,
}

/// A layer of a model.
#[derive(Clone, Debug)]
pub enum Layer {
    Conv(ConvLayer),
    MaxPool(MaxPoolLayer),
    /// A whole network as a graph (an ONNX model): the only layer of its model.
    Graph(std::sync::Arc<graph::Graph>),
}

/// A named stack of layers.
#[derive(Clone, Debug)]
pub struct Model {
    pub name: String,
    pub description: String,
    pub layers: Vec<Layer>,
    /// Sliding-window defaults (`[sliding_window]` in model.toml).
    pub window_defaults: sliding::WindowRequest,
}

/// One layer planned for its input shape.
#[derive(Clone, Debug)]
pub enum LayerPlan {
    Conv(Conv3dPlan),
    MaxPool {
        input: [usize; 5],
        output: [usize; 5],
    },
    Graph(std::sync::Arc<graph::GraphPlan>),
}

impl LayerPlan {
    pub fn output(&self) -> [usize; 5] {
        match self {
            LayerPlan::Conv(p) => p.shape().output,
            LayerPlan::MaxPool { output, .. } => *output,
            LayerPlan::Graph(g) => g.output_shape,
        }
    }

    fn output_len(&self) -> usize {
        self.output().iter().product()
    }

    fn strategy(&self) -> &'static str {
        match self {
            LayerPlan::Conv(p) => p.strategy().name(),
            LayerPlan::MaxPool { .. } => "maxpool3d",
            LayerPlan::Graph(_) => "graph",
        }
    }
}

/// A model planned for one input shape.
#[derive(Clone, Debug)]
pub struct ModelPlan {
    pub plans: Vec<LayerPlan>,
    pub input: [usize; 5],
    pub output: [usize; 5],
    /// A whole scan in sliding windows (`plans` are then the model's plans for one call of
    /// windows, `input` the scan, `output` the blended result).
    pub window: Option<std::sync::Arc<sliding::SlidingPlan>>,
    /// Told (windows done, total) during a sliding-window run.
    pub progress: Option<ProgressHook>,
    /// A sliding-window run's scan as it arrives (then the `input` given to the run is
    /// ignored; see [`sliding::InputFeed`]).
    pub feed: Option<std::sync::Arc<sliding::InputFeed>>,
}

/// A callback for sliding-window progress.
#[derive(Clone)]
pub struct ProgressHook(pub std::sync::Arc<dyn Fn(u64, u64) + Send + Sync>);

impl std::fmt::Debug for ProgressHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProgressHook")
    }
}

/// Time spent in one layer.
#[derive(Clone, Debug)]
pub struct LayerTiming {
    pub strategy: &'static str,
    pub compute_ms: f64,
    /// Thread time per stage (conv layers; zero for pooling).
    pub stages: crate::kernel::StageTimes,
}

impl Model {
    /// A single-conv-layer model.
    pub fn single(name: &str, description: String, layer: ConvLayer) -> Self {
        Self {
            name: name.into(),
            description,
            layers: vec![Layer::Conv(layer)],
            window_defaults: Default::default(),
        }
    }

    /// The conv layers, in order.
    pub fn convs(&self) -> impl Iterator<Item = &ConvLayer> {
        self.layers.iter().filter_map(|l| match l {
            Layer::Conv(c) => Some(c),
            Layer::MaxPool(_) | Layer::Graph(_) => None,
        })
    }

    /// The graph, if this model is one (an ONNX model).
    pub fn graph(&self) -> Option<&graph::Graph> {
        match self.layers.first() {
            Some(Layer::Graph(g)) => Some(g),
            _ => None,
        }
    }

    /// The input's name (KServe tensors): the graph's, or `input` for a stack.
    pub fn input_name(&self) -> &str {
        self.graph()
            .map_or(crate::wire::KSERVE_INPUT_NAME, |g| g.input().name.as_str())
    }

    /// The output's name: the graph's first output, or `output` for a stack.
    pub fn output_name(&self) -> &str {
        self.graph().map_or(crate::wire::KSERVE_OUTPUT_NAME, |g| {
            g.output().name.as_str()
        })
    }

    /// Input dims, -1 where any size is taken.
    pub fn input_dims(&self) -> Vec<i64> {
        match self.graph() {
            Some(g) => g.input().dims_i64(),
            None => vec![-1, self.in_channels() as i64, -1, -1, -1],
        }
    }

    /// Output dims, -1 where they follow from the input.
    pub fn output_dims(&self) -> Vec<i64> {
        match self.graph() {
            Some(g) => g.output().dims_i64(),
            None => vec![-1, self.out_channels() as i64, -1, -1, -1],
        }
    }

    /// Input channels (0: the graph leaves them dynamic).
    pub fn in_channels(&self) -> usize {
        if let Some(g) = self.graph() {
            return g.input().dims.get(1).copied().flatten().unwrap_or(0);
        }
        self.convs().next().map_or(0, |l| l.filter_shape[1])
    }

    /// Output channels (0: the graph leaves them dynamic).
    pub fn out_channels(&self) -> usize {
        if let Some(g) = self.graph() {
            return g.output().dims.get(1).copied().flatten().unwrap_or(0);
        }
        self.convs().last().map_or(0, |l| l.filter_shape[0])
    }

    /// Validates `input` (`[N, C, D, H, W]`) through every layer.
    pub fn plan(&self, input: [usize; 5]) -> Result<ModelPlan, KernelError> {
        let mut plans = Vec::with_capacity(self.layers.len());
        let mut shape = input;
        for layer in &self.layers {
            let plan = match layer {
                Layer::Conv(c) => LayerPlan::Conv(Conv3dPlan::new(
                    Conv3dShape::new(shape, c.filter_shape, c.params)?,
                    c.activation.clone(),
                )),
                Layer::MaxPool(m) => LayerPlan::MaxPool {
                    input: shape,
                    output: maxpool3d_shape(shape, m.kernel, m.stride)?,
                },
                Layer::Graph(g) => LayerPlan::Graph(g.plan(shape)?),
            };
            shape = plan.output();
            plans.push(plan);
        }
        Ok(ModelPlan {
            plans,
            input,
            output: shape,
            window: None,
            progress: None,
            feed: None,
        })
    }

    /// The model's fixed input spatial shape `[D, H, W]`, if it has one.
    pub fn fixed_roi(&self) -> Option<[usize; 3]> {
        let d = self.input_dims();
        if d.len() != 5 || d[2..].iter().any(|&v| v <= 0) {
            return None;
        }
        Some([d[2] as usize, d[3] as usize, d[4] as usize])
    }

    /// `request` over the model's defaults, checked.
    pub fn window_options(
        &self,
        request: &sliding::WindowRequest,
    ) -> Result<sliding::WindowOptions, sliding::WindowError> {
        request.or(&self.window_defaults).resolve(self.fixed_roi())
    }

    /// Plans a whole scan `[N, C, D, H, W]` in sliding windows, up to `lanes` network calls
    /// at once (the call's threads: see [`sliding::SlidingPlan::new`]).
    pub fn plan_sliding(
        &self,
        scan: [usize; 5],
        request: &sliding::WindowRequest,
        lanes: usize,
    ) -> Result<ModelPlan, sliding::PlanError> {
        let opts = self.window_options(request)?;
        let sp = sliding::SlidingPlan::new(self, scan, opts, lanes)?;
        Ok(ModelPlan {
            plans: sp.window_plan().plans.clone(),
            input: scan,
            output: sp.output,
            window: Some(std::sync::Arc::new(sp)),
            progress: None,
            feed: None,
        })
    }

    /// Receptive field of one output voxel, in input voxels `[d, h, w]`.
    pub fn receptive_field(&self) -> [usize; 3] {
        let mut rf = [1usize; 3];
        let mut jump = [1usize; 3];
        for l in &self.layers {
            for a in 0..3 {
                let (span, stride) = match l {
                    Layer::Conv(c) => (
                        (c.filter_shape[2 + a] - 1) * c.params.dilation[a],
                        c.params.stride[a],
                    ),
                    Layer::MaxPool(m) => (m.kernel[a] - 1, m.stride[a]),
                    // Not derived for graphs: reported as 0 (see output_shape_rule).
                    Layer::Graph(_) => return [0; 3],
                };
                rf[a] += span * jump[a];
                jump[a] *= stride;
            }
        }
        rf
    }

    /// How the output shape follows from the input shape, in words.
    pub fn output_shape_rule(&self) -> String {
        let mut parts = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            parts.push(match l {
                Layer::Conv(c) => {
                    let p = c.params;
                    format!(
                        "layer {i} conv3d: o = floor((x + 2*{:?} - {:?}*({:?} - 1) - 1) / {:?}) + 1 per [d,h,w]",
                        p.padding,
                        p.dilation,
                        [c.filter_shape[2], c.filter_shape[3], c.filter_shape[4]],
                        p.stride
                    )
                }
                Layer::MaxPool(m) => format!(
                    "layer {i} maxpool3d: o = floor((x - {:?}) / {:?}) + 1 per [d,h,w]",
                    m.kernel, m.stride
                ),
                Layer::Graph(g) => {
                    return format!(
                        "ONNX graph: input {:?} {:?} -> output {:?} {:?} (-1: dynamic; the output shape follows from the graph per input shape)",
                        g.input().name,
                        g.input().dims_i64(),
                        g.output().name,
                        g.output().dims_i64()
                    )
                }
            });
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
    /// FLOPs of all conv layers (direct-convolution count).
    pub fn flops(&self) -> f64 {
        if let Some(w) = &self.window {
            return w.flops();
        }
        self.plans
            .iter()
            .map(|p| match p {
                LayerPlan::Conv(c) => c.shape().flops(),
                LayerPlan::MaxPool { .. } => 0.0,
                LayerPlan::Graph(g) => g.flops(),
            })
            .sum()
    }

    pub fn output_len(&self) -> usize {
        self.output.iter().product()
    }

    /// The plan of layer `i` if it is a convolution.
    pub fn conv(&self, i: usize) -> Option<&Conv3dPlan> {
        match self.plans.get(i) {
            Some(LayerPlan::Conv(p)) => Some(p),
            _ => None,
        }
    }

    /// Peak bytes the run needs besides the caller's input: the largest pair of consecutive
    /// activations alive together, plus workspace; a last conv layer streams (ring only).
    pub fn working_bytes(&self, threads: usize) -> usize {
        if let Some(w) = &self.window {
            return w.working_bytes(threads);
        }
        self.layers_working_bytes(threads, true)
    }

    /// [`working_bytes`](Self::working_bytes) of a run in a caller's arena that releases
    /// free buffers too small for a request ([`run_whole`](Self::run_whole): a
    /// sliding-window lane), where a graph holds its largest live set, not more.
    pub fn lane_working_bytes(&self, threads: usize) -> usize {
        self.layers_working_bytes(threads, false)
    }

    fn layers_working_bytes(&self, threads: usize, kept_arena: bool) -> usize {
        let n = self.plans.len();
        let mut peak = 0usize;
        for (i, p) in self.plans.iter().enumerate() {
            let prev = if i == 0 {
                0
            } else {
                self.plans[i - 1].output_len() * 4
            };
            let here = match (p, i + 1 == n) {
                (LayerPlan::Conv(c), true) => c.streaming_workspace_bytes(threads),
                (LayerPlan::Conv(c), false) => p.output_len() * 4 + c.workspace_bytes(threads),
                (LayerPlan::MaxPool { .. }, _) => p.output_len() * 4,
                (LayerPlan::Graph(g), _) if kept_arena => g.working_bytes(threads),
                (LayerPlan::Graph(g), _) => g.live_working_bytes(threads),
            };
            peak = peak.max(prev + here);
        }
        peak
    }

    /// Runs every layer on `input`; the output goes to `on_slab` in order (slab by slab
    /// when the last layer is a convolution, as one slab after a final pooling). Between
    /// layers only the previous and the current activation are alive.
    pub fn run(
        &self,
        model: &Model,
        input: Vec<f32>,
        threads: usize,
        cancel: Option<&AtomicBool>,
        on_slab: &mut dyn FnMut(Slab<'_>) -> ControlFlow<()>,
    ) -> Result<Vec<LayerTiming>, KernelError> {
        self.run_into_sink(model, input, threads, cancel, Sink::Lent(on_slab))
    }

    /// Like [`run`](Self::run), but each slab of output is handed over in a buffer of its
    /// own (from `fresh`, see [`Conv3dPlan::run_slabs_owned`]).
    pub fn run_owned(
        &self,
        model: &Model,
        input: Vec<f32>,
        threads: usize,
        cancel: Option<&AtomicBool>,
        fresh: &mut dyn FnMut(usize) -> Vec<f32>,
        on_slab: &mut dyn FnMut(OwnedSlab) -> ControlFlow<()>,
    ) -> Result<Vec<LayerTiming>, KernelError> {
        self.run_into_sink(
            model,
            input,
            threads,
            cancel,
            Sink::Owned { fresh, on_slab },
        )
    }

    /// Like [`run`](Self::run), but the whole output is written into `output`
    /// (`[N, C_out, oD, oH, oW]`, every element overwritten), e.g. a client's shared memory.
    pub fn run_to(
        &self,
        model: &Model,
        input: Vec<f32>,
        threads: usize,
        cancel: Option<&AtomicBool>,
        output: &mut [f32],
    ) -> Result<Vec<LayerTiming>, KernelError> {
        if output.len() != self.output_len() {
            return Err(KernelError::BufferLength {
                what: "output",
                expected: self.output_len(),
                got: output.len(),
            });
        }
        self.run_into_sink(model, input, threads, cancel, Sink::Into(output))
    }

    /// Like [`run_to`](Self::run_to), but the whole output (`[N, C_out, oD, oH, oW]`) is
    /// handed over: an ONNX graph's own output buffer, with no buffer of the caller's and
    /// no copy (sliding windows: one window's prediction). A graph's buffers come from
    /// `arena` and go back to it, so a caller running window after window reuses them.
    pub fn run_whole(
        &self,
        model: &Model,
        input: Vec<f32>,
        threads: usize,
        cancel: Option<&AtomicBool>,
        arena: &mut graph::Arena,
    ) -> Result<(Vec<f32>, Vec<LayerTiming>), KernelError> {
        let mut out = Vec::new();
        let sink = Sink::Whole(&mut out, arena);
        let t = self.run_into_sink(model, input, threads, cancel, sink)?;
        Ok((out, t))
    }

    /// Bytes of the buffers [`run_owned`](Self::run_owned) hands over (one slab of the last
    /// layer, or one batch item of a final pooling).
    pub fn owned_slab_bytes(&self) -> usize {
        if let Some(w) = &self.window {
            return w.slab_bytes();
        }
        match self.plans.last() {
            Some(LayerPlan::Conv(c)) => c.slab_bytes(),
            _ => {
                let [_, c, od, oh, ow] = self.output;
                c * od * oh * ow * 4
            }
        }
    }

    fn run_into_sink(
        &self,
        model: &Model,
        input: Vec<f32>,
        threads: usize,
        cancel: Option<&AtomicBool>,
        mut sink: Sink<'_>,
    ) -> Result<Vec<LayerTiming>, KernelError> {
        if let Some(w) = &self.window {
            if let Sink::Whole(v, _) = &mut sink {
                v.clear();
                v.resize(self.output_len(), 0.0);
            }
            return self.run_window(w, model, input, threads, cancel, sink);
        }
        let mut timings = Vec::with_capacity(self.plans.len());
        let mut cur = input;
        let last = self.plans.len() - 1;
        for (i, (plan, layer)) in self.plans.iter().zip(&model.layers).enumerate() {
            let t0 = Instant::now();
            match (plan, layer) {
                (LayerPlan::Conv(p), Layer::Conv(c)) => {
                    let bias = c.bias.as_deref();
                    if i == last {
                        match &mut sink {
                            Sink::Lent(on_slab) => {
                                p.run_slabs(&cur, &c.weights, bias, threads, cancel, *on_slab)?
                            }
                            Sink::Owned { fresh, on_slab } => p.run_slabs_owned(
                                &cur, &c.weights, bias, threads, cancel, *fresh, *on_slab,
                            )?,
                            Sink::Into(out) => {
                                p.run_into(&cur, &c.weights, bias, out, threads, cancel)?
                            }
                            Sink::Whole(out, _) => {
                                out.clear();
                                out.resize(p.shape().output_len(), 0.0);
                                p.run_into(&cur, &c.weights, bias, out, threads, cancel)?
                            }
                        }
                    } else {
                        let mut out = vec![0f32; p.shape().output_len()];
                        p.run_into(&cur, &c.weights, bias, &mut out, threads, cancel)?;
                        cur = out;
                    }
                }
                (LayerPlan::Graph(g), Layer::Graph(_)) => {
                    let x = std::mem::take(&mut cur);
                    let (out, times) = match &mut sink {
                        Sink::Whole(_, arena) => g.run_in(x, threads, cancel, arena)?,
                        _ => g.run(x, threads, cancel)?,
                    };
                    cur = out;
                    if i == last {
                        self.emit_whole(&mut cur, &mut sink)?;
                        // Copied out (not handed over): the buffer goes back to the model's
                        // idle arena for the next run's output.
                        g.recycle(std::mem::take(&mut cur));
                    }
                    timings.extend(times.into_iter().map(|(strategy, ms)| LayerTiming {
                        strategy,
                        compute_ms: ms,
                        stages: Default::default(),
                    }));
                    continue;
                }
                (LayerPlan::MaxPool { input, output }, Layer::MaxPool(m)) => {
                    if cancel.is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed)) {
                        return Err(KernelError::Cancelled);
                    }
                    let mut out = maxpool3d(&cur, *input, m.kernel, m.stride)?;
                    if !m.activation.is_none() {
                        // Per channel plane (PReLU's slope is the channel's).
                        let [_, c, d, h, w] = *output;
                        for (i, plane) in out.chunks_mut((d * h * w).max(1)).enumerate() {
                            m.activation.channel(i % c.max(1)).bias_apply(plane, 0.0);
                        }
                    }
                    cur = out;
                    if i == last {
                        self.emit_whole(&mut cur, &mut sink)?;
                    }
                }
                _ => unreachable!("plans are built from the model's layers, in order"),
            }
            timings.push(LayerTiming {
                strategy: plan.strategy(),
                compute_ms: t0.elapsed().as_secs_f64() * 1e3,
                stages: match plan {
                    LayerPlan::Conv(p) => p.stage_times(),
                    LayerPlan::MaxPool { .. } | LayerPlan::Graph(_) => Default::default(),
                },
            });
        }
        Ok(timings)
    }

    /// A sliding-window run: finished slabs to the sink as they leave the ring.
    fn run_window(
        &self,
        w: &sliding::SlidingPlan,
        model: &Model,
        input: Vec<f32>,
        threads: usize,
        cancel: Option<&AtomicBool>,
        mut sink: Sink<'_>,
    ) -> Result<Vec<LayerTiming>, KernelError> {
        let progress = self.progress.as_ref().map(|p| &*p.0);
        let [_, k, d, h, wd] = self.output;
        let plane = h * wd;
        // A slab's rows into the whole output.
        let place = |out: &mut [f32], batch: usize, depth: std::ops::Range<usize>, data: &[f32]| {
            let rows = depth.len() * plane;
            for ch in 0..k {
                let at = ((batch * k + ch) * d + depth.start) * plane;
                out[at..at + rows].copy_from_slice(&data[ch * rows..(ch + 1) * rows]);
            }
            ControlFlow::Continue(())
        };
        let source = match &self.feed {
            Some(feed) => sliding::Source::Fed(feed),
            None => sliding::Source::Whole(&input),
        };
        w.run(
            model,
            source,
            threads,
            cancel,
            progress,
            &mut |batch, depth, data| match &mut sink {
                Sink::Lent(on_slab) => on_slab(Slab { batch, depth, data }),
                Sink::Owned { fresh, on_slab } => {
                    let mut buf = fresh(data.len());
                    buf.resize(data.len(), 0.0);
                    buf.copy_from_slice(data);
                    on_slab(OwnedSlab {
                        batch,
                        depth,
                        data: buf,
                    })
                }
                Sink::Into(out) => place(out, batch, depth, data),
                Sink::Whole(out, _) => place(out, batch, depth, data),
            },
        )
    }

    /// Hands a whole computed output to the sink: moved out of `cur` for a whole-output
    /// sink, copied into the caller's buffer, or one slab per batch item (`[C, oD, oH, oW]`
    /// is contiguous there).
    fn emit_whole(&self, cur: &mut Vec<f32>, sink: &mut Sink<'_>) -> Result<(), KernelError> {
        match sink {
            Sink::Into(out) => {
                out.copy_from_slice(cur);
                return Ok(());
            }
            Sink::Whole(out, _) => {
                **out = std::mem::take(cur);
                return Ok(());
            }
            Sink::Lent(_) | Sink::Owned { .. } => {}
        }
        let [n, c, od, oh, ow] = self.output;
        for (b, item) in cur.chunks_exact(c * od * oh * ow).enumerate().take(n) {
            let flow = match sink {
                Sink::Lent(on_slab) => on_slab(Slab {
                    batch: b,
                    depth: 0..od,
                    data: item,
                }),
                Sink::Into(_) | Sink::Whole(..) => ControlFlow::Continue(()),
                Sink::Owned { fresh, on_slab } => {
                    let mut data = fresh(item.len());
                    data.resize(item.len(), 0.0);
                    data.copy_from_slice(item);
                    on_slab(OwnedSlab {
                        batch: b,
                        depth: 0..od,
                        data,
                    })
                }
            };
            if flow.is_break() {
                return Err(KernelError::Cancelled);
            }
        }
        Ok(())
    }
}

/// Where [`ModelPlan`]'s output goes: slabs lent from the kernel's ring, handed over, or
/// written into the caller's buffer.
enum Sink<'s> {
    Lent(&'s mut dyn FnMut(Slab<'_>) -> ControlFlow<()>),
    Into(&'s mut [f32]),
    /// The whole output in a buffer handed over (a graph's own output buffer, not a copy);
    /// a graph takes its buffers from the arena and gives them back.
    Whole(&'s mut Vec<f32>, &'s mut graph::Arena),
    Owned {
        fresh: &'s mut dyn FnMut(usize) -> Vec<f32>,
        on_slab: &'s mut dyn FnMut(OwnedSlab) -> ControlFlow<()>,
    },
}

/// The models a server offers, by name, and the ones that failed to load (with why).
#[derive(Clone, Debug, Default)]
pub struct ModelSet {
    models: std::collections::BTreeMap<String, std::sync::Arc<Model>>,
    broken: std::collections::BTreeMap<String, String>,
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
        self.insert_arc(std::sync::Arc::new(model));
    }

    pub fn insert_arc(&mut self, model: std::sync::Arc<Model>) {
        self.models.insert(model.name.clone(), model);
    }

    /// Records a model that failed to load.
    pub fn insert_broken(&mut self, name: &str, error: String) {
        self.broken.insert(name.to_string(), error);
    }

    /// Models that failed to load, with the error.
    pub fn broken(&self) -> impl Iterator<Item = (&String, &String)> {
        self.broken.iter()
    }

    /// The load error of `name`, if its last load failed.
    pub fn error(&self, name: &str) -> Option<&String> {
        self.broken.get(name)
    }

    pub fn get(&self, name: &str) -> Option<std::sync::Arc<Model>> {
        self.models.get(name).cloned()
    }

    pub fn iter(&self) -> impl Iterator<Item = &std::sync::Arc<Model>> {
        self.models.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv(c_in: usize, c_out: usize, seed: u64) -> Layer {
        Layer::Conv(ConvLayer {
            filter_shape: [c_out, c_in, 3, 3, 3],
            weights: crate::kernel::seeded(c_out * c_in * 27, seed),
            bias: Some(crate::kernel::seeded(c_out, seed + 1)),
            params: Conv3dParams {
                padding: [1; 3],
                ..Conv3dParams::default()
            },
            activation: Activation::Relu,
        })
    }

    /// Guards `run_to` (output computed in place, e.g. into server-created shared memory):
    /// for a last convolution and a last pooling, on a batch of two and odd sizes, it writes
    /// every element of a NaN-prefilled buffer with what the slab-by-slab `run` gives.
    #[test]
    fn run_to_writes_the_same_output_as_run() {
        let pool = Layer::MaxPool(MaxPoolLayer {
            kernel: [2; 3],
            stride: [2; 3],
            activation: Activation::None,
        });
        let shape = [2, 2, 9, 7, 11];
        for layers in [
            vec![conv(2, 5, 1)],
            vec![conv(2, 3, 3), conv(3, 4, 5)],
            vec![conv(2, 3, 7), pool],
        ] {
            let model = Model {
                name: "t".into(),
                description: String::new(),
                layers,
                window_defaults: Default::default(),
            };
            let plan = model.plan(shape).unwrap();
            let x = crate::kernel::seeded(shape.iter().product(), 9);
            let [_, c_out, od, oh, ow] = plan.output;
            let mut want = vec![f32::NAN; plan.output_len()];
            plan.run(&model, x.clone(), 2, None, &mut |s| {
                let per = s.depth.len() * oh * ow;
                for c in 0..c_out {
                    let at = ((s.batch * c_out + c) * od + s.depth.start) * oh * ow;
                    want[at..at + per].copy_from_slice(&s.data[c * per..(c + 1) * per]);
                }
                ControlFlow::Continue(())
            })
            .unwrap();
            let mut got = vec![f32::NAN; plan.output_len()];
            plan.run_to(&model, x.clone(), 2, None, &mut got).unwrap();
            assert!(want.iter().all(|v| !v.is_nan()));
            assert_eq!(got, want, "{} layers", model.layers.len());
            let mut short = vec![0f32; plan.output_len() - 1];
            assert!(plan.run_to(&model, x, 1, None, &mut short).is_err());
        }
    }
}
