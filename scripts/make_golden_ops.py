#!/usr/bin/env python3
"""Writes golden cases for the tensor operations of voxconv-kernel (src/ops.rs) into
tests/fixtures/golden_ops/, read by crates/voxconv-kernel/tests/ops.rs.

Each case NAME has NAME.input.npy and NAME.expected.npy (float32, C order), for the
normalizations also NAME.scale.npy and NAME.bias.npy, and a [[case]] table in cases.toml naming
its op and parameters (`op`, `source` = where the expected values come from, and per op: `eps`,
`groups`, `out_dhw`, `scales`, `mode`, `nearest_mode`, `coord`, `pad_mode`, `value`,
`pads_begin`, `pads_end`, `kernel`, `stride`, `dilation`, `ceil_mode`, `count_include_pad`).

Expected values come from PyTorch (instance_norm, group_norm, softmax(dim=1), interpolate
trilinear, pad, max_pool3d, avg_pool3d, mean), computed in float64 where the op is arithmetic and
rounded to float32, and from onnxruntime running a one-node ONNX model built with onnx.helper
(Resize nearest / linear with its coordinate_transformation_mode and nearest_mode, AveragePool
with asymmetric pads), in float32. Inputs come from a fixed seed, so a rerun reproduces the files.

Rerun (only to add or change cases), from the repository root:

    /work/pyenv/bin/python scripts/make_golden_ops.py

then run `cargo test --release -p voxconv-kernel --test ops`.
"""
import os

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(os.path.dirname(HERE), "tests", "fixtures", "golden_ops")
OPSET = 19

rng = np.random.default_rng(20260511)
cases = []  # (name, dict of toml fields, dict of arrays)


def uniform(shape, lo=-1.0, hi=1.0):
    return rng.uniform(lo, hi, shape).astype(np.float32)


def t64(a):
    return torch.from_numpy(a).double()


def f32(t):
    return t.float().numpy() if isinstance(t, torch.Tensor) else t.astype(np.float32)


def add(name, op, source, x, y, arrays=None, **fields):
    arrays = dict(arrays or {})
    arrays["input"] = np.ascontiguousarray(x, dtype=np.float32)
    arrays["expected"] = np.ascontiguousarray(f32(y), dtype=np.float32)
    cases.append((name, dict(op=op, source=source, **fields), arrays))


def run_onnx(node, x, out_rank, initializers):
    """Runs one ONNX node on input X with onnxruntime (CPU), returns output Y."""
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None] * out_rank)],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return sess.run(["Y"], {"X": x})[0]


# ----------------------------------------------------------------------------------------------
# Normalization, softmax, global average


def norm_cases():
    for name, shape, eps, offset in [
        ("instance_norm_odd_batch2", [2, 3, 3, 5, 7], 1e-5, 0.0),
        ("instance_norm_rank3", [2, 4, 17], 1e-3, 0.0),
        # A large mean and a small spread: needs the two-pass f64 statistics.
        ("instance_norm_offset", [1, 2, 3, 4, 5], 1e-5, 300.0),
    ]:
        x = uniform(shape) + np.float32(offset)
        c = shape[1]
        scale, bias = uniform([c], 0.5, 1.5), uniform([c])
        y = F.instance_norm(t64(x), weight=t64(scale), bias=t64(bias), eps=eps)
        add(name, "instance_norm", "torch.nn.functional.instance_norm (float64)", x, y,
            {"scale": scale, "bias": bias}, eps=eps)

    for name, shape, groups, eps in [
        ("group_norm_g3", [2, 6, 3, 4, 5], 3, 1e-5),
        ("group_norm_g1", [1, 4, 2, 3, 3], 1, 1e-3),
        ("group_norm_g_eq_c", [1, 4, 3, 3, 2], 4, 1e-5),
    ]:
        x = uniform(shape, -2.0, 3.0)
        c = shape[1]
        scale, bias = uniform([c], 0.5, 1.5), uniform([c])
        y = F.group_norm(t64(x), groups, weight=t64(scale), bias=t64(bias), eps=eps)
        add(name, "group_norm", "torch.nn.functional.group_norm (float64)", x, y,
            {"scale": scale, "bias": bias}, eps=eps, groups=groups)

    for name, shape, amp in [
        ("softmax_batch2", [2, 4, 3, 5, 6], 3.0),
        # Logits up to ±100 (exp overflows float32 without the max subtracted); 300 positions span
        # more than one block of the Rust loop.
        ("softmax_large_logits", [1, 3, 1, 2, 150], 100.0),
        ("softmax_one_channel", [1, 1, 2, 2, 3], 5.0),
    ]:
        x = uniform(shape, -amp, amp)
        y = torch.softmax(t64(x), dim=1)
        add(name, "softmax", "torch.softmax(dim=1) (float64)", x, y)

    x = uniform([2, 3, 4, 5, 3], -1.0, 2.0)
    y = t64(x).mean(dim=(2, 3, 4))
    add("global_avgpool", "global_avgpool", "torch mean over D, H, W (float64)", x, y)


