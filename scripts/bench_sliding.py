#!/usr/bin/env python3
"""Whole-scan sliding-window inference, side by side: MONAI's `sliding_window_inference`
with a PyTorch predictor and with an onnxruntime predictor versus voxconv's server-side
sliding window, on the same ONNX network and the same scan, output = labels (argmax over
the classes): wall time and peak RSS of each.

Every engine runs in its own process, one after the other, on the same seeded scan
([1, C, D, H, W] float32, written once to a temporary .npy that each process loads):

    PyTorch      MONAI sliding_window_inference, the network rebuilt in PyTorch with the
                 same seeded constructor as the script that exported model.onnx (--torch-net;
                 checked against onnxruntime on one window first), torch.set_num_threads(T),
                 inference_mode, then torch.argmax(1) -> uint8
    onnxruntime  MONAI sliding_window_inference with an onnxruntime predictor on model.onnx
                 (CPUExecutionProvider, ORT_ENABLE_ALL, intra_op_num_threads=T; torch
                 set_num_threads(T) for MONAI's blending), argmax
    voxconv      `voxconv serve --model-repository R --workers 1 --threads-per-job T` on a
                 repository R holding only this model, the scan sent with the Python client
                 (clients/python), sliding_window={"output": "labels", ...}

wall s: the inference call alone (MONAI + argmax; for voxconv the client's infer() call,
upload and download included), not process start-up or model loading (shown apart).
peak RSS: the MONAI process's ru_maxrss (os.wait4), which includes Python, torch / onnxruntime
and the scan; for voxconv the server's VmHWM (/proc/PID/status) after the call (the client
process, which holds the scan and the labels, is reported apart). The ratios: voxconv's time
against the faster MONAI run (faster MONAI / voxconv, > 1: voxconv is faster), and voxconv's
peak RSS against the smaller MONAI peak (< 1: voxconv needs less). The labels of every pair
of engines are compared (% of voxels equal).

    cargo build --release --bin voxconv
    python scripts/bench_sliding.py --model-dir /tmp/nets96/unet --torch-net unet \\
        [--scan 256,320,320] [--threads 2] [--overlap 0.25] [--json out.json]
    python scripts/bench_sliding.py --model-dir tests/fixtures/sliding/repo/tiny_unet \\
        --scan 64,64,64        # quick smoke run on the fixture network

--torch-net names the constructor: basicunet, unet, segresnet, nnunet (bench_networks.py,
library-default sizes, seed 0), monai_basicunet, monai_unet, monai_segresnet,
nnunet_plainconv (export_onnx.py's fixtures), tiny_unet (make_sliding_fixtures.py); default
the model directory's name where it is one of those, else the PyTorch engine is skipped.
Needs numpy, torch, monai, onnx, onnxruntime, grpcio (and dynamic-network-architectures for
nnU-Net).
"""
import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

import bench_networks as bn
import sliding_ref as sr

HERE, ROOT = sr.HERE, sr.ROOT
ENGINES = ["torch", "ort", "voxconv"]
LABEL = {"torch": "MONAI + PyTorch", "ort": "MONAI + onnxruntime", "voxconv": "voxconv"}
EXPORT_ONNX = {"monai_basicunet": 1, "monai_unet": 2, "monai_segresnet": 3,
               "nnunet_plainconv": 4}
TORCH_NETS = sorted(list(bn.NETWORKS) + list(EXPORT_ONNX) + ["tiny_unet"])


def build_torch(name):
    """The seeded network `name`, in eval mode, as the exporting script built it."""
    sys.path.insert(0, HERE)
    if name in bn.NETWORKS:
        return bn.build(name)
    if name in EXPORT_ONNX:
        import torch
        import export_onnx as ex
        seed = EXPORT_ONNX[name]
        torch.manual_seed(seed)
        return ex._randomise(getattr(ex, name)(), seed).eval()
    if name == "tiny_unet":
        import make_sliding_fixtures as mf
        return mf.build()
    raise SystemExit(f"--torch-net: unknown network {name!r}; known: {', '.join(TORCH_NETS)}")


