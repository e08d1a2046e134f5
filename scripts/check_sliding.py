#!/usr/bin/env python3
"""voxconv's server-side sliding-window inference against MONAI's, on a running server.

For every --scan D,H,W, sends a seeded random scan [1, C, D, H, W] through `--model` with
`infer(..., sliding_window=...)` (the Python client of clients/python), once for the blended
logits and once for the labels, and runs `monai.inferers.sliding_window_inference` over the
same scan with the same window parameters, with an onnxruntime session of the same model
file (`--onnx`, intra-op threads `--threads`) as the predictor (and the same nnU-Net style
test-time mirroring, --mirror). Prints max|voxconv - MONAI| / max|MONAI| of the logits and
the agreement of the labels with MONAI's argmax over the channels (% of voxels; both the
argmax of voxconv's logits and voxconv's own labels output). Exit 1 where the relative error
is above --tol (1e-4) or an agreement below --min-agree (99.99 %).

    voxconv serve --model-repository tests/fixtures/sliding/repo --port-file /tmp/pf &
    /work/pyenv/bin/python scripts/check_sliding.py --address 127.0.0.1:PORT \\
        --model tiny_unet --onnx tests/fixtures/sliding/repo/tiny_unet/model.onnx \\
        --scan 29,23,31 --scan 13,30,25 --overlap 0.5 --mirror 0,1,2

Needs numpy, torch, monai, onnx, onnxruntime and grpcio (the client's dependencies).
"""
import argparse
import sys
import time

import numpy as np

import sliding_ref as sr


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--address", required=True, help="host:port of the voxconv server")
    ap.add_argument("--model", required=True, help="the model's name on the server")
    ap.add_argument("--onnx", required=True, help="the same model's model.onnx")
    ap.add_argument("--scan", action="append", type=lambda s: sr.triple(s, int),
                    help="scan D,H,W (repeatable; default 40,48,56)")
    sr.add_window_args(ap)
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--tol", type=float, default=1e-4, help="max relative logits error")
    ap.add_argument("--min-agree", type=float, default=99.99, help="min label agreement, %%")
    ap.add_argument("--timeout", type=float, default=600, help="per call, seconds")
    a = ap.parse_args()
    scans = a.scan or [[40, 48, 56]]
    if any(len(s) != 3 for s in scans):
        sys.exit("--scan: expected D,H,W")

    import torch
    import monai.inferers  # noqa: F401  (before the timings)
    torch.set_num_threads(a.threads)
    vc = sr.import_client()
    _, dims, _ = sr.onnx_io(a.onnx)
    a.roi = sr.default_roi(dims, a.roi)
    channels = dims[1] if len(dims) > 1 and dims[1] else 1
    sess = sr.ort_session(a.onnx, a.threads)
    predict = sr.ort_predictor(sess)
    print(f"model {a.model}: roi {a.roi}, overlap {sr.per_axis(a.overlap)}, {a.blend}, "
          f"sigma_scale {sr.per_axis(a.sigma_scale)}, batch {a.batch}, mirror {a.mirror}; "
          f"onnxruntime {a.threads} thread(s)")

    bad = 0
    with vc.Client(a.address, timeout=a.timeout) as c:
        for i, s in enumerate(scans):
            x = sr.make_scan((1, channels, *s), a.seed + i)
            t0 = time.perf_counter()
            ref = sr.monai_sliding(x, predict, a.roi, a.overlap, a.blend, a.sigma_scale,
                                   a.batch, a.mirror).numpy()
            t1 = time.perf_counter()
            progress = []
            got = c.infer(a.model, x, sliding_window=sr.window_request(a, "logits"),
                          progress=lambda d, t: progress.append((d, t)))
            t2 = time.perf_counter()
            labels = c.infer(a.model, x, sliding_window=sr.window_request(a, "labels"))
            windows = c.last_summary.windows
            if got.shape != ref.shape:
                print(f"scan {s}: voxconv logits {got.shape}, MONAI {ref.shape}: MISMATCH")
                bad += 1
                continue
            want_labels = ref.argmax(1)
            rel = float(np.abs(got - ref).max() / np.abs(ref).max())
            agree_logits = 100.0 * float((got.argmax(1) == want_labels).mean())
            if labels.shape != (1, 1, *s):
                print(f"scan {s}: voxconv labels {labels.shape}, expected {(1, 1, *s)}: "
                      "MISMATCH")
                bad += 1
                continue
            agree_labels = 100.0 * float((labels[:, 0] == want_labels).mean())
            ok = rel <= a.tol and min(agree_logits, agree_labels) >= a.min_agree
            bad += not ok
            prog = f", progress {progress[-1][0]}/{progress[-1][1]}" if progress else ""
            print(f"scan {s}: max|diff|/max|ref| = {rel:.2e} (max|ref| "
                  f"{float(np.abs(ref).max()):.3g}); labels agree {agree_labels:.4f} % "
                  f"(argmax of voxconv logits {agree_logits:.4f} %; labels dtype "
                  f"{labels.dtype}); windows {windows}{prog}; MONAI {t1 - t0:.2f} s, voxconv "
                  f"{t2 - t1:.2f} s  {'ok' if ok else 'MISMATCH'}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
