#!/usr/bin/env python3
"""Writes PyTorch golden cases for ConvTranspose3d into tests/fixtures/golden_transpose/.

Each case NAME has NAME.input.npy ([N, C_in, D, H, W]), NAME.filters.npy ([C_in, C_out, kD, kH,
kW], PyTorch's ConvTranspose3d layout), NAME.bias.npy ([C_out]) and NAME.expected.npy, all
float32, and a [[case]] in cases.toml with its stride / pads_begin / pads_end / output_padding /
dilation / activation. Inputs come from a fixed seed; the expected output is
torch.nn.functional.conv_transpose3d in float64, then the activation, then rounded to float32.

PyTorch pads symmetrically; asymmetric (ONNX-style) pads are computed as the unpadded transposed
convolution (output_padding included) cropped by pads_begin at the start and pads_end at the end
of each axis, which is what ONNX ConvTranspose's pads mean.

Rerun (only to add or change cases; the Rust test `golden_values_from_pytorch` in
crates/voxconv-kernel/tests/transpose.rs reads the files):
    /work/pyenv/bin/python scripts/make_golden_transpose.py
"""
import os

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(os.path.dirname(HERE), "tests", "fixtures", "golden_transpose")

CASES = [
    # name, input, filters, stride, pads_begin, pads_end, output_padding, dilation, activation
    # U-Net upsampling: k = s = 2, no padding.
    ("unet_k2s2_relu", [1, 3, 3, 4, 5], [3, 2, 2, 2, 2], [2, 2, 2], [0, 0, 0], [0, 0, 0],
     [0, 0, 0], [1, 1, 1], "relu"),
    # The "same-size doubling" decoder: k = 3, s = 2, pad 1, output_padding 1.
    ("k3s2_pad1_op1_none", [1, 2, 3, 4, 3], [2, 3, 3, 3, 3], [2, 2, 2], [1, 1, 1], [1, 1, 1],
     [1, 1, 1], [1, 1, 1], "none"),
    # Dilated, mixed strides, output padding allowed by the dilation (stride 1 axes).
    ("dilated_sigmoid", [1, 2, 3, 4, 4], [2, 2, 3, 2, 3], [1, 2, 1], [2, 1, 0], [2, 1, 0],
     [1, 0, 1], [2, 1, 2], "sigmoid"),
    # Batch 2, per-axis strides, padding and output padding.
    ("batch2_leaky", [2, 3, 3, 3, 4], [3, 2, 3, 3, 3], [2, 1, 3], [0, 1, 1], [0, 1, 1],
     [1, 0, 2], [1, 1, 1], "leaky_relu:0.1"),
    # ONNX-style asymmetric pads (one crop larger than dil·(k − 1)).
    ("asymmetric_pads_none", [1, 2, 4, 3, 3], [2, 2, 2, 3, 2], [2, 3, 2], [1, 0, 2], [0, 2, 1],
     [1, 0, 0], [1, 1, 1], "none"),
    # Patch strategy with output padding (k = s, pad 0): the tail holds activation(bias).
    ("patch_op_relu", [2, 2, 2, 3, 2], [2, 3, 2, 1, 3], [2, 1, 3], [0, 0, 0], [0, 0, 0],
     [1, 0, 2], [1, 1, 1], "relu"),
    # The fused epilogues of issue 16: ELU, and PReLU with one slope per output channel.
    ("unet_k2s2_prelu", [1, 4, 3, 2, 5], [4, 3, 2, 2, 2], [2, 2, 2], [0, 0, 0], [0, 0, 0],
     [0, 0, 0], [1, 1, 1], "prelu:0.2,-0.3,0.7"),
    ("k3s2_pad1_op1_elu", [2, 3, 3, 3, 2], [3, 2, 3, 3, 3], [2, 2, 2], [1, 1, 1], [1, 1, 1],
     [1, 1, 1], [1, 1, 1], "elu:0.9"),
]


def act(y, name):
    if name == "relu":
        return F.relu(y)
    if name.startswith("leaky_relu"):
        return F.leaky_relu(y, float(name.split(":")[1]))
    if name == "sigmoid":
        return torch.sigmoid(y)
    if name.startswith("elu:"):
        return F.elu(y, float(name.split(":")[1]))
    if name.startswith("prelu:"):
        slopes = [float(s) for s in name.split(":")[1].split(",")]
        return F.prelu(y, torch.tensor(slopes, dtype=y.dtype))
    return y


def conv_transpose(x, w, b, s, pb, pe, op, d):
    x, w, b = (torch.from_numpy(a).double() for a in (x, w, b))
    if pb == pe:
        return F.conv_transpose3d(x, w, b, stride=s, padding=pb, output_padding=op, dilation=d)
    y = F.conv_transpose3d(x, w, b, stride=s, padding=0, output_padding=op, dilation=d)
    sl = [slice(None), slice(None)]
    for a in range(3):
        sl.append(slice(pb[a], y.shape[2 + a] - pe[a]))
    return y[tuple(sl)]


def main():
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(20261128)
    lines = ["# Made by scripts/make_golden_transpose.py with torch " + torch.__version__]
    for name, x_shape, w_shape, s, pb, pe, op, d, a in CASES:
        x = rng.uniform(-1, 1, x_shape).astype(np.float32)
        w = rng.uniform(-1, 1, w_shape).astype(np.float32)
        b = rng.uniform(-1, 1, w_shape[1]).astype(np.float32)
        y = act(conv_transpose(x, w, b, s, pb, pe, op, d), a).float().numpy()
        y = np.ascontiguousarray(y)
        for suffix, arr in [("input", x), ("filters", w), ("bias", b), ("expected", y)]:
            np.save(os.path.join(OUT, f"{name}.{suffix}.npy"), arr)
        lines += ["", "[[case]]", f'name = "{name}"', f"stride = {s}", f"pads_begin = {pb}",
                  f"pads_end = {pe}", f"output_padding = {op}", f"dilation = {d}",
                  f'activation = "{a}"']
    with open(os.path.join(OUT, "cases.toml"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
