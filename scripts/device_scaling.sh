#!/usr/bin/env bash
# Kernel scaling past 2 cores: kernel-bench on every shared workload at 1, 2, 4, 8 and 16
# threads (for the device machine; writes JSON lines to ${OUT:-.}/scaling.jsonl).
set -euo pipefail
cd "$(dirname "$0")/.."
exe=${VOXCONV:-target/release/voxconv}
out=${OUT:-.}/scaling.jsonl
: > "$out"
nproc; lscpu | grep -E "Model name|Flags" | sed 's/Flags:.*avx512f.*/Flags: avx512f present/' | head -2
for t in 1 2 4 8 16; do
  "$exe" kernel-bench --workloads benches/workloads.toml --threads "$t" --repeat 5 --json | tee -a "$out"
done
