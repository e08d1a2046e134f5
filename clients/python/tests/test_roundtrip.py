"""Round-trips volumes through a live server's InferStream and checks the numbers against a
NumPy convolution written here from the models' definitions. VOXCONV_SERVER names the
server (default 127.0.0.1:50051)."""
import os

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from voxconv_client import Client, pb

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


def test_health_and_get_model():
    with Client(TARGET) as c:
        assert c.health() == "SERVING"
        assert c.health("voxconv.v1.Inference") == "SERVING"
        assert c.health("model/sobel3d") == "SERVING"
        info = c.get_model("sobel3d")
        assert (info.input_channels, info.output_channels) == (1, 3)
        assert list(info.layers[0].kernel) == [3, 3, 3]


def test_lower_rank_volumes_keep_their_layout():
    x = np.arange(7 * 6 * 5, dtype=np.uint8).reshape(7, 6, 5)
    with Client(TARGET) as c:
        y3 = c.infer("sobel3d", x)
        y5 = c.infer("sobel3d", x[None, None])
        assert c.last_summary.input_bytes == x.nbytes  # uint8 on the wire, not upcast
    assert y3.shape == (3, 7, 6, 5)
    np.testing.assert_array_equal(y3, y5[0])
    with pytest.raises(ValueError, match="volume"):
        Client(TARGET).infer("sobel3d", np.zeros((4, 4), np.float32))
    with pytest.raises(TypeError, match="float64"):
        Client(TARGET).infer("sobel3d", np.zeros((4, 4, 4)))


def test_nifti_example_overlays_the_scan(tmp_path):
    nib = pytest.importorskip("nibabel")
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    from infer_nifti import infer_nifti

    rng = np.random.default_rng(3)
    data = rng.integers(0, 1000, size=(12, 10, 8), dtype=np.int16)  # (x, y, z)
    affine = np.array([[0.9, 0, 0, -10], [0, 1.1, 0, 20], [0, 0, 2.0, -5], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "scan.nii.gz")
    with Client(TARGET) as c:
        out = infer_nifti(c, "sobel3d", str(tmp_path / "scan.nii.gz"),
                          str(tmp_path / "grad.nii.gz"))
    img = nib.load(tmp_path / "grad.nii.gz")
    assert img.shape == (12, 10, 8, 3) and out.shape == img.shape
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)  # same-size model
    x = np.transpose(data, (2, 1, 0)).astype(np.float64)
    want = correlate3d(x, sobel_kernels()[2], 1)  # d/dx in [z, y, x]
    np.testing.assert_allclose(np.transpose(img.get_fdata()[..., 2], (2, 1, 0)), want,
                               rtol=1e-5, atol=1e-3)


def test_shared_memory_round_trip_equals_the_socket():
    """Input and output through shared memory (the CI server runs with --shared-memory-dir
    /dev/shm): the same numbers as over the socket, for float32 and float16 output, in memory
    the server creates (computed in place) and in a POSIX object the client creates."""
    rng = np.random.default_rng(9)
    x = rng.normal(size=(1, 1, 19, 22, 17)).astype(np.float32)
    for where in ("server", "client"):
        with Client(TARGET) as c:
            for out in ("float32", "float16"):
                want = c.infer("filterbank16", x, output_dtype=out)
                got = c.infer("filterbank16", x, output_dtype=out, shared_memory=where)
                assert got.dtype == want.dtype and got.shape == want.shape == (1, 16, 19, 22, 17)
                np.testing.assert_array_equal(got, want)
            # A larger volume makes the client replace its region with a bigger one.
            x2 = rng.normal(size=(1, 1, 30, 22, 17)).astype(np.float32)
            np.testing.assert_array_equal(c.infer("filterbank16", x2, shared_memory=where),
                                          c.infer("filterbank16", x2))
            name = c._region.name
            assert c._region.kind == where
            regions = c.stub.SharedMemoryStatus(pb.SharedMemoryStatusRequest()).regions
            assert [(r.name, r.server_created) for r in regions] == [(name, where == "server")]
        # close() unregistered and freed it.
        with Client(TARGET) as c:
            assert name not in [r.name for r in
                                c.stub.SharedMemoryStatus(pb.SharedMemoryStatusRequest()).regions]
    # True takes the server's memory where the server can make it.
    with Client(TARGET) as c:
        np.testing.assert_array_equal(c.infer("filterbank16", x, shared_memory=True),
                                      c.infer("filterbank16", x))
        assert c._region.kind == "server"
