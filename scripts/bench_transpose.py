#!/usr/bin/env python3
"""ConvTranspose3d alone, side by side: voxconv against PyTorch and onnxruntime on the
up-convolutions of U-Net decoders, same weights, same input, same thread count, in one run.

Each shape is one `nn.ConvTranspose3d` (with bias, seeded weights) exported by
`torch.onnx.export` (opset 17) to OUT/<name>/model.onnx, so all three engines run the same
operator:

    PyTorch      the module itself, torch.set_num_threads(T), torch.inference_mode()
    onnxruntime  the exported model.onnx, CPUExecutionProvider, intra_op_num_threads=T,
                 inter_op_num_threads=1, ORT_ENABLE_ALL
    voxconv      `voxconv model-bench --model-repository OUT --model <name> --threads T
                 --repeat R --json` (in process: the graph of one ConvTranspose step, planned
                 once; its strategy is printed)

The shapes (U-Net decoders at a 96^3 or 128^3 patch):

    unet-up-k3s2   MONAI UNet's up-convolution: kernel 3, stride 2, padding 1,
                   output_padding 1 (64 -> 16 channels, 24^3 -> 48^3; and 32 -> 3,
                   48^3 -> 96^3, its last one)
    nnunet-up-k2s2 nnU-Net / BasicUNet's: kernel 2 = stride 2, no padding (64 -> 32,
                   32^3 -> 64^3; 320 -> 320 at 4^3 -> 8^3, its deepest)

Each engine gets one warm-up and --repeat timed runs per round (median kept), for --rounds
rounds that rotate which engine goes first. Reported per shape and thread count: each
engine's median over the rounds with the range, voxconv's GFLOP/s and strategy, and its
ratio against the better peer (> 1: voxconv is faster); then the geometric means. Outputs
are checked against PyTorch first (max |diff| <= 1e-4 x max |ref|).

    cargo build --release --bin voxconv
    python scripts/bench_transpose.py [--threads 1 2] [--repeat 5] [--rounds 3] [--out DIR]

Needs numpy, torch, onnx and onnxruntime.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench_vs_peers import time_median  # one warm-up, then the median of `repeat` runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (c_in, c_out, input spatial, kernel, stride, padding, output_padding)
SHAPES = {
    "unet-up-k3s2-64to16": (64, 16, (24, 24, 24), 3, 2, 1, 1),
    "unet-up-k3s2-32to3": (32, 3, (48, 48, 48), 3, 2, 1, 1),
    "nnunet-up-k2s2-64to32": (64, 32, (32, 32, 32), 2, 2, 0, 0),
    "nnunet-up-k2s2-320to320": (320, 320, (4, 4, 4), 2, 2, 0, 0),
}


def flops(c_in, c_out, dhw, k):
    return 2.0 * c_in * math.prod(dhw) * c_out * k ** 3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", nargs="+", help="only these shapes")
    ap.add_argument("--out", help="where the one-node models go (default: a temp dir)")
    ap.add_argument("--voxconv", default=os.path.join(ROOT, "target", "release", "voxconv"))
    ap.add_argument("--json", help="write all figures to this file")
    a = ap.parse_args()

    import onnxruntime as ort
    import torch

    out = a.out or tempfile.mkdtemp(prefix="voxconv-transpose-")
    names = a.only or list(SHAPES)
    for n in names:
        if n not in SHAPES:
            sys.exit(f"--only: expected some of {list(SHAPES)}, got {n!r}")
    print(f"# torch {torch.__version__}, onnxruntime {ort.__version__}, numpy {np.__version__}; "
          f"{os.cpu_count()} CPUs; {a.rounds} round(s) of {a.repeat} runs, medians")
    mods, inputs = {}, {}
    for i, name in enumerate(names):
        ci, co, dhw, k, s, p, op = SHAPES[name]
        torch.manual_seed(100 + i)
        m = torch.nn.ConvTranspose3d(ci, co, k, stride=s, padding=p, output_padding=op).eval()
        x = torch.randn(1, ci, *dhw)
        d = os.path.join(out, name)
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, "model.onnx")
        torch.onnx.export(m, x, path, opset_version=17, input_names=["x"], output_names=["y"],
                          dynamo=False)
        mods[name], inputs[name] = m, x
        # Exactness first: voxconv (through `voxconv infer`'s engine, in model-bench's plan)
        # is checked by the test suite; here PyTorch against onnxruntime on the same file.
        with torch.inference_mode():
            want = m(x).numpy()
        got = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(
            None, {"x": x.numpy()})[0]
        err = float(np.abs(got - want).max()) / float(np.abs(want).max())
        if err > 1e-4:
            sys.exit(f"{name}: onnxruntime differs from PyTorch by {err:.2e} x max|ref|")

    rows, results = [], {}
    for t in a.threads:
        torch.set_num_threads(t)
        for name in names:
            ci, co, dhw, k, *_ = SHAPES[name]
            so = ort.SessionOptions()
            so.intra_op_num_threads = t
            so.inter_op_num_threads = 1
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            sess = ort.InferenceSession(os.path.join(out, name, "model.onnx"), so,
                                        providers=["CPUExecutionProvider"])
            xn = inputs[name].numpy()
            m, x = mods[name], inputs[name]
            times = {"voxconv": [], "torch": [], "ort": []}
            strategy = "?"
            for r in range(a.rounds):
                order = ["voxconv", "torch", "ort"]
                order = order[r % 3:] + order[:r % 3]
                for eng in order:
                    if eng == "torch":
                        with torch.inference_mode():
                            times[eng].append(time_median(lambda: m(x), a.repeat))
                    elif eng == "ort":
                        times[eng].append(time_median(lambda: sess.run(None, {"x": xn}), a.repeat))
                    else:
                        cmd = [a.voxconv, "model-bench", "--model-repository", out, "--model",
                               name, "--threads", str(t), "--repeat", str(a.repeat), "--json"]
                        res = subprocess.run(cmd, capture_output=True, text=True)
                        if res.returncode != 0:
                            sys.exit(f"{name}: voxconv model-bench failed: {res.stderr[-400:]}")
                        j = json.loads(res.stdout.strip().splitlines()[-1])
                        times[eng].append(j["median_ms"])
                        strategy = ",".join(st["strategy"] for st in j["stages"])
            med = {e: statistics.median(v) for e, v in times.items()}
            better = min(med["torch"], med["ort"])
            ratio = better / med["voxconv"]
            gf = flops(ci, co, dhw, k) / med["voxconv"] / 1e6
            results.setdefault(str(t), {})[name] = {"ms": times, "median": med,
                                                    "ratio": ratio, "strategy": strategy}
            rng = lambda e: f"{med[e]:.2f} ({min(times[e]):.2f}-{max(times[e]):.2f})"
            rows.append(f"| {name} | {t} | {strategy} | {rng('voxconv')} | {gf:.1f} | "
                        f"{rng('torch')} | {rng('ort')} | **{ratio:.2f}×** |")
            print(rows[-1], flush=True)
    print()
    print("| shape | threads | voxconv strategy | voxconv ms (range) | GFLOP/s | PyTorch ms "
          "(range) | onnxruntime ms (range) | vs the better peer |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(r)
    for t in a.threads:
        rs = [v["ratio"] for v in results[str(t)].values()]
        g = math.exp(sum(math.log(x) for x in rs) / len(rs))
        print(f"- {t} thread(s): geomean vs the better peer {g:.2f}× over {len(rs)} shape(s)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
