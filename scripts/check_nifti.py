#!/usr/bin/env python3
"""Checks `voxconv phantom` -> `voxconv infer` NIfTI results with nibabel (run by .ci/run).

    check_nifti.py --phantom ph.nii.gz --sobel sob.nii.gz \
        --tiny-net tn.nii.gz --tiny-net-dir tests/fixtures/models/tiny_net

For each output: nibabel loads it with the right shape (x, y, z[, C]) and dtype, its affine is
the phantom's affine composed with the model's voxel map (stride, padding, dilation; computed
here from the layer parameters), and its values equal a NumPy convolution of the phantom
(sobel3d: kernels written out here; tiny_net: its safetensors weights, BatchNorm unfolded).
"""
import argparse
import tomllib

import nibabel as nib
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from safetensors.numpy import load_file


def correlate(x, w, b=None, stride=(1, 1, 1), pad=(0, 0, 0), dil=(1, 1, 1)):
    """Conv3d (cross-correlation) of x [C, D, H, W] with w [O, C, kD, kH, kW], float64."""
    xp = np.pad(x.astype(np.float64), [(0, 0)] + [(p, p) for p in pad])
    k = w.shape[2:]
    span = [d * (kk - 1) + 1 for d, kk in zip(dil, k)]
    win = sliding_window_view(xp, span, axis=(1, 2, 3))
    win = win[:, :, :, :, ::dil[0], ::dil[1], ::dil[2]]
    win = win[:, ::stride[0], ::stride[1], ::stride[2]]
    y = np.einsum("czyxijk,ocijk->ozyx", win, w.astype(np.float64), optimize=True)
    if b is not None:
        y += b.astype(np.float64)[:, None, None, None]
    return y


def maxpool(x, k, s):
    win = sliding_window_view(x, k, axis=(1, 2, 3))[:, ::s[0], ::s[1], ::s[2]]
    return win.max(axis=(4, 5, 6))


def sobel_weights():
    diff, smooth = np.array([-1.0, 0.0, 1.0]), np.array([1.0, 2.0, 1.0])
    ws = []
    for axis in range(3):
        f = [smooth, smooth, smooth]
        f[axis] = diff
        ws.append(np.einsum("a,b,c->abc", *f) / 32.0)
    return np.stack(ws)[:, None]


def run_tiny_net(x, model_dir):
    """The repository model, layer by layer from its model.toml and weights (numpy)."""
    with open(f"{model_dir}/model.toml", "rb") as f:
        spec = tomllib.load(f)
    t = load_file(f"{model_dir}/weights.safetensors")
    maps = []  # (kernel, stride, padding, dilation) per geometric layer, [d, h, w]
    for layer in spec["layers"]:
        op = layer["op"]
        if op == "conv3d":
            w = t[layer["weight"]]
            s, p, d = layer.get("stride", [1] * 3), layer.get("padding", [0] * 3), layer.get("dilation", [1] * 3)
            x = correlate(x, w, t.get(layer.get("bias")), s, p, d)
            maps.append((w.shape[2:], s, p, d))
        elif op == "batchnorm3d":
            g, b = t[layer["weight"]], t[layer["bias"]]
            m, v = t[layer["running_mean"]], t[layer["running_var"]]
            sc = g / np.sqrt(v.astype(np.float64) + layer.get("eps", 1e-5))
            x = (x - m[:, None, None, None]) * sc[:, None, None, None] + b[:, None, None, None]
        elif op == "relu":
            x = np.maximum(x, 0)
        elif op == "leaky_relu":
            x = np.where(x >= 0, x, layer.get("alpha", 0.01) * x)
        elif op == "maxpool3d":
            k = layer["kernel"]
            s = layer.get("stride", k)
            x = maxpool(x, k, s)
            maps.append((k, s, [0] * 3, [1] * 3))
        else:
            raise ValueError(f"unknown op {op}")
    return x, maps


def expected_affine(a_in, maps):
    """Input affine composed with output-voxel -> input-voxel (centre of receptive field)."""
    scale, offset = np.ones(3), np.zeros(3)  # per axis d, h, w
    for k, s, p, d in maps:
        lo = -np.array(p, float) + np.array(d, float) * (np.array(k, float) - 1) / 2
        offset = offset + scale * lo
        scale = scale * np.array(s, float)
    m = np.eye(4)
    m[:3, :3] = np.diag(scale[::-1])  # nibabel axes are (x, y, z) = (w, h, d)
    m[:3, 3] = offset[::-1]
    return a_in @ m


def to_ours(vol):
    """nibabel (x, y, z[, C]) -> our [C, z, y, x]."""
    v = np.asanyarray(vol)
    if v.ndim == 3:
        v = v[..., None]
    return np.transpose(v, (3, 2, 1, 0))


def check(name, img, want, want_affine, rtol, atol):
    got = to_ours(img.dataobj)
    c = want.shape[0]
    want_shape = tuple(want.shape[:0:-1]) + ((c,) if c > 1 else ())
    assert img.shape == want_shape, f"{name}: shape {img.shape}, want {want_shape}"
    assert img.get_data_dtype() == np.float32, f"{name}: dtype {img.get_data_dtype()}"
    np.testing.assert_allclose(img.affine, want_affine, atol=1e-4, err_msg=f"{name}: affine")
    np.testing.assert_allclose(img.header.get_sform(), want_affine, atol=1e-4, err_msg=f"{name}: sform")
    np.testing.assert_allclose(img.header.get_qform(), want_affine, atol=1e-4, err_msg=f"{name}: qform")
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=f"{name}: values")
    err = np.abs(got - want).max()
    print(f"{name}: shape {img.shape}, affine ok, max |error| {err:.2e} vs NumPy")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--phantom", required=True)
    ap.add_argument("--sobel", required=True)
    ap.add_argument("--tiny-net", required=True)
    ap.add_argument("--tiny-net-dir", required=True)
    a = ap.parse_args()

    ph = nib.load(a.phantom)
    assert ph.get_data_dtype() == np.int16, ph.get_data_dtype()
    x = to_ours(ph.dataobj).astype(np.float64)  # [1, z, y, x]
    assert x.max() == 1000 and x.min() == 0, (x.min(), x.max())
    print(f"phantom: shape {ph.shape}, int16, values 0..1000, voxel {tuple(float(z) for z in ph.header.get_zooms())} mm")

    sob = correlate(x, sobel_weights(), pad=(1, 1, 1))
    check("sobel3d", nib.load(a.sobel), sob, ph.affine, 1e-5, 1e-3)

    tn, maps = run_tiny_net(x, a.tiny_net_dir)
    check("tiny_net", nib.load(a.tiny_net), tn, expected_affine(ph.affine, maps), 1e-4, 1e-2)


if __name__ == "__main__":
    main()
