#!/usr/bin/env bash
# InferStream end to end with a persistent client (`voxconv bench`), over the socket, through
# same-host shared memory the client creates (the server copies the output in) and through
# memory the server creates (the kernel writes the output in place), interleaved, beside the
# kernel-only time for the same work:
# an mri-t1-first-layer-sized volume (1x1x128^3 float32) through filterbank16 (128 MiB out).
#   scripts/bench_transport.sh [rounds] [threads] [seconds per run]
# Prints one line per run and the medians: p50 per transport, kernel median, ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
threads=${2:-2}
secs=${3:-5}
exe=target/release/voxconv
port=50197
shm=/dev/shm
server=
trap '[ -n "$server" ] && kill $server 2>/dev/null || true' EXIT
$exe serve --listen 127.0.0.1:$port --threads-per-job "$threads" --log warn --shared-memory-dir $shm &
server=$!
for _ in $(seq 100); do $exe health --server http://127.0.0.1:$port >/dev/null 2>&1 && break; sleep 0.1; done
run() {
  $exe bench --server http://127.0.0.1:$port --workload mri-t1-first-layer --model filterbank16 \
    --rpc stream --json "$@" 2>/dev/null \
    | python3 -c 'import json,sys; d=json.load(sys.stdin); assert d["ok"] and not d["errors"], d; print(d["latency_ms"]["p50"])'
}
run --requests 3 >/dev/null # warm up
tcp=()
viashm=()
inplace=()
for r in $(seq "$rounds"); do
  t=$(run --duration "${secs}s"); s=$(run --duration "${secs}s" --shared-memory-dir $shm)
  m=$(run --duration "${secs}s" --server-shared-memory)
  echo "round $r: socket p50 $t ms, client shared memory p50 $s ms, server shared memory p50 $m ms"
  tcp+=("$t"); viashm+=("$s"); inplace+=("$m")
done
kill $server; wait $server 2>/dev/null || true; server=
kernel=$($exe kernel-bench --workloads benches/workloads.toml --only mri-t1-first-layer --threads "$threads" --repeat 15 --json \
  | python3 -c 'import json,sys; print(json.loads(sys.stdin.read())["median_ms"])')
python3 - "$threads" "$kernel" "${tcp[*]}" "${viashm[*]}" "${inplace[*]}" <<'PY'
import statistics, sys
threads, kernel = sys.argv[1], float(sys.argv[2])
tcp, shm, srv = ([float(x) for x in a.split()] for a in sys.argv[3:6])
t, s, m = statistics.median(tcp), statistics.median(shm), statistics.median(srv)
print(f"threads {threads}: kernel-only median {kernel:.1f} ms; InferStream p50 median over "
      f"{len(tcp)} runs: socket {t:.1f} ms ({t / kernel:.2f}x), client shared memory {s:.1f} ms "
      f"({s / kernel:.2f}x), server shared memory {m:.1f} ms ({m / kernel:.2f}x)")
PY
