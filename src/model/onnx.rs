//! The ONNX front end: `model.onnx` (prost over the vendored `onnx.proto`) to the graph IR.
//!
//! An ONNX file is untrusted input. Decoding is prost's (bounded recursion); every tensor's
//! element count is checked against its dims before anything is allocated; external data
//! must lie inside the model directory (no absolute paths, no `..`, no symlink out); every
//! unsupported op is listed at once, by node name, op and opset; a cycle is an error.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use prost::Message;

use super::graph::tensor::{numel, BinOp, Elem, Tensor};
use super::graph::{AutoPad, ConvAttr, Graph, IoInfo, Node, Op, Unary};
use crate::kernel::ops::{CoordMode, NearestMode, PadMode, Pool3d, ResizeMode};
use crate::proto::onnx as pb;

/// Opsets of the default domain we implement.
pub const OPSETS: std::ops::RangeInclusive<i64> = 13..=21;

/// Largest model file read (protobuf's own limit is 2 GiB).
const MAX_FILE: u64 = 2 << 30;
/// Most nodes a graph may have.
const MAX_NODES: usize = 100_000;

/// Loads `model.onnx` in `dir` (external data from files beside it). Errors are text; the
/// repository adds the model directory.
pub fn load(dir: &Path) -> Result<Graph, String> {
    let path = dir.join("model.onnx");
    let meta = std::fs::metadata(&path).map_err(|e| format!("model.onnx: {e}"))?;
    if meta.len() > MAX_FILE {
        return Err(format!(
            "model.onnx: {} bytes is larger than the 2 GiB protobuf limit",
            meta.len()
        ));
    }
    let bytes = std::fs::read(&path).map_err(|e| format!("model.onnx: {e}"))?;
    decode(bytes::Bytes::from(bytes), Some(dir))
}

