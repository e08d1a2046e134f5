#!/usr/bin/env python3
"""Builds small 3D U-Nets (MONAI BasicUNet / UNet / SegResNet, nnU-Net PlainConvUNet) with
seeded random weights, exports them to ONNX and writes the test fixtures for voxconv's ONNX
importer:

    tests/fixtures/onnx/<name>/model.onnx     opset 17, weights inside the file (no external data)
    tests/fixtures/onnx/<name>/input.npy      float32, seeded standard-normal values
    tests/fixtures/onnx/<name>/expected.npy   float32, onnxruntime's output for input.npy
                                              (CPUExecutionProvider, ORT_ENABLE_ALL, 1 thread)
    tests/fixtures/onnx/monai_basicunet_dynamic/input2.npy, expected2.npy
                                              second pair for the model with dynamic N/D/H/W axes
    tests/fixtures/onnx/OPS.md                op types, counts, attribute sets and constant
                                              operands of every model, read back with `onnx`

Rerun (a minute or so on 2 cores) with the project's Python environment:

    /work/pyenv/bin/python scripts/export_onnx.py [--out tests/fixtures/onnx]

Needs torch, onnx, onnxruntime, numpy, monai and dynamic-network-architectures. Nothing is
downloaded: every network is built from its class and initialised from torch.manual_seed.
Besides the default conv initialisation, every norm layer's affine weight/bias and every PReLU
slope is re-drawn away from its default (1 / 0 / 0.25), so that an implementation that ignores
or misapplies them fails. The script checks that onnxruntime agrees with PyTorch to within
1e-4 * max|reference| and prints the max abs difference per model.
"""
import argparse
import collections
import os
import sys

import numpy as np
import torch
import torch.nn as nn

import onnx
from onnx import numpy_helper
import onnxruntime as ort

torch.set_num_threads(1)
torch.set_num_interop_threads(1)

MAX_MODEL_BYTES = 1 << 20
DEFAULT_DOMAIN = 'ai.onnx (domain "")'
MAX_TOTAL_BYTES = 4 << 20


# --------------------------------------------------------------------------- networks

def _randomise(model, seed):
    """Re-draw norm affine parameters and PReLU slopes away from their defaults."""
    g = torch.Generator().manual_seed(seed + 1000)
    norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, norm_types):
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))  # U(0.5, 1.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, nn.PReLU):
                m.weight.copy_(0.05 + 0.5 * torch.rand(m.weight.shape, generator=g))
    return model


def monai_basicunet():
    from monai.networks.nets import BasicUNet
    return BasicUNet(spatial_dims=3, in_channels=1, out_channels=2, features=(4, 4, 8, 8, 16, 4))


def monai_unet():
    from monai.networks.nets import UNet
    return UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8, 16), strides=(2, 2),
                num_res_units=2, act="PRELU", norm="INSTANCE")


def monai_segresnet():
    from monai.networks.nets import SegResNet
    return SegResNet(spatial_dims=3, init_filters=4, in_channels=2, out_channels=2,
                     blocks_down=(1, 2, 2), blocks_up=(1, 1), upsample_mode="nontrainable",
                     norm=("GROUP", {"num_groups": 2}))


def nnunet_plainconv():
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    return PlainConvUNet(input_channels=1, n_stages=4, features_per_stage=(4, 8, 16, 16),
                         conv_op=nn.Conv3d, kernel_sizes=3, strides=(1, 2, 2, 2),
                         n_conv_per_stage=2, num_classes=3, n_conv_per_stage_decoder=2,
                         conv_bias=True, norm_op=nn.InstanceNorm3d,
                         norm_op_kwargs={"eps": 1e-5, "affine": True},
                         nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True},
                         deep_supervision=False)


DYN_AXES = {0: "N", 2: "D", 3: "H", 4: "W"}

