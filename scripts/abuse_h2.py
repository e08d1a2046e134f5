#!/usr/bin/env python3
"""HTTP/2 abuse against a live voxconv server, with a healthy client measured throughout
(run by .ci/run; loopback only, each phase bounded in time).

Phases:
  rapid-reset   bursts of HEADERS + RST_STREAM for InferStream on one connection (CVE-2023-44487
                style), then the same paced; every abandoned job must be cancelled: workers
                busy, queue and reserved memory back to 0 within a second.
  continuation  HEADERS without END_HEADERS followed by a flood of CONTINUATION frames: the
                connection must be refused once the 8 KiB header list is exceeded, without
                the server's memory growing.
  big-headers   a gRPC call with 16 KiB of metadata: refused before the handler runs.

Prints the healthy client's p50/p99 before and during each attack, the server's RSS before
and after, and the time for the pool to drain.

    abuse_h2.py --server 127.0.0.1:50156 --metrics http://127.0.0.1:50157/metrics --pid PID
"""
import socket
import statistics
import struct
import threading
import time

import grpc
import h2.config
import h2.connection
import h2.settings
import hpack
import numpy as np

import live
from live import metric, rss_mib
from voxconv_client import Client


class Healthy(threading.Thread):
    """Sequential small InferStream calls; records latencies while running."""

    def __init__(self, server):
        super().__init__(daemon=True)
        self.client = Client(server)
        self.x = np.random.default_rng(1).random((1, 1, 16, 16, 16), dtype=np.float32)
        self.lat, self.errors, self.stop = [], [], threading.Event()

    def run(self):
        while not self.stop.is_set():
            t0 = time.perf_counter()
            try:
                self.client.infer("sobel3d", self.x, timeout=10)
                self.lat.append((time.perf_counter() - t0) * 1e3)
            except grpc.RpcError as e:
                self.errors.append(e.code().name)

    def measure(self, seconds):
        n0 = len(self.lat)
        time.sleep(seconds)
        return self.lat[n0:]


def pct(v, q):
    v = sorted(v)
    return v[min(len(v) - 1, int(q * len(v)))] if v else float("nan")


def h2_conn(host, port):
    s = socket.create_connection((host, port), timeout=5)
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    c.initiate_connection()
    s.sendall(c.data_to_send())
    return s, c


def grpc_headers(host, port, path):
    return [(":method", "POST"), (":scheme", "http"), (":authority", f"{host}:{port}"),
            (":path", path), ("content-type", "application/grpc"), ("te", "trailers")]


def rapid_reset(host, port, bursts, per_burst, pause):
    """HEADERS (+ a header message) then RST_STREAM, many times; returns streams sent and
    whether the server closed the connection (GOAWAY / reset) on us."""
    s, c = h2_conn(host, port)
    sent, closed = 0, False
    # A valid first InferStream message: a StreamHeader for sobel3d [1,1,64,64,64] FP32.
    from voxconv_client import pb
    msg = pb.InferStreamRequest(header=pb.StreamHeader(
        model="sobel3d", input_dtype=pb.FP32, input_shape=[1, 1, 64, 64, 64])).SerializeToString()
    frame = b"\x00" + struct.pack(">I", len(msg)) + msg
    sid = 1
    try:
        for _ in range(bursts):
            for _ in range(per_burst):
                c.send_headers(sid, grpc_headers(host, port, "/voxconv.v1.Inference/InferStream"))
                c.send_data(sid, frame)
                c.reset_stream(sid)
                sid += 2
                sent += 1
            s.sendall(c.data_to_send())
            s.setblocking(False)
            try:
                data = s.recv(65536)
                if data == b"":
                    closed = True
                    break
                for ev in c.receive_data(data):
                    if type(ev).__name__ == "ConnectionTerminated":
                        closed = True
            except BlockingIOError:
                pass
            s.setblocking(True)
            if closed:
                break
            if pause:
                time.sleep(pause)
    except (BrokenPipeError, ConnectionResetError, h2.exceptions.ProtocolError):
        closed = True
    finally:
        s.close()
    return sent, closed


def frame(ftype, flags, sid, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", sid) + payload


def continuation_flood(host, port, frames, size):
    """Raw frames: HEADERS without END_HEADERS, then CONTINUATION frames of junk headers."""
    s = socket.create_connection((host, port), timeout=5)
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(0x4, 0, 0, b""))
    enc = hpack.Encoder()
    block = enc.encode(grpc_headers(host, port, "/voxconv.v1.Inference/Infer"))
    s.sendall(frame(0x1, 0x0, 1, block))  # HEADERS, no END_HEADERS
    junk = enc.encode([("x-junk", "a" * (size - 16))])
    sent, closed = 0, False
    try:
        for _ in range(frames):
            s.sendall(frame(0x9, 0x0, 1, junk))  # CONTINUATION, no END_HEADERS
            sent += 1
    except (BrokenPipeError, ConnectionResetError):
        closed = True
    s.settimeout(2)
    try:
        while s.recv(65536):
            pass
        closed = True
    except (socket.timeout, ConnectionResetError):
        closed = closed or False
    s.close()
    return sent, closed


