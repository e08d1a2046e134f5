#!/usr/bin/env python3
"""Writes the sliding-window inference fixtures: a tiny MONAI UNet exported to ONNX and the
output of MONAI's `monai.inferers.sliding_window_inference` over a few scans with it.

    tests/fixtures/sliding/repo/tiny_unet/model.onnx  opset 17, input "input" [batch, 1, 16,
                                                      12, 20] (batch dynamic, spatial fixed),
                                                      output "output" [batch, 3, 16, 12, 20]
    tests/fixtures/sliding/repo/tiny_unet/model.toml  description only
    tests/fixtures/sliding/scan_<s>.npy               float32 [N, 1, D, H, W]
    tests/fixtures/sliding/<case>.npy                 float32 [N, 3, D, H, W], MONAI's blended
                                                      logits (PyTorch predictor, float32)
    tests/fixtures/sliding/cases.json                 the cases and their parameters

Rerun (well under a minute on 2 cores) with the project's Python environment:

    /work/pyenv/bin/python scripts/make_sliding_fixtures.py [--out tests/fixtures/sliding]

Needs torch, onnx, onnxruntime, numpy and monai. Nothing is downloaded: the network is
built from its class and initialised from torch.manual_seed; the norm affine parameters and
PReLU slopes are re-drawn away from their defaults as in scripts/export_onnx.py. The script
checks that onnxruntime agrees with PyTorch on the network (within 1e-5 x max|ref|) and, for
every case, that MONAI with an onnxruntime predictor agrees with the PyTorch one, and prints
both differences.
"""
import argparse
import itertools
import json
import os
import sys

import numpy as np
import torch
import torch.nn as nn

import onnx
import onnxruntime as ort
import monai
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference
from monai.inferers.utils import _get_scan_interval

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from export_onnx import _randomise  # noqa: E402  (the same re-drawn norms and PReLU slopes)
from sliding_ref import mirrored  # noqa: E402  (nnU-Net mirroring, as check/bench use it)
from monai.networks.nets import UNet

# One thread (intra and inter op), as export_onnx (imported above) already set on import.

SEED = 11
ROI = (16, 12, 20)  # D, H, W: deliberately not a cube
MAX_TOTAL_BYTES = 2 << 20

SCANS = {
    "a": (1, 1, 29, 23, 31),  # not multiples of the roi, every axis >= roi
    "b": (2, 1, 13, 30, 25),  # N = 2; D = 13 < 16: MONAI pads (centred) and crops back
}

# name, scan, overlap, blend, sigma_scale, sw_batch_size, mirror axes
CASES = [
    ("a_gaussian", "a", 0.25, "gaussian", 0.125, 1, []),
    ("a_constant", "a", 0.5, "constant", 0.125, 3, []),
    ("a_gaussian_mirror", "a", 0.25, "gaussian", 0.125, 1, [0, 1, 2]),
    ("a_sigma", "a", (0.5, 0.25, 0.4), "gaussian", (0.25, 0.125, 0.2), 1, []),
    ("b_gaussian", "b", 0.25, "gaussian", 0.125, 1, []),
    ("b_mirror_w", "b", 0.5, "gaussian", 0.125, 1, [2]),
]


def build():
    """InstanceNorm (affine, so that its parameters can be randomised) + PReLU + strided conv
    + ConvTranspose + skip connections + residual units."""
    torch.manual_seed(SEED)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8, 16),
               strides=(2, 2), num_res_units=1, act="PRELU",
               norm=("INSTANCE", {"affine": True}))
    return _randomise(net, SEED).eval()


def make_scan(shape, seed):
    """Seeded standard-normal noise smoothed a little (3-tap box along each spatial axis),
    rescaled to unit variance, so neighbouring voxels correlate like an image's."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    for ax in (2, 3, 4):
        p = np.pad(x, [(1, 1) if a == ax else (0, 0) for a in range(5)], mode="edge")
        sl = lambda s, e: tuple(slice(s, p.shape[a] - e) if a == ax else slice(None)
                                for a in range(5))
        x = (p[sl(0, 2)] + p[sl(1, 1)] + p[sl(2, 0)]) / 3.0
    x = (x - x.mean()) / x.std()
    return x.astype(np.float32)


def window_starts(spatial, overlap):
    """MONAI's window start positions per axis (after padding a scan smaller than the roi)."""
    padded = [max(s, r) for s, r in zip(spatial, ROI)]
    interval = _get_scan_interval(padded, ROI, 3, _per_axis(overlap))
    slices = dense_patch_slices(padded, ROI, interval)
    return [sorted({int(sl[a].start) for sl in slices}) for a in range(3)], len(slices)