# ---------------------------------------------------------------------------------------
# Workers (hidden modes, one process each).

def _labels(y):
    import torch
    return torch.argmax(y, dim=1).to(torch.uint8).numpy()


def worker_verify(a):
    """The PyTorch network against onnxruntime on one seeded window."""
    import torch
    torch.set_num_threads(a.threads)
    net = build_torch(a.torch_net)
    name, dims, out = sr.onnx_io(a.onnx)
    x = sr.make_scan((1, dims[1] or 1, *a.roi), 99)
    with torch.inference_mode():
        ref = net(torch.from_numpy(x)).numpy()
    got = sr.ort_session(a.onnx, a.threads).run([out], {name: x})[0]
    if got.shape != ref.shape:
        return {"ok": False, "error": f"shapes {got.shape} (ORT) vs {ref.shape} (torch)"}
    rel = float(np.abs(got - ref).max() / np.abs(ref).max())
    return {"ok": rel <= 1e-4, "rel": rel}


def worker_torch(a):
    t0 = time.perf_counter()
    import torch
    import monai.inferers  # noqa: F401  (imported before the clock starts)
    torch.set_num_threads(a.threads)
    net = build_torch(a.torch_net)
    x = np.load(a.scan)
    t1 = time.perf_counter()
    y = sr.monai_sliding(x, net, a.roi, a.overlap, a.blend, a.sigma_scale, a.batch, a.mirror)
    labels = _labels(y)
    t2 = time.perf_counter()
    np.save(a.labels, labels)
    return {"startup_s": t1 - t0, "wall_s": t2 - t1}


def worker_ort(a):
    t0 = time.perf_counter()
    import torch
    import monai.inferers  # noqa: F401  (imported before the clock starts)
    torch.set_num_threads(a.threads)  # MONAI's blending; the network runs in onnxruntime
    sess = sr.ort_session(a.onnx, a.threads)
    x = np.load(a.scan)
    t1 = time.perf_counter()
    y = sr.monai_sliding(x, sr.ort_predictor(sess), a.roi, a.overlap, a.blend, a.sigma_scale,
                         a.batch, a.mirror)
    labels = _labels(y)
    t2 = time.perf_counter()
    np.save(a.labels, labels)
    return {"startup_s": t1 - t0, "wall_s": t2 - t1}


def _hwm_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1))


def worker_voxconv(a):
    vc = sr.import_client()
    import grpc
    t0 = time.perf_counter()
    with vc.Client(a.address, timeout=a.timeout) as c:
        while True:
            try:
                if c.health() == "SERVING":
                    break
            except grpc.RpcError:
                pass
            if time.perf_counter() - t0 > 120:
                raise SystemExit("voxconv: not SERVING after 120 s")
            time.sleep(0.1)
        ready_s = time.perf_counter() - t0
        x = np.load(a.scan)
        hwm_before = _hwm_kib(a.server_pid)
        done = []
        t1 = time.perf_counter()
        labels = c.infer(a.model, x, sliding_window=sr.window_request(a, "labels"),
                         progress=lambda d, t: done.append((d, t)))
        t2 = time.perf_counter()
        hwm_after = _hwm_kib(a.server_pid)
        s = c.last_summary
    np.save(a.labels, labels[:, 0])
    return {"ready_s": ready_s, "wall_s": t2 - t1, "server_hwm_before_kib": hwm_before,
            "server_hwm_kib": hwm_after, "labels_dtype": str(labels.dtype),
            "windows": int(s.windows), "compute_ms": s.compute_ms, "queue_ms": s.queue_ms,
            "receive_ms": s.receive_ms, "progress_messages": len(done)}


WORKERS = {"verify": worker_verify, "torch": worker_torch, "ort": worker_ort,
           "voxconv": worker_voxconv}


