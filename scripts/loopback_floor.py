#!/usr/bin/env python3
"""The wire alone: time to move N bytes over one loopback TCP connection between two
processes (the receiver reads into a preallocated, pre-touched buffer), for comparison with
an InferStream that returns the same number of bytes. No gRPC, no HTTP/2, no compute.

    python3 scripts/loopback_floor.py [MiB] [runs]
"""
import multiprocessing as mp
import socket
import statistics
import sys
import time


def sender(port, n, runs, ready):
    data = bytes(n)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(1)
    ready.set()
    c, _ = s.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for _ in range(runs):
        c.recv(1)  # go
        c.sendall(data)
    c.close()


def main():
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 128
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 9
    n = mib << 20
    ready = mp.Event()
    port = 50999
    p = mp.Process(target=sender, args=(port, n, runs, ready))
    p.start()
    ready.wait()
    c = socket.create_connection(("127.0.0.1", port))
    buf = bytearray(n)
    view = memoryview(buf)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        c.send(b"g")
        got = 0
        while got < n:
            got += c.recv_into(view[got:], n - got)
        times.append((time.perf_counter() - t0) * 1e3)
    p.join()
    print(f"{mib} MiB over one loopback TCP connection: median {statistics.median(times):.1f} ms "
          f"(min {min(times):.1f}, max {max(times):.1f}, {runs} runs) = "
          f"{n / statistics.median(times) / 1e6:.2f} GB/s")


if __name__ == "__main__":
    main()