# name, builder, seed, input shapes (first one is the export example), dynamic axes
MODELS = [
    ("monai_basicunet", monai_basicunet, 1, [(1, 1, 32, 32, 32)], None),
    ("monai_unet", monai_unet, 2, [(1, 1, 24, 24, 24)], None),
    ("monai_segresnet", monai_segresnet, 3, [(1, 2, 24, 24, 24)], None),
    ("nnunet_plainconv", nnunet_plainconv, 4, [(1, 1, 32, 32, 32)], None),
    ("monai_basicunet_dynamic", monai_basicunet, 1, [(1, 1, 32, 32, 32), (2, 1, 16, 48, 32)],
     {"image": DYN_AXES, "logits": DYN_AXES}),
]


# --------------------------------------------------------------------------- export + check

def _session(path):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])


def export_one(out_root, name, build, seed, shapes, dynamic_axes):
    torch.manual_seed(seed)
    model = _randomise(build(), seed).eval()
    d = os.path.join(out_root, name)
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "model.onnx")
    rng = np.random.default_rng(seed)
    inputs = [rng.standard_normal(s).astype(np.float32) for s in shapes]

    kwargs = {"dynamic_axes": dynamic_axes} if dynamic_axes else {}
    with torch.no_grad():
        torch.onnx.export(model, torch.from_numpy(inputs[0]), path, opset_version=17,
                          dynamo=False, input_names=["image"], output_names=["logits"],
                          do_constant_folding=True, **kwargs)

    m = onnx.load(path, load_external_data=False)
    onnx.checker.check_model(m)
    for init in m.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL or init.external_data:
            sys.exit(f"{name}: initializer {init.name} uses external data")
    if os.path.getsize(path) > MAX_MODEL_BYTES:
        sys.exit(f"{name}: model.onnx is {os.path.getsize(path)} bytes (> 1 MiB)")
    if any(os.path.exists(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".data")):
        sys.exit(f"{name}: external data file written")

    sess = _session(path)
    diffs = []
    for i, x in enumerate(inputs):
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        got = sess.run(["logits"], {"image": x})[0].astype(np.float32)
        if got.shape != ref.shape:
            sys.exit(f"{name}: ORT shape {got.shape} != torch shape {ref.shape}")
        diff = float(np.max(np.abs(got - ref)))
        scale = float(np.max(np.abs(ref)))
        tol = 1e-4 * scale
        print(f"{name} input{i + 1 if i else ''} {tuple(x.shape)} -> {tuple(got.shape)}: "
              f"max|ORT-torch| = {diff:.3e}  (max|ref| = {scale:.3e}, tol {tol:.3e})")
        if not diff <= tol:
            sys.exit(f"{name}: ORT and PyTorch disagree")
        suffix = str(i + 1) if i else ""
        np.save(os.path.join(d, f"input{suffix}.npy"), x)
        np.save(os.path.join(d, f"expected{suffix}.npy"), got)
        diffs.append(diff)
    return path, diffs, inputs


# --------------------------------------------------------------------------- OPS.md

_DT = {v: k for k, v in onnx.TensorProto.DataType.items()}
# Ops whose every node is listed with its runtime input/output shapes (and INT64 values).
_DETAIL_OPS = {"Resize", "Reshape", "Pad", "Shape", "Gather", "Slice", "Unsqueeze", "Squeeze",
               "Concat", "Cast", "ConstantOfShape", "Transpose", "Expand", "Range", "Flatten",
               "ConvTranspose", "MaxPool", "AveragePool", "Softmax", "Split"}


def _vals(arr, limit=16, float_limit=8):
    flat = arr.reshape(-1)
    if arr.dtype.kind == "f":
        if flat.size == 1:
            return repr(float(flat[0]))
        if flat.size and np.all(flat == flat[0]):
            return f"all {float(flat[0])!r}"
        if flat.size <= float_limit:
            return "[" + ", ".join(repr(float(x)) for x in flat) + "]"
        return "random"
    if flat.size > limit:
        return f"<{flat.size} values>"
    s = "[" + ", ".join(str(int(x)) for x in flat) + "]"
    return s if arr.ndim else str(int(flat[0]))