def stream_msg(model, shape):
    from voxconv_client import pb
    m = pb.InferStreamRequest(header=pb.StreamHeader(
        model=model, input_dtype=pb.FP32, input_shape=shape)).SerializeToString()
    return b"\x00" + struct.pack(">I", len(m)) + m


def chunk_msg(offset, data):
    from voxconv_client import pb
    m = pb.InferStreamRequest(chunk=pb.Chunk(offset=offset, data=data)).SerializeToString()
    return b"\x00" + struct.pack(">I", len(m)) + m


def huge_announcements(host, port, streams=30):
    """Streams whose first gRPC message announces 1 GiB and never sends it."""
    s, c = h2_conn(host, port)
    for i in range(streams):
        sid = 1 + 2 * i
        c.send_headers(sid, grpc_headers(host, port, "/voxconv.v1.Inference/Infer"))
        c.send_data(sid, b"\x00" + struct.pack(">I", 1 << 30) + b"\x00" * 64)
    s.sendall(c.data_to_send())
    time.sleep(1.0)
    return s


def read_status(s, c, sid, until):
    """Reads events until stream `sid` ends; returns its grpc-status (or None)."""
    status = None
    s.settimeout(0.1)
    while time.perf_counter() < until:
        try:
            data = s.recv(65536)
        except socket.timeout:
            continue
        if not data:
            break
        for ev in c.receive_data(data):
            name = type(ev).__name__
            if name in ("TrailersReceived", "ResponseReceived"):
                for k, v in ev.headers:
                    if k in ("grpc-status", b"grpc-status"):
                        status = int(v)
            if name in ("StreamEnded", "StreamReset") and getattr(ev, "stream_id", None) == sid:
                return status
        pending = c.data_to_send()
        if pending:
            s.sendall(pending)
    return status


def slow_uploader(host, port, timeout_ms=1500):
    s, c = h2_conn(host, port)
    hdrs = grpc_headers(host, port, "/voxconv.v1.Inference/InferStream") + [
        ("grpc-timeout", f"{timeout_ms}m")]
    c.send_headers(1, hdrs)
    c.send_data(1, stream_msg("sobel3d", [1, 1, 64, 64, 64]))
    s.sendall(c.data_to_send())
    t0 = time.perf_counter()
    status, off = None, 0
    while time.perf_counter() - t0 < 10 and status is None:
        c.send_data(1, chunk_msg(off, b"\x00" * 1024))
        off += 1024
        try:
            s.sendall(c.data_to_send())
        except (BrokenPipeError, ConnectionResetError):
            break
        status = read_status(s, c, 1, time.perf_counter() + 0.3)
    s.close()
    return status, (time.perf_counter() - t0) * 1e3


