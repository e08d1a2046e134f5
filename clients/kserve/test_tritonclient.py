"""Triton's own Python client (tritonclient[grpc]) against voxconv's KServe v2 endpoint,
unchanged. VOXCONV_SERVER names the server (default 127.0.0.1:50051); VOXCONV_KSERVE_MODEL
the 1-channel model to use (default sobel3d)."""
import os
import queue

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from numpy.lib.stride_tricks import sliding_window_view
from tritonclient.utils import InferenceServerException

TARGET = os.environ.get("VOXCONV_SERVER", "127.0.0.1:50051")
MODEL = os.environ.get("VOXCONV_KSERVE_MODEL", "sobel3d")


def sobel_reference(x):
    """NumPy Conv3d (cross-correlation, zero padding 1) with the 3-D Sobel kernels / 32."""
    diff, smooth = np.array([-1.0, 0.0, 1.0]), np.array([1.0, 2.0, 1.0])
    out = []
    for axis in range(3):
        f = [smooth, smooth, smooth]
        f[axis] = diff
        k = np.einsum("a,b,c->abc", *f) / 32.0
        chans = []
        for n in range(x.shape[0]):
            win = sliding_window_view(np.pad(x[n, 0].astype(np.float64), 1), (3, 3, 3))
            chans.append(np.einsum("zyxabc,abc->zyx", win, k))
        out.append(np.stack(chans))
    return np.stack(out, axis=1)


@pytest.fixture
def client():
    c = grpcclient.InferenceServerClient(TARGET)
    yield c
    c.close()


def infer(client, x, datatype, request_id=""):
    inp = grpcclient.InferInput("input", list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    out = grpcclient.InferRequestedOutput("output")
    return client.infer(MODEL, [inp], outputs=[out], request_id=request_id)


def test_health_and_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL)
    assert not client.is_model_ready("no-such-model")
    meta = client.get_server_metadata()
    assert meta.name == "voxconv"
    md = client.get_model_metadata(MODEL)
    assert md.name == MODEL and list(md.versions) == ["1"]
    assert md.inputs[0].name == "input" and list(md.inputs[0].shape) == [-1, 1, -1, -1, -1]
    assert md.outputs[0].name == "output" and md.outputs[0].datatype == "FP32"
    cfg = client.get_model_config(MODEL).config
    assert cfg.name == MODEL and cfg.max_batch_size == 0
    assert cfg.input[0].name == "input" and list(cfg.input[0].dims) == [-1, 1, -1, -1, -1]
    assert cfg.output[0].name == "output"


def test_infer_fp32_and_int16(client):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 1, 9, 10, 11)).astype(np.float32)
    r = infer(client, x, "FP32", request_id="req-7")
    assert r.get_response().id == "req-7"
    y = r.as_numpy("output")
    assert y.shape == (1, 3, 9, 10, 11) and y.dtype == np.float32
    np.testing.assert_allclose(y, sobel_reference(x), rtol=1e-5, atol=1e-5)
    ct = rng.integers(-1024, 3000, size=(2, 1, 7, 8, 6), dtype=np.int16)
    y = infer(client, ct, "INT16").as_numpy("output")
    np.testing.assert_allclose(y, sobel_reference(ct), rtol=1e-5, atol=1e-3)


def test_stream_three_requests(client):
    results = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    rng = np.random.default_rng(2)
    xs = [rng.normal(size=(1, 1, 5 + i, 6, 7)).astype(np.float32) for i in range(3)]
    for i, x in enumerate(xs):
        inp = grpcclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        client.async_stream_infer(MODEL, [inp], request_id=str(i))
    got = {}
    for _ in range(3):
        result, error = results.get(timeout=30)
        assert error is None, error
        got[result.get_response().id] = result.as_numpy("output")
    client.stop_stream()
    for i, x in enumerate(xs):
        np.testing.assert_allclose(got[str(i)], sobel_reference(x), rtol=1e-5, atol=1e-5)


def test_wrong_shape_is_invalid_argument(client):
    x = np.zeros((1, 1, 8, 8), np.float32)  # 4-D
    with pytest.raises(InferenceServerException) as e:
        infer(client, x, "FP32")
    assert "INVALID_ARGUMENT" in str(e.value.status())
    assert "inputs[0].shape" in e.value.message() and "5 dimensions" in e.value.message()


def test_repository_model_matches_pytorch(client):
    """The model exported from PyTorch (tests/fixtures/models/tiny_net), when served."""
    if not client.is_model_ready("tiny_net"):
        pytest.skip("server runs without the fixture repository")
    io = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "tiny_net_io")
    x = np.load(os.path.join(io, "input.npy"))
    want = np.load(os.path.join(io, "expected.npy"))
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    y = client.infer("tiny_net", [inp]).as_numpy("output")
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-6)
    assert list(client.get_model_metadata("tiny_net").outputs[0].shape) == [-1, 3, -1, -1, -1]


ONNX_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "onnx")
ONNX_NETS = sorted(
    d for d in os.listdir(ONNX_DIR) if os.path.isfile(os.path.join(ONNX_DIR, d, "model.onnx"))
) if os.path.isdir(ONNX_DIR) else []


@pytest.mark.parametrize("name", ONNX_NETS)
def test_onnx_unets_by_the_graphs_names(client, name):
    """The ONNX U-Nets of tests/fixtures/onnx (scripts/export_onnx.py), when served: tensors
    named as in the graph, output within 1e-4 x max|ref| of onnxruntime's."""
    if not client.is_model_ready(name):
        pytest.skip("server runs without the ONNX fixtures")
    meta = client.get_model_metadata(name)
    assert meta.platform == "voxconv_onnx"
    in_name, out_name = meta.inputs[0].name, meta.outputs[0].name
    assert (in_name, out_name) == ("image", "logits")
    d = os.path.join(ONNX_DIR, name)
    pairs = [("input.npy", "expected.npy")]
    if os.path.exists(os.path.join(d, "input2.npy")):
        pairs.append(("input2.npy", "expected2.npy"))
    for inp_file, exp_file in pairs:
        x = np.load(os.path.join(d, inp_file))
        want = np.load(os.path.join(d, exp_file))
        inp = grpcclient.InferInput(in_name, list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        out = grpcclient.InferRequestedOutput(out_name)
        y = client.infer(name, [inp], outputs=[out]).as_numpy(out_name)
        assert y.shape == want.shape
        err = float(np.abs(y - want).max())
        assert err <= 1e-4 * float(np.abs(want).max()), (name, inp_file, err)
    # The stack's names are refused, naming the graph's.
    x = np.load(os.path.join(d, "input.npy"))
    bad = grpcclient.InferInput("input", list(x.shape), "FP32")
    bad.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as e:
        client.infer(name, [bad])
    assert "INVALID_ARGUMENT" in str(e.value.status())
    assert '"image"' in e.value.message()