# ----------------------------------------------------------------------------------------------
# Resize


def resize_torch_cases():
    # (name, input shape, scale_factor or size, align_corners, coord mode for voxconv)
    for name, shape, scale_factor, size, align, coord in [
        ("resize_trilinear_x2", [1, 2, 3, 4, 5], 2.0, None, False, "half_pixel"),
        ("resize_trilinear_x2_pytorch_half_pixel", [2, 1, 2, 3, 3], 2.0, None, False,
         "pytorch_half_pixel"),
        ("resize_trilinear_size_5to7", [1, 2, 5, 3, 5], None, (7, 5, 3), False, "half_pixel"),
        ("resize_trilinear_align_corners_x2", [1, 2, 3, 4, 5], 2.0, None, True,
         "align_corners"),
        ("resize_trilinear_align_corners_5to7", [1, 1, 5, 4, 5], None, (7, 6, 3), True,
         "align_corners"),
    ]:
        x = uniform(shape)
        y = F.interpolate(t64(x), size=size, scale_factor=scale_factor, mode="trilinear",
                          align_corners=align)
        out_dhw = list(y.shape[2:])
        if scale_factor is not None:
            scales = [scale_factor] * 3
        else:  # sizes: ONNX uses out / in, in float32
            scales = [float(np.float32(o) / np.float32(i)) for o, i in zip(out_dhw, shape[2:])]
        add(name, "resize", f"torch.nn.functional.interpolate trilinear align_corners={align} "
            "(float64)", x, y, out_dhw=out_dhw, scales=scales, mode="linear", coord=coord)


def resize_ort_cases():
    # (name, input shape, scales (D, H, W) or None, sizes (D, H, W) or None, mode, coord,
    #  nearest_mode)
    for name, shape, scales, sizes, mode, coord, nearest in [
        # Given scales whose out/in differ from the scales (W: 5 * 0.7 -> 3, not 0.6).
        ("resize_nearest_asymmetric_floor", [1, 2, 3, 4, 5], [2.0, 1.5, 0.7], None, "nearest",
         "asymmetric", "floor"),
        # H 6 -> 3 at half_pixel lands on .5 ties.
        ("resize_nearest_half_pixel_round_prefer_floor", [1, 2, 4, 6, 3], None, [8, 3, 5],
         "nearest", "half_pixel", "round_prefer_floor"),
        ("resize_nearest_half_pixel_round_prefer_ceil", [1, 2, 4, 6, 3], None, [8, 3, 5],
         "nearest", "half_pixel", "round_prefer_ceil"),
        ("resize_nearest_align_corners_ceil", [1, 1, 3, 5, 4], None, [5, 7, 1], "nearest",
         "align_corners", "ceil"),
        ("resize_nearest_pytorch_half_pixel_floor", [2, 1, 3, 4, 2], None, [6, 1, 5],
         "nearest", "pytorch_half_pixel", "floor"),
        ("resize_linear_half_pixel_ort", [1, 2, 3, 4, 5], None, [6, 7, 3], "linear",
         "half_pixel", "round_prefer_floor"),
        ("resize_linear_asymmetric_scales_ort", [1, 1, 4, 3, 5], [1.5, 2.0, 0.7], None,
         "linear", "asymmetric", "round_prefer_floor"),
    ]:
        x = uniform(shape)
        inits = [numpy_helper.from_array(np.zeros(0, np.float32), "roi")]
        if scales is not None:
            inits.append(numpy_helper.from_array(np.array([1, 1] + scales, np.float32),
                                                 "scales"))
            inputs = ["X", "roi", "scales"]
        else:
            inits.append(numpy_helper.from_array(np.array(shape[:2] + sizes, np.int64),
                                                 "sizes"))
            inputs = ["X", "roi", "", "sizes"]
        node = helper.make_node("Resize", inputs, ["Y"], mode=mode,
                                coordinate_transformation_mode=coord, nearest_mode=nearest)
        y = run_onnx(node, x, 5, inits)
        out_dhw = list(y.shape[2:])
        if scales is not None:
            sc = [float(np.float32(s)) for s in scales]
        else:
            sc = [float(np.float32(o) / np.float32(i)) for o, i in zip(out_dhw, shape[2:])]
        fields = dict(out_dhw=out_dhw, scales=sc, mode=mode, coord=coord)
        if mode == "nearest":
            fields["nearest_mode"] = nearest
        add(name, "resize", f"onnxruntime {ort.__version__} Resize opset {OPSET}", x, y,
            **fields)


