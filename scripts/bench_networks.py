#!/usr/bin/env python3
"""Whole networks, side by side: voxconv against PyTorch and onnxruntime on four common 3-D
segmentation networks, same model, same input, same thread count, in one run.

The networks, built at their library default sizes with seeded weights in eval mode (no hub
downloads):

    basicunet   MONAI BasicUNet(3-D, 1 -> 2), features (32, 32, 64, 128, 256, 32)
    unet        MONAI UNet(3-D, 1 -> 3), channels (16..256), strides 2, 2 residual units,
                PReLU, InstanceNorm
    segresnet   MONAI SegResNet(3-D, 1 -> 3), init_filters 8, blocks (1,2,2,4)/(1,1,1),
                nontrainable upsampling, GroupNorm(8)
    nnunet      nnU-Net PlainConvUNet, its 3d_fullres default plan for a ~96^3 patch:
                5 stages (32..320), InstanceNorm(affine), LeakyReLU, no deep supervision

Each is exported once with torch.onnx.export (opset 17, legacy exporter, constant folding)
to OUT/<name>/model.onnx for input [1, 1, S, S, S], and torch and onnxruntime outputs are
checked to agree (within 1e-4 x max|torch|). Then, for every network and thread count,
--rounds rounds are run; in each round the three engines run one after the other, each in
its own subprocess (one warm-up, then --repeat timed runs), the engine that goes first
rotating from round to round so that the machine's background load hits all of them alike:

    PyTorch      this script in a hidden worker mode: torch.set_num_threads(T),
                 torch.inference_mode(), the model rebuilt from the same seeded constructor
    onnxruntime  this script in a hidden worker mode: the same model.onnx, CPUExecutionProvider,
                 intra_op_num_threads=T, inter_op_num_threads=1, ORT_ENABLE_ALL
    voxconv      `voxconv model-bench --model-repository OUT --model <name> --threads T
                 --repeat R --json` (in process, no server, no transport)

Reported per network and thread count (as a markdown table ready to paste into a README):
each engine's median over all timed runs of all rounds with its min-max range, voxconv's
ratio against the better peer (better peer's median / voxconv's median; > 1: voxconv is
faster), and each engine's peak RSS (the subprocess's ru_maxrss via os.wait4, max over its
rounds; this includes the runtime itself: Python + torch for the PyTorch worker, Python +
numpy + onnxruntime for the ORT worker). Then the geometric mean of the ratios per thread
count, and voxconv's time per strategy (its `stages`, summed per strategy, last timed run
of the last round) at the largest thread count.

    cargo build --release --bin voxconv
    python scripts/bench_networks.py [--size 96] [--threads 1,2] [--rounds 3] [--repeat 2]
        [--only basicunet,nnunet] [--out DIR] [--json results.json]

Needs torch, onnx, onnxruntime, numpy, monai and dynamic-network-architectures. The figures
depend on the machine (CPU model, ISA, cores, memory bandwidth, background load): measure
on the machine you quote, and quote the header line with the table.
"""

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SEED = 0
ENGINES = ["torch", "ort", "voxconv"]
LABEL = {"torch": "PyTorch", "ort": "onnxruntime", "voxconv": "voxconv"}


# ---------------------------------------------------------------------------------------
# The networks (imported lazily: the parent process never loads torch).

def _basicunet():
    from monai.networks.nets import BasicUNet
    return BasicUNet(spatial_dims=3, in_channels=1, out_channels=2)


def _unet():
    from monai.networks.nets import UNet
    return UNet(spatial_dims=3, in_channels=1, out_channels=3,
                channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2,
                act="PRELU", norm="INSTANCE")


def _segresnet():
    from monai.networks.nets import SegResNet
    return SegResNet(spatial_dims=3, in_channels=1, out_channels=3, init_filters=8,
                     blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1),
                     upsample_mode="nontrainable")