/// Decodes an ONNX model from `bytes`; `dir` is where external data may be read (`None`:
/// external data is refused).
pub fn decode(bytes: bytes::Bytes, dir: Option<&Path>) -> Result<Graph, String> {
    let model = pb::ModelProto::decode(bytes)
        .map_err(|e| format!("model.onnx is not a valid ONNX protobuf: {e}"))?;
    let mut opset = None;
    for o in &model.opset_import {
        match o.domain.as_deref().unwrap_or("") {
            "" | "ai.onnx" => opset = o.version,
            _ => {}
        }
    }
    let opset = opset.ok_or("model.onnx imports no opset of the default ONNX domain")?;
    if !OPSETS.contains(&opset) {
        return Err(format!(
            "opset {opset} is not supported (voxconv implements opsets {}–{}; re-export with \
             torch.onnx.export(..., opset_version=17))",
            OPSETS.start(),
            OPSETS.end()
        ));
    }
    let g = model.graph.as_ref().ok_or("model.onnx has no graph")?;
    if g.node.len() > MAX_NODES {
        return Err(format!(
            "the graph has {} nodes, more than the {MAX_NODES} allowed",
            g.node.len()
        ));
    }
    let ctx = Ctx { dir };
    let mut constants = HashMap::new();
    for t in &g.initializer {
        let name = t.name.clone().unwrap_or_default();
        let v = ctx
            .tensor(t)
            .map_err(|e| format!("initializer {name:?}: {e}"))?;
        constants.insert(name, Arc::new(v));
    }
    if !g.sparse_initializer.is_empty() {
        return Err("sparse initializers are not supported".into());
    }
    let io = |v: &pb::ValueInfoProto, what: &str| -> Result<IoInfo, String> {
        let name = v.name.clone().unwrap_or_default();
        let Some(pb::type_proto::Value::TensorType(t)) =
            v.r#type.as_ref().and_then(|t| t.value.as_ref())
        else {
            return Err(format!("{what} {name:?} is not a tensor"));
        };
        let elem = match t.elem_type.unwrap_or(0) {
            1 => Elem::F32,
            e => {
                return Err(format!(
                "{what} {name:?} has element type {} ; voxconv takes and returns float32 (FLOAT)",
                dtype_name(e)
            ))
            }
        };
        let dims = t
            .shape
            .as_ref()
            .map(|s| {
                s.dim
                    .iter()
                    .map(|d| match d.value {
                        Some(pb::tensor_shape_proto::dimension::Value::DimValue(v)) if v > 0 => {
                            usize::try_from(v).ok()
                        }
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(IoInfo { name, elem, dims })
    };
    let inputs: Vec<IoInfo> = g
        .input
        .iter()
        .filter(|v| !constants.contains_key(v.name.as_deref().unwrap_or("")))
        .map(|v| io(v, "input"))
        .collect::<Result<_, _>>()?;
    let outputs: Vec<IoInfo> = g
        .output
        .iter()
        .map(|v| io(v, "output"))
        .collect::<Result<_, _>>()?;
    if inputs.len() != 1 {
        return Err(format!(
            "the graph has {} inputs besides its initializers ({}); voxconv serves networks of one input",
            inputs.len(),
            inputs.iter().map(|i| i.name.as_str()).collect::<Vec<_>>().join(", ")
        ));
    }
    if outputs.is_empty() {
        return Err("the graph has no output".into());
    }
    if inputs[0].dims.len() != 5 {
        return Err(format!(
            "input {:?} has rank {}; voxconv takes [N, C, D, H, W]",
            inputs[0].name,
            inputs[0].dims.len()
        ));
    }
    // Every op, parsed; all unsupported or malformed nodes are reported together.
    let mut nodes = Vec::with_capacity(g.node.len());
    let mut bad = Vec::new();
    for (i, n) in g.node.iter().enumerate() {
        let name = n
            .name
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| format!("#{i}"));
        let op_type = n.op_type.clone().unwrap_or_default();
        let domain = n.domain.clone().unwrap_or_default();
        if !(domain.is_empty() || domain == "ai.onnx") {
            bad.push(format!(
                "node {name:?}: op {domain}::{op_type} (a custom domain) is not supported"
            ));
            continue;
        }
        match ctx.op(n, &op_type, opset) {
            Ok(op) => nodes.push(Node {
                name,
                op,
                inputs: n.input.clone(),
                outputs: n.output.clone(),
            }),
            Err(e) => bad.push(format!("node {name:?} ({op_type}, opset {opset}): {e}")),
        }
    }
    if !bad.is_empty() {
        return Err(format!(
            "{} node(s) cannot be loaded: {}",
            bad.len(),
            bad.join("; ")
        ));
    }
    let nodes = topo_sort(nodes, &constants, &inputs)?;
    Ok(Graph::new(inputs, outputs, nodes, constants))
}

/// Orders nodes so every value is produced before it is read; a cycle or a value nobody
/// produces is an error.
fn topo_sort(
    nodes: Vec<Node>,
    constants: &HashMap<String, Arc<Tensor>>,
    inputs: &[IoInfo],
) -> Result<Vec<Node>, String> {
    let mut producer: HashMap<&str, usize> = HashMap::new();
    for (i, n) in nodes.iter().enumerate() {
        for o in n.outputs.iter().filter(|o| !o.is_empty()) {
            if producer.insert(o, i).is_some()
                || constants.contains_key(o)
                || inputs.iter().any(|x| &x.name == o)
            {
                return Err(format!(
                    "value {o:?} is produced more than once (node {:?})",
                    n.name
                ));
            }
        }
    }
    let known: HashSet<&str> = constants
        .keys()
        .map(String::as_str)
        .chain(inputs.iter().map(|i| i.name.as_str()))
        .collect();
    let mut deps: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
    let mut indeg = vec![0usize; nodes.len()];
    for (i, n) in nodes.iter().enumerate() {
        for inp in n.inputs.iter().filter(|s| !s.is_empty()) {
            match producer.get(inp.as_str()) {
                Some(&p) => {
                    deps[p].push(i);
                    indeg[i] += 1;
                }
                None if known.contains(inp.as_str()) => {}
                None => {
                    return Err(format!(
                        "node {:?} ({}) reads {inp:?}, which no node, input or initializer gives",
                        n.name,
                        n.op.name()
                    ))
                }
            }
        }
    }
    let mut ready: Vec<usize> = (0..nodes.len()).filter(|&i| indeg[i] == 0).rev().collect();
    let mut order = Vec::with_capacity(nodes.len());
    while let Some(i) = ready.pop() {
        order.push(i);
        for &j in deps[i].iter().rev() {
            indeg[j] -= 1;
            if indeg[j] == 0 {
                ready.push(j);
            }
        }
    }
    if order.len() != nodes.len() {
        let stuck: Vec<&str> = (0..nodes.len())
            .filter(|&i| indeg[i] > 0)
            .take(5)
            .map(|i| nodes[i].name.as_str())
            .collect();
        return Err(format!("the graph has a cycle (through nodes {stuck:?})"));
    }
    let mut slots: Vec<Option<Node>> = nodes.into_iter().map(Some).collect();
    Ok(order.into_iter().filter_map(|i| slots[i].take()).collect())
}

fn dtype_name(t: i32) -> String {
    pb::tensor_proto::DataType::try_from(t)
        .map(|d| d.as_str_name().to_string())
        .unwrap_or_else(|_| format!("#{t}"))
}

struct Ctx<'a> {
    dir: Option<&'a Path>,
}

impl Ctx<'_> {
    /// A TensorProto's values, checked against its dims.
    fn tensor(&self, t: &pb::TensorProto) -> Result<Tensor, String> {
        let dims: Vec<usize> = t
            .dims
            .iter()
            .map(|&d| usize::try_from(d).map_err(|_| format!("dimension {d} is negative")))
            .collect::<Result<_, _>>()?;
        let n = numel(&dims)?;
        let dt = t.data_type.unwrap_or(0);
        let external = t.data_location == Some(pb::tensor_proto::DataLocation::External as i32);
        let raw_owned;
        let raw: Option<&[u8]> = if external {
            raw_owned = self.external(t, n, dt)?;
            Some(&raw_owned)
        } else {
            t.raw_data.as_deref()
        };
        let dims_text = format!("{dims:?}");
        let count = |got: usize| -> Result<(), String> {
            if got == n {
                Ok(())
            } else {
                Err(format!(
                    "dims {dims_text} need {n} values, the tensor holds {got}"
                ))
            }
        };
        let width = elem_width(dt)
            .ok_or_else(|| format!("element type {} is not supported", dtype_name(dt)))?;
        if let Some(r) = raw {
            if r.len() % width != 0 {
                return Err(format!(
                    "raw_data of {} bytes is not a whole number of {}-byte values",
                    r.len(),
                    width
                ));
            }
            count(r.len() / width)?;
        }
        let ints = |v: &[i32]| -> Result<Vec<i64>, String> {
            count(v.len())?;
            Ok(v.iter().map(|&x| i64::from(x)).collect())
        };
        let le = |b: &[u8]| -> [u8; 8] {
            let mut a = [0u8; 8];
            a[..b.len()].copy_from_slice(b);
            a
        };
        Ok(match dt {
            1 => Tensor::f32(
                dims,
                match raw {
                    Some(r) => r
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect(),
                    None => {
                        count(t.float_data.len())?;
                        t.float_data.clone()
                    }
                },
            ),
            11 => Tensor::f32(
                dims,
                match raw {
                    Some(r) => r
                        .chunks_exact(8)
                        .map(|b| f64::from_le_bytes(le(b)) as f32)
                        .collect(),
                    None => {
                        count(t.double_data.len())?;
                        t.double_data.iter().map(|&x| x as f32).collect()
                    }
                },
            ),
            10 | 16 => {
                let conv = |bits: u16| {
                    if dt == 10 {
                        half::f16::from_bits(bits).to_f32()
                    } else {
                        half::bf16::from_bits(bits).to_f32()
                    }
                };
                Tensor::f32(
                    dims,
                    match raw {
                        Some(r) => r
                            .chunks_exact(2)
                            .map(|b| conv(u16::from_le_bytes([b[0], b[1]])))
                            .collect(),
                        None => {
                            count(t.int32_data.len())?;
                            t.int32_data.iter().map(|&x| conv(x as u16)).collect()
                        }
                    },
                )
            }
            7 => Tensor::i64(
                dims,
                match raw {
                    Some(r) => r
                        .chunks_exact(8)
                        .map(|b| i64::from_le_bytes(le(b)))
                        .collect(),
                    None => {
                        count(t.int64_data.len())?;
                        t.int64_data.clone()
                    }
                },
            ),
            6 | 5 | 3 | 2 | 4 | 9 | 12 => Tensor::i64(
                dims,
                match raw {
                    Some(r) => r
                        .chunks_exact(width)
                        .map(|b| match dt {
                            6 => i64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                            12 => i64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                            5 => i64::from(i16::from_le_bytes([b[0], b[1]])),
                            4 => i64::from(u16::from_le_bytes([b[0], b[1]])),
                            3 => i64::from(b[0] as i8),
                            _ => i64::from(b[0]),
                        })
                        .collect(),
                    None => ints(&t.int32_data)?,
                },
            ),
            _ => return Err(format!("element type {} is not supported", dtype_name(dt))),
        })
    }

    /// The bytes of an external-data tensor, from a file inside the model directory.
    fn external(&self, t: &pb::TensorProto, n: usize, dt: i32) -> Result<Vec<u8>, String> {
        let dir = self.dir.ok_or("external data is not allowed here")?;
        let mut location = None;
        let (mut offset, mut length) = (0u64, None);
        for e in &t.external_data {
            let v = e.value.as_deref().unwrap_or("");
            match e.key.as_deref().unwrap_or("") {
                "location" => location = Some(v.to_string()),
                "offset" => {
                    offset = v
                        .parse()
                        .map_err(|_| format!("external_data offset {v:?} is not a number"))?
                }
                "length" => {
                    length = Some(
                        v.parse::<u64>()
                            .map_err(|_| format!("external_data length {v:?} is not a number"))?,
                    )
                }
                _ => {}
            }
        }
        let loc = location.ok_or("external_data has no location")?;
        let rel = Path::new(&loc);
        if rel.is_absolute()
            || rel
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(format!(
                "external data location {loc:?} must be a plain relative path inside the model directory"
            ));
        }
        let base = dir
            .canonicalize()
            .map_err(|e| format!("model directory: {e}"))?;
        let file = base
            .join(rel)
            .canonicalize()
            .map_err(|e| format!("external data {loc:?}: {e}"))?;
        if !file.starts_with(&base) {
            return Err(format!(
                "external data {loc:?} resolves outside the model directory (a symlink?)"
            ));
        }
        let width = elem_width(dt)
            .ok_or_else(|| format!("element type {} is not supported", dtype_name(dt)))?;
        let want = (n as u64)
            .checked_mul(width as u64)
            .ok_or("tensor size overflows")?;
        if let Some(l) = length {
            if l != want {
                return Err(format!(
                    "external_data length {l} but the dims need {want} bytes"
                ));
            }
        }
        let size = std::fs::metadata(&file)
            .map_err(|e| format!("external data {loc:?}: {e}"))?
            .len();
        if offset.checked_add(want).is_none_or(|end| end > size) {
            return Err(format!(
                "external data {loc:?}: bytes {offset}..{} are past its end ({size} bytes)",
                offset.saturating_add(want)
            ));
        }
        use std::io::{Read, Seek, SeekFrom};
        let mut f =
            std::fs::File::open(&file).map_err(|e| format!("external data {loc:?}: {e}"))?;
        f.seek(SeekFrom::Start(offset)).map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; want as usize];
        f.read_exact(&mut buf)
            .map_err(|e| format!("external data {loc:?}: {e}"))?;
        Ok(buf)
    }

    fn op(&self, n: &pb::NodeProto, op_type: &str, opset: i64) -> Result<Op, String> {
        let a = Attrs::new(n)?;
        let ints3 = |name: &str, default: usize| -> Result<[usize; 3], String> {
            match a.ints(name) {
                None => Ok([default; 3]),
                Some(v) => to3(name, v),
            }
        };
        let conv_attr = || -> Result<ConvAttr, String> {
            if let Some(k) = a.ints("kernel_shape") {
                if k.len() != 3 {
                    return Err(format!(
                        "kernel_shape {k:?}: only 3-D convolutions are supported"
                    ));
                }
            }
            let group = a.int("group").unwrap_or(1);
            if group != 1 {
                return Err(format!("group {group}: only group = 1 is supported"));
            }
            let strides = ints3("strides", 1)?;
            let dilations = ints3("dilations", 1)?;
            if strides.contains(&0) || dilations.contains(&0) {
                return Err("strides and dilations must be at least 1".into());
            }
            Ok(ConvAttr {
                strides,
                pads: pads6(a.ints("pads"))?,
                dilations,
                auto_pad: auto_pad(a.string("auto_pad").unwrap_or("NOTSET"))?,
            })
        };
        let pool = || -> Result<Pool3d, String> {
            let k = a.ints("kernel_shape").ok_or("kernel_shape is required")?;
            let kernel = to3("kernel_shape", k)?;
            if a.int("storage_order").unwrap_or(0) != 0 {
                return Err("storage_order 1 is not supported".into());
            }
            let pads = pads6(a.ints("pads"))?;
            if auto_pad(a.string("auto_pad").unwrap_or("NOTSET"))? != AutoPad::NotSet {
                return Err(
                    "auto_pad on pooling is not supported (export with explicit pads)".into(),
                );
            }
            let stride = ints3("strides", 1)?;
            let dilation = ints3("dilations", 1)?;
            if stride.contains(&0) || dilation.contains(&0) || kernel.contains(&0) {
                return Err("kernel, strides and dilations must be at least 1".into());
            }
            Ok(Pool3d {
                kernel,
                stride,
                pads_begin: [pads[0], pads[1], pads[2]],
                pads_end: [pads[3], pads[4], pads[5]],
                dilation,
                ceil_mode: a.int("ceil_mode").unwrap_or(0) != 0,
            })
        };
        let f = |name: &str, d: f32| a.float(name).unwrap_or(d);
        Ok(match op_type {
            "Conv" => Op::Conv(conv_attr()?),
            "ConvTranspose" => Op::ConvTranspose {
                attr: conv_attr()?,
                output_padding: ints3("output_padding", 0)?,
                output_shape: a
                    .ints("output_shape")
                    .map(|v| {
                        let v = if v.len() == 5 { &v[2..] } else { v };
                        to3("output_shape", v)
                    })
                    .transpose()?,
            },
            "BatchNormalization" => {
                if a.int("training_mode").unwrap_or(0) != 0 {
                    return Err("training_mode 1 is not inference".into());
                }
                Op::BatchNorm {
                    eps: f("epsilon", 1e-5),
                }
            }
            "InstanceNormalization" => Op::InstanceNorm {
                eps: f("epsilon", 1e-5),
                act: None,
            },
            "GroupNormalization" => Op::GroupNorm {
                eps: f("epsilon", 1e-5),
                groups: usize::try_from(a.int("num_groups").ok_or("num_groups is required")?)
                    .map_err(|_| "num_groups must be positive")?,
                per_group_affine: opset < 21,
                act: None,
            },
            "Relu" => Op::Unary(Unary::Relu),
            "LeakyRelu" => Op::Unary(Unary::LeakyRelu(f("alpha", 0.01))),
            "Elu" => Op::Unary(Unary::Elu(f("alpha", 1.0))),
            "Sigmoid" => Op::Unary(Unary::Sigmoid),
            "Tanh" => Op::Unary(Unary::Tanh),
            "Exp" => Op::Unary(Unary::Exp),
            "Log" => Op::Unary(Unary::Log),
            "Sqrt" => Op::Unary(Unary::Sqrt),
            "Neg" => Op::Unary(Unary::Neg),
            "Abs" => Op::Unary(Unary::Abs),
            "Reciprocal" => Op::Unary(Unary::Reciprocal),
            "Erf" => Op::Unary(Unary::Erf),
            "Floor" => Op::Unary(Unary::Floor),
            "Ceil" => Op::Unary(Unary::Ceil),
            "PRelu" => Op::Binary(BinOp::PRelu),
            "Add" => Op::Binary(BinOp::Add),
            "Sub" => Op::Binary(BinOp::Sub),
            "Mul" => Op::Binary(BinOp::Mul),
            "Div" => Op::Binary(BinOp::Div),
            "Pow" => Op::Binary(BinOp::Pow),
            "Equal" => Op::Binary(BinOp::Equal),
            "Less" => Op::Binary(BinOp::Less),
            "Greater" => Op::Binary(BinOp::Greater),
            "Clip" => Op::Clip,
            "Softmax" => Op::Softmax {
                axis: a.int("axis").unwrap_or(-1),
            },
            "Concat" => Op::Concat {
                axis: a.int("axis").ok_or("axis is required")?,
            },
            "MaxPool" => {
                if n.output.len() > 1 && !n.output[1].is_empty() {
                    return Err("the Indices output is not supported".into());
                }
                Op::MaxPool(pool()?)
            }
            "AveragePool" => Op::AveragePool {
                pool: pool()?,
                count_include_pad: a.int("count_include_pad").unwrap_or(0) != 0,
            },
            "GlobalAveragePool" => Op::GlobalAveragePool,
            "Resize" => {
                if a.int("antialias").unwrap_or(0) != 0 {
                    return Err("antialias 1 is not supported".into());
                }
                if a.ints("axes").is_some() {
                    return Err(
                        "the axes attribute is not supported (give scales for all 5 axes)".into(),
                    );
                }
                if a.string("keep_aspect_ratio_policy").unwrap_or("stretch") != "stretch" {
                    return Err("only keep_aspect_ratio_policy \"stretch\" is supported".into());
                }
                let coord = match a.string("coordinate_transformation_mode").unwrap_or("half_pixel") {
                    "half_pixel" => CoordMode::HalfPixel,
                    "pytorch_half_pixel" => CoordMode::PytorchHalfPixel,
                    "align_corners" => CoordMode::AlignCorners,
                    "asymmetric" => CoordMode::Asymmetric,
                    m => {
                        return Err(format!(
                            "coordinate_transformation_mode {m:?} is not supported (half_pixel, pytorch_half_pixel, align_corners, asymmetric)"
                        ))
                    }
                };
                let mode = match a.string("mode").unwrap_or("nearest") {
                    "nearest" => ResizeMode::Nearest(
                        match a.string("nearest_mode").unwrap_or("round_prefer_floor") {
                            "round_prefer_floor" => NearestMode::RoundPreferFloor,
                            "round_prefer_ceil" => NearestMode::RoundPreferCeil,
                            "floor" => NearestMode::Floor,
                            "ceil" => NearestMode::Ceil,
                            m => return Err(format!("nearest_mode {m:?} is not supported")),
                        },
                    ),
                    "linear" => ResizeMode::Linear,
                    m => return Err(format!("mode {m:?} is not supported (nearest, linear)")),
                };
                Op::Resize { mode, coord }
            }
            "Pad" => Op::Pad {
                mode: match a.string("mode").unwrap_or("constant") {
                    "constant" => PadMode::Constant(0.0),
                    "edge" => PadMode::Edge,
                    "reflect" => PadMode::Reflect,
                    m => {
                        return Err(format!(
                            "mode {m:?} is not supported (constant, edge, reflect)"
                        ))
                    }
                },
            },
            "Identity" => Op::Identity,
            "Dropout" => {
                if n.output.len() > 1 && !n.output[1].is_empty() {
                    // The mask is refused at planning only if something reads it.
                }
                Op::Identity
            }
            "Flatten" => Op::Flatten {
                axis: a.int("axis").unwrap_or(1),
            },
            "Reshape" => Op::Reshape {
                allowzero: a.int("allowzero").unwrap_or(0) != 0,
            },
            "Shape" => Op::Shape {
                start: a.int("start").unwrap_or(0),
                end: a.int("end"),
            },
            "Size" => Op::Size,
            "Gather" => Op::Gather {
                axis: a.int("axis").unwrap_or(0),
            },
            "Slice" => Op::Slice,
            "Transpose" => Op::Transpose {
                perm: a.ints("perm").map(<[i64]>::to_vec),
            },
            "Cast" => Op::Cast {
                to: match a.int("to").ok_or("to is required")? {
                    1 | 10 | 11 | 16 => Elem::F32,
                    2..=7 | 9 | 12 | 13 => Elem::I64,
                    t => return Err(format!("cast to {} is not supported", dtype_name(t as i32))),
                },
            },
            "Constant" => Op::Constant(Arc::new(self.constant(&a)?)),
            "ConstantOfShape" => Op::ConstantOfShape(Arc::new(match a.tensor("value") {
                Some(t) => self.tensor(t)?,
                None => Tensor::scalar_f32(0.0),
            })),
            "Unsqueeze" => Op::Unsqueeze,
            "Squeeze" => Op::Squeeze,
            "Expand" => Op::Expand,
            "Where" => Op::Where,
            "Range" => Op::Range,
            "Not" => Op::Not,
            "ReduceMean" => Op::ReduceMean {
                axes: a.ints("axes").map(<[i64]>::to_vec),
                keepdims: a.int("keepdims").unwrap_or(1) != 0,
            },
            other => return Err(format!("op {other} is not supported")),
        })
    }

    fn constant(&self, a: &Attrs<'_>) -> Result<Tensor, String> {
        if let Some(t) = a.tensor("value") {
            return self.tensor(t);
        }
        if let Some(v) = a.float("value_float") {
            return Ok(Tensor::scalar_f32(v));
        }
        if let Some(v) = a.floats("value_floats") {
            return Ok(Tensor::f32(vec![v.len()], v.to_vec()));
        }
        if let Some(v) = a.int("value_int") {
            return Ok(Tensor::i64(vec![], vec![v]));
        }
        if let Some(v) = a.ints("value_ints") {
            return Ok(Tensor::i64(vec![v.len()], v.to_vec()));
        }
        Err("Constant needs value, value_float(s) or value_int(s)".into())
    }
}

