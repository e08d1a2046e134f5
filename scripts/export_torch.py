#!/usr/bin/env python3
"""Exports a PyTorch nn.Sequential of Conv3d / BatchNorm3d / ReLU / LeakyReLU / Sigmoid /
MaxPool3d layers into a voxconv model directory: model.toml + weights.safetensors.

    from export_torch import export
    export(net.eval(), "models/my_net", "what it computes")

`python scripts/export_torch.py --fixture` rebuilds the test fixture (tests/fixtures/models/
tiny_net and its input / PyTorch output in tests/fixtures/tiny_net_io).
"""
import argparse
import os

import torch
import torch.nn as nn
from safetensors.torch import save_file


def _triple(v):
    return list(v) if isinstance(v, (tuple, list)) else [v, v, v]


def export(seq, out_dir, description):
    if not isinstance(seq, nn.Sequential):
        raise TypeError("expected an nn.Sequential")
    os.makedirs(out_dir, exist_ok=True)
    tensors, lines = {}, [f"description = {description!r}".replace("'", '"')]
    for name, m in seq.named_children():
        lines.append("")
        lines.append("[[layers]]")

        def put(key, t):
            tensors[f"{name}.{key}"] = t.detach().to(torch.float32).contiguous().cpu()
            return f'"{name}.{key}"'

        if isinstance(m, nn.Conv3d):
            if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
                raise ValueError(f"layer {name}: only groups=1, zero padding given as numbers")
            lines += ['op = "conv3d"', f"weight = {put('weight', m.weight)}"]
            if m.bias is not None:
                lines.append(f"bias = {put('bias', m.bias)}")
            lines += [f"stride = {_triple(m.stride)}", f"padding = {_triple(m.padding)}",
                      f"dilation = {_triple(m.dilation)}"]
        elif isinstance(m, nn.BatchNorm3d):
            lines += ['op = "batchnorm3d"', f"weight = {put('weight', m.weight)}",
                      f"bias = {put('bias', m.bias)}",
                      f"running_mean = {put('running_mean', m.running_mean)}",
                      f"running_var = {put('running_var', m.running_var)}", f"eps = {m.eps!r}"]
        elif isinstance(m, nn.ReLU):
            lines.append('op = "relu"')
        elif isinstance(m, nn.LeakyReLU):
            lines += ['op = "leaky_relu"', f"alpha = {m.negative_slope!r}"]
        elif isinstance(m, nn.Sigmoid):
            lines.append('op = "sigmoid"')
        elif isinstance(m, nn.MaxPool3d):
            if _triple(m.padding) != [0, 0, 0] or _triple(m.dilation) != [1, 1, 1] or m.ceil_mode:
                raise ValueError(f"layer {name}: MaxPool3d without padding, dilation or ceil_mode")
            stride = m.stride if m.stride is not None else m.kernel_size
            lines += ['op = "maxpool3d"', f"kernel = {_triple(m.kernel_size)}",
                      f"stride = {_triple(stride)}"]
        else:
            raise ValueError(f"layer {name}: unsupported module {type(m).__name__}")
    save_file(tensors, os.path.join(out_dir, "weights.safetensors"))
    with open(os.path.join(out_dir, "model.toml"), "w") as f:
        f.write("\n".join(lines) + "\n")


def make_fixture(root):
    import numpy as np

    torch.manual_seed(20261127)
    net = nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1),
        nn.BatchNorm3d(4),
        nn.ReLU(),
        nn.MaxPool3d(2),
        nn.Conv3d(4, 3, 3, padding=(1, 0, 1), dilation=(1, 1, 2)),
        nn.LeakyReLU(0.1),
    )
    with torch.no_grad():  # non-trivial BatchNorm statistics
        bn = net[1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    net.eval()
    export(net, os.path.join(root, "models", "tiny_net"),
           "test fixture: conv+bn+relu, maxpool, dilated conv + leaky relu")
    x = torch.rand(2, 1, 12, 10, 14)
    with torch.no_grad():
        y = net.double()(x.double()).float()
    io = os.path.join(root, "tiny_net_io")
    os.makedirs(io, exist_ok=True)
    np.save(os.path.join(io, "input.npy"), x.numpy())
    np.save(os.path.join(io, "expected.npy"), y.numpy())


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fixture", action="store_true", help="rebuild the test fixture")
    args = ap.parse_args()
    if args.fixture:
        here = os.path.dirname(os.path.abspath(__file__))
        make_fixture(os.path.join(os.path.dirname(here), "tests", "fixtures"))