# ----------------------------------------------------------------------------------------------
# Pad, pooling


def torch_pad_tuple(pb, pe):
    # F.pad takes (W_begin, W_end, H_begin, H_end, D_begin, D_end).
    return (pb[2], pe[2], pb[1], pe[1], pb[0], pe[0])


def pad_cases():
    for name, shape, pb, pe, mode, value in [
        ("pad_constant", [2, 2, 3, 2, 4], [1, 0, 2], [2, 1, 1], "constant", 0.5),
        ("pad_edge", [1, 2, 3, 4, 5], [1, 2, 0], [2, 1, 3], "edge", None),
        ("pad_reflect", [1, 2, 3, 4, 5], [1, 2, 0], [2, 1, 4], "reflect", None),
    ]:
        x = uniform(shape)
        tmode = {"constant": "constant", "edge": "replicate", "reflect": "reflect"}[mode]
        kw = {"value": value} if mode == "constant" else {}
        y = F.pad(t64(x), torch_pad_tuple(pb, pe), mode=tmode, **kw)
        fields = dict(pads_begin=pb, pads_end=pe, pad_mode=mode)
        if value is not None:
            fields["value"] = value
        add(name, "pad", f"torch.nn.functional.pad mode={tmode}", x, y, **fields)


def pool_fields(k, s, pb, pe, d, ceil):
    return dict(kernel=k, stride=s, pads_begin=pb, pads_end=pe, dilation=d, ceil_mode=ceil)


