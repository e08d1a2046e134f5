#!/usr/bin/env bash
# End-to-end InferStream time on loopback beside the kernel-only time for the same work:
# an mri-t1-first-layer-sized volume (1x1x128x128x128 float32) through the built-in 16-channel
# model filterbank16 (= the mri-t1-first-layer shape). Prints both medians and their ratio,
# and the bare loopback TCP time for the same output bytes (scripts/loopback_floor.py).
#   scripts/bench_e2e.sh [runs] [threads] [fp32|fp16]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-7}
threads=${2:-2}
dtype=${3:-fp32}
exe=target/release/voxconv
port=50199
tmp=$(mktemp -d)
trap 'kill $server 2>/dev/null || true; rm -rf "$tmp"' EXIT
python3 - "$tmp/x.npy" <<'PY'
import sys, struct
# .npy v1.0 header + float32 data, written without numpy
shape = (1, 1, 128, 128, 128)
hdr = "{'descr': '<f4', 'fortran_order': False, 'shape': %s, }" % (shape,)
hdr = hdr + " " * (64 - (10 + len(hdr) + 1) % 64) + "\n"
import random
random.seed(1)
n = 128 ** 3
data = struct.pack("<%df" % n, *[random.random() for _ in range(n)])
with open(sys.argv[1], "wb") as f:
    f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(hdr)) + hdr.encode() + data)
PY
$exe serve --listen 127.0.0.1:$port --threads-per-job "$threads" --log warn &
server=$!
for _ in $(seq 100); do $exe health --server http://127.0.0.1:$port >/dev/null 2>&1 && break; sleep 0.1; done
calls=()
for _ in $(seq "$runs"); do
  line=$($exe infer --server http://127.0.0.1:$port --model filterbank16 --input "$tmp/x.npy" --output "$tmp/y.npy" --output-dtype "$dtype" 2>&1)
  calls+=("$(echo "$line" | sed -E 's/.*call ([0-9.]+) ms.*/\1/')")
done
e2e=$(printf '%s\n' "${calls[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
kernel=$($exe kernel-bench --workloads benches/workloads.toml --only mri-t1-first-layer --threads "$threads" --repeat "$runs" --json \
  | python3 -c 'import json,sys; print(json.loads(sys.stdin.read())["median_ms"])')
python3 -c "e=$e2e; k=$kernel; print(f'threads {$threads}, output {\"$dtype\"}: InferStream end-to-end median {e:.1f} ms, kernel-only median {k:.1f} ms, ratio {e/k:.2f}x')"
mib=$([ "$dtype" = fp16 ] && echo 64 || echo 128)
python3 scripts/loopback_floor.py "$mib" "$runs"