fn elem_width(dt: i32) -> Option<usize> {
    Some(match dt {
        1 | 6 | 12 => 4,
        7 | 11 | 13 => 8,
        10 | 16 | 5 | 4 => 2,
        3 | 2 | 9 => 1,
        _ => return None,
    })
}

fn to3(name: &str, v: &[i64]) -> Result<[usize; 3], String> {
    if v.len() != 3 {
        return Err(format!(
            "{name} {v:?}: expected 3 values (3-D), got {}",
            v.len()
        ));
    }
    let mut out = [0usize; 3];
    for (o, &x) in out.iter_mut().zip(v) {
        *o = usize::try_from(x)
            .ok()
            .filter(|&x| x <= 1 << 20)
            .ok_or_else(|| format!("{name} {v:?}: {x} is out of range"))?;
    }
    Ok(out)
}

fn pads6(v: Option<&[i64]>) -> Result<[usize; 6], String> {
    let Some(v) = v else { return Ok([0; 6]) };
    if v.len() != 6 {
        return Err(format!(
            "pads {v:?}: expected 6 values (3-D), got {}",
            v.len()
        ));
    }
    let mut out = [0usize; 6];
    for (o, &x) in out.iter_mut().zip(v) {
        *o = usize::try_from(x)
            .ok()
            .filter(|&x| x <= 1 << 20)
            .ok_or_else(|| format!("pads {v:?}: {x} is out of range"))?;
    }
    Ok(out)
}

