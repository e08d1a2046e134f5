//! The graph IR: nodes of the ops we execute over named values, as a front end (ONNX)
//! produces them, and its execution plan per input shape.
//!
//! Planning ([`Graph::plan`]) walks the nodes in topological order with the concrete input
//! shape: a node whose inputs are all known constants (the shape plumbing of an export:
//! `Shape`, `Gather`, `Concat` of sizes, `Reshape` targets…) is evaluated then and there; every
//! other node becomes a [`Step`] with its output shape checked. Convolutions get their kernel
//! plan, an activation right after a convolution (its only consumer) is fused into it, and
//! each intermediate buffer is freed after its last reader (the peak is reported by
//! [`GraphPlan::working_bytes`]). Execution is deterministic: the same bits at any thread
//! count.

pub mod eval;
pub mod tensor;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::kernel::ops::{PadMode, Pool3d, ResizeMode};
use crate::kernel::transpose::{ConvTranspose3dParams, ConvTranspose3dPlan, ConvTranspose3dShape};
use crate::kernel::{
    Activation, Conv3dParams, Conv3dPlan, Conv3dShape, Filters, KernelError, PackedFilters,
};
use tensor::{BinOp, Const, Elem, Tensor};

/// Elementwise functions of one input.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Unary {
    Relu,
    LeakyRelu(f32),
    Elu(f32),
    Sigmoid,
    Tanh,
    Exp,
    Log,
    Sqrt,
    Neg,
    Abs,
    Reciprocal,
    Erf,
    Floor,
    Ceil,
}

/// Convolution attributes (3-D, ONNX semantics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvAttr {
    pub strides: [usize; 3],
    /// `[d_begin, h_begin, w_begin, d_end, h_end, w_end]`.
    pub pads: [usize; 6],
    pub dilations: [usize; 3],
    pub auto_pad: AutoPad,
}

/// ONNX `auto_pad`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AutoPad {
    NotSet,
    Valid,
    SameUpper,
    SameLower,
}

/// An op with its attributes parsed and checked.
#[derive(Clone, Debug)]
pub enum Op {
    Conv(ConvAttr),
    ConvTranspose {
        attr: ConvAttr,
        output_padding: [usize; 3],
        output_shape: Option<[usize; 3]>,
    },
    BatchNorm {
        eps: f32,
    },
    /// `act`: an activation fused after the normalisation (its only reader).
    InstanceNorm {
        eps: f32,
        act: Option<Activation>,
    },
    /// `per_group_affine`: opset 18's scale/bias per group (opset 21: per channel).
    /// `act`: an activation fused after it (planning only: the decomposed GroupNorm that
    /// PyTorch exports is fused back into this op, its Relu with it).
    GroupNorm {
        eps: f32,
        groups: usize,
        per_group_affine: bool,
        act: Option<Activation>,
    },
    Unary(Unary),
    Binary(BinOp),
    Clip,
    Softmax {
        axis: i64,
    },
    Concat {
        axis: i64,
    },
    MaxPool(Pool3d),
    AveragePool {
        pool: Pool3d,
        count_include_pad: bool,
    },
    GlobalAveragePool,
    Resize {
        mode: ResizeMode,
        coord: crate::kernel::ops::CoordMode,
    },
    Pad {
        mode: PadMode,
    },
    Identity,
    Flatten {
        axis: i64,
    },
    Reshape {
        allowzero: bool,
    },
    Shape {
        start: i64,
        end: Option<i64>,
    },
    Size,
    Gather {
        axis: i64,
    },
    Slice,
    Transpose {
        perm: Option<Vec<i64>>,
    },
    Cast {
        to: Elem,
    },
    Constant(Const),
    ConstantOfShape(Const),
    Unsqueeze,
    Squeeze,
    Expand,
    Where,
    Range,
    Not,
    ReduceMean {
        axes: Option<Vec<i64>>,
        keepdims: bool,
    },
}

impl Op {
    /// Whether evaluation takes its first input and writes the result into it (so a lent
    /// first input is copied first).
    fn updates_first_input(&self) -> bool {
        matches!(
            self,
            Op::BatchNorm { .. }
                | Op::InstanceNorm { .. }
                | Op::GroupNorm { .. }
                | Op::Unary(_)
                | Op::Binary(_)
                | Op::Clip
                | Op::Softmax { .. }
                | Op::Identity
                | Op::Flatten { .. }
                | Op::Reshape { .. }
                | Op::Unsqueeze
                | Op::Squeeze
        )
    }

    /// The name in plans, timings and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Conv(_) => "Conv",
            Op::ConvTranspose { .. } => "ConvTranspose",
            Op::BatchNorm { .. } => "BatchNormalization",
            Op::InstanceNorm { .. } => "InstanceNormalization",
            Op::GroupNorm { .. } => "GroupNormalization",
            Op::Unary(u) => match u {
                Unary::Relu => "Relu",
                Unary::LeakyRelu(_) => "LeakyRelu",
                Unary::Elu(_) => "Elu",
                Unary::Sigmoid => "Sigmoid",
                Unary::Tanh => "Tanh",
                Unary::Exp => "Exp",
                Unary::Log => "Log",
                Unary::Sqrt => "Sqrt",
                Unary::Neg => "Neg",
                Unary::Abs => "Abs",
                Unary::Reciprocal => "Reciprocal",
                Unary::Erf => "Erf",
                Unary::Floor => "Floor",
                Unary::Ceil => "Ceil",
            },
            Op::Binary(b) => match b {
                BinOp::Add => "Add",
                BinOp::Sub => "Sub",
                BinOp::Mul => "Mul",
                BinOp::Div => "Div",
                BinOp::Pow => "Pow",
                BinOp::Equal => "Equal",
                BinOp::Less => "Less",
                BinOp::Greater => "Greater",
                BinOp::PRelu => "PRelu",
            },
            Op::Clip => "Clip",
            Op::Softmax { .. } => "Softmax",
            Op::Concat { .. } => "Concat",
            Op::MaxPool(_) => "MaxPool",
            Op::AveragePool { .. } => "AveragePool",
            Op::GlobalAveragePool => "GlobalAveragePool",
            Op::Resize { .. } => "Resize",
            Op::Pad { .. } => "Pad",
            Op::Identity => "Identity",
            Op::Flatten { .. } => "Flatten",
            Op::Reshape { .. } => "Reshape",
            Op::Shape { .. } => "Shape",
            Op::Size => "Size",
            Op::Gather { .. } => "Gather",
            Op::Slice => "Slice",
            Op::Transpose { .. } => "Transpose",
            Op::Cast { .. } => "Cast",
            Op::Constant(_) => "Constant",
            Op::ConstantOfShape(_) => "ConstantOfShape",
            Op::Unsqueeze => "Unsqueeze",
            Op::Squeeze => "Squeeze",
            Op::Expand => "Expand",
            Op::Where => "Where",
            Op::Range => "Range",
            Op::Not => "Not",
            Op::ReduceMean { .. } => "ReduceMean",
        }
    }
}

/// One node: op, input value names (`""` = an omitted optional input), output names.
#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    pub op: Op,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
}

/// A graph input or output: name, element type, dims (`None` = dynamic).
#[derive(Clone, Debug, PartialEq)]
pub struct IoInfo {
    pub name: String,
    pub elem: Elem,
    pub dims: Vec<Option<usize>>,
}

impl IoInfo {
    /// Dims with -1 for dynamic ones (KServe's convention).
    pub fn dims_i64(&self) -> Vec<i64> {
        self.dims
            .iter()
            .map(|d| d.map_or(-1, |v| v as i64))
            .collect()
    }
}

/// Largest constant computed while planning (elements).
const MAX_FOLDED: usize = 1 << 26;

/// Plans kept per graph (most recent input shapes).
const PLAN_CACHE: usize = 4;

/// A network: nodes in topological order over named values, the constants (initializers),
/// inputs and outputs.
#[derive(Debug)]
pub struct Graph {
    pub inputs: Vec<IoInfo>,
    pub outputs: Vec<IoInfo>,
    pub nodes: Vec<Node>,
    pub constants: HashMap<String, Const>,
    cache: Mutex<Vec<([usize; 5], Arc<GraphPlan>)>>,
    /// The idle arena of the last run of any of its plans ([`GraphPlan::run`]).
    spare: Arc<IdleArena>,
}

/// Where a step reads a value.
#[derive(Clone, Debug)]
enum Arg {
    Slot(usize),
    Const(Const),
}

