"""Client side of sliding-window calls: what `infer(..., sliding_window=...)` puts in the
stream header, Progress messages, and output decoding by the header's dtype, against a
fake in-process server (no voxconv needed). When the live server (VOXCONV_SERVER) serves
the `tiny_unet` model of tests/fixtures/sliding, its MONAI outputs are checked too."""
import json
import os
from concurrent import futures

import grpc
import numpy as np
import pytest

from voxconv_client import Client, pb, pb_grpc, sliding_window_message

TARGET = os.environ.get("VOXCONV_SERVER", "127.0.0.1:50051")
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..",
                        "tests", "fixtures", "sliding")


class _Fake(pb_grpc.InferenceServicer):
    """Answers InferStream with a header, Progress messages between the chunks, a summary;
    the output is labels (uint8 or uint16) or logits as the request's sliding_window asks."""

    def __init__(self):
        self.headers = []

    def InferStream(self, request_iterator, context):
        reqs = list(request_iterator)
        h = reqs[0].header
        self.headers.append(h)
        n, _, d, hh, w = h.input_shape
        if h.sliding_window.output == pb.WINDOW_OUTPUT_LABELS:
            big = h.output_dtype == pb.UINT16
            y = (np.arange(n * d * hh * w) % (300 if big else 3)).astype(
                "<u2" if big else "u1").reshape(n, 1, d, hh, w)
            dt = pb.UINT16 if big else pb.UINT8
        else:
            y = np.arange(n * 2 * d * hh * w, dtype="<f4").reshape(n, 2, d, hh, w)
            dt = pb.FP32
        raw = y.tobytes()
        yield pb.InferStreamResponse(header=pb.OutputHeader(
            dtype=dt, shape=list(y.shape), total_bytes=len(raw)))
        step = max(1, len(raw) // 3)
        chunks = list(range(0, len(raw), step))
        for i, off in enumerate(chunks):
            yield pb.InferStreamResponse(chunk=pb.Chunk(offset=off, data=raw[off:off + step]))
            yield pb.InferStreamResponse(progress=pb.Progress(
                windows_done=i + 1, windows_total=len(chunks)))
        yield pb.InferStreamResponse(summary=pb.Summary(output_bytes=len(raw)))


@pytest.fixture()
def fake():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = _Fake()
    pb_grpc.add_InferenceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with Client(f"127.0.0.1:{port}") as c:
            yield c, servicer
    finally:
        server.stop(None)


def test_message_fields():
    sw = sliding_window_message({"roi": (16, 12, 20), "overlap": 0.5, "blend": "constant",
                                 "sigma_scale": (0.25, 0.125, 0.2), "batch": 3,
                                 "mirror": [0, 2], "output": "probabilities"})
    assert list(sw.roi) == [16, 12, 20] and list(sw.overlap) == [0.5]
    assert sw.blend == pb.BLEND_CONSTANT and list(sw.sigma_scale) == [0.25, 0.125, 0.2]
    assert sw.batch == 3 and list(sw.mirror.axes) == [0, 2]
    assert sw.output == pb.WINDOW_OUTPUT_PROBABILITIES
    none = sliding_window_message({"mirror": []})
    assert none.HasField("mirror") and not none.mirror.axes  # "no mirroring", not unset
    assert not sliding_window_message(True).HasField("mirror")
    assert sliding_window_message(None) is None
    for bad in ({"rio": 1}, {"roi": (1, 2)}, {"blend": "max"}, {"overlap": (0.1, 0.2)},
                {"output": "argmax"}, {"batch": 1.5}):
        with pytest.raises(ValueError):
            sliding_window_message(bad)
    with pytest.raises(ValueError, match="rio"):
        sliding_window_message({"rio": 1})


def test_labels_progress_and_dtype(fake):
    c, servicer = fake
    x = np.zeros((2, 1, 5, 6, 7), np.float32)
    seen = []
    y = c.infer("m", x, sliding_window={"output": "labels", "mirror": []},
                progress=lambda done, total: seen.append((done, total)))
    h = servicer.headers[-1]
    assert h.HasField("sliding_window") and h.sliding_window.mirror.axes == []
    assert h.output_dtype == pb.DTYPE_UNSPECIFIED  # labels: the server picks UINT8/UINT16
    assert y.dtype == np.uint8 and y.shape == (2, 1, 5, 6, 7)
    assert np.array_equal(y.reshape(-1), np.arange(y.size) % 3)
    assert seen and seen[-1][0] == seen[-1][1]
    y16 = c.infer("m", x, output_dtype="uint16", sliding_window={"output": "labels"})
    assert servicer.headers[-1].output_dtype == pb.UINT16
    assert y16.dtype == np.uint16 and np.array_equal(y16.reshape(-1), np.arange(y16.size) % 300)


def test_logits_and_plain_calls(fake):
    c, servicer = fake
    x = np.zeros((5, 6, 7), np.float32)
    y = c.infer("m", x, sliding_window=True)
    h = servicer.headers[-1]
    assert h.HasField("sliding_window") and h.output_dtype == pb.DTYPE_UNSPECIFIED
    assert y.dtype == np.float32 and y.shape == (2, 5, 6, 7)
    assert np.array_equal(y.reshape(-1), np.arange(y.size, dtype=np.float32))
    c.infer("m", x, output_dtype="float32", sliding_window={"output": "logits"})
    assert servicer.headers[-1].output_dtype == pb.FP32
    c.infer("m", x)  # no sliding window: FP32 asked for explicitly, as always
    assert not servicer.headers[-1].HasField("sliding_window")
    assert servicer.headers[-1].output_dtype == pb.FP32
    with pytest.raises(ValueError, match="shared_memory"):
        c.infer("m", x, sliding_window=True, shared_memory=True)
    with pytest.raises(ValueError, match="output_dtype"):
        c.infer("m", x, output_dtype="uint8")


def _live_tiny_unet():
    if not os.path.isfile(os.path.join(FIXTURES, "cases.json")):
        return None
    try:
        c = Client(TARGET, timeout=10)
        names = [m.name for m in c.list_models()]
    except grpc.RpcError:
        return None
    if "tiny_unet" not in names:
        c.close()
        return None
    return c


def test_live_monai_fixtures():
    c = _live_tiny_unet()
    if c is None:
        pytest.skip("no live server with the tiny_unet model of tests/fixtures/sliding")
    with c:
        for case in json.load(open(os.path.join(FIXTURES, "cases.json"))):
            x = np.load(os.path.join(FIXTURES, case["scan"]))
            want = np.load(os.path.join(FIXTURES, case["expected"]))
            sw = {k: case[k] for k in ("roi", "overlap", "blend", "sigma_scale", "batch",
                                       "mirror")}
            y = c.infer("tiny_unet", x, sliding_window=sw)
            err = float(np.abs(y - want).max() / np.abs(want).max())
            assert y.shape == want.shape and err <= 1e-4, (case["name"], err)
            labels = c.infer("tiny_unet", x, sliding_window=dict(sw, output="labels"))
            assert labels.dtype == np.uint8 and labels.shape == (x.shape[0], 1) + x.shape[2:]
            agree = float((labels[:, 0] == want.argmax(1)).mean())
            assert agree >= 0.9999, (case["name"], agree)
