#!/usr/bin/env python3
"""voxconv's kernel against PyTorch and onnxruntime, same workloads, same thread count, in
one run, as ratios against the better of the two peers.

For every workload and thread count, the three engines are timed back to back (voxconv via
`voxconv kernel-bench --json`, PyTorch's `F.conv3d`, onnxruntime's one-node `Conv` with
ORT_ENABLE_ALL), each with one warm-up and R timed runs (median kept; where R runs add up to
less than --min-ms, 50 by default, the sample is taken again with enough runs to make it up,
at most 400, for every engine alike: the median of three 0.1 ms runs is mostly noise), and
that is repeated
for --rounds rounds, rotating which engine goes first, so the engines share the machine's
background load. Reported per workload: each engine's median over the rounds with its
range, voxconv's GFLOP/s, and voxconv's speed-up over the better peer (> 1: voxconv is
faster); then the geometric means.

    python scripts/bench_vs_peers.py --threads 1 2 --repeat 5 --rounds 3 [--json out.json]

With `--activation elu:1.0` (or relu, leaky_relu:A, sigmoid, prelu:S[,S...]) every engine
computes the convolution followed by that activation: voxconv fused into its epilogue,
PyTorch as `F.conv3d` then the functional activation, onnxruntime as a two-node graph
(`Conv` then the activation node, which its optimizer may fuse).

Needs numpy and torch; onnxruntime and onnx (skip with --no-ort). Build first:
`cargo build --release`.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
import tomllib

import numpy as np


def flops(w):
    n, cin, *_ = w["input"]
    cout, _, kd, kh, kw = w["filters"]
    return 2 * n * cout * math.prod(out_dims(w)) * cin * kd * kh * kw


def out_dims(w):
    s = w.get("stride", [1, 1, 1])
    p = w.get("padding", [0, 0, 0])
    d = w.get("dilation", [1, 1, 1])
    return [
        (w["input"][2 + a] + 2 * p[a] - d[a] * (w["filters"][2 + a] - 1) - 1) // s[a] + 1
        for a in range(3)
    ]


def time_median(fn, repeat):
    fn()  # warm-up
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


ACTIVATION = "none"


def parse_activation(spec):
    """(kind, parameter list) of an activation spec in voxconv's syntax."""
    kind, _, rest = spec.partition(":")
    params = [float(v) for v in rest.split(",")] if rest else []
    if kind not in ("none", "relu", "leaky_relu", "sigmoid", "elu", "prelu"):
        raise SystemExit(f"unknown activation {spec!r}")
    if kind == "prelu" and not params:
        raise SystemExit("prelu needs its slopes: prelu:S[,S...]")
    return kind, params


def torch_activation(y, spec):
    import torch
    import torch.nn.functional as F
    kind, p = parse_activation(spec)
    if kind == "relu":
        return F.relu(y)
    if kind == "leaky_relu":
        return F.leaky_relu(y, p[0] if p else 0.01)
    if kind == "sigmoid":
        return torch.sigmoid(y)
    if kind == "elu":
        return F.elu(y, p[0] if p else 1.0)
    if kind == "prelu":
        return F.prelu(y, torch.tensor(p))
    return y


def ort_activation_node(spec, c_out):
    """(nodes, initializers) computing the activation from "y0" into "y"."""
    from onnx import helper, numpy_helper
    kind, p = parse_activation(spec)
    if kind == "none":
        return [helper.make_node("Identity", ["y0"], ["y"])], []
    if kind == "relu":
        return [helper.make_node("Relu", ["y0"], ["y"])], []
    if kind == "leaky_relu":
        return [helper.make_node("LeakyRelu", ["y0"], ["y"], alpha=p[0] if p else 0.01)], []
    if kind == "sigmoid":
        return [helper.make_node("Sigmoid", ["y0"], ["y"])], []
    if kind == "elu":
        return [helper.make_node("Elu", ["y0"], ["y"], alpha=p[0] if p else 1.0)], []
    slope = np.array(p, dtype=np.float32).reshape((len(p), 1, 1, 1) if len(p) > 1 else (1,))
    return ([helper.make_node("PRelu", ["y0", "slope"], ["y"])],
            [numpy_helper.from_array(slope, "slope")])