/// How a step computes.
#[derive(Debug)]
enum Kind {
    Conv {
        plan: Box<Conv3dPlan>,
        weights: Const,
        /// `weights` packed for the plan, once per graph plan (not per run).
        packed: Option<PackedFilters>,
        bias: Option<Const>,
        /// Explicit zero padding before the convolution (asymmetric or SAME pads).
        prepad: Option<([usize; 3], [usize; 3])>,
        /// An InstanceNormalization fused after it (its only reader, constant scale and
        /// bias): the convolution gathers each channel's statistics while its tiles are
        /// hot, and the normalization (and its fused activation) is one more pass.
        norm: Option<FusedNorm>,
    },
    ConvTranspose(Box<ConvTranspose3dPlan>),
    Eval(Op),
}

/// An InstanceNormalization fused into the convolution before it.
#[derive(Debug)]
struct FusedNorm {
    eps: f32,
    scale: Vec<f32>,
    bias: Vec<f32>,
    act: Option<Activation>,
}

/// One node of the plan.
#[derive(Debug)]
pub struct Step {
    node: usize,
    kind: Kind,
    args: Vec<Option<Arg>>,
    out: usize,
    out_shape: Vec<usize>,
    /// Slots whose last reader this is (dropped after it).
    free: Vec<usize>,
}

/// A graph planned for one input shape.
#[derive(Debug)]
pub struct GraphPlan {
    steps: Vec<Step>,
    slots: usize,
    input: [usize; 5],
    output: Arg,
    pub output_shape: [usize; 5],
    names: Vec<(String, &'static str)>,
    /// The graph's idle arena (shared by all its plans: one per model at most), kept from
    /// the last run for the next.
    spare: Arc<IdleArena>,
}

/// A planned value: a constant known now, or a buffer computed at run time.
#[derive(Clone, Debug)]
enum Val {
    Const(Const),
    Slot {
        slot: usize,
        shape: Vec<usize>,
        elem: Elem,
        /// The step producing it, if a convolution (an activation may be fused into it).
        fuse_into: Option<usize>,
    },
}

fn node_err(node: &Node, reason: impl Into<String>) -> KernelError {
    KernelError::Invalid {
        what: format!("node {:?} ({})", node.name, node.op.name()),
        reason: reason.into(),
    }
}

impl Graph {
    pub fn new(
        inputs: Vec<IoInfo>,
        outputs: Vec<IoInfo>,
        nodes: Vec<Node>,
        constants: HashMap<String, Const>,
    ) -> Self {
        Self {
            inputs,
            outputs,
            nodes,
            constants,
            cache: Mutex::new(Vec::new()),
            spare: Arc::default(),
        }
    }

    /// Bytes held by the graph's idle arena (kept from the last run of any of its plans for
    /// the next; at most what one run needed).
    pub fn idle_arena_bytes(&self) -> usize {
        let spare = self.spare.0.lock().unwrap_or_else(|e| e.into_inner());
        spare.as_ref().map_or(0, Arena::held_bytes)
    }

    /// The first input (voxconv.v1 and the CLI use it).
    pub fn input(&self) -> &IoInfo {
        &self.inputs[0]
    }

    pub fn output(&self) -> &IoInfo {
        &self.outputs[0]
    }

    /// The input shape the graph fixes, if it fixes every dimension.
    pub fn declared_input(&self) -> Option<[usize; 5]> {
        let d: Vec<usize> = self.input().dims.iter().copied().collect::<Option<_>>()?;
        d.try_into().ok()
    }

