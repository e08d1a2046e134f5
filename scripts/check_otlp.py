#!/usr/bin/env python3
"""Live check of `voxconv serve --otlp-endpoint` (run by .ci/run).

Sends one InferStream with a W3C traceparent to a server exporting to the fake collector
(examples/fake_otlp_collector.rs), then, after the server has shut down (which flushes its
spans), reads the collector's JSON lines and checks: the server's `rpc` span has the
client's trace id and the client's span as parent, and the stage spans are under it.

    check_otlp.py send --server 127.0.0.1:50153
    check_otlp.py verify --spans target/ci-otlp-spans.jsonl
"""
import argparse
import json
import sys

import numpy as np

TRACE = "5a7c0e0b1d9e4f2a8c3b6d1e0f9a8b7c"
PARENT = "1f2e3d4c5b6a7980"
STAGES = ("validate", "queue_wait", "decode", "compute", "send")


def send(server):
    from voxconv_client import Client
    x = np.random.default_rng(0).random((1, 1, 12, 11, 10), dtype=np.float32)
    with Client(server) as c:
        y = c.infer("sobel3d", x, metadata=[("traceparent", f"00-{TRACE}-{PARENT}-01")])
    assert y.shape == (1, 3, 12, 11, 10)
    print("sent one InferStream with traceparent", TRACE, PARENT)


def verify(path):
    spans = [json.loads(line) for line in open(path) if line.strip()]
    mine = [s for s in spans if s["trace_id"] == TRACE]
    rpc = [s for s in mine if s["name"] == "rpc"]
    assert len(rpc) == 1, f"expected one rpc span in trace {TRACE}, got {rpc} of {spans}"
    rpc = rpc[0]
    assert rpc["parent_span_id"] == PARENT, f"rpc parent {rpc['parent_span_id']} != {PARENT}"
    by_id = {s["span_id"]: s for s in mine}
    under = []
    for s in mine:
        if s is rpc:
            continue
        at, hops = s, 0
        while at["parent_span_id"] != rpc["span_id"]:
            at = by_id.get(at["parent_span_id"])
            hops += 1
            assert at is not None and hops < 10, f"span {s['name']} is not under rpc"
        under.append(s["name"])
    missing = [st for st in STAGES if st not in under]
    assert not missing, f"stages missing under rpc: {missing} (got {under})"
    print(f"OTLP: rpc span in the client's trace, parent = client span; under it: {sorted(under)}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["send", "verify"])
    ap.add_argument("--server")
    ap.add_argument("--spans")
    a = ap.parse_args()
    send(a.server) if a.what == "send" else verify(a.spans)


if __name__ == "__main__":
    sys.exit(main())