def bench_voxconv(exe, workloads_path, name, threads, repeat):
    out = subprocess.run(
        [exe, "kernel-bench", "--workloads", workloads_path, "--threads", str(threads),
         "--repeat", str(repeat), "--json", "--only", name, "--activation", ACTIVATION],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["median_ms"]


def bench_torch(w, threads, repeat):
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(*w["input"], generator=g) * 2 - 1
    k = torch.rand(*w["filters"], generator=g) * 2 - 1
    b = torch.rand(w["filters"][0], generator=g) * 2 - 1
    kwargs = dict(stride=w.get("stride", 1), padding=w.get("padding", 0),
                  dilation=w.get("dilation", 1))
    with torch.inference_mode():
        if ACTIVATION == "none":
            return time_median(lambda: F.conv3d(x, k, b, **kwargs), repeat)
        return time_median(
            lambda: torch_activation(F.conv3d(x, k, b, **kwargs), ACTIVATION), repeat)


def bench_ort(w, threads, repeat):
    try:
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, w["input"]).astype(np.float32)
    k = rng.uniform(-1, 1, w["filters"]).astype(np.float32)
    b = rng.uniform(-1, 1, w["filters"][0]).astype(np.float32)
    p = w.get("padding", [0, 0, 0])
    fused = ACTIVATION != "none"
    node = helper.make_node(
        "Conv", ["x", "k", "b"], ["y0" if fused else "y"], kernel_shape=w["filters"][2:],
        strides=w.get("stride", [1, 1, 1]), pads=p + p, dilations=w.get("dilation", [1, 1, 1]),
    )
    act_nodes, act_inits = ort_activation_node(ACTIVATION, w["filters"][0]) if fused else ([], [])
    graph = helper.make_graph(
        [node] + act_nodes, "conv3d",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, w["input"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(k, "k"), numpy_helper.from_array(b, "b")]
        + act_inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return time_median(lambda: sess.run(None, {"x": x}), repeat)


def geomean(xs):
    xs = [x for x in xs if x]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default=os.path.join(root, "benches", "workloads.toml"))
    ap.add_argument("--voxconv", default=os.path.join(root, "target", "release", "voxconv"))
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--min-ms", type=float, default=50.0,
                    help="a sample whose runs add up to less than this is taken again with "
                         "more runs (up to 400), for every engine alike: a median of 3 runs "
                         "of a 0.1 ms problem is mostly noise")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat the whole comparison; the median of the rounds is reported")
    ap.add_argument("--only", nargs="+", help="only these workloads")
    ap.add_argument("--no-ort", action="store_true", help="skip onnxruntime")
    ap.add_argument("--activation", default="none",
                    help="fused activation after the convolution, voxconv's syntax: relu, "
                         "leaky_relu:A, sigmoid, elu:A, prelu:S[,S...]")
    ap.add_argument("--json", help="write all figures to this file")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 unless voxconv >= the better peer on every workload and "
                         ">= 1.5x it as a geometric mean (issue 16)")
    args = ap.parse_args()
    global ACTIVATION
    parse_activation(args.activation)
    ACTIVATION = args.activation

    with open(args.workloads, "rb") as f:
        workloads = tomllib.load(f)["workload"]
    if args.only:
        workloads = [w for w in workloads if w["name"] in args.only]
    import torch
    print(f"# torch {torch.__version__}, numpy {np.__version__}", end="")
    try:
        import onnxruntime
        print(f", onnxruntime {onnxruntime.__version__}", end="")
    except ImportError:
        pass
    print(f"; {os.cpu_count()} CPUs; {args.rounds} round(s) of {args.repeat} runs, medians; "
          f"activation {ACTIVATION}")

    engines = {
        "voxconv": lambda w, t, n: bench_voxconv(args.voxconv, args.workloads, w["name"], t, n),
        "torch": lambda w, t, n: bench_torch(w, t, n),
    }
    if not args.no_ort:
        engines["ort"] = lambda w, t, n: bench_ort(w, t, n)

    def sample(engine, w, t):
        # The median of `--repeat` runs; where those add up to less than `--min-ms`, again
        # with as many runs as make that up (the same rule for every engine).
        v = engine(w, t, args.repeat)
        if v is not None and v * args.repeat < args.min_ms:
            v = engine(w, t, min(400, math.ceil(args.min_ms / max(v, 1e-3))))
        return v
    order = list(engines)
    rows = []
    print(f"{'workload':<24} {'thr':>3}  {'voxconv ms (range)':>24} {'GFLOP/s':>7}  "
          f"{'torch ms (range)':>24}  {'ort ms (range)':>24}  {'vs better':>9}", flush=True)
    for threads in args.threads:
        for w in workloads:
            samples = {k: [] for k in engines}
            for r in range(args.rounds):
                for k in order[r % len(order):] + order[:r % len(order)]:
                    v = sample(engines[k], w, threads)
                    if v is not None:
                        samples[k].append(v)
            med = {k: (statistics.median(v) if v else None) for k, v in samples.items()}
            peers = [m for k, m in med.items() if k != "voxconv" and m]
            better = min(peers)
            row = {
                "name": w["name"], "threads": threads,
                "voxconv_ms": med["voxconv"], "torch_ms": med["torch"], "ort_ms": med.get("ort"),
                "ranges": {k: [min(v), max(v)] for k, v in samples.items() if v},
                "voxconv_gflops": flops(w) / (med["voxconv"] * 1e6),
                "torch_ratio": med["torch"] / med["voxconv"],
                "ort_ratio": (med["ort"] / med["voxconv"]) if med.get("ort") else None,
                "better_peer_ratio": better / med["voxconv"],
            }
            rows.append(row)

            def cell(k):
                if not samples.get(k):
                    return f"{'n/a':>24}"
                lo, hi = row["ranges"][k]
                return f"{med[k]:9.2f} ({lo:.2f}-{hi:.2f})".rjust(24)

            print(f"{w['name']:<24} {threads:>3}  {cell('voxconv')} "
                  f"{row['voxconv_gflops']:7.1f}  {cell('torch')}  {cell('ort')}  "
                  f"{row['better_peer_ratio']:8.2f}x", flush=True)

    ok = True
    for threads in args.threads:
        rs = [r for r in rows if r["threads"] == threads]
        gb = geomean([r["better_peer_ratio"] for r in rs])
        gt = geomean([r["torch_ratio"] for r in rs])
        go = geomean([r["ort_ratio"] for r in rs])
        worst = min(rs, key=lambda r: r["better_peer_ratio"])
        print(f"threads={threads}: geomean vs the better peer {gb:.2f}x (vs torch {gt:.2f}x, "
              f"vs onnxruntime {go:.2f}x); slowest vs the better peer: {worst['name']} "
              f"{worst['better_peer_ratio']:.2f}x")
        ok &= worst["better_peer_ratio"] >= 1.0 and gb >= 1.5
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.check and not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