    /// `op:count` of the nodes, most frequent first.
    pub fn op_counts(&self) -> String {
        let mut counts: Vec<(&'static str, usize)> = Vec::new();
        for n in &self.nodes {
            match counts.iter_mut().find(|(o, _)| *o == n.op.name()) {
                Some(c) => c.1 += 1,
                None => counts.push((n.op.name(), 1)),
            }
        }
        counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        counts
            .iter()
            .map(|(o, c)| format!("{o}:{c}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The plan for `input` (`[N, C, D, H, W]`), from the cache or made now.
    pub fn plan(&self, input: [usize; 5]) -> Result<Arc<GraphPlan>, KernelError> {
        {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((_, p)) = cache.iter().find(|(s, _)| *s == input) {
                return Ok(Arc::clone(p));
            }
        }
        let plan = Arc::new(self.make_plan(input)?);
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= PLAN_CACHE {
            cache.remove(0);
        }
        cache.push((input, Arc::clone(&plan)));
        Ok(plan)
    }

    fn make_plan(&self, input: [usize; 5]) -> Result<GraphPlan, KernelError> {
        let io = self.input();
        let field = |reason: String| KernelError::Invalid {
            what: format!("input {:?}", io.name),
            reason,
        };
        if io.dims.len() != 5 {
            return Err(field(format!(
                "the model's input has rank {}, voxconv takes [N, C, D, H, W]",
                io.dims.len()
            )));
        }
        for (i, (want, got)) in io.dims.iter().zip(input).enumerate() {
            if let Some(w) = want {
                if *w != got {
                    return Err(field(format!(
                        "dimension {i} ({}) must be {w} for this model (its graph fixes it), got {got}; shape {:?}",
                        ["N", "C", "D", "H", "W"][i],
                        io.dims_i64()
                    )));
                }
            }
            if got == 0 {
                return Err(field(format!("dimension {i} must be at least 1, got 0")));
            }
        }
        // How many readers each value has (graph outputs count as one).
        let mut readers: HashMap<&str, usize> = HashMap::new();
        for n in &self.nodes {
            for i in n.inputs.iter().filter(|i| !i.is_empty()) {
                *readers.entry(i.as_str()).or_default() += 1;
            }
        }
        for o in &self.outputs {
            *readers.entry(o.name.as_str()).or_default() += 1;
        }
        let mut vals: HashMap<String, Val> = HashMap::new();
        for (k, v) in &self.constants {
            vals.insert(k.clone(), Val::Const(Arc::clone(v)));
        }
        vals.insert(
            io.name.clone(),
            Val::Slot {
                slot: 0,
                shape: input.to_vec(),
                elem: Elem::F32,
                fuse_into: None,
            },
        );
        let mut slots = 1usize;
        let mut steps: Vec<Step> = Vec::new();
        for (ni, node) in self.nodes.iter().enumerate() {
            let ins: Vec<Option<Val>> =
                node.inputs
                    .iter()
                    .map(|i| {
                        if i.is_empty() {
                            Ok(None)
                        } else {
                            vals.get(i).cloned().map(Some).ok_or_else(|| {
                                node_err(node, format!("input {i:?} is never produced"))
                            })
                        }
                    })
                    .collect::<Result<_, _>>()?;
            let all_const = ins.iter().all(|v| matches!(v, None | Some(Val::Const(_))));
            // Constant folding: shape plumbing and anything else whose inputs are known.
            if all_const && !matches!(node.op, Op::Conv(_) | Op::ConvTranspose { .. }) {
                // A folded constant is bounded before it is computed (a file may ask for an
                // Expand to 2^40 elements).
                let infos = infos(&ins);
                if let Ok((shape, _)) = eval::infer(&node.op, &infos) {
                    if tensor::numel(&shape).map_or(true, |n| n > MAX_FOLDED) {
                        return Err(node_err(
                            node,
                            format!("a constant of shape {shape:?} is larger than the {MAX_FOLDED} elements allowed"),
                        ));
                    }
                }
                let consts: Vec<Option<Cow<'_, Tensor>>> = ins
                    .iter()
                    .map(|v| match v {
                        Some(Val::Const(c)) => Some(Cow::Borrowed(&**c)),
                        _ => None,
                    })
                    .collect();
                let outs = eval::eval(&node.op, consts, 1).map_err(|e| node_err(node, e))?;
                for (name, t) in node.outputs.iter().zip(outs) {
                    vals.insert(name.clone(), Val::Const(Arc::new(t)));
                }
                continue;
            }
            if let Op::Shape { start, end } = node.op {
                let Some(Some(Val::Slot { shape, .. })) = ins.first() else {
                    return Err(node_err(node, "Shape needs an input"));
                };
                let t = eval::shape_of(shape, start, end);
                vals.insert(node.outputs[0].clone(), Val::Const(Arc::new(t)));
                continue;
            }
            // A fused activation: the conv's (or norm's) output has this node as its only
            // reader.
            if let Some(Some(Val::Slot {
                fuse_into: Some(si),
                slot,
                shape,
                elem,
            })) = ins.first()
            {
                let act = fusable_activation(&node.op, &ins, shape);
                let single = readers.get(node.inputs[0].as_str()) == Some(&1);
                let fused = match (&mut steps[*si].kind, single, act) {
                    (
                        Kind::Conv {
                            plan, norm: None, ..
                        },
                        true,
                        Some(act),
                    ) if plan.activation().is_none() => {
                        **plan = Conv3dPlan::new(*plan.shape(), act);
                        true
                    }
                    (
                        Kind::Conv {
                            norm: Some(FusedNorm { act: a @ None, .. }),
                            ..
                        },
                        true,
                        Some(act),
                    ) => {
                        *a = Some(act);
                        true
                    }
                    (Kind::Eval(Op::InstanceNorm { act: a @ None, .. }), true, Some(act)) => {
                        *a = Some(act);
                        true
                    }
                    _ => false,
                };
                {
                    if fused {
                        vals.insert(
                            node.outputs[0].clone(),
                            Val::Slot {
                                slot: *slot,
                                shape: shape.clone(),
                                elem: *elem,
                                fuse_into: None,
                            },
                        );
                        continue;
                    }
                }
            }
            // An InstanceNormalization reading only a convolution's output, with constant
            // per-channel scale and bias: fused into the convolution.
            if let (
                Op::InstanceNorm { eps, act: None },
                Some(Some(Val::Slot {
                    fuse_into: Some(si),
                    slot,
                    shape,
                    elem,
                })),
            ) = (&node.op, ins.first())
            {
                let per_channel = |v: Option<&Option<Val>>| match v {
                    Some(Some(Val::Const(t))) => t
                        .as_f32()
                        .ok()
                        .filter(|v| shape.len() == 5 && v.len() == shape[1])
                        .map(<[f32]>::to_vec),
                    _ => None,
                };
                // A bad epsilon stays an InstanceNormalization step (its error names it).
                let single = readers.get(node.inputs[0].as_str()) == Some(&1)
                    && eps.is_finite()
                    && *eps >= 0.0;
                if let (Some(scale), Some(bias), true) =
                    (per_channel(ins.get(1)), per_channel(ins.get(2)), single)
                {
                    if let Kind::Conv {
                        plan,
                        norm: n @ None,
                        ..
                    } = &mut steps[*si].kind
                    {
                        if plan.activation().is_none() {
                            *n = Some(FusedNorm {
                                eps: *eps,
                                scale,
                                bias,
                                act: None,
                            });
                            vals.insert(
                                node.outputs[0].clone(),
                                Val::Slot {
                                    slot: *slot,
                                    shape: shape.clone(),
                                    elem: *elem,
                                    fuse_into: Some(*si),
                                },
                            );
                            continue;
                        }
                    }
                }
            }
            let (kind, shape, elem) = plan_node(node, &ins)?;
            let args = ins
                .iter()
                .map(|v| {
                    v.as_ref().map(|v| match v {
                        Val::Const(c) => Arg::Const(Arc::clone(c)),
                        Val::Slot { slot, .. } => Arg::Slot(*slot),
                    })
                })
                .collect();
            let fusable = matches!(
                kind,
                Kind::Conv { .. } | Kind::Eval(Op::InstanceNorm { act: None, .. })
            );
            steps.push(Step {
                node: ni,
                kind,
                args,
                out: slots,
                out_shape: shape.clone(),
                free: Vec::new(),
            });
            if node.outputs.len() > 1 && node.outputs[1..].iter().any(|o| !o.is_empty()) {
                // Dropout's mask, BatchNorm's training outputs: not produced at inference.
                for o in node.outputs[1..].iter().filter(|o| !o.is_empty()) {
                    if readers.contains_key(o.as_str()) {
                        return Err(node_err(
                            node,
                            format!("output {o:?} is not computed at inference"),
                        ));
                    }
                }
            }
            vals.insert(
                node.outputs[0].clone(),
                Val::Slot {
                    slot: slots,
                    shape,
                    elem,
                    fuse_into: fusable.then_some(steps.len() - 1),
                },
            );
            slots += 1;
        }
        let out_io = self.output();
        let output = match vals.get(&out_io.name) {
            Some(Val::Slot {
                slot, shape, elem, ..
            }) => {
                if *elem != Elem::F32 {
                    return Err(KernelError::Invalid {
                        what: format!("output {:?}", out_io.name),
                        reason: format!(
                            "voxconv returns float32 outputs, the graph gives {}",
                            elem.name()
                        ),
                    });
                }
                (Arg::Slot(*slot), shape.clone())
            }
            Some(Val::Const(c)) => (Arg::Const(Arc::clone(c)), c.shape.clone()),
            None => {
                return Err(KernelError::Invalid {
                    what: format!("output {:?}", out_io.name),
                    reason: "no node produces it".into(),
                })
            }
        };
        let output_shape: [usize; 5] =
            output
                .1
                .as_slice()
                .try_into()
                .map_err(|_| KernelError::Invalid {
                    what: format!("output {:?}", out_io.name),
                    reason: format!(
                        "voxconv returns [N, C, D, H, W] outputs, the graph gives shape {:?}",
                        output.1
                    ),
                })?;
        let out_slot = match &output.0 {
            Arg::Slot(s) => Some(*s),
            Arg::Const(_) => None,
        };
        fuse_group_norms(&mut steps, input, out_slot);
        // Liveness: each slot is freed after its last reader (the output slot never).
        let mut last: HashMap<usize, usize> = HashMap::new();
        for (si, s) in steps.iter().enumerate() {
            for a in s.args.iter().flatten() {
                if let Arg::Slot(x) = a {
                    last.insert(*x, si);
                }
            }
        }
        let out_slot = match output.0 {
            Arg::Slot(s) => Some(s),
            Arg::Const(_) => None,
        };
        for (slot, si) in last {
            if Some(slot) != out_slot {
                steps[si].free.push(slot);
            }
        }
        // Filters packed once, now that every plan (activations fused) is final.
        for s in &mut steps {
            if let Kind::Conv {
                plan,
                weights,
                packed,
                ..
            } = &mut s.kind
            {
                let w = weights.as_f32().map_err(|e| KernelError::Invalid {
                    what: "convolution weights".into(),
                    reason: e,
                })?;
                *packed = Some(plan.pack_filters(w)?);
            }
        }
        let names = self
            .nodes
            .iter()
            .map(|n| (n.name.clone(), n.op.name()))
            .collect();
        Ok(GraphPlan {
            steps,
            slots,
            input,
            output: output.0,
            output_shape,
            names,
            spare: Arc::clone(&self.spare),
        })
    }
}

/// The per-channel values of a constant that broadcasts along the channel axis of a
/// `[N, C, …]` value of rank `rank` (shape `[C, 1, …]`, `[1, C, 1, …]` or a scalar).
/// The kernel activation `op` computes from its first input (of shape `shape`, channels on
/// axis 1), if one can be fused into the step producing that input: Relu, LeakyRelu,
/// Sigmoid, Elu, and PRelu whose slope is a constant per channel (or a scalar).
fn fusable_activation(op: &Op, ins: &[Option<Val>], shape: &[usize]) -> Option<Activation> {
    match op {
        Op::Unary(u) => unary_activation(*u),
        Op::Binary(BinOp::PRelu) => {
            let Some(Some(Val::Const(slope))) = ins.get(1) else {
                return None;
            };
            let c = *shape.get(1)?;
            let slopes = channel_values(slope, c, shape.len())?;
            Some(Activation::PRelu(slopes.into()))
        }
        _ => None,
    }
}

/// The kernel activation of an elementwise op, where there is one.
fn unary_activation(u: Unary) -> Option<Activation> {
    match u {
        Unary::Relu => Some(Activation::Relu),
        Unary::LeakyRelu(a) => Some(Activation::LeakyRelu(a)),
        Unary::Sigmoid => Some(Activation::Sigmoid),
        Unary::Elu(a) => Some(Activation::Elu(a)),
        _ => None,
    }
}

fn channel_values(c: &Const, channels: usize, rank: usize) -> Option<Vec<f32>> {
    let v = c.as_f32().ok()?;
    if v.len() == 1 {
        return Some(vec![v[0]; channels]);
    }
    if c.shape.len() > rank || v.len() != channels {
        return None;
    }
    let mut dims = vec![1usize; rank - c.shape.len()];
    dims.extend_from_slice(&c.shape);
    (dims[1] == channels && dims.iter().enumerate().all(|(i, &d)| i == 1 || d == 1))
        .then_some(v.to_vec())
}

/// Fuses PyTorch's exported GroupNorm, `Reshape [N, G, −1] → InstanceNormalization →
/// Reshape back → Mul γ → Add β` (SegResNet's), and a Relu / LeakyRelu / Sigmoid after it,
/// into one GroupNorm step: one pass for the statistics and one that normalises, scales,
/// shifts and activates (was five passes and a copy). Each intermediate must have the next
/// step as its only reader; γ, β per channel (or scalars), the norm's own scale and bias per
/// group folded into them.
fn fuse_group_norms(steps: &mut Vec<Step>, input: [usize; 5], out_slot: Option<usize>) {
    let mut readers: HashMap<usize, usize> = HashMap::new();
    for s in steps.iter() {
        for a in s.args.iter().flatten() {
            if let Arg::Slot(x) = a {
                *readers.entry(*x).or_default() += 1;
            }
        }
    }
    if let Some(o) = out_slot {
        *readers.entry(o).or_default() += 1;
    }
    let mut shapes: HashMap<usize, Vec<usize>> = HashMap::new();
    shapes.insert(0, input.to_vec());
    for s in steps.iter() {
        shapes.insert(s.out, s.out_shape.clone());
    }
    // The step reading `slot`, when it is the only reader.
    let sole_reader = |steps: &[Step], slot: usize, from: usize| -> Option<usize> {
        if readers.get(&slot) != Some(&1) {
            return None;
        }
        (from..steps.len()).find(|&j| {
            steps[j]
                .args
                .iter()
                .flatten()
                .any(|a| matches!(a, Arg::Slot(x) if *x == slot))
        })
    };
    let slot_arg = |s: &Step, i: usize| match s.args.get(i) {
        Some(Some(Arg::Slot(x))) => Some(*x),
        _ => None,
    };
    // (step, const operand) of a binary step with one slot operand and one constant.
    let bin_const = |s: &Step, op: BinOp, slot: usize| -> Option<Const> {
        if !matches!(&s.kind, Kind::Eval(Op::Binary(b)) if *b == op) || s.args.len() != 2 {
            return None;
        }
        match (&s.args[0], &s.args[1]) {
            (Some(Arg::Slot(x)), Some(Arg::Const(c)))
            | (Some(Arg::Const(c)), Some(Arg::Slot(x)))
                if *x == slot =>
            {
                Some(Arc::clone(c))
            }
            _ => None,
        }
    };
    let mut i = 0;
    while i < steps.len() {
        let fused = (|| {
            let s1 = &steps[i];
            if !matches!(s1.kind, Kind::Eval(Op::Reshape { .. })) {
                return None;
            }
            let x = slot_arg(s1, 0)?;
            let xs = shapes.get(&x)?.clone();
            if xs.len() < 3 || s1.out_shape.len() != 3 || s1.out_shape[0] != xs[0] {
                return None;
            }
            let (c, groups) = (xs[1], s1.out_shape[1]);
            if groups == 0 || c % groups != 0 {
                return None;
            }
            let j2 = sole_reader(steps, s1.out, i + 1)?;
            let Kind::Eval(Op::InstanceNorm { eps, act: None }) = steps[j2].kind else {
                return None;
            };
            let (Some(Some(Arg::Const(gs))), Some(Some(Arg::Const(gb)))) =
                (steps[j2].args.get(1), steps[j2].args.get(2))
            else {
                return None;
            };
            let (gs, gb) = (gs.as_f32().ok()?, gb.as_f32().ok()?);
            if gs.len() != groups || gb.len() != groups || slot_arg(&steps[j2], 0)? != s1.out {
                return None;
            }
            let j3 = sole_reader(steps, steps[j2].out, j2 + 1)?;
            if !matches!(steps[j3].kind, Kind::Eval(Op::Reshape { .. }))
                || steps[j3].out_shape != xs
                || slot_arg(&steps[j3], 0)? != steps[j2].out
            {
                return None;
            }
            let j4 = sole_reader(steps, steps[j3].out, j3 + 1)?;
            let gamma = bin_const(&steps[j4], BinOp::Mul, steps[j3].out)?;
            let j5 = sole_reader(steps, steps[j4].out, j4 + 1)?;
            let beta = bin_const(&steps[j5], BinOp::Add, steps[j4].out)?;
            let (gamma, beta) = (
                channel_values(&gamma, c, xs.len())?,
                channel_values(&beta, c, xs.len())?,
            );
            if steps[j4].out_shape != xs || steps[j5].out_shape != xs {
                return None;
            }
            // γ_c·(s_g·x̂ + b_g) + β_c = (γ_c·s_g)·x̂ + (γ_c·b_g + β_c).
            let per = c / groups;
            let scale: Vec<f32> = (0..c).map(|ch| gamma[ch] * gs[ch / per]).collect();
            let bias: Vec<f32> = (0..c)
                .map(|ch| gamma[ch] * gb[ch / per] + beta[ch])
                .collect();
            // An activation reading only the Add's output goes with it.
            let mut last = j5;
            let mut act = None;
            if let Some(j6) = sole_reader(steps, steps[j5].out, j5 + 1) {
                if let Kind::Eval(Op::Unary(u)) = steps[j6].kind {
                    if slot_arg(&steps[j6], 0) == Some(steps[j5].out) && steps[j6].args.len() == 1 {
                        act = unary_activation(u);
                        if act.is_some() {
                            last = j6;
                        }
                    }
                }
            }
            let cshape = vec![c];
            Some((
                [i, j2, j3, j4, j5, last],
                Step {
                    // Named after the InstanceNormalization node in errors and profiles.
                    node: steps[j2].node,
                    kind: Kind::Eval(Op::GroupNorm {
                        eps,
                        groups,
                        per_group_affine: false,
                        act,
                    }),
                    args: vec![
                        Some(Arg::Slot(x)),
                        Some(Arg::Const(Arc::new(Tensor::f32(cshape.clone(), scale)))),
                        Some(Arg::Const(Arc::new(Tensor::f32(cshape, bias)))),
                    ],
                    out: steps[last].out,
                    out_shape: xs,
                    free: Vec::new(),
                },
            ))
        })();
        if let Some((idx, step)) = fused {
            // The fused step runs where the last one did (every input of the chain is
            // ready by then, and later readers see its output in the same slot).
            let at = idx[5];
            let mut gone: Vec<usize> = idx.to_vec();
            gone.sort_unstable();
            gone.dedup();
            steps[at] = step;
            for &k in gone.iter().rev().filter(|&&k| k != at) {
                steps.remove(k);
            }
            // Later indices shifted; rescan from the first removed position.
            i = idx[0];
            continue;
        }
        i += 1;
    }
}

/// The step for one node whose inputs are not all constant: its kernel plan and output.
fn plan_node(node: &Node, ins: &[Option<Val>]) -> Result<(Kind, Vec<usize>, Elem), KernelError> {
    let err = |r: String| node_err(node, r);
    let shape_of = |i: usize| -> Option<&Vec<usize>> {
        match ins.get(i)? {
            Some(Val::Slot { shape, .. }) => Some(shape),
            Some(Val::Const(c)) => Some(&c.shape),
            None => None,
        }
    };
    let konst = |i: usize, what: &str| -> Result<Const, KernelError> {
        match ins.get(i) {
            Some(Some(Val::Const(c))) => Ok(Arc::clone(c)),
            Some(Some(Val::Slot { .. })) => Err(node_err(
                node,
                format!("{what} (input {i}) must be a constant (an initializer), it is computed"),
            )),
            _ => Err(node_err(node, format!("{what} (input {i}) is missing"))),
        }
    };
    let x_shape = shape_of(0)
        .ok_or_else(|| err("input 0 is missing".into()))?
        .clone();
    let five = |s: &[usize]| -> Result<[usize; 5], KernelError> {
        s.try_into().map_err(|_| {
            node_err(
                node,
                format!("expects a 5-D input [N, C, D, H, W], got shape {s:?}"),
            )
        })
    };
    // A convolution's constant weight (5-D, no empty dimension) and optional bias.
    let weights = |layout: &str| -> Result<(Const, [usize; 5], Option<Const>), KernelError> {
        let w = konst(1, "weight")?;
        let fs: [usize; 5] = w
            .shape
            .as_slice()
            .try_into()
            .map_err(|_| err(format!("weight must be {layout}, got {:?}", w.shape)))?;
        if fs.contains(&0) {
            return Err(err(format!("weight shape {fs:?} has an empty dimension")));
        }
        let bias = match ins.get(2) {
            Some(Some(_)) => Some(konst(2, "bias")?),
            _ => None,
        };
        Ok((w, fs, bias))
    };
    match &node.op {
        Op::Conv(attr) => {
            let x = five(&x_shape)?;
            let (w, fs, bias) = weights("[C_out, C_in, kD, kH, kW]")?;
            if let Some(b) = &bias {
                if b.shape != [fs[0]] {
                    return Err(err(format!(
                        "bias must have shape [{}], got {:?}",
                        fs[0], b.shape
                    )));
                }
            }
            let pads = resolve_pads(attr, [x[2], x[3], x[4]], [fs[2], fs[3], fs[4]]);
            let sym = [0, 1, 2].map(|a| pads[a].min(pads[a + 3]));
            let extra_b = [0, 1, 2].map(|a| pads[a] - sym[a]);
            let extra_e = [0, 1, 2].map(|a| pads[a + 3] - sym[a]);
            let prepad = (extra_b != [0; 3] || extra_e != [0; 3]).then_some((extra_b, extra_e));
            let mut xin = x;
            for a in 0..3 {
                xin[2 + a] = x[2 + a]
                    .checked_add(extra_b[a])
                    .and_then(|v| v.checked_add(extra_e[a]))
                    .ok_or_else(|| err("padded input size overflows".into()))?;
            }
            let shape = Conv3dShape::new(
                xin,
                fs,
                Conv3dParams {
                    stride: attr.strides,
                    padding: sym,
                    dilation: attr.dilations,
                },
            )
            .map_err(|e| err(e.to_string()))?;
            let out = shape.output.to_vec();
            Ok((
                Kind::Conv {
                    plan: Box::new(Conv3dPlan::new(shape, Activation::None)),
                    weights: w,
                    packed: None,
                    bias,
                    prepad,
                    norm: None,
                },
                out,
                Elem::F32,
            ))
        }
        Op::ConvTranspose {
            attr,
            output_padding,
            output_shape,
        } => {
            let x = five(&x_shape)?;
            let (w, fs, bias) = weights("[C_in, C_out, kD, kH, kW]")?;
            if fs.contains(&0) || x.contains(&0) {
                return Err(err(format!(
                    "weight {fs:?} or input {x:?} has an empty dimension"
                )));
            }
            let mut pads = attr.pads;
            let mut op = *output_padding;
            if let Some(os) = output_shape {
                // ONNX: total padding from the requested output shape (SAME_UPPER split).
                for a in 0..3 {
                    let full = attr.strides[a]
                        .checked_mul(x[2 + a] - 1)
                        .and_then(|v| v.checked_add(op[a]))
                        .and_then(|v| {
                            v.checked_add((fs[2 + a] - 1).checked_mul(attr.dilations[a])?)
                        })
                        .and_then(|v| v.checked_add(1))
                        .ok_or_else(|| err("output size overflows".into()))?;
                    let total = full.checked_sub(os[a]).ok_or_else(|| {
                        err(format!(
                            "output_shape {os:?} is larger than the transposed convolution gives"
                        ))
                    })?;
                    pads[a] = total / 2;
                    pads[a + 3] = total - total / 2;
                    op[a] = 0;
                }
            }
            let params = ConvTranspose3dParams {
                stride: attr.strides,
                pads_begin: [pads[0], pads[1], pads[2]],
                pads_end: [pads[3], pads[4], pads[5]],
                output_padding: op,
                dilation: attr.dilations,
            };
            let shape = ConvTranspose3dShape::new(x, fs, params).map_err(|e| err(e.to_string()))?;
            let plan = ConvTranspose3dPlan::new(
                shape,
                w.as_f32().map_err(&err)?,
                bias.as_ref()
                    .map(|b| b.as_f32())
                    .transpose()
                    .map_err(&err)?,
                Activation::None,
            )
            .map_err(|e| err(e.to_string()))?;
            Ok((
                Kind::ConvTranspose(Box::new(plan)),
                shape.output.to_vec(),
                Elem::F32,
            ))
        }
        op => {
            let infos = infos(ins);
            let (shape, elem) = eval::infer(op, &infos).map_err(err)?;
            crate::model::graph::tensor::numel(&shape).map_err(|e| node_err(node, e))?;
            Ok((Kind::Eval(op.clone()), shape, elem))
        }
    }
}

/// What planning knows of each input, for shape inference.
fn infos(ins: &[Option<Val>]) -> Vec<Option<eval::Info<'_>>> {
    ins.iter()
        .map(|v| {
            v.as_ref().map(|v| match v {
                Val::Const(c) => eval::Info {
                    shape: &c.shape,
                    elem: c.elem(),
                    value: Some(&**c),
                },
                Val::Slot { shape, elem, .. } => eval::Info {
                    shape,
                    elem: *elem,
                    value: None,
                },
            })
        })
        .collect()
}

/// Pads after `auto_pad` (SAME: total `(o−1)·s + eff − x` split as ONNX says).
fn resolve_pads(attr: &ConvAttr, x: [usize; 3], k: [usize; 3]) -> [usize; 6] {
    match attr.auto_pad {
        AutoPad::NotSet => attr.pads,
        AutoPad::Valid => [0; 6],
        AutoPad::SameUpper | AutoPad::SameLower => {
            let mut p = [0usize; 6];
            for a in 0..3 {
                let o = x[a].div_ceil(attr.strides[a]).max(1);
                let eff = k[a]
                    .saturating_sub(1)
                    .saturating_mul(attr.dilations[a])
                    .saturating_add(1);
                let total = (o - 1)
                    .saturating_mul(attr.strides[a])
                    .saturating_add(eff)
                    .saturating_sub(x[a]);
                let small = total / 2;
                let (b, e) = if attr.auto_pad == AutoPad::SameUpper {
                    (small, total - small)
                } else {
                    (total - small, small)
                };
                p[a] = b;
                p[a + 3] = e;
            }
            p
        }
    }
}

/// Milliseconds per strategy, in first-use order.
pub type StrategyTimes = Vec<(&'static str, f64)>;

/// The time of one step of a run ([`GraphPlan::run_profiled`]).
#[derive(Clone, Debug)]
pub struct StepTime {
    /// The node's name in the graph (its op type where it has none).
    pub node: String,
    /// The ONNX op type.
    pub op: &'static str,
    /// The kernel strategy (convolutions) or the op evaluated.
    pub strategy: &'static str,
    /// The step's output shape.
    pub shape: Vec<usize>,
    pub ms: f64,
}

/// Bytes held by the idle arenas of all graphs, and the most they may hold.
static IDLE_BYTES: AtomicUsize = AtomicUsize::new(0);
static IDLE_LIMIT: AtomicUsize = AtomicUsize::new(1 << 30);

/// Caps the bytes the idle arenas of all models hold together (default 1 GiB; the server
/// sets `--memory-budget`): an arena that would pass the cap is released after its run
/// instead of kept, so memory between requests stays bounded however many models serve.
pub fn set_idle_arena_limit(bytes: usize) {
    IDLE_LIMIT.store(bytes, Ordering::Relaxed);
}

/// Bytes the idle arenas of all models hold now.
pub fn idle_arena_total() -> usize {
    IDLE_BYTES.load(Ordering::Relaxed)
}

/// The idle total after `old` idle bytes are replaced by `new`, if within `limit`.
fn idle_after(total: usize, old: usize, new: usize, limit: usize) -> Option<usize> {
    let t = total.saturating_sub(old).checked_add(new)?;
    (t <= limit).then_some(t)
}

/// Replaces `old` idle bytes by `new` in the process-wide count if the cap allows.
fn idle_admit(old: usize, new: usize) -> bool {
    let limit = IDLE_LIMIT.load(Ordering::Relaxed);
    IDLE_BYTES
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |total| {
            idle_after(total, old, new, limit)
        })
        .is_ok()
}

/// A graph's idle arena, counted in [`idle_arena_total`] while it is idle.
#[derive(Debug, Default)]
struct IdleArena(Mutex<Option<Arena>>);

impl IdleArena {
    /// The idle arena, if any (no longer counted as idle).
    fn take(&self) -> Option<Arena> {
        let a = self.0.lock().unwrap_or_else(|e| e.into_inner()).take()?;
        IDLE_BYTES.fetch_sub(a.held_bytes(), Ordering::Relaxed);
        Some(a)
    }

    /// Keeps `arena` for the next run if there is none or it holds more than the one kept
    /// (a concurrent run's), and the cap allows; else it is released.
    fn offer(&self, arena: Arena) {
        let mut spare = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let old = spare.as_ref().map_or(0, Arena::held_bytes);
        let new = arena.held_bytes();
        if spare.is_some() && new <= old {
            return;
        }
        if idle_admit(old, new) {
            *spare = Some(arena);
        }
    }

    /// Adds a buffer to the idle arena, if there is one and the cap allows.
    fn give_vec(&self, v: Vec<f32>) {
        let bytes = v.capacity() * 4;
        if v.capacity() < ARENA_MIN_VALUES {
            return;
        }
        let mut spare = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let Some(arena) = spare.as_mut() else {
            return;
        };
        if idle_admit(0, bytes) {
            arena.give_vec(v);
        }
    }
}

impl Drop for IdleArena {
    fn drop(&mut self) {
        let a = self.0.get_mut().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(a) = a {
            IDLE_BYTES.fetch_sub(a.held_bytes(), Ordering::Relaxed);
        }
    }
}

/// Float buffers freed by earlier steps of a run, reused by later ones. A U-Net's decoder
/// produces the sizes its encoder freed, so most outputs land in memory the run has already
/// touched: a fresh allocation of that size is mapped page by page on first write, and those
/// faults (the kernel zeroing every page) took 15-20 % of a network's CPU time.
///
/// An arena may serve run after run of the same plan ([`GraphPlan::run_in`]). Of equal
/// free buffers the last given is taken first, and at the end of each run the free buffers
/// no step of that run gave back (a run's input handed in from outside and never reused, a
/// buffer no request fitted) are released: the arena holds what one run needs, not what
/// many runs left behind.
#[derive(Default)]
pub struct Arena {
    /// Free buffers, each with the run in which it was last given.
    free: Vec<(Vec<f32>, u64)>,
    /// Runs ended so far.
    epoch: u64,
    /// Keep free buffers too small for a request (an arena kept from run to run of one
    /// plan: the next run's steps want them again).
    retain: bool,
}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arena")
            .field("buffers", &self.free.len())
            .field("held_bytes", &self.held_bytes())
            .field("retain", &self.retain)
            .finish()
    }
}

/// Buffers below this many values go back to the allocator (its own free lists serve them).
const ARENA_MIN_VALUES: usize = 1 << 16;

impl Arena {
    /// An arena for run after run of one plan: it keeps every buffer the last run gave back,
    /// so a steady stream of runs maps no new memory.
    pub fn retaining() -> Self {
        Self {
            retain: true,
            ..Self::default()
        }
    }