fn auto_pad(s: &str) -> Result<AutoPad, String> {
    Ok(match s {
        "NOTSET" | "" => AutoPad::NotSet,
        "VALID" => AutoPad::Valid,
        "SAME_UPPER" => AutoPad::SameUpper,
        "SAME_LOWER" => AutoPad::SameLower,
        other => {
            return Err(format!(
                "auto_pad {other:?} is not one of NOTSET, VALID, SAME_UPPER, SAME_LOWER"
            ))
        }
    })
}

/// A node's attributes by name.
struct Attrs<'a> {
    by_name: HashMap<&'a str, &'a pb::AttributeProto>,
}

impl<'a> Attrs<'a> {
    fn new(n: &'a pb::NodeProto) -> Result<Self, String> {
        let mut by_name = HashMap::new();
        for a in &n.attribute {
            if a.ref_attr_name.is_some() {
                return Err("attribute references (functions) are not supported".into());
            }
            by_name.insert(a.name.as_deref().unwrap_or(""), a);
        }
        Ok(Self { by_name })
    }
    fn int(&self, k: &str) -> Option<i64> {
        self.by_name.get(k).and_then(|a| a.i)
    }
    fn ints(&self, k: &str) -> Option<&'a [i64]> {
        self.by_name.get(k).map(|a| a.ints.as_slice())
    }
    fn float(&self, k: &str) -> Option<f32> {
        self.by_name.get(k).and_then(|a| a.f)
    }
    fn floats(&self, k: &str) -> Option<&'a [f32]> {
        self.by_name.get(k).map(|a| a.floats.as_slice())
    }
    fn string(&self, k: &str) -> Option<&'a str> {
        self.by_name
            .get(k)
            .and_then(|a| a.s.as_deref())
            .and_then(|s| std::str::from_utf8(s).ok())
    }
    fn tensor(&self, k: &str) -> Option<&'a pb::TensorProto> {
        self.by_name.get(k).and_then(|a| a.t.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fixture() -> Vec<u8> {
        std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx/monai_unet/model.onnx"),
        )
        .unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        /// A real graph with bytes flipped and cut (the stable stand-in for the
        /// `onnx_load` fuzz target): decoding and planning return errors, never panic.
        #[test]
        fn mutated_fixture_bytes_never_panic(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut b = fixture();
            for (i, v) in flips {
                let at = i.index(b.len());
                b[at] ^= v | 1;
            }
            let keep = b.len() - cut.index(b.len() / 4);
            b.truncate(keep);
            if let Ok(g) = decode(bytes::Bytes::from(b), None) {
                if let Some(s) = g.declared_input() {
                    if s.iter().product::<usize>() <= 1 << 15 {
                        let _ = g.plan(s);
                    }
                }
            }
        }
    }

    #[test]
    fn the_fixture_decodes_with_its_names_and_op_counts() {
        let g = decode(bytes::Bytes::from(fixture()), None).unwrap();
        assert_eq!(g.input().name, "image");
        assert_eq!(g.input().dims_i64(), vec![1, 1, 24, 24, 24]);
        assert_eq!(g.output().name, "logits");
        assert!(
            g.op_counts().starts_with("Constant:18, Conv:11"),
            "{}",
            g.op_counts()
        );
    }
}
