#!/usr/bin/env python3
"""Checks the ghz configs in deploy/ghz/ without ghz (run by .ci/run from the repo root).

For each config: the keys ghz needs are there, the proto file exists and declares the
method, and the pre-serialized request of its `binary-file` (written by `voxconv ghz-data`)
is answered OK by a live server when sent as is, byte for byte, the way ghz sends it.

    check_ghz.py --server 127.0.0.1:50151 [--stubs clients/python]
"""
import argparse
import glob
import json
import os
import re
import sys

import grpc

REQUIRED = ("proto", "call", "binary-file", "insecure", "host", "concurrency", "total")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True)
    ap.add_argument("--stubs", default="clients/python")
    a = ap.parse_args()
    sys.path.insert(0, a.stubs)
    from voxconv_client._gen.voxconv.v1 import voxconv_pb2 as pb

    configs = sorted(glob.glob("deploy/ghz/*.json"))
    assert configs, "no ghz configs in deploy/ghz"
    channel = grpc.insecure_channel(
        a.server, options=[("grpc.max_receive_message_length", 64 << 20)])
    for path in configs:
        with open(path) as f:
            cfg = json.load(f)
        missing = [k for k in REQUIRED if k not in cfg]
        assert not missing, f"{path}: missing {missing}"
        assert os.path.exists(cfg["proto"]), f"{path}: proto {cfg['proto']} not found"
        service, method = cfg["call"].rsplit("/", 1)
        pkg, svc = service.rsplit(".", 1)
        text = open(cfg["proto"]).read()
        assert re.search(rf"^package {re.escape(pkg)};", text, re.M), f"{path}: package {pkg}"
        assert re.search(rf"service {svc}\b", text), f"{path}: service {svc}"
        assert re.search(rf"rpc {method}\s*\(", text), f"{path}: rpc {method}"
        body = open(cfg["binary-file"], "rb").read()
        # No serializers: grpcio sends the bytes as they are, as `ghz --binary-file` does.
        call = channel.unary_unary(f"/{service}/{method}")
        reply = call(body, timeout=30)
        if service == "voxconv.v1.Inference" and method == "Infer":
            r = pb.InferResponse.FromString(reply)
            shape = list(r.output.shape)
            assert len(r.output.data) == 4 * int(__import__("math").prod(shape)), shape
            detail = f"output {shape}"
        else:
            detail = f"{len(reply)} reply bytes"
        print(f"{path}: {cfg['call']} with {cfg['binary-file']} ({len(body)} bytes): OK, {detail}")


if __name__ == "__main__":
    main()
