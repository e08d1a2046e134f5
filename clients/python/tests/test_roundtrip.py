"""Round-trips volumes through a live server's InferStream and checks the numbers against a
NumPy convolution written here from the models' definitions. VOXCONV_SERVER names the
server (default 127.0.0.1:50051)."""
import os
import sys

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from voxconv_client import Client  # noqa: E402

TARGET = os.environ.get("VOXCONV_SERVER", "127.0.0.1:50051")


def correlate3d(x, k, pad):
    """Cross-correlation (what Conv3d computes) of one 3-D volume with one kernel."""
    xp = np.pad(x.astype(np.float64), pad)
    win = sliding_window_view(xp, k.shape)
    return np.einsum("zyxabc,abc->zyx", win, k.astype(np.float64))


def sobel_kernels():
    diff, smooth = np.array([-1.0, 0.0, 1.0]), np.array([1.0, 2.0, 1.0])
    ks = []
    for axis in range(3):
        f = [smooth, smooth, smooth]
        f[axis] = diff
        ks.append(np.einsum("a,b,c->abc", *f) / 32.0)
    return ks


def test_sobel_round_trip_matches_numpy():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2, 1, 21, 18, 25)).astype(np.float32)
    with Client(TARGET, chunk_bytes=10_000) as c:
        y = c.infer("sobel3d", x)
        assert c.last_summary.output_bytes == y.nbytes
    assert y.shape == (2, 3, 21, 18, 25) and y.dtype == np.float32
    for n in range(2):
        for ch, k in enumerate(sobel_kernels()):
            want = correlate3d(x[n, 0], k, 1)
            np.testing.assert_allclose(y[n, ch], want, rtol=1e-5, atol=1e-5)


def test_gaussian_on_int16_ct_values():
    rng = np.random.default_rng(8)
    x = rng.integers(-1000, 2000, size=(1, 1, 17, 16, 15), dtype=np.int16)
    g = np.exp(-np.arange(-2, 3) ** 2 / 2.0)
    g /= g.sum()
    k = np.einsum("a,b,c->abc", g, g, g)
    with Client(TARGET) as c:
        y = c.infer("gaussian3d", x)
        y16 = c.infer("gaussian3d", x, output_dtype="float16")
    want = correlate3d(x[0, 0], k, 2)
    np.testing.assert_allclose(y[0, 0], want, rtol=1e-5, atol=1e-3)
    assert y16.dtype == np.float16
    np.testing.assert_allclose(y16[0, 0].astype(np.float64), want, rtol=2e-3, atol=0.5)


def test_list_models_and_errors():
    import grpc
    with Client(TARGET) as c:
        names = {m.name for m in c.list_models()}
        assert {"sobel3d", "gaussian3d"} <= names
        try:
            c.infer("sobel3d", np.zeros((1, 2, 4, 4, 4), np.float32))
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "channels" in e.details()
        else:
            raise AssertionError("channel mismatch accepted")