def worker_main(argv):
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", choices=sorted(WORKERS), required=True)
    ap.add_argument("--onnx", required=True)
    ap.add_argument("--torch-net")
    ap.add_argument("--scan")
    ap.add_argument("--labels")
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--address")
    ap.add_argument("--model")
    ap.add_argument("--server-pid", type=int)
    ap.add_argument("--timeout", type=float, default=3600)
    sr.add_window_args(ap)
    a = ap.parse_args(argv)
    print(json.dumps(WORKERS[a.worker](a)), flush=True)


# ---------------------------------------------------------------------------------------
# The parent (numpy only).

def windows_per_item(scan, roi, overlap):
    n = 1
    for size, r, o in zip(scan, roi, sr.per_axis(overlap)):
        size = max(size, r)
        step = r if size == r else max(int(r * (1 - o)), 1)
        n *= math.ceil((size - r) / step) + 1
    return n


def window_argv(a):
    fmt = lambda v: ",".join(str(x) for x in v)  # noqa: E731
    return ["--roi", fmt(a.roi), "--overlap", fmt(a.overlap), "--blend", a.blend,
            "--sigma-scale", fmt(a.sigma_scale), "--batch", str(a.batch),
            "--mirror", fmt(a.mirror) or "none"]


def child(a, worker, extra, timeout):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", worker, "--onnx", a.onnx,
           "--threads", str(a.threads)] + window_argv(a) + extra
    rc, out, err, rss_kib, wall = bn.run_child(cmd, a.threads, timeout)
    if rc != 0:
        raise RuntimeError(f"{worker} worker failed (exit {rc}):\n{bn.tail(err)}")
    r = bn.last_json(out)
    r["rss_kib"], r["process_s"] = rss_kib, wall
    return r


def make_repo(model_dir, root):
    """A repository holding only this model (hard links, else copies)."""
    name = os.path.basename(os.path.normpath(model_dir))
    dst = os.path.join(root, name)
    os.makedirs(dst)
    for f in os.listdir(model_dir):
        src = os.path.join(model_dir, f)
        if os.path.isfile(src):
            try:
                os.link(src, os.path.join(dst, f))
            except OSError:
                shutil.copy2(src, os.path.join(dst, f))
    return name


def run_voxconv(a, scan_path, labels_path, tmp):
    repo = os.path.join(tmp, "repo")
    name = make_repo(a.model_dir, repo)
    pf = os.path.join(tmp, "port")
    cmd = [a.voxconv, "serve", "--listen", "127.0.0.1:0", "--port-file", pf, "--log", "warn",
           "--model-repository", repo, "--workers", "1", "--threads-per-job", str(a.threads)]
    if a.memory_budget:
        cmd += ["--memory-budget", a.memory_budget]
    cmd += a.server_arg or []
    log = open(os.path.join(tmp, "server.log"), "w+")
    t0 = time.perf_counter()
    srv = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        while not (os.path.exists(pf) and os.path.getsize(pf) > 0):
            if srv.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"voxconv serve exited {srv.returncode}:\n"
                                   f"{bn.tail(log.read())}")
            if time.perf_counter() - t0 > 120:
                raise RuntimeError("voxconv serve wrote no port file in 120 s")
            time.sleep(0.05)
        addr = [line.split("=", 1)[1] for line in open(pf).read().split()
                if line.startswith("listen=")][0]
        port_s = time.perf_counter() - t0
        r = child(a, "voxconv", ["--address", addr, "--model", name, "--server-pid",
                                 str(srv.pid), "--scan", scan_path, "--labels", labels_path,
                                 "--timeout", str(a.timeout)], a.timeout)
        r["startup_s"] = port_s + r["ready_s"]
        r["client_rss_kib"] = r["rss_kib"]
        r["rss_kib"] = r["server_hwm_kib"]
        return r
    finally:
        srv.terminate()
        try:
            srv.wait(30)
        except subprocess.TimeoutExpired:
            srv.kill()
            srv.wait()
        log.close()