def _fmt_attr(a):
    v = onnx.helper.get_attribute_value(a)
    if isinstance(v, bytes):
        return f'{a.name}="{v.decode()}"'
    if isinstance(v, float):
        return f"{a.name}={v!r}"
    if isinstance(v, (list, tuple)):
        return f"{a.name}=[{', '.join(str(x) for x in v)}]"
    if isinstance(v, onnx.TensorProto):
        arr = numpy_helper.to_array(v)
        return f"{a.name}=tensor {_DT[v.data_type]}{list(arr.shape)}={_vals(arr)}"
    return f"{a.name}={v}"


def _fmt_type(t):
    dims = [dd.dim_param if dd.dim_param else str(dd.dim_value) for dd in t.tensor_type.shape.dim]
    return f"{_DT[t.tensor_type.elem_type]}[{', '.join(dims)}]"


def _probe(path, inputs):
    """Every intermediate tensor of the model for each input (ORT, no graph optimisation)."""
    m = onnx.load(path)
    inferred = onnx.shape_inference.infer_shapes(m)
    etype = {vi.name: vi.type.tensor_type.elem_type
             for vi in list(inferred.graph.value_info) + list(m.graph.output)}
    have = {o.name for o in m.graph.output}
    for n in m.graph.node:
        for o in n.output:
            if o and o not in have:
                m.graph.output.append(onnx.helper.make_tensor_value_info(o, etype[o], None))
                have.add(o)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(m.SerializeToString(), sess_options=so,
                                providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    runs = []
    for x in inputs:
        vals = dict(zip(names, sess.run(None, {"image": x})))
        vals["image"] = x
        runs.append(vals)
    return runs


def describe(name, path, out_root, inputs):
    m = onnx.load(path)
    g = m.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    init_dt = {t.name: _DT[t.data_type] for t in g.initializer}
    consts = {}
    for n in g.node:
        if n.op_type == "Constant":
            (a,) = n.attribute
            consts[n.output[0]] = (_DT[a.t.data_type], numpy_helper.to_array(a.t))
    graph_inputs = {i.name for i in g.input}
    producer = {o: n for n in g.node for o in n.output}
    runs = _probe(path, inputs)

    const_derived = {}

    def is_const(nm):
        if nm in inits or nm in consts or nm == "":
            return True
        if nm in graph_inputs:
            return False
        if nm not in const_derived:
            const_derived[nm] = all(is_const(i) for i in producer[nm].input)
        return const_derived[nm]

    def dt(nm):
        return _DT[onnx.helper.np_dtype_to_tensor_dtype(runs[0][nm].dtype)]

    def operand(nm):
        if nm == "":
            return '"" (omitted)'
        if nm in inits:
            a = inits[nm]
            return f"initializer {init_dt[nm]}{list(a.shape)}={_vals(a)}"
        if nm in consts:
            t, a = consts[nm]
            return f"Constant {t}{list(a.shape)}={_vals(a)}"
        if nm in graph_inputs:
            return f"graph input `{nm}`"
        if is_const(nm):
            a = runs[0][nm]
            return f"computed-from-constants {dt(nm)}{list(a.shape)}={_vals(a)}"
        r = runs[0][nm]
        if r.dtype.kind != "f":
            return f"runtime {dt(nm)}[{r.size}] (from a Shape)"
        return f"runtime {dt(nm)} rank {r.ndim}"

    def rt(nm):
        if nm == "":
            return '""'
        if nm in inits:
            return f"initializer {init_dt[nm]}{list(inits[nm].shape)}"
        if nm in consts:
            return f"Constant {consts[nm][0]}{list(consts[nm][1].shape)}={_vals(consts[nm][1])}"
        parts = []
        for r in runs:
            a = r[nm]
            s = f"{dt(nm)}{list(a.shape)}"
            if a.dtype.kind != "f" and a.size <= 16:
                s += f"={_vals(a)}"
            parts.append(s)
        return " | ".join(parts) if len(set(parts)) > 1 else parts[0]

    lines = [f"## {name}", ""]
    lines.append(f"- file: `{os.path.relpath(path, out_root)}` ({os.path.getsize(path)} bytes), "
                 f"ir_version {m.ir_version}, producer `{m.producer_name} {m.producer_version}`")
    lines.append("- opset_import: " + ", ".join(
        f"{o.domain or DEFAULT_DOMAIN} version {o.version}" for o in m.opset_import))
    for kind, vis in (("input", g.input), ("output", g.output)):
        for vi in vis:
            lines.append(f"- graph {kind}: `{vi.name}` {_fmt_type(vi.type)}")
    if len(runs) > 1:
        lines.append("- runtime shapes below are given as `input.npy | input2.npy` where they differ")
    n_params = sum(a.size for a in inits.values())
    inline = all(t.data_location != onnx.TensorProto.EXTERNAL and not t.external_data
                 for t in g.initializer)
    raw = all(t.HasField("raw_data") for t in g.initializer)
    lines.append(f"- initializers: {len(inits)} ({n_params} values, dtypes "
                 f"{', '.join(sorted(set(init_dt.values())))}); "
                 + ("all inline" if inline else "EXTERNAL DATA")
                 + (", all as raw_data (little-endian)" if raw else ", some as typed fields"))
    lines.append(f"- Constant nodes: {len(consts)}; all nodes in the default domain: "
                 f"{all(n.domain in ('', 'ai.onnx') for n in g.node)}")
    lines.append(f"- nodes: {len(g.node)}, listed in topological order in the file; "
                 f"value_info entries: {len(g.value_info)}")
    lines.append("")

    counts = collections.Counter(n.op_type for n in g.node)
    lines.append("| op | count |")
    lines.append("|---|---|")
    for op, c in sorted(counts.items()):
        lines.append(f"| {op} | {c} |")
    lines.append("")

    for op in sorted(counts):
        nodes = [n for n in g.node if n.op_type == op]
        lines.append(f"### {op} ({counts[op]})")
        lines.append("")
        if op == "Constant":
            kinds = collections.Counter()
            for n in nodes:
                t, a = consts[n.output[0]]
                kinds[f"value = {t}{list(a.shape)}"] += 1
            for k, c in sorted(kinds.items()):
                lines.append(f"- {c}x {k}")
            lines.append("")
            continue
        sigs = collections.Counter()
        for n in nodes:
            attrs = ", ".join(_fmt_attr(a) for a in sorted(n.attribute, key=lambda a: a.name))
            ins = []
            for k, nm in enumerate(n.input):
                if op in ("Conv", "ConvTranspose") and k > 0 and nm in inits:
                    ins.append(f"in{k}: initializer {init_dt[nm]} rank {inits[nm].ndim}")
                elif op == "InstanceNormalization" and k > 0 and nm in inits:
                    ins.append(f"in{k}: initializer {init_dt[nm]}[C]="
                               f"{_vals(inits[nm], float_limit=0)}")
                elif op == "InstanceNormalization" and k > 0 and nm in consts:
                    ins.append(f"in{k}: Constant {consts[nm][0]}[C]="
                               f"{_vals(consts[nm][1], float_limit=0)}")
                elif op in ("Mul", "Add", "PRelu") and nm in inits:
                    ins.append(f"in{k}: initializer {init_dt[nm]}{list(inits[nm].shape)} "
                               f"({'one value per node' if inits[nm].size == 1 else _vals(inits[nm], float_limit=0)})")
                else:
                    ins.append(f"in{k}: {operand(nm)}")
            sigs[(attrs or "(none)", "; ".join(ins) or "(none)", len(n.output))] += 1
        for (attrs, ins, nout), c in sorted(sigs.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"- {c}x attributes: `{attrs}`")
            lines.append(f"  - inputs: {ins}" + (f"; {nout} outputs" if nout != 1 else ""))
        if op in ("Conv", "ConvTranspose"):
            shapes = collections.Counter()
            for n in nodes:
                w = inits[n.input[1]]
                has_b = len(n.input) > 2 and n.input[2] != ""
                shapes[(str(list(w.shape)), "bias" if has_b else "no bias")] += 1
            lines.append("- weight shapes: " + ", ".join(
                f"{c}x {w} {b}" for (w, b), c in sorted(shapes.items())))
        if op == "PRelu":
            lines.append("- slope values: " + ", ".join(
                _vals(inits[n.input[1]]) if n.input[1] in inits else "(not an initializer)"
                for n in nodes))
        if op in _DETAIL_OPS and not (op == "Concat" and all(
                runs[0][n.output[0]].dtype.kind == "f" for n in nodes) and len(nodes) > 8):
            lines.append("- nodes (runtime shapes; identical nodes collapsed):")
            groups = collections.OrderedDict()
            for n in nodes:
                text = (", ".join(rt(i) for i in n.input) + " -> "
                        + ", ".join(rt(o) for o in n.output))
                groups.setdefault(text, []).append(n.name)
            for text, names in groups.items():
                who = ", ".join(f"`{x}`" for x in names)
                lines.append(f"  - {len(names)}x {who}: {text}")
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main

NOTES = """## Notes for the importer (what these exports contain)

- Every model: one graph input `image` and one output `logits`, FLOAT, NCDHW; opset_import is
  the default domain only, version 17; ir_version 8; weights are FLOAT initializers stored
  inline as raw_data. No Softmax/Sigmoid at the end (raw logits). No Gather, Unsqueeze,
  AveragePool, GroupNormalization or Dropout nodes appear anywhere.
- Conv: always 3D, group=1, dilations=1, symmetric explicit `pads` (no auto_pad); kernels 3
  (pads 1, stride 1 or 2) and 1 (pads 0). SegResNet convs have no bias input (2 inputs) except
  the final 1x1 one.
- ConvTranspose (weight layout [C_in, C_out, kD, kH, kW]): k=2/stride 2/pads 0 without
  output_padding (BasicUNet, nnU-Net) and k=3/stride 2/pads 1/output_padding=[1,1,1] (MONAI
  UNet); no output_shape attribute.
- InstanceNormalization: epsilon is float32 1e-5 (9.999999747378752e-06). Scale/bias are
  random initializers where the torch norm is affine (BasicUNet, nnU-Net), Constant ones/zeros
  where it is not (MONAI UNet, `norm="INSTANCE"` gives affine=False), and Constant ones/zeros
  of length num_groups in the GroupNorm decomposition.
- GroupNorm (SegResNet, opset 17 has no GroupNormalization): x[N,C,D,H,W] -> Reshape(x,
  Constant [0, 2, -1]) (0 = copy dim, allowzero=0) -> InstanceNormalization over [N, G, C/G*DHW]
  with ones/zeros -> Reshape(., Shape(x)) -> Mul(., gamma[C,1,1,1]) -> Add(., beta[C,1,1,1]).
  Mul/Add use multidirectional (numpy) broadcasting of the rank-4 initializer against rank 5.
- Resize (SegResNet only): mode="linear", coordinate_transformation_mode="half_pixel",
  cubic_coeff_a=-0.75, nearest_mode="floor" written explicitly; 3 inputs: X, roi = "" (empty
  name), scales = Constant FLOAT[5] [1, 1, 2, 2, 2]; no `sizes` input; no antialias/
  exclude_outside/keep_aspect_ratio_policy attributes. (torch trilinear, align_corners=False.)
- PRelu (MONAI UNet): slope initializer FLOAT[1, 1, 1, 1] (one shared slope per layer,
  num_parameters=1), broadcast against [N, C, D, H, W].
- LeakyRelu alpha: 0.1 (float32 0.10000000149011612) in MONAI BasicUNet, 0.01
  (0.009999999776482582) in nnU-Net.
- MaxPool (BasicUNet): kernel 2, stride 2, pads 0, dilations 1, ceil_mode 0; single output.
- Pad (BasicUNet UpCat, F.pad(..., "replicate")): mode="edge", 2 inputs (no constant_value, no
  axes); `pads` INT64[10] = [x1_begin..x5_begin, x1_end..x5_end] is NOT folded by the exporter:
  it is computed at run time from Constants by Concat(Constant [0]*6, ConstantOfShape(Constant
  [4]) value INT64 0) -> Reshape [-1, 2] -> Slice(starts [-1], ends [-9223372036854775807],
  axes [0], steps [-1]) (reverses the 5 rows) -> Transpose perm [1, 0] -> Reshape [-1] ->
  Cast to=7 (INT64->INT64); torch skips folding it because of the steps=-1 Slice. Its value
  is all zeros, so Pad is an identity here; an importer can constant-fold this INT64
  subgraph or implement those ops on INT64 tensors.
- monai_basicunet_dynamic: the same graph as monai_basicunet (same weights, same seeded
  input.npy) except that N, D, H, W of input and output are dim_params "N", "D", "H", "W".
  Tracing evaluated BasicUNet's shape checks in Python, so the graph contains NO Shape/Gather
  plumbing and the Pad amounts are baked-in zeros: the model is only valid for D, H, W that are
  multiples of 16 (input2 is [2, 1, 16, 48, 32]). No model carries value_info for intermediate
  tensors; only the graph input/output have shapes, so an importer infers shapes itself.
"""

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "tests", "fixtures", "onnx"))
    args = ap.parse_args()
    out_root = os.path.normpath(args.out)
    os.makedirs(out_root, exist_ok=True)
    print(f"torch {torch.__version__}, onnx {onnx.__version__}, onnxruntime {ort.__version__}")

    sections, results = [], []
    for name, build, seed, shapes, dyn in MODELS:
        path, diffs, inputs = export_one(out_root, name, build, seed, shapes, dyn)
        results.append((name, diffs))
        sections.append(describe(name, path, out_root, inputs))

    total = 0
    for dirpath, _, files in os.walk(out_root):
        total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files if f != "OPS.md")
    if total > MAX_TOTAL_BYTES:
        sys.exit(f"fixtures total {total} bytes (> 4 MiB)")

    header = [
        "# ONNX fixture op inventory",
        "",
        "Generated by `scripts/export_onnx.py` (do not edit by hand; rerun the script).",
        f"torch {torch.__version__}, onnx {onnx.__version__}, onnxruntime {ort.__version__}; "
        "`torch.onnx.export(..., opset_version=17, dynamo=False, do_constant_folding=True)`.",
        "All tensors are float32 unless noted; layout NCDHW. `expected*.npy` is onnxruntime's "
        "output (CPU, ORT_ENABLE_ALL, 1 thread).",
        "",
        "Max abs difference ORT vs PyTorch (tolerance 1e-4 * max|ref|):",
        "",
    ]
    for name, diffs in results:
        header.append(f"- {name}: " + ", ".join(f"{d:.3e}" for d in diffs))
    header += ["", "Legend. Per op type: each distinct (attribute set, input feeding) with its "
               "count; attributes not listed are absent from the node (ONNX defaults apply). "
               "Inputs: `\"\" (omitted)` = empty-string input name; `initializer` = graph "
               "initializer; `Constant` = output of a Constant node; `computed-from-constants` "
               "= computed at run time by other nodes but only from Constants/initializers "
               "(foldable), value shown; `runtime FLOAT rank 5` = activation tensor. Float "
               "constants are shown in full when they have at most 8 elements (norm scale/bias "
               "and Mul/Add parameters only as `all v` or `random`); INT64 values are shown "
               "when they have at most 16 elements. `nodes (runtime shapes)` gives shapes (and "
               "INT64 values) observed by running onnxruntime on the fixture input(s).", ""]
    names = [r[0] for r in results]
    per_model = {nm: collections.Counter(n.op_type for n in onnx.load(
        os.path.join(out_root, nm, "model.onnx")).graph.node) for nm in names}
    all_ops = sorted(set().union(*per_model.values()))
    header += ["## Op types per model", "",
               "| op | " + " | ".join(names) + " |",
               "|---|" + "---|" * len(names)]
    for op in all_ops:
        header.append(f"| {op} | " + " | ".join(str(per_model[nm].get(op, "")) for nm in names)
                      + " |")
    header += ["", NOTES, ""]
    with open(os.path.join(out_root, "OPS.md"), "w") as f:
        f.write("\n".join(header + sections).rstrip() + "\n")
    print(f"fixtures: {total} bytes in {out_root}")


if __name__ == "__main__":
    main()