    /// Bytes of the free buffers held.
    pub fn held_bytes(&self) -> usize {
        self.free.iter().map(|(v, _)| v.capacity() * 4).sum()
    }

    /// A run ended: the free buffers it did not give back are released.
    fn end_run(&mut self) {
        let epoch = self.epoch;
        self.free.retain(|(_, e)| *e >= epoch);
        self.epoch += 1;
    }

    /// A buffer of `len` values, contents unspecified (every caller overwrites all of it):
    /// the smallest free one that holds `len` without wasting more than `len` (so a small
    /// output never pins a large buffer a later step needs), else a new one, and the free
    /// buffers too small for `len` are released (MONAI UNet at 96³: peak heap 126 -> 108 MB,
    /// the same as without an arena, at the same speed).
    pub fn take(&mut self, len: usize) -> Vec<f32> {
        let best = self
            .free
            .iter()
            .enumerate()
            .filter(|(_, (v, _))| v.capacity() >= len && v.capacity() / 2 <= len)
            .min_by_key(|(i, (v, _))| (v.capacity(), std::cmp::Reverse(*i)))
            .map(|(i, _)| i);
        match best {
            Some(i) => {
                let (mut v, _) = self.free.remove(i);
                v.resize(len, 0.0);
                v
            }
            None => {
                // None of the smaller free buffers can serve this request; kept, they would
                // add to the run's peak (the allocator's free lists still have them).
                if !self.retain {
                    self.free.retain(|(v, _)| v.capacity() >= len);
                }
                vec![0f32; len]
            }
        }
    }

