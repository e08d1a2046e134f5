#!/usr/bin/env python3
"""Soak and kill checks against a live server (run by .ci/run; loopback, bounded in time).

  soak  3,000 mixed RPCs (InferStream, Infer, KServe ModelInfer, ListModels, GetModel,
        health) from 4 threads: zero failures, server RSS growth bounded.
  kill  a client process streaming a 128 MiB output is SIGKILLed mid-stream: its job and
        its reserved memory must be released within a second.

    soak.py --server 127.0.0.1:50158 --metrics http://127.0.0.1:50159/metrics --pid PID
"""
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np

import live
from live import metric, rss_mib
from voxconv_client import Client, pb


def soak(server, pid, total=3000, threads=4):
    kserve = open("deploy/ghz/kserve-tiny.bin", "rb").read()
    rng = np.random.default_rng(5)
    vols = [rng.random((1, 1, 24, 20, 16), dtype=np.float32),
            rng.integers(0, 1000, (1, 1, 17, 16, 15), dtype=np.int16)]
    counter = iter(range(total))
    lock = threading.Lock()
    failures, done = [], {}

    def worker():
        with Client(server) as c:
            model_infer = c.channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                kind = ("stream", "infer", "kserve", "list", "get", "health")[i % 6]
                try:
                    if kind == "stream":
                        y = c.infer("gaussian3d", vols[i % 2], timeout=30)
                        assert y.shape == (1, 1) + vols[i % 2].shape[2:]
                    elif kind == "infer":
                        x = vols[0]
                        r = c.stub.Infer(pb.InferRequest(model="sobel3d", input=pb.Tensor(
                            dtype=pb.FP32, shape=list(x.shape), data=x.tobytes())), timeout=30)
                        assert list(r.output.shape) == [1, 3, 24, 20, 16]
                    elif kind == "kserve":
                        assert len(model_infer(kserve, timeout=30)) > 0
                    elif kind == "list":
                        assert len(c.list_models()) >= 3
                    elif kind == "get":
                        assert c.get_model("filterbank16").output_channels == 16
                    else:
                        assert c.health() == "SERVING"
                    with lock:
                        done[kind] = done.get(kind, 0) + 1
                except Exception as e:  # noqa: BLE001 - every failure is reported
                    failures.append(f"{kind}: {e!r}"[:200])

    rss0 = rss_mib(pid)
    t0 = time.perf_counter()
    ts = [threading.Thread(target=worker) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=300)
    secs = time.perf_counter() - t0
    rss1 = rss_mib(pid)
    print(f"soak: {sum(done.values())} RPCs in {secs:.1f} s ({dict(sorted(done.items()))}), "
          f"{len(failures)} failures; server RSS {rss0:.0f} -> {rss1:.0f} MiB")
    assert not failures, failures[:5]
    assert sum(done.values()) == total
    assert rss1 < rss0 + 128, (rss0, rss1)


CHILD = r"""
import sys, time, numpy as np
from voxconv_client import pb
import grpc
ch = grpc.insecure_channel(sys.argv[1], options=[("grpc.max_receive_message_length", 64 << 20)])
stub = __import__("voxconv_client")._gen.voxconv.v1.voxconv_pb2_grpc.InferenceStub(ch)
x = np.zeros((1, 1, 128, 128, 128), np.float32).tobytes()
def reqs():
    yield pb.InferStreamRequest(header=pb.StreamHeader(model="filterbank16", input_dtype=pb.FP32,
                                                       input_shape=[1, 1, 128, 128, 128]))
    for o in range(0, len(x), 1 << 20):
        yield pb.InferStreamRequest(chunk=pb.Chunk(offset=o, data=x[o:o + (1 << 20)]))
it = stub.InferStream(reqs())
next(it)                      # the output header: the job is admitted
print("streaming", flush=True)
time.sleep(60)                # never read the rest: the server fills its buffer and waits
"""


def kill_mid_stream(server, metrics):
    child = subprocess.Popen([sys.executable, "-c", CHILD, server], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "streaming"
    t0 = time.perf_counter()
    while metric(metrics, "voxconv_memory_reserved_bytes") == 0:
        assert time.perf_counter() - t0 < 10, "the stream never reserved memory"
        time.sleep(0.01)
    reserved = metric(metrics, "voxconv_memory_reserved_bytes")
    busy = metric(metrics, "voxconv_workers_busy")
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    t1 = time.perf_counter()
    while (metric(metrics, "voxconv_memory_reserved_bytes") > 0
           or metric(metrics, "voxconv_workers_busy") > 0):
        assert time.perf_counter() - t1 < 1.0, "job or memory not released within 1 s"
        time.sleep(0.005)
    ms = (time.perf_counter() - t1) * 1e3
    print(f"kill: client SIGKILLed mid-stream holding {reserved / 2**20:.0f} MiB reserved, "
          f"{busy:.0f} busy worker(s); released {ms:.0f} ms after the kill")


def main():
    a = live.args()
    kill_mid_stream(a.server, a.metrics)
    soak(a.server, a.pid)


if __name__ == "__main__":
    main()