def zero_window_reader(host, port, metrics, timeout_ms=1500):
    s = socket.create_connection((host, port), timeout=5)
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    c.local_settings = h2.settings.Settings(client=True, initial_values={
        h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    c.initiate_connection()
    hdrs = grpc_headers(host, port, "/voxconv.v1.Inference/InferStream") + [
        ("grpc-timeout", f"{timeout_ms}m")]
    c.send_headers(1, hdrs)
    shape = [1, 1, 32, 32, 32]
    x = b"\x00" * (4 * 32 * 32 * 32)
    body = stream_msg("filterbank16", shape) + chunk_msg(0, x)
    sent = 0
    while sent < len(body):
        n = min(c.local_flow_control_window(1), c.max_outbound_frame_size, len(body) - sent)
        if n <= 0:
            for ev in c.receive_data(s.recv(65536)):
                pass
            continue
        c.send_data(1, body[sent:sent + n], end_stream=sent + n == len(body))
        sent += n
        s.sendall(c.data_to_send())
    s.sendall(c.data_to_send())
    # Never read again: the 2 MiB output cannot flow through a zero window.
    key = 'voxconv_requests_total{method="InferStream",model="filterbank16",code="DEADLINE_EXCEEDED"}'
    n0 = metric(metrics, key)
    t0 = time.perf_counter()
    while metric(metrics, key) == n0:
        assert time.perf_counter() - t0 < 10, "the zero-window reader was never timed out"
        time.sleep(0.02)
    ended = (time.perf_counter() - t0) * 1e3
    t1 = time.perf_counter()
    while metric(metrics, "voxconv_memory_reserved_bytes") > 0 or metric(metrics, "voxconv_workers_busy") > 0:
        assert time.perf_counter() - t1 < 1.0
        time.sleep(0.01)
    s.close()
    return ended


def main():
    a = live.args()
    host, port = a.server.rsplit(":", 1)
    port = int(port)

    healthy = Healthy(a.server)
    healthy.start()
    base = healthy.measure(2.0)
    rss0 = rss_mib(a.pid)
    print(f"baseline: healthy p50 {pct(base, .5):.2f} ms, p99 {pct(base, .99):.2f} ms "
          f"({len(base)} calls); server RSS {rss0:.0f} MiB")

    for name, bursts, per, pause in (("burst", 50, 100, 0.0), ("paced", 100, 5, 0.02)):
        box = {"sent": 0, "closed": 0, "conns": 0}

        def attack():
            # For ~3 s: one connection after another, each attacked until the server cuts it.
            t_end = time.perf_counter() + 3.0
            while time.perf_counter() < t_end:
                sent, closed = rapid_reset(host, port, bursts, per, pause)
                box["sent"] += sent
                box["closed"] += int(closed)
                box["conns"] += 1

        t = threading.Thread(target=attack)
        n0 = len(healthy.lat)
        t.start()
        t.join(timeout=60)
        during = healthy.lat[n0:]
        sent = box["sent"]
        closed = f"{box['closed']} of {box['conns']} connections"
        t0 = time.perf_counter()
        while True:
            busy = metric(a.metrics, "voxconv_workers_busy")
            queued = metric(a.metrics, "voxconv_queue_length")
            reserved = metric(a.metrics, "voxconv_memory_reserved_bytes")
            if busy == 0 and queued == 0 and reserved == 0:
                break
            assert time.perf_counter() - t0 < 1.0, (busy, queued, reserved)
            time.sleep(0.01)
        drain = (time.perf_counter() - t0) * 1e3
        print(f"rapid reset ({name}): {sent} streams opened and reset, connection closed by the "
              f"server: {closed}; healthy p99 during {pct(during, .99):.2f} ms ({len(during)} calls) "
              f"vs {pct(base, .99):.2f} baseline; pool drained {drain:.0f} ms after")

    sent, closed = continuation_flood(host, port, 2000, 4096)
    rss1 = rss_mib(a.pid)
    assert closed, "the server kept a CONTINUATION flood open"
    print(f"CONTINUATION flood: connection closed after {sent} of 2000 4-KiB frames; "
          f"RSS {rss0:.0f} -> {rss1:.0f} MiB")
    assert rss1 < rss0 + 64, (rss0, rss1)

    n0 = metric(a.metrics, 'voxconv_requests_total{method="Infer",model="sobel3d",code="OK"}')
    ch = grpc.insecure_channel(a.server)
    call = ch.unary_unary("/voxconv.v1.Inference/Infer")
    try:
        call(b"", metadata=[("x-big", "b" * 16384)], timeout=5)
        raise AssertionError("16 KiB of metadata was accepted")
    except grpc.RpcError as e:
        code = e.code().name
    n1 = metric(a.metrics, 'voxconv_requests_total{method="Infer",model="sobel3d",code="OK"}')
    print(f"oversize headers (16 KiB): refused with {code}; Infer handler calls counted before/after: "
          f"{n0:.0f}/{n1:.0f}")

    rss_a = rss_mib(a.pid)
    n0 = len(healthy.lat)
    conn = huge_announcements(host, port, 30)
    rss_b = rss_mib(a.pid)
    during = healthy.lat[n0:]
    conn.close()
    print(f"huge announcements: 30 streams announcing 1 GiB messages: server RSS {rss_a:.0f} -> "
          f"{rss_b:.0f} MiB (the 4 MiB message limit refuses them before reserving); healthy "
          f"p99 during {pct(during, .99):.2f} ms")
    assert rss_b < rss_a + 256, (rss_a, rss_b)

    status, ms = slow_uploader(host, port)
    print(f"slow uploader (1 KiB per 0.3 s, grpc-timeout 1.5 s): ended with grpc-status {status} "
          f"after {ms:.0f} ms")
    assert status == 4, status  # DEADLINE_EXCEEDED

    ended = zero_window_reader(host, port, a.metrics)
    print(f"zero-window reader (grpc-timeout 1.5 s, 2 MiB output never read): DEADLINE_EXCEEDED "
          f"{ended:.0f} ms after the upload, job and memory released")

    healthy.stop.set()
    healthy.join(timeout=15)
    assert not healthy.errors, f"healthy client saw errors: {healthy.errors[:5]}"
    print(f"healthy client: {len(healthy.lat)} calls, 0 errors, p99 overall {pct(healthy.lat, .99):.2f} ms")


if __name__ == "__main__":
    main()