def _per_axis(v):
    return [float(x) for x in v] if isinstance(v, (tuple, list)) else [float(v)] * 3


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "tests", "fixtures", "sliding"))
    args = ap.parse_args()
    out = os.path.normpath(args.out)
    mdir = os.path.join(out, "repo", "tiny_unet")
    os.makedirs(mdir, exist_ok=True)
    versions = (f"torch {torch.__version__}, monai {monai.__version__}, onnx {onnx.__version__}, "
                f"onnxruntime {ort.__version__}, numpy {np.__version__}")
    print(versions)

    net = build()
    path = os.path.join(mdir, "model.onnx")
    example = torch.from_numpy(make_scan((1, 1) + ROI, SEED))
    with torch.no_grad():
        torch.onnx.export(net, example, path, opset_version=17, dynamo=False,
                          input_names=["input"], output_names=["output"],
                          do_constant_folding=True,
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    m = onnx.load(path, load_external_data=False)
    onnx.checker.check_model(m)
    for init in m.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL or init.external_data:
            sys.exit(f"initializer {init.name} uses external data")
    with open(os.path.join(mdir, "model.toml"), "w") as f:
        f.write('description = "sliding-window fixture: tiny MONAI UNet (InstanceNorm, PReLU, '
                'ConvTranspose, skips), roi 16x12x20, 1 -> 3 channels"\n')

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])

    # The network itself: ORT vs torch, batch 1 and 3.
    worst = 0.0
    for n in (1, 3):
        x = make_scan((n, 1) + ROI, SEED + n)
        with torch.no_grad():
            ref = net(torch.from_numpy(x)).numpy()
        got = sess.run(["output"], {"input": x})[0]
        rel = float(np.abs(got - ref).max() / np.abs(ref).max())
        worst = max(worst, rel)
        print(f"network, batch {n}: max|ORT-torch|/max|torch| = {rel:.3e}")
        if got.shape != ref.shape or not rel <= 1e-5:
            sys.exit("onnxruntime and PyTorch disagree on the network")

    def torch_predict(x):
        return net(x)

    def ort_predict(x):
        return torch.from_numpy(sess.run(["output"], {"input": x.numpy()})[0])

    scans = {}
    for i, (s, shape) in enumerate(SCANS.items()):
        scans[s] = make_scan(shape, SEED + 100 + i)
        np.save(os.path.join(out, f"scan_{s}.npy"), scans[s])

    cases = []
    case_diffs = []
    for name, s, overlap, blend, sigma, batch, mirror in CASES:
        x = torch.from_numpy(scans[s])
        kw = dict(roi_size=ROI, sw_batch_size=batch, overlap=overlap, mode=blend,
                  sigma_scale=sigma, padding_mode="constant", cval=0.0)
        with torch.no_grad():
            y = sliding_window_inference(x, predictor=mirrored(torch_predict, mirror), **kw)
            y_ort = sliding_window_inference(x, predictor=mirrored(ort_predict, mirror), **kw)
        y = y.as_tensor() if hasattr(y, "as_tensor") else y
        y_ort = y_ort.as_tensor() if hasattr(y_ort, "as_tensor") else y_ort
        y, y_ort = y.numpy().astype(np.float32), y_ort.numpy().astype(np.float32)
        want_shape = (x.shape[0], 3) + tuple(x.shape[2:])
        if y.shape != want_shape:
            sys.exit(f"{name}: output {y.shape}, expected {want_shape}")
        rel = float(np.abs(y_ort - y).max() / np.abs(y).max())
        agree = float((y_ort.argmax(1) == y.argmax(1)).mean())
        case_diffs.append((name, rel, agree))
        print(f"{name}: scan {list(x.shape)} -> {list(y.shape)}, MONAI with ORT vs torch "
              f"predictor: max|diff|/max|ref| = {rel:.3e}, argmax agreement {100 * agree:.4f} %")
        if not rel <= 1e-5:
            sys.exit(f"{name}: the ORT and torch predictors disagree")
        np.save(os.path.join(out, f"{name}.npy"), y)
        starts, nwin = window_starts(x.shape[2:], overlap)
        case_diffs[-1] += (starts,)
        cases.append({"name": name, "scan": f"scan_{s}.npy", "expected": f"{name}.npy",
                      "roi": list(ROI), "overlap": _per_axis(overlap), "blend": blend,
                      "sigma_scale": _per_axis(sigma), "batch": batch, "mirror": list(mirror),
                      "windows_per_item": nwin})
    with open(os.path.join(out, "cases.json"), "w") as f:
        f.write("[\n" + ",\n".join("  " + json.dumps(c) for c in cases) + "\n]\n")

    lines = [
        "# Sliding-window fixtures",
        "",
        "Generated by `scripts/make_sliding_fixtures.py` (do not edit by hand; rerun "
        "`/work/pyenv/bin/python scripts/make_sliding_fixtures.py`).",
        f"Versions: {versions}.",
        "",
        "- `repo/tiny_unet/`: a model repository entry. `model.onnx` is MONAI "
        "`UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8, 16), "
        "strides=(2, 2), num_res_units=1, act=\"PRELU\", norm=(\"INSTANCE\", {\"affine\": True}))` "
        f"with torch.manual_seed({SEED}) weights and re-drawn norm affines / PReLU slopes, eval "
        "mode, `torch.onnx.export(opset_version=17, dynamo=False, do_constant_folding=True)`: "
        "input `input` [batch, 1, 16, 12, 20], output `output` [batch, 3, 16, 12, 20], only the "
        "batch axis dynamic. The roi (D, H, W) = (16, 12, 20) is the model's input shape.",
        f"  onnxruntime vs PyTorch on the network: max|diff|/max|ref| = {worst:.2e}.",
        "- `scan_<s>.npy`: float32 [N, 1, D, H, W], seeded standard-normal noise smoothed by a "
        "3-tap box per spatial axis, normalised to mean 0 / std 1.",
        "- `<case>.npy`: float32 [N, 3, D, H, W], the blended logits of `monai.inferers."
        "sliding_window_inference(scan, roi_size, sw_batch_size=batch, predictor, overlap, "
        "mode=blend, sigma_scale, padding_mode=\"constant\", cval=0)` with the PyTorch network "
        "(float32, CPU) as the predictor.",
        "- `cases.json`: one entry per case: name, scan, expected, roi, overlap (per axis "
        "D, H, W), blend, sigma_scale (per axis), batch (sw_batch_size), mirror, windows_per_item "
        "(MONAI's window count for one batch item; the whole call runs N x that).",
        "- Window starts per axis (MONAI: interval int(roi * (1 - overlap)), or roi where the "
        "(padded) scan equals the roi; ceil((size - roi) / interval) + 1 windows at "
        "min(i * interval, size - roi), so the last two may nearly coincide; both count). A scan "
        "axis smaller than the roi is zero-padded by (diff // 2, diff - diff // 2) first: scan b "
        "D 13 -> 16 as (1, 2).",
        "- `mirror`: nnU-Net style test-time mirroring in the predictor: for a window batch x, "
        "`y = net(x)`, then for every non-empty combination c of the listed spatial axes "
        "(itertools.combinations, lengths 1..k; axis a is tensor dim a + 2) "
        "`y += flip(net(flip(x, c)), c)`, then `y /= number of combinations + 1`. "
        "`[]` = no mirroring.",
        "",
        "| case | scan | overlap | blend | sigma_scale | batch | mirror | MONAI ORT vs torch "
        "predictor, max abs diff / max abs ref | argmax agreement | window starts D; H; W |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c, (_, rel, agree, starts) in zip(cases, case_diffs):
        lines.append(f"| {c['name']} | {c['scan']} {list(scans[c['scan'][5]].shape)} | "
                     f"{c['overlap']} | {c['blend']} | {c['sigma_scale']} | {c['batch']} | "
                     f"{c['mirror']} | {rel:.2e} | {100 * agree:.4f} % | "
                     + "; ".join(", ".join(map(str, st)) for st in starts) + " |")
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")

    total = sum(os.path.getsize(os.path.join(dp, fn))
                for dp, _, fns in os.walk(out) for fn in fns)
    print(f"fixtures: {total} bytes in {out}")
    if total > MAX_TOTAL_BYTES:
        sys.exit(f"fixtures total {total} bytes (> 2 MiB)")


if __name__ == "__main__":
    main()