def main():
    if "--worker" in sys.argv[1:]:
        return worker_main(sys.argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", required=True, help="a repository model directory "
                    "with model.onnx (its name is the model's name on the server)")
    ap.add_argument("--torch-net", help="constructor of the same network for the PyTorch "
                    f"engine: {', '.join(TORCH_NETS)} (default: the directory's name)")
    ap.add_argument("--scan", type=lambda s: sr.triple(s, int), default=[256, 320, 320],
                    help="scan D,H,W (default 256,320,320)")
    ap.add_argument("--threads", type=int, default=2)
    sr.add_window_args(ap)
    ap.add_argument("--engines", type=lambda s: [v for v in s.split(",") if v],
                    default=ENGINES, help="subset of torch,ort,voxconv")
    ap.add_argument("--voxconv", default=os.path.join(ROOT, "target", "release", "voxconv"))
    ap.add_argument("--memory-budget", help="voxconv serve --memory-budget (default: its own)")
    ap.add_argument("--server-arg", action="append", help="extra `voxconv serve` argument "
                    "(repeatable, e.g. --server-arg=--chunk-bytes=4MiB)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per engine run")
    ap.add_argument("--json", help="write all numbers to this file")
    a = ap.parse_args()

    a.onnx = os.path.abspath(os.path.join(a.model_dir, "model.onnx"))
    if not os.path.isfile(a.onnx):
        ap.error(f"{a.onnx} is missing")
    if len(a.scan) != 3:
        ap.error("--scan: expected D,H,W")
    bad = [e for e in a.engines if e not in ENGINES]
    if bad or not a.engines:
        ap.error(f"--engines: unknown {bad}; known: {ENGINES}")
    if "voxconv" in a.engines and not os.access(a.voxconv, os.X_OK):
        ap.error(f"{a.voxconv} is missing: cargo build --release --bin voxconv")
    base = os.path.basename(os.path.normpath(a.model_dir))
    if a.torch_net is None and base in TORCH_NETS:
        a.torch_net = base
    engines = list(a.engines)
    if "torch" in engines and a.torch_net is None:
        print(f"no --torch-net for {base!r} (known: {', '.join(TORCH_NETS)}): skipping the "
              "PyTorch engine", file=sys.stderr)
        engines.remove("torch")
    elif a.torch_net is not None and a.torch_net not in TORCH_NETS:
        ap.error(f"--torch-net: unknown {a.torch_net!r}; known: {', '.join(TORCH_NETS)}")

    _, dims, _ = sr.onnx_io(a.onnx)
    a.roi = sr.default_roi(dims, a.roi)
    channels = dims[1] if len(dims) > 1 and dims[1] else 1
    shape = [1, channels, *a.scan]
    nwin = windows_per_item(a.scan, a.roi, a.overlap)
    cpu, cpus = bn.machine()
    print(f"# {cpu}, {cpus} CPUs, load {bn.loadavg()}; voxconv {bn.git_rev()}; torch "
          f"{bn.version('torch')}, monai {bn.version('monai')}, onnxruntime "
          f"{bn.version('onnxruntime')}")
    print(f"# model {a.onnx}; scan {shape} float32 ({np.prod(shape) * 4 / 2**20:.0f} MiB), "
          f"roi {a.roi}, overlap {sr.per_axis(a.overlap)}, {a.blend}, sigma_scale "
          f"{sr.per_axis(a.sigma_scale)}, batch {a.batch}, mirror {a.mirror or 'none'}, "
          f"{nwin} windows, {a.threads} thread(s), output labels", flush=True)

    results = {}
    with tempfile.TemporaryDirectory(prefix="voxconv-sliding-") as tmp:
        if "torch" in engines:
            v = child(a, "verify", ["--torch-net", a.torch_net], 600)
            if not v["ok"]:
                sys.exit(f"--torch-net {a.torch_net} is not the network in {a.onnx}: "
                         f"{v.get('error') or 'max|ORT-torch|/max|torch| = %.2e' % v['rel']}")
            print(f"# PyTorch {a.torch_net} vs onnxruntime on one window: max|diff|/max|ref| "
                  f"= {v['rel']:.2e}", flush=True)
        scan_path = os.path.join(tmp, "scan.npy")
        np.save(scan_path, sr.make_scan(shape, a.seed))
        for e in engines:
            labels = os.path.join(tmp, f"labels_{e}.npy")
            print(f"# running {LABEL[e]} ...", file=sys.stderr, flush=True)
            if e == "voxconv":
                r = run_voxconv(a, scan_path, labels, tmp)
            else:
                extra = ["--scan", scan_path, "--labels", labels]
                if e == "torch":
                    extra += ["--torch-net", a.torch_net]
                r = child(a, e, extra, a.timeout)
            results[e] = r
            print(f"#   {LABEL[e]}: {r['wall_s']:.2f} s, peak RSS {r['rss_kib'] / 1024:.0f} "
                  f"MiB", file=sys.stderr, flush=True)
        agree = {}
        done = list(results)
        loaded = {e: np.load(os.path.join(tmp, f"labels_{e}.npy")) for e in done}
        for i, e1 in enumerate(done):
            for e2 in done[i + 1:]:
                l1, l2 = loaded[e1], loaded[e2]
                agree[f"{e1}/{e2}"] = (100.0 * float((l1 == l2).mean())
                                       if l1.shape == l2.shape else None)

    print()
    print("| engine | wall s | peak RSS MiB | start-up s |")
    print("|---|---|---|---|")
    for e in done:
        r = results[e]
        extra = ""
        if e == "voxconv":
            extra = (f" (server; client process {r['client_rss_kib'] / 1024:.0f} MiB, "
                     f"server before the call {r['server_hwm_before_kib'] / 1024:.0f} MiB)")
        print(f"| {LABEL[e]} | {r['wall_s']:.2f} | {r['rss_kib'] / 1024:.0f}{extra} | "
              f"{r['startup_s']:.2f} |")
    monai = [e for e in done if e != "voxconv"]
    summary = {}
    if "voxconv" in results and monai:
        vx = results["voxconv"]
        fast = min(monai, key=lambda e: results[e]["wall_s"])
        small = min(monai, key=lambda e: results[e]["rss_kib"])
        summary = {"time_ratio": results[fast]["wall_s"] / vx["wall_s"], "time_vs": fast,
                   "rss_ratio": vx["rss_kib"] / results[small]["rss_kib"], "rss_vs": small}
        print()
        print(f"time: {LABEL[fast]} / voxconv = {summary['time_ratio']:.2f}x "
              f"(> 1: voxconv faster)")
        print(f"peak RSS: voxconv / {LABEL[small]} = {summary['rss_ratio']:.2f} "
              f"(< 1: voxconv smaller)")
        print(f"voxconv: {vx['windows']} windows, labels {vx['labels_dtype']}, compute "
              f"{vx['compute_ms'] / 1e3:.2f} s, {vx['progress_messages']} progress messages")
    print("label agreement: " + ", ".join(
        f"{LABEL[k.split('/')[0]]} vs {LABEL[k.split('/')[1]]} "
        + ("shape mismatch" if v is None else f"{v:.4f} %") for k, v in agree.items()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.onnx, "torch_net": a.torch_net, "scan": shape,
                       "roi": a.roi, "overlap": sr.per_axis(a.overlap), "blend": a.blend,
                       "sigma_scale": sr.per_axis(a.sigma_scale), "batch": a.batch,
                       "mirror": a.mirror, "threads": a.threads, "windows": nwin,
                       "cpu": cpu, "results": results, "summary": summary,
                       "label_agreement_percent": agree}, f, indent=1)


if __name__ == "__main__":
    main()