def _nnunet():
    import torch.nn as nn
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    return PlainConvUNet(
        input_channels=1, n_stages=5, features_per_stage=(32, 64, 128, 256, 320),
        conv_op=nn.Conv3d, kernel_sizes=3, strides=(1, 2, 2, 2, 2), n_conv_per_stage=2,
        num_classes=3, n_conv_per_stage_decoder=2, conv_bias=True,
        norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=False)


# name -> (constructor, input channels)
NETWORKS = {
    "basicunet": (_basicunet, 1),
    "unet": (_unet, 1),
    "segresnet": (_segresnet, 1),
    "nnunet": (_nnunet, 1),
}


def build(name):
    """The network with seeded weights, in eval mode: the same weights every call."""
    import torch
    torch.manual_seed(SEED)
    return NETWORKS[name][0]().eval()


def make_input(name, size):
    import numpy as np
    rng = np.random.default_rng(SEED + 1)
    c = NETWORKS[name][1]
    return rng.uniform(-1, 1, (1, c, size, size, size)).astype(np.float32)


# ---------------------------------------------------------------------------------------
# Workers (hidden modes: one subprocess per engine run, so that its peak RSS is its own).

def timed(fn, repeat):
    fn()  # warm-up
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return ts


def ort_session(path, threads):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def worker_torch(a):
    import torch
    torch.set_num_threads(a.threads)
    model = build(a.network)
    x = torch.from_numpy(make_input(a.network, a.size))
    with torch.inference_mode():
        return {"runs_ms": timed(lambda: model(x), a.repeat)}


def worker_ort(a):
    sess = ort_session(a.model, a.threads)
    x = make_input(a.network, a.size)
    name = sess.get_inputs()[0].name
    return {"runs_ms": timed(lambda: sess.run(None, {name: x}), a.repeat)}


def worker_export(a):
    """Export to a.model and check torch against onnxruntime on it once."""
    import numpy as np
    import torch
    torch.set_num_threads(a.threads)
    model = build(a.network)
    x = torch.from_numpy(make_input(a.network, a.size))
    os.makedirs(os.path.dirname(a.model), exist_ok=True)
    t0 = time.perf_counter()
    with torch.no_grad():
        torch.onnx.export(model, x, a.model, opset_version=17, dynamo=False,
                          input_names=["image"], output_names=["logits"],
                          do_constant_folding=True)
    export_s = time.perf_counter() - t0
    with torch.inference_mode():
        ref = model(x).numpy()
    sess = ort_session(a.model, a.threads)
    got = sess.run(None, {"image": x.numpy()})[0]
    scale = float(np.abs(ref).max())
    err = float(np.abs(got - ref).max()) if got.shape == ref.shape else float("inf")
    import onnx
    m = onnx.load(a.model)
    ops = sorted({n.op_type for n in m.graph.node})
    return {"export_s": export_s, "output": list(ref.shape), "max_abs_ref": scale,
            "max_abs_err": err, "ok": err <= 1e-4 * scale,
            "params": sum(p.numel() for p in model.parameters()),
            "onnx_nodes": len(m.graph.node), "onnx_ops": ops}


WORKERS = {"torch": worker_torch, "ort": worker_ort, "export": worker_export}


