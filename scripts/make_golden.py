#!/usr/bin/env python3
"""Writes PyTorch golden cases for the kernel tests into tests/fixtures/golden/.

Each case NAME has NAME.input.npy, NAME.filters.npy, NAME.bias.npy, NAME.expected.npy and a line
in cases.toml with its stride / padding / dilation / activation. Values come from a fixed seed;
the expected output is torch.nn.functional.conv3d (float64, then rounded to float32) followed by
the activation. Rerun only to add cases: `python scripts/make_golden.py`.
"""
import os

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(os.path.dirname(HERE), "tests", "fixtures", "golden")

CASES = [
    # name, input, filters, stride, padding, dilation, activation
    ("mixed_params_relu", [1, 2, 7, 6, 9], [3, 2, 3, 2, 3], [2, 1, 2], [1, 0, 2], [1, 2, 1], "relu"),
    ("batch2_leaky", [2, 3, 5, 5, 5], [4, 3, 3, 3, 3], [1, 1, 1], [1, 1, 1], [1, 1, 1],
     "leaky_relu:0.1"),
    ("pointwise_sigmoid", [1, 5, 4, 3, 6], [2, 5, 1, 1, 1], [1, 1, 1], [0, 0, 0], [1, 1, 1],
     "sigmoid"),
    ("dilated_strided_none", [1, 1, 11, 10, 12], [2, 1, 3, 3, 2], [3, 2, 2], [2, 1, 0],
     [2, 3, 2], "none"),
    ("elu_strided", [1, 3, 9, 7, 11], [5, 3, 3, 3, 2], [1, 2, 2], [1, 1, 0], [1, 1, 1], "elu:0.7"),
    ("prelu_per_channel", [2, 4, 6, 5, 18], [3, 4, 3, 1, 3], [1, 1, 1], [1, 0, 1], [1, 1, 2],
     "prelu:0.25,-0.1,0.9"),
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


def main():
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(20261127)
    lines = ["# Made by scripts/make_golden.py with torch " + torch.__version__]
    for name, x_shape, w_shape, s, p, d, a in CASES:
        x = rng.uniform(-1, 1, x_shape).astype(np.float32)
        w = rng.uniform(-1, 1, w_shape).astype(np.float32)
        b = rng.uniform(-1, 1, w_shape[0]).astype(np.float32)
        y = F.conv3d(torch.from_numpy(x).double(), torch.from_numpy(w).double(),
                     torch.from_numpy(b).double(), stride=s, padding=p, dilation=d)
        y = act(y, a).float().numpy()
        for suffix, arr in [("input", x), ("filters", w), ("bias", b), ("expected", y)]:
            np.save(os.path.join(OUT, f"{name}.{suffix}.npy"), arr)
        lines += ["", "[[case]]", f'name = "{name}"', f"stride = {s}", f"padding = {p}",
                  f"dilation = {d}", f'activation = "{a}"']
    with open(os.path.join(OUT, "cases.toml"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