    /// Keeps a float tensor's buffer for a later step.
    fn give(&mut self, t: Tensor) {
        if let tensor::Data::F32(v) = t.data {
            self.give_vec(v);
        }
    }

    /// Keeps a buffer for a later step (or run).
    pub fn give_vec(&mut self, v: Vec<f32>) {
        if v.capacity() >= ARENA_MIN_VALUES {
            self.free.push((v, self.epoch));
        }
    }
}

/// Concatenation of float tensors along axis `ax` into `out` (sized for `shape`): the
/// contiguous runs copied in order, split over `threads` in pieces of about equal size (a
/// copy: the same bytes on any thread count).
fn concat_into(
    parts: &[&[f32]],
    part_shapes: &[&[usize]],
    ax: usize,
    shape: &[usize],
    out: &mut [f32],
    threads: usize,
) {
    const PIECE: usize = 1 << 18;
    let outer: usize = shape[..ax].iter().product();
    let mut pieces: Vec<&[f32]> = Vec::new();
    for o in 0..outer {
        for (v, ps) in parts.iter().zip(part_shapes) {
            let run: usize = ps[ax..].iter().product();
            pieces.extend(v[o * run..(o + 1) * run].chunks(PIECE));
        }
    }
    let total: usize = pieces.iter().map(|p| p.len()).sum();
    let threads = threads.clamp(1, (total / PIECE).max(1));
    if threads == 1 {
        let mut at = 0;
        for p in &pieces {
            out[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
        return;
    }
    // Contiguous groups of pieces, about total / threads values each.
    let per = total.div_ceil(threads);
    let mut groups: Vec<(Vec<&[f32]>, &mut [f32])> = Vec::new();
    let mut rest = out;
    let mut group: Vec<&[f32]> = Vec::new();
    let mut len = 0;
    for p in pieces {
        group.push(p);
        len += p.len();
        if len >= per {
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(len);
            groups.push((std::mem::take(&mut group), head));
            rest = tail;
            len = 0;
        }
    }
    if !group.is_empty() {
        groups.push((group, rest));
    }
    let copy = |(group, dst): (Vec<&[f32]>, &mut [f32])| {
        let mut at = 0;
        for p in group {
            dst[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
    };
    std::thread::scope(|sc| {
        let mut it = groups.into_iter();
        let first = it.next();
        for g in it {
            sc.spawn(move || copy(g));
        }
        if let Some(g) = first {
            copy(g);
        }
    });
}

/// One value at run time: taken (its last reader) or lent.
enum Held<'a> {
    Own(Tensor),
    Lent(&'a Tensor),
}

impl Held<'_> {
    fn get(&self) -> &Tensor {
        match self {
            Held::Own(t) => t,
            Held::Lent(t) => t,
        }
    }
}

impl GraphPlan {
    pub fn input(&self) -> [usize; 5] {
        self.input
    }

    pub fn output_len(&self) -> usize {
        self.output_shape.iter().product()
    }

    /// FLOPs of the convolutions (direct count).
    pub fn flops(&self) -> f64 {
        self.steps
            .iter()
            .map(|s| match &s.kind {
                Kind::Conv { plan, .. } => plan.shape().flops(),
                Kind::ConvTranspose(p) => p.shape().flops(),
                Kind::Eval(_) => 0.0,
            })
            .sum()
    }

    /// Number of steps (nodes left after constant folding and fusion).
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Bytes of float buffers a plain run's arena comes to hold (values, summed), which
    /// keeps every buffer given back ([`Arena::retaining`]): the run simulated buffer by
    /// buffer. Each output is taken best-fit from the buffers freed so far, as
    /// [`Arena::take`] does, or allocated; an op computing in place on an input it reads
    /// last allocates nothing; an op the arena does not serve allocates. None is released
    /// during a run, so the sum of what was allocated is the run's peak. The caller's input,
    /// once read, joins the free buffers without being counted (it is the caller's).
    fn retained_values(&self) -> usize {
        let numel = |shape: &[usize]| shape.iter().fold(1usize, |a, &d| a.saturating_mul(d));
        let mut cap = vec![0usize; self.slots];
        cap[0] = self.input.iter().product();
        let mut free: Vec<usize> = Vec::new();
        let mut total = 0usize;
        for s in &self.steps {
            let len = numel(&s.out_shape);
            let first = match s.args.first() {
                Some(Some(Arg::Slot(x))) => Some(*x),
                _ => None,
            };
            let read_last = |x: usize| {
                s.free.contains(&x)
                    && s.args
                        .iter()
                        .filter(|b| matches!(b, Some(Arg::Slot(y)) if *y == x))
                        .count()
                        == 1
            };
            let mut consumed = None;
            let take = match &s.kind {
                Kind::Conv { .. }
                | Kind::ConvTranspose(_)
                | Kind::Eval(Op::Concat { .. })
                | Kind::Eval(Op::Resize { .. }) => true,
                Kind::Eval(op) if op.updates_first_input() => match first {
                    Some(x) if read_last(x) && cap[x] >= len => {
                        consumed = Some(x);
                        false
                    }
                    // Lent: copied into a buffer from the arena.
                    Some(_) => true,
                    None => false,
                },
                Kind::Eval(_) => false,
            };
            cap[s.out] = match consumed {
                Some(x) => cap[x],
                None if take => {
                    let best = free
                        .iter()
                        .enumerate()
                        .filter(|(_, &c)| c >= len && c / 2 <= len)
                        .min_by_key(|(_, &c)| c)
                        .map(|(i, _)| i);
                    match best {
                        Some(i) => free.swap_remove(i),
                        None => {
                            total = total.saturating_add(len);
                            len
                        }
                    }
                }
                None => {
                    total = total.saturating_add(len);
                    len
                }
            };
            for &f in &s.free {
                if Some(f) != consumed && cap[f] >= ARENA_MIN_VALUES {
                    free.push(cap[f]);
                }
            }
        }
        total
    }

    /// Peak bytes of a run besides the caller's input: the larger of the largest set of
    /// live buffers and what a plain run's arena comes to hold
    /// ([`retained_values`](Self::retained_values)), plus the step's workspace.
    pub fn working_bytes(&self, threads: usize) -> usize {
        self.peak_bytes(threads, true)
    }

    /// Peak bytes of a run in an arena that releases free buffers too small for a request
    /// (a sliding-window lane's, [`run_in`](Self::run_in)): the largest set of live buffers
    /// plus the step's workspace.
    pub fn live_working_bytes(&self, threads: usize) -> usize {
        self.peak_bytes(threads, false)
    }

    fn peak_bytes(&self, threads: usize, kept_arena: bool) -> usize {
        // Saturating: a graph may plan sizes no machine holds; admission then refuses them.
        let mut size = vec![0usize; self.slots];
        for s in &self.steps {
            size[s.out] = s.out_shape.iter().fold(4usize, |a, &d| a.saturating_mul(d));
        }
        let retained = if kept_arena {
            self.retained_values().saturating_mul(4)
        } else {
            0
        };
        let mut live = 0usize;
        let mut peak = 0usize;
        for s in &self.steps {
            let ws = match &s.kind {
                Kind::Conv { plan, prepad, .. } => plan.workspace_bytes(threads).saturating_add(
                    prepad.map_or(0, |_| plan.shape().input_len().saturating_mul(4)),
                ),
                Kind::ConvTranspose(p) => p.workspace_bytes(threads),
                Kind::Eval(_) => 0,
            };
            let held = live.saturating_add(size[s.out]).max(retained);
            peak = peak.max(held.saturating_add(ws));
            live = live.saturating_add(size[s.out]);
            for f in &s.free {
                live = live.saturating_sub(size[*f]);
            }
        }
        peak
    }

    /// The strategy of each step, in order (for descriptions and benchmarks).
    pub fn strategies(&self) -> Vec<(String, &'static str)> {
        self.steps
            .iter()
            .map(|s| {
                let name = self.names[s.node].0.clone();
                let strat = match &s.kind {
                    Kind::Conv { plan, .. } => plan.strategy().name(),
                    Kind::ConvTranspose(p) => p.strategy().name(),
                    Kind::Eval(op) => op.name(),
                };
                (name, strat)
            })
            .collect()
    }

    /// Runs the graph on `input` (`[N, C, D, H, W]` of the planned shape); returns the
    /// output and the time per strategy (summed over steps, in first-use order).
    pub fn run(
        &self,
        input: Vec<f32>,
        threads: usize,
        cancel: Option<&AtomicBool>,
    ) -> Result<(Vec<f32>, StrategyTimes), KernelError> {
        self.with_spare(|arena| self.run_with(input, threads, cancel, arena, &mut |_, _| {}))
    }

    /// Gives a run's output back, once the caller has copied it out, to the graph's idle
    /// arena (if one is kept and the cap allows), so the next run's output maps no new memory.
    pub fn recycle(&self, output: Vec<f32>) {
        self.spare.give_vec(output);
    }

    /// Calls `f` with the graph's idle arena (or a new one) and keeps the arena for the next
    /// run if `f` succeeds: run after run then reuses the same memory, which the allocator
    /// would otherwise map and the kernel zero again page by page (MONAI UNet at 96³, one
    /// thread: about 9,500 page faults and 15 % of the time). The arena holds at most what
    /// one run needed between runs; concurrent runs each get their own, and one is kept.
    fn with_spare<T>(
        &self,
        f: impl FnOnce(&mut Arena) -> Result<T, KernelError>,
    ) -> Result<T, KernelError> {
        let mut arena = self.spare.take().unwrap_or_else(Arena::retaining);
        let r = f(&mut arena);
        if r.is_ok() {
            self.spare.offer(arena);
        }
        r
    }

    /// Like [`run`](Self::run), with buffers from `arena` and returned to it (a caller
    /// running the same plan again, e.g. window after window, then reuses the same memory
    /// instead of having the allocator map and zero it again).
    pub fn run_in(
        &self,
        input: Vec<f32>,
        threads: usize,
        cancel: Option<&AtomicBool>,
        arena: &mut Arena,
    ) -> Result<(Vec<f32>, StrategyTimes), KernelError> {
        self.run_with(input, threads, cancel, arena, &mut |_, _| {})
    }

    /// Like [`run`](Self::run), and returns every step's time too (node name, op type,
    /// strategy, milliseconds), in execution order: for `model-bench --steps`.
    #[allow(clippy::type_complexity)]
    pub fn run_profiled(
        &self,
        input: Vec<f32>,
        threads: usize,
    ) -> Result<(Vec<f32>, Vec<StepTime>), KernelError> {
        let mut steps = Vec::with_capacity(self.steps.len());
        let (out, _) = self.with_spare(|arena| {
            self.run_with(input, threads, None, arena, &mut |i, ms| {
                let s = &self.steps[i];
                let (name, op) = &self.names[s.node];
                let strategy = match &s.kind {
                    Kind::Conv { plan, .. } => plan.strategy().name(),
                    Kind::ConvTranspose(p) => p.strategy().name(),
                    Kind::Eval(op) => op.name(),
                };
                steps.push(StepTime {
                    node: name.clone(),
                    op,
                    strategy,
                    shape: s.out_shape.clone(),
                    ms,
                });
            })
        })?;
        Ok((out, steps))
    }

    fn run_with(
        &self,
        input: Vec<f32>,
        threads: usize,
        cancel: Option<&AtomicBool>,
        arena: &mut Arena,
        on_step: &mut dyn FnMut(usize, f64),
    ) -> Result<(Vec<f32>, StrategyTimes), KernelError> {
        let want: usize = self.input.iter().product();
        if input.len() != want {
            return Err(KernelError::BufferLength {
                what: "input",
                expected: want,
                got: input.len(),
            });
        }
        let mut slots: Vec<Option<Tensor>> = (0..self.slots).map(|_| None).collect();
        slots[0] = Some(Tensor::f32(self.input.to_vec(), input));
        let mut times: Vec<(&'static str, f64)> = Vec::new();
        for (i, s) in self.steps.iter().enumerate() {
            if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                return Err(KernelError::Cancelled);
            }
            let t0 = Instant::now();
            let (y, strat) = self.run_step(s, &mut slots, arena, threads, cancel)?;
            slots[s.out] = Some(y);
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            on_step(i, ms);
            match times.iter_mut().find(|(n, _)| *n == strat) {
                Some(t) => t.1 += ms,
                None => times.push((strat, ms)),
            }
        }
        let out = match &self.output {
            Arg::Slot(s) => slots[*s].take().ok_or_else(|| KernelError::Invalid {
                what: "graph output".into(),
                reason: "was not computed (a bug)".into(),
            })?,
            Arg::Const(c) => (**c).clone(),
        };
        // Whatever is left (nothing, for a graph whose every slot is read) back to the arena.
        for t in slots.into_iter().flatten() {
            arena.give(t);
        }
        arena.end_run();
        let out = out.into_f32().map_err(|e| KernelError::Invalid {
            what: "graph output".into(),
            reason: e,
        })?;
        Ok((out, times))
    }

    fn run_step(
        &self,
        s: &Step,
        slots: &mut [Option<Tensor>],
        arena: &mut Arena,
        threads: usize,
        cancel: Option<&AtomicBool>,
    ) -> Result<(Tensor, &'static str), KernelError> {
        let bug = |r: String| KernelError::Invalid {
            what: format!("node {:?} ({})", self.names[s.node].0, self.names[s.node].1),
            reason: r,
        };
        // Inputs read for the last time are taken (computed in place where the op can).
        let mut taken: Vec<Option<Tensor>> = Vec::with_capacity(s.args.len());
        for a in &s.args {
            taken.push(match a {
                Some(Arg::Slot(x))
                    if s.free.contains(x)
                        && s.args
                            .iter()
                            .filter(|b| matches!(b, Some(Arg::Slot(y)) if y == x))
                            .count()
                            == 1 =>
                {
                    slots[*x].take()
                }
                _ => None,
            });
        }
        let mut held: Vec<Option<Held<'_>>> = s
            .args
            .iter()
            .zip(taken)
            .map(|(a, t)| match (a, t) {
                (None, _) => Ok(None),
                (_, Some(t)) => Ok(Some(Held::Own(t))),
                (Some(Arg::Const(c)), None) => Ok(Some(Held::Lent(c))),
                (Some(Arg::Slot(x)), None) => slots[*x]
                    .as_ref()
                    .map(|t| Some(Held::Lent(t)))
                    .ok_or_else(|| bug(format!("slot {x} read before it is written"))),
            })
            .collect::<Result<_, _>>()?;
        let x_ref = |h| held_f32(h).map_err(bug);
        let result = match &s.kind {
            Kind::Conv {
                plan,
                weights,
                packed,
                bias,
                prepad,
                norm,
            } => {
                let x = x_ref(&held[0])?;
                let padded;
                let x = match prepad {
                    Some((b, e)) => {
                        let shape = self_shape5(&held[0]).map_err(bug)?;
                        padded =
                            crate::kernel::ops::pad3d(x, shape, *b, *e, PadMode::Constant(0.0))?.0;
                        &padded[..]
                    }
                    None => x,
                };
                let mut out = arena.take(plan.shape().output_len());
                let filters = match packed {
                    Some(p) => Filters::Packed(p),
                    None => Filters::Raw(weights.as_f32().map_err(bug)?),
                };
                let bias = bias.as_ref().map(|b| b.as_f32()).transpose().map_err(bug)?;
                match norm {
                    None => plan.run_into(x, filters, bias, &mut out, threads, cancel)?,
                    Some(nm) => {
                        let stats =
                            plan.run_into_with_stats(x, filters, bias, &mut out, threads, cancel)?;
                        let [_, c, d, h, w] = plan.shape().output;
                        let sp = d * h * w;
                        let act = |k: usize| {
                            nm.act
                                .as_ref()
                                .map_or(crate::kernel::ChannelAct::None, |a| a.channel(k % c))
                        };
                        // Channels split over threads (the same bits at any count), as the
                        // unfused InstanceNorm step splits them; planning checked epsilon, so
                        // an error here is ours.
                        eval::par_blocks_try(&mut out, sp, threads, |k, ch| {
                            crate::kernel::ops::instance_norm_with_stats(
                                ch,
                                1,
                                1,
                                sp,
                                &stats[k..=k],
                                &nm.scale[k % c..=k % c],
                                &nm.bias[k % c..=k % c],
                                nm.eps,
                                |_| act(k),
                            )
                            .map_err(|e| e.to_string())
                        })
                        .map_err(bug)?;
                    }
                }
                (
                    Tensor::f32(s.out_shape.clone(), out),
                    plan.strategy().name(),
                )
            }
            Kind::ConvTranspose(p) => {
                let x = x_ref(&held[0])?;
                let mut out = arena.take(p.shape().output_len());
                p.run_into(x, &mut out, threads, cancel)?;
                (Tensor::f32(s.out_shape.clone(), out), p.strategy().name())
            }
            Kind::Eval(op @ Op::Concat { axis })
                if held.iter().flatten().all(|h| h.get().elem() == Elem::F32) =>
            {
                let parts: Vec<&Tensor> = held.iter().flatten().map(Held::get).collect();
                let ax = tensor::axis(*axis, s.out_shape.len()).map_err(bug)?;
                let len = tensor::numel(&s.out_shape).map_err(bug)?;
                let vals: Vec<&[f32]> = parts
                    .iter()
                    .map(|t| t.as_f32())
                    .collect::<Result<_, _>>()
                    .map_err(bug)?;
                let shapes: Vec<&[usize]> = parts.iter().map(|t| &t.shape[..]).collect();
                let mut out = arena.take(len);
                if vals.iter().map(|v| v.len()).sum::<usize>() != len {
                    return Err(bug(format!(
                        "Concat parts do not fill the planned shape {:?}",
                        s.out_shape
                    )));
                }
                concat_into(&vals, &shapes, ax, &s.out_shape, &mut out, threads);
                (Tensor::f32(s.out_shape.clone(), out), op.name())
            }
            Kind::Eval(op @ Op::Resize { .. })
                if held
                    .first()
                    .and_then(|h| h.as_ref())
                    .map(|h| h.get().elem())
                    == Some(Elem::F32) =>
            {
                let get = |i: usize| held.get(i).and_then(|h| h.as_ref()).map(Held::get);
                let x = get(0).ok_or_else(|| bug("input 0 is missing".into()))?;
                let len = tensor::numel(&s.out_shape).map_err(bug)?;
                let mut out = arena.take(len);
                eval::resize_into(op, x, get(2), get(3), &mut out, threads).map_err(bug)?;
                (Tensor::f32(s.out_shape.clone(), out), op.name())
            }
            Kind::Eval(op) => {
                // An op that computes in place on its first input copies it when it is
                // lent (read again later): into an arena buffer, not a fresh allocation.
                let lent_copy = match held.first() {
                    Some(Some(Held::Lent(t))) if op.updates_first_input() => match &t.data {
                        tensor::Data::F32(v) if v.len() >= ARENA_MIN_VALUES => {
                            let mut buf = arena.take(v.len());
                            // A copy: the same bytes on any thread count.
                            let threads = threads.min(v.len() >> 18).max(1);
                            crate::kernel::par::par_blocks(&mut buf, 1, threads, |at, part| {
                                part.copy_from_slice(&v[at..at + part.len()]);
                            });
                            Some(Tensor::f32(t.shape.clone(), buf))
                        }
                        _ => None,
                    },
                    _ => None,
                };
                if let Some(t) = lent_copy {
                    held[0] = Some(Held::Own(t));
                }
                let ins = std::mem::take(&mut held)
                    .into_iter()
                    .map(|h| {
                        h.map(|h| match h {
                            Held::Own(t) => Cow::Owned(t),
                            Held::Lent(t) => Cow::Borrowed(t),
                        })
                    })
                    .collect();
                let mut outs = eval::eval(op, ins, threads).map_err(bug)?;
                if outs.is_empty() {
                    return Err(bug("no output".into()));
                }
                let y = outs.swap_remove(0);
                if y.shape != s.out_shape {
                    return Err(bug(format!(
                        "computed shape {:?}, planned {:?}",
                        y.shape, s.out_shape
                    )));
                }
                (y, op.name())
            }
        };
        for h in held.into_iter().flatten() {
            if let Held::Own(t) = h {
                arena.give(t);
            }
        }
        for f in &s.free {
            if let Some(t) = slots[*f].take() {
                arena.give(t);
            }
        }
        Ok(result)
    }
}

fn held_f32<'a>(h: &'a Option<Held<'_>>) -> Result<&'a [f32], String> {
    match h {
        Some(Held::Own(t)) => t.as_f32(),
        Some(Held::Lent(t)) => t.as_f32(),
        None => Err("input 0 is missing".into()),
    }
}

fn self_shape5(h: &Option<Held<'_>>) -> Result<[usize; 5], String> {
    let t = match h {
        Some(Held::Own(t)) => t,
        Some(Held::Lent(t)) => t,
        None => return Err("missing input".into()),
    };
    t.shape
        .as_slice()
        .try_into()
        .map_err(|_| format!("expected a 5-D tensor, got {:?}", t.shape))
}

#[cfg(test)]
mod tests {
    use super::idle_after;

    #[test]
    fn idle_arenas_stay_within_their_cap() {
        // A first arena fits, one past the cap does not, a replacement counts only the
        // difference, and no sum overflows.
        assert_eq!(idle_after(0, 0, 100, 100), Some(100));
        assert_eq!(idle_after(100, 0, 1, 100), None);
        assert_eq!(idle_after(100, 60, 50, 100), Some(90));
        assert_eq!(idle_after(100, 60, 61, 100), None);
        assert_eq!(idle_after(usize::MAX, 0, 1, usize::MAX), None);
        assert_eq!(idle_after(0, 0, 1, 0), None);
    }
}