def worker_main(argv):
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", choices=sorted(WORKERS), required=True)
    ap.add_argument("--network", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--repeat", type=int, default=1)
    a = ap.parse_args(argv)
    print(json.dumps(WORKERS[a.worker](a)), flush=True)


# ---------------------------------------------------------------------------------------
# The parent.

def run_child(cmd, threads, timeout_s):
    """Run cmd; return (rc, stdout, stderr, peak RSS in KiB, wall s). The child is reaped
    with os.wait4 so its own ru_maxrss is read (KiB on Linux)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=ROOT)
        killer = threading.Timer(timeout_s, p.kill)
        killer.start()
        try:
            _, status, ru = os.wait4(p.pid, 0)
        finally:
            killer.cancel()
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)  # reaped: tell Popen
        out.seek(0)
        err.seek(0)
        return (p.returncode, out.read().decode(errors="replace"),
                err.read().decode(errors="replace"), ru.ru_maxrss, wall)


def last_json(text):
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON object in the output")


def tail(text, n=1500):
    text = text.strip()
    return text if len(text) <= n else "..." + text[-n:]


def machine():
    model, cpus = platform.processor() or "unknown CPU", os.cpu_count()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            if k.strip() == "Model name":
                model = v.strip()
            elif k.strip() == "CPU(s)":
                cpus = int(v.strip())
    except (OSError, ValueError):
        pass
    return model, cpus


def version(pkg):
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def git_rev():
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return rev + ("+dirty" if dirty else "") if rev else "?"
    except OSError:
        return "?"


def loadavg():
    """The 1-minute load average (None where /proc/loadavg is missing)."""
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def geomean(xs):
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None


def csv_ints(s):
    return [int(v) for v in s.split(",") if v.strip()]


def main():
    if "--worker" in sys.argv[1:]:
        return worker_main(sys.argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=96, help="input D=H=W (default 96)")
    ap.add_argument("--threads", type=csv_ints, default=[1, 2], help="e.g. 1,2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=2,
                    help="timed runs per round per engine, after one warm-up")
    ap.add_argument("--only", type=lambda s: [v for v in s.split(",") if v],
                    help="comma-separated subset of " + ",".join(NETWORKS))
    ap.add_argument("--out", help="where the exported models go, OUT/<name>/model.onnx "
                                  "(default: a temporary directory, removed at the end)")
    ap.add_argument("--json", help="write all raw numbers to this file")
    ap.add_argument("--voxconv", default=os.path.join(ROOT, "target", "release", "voxconv"))
    ap.add_argument("--timeout", type=float, default=1800,
                    help="seconds before one engine run is killed (default 1800)")
    args = ap.parse_args()

    names = args.only or list(NETWORKS)
    unknown = [n for n in names if n not in NETWORKS]
    if unknown:
        ap.error(f"--only: unknown network(s) {unknown}; known: {list(NETWORKS)}")
    if not os.access(args.voxconv, os.X_OK):
        ap.error(f"{args.voxconv} is missing: cargo build --release --bin voxconv")
    if args.rounds < 1 or args.repeat < 1 or not args.threads or min(args.threads) < 1:
        ap.error("--rounds, --repeat and every thread count must be at least 1")

    tmp = None
    if args.out:
        out_dir = os.path.abspath(args.out)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="voxconv-nets-")
        out_dir = tmp.name
    os.makedirs(out_dir, exist_ok=True)

    cpu, ncpu = machine()
    meta = {
        "machine": cpu, "cpus": ncpu, "date": datetime.date.today().isoformat(),
        "torch": version("torch"), "onnxruntime": version("onnxruntime"),
        "monai": version("monai"),
        "dynamic_network_architectures": version("dynamic_network_architectures"),
        "voxconv_rev": git_rev(), "size": args.size, "threads": args.threads,
        "rounds": args.rounds, "repeat": args.repeat, "out": out_dir,
    }
    me = [sys.executable, os.path.abspath(__file__)]
    shape = [1, 1, args.size, args.size, args.size]
    started = time.perf_counter()
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731

    results = {}
    for name in names:
        model_path = os.path.join(out_dir, name, "model.onnx")
        rec = results[name] = {"model": model_path, "export": None, "error": None, "runs": {}}
        log(f"[{name}] export to {model_path}")
        rc, so, se, rss, wall = run_child(
            me + ["--worker", "export", "--network", name, "--model", model_path,
                  "--size", str(args.size), "--threads", str(max(args.threads))],
            max(args.threads), args.timeout)
        if rc != 0:
            rec["error"] = f"export failed (rc {rc}): {tail(se)}"
            log(f"[{name}] {rec['error']}")
            continue
        rec["export"] = ex = last_json(so)
        log(f"[{name}] exported in {ex['export_s']:.1f} s, {ex['onnx_nodes']} nodes "
            f"({', '.join(ex['onnx_ops'])}); torch vs onnxruntime max |diff| "
            f"{ex['max_abs_err']:.3g} (max |ref| {ex['max_abs_ref']:.3g}) "
            f"{'ok' if ex['ok'] else 'MISMATCH'}")

        for t in args.threads:
            runs = rec["runs"][str(t)] = {e: [] for e in ENGINES}
            for r in range(args.rounds):
                order = ENGINES[r % 3:] + ENGINES[:r % 3]
                for eng in order:
                    if eng == "voxconv":
                        cmd = [args.voxconv, "model-bench", "--model-repository", out_dir,
                               "--model", name, "--shape", ",".join(map(str, shape)),
                               "--threads", str(t), "--repeat", str(args.repeat), "--json"]
                    else:
                        cmd = me + ["--worker", eng, "--network", name, "--model",
                                    model_path, "--size", str(args.size), "--threads",
                                    str(t), "--repeat", str(args.repeat)]
                    load0 = loadavg()
                    rc, so, se, rss, wall = run_child(cmd, t, args.timeout)
                    entry = {"round": r, "rc": rc, "maxrss_kib": rss, "wall_s": wall,
                             "loadavg_1m": [load0, loadavg()]}
                    if rc == 0:
                        try:
                            entry.update(last_json(so))
                        except (ValueError, json.JSONDecodeError) as e:
                            entry["error"] = f"{e}: {tail(so)} {tail(se)}"
                    else:
                        entry["error"] = (f"rc {rc}: " + (tail(se) or tail(so))).strip()
                    runs[eng].append(entry)
                    if "error" in entry:
                        log(f"[{name}] t={t} round {r} {eng}: FAILED {entry['error']}")
                    else:
                        log(f"[{name}] t={t} round {r} {eng}: "
                            f"{', '.join(f'{v:.0f}' for v in entry['runs_ms'])} ms, "
                            f"{rss / 1024:.0f} MiB peak, {wall:.1f} s")

    # ---- summary
    rows = []
    for name in names:
        rec = results[name]
        for t in args.threads:
            runs = rec["runs"].get(str(t))
            row = {"network": name, "threads": t}
            if runs is None:
                row["error"] = rec["error"]
                rows.append(row)
                continue
            for eng in ENGINES:
                ok = [e for e in runs[eng] if "error" not in e]
                ms = [v for e in ok for v in e["runs_ms"]]
                row[eng] = {
                    "median_ms": statistics.median(ms) if ms else None,
                    "min_ms": min(ms) if ms else None, "max_ms": max(ms) if ms else None,
                    "peak_rss_mib": max((e["maxrss_kib"] for e in runs[eng]), default=0) / 1024,
                    "errors": sorted({e["error"] for e in runs[eng] if "error" in e}),
                }
            v = row["voxconv"]["median_ms"]
            peers = [row[e]["median_ms"] for e in ("torch", "ort") if row[e]["median_ms"]]
            row["better_peer"] = (min(("torch", "ort"),
                                      key=lambda e: row[e]["median_ms"] or math.inf)
                                  if peers else None)
            row["ratio"] = (min(peers) / v) if (v and peers) else None
            vok = [e for e in runs["voxconv"] if "error" not in e]
            if vok and v:
                row["voxconv"]["gflops"] = vok[-1]["flops"] / (v * 1e6)
                row["voxconv"]["working_mib"] = vok[-1]["working_bytes"] / (1 << 20)
            rows.append(row)

    total_s = time.perf_counter() - started
    meta["wall_s"] = total_s

    def cell(d):
        if not d or d["median_ms"] is None:
            return "failed"
        return f"{d['median_ms']:.0f} ({d['min_ms']:.0f}–{d['max_ms']:.0f})"

    print()
    print(f"Machine: {cpu}, {ncpu} cores; {meta['date']}; torch {meta['torch']}, "
          f"onnxruntime {meta['onnxruntime']}, monai {meta['monai']}, "
          f"dynamic-network-architectures {meta['dynamic_network_architectures']}; "
          f"voxconv {meta['voxconv_rev']}; input 1×1×{args.size}³; {args.rounds} round(s) × "
          f"{args.repeat} timed run(s) per engine (after one warm-up each); "
          f"median (min–max) in ms")
    print()
    print("| network | threads | PyTorch ms | onnxruntime ms | voxconv ms | voxconv GFLOP/s "
          "| vs better peer | peak RSS MiB (PyTorch / ORT / voxconv) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        if "error" in row:
            print(f"| {row['network']} | {row['threads']} | — | — | — | — | — | "
                  f"export failed |")
            continue
        g = row["voxconv"].get("gflops")
        ratio = (f"**{row['ratio']:.2f}×** ({'ORT' if row['better_peer'] == 'ort' else 'PyTorch'})"
                 if row["ratio"] else "—")
        rss = " / ".join(f"{row[e]['peak_rss_mib']:.0f}" for e in ENGINES)
        print(f"| {row['network']} | {row['threads']} | {cell(row['torch'])} | "
              f"{cell(row['ort'])} | {cell(row['voxconv'])} | "
              f"{f'{g:.1f}' if g else '—'} | {ratio} | {rss} |")
    print()
    for t in args.threads:
        rs = [r["ratio"] for r in rows if r["threads"] == t and r.get("ratio")]
        gm = geomean(rs)
        meta[f"geomean_t{t}"] = gm
        print(f"- {t} thread(s): geomean of voxconv vs the better peer "
              f"{f'{gm:.2f}×' if gm else 'n/a'} over {len(rs)} network(s)")
    print(f"- total wall time {total_s:.0f} s")
    loads, extra = [], []  # extra: load beyond the benchmark's own threads
    for rec in results.values():
        for t_str, runs in rec["runs"].items():
            for es in runs.values():
                for e in es:
                    for v in e["loadavg_1m"]:
                        if v is not None:
                            loads.append(v)
                            extra.append(v - int(t_str))
    if loads:
        meta["loadavg_1m"] = [min(loads), max(loads)]
        busy = max(extra) > 0.75
        print(f"- 1-minute load average around the runs: {min(loads):.1f}–{max(loads):.1f} "
              f"on {ncpu} cores" + (f" (up to {max(extra):.1f} beyond the benchmark's own "
                                    f"threads: **the machine was busy, the figures are noisy**)"
                                    if busy else ""))

    # Failures, verbatim (the first of each kind).
    errs = []
    for row in rows:
        if "error" in row:
            errs.append((row["network"], row["threads"], "export", row["error"]))
            continue
        for eng in ENGINES:
            for e in row[eng]["errors"]:
                errs.append((row["network"], row["threads"], eng, e))
    if errs:
        print()
        print("Failures:")
        for net, t, eng, e in errs:
            print(f"- {net}, {t} thread(s), {LABEL.get(eng, eng)}:")
            print("  ```")
            for line in e.splitlines():
                print(f"  {line}")
            print("  ```")

    # voxconv's time per strategy at the largest thread count (last timed run, last round).
    tmax = max(args.threads)
    print()
    print(f"voxconv stages at {tmax} thread(s), summed per strategy (last timed run of the "
          f"last round):")
    print()
    for name in names:
        runs = results[name]["runs"].get(str(tmax), {}).get("voxconv", [])
        vok = [e for e in runs if "error" not in e]
        if not vok:
            print(f"- {name}: no voxconv run")
            continue
        per = {}
        for s in vok[-1].get("stages", []):
            per[s["strategy"]] = per.get(s["strategy"], 0.0) + s["ms"]
        tot = sum(per.values()) or 1.0
        parts = ", ".join(f"{k} {ms:.0f} ms ({100 * ms / tot:.0f}%)"
                          for k, ms in sorted(per.items(), key=lambda kv: -kv[1]))
        print(f"- {name} ({vok[-1]['runs_ms'][-1]:.0f} ms wall, stages sum {tot:.0f} ms): "
              f"{parts}")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows, "raw": results}, f, indent=1)
        log(f"wrote {args.json}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