def pool_cases():
    # Max pooling, symmetric padding: torch max_pool3d.
    for name, shape, k, s, p, d, ceil in [
        ("maxpool_pad_stride", [1, 2, 5, 6, 7], [3, 3, 3], [2, 2, 2], [1, 1, 1], [1, 1, 1],
         False),
        ("maxpool_dilation", [1, 1, 7, 8, 9], [2, 3, 2], [1, 2, 2], [1, 1, 0], [2, 1, 3],
         False),
        ("maxpool_ceil", [2, 1, 5, 6, 7], [2, 2, 3], [2, 2, 2], [0, 1, 1], [1, 1, 1], True),
        # D: 5 + 2 pads, k 2, s 2: ceil gives 4 windows, the last would start in the end pad.
        ("maxpool_ceil_drop_last", [1, 2, 5, 6, 3], [2, 3, 2], [2, 2, 2], [1, 1, 1],
         [1, 1, 1], True),
        ("maxpool_ceil_dilation", [1, 1, 6, 7, 8], [2, 2, 3], [2, 3, 2], [1, 1, 1], [2, 2, 1],
         True),
    ]:
        x = uniform(shape)
        y = F.max_pool3d(torch.from_numpy(x), k, s, p, d, ceil_mode=ceil)
        add(name, "maxpool", "torch.nn.functional.max_pool3d", x, y,
            **pool_fields(k, s, p, p, d, ceil))

    # Asymmetric padding: -inf padding, then max_pool3d without padding.
    x = uniform([1, 2, 4, 5, 6])
    pb, pe, k, s = [0, 1, 2], [1, 0, 1], [2, 3, 3], [1, 2, 2]
    xp = F.pad(torch.from_numpy(x), torch_pad_tuple(pb, pe), value=float("-inf"))
    y = F.max_pool3d(xp, k, s)
    add("maxpool_asymmetric_pads", "maxpool", "torch max_pool3d after F.pad with -inf", x, y,
        **pool_fields(k, s, pb, pe, [1, 1, 1], False))

    # Average pooling: torch avg_pool3d (float64).
    for name, shape, k, s, p, ceil, include in [
        ("avgpool_include_pad", [1, 2, 5, 6, 7], [3, 3, 3], [2, 2, 2], [1, 1, 1], False, True),
        ("avgpool_exclude_pad", [1, 2, 5, 6, 7], [3, 3, 3], [2, 2, 2], [1, 1, 1], False,
         False),
        ("avgpool_ceil_include_pad", [2, 1, 5, 6, 7], [2, 3, 3], [2, 2, 2], [1, 1, 1], True,
         True),
        ("avgpool_ceil_exclude_pad", [2, 1, 5, 6, 7], [2, 3, 3], [2, 2, 2], [1, 1, 1], True,
         False),
        ("avgpool_ceil_no_pad", [1, 1, 5, 7, 6], [2, 3, 4], [2, 3, 3], [0, 0, 0], True, True),
    ]:
        x = uniform(shape)
        y = F.avg_pool3d(t64(x), k, s, p, ceil_mode=ceil, count_include_pad=include)
        add(name, "avgpool", f"torch.nn.functional.avg_pool3d count_include_pad={include} "
            "(float64)", x, y, count_include_pad=include,
            **pool_fields(k, s, p, p, [1, 1, 1], ceil))

    # Asymmetric pads (no ceil mode): onnxruntime AveragePool.
    for include in [False, True]:
        x = uniform([1, 2, 4, 5, 6])
        pb, pe, k, s = [0, 1, 2], [1, 2, 0], [2, 3, 3], [1, 2, 2]
        node = helper.make_node("AveragePool", ["X"], ["Y"], kernel_shape=k, strides=s,
                                pads=pb + pe, count_include_pad=int(include))
        y = run_onnx(node, x, 5, [])
        suffix = "include" if include else "exclude"
        add(f"avgpool_asymmetric_{suffix}_pad_ort", "avgpool",
            f"onnxruntime {ort.__version__} AveragePool opset {OPSET}", x, y,
            count_include_pad=include, **pool_fields(k, s, pb, pe, [1, 1, 1], False))


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return repr(float(v))
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(e) for e in v) + "]"
    raise TypeError(type(v))


def main():
    norm_cases()
    resize_torch_cases()
    resize_ort_cases()
    pad_cases()
    pool_cases()
    os.makedirs(OUT, exist_ok=True)
    for f in os.listdir(OUT):
        if f.endswith(".npy"):
            os.remove(os.path.join(OUT, f))
    lines = [
        "# Made by scripts/make_golden_ops.py with torch " + torch.__version__
        + ", onnx " + onnx.__version__ + ", onnxruntime " + ort.__version__
        + ", numpy " + np.__version__ + "; rerun that script to change it.",
    ]
    for name, fields, arrays in cases:
        lines += ["", "[[case]]", f"name = {toml_value(name)}"]
        lines += [f"{k} = {toml_value(v)}" for k, v in fields.items()]
        for suffix, arr in arrays.items():
            np.save(os.path.join(OUT, f"{name}.{suffix}.npy"), arr)
    with open(os.path.join(OUT, "cases.toml"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
