#!/usr/bin/env python3
"""Checks the kernel's memory bound: peak RSS of `voxconv conv3d` on mri-t1-first-layer
(input [1,1,128,128,128], filters [16,1,3,3,3], padding 1) must be at most
input + output + 64 MiB. Measured with /usr/bin/time -v (GNU time)."""
import argparse
import os
import re
import subprocess
import sys
import tempfile

import numpy as np

ap = argparse.ArgumentParser(description=__doc__)
ap.add_argument("--voxconv", default="target/release/voxconv")
ap.add_argument("--threads", default="2")
args = ap.parse_args()

with tempfile.TemporaryDirectory() as d:
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (1, 1, 128, 128, 128)).astype(np.float32)
    w = rng.uniform(-1, 1, (16, 1, 3, 3, 3)).astype(np.float32)
    np.save(os.path.join(d, "x.npy"), x)
    np.save(os.path.join(d, "w.npy"), w)
    out = os.path.join(d, "y.npy")
    cmd = ["/usr/bin/time", "-v", args.voxconv, "conv3d", "--input", os.path.join(d, "x.npy"),
           "--filters", os.path.join(d, "w.npy"), "--padding", "1,1,1", "--threads",
           args.threads, "--output", out]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"voxconv conv3d failed: {r.stderr}")
    rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    y = np.load(out, mmap_mode="r")
    assert y.shape == (1, 16, 128, 128, 128), y.shape
    limit = x.nbytes + y.size * 4 + 64 * 2**20
    print(f"peak RSS {rss_kib / 1024:.1f} MiB; input {x.nbytes / 2**20:.0f} MiB + output "
          f"{y.size * 4 / 2**20:.0f} MiB + 64 MiB = limit {limit / 2**20:.0f} MiB")
    if rss_kib * 1024 > limit:
        sys.exit("peak RSS over the limit")
