"""Helpers shared by scripts/check_sliding.py and scripts/bench_sliding.py: MONAI's
`sliding_window_inference` with an onnxruntime or PyTorch predictor, nnU-Net style test-time
mirroring, seeded scans, and the arguments both scripts take. torch, monai and onnxruntime
are imported where used, so a process that only talks to voxconv loads none of them."""
import itertools
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def import_client():
    """voxconv_client from this checkout's clients/python (an installed copy otherwise)."""
    sys.path.insert(0, os.path.join(ROOT, "clients", "python"))
    import voxconv_client
    return voxconv_client


def triple(text, kind=float):
    """"0.25" or "0.5,0.25,0.4" (D, H, W) -> list of 1 or 3 values."""
    vals = [kind(v) for v in str(text).split(",") if v.strip()]
    if len(vals) not in (1, 3):
        raise ValueError(f"expected one value or three (D,H,W), got {text!r}")
    return vals


def per_axis(vals):
    return list(vals) * 3 if len(vals) == 1 else list(vals)


def axes(text):
    """Mirror axes: "" / "none" -> [], "0,1,2" -> [0, 1, 2]."""
    if text is None or str(text).strip().lower() in ("", "none", "-"):
        return []
    out = [int(v) for v in str(text).split(",")]
    if any(a not in (0, 1, 2) for a in out) or len(set(out)) != len(out):
        raise ValueError(f"mirror axes: expected distinct values of 0 (D), 1 (H), 2 (W), "
                         f"got {text!r}")
    return out


def make_scan(shape, seed):
    """Seeded float32 standard-normal scan of `shape` ([N, C, D, H, W]), lightly smoothed
    (3-tap box along W) so that it is not pure noise; generated in float32 slabs to keep
    the peak memory near the scan's own size."""
    rng = np.random.default_rng(seed)
    x = np.empty(shape, np.float32)
    for n in range(shape[0]):
        for c in range(shape[1]):
            for d in range(shape[2]):
                s = rng.standard_normal(shape[3:], dtype=np.float32)
                s[:, 1:-1] = (s[:, :-2] + s[:, 1:-1] + s[:, 2:]) * np.float32(0.6)
                x[n, c, d] = s
    return x


def mirrored(predict, mirror_axes):
    """nnU-Net style test-time mirroring around `predict` (torch tensors in and out): the mean
    of predict(x) and flip(predict(flip(x, c)), c) over every non-empty combination c of the
    spatial `mirror_axes` (0 = D, 1 = H, 2 = W; tensor dims + 2)."""
    if not mirror_axes:
        return predict
    import torch
    combos = [c for k in range(1, len(mirror_axes) + 1)
              for c in itertools.combinations(mirror_axes, k)]

    def f(x):
        y = predict(x)
        for c in combos:
            dims = [a + 2 for a in c]
            y = y + torch.flip(predict(torch.flip(x, dims)), dims)
        return y / (len(combos) + 1)
    return f


def ort_session(path, threads):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    return ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])


def onnx_io(path):
    """(input name, input shape with None for dynamic dims, output name) of model.onnx."""
    import onnx
    m = onnx.load(path, load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    (inp,) = [i for i in m.graph.input if i.name not in inits]
    dims = [d.dim_value if d.HasField("dim_value") else None
            for d in inp.type.tensor_type.shape.dim]
    return inp.name, dims, m.graph.output[0].name


def ort_predictor(sess):
    """A MONAI predictor running `sess` (torch in, torch out); a model with a fixed batch of
    1 is run window by window."""
    import torch
    inp = sess.get_inputs()[0]
    name, out = inp.name, sess.get_outputs()[0].name
    fixed_one = inp.shape and inp.shape[0] == 1

    def f(x):
        a = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        if fixed_one and a.shape[0] > 1:
            y = np.concatenate([sess.run([out], {name: a[i:i + 1]})[0]
                                for i in range(a.shape[0])])
        else:
            y = sess.run([out], {name: a})[0]
        return torch.from_numpy(y)
    return f


def monai_sliding(x, predictor, roi, overlap, blend, sigma_scale, batch, mirror_axes):
    """MONAI's sliding_window_inference over numpy `x` [N, C, D, H, W]: a torch tensor."""
    import torch
    from monai.inferers import sliding_window_inference
    with torch.inference_mode():
        y = sliding_window_inference(
            torch.from_numpy(x), roi_size=tuple(roi), sw_batch_size=int(batch),
            predictor=mirrored(predictor, mirror_axes), overlap=tuple(per_axis(overlap)),
            mode=blend, sigma_scale=tuple(per_axis(sigma_scale)), padding_mode="constant",
            cval=0.0)
    return y.as_tensor() if hasattr(y, "as_tensor") else y


def add_window_args(ap, roi_help="window size D,H,W (default: the model's input shape)"):
    ap.add_argument("--roi", type=lambda s: triple(s, int), help=roi_help)
    ap.add_argument("--overlap", type=triple, default=[0.25], help="one value or D,H,W")
    ap.add_argument("--blend", choices=["gaussian", "constant"], default="gaussian")
    ap.add_argument("--sigma-scale", type=triple, default=[0.125], help="one value or D,H,W")
    ap.add_argument("--batch", type=int, default=1, help="windows per network call "
                    "(MONAI sw_batch_size)")
    ap.add_argument("--mirror", type=axes, default=[], help="test-time mirroring axes, e.g. "
                    "0,1,2 (default none)")


def window_request(a, output):
    """The client's sliding_window dict for the parsed window arguments."""
    return {"roi": a.roi, "overlap": a.overlap, "blend": a.blend,
            "sigma_scale": a.sigma_scale, "batch": a.batch, "mirror": a.mirror,
            "output": output}


def default_roi(dims, roi):
    """`roi` or the model's fixed spatial input shape."""
    if roi is not None:
        if len(roi) != 3:
            raise SystemExit("--roi: expected D,H,W")
        return roi
    spatial = dims[2:]
    if len(spatial) != 3 or any(d is None or d <= 0 for d in spatial):
        raise SystemExit(f"the model's input shape {dims} has no fixed D, H, W: give --roi")
    return [int(d) for d in spatial]
