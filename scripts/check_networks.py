#!/usr/bin/env python3
"""voxconv against onnxruntime on whole networks, through the server as a user calls it.

Serves the model directories of REPO (e.g. the ones `scripts/bench_networks.py --out REPO`
exported: MONAI BasicUNet, UNet, SegResNet, nnU-Net PlainConvUNet at their library defaults),
sends a seeded random scan through each with `voxconv infer`, runs onnxruntime on the same
model.onnx, and checks max|voxconv - ORT| <= 1e-4 x max|ORT|. Exit 1 on any mismatch.

    python scripts/check_networks.py --voxconv target/release/voxconv --repo /tmp/nets96
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--voxconv", default="target/release/voxconv")
    ap.add_argument("--repo", required=True, help="a directory of <name>/model.onnx")
    ap.add_argument("--seed", type=int, default=5)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp()
    pf = os.path.join(tmp, "port")
    srv = subprocess.Popen([a.voxconv, "serve", "--listen", "127.0.0.1:0", "--port-file", pf,
                            "--log", "warn", "--model-repository", a.repo])
    for _ in range(600):
        if os.path.exists(pf) and os.path.getsize(pf) > 0:
            break
        time.sleep(0.1)
    addr = [line.split("=", 1)[1] for line in open(pf).read().split() if line.startswith("listen=")][0]
    rng = np.random.default_rng(a.seed)
    bad = 0
    try:
        for name in sorted(os.listdir(a.repo)):
            path = os.path.join(a.repo, name, "model.onnx")
            if not os.path.isfile(path):
                continue
            s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            inp = s.get_inputs()[0]
            shape = [d if isinstance(d, int) else 1 for d in inp.shape]
            x = rng.standard_normal(shape).astype(np.float32)
            xi, yo = os.path.join(tmp, "x.npy"), os.path.join(tmp, "y.npy")
            np.save(xi, x)
            r = subprocess.run([a.voxconv, "infer", "--server", "http://" + addr, "--model", name,
                                "--input", xi, "--output", yo], capture_output=True, text=True)
            if r.returncode != 0:
                print(f"{name}: voxconv infer failed: {r.stderr.strip()[-400:]}")
                bad += 1
                continue
            y = np.load(yo)
            want = s.run(None, {inp.name: x})[0]
            err, scale = float(np.abs(y - want).max()), float(np.abs(want).max())
            ok = y.shape == want.shape and err <= 1e-4 * scale
            bad += not ok
            print(f"{name}: input {shape}, output {list(y.shape)}, max error {err:.3g} "
                  f"(max|ref| {scale:.3g}, {err / scale:.2e} relative) {'ok' if ok else 'MISMATCH'}")
    finally:
        srv.terminate()
        srv.wait()
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
