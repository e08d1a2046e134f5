#!/usr/bin/env python3
"""Runs a NIfTI scan through a voxconv model and writes a NIfTI that overlays the scan.

    python examples/infer_nifti.py --server 127.0.0.1:50051 --model sobel3d \
        --input scan.nii.gz --output gradient.nii.gz

The scan is sent in its stored dtype (int16 CT stays int16). Axes: nibabel's (x, y, z) is
our [W, H, D], so the array is transposed to [z, y, x] on the way in and back on the way out;
channels go last, (x, y, z, C), as `voxconv infer` writes them. The affine is the scan's,
composed with the model's output-to-input voxel map (stride, padding, dilation) from GetModel.
"""
import argparse

import nibabel as nib
import numpy as np

from voxconv_client import Client


def voxel_map(info):
    """Scale and offset per axis (x, y, z): input voxel = scale * output voxel + offset."""
    scale, offset = np.ones(3), np.zeros(3)  # in [d, h, w]
    for layer in info.layers:
        k = np.array(list(layer.kernel) or [1, 1, 1], float)
        s = np.array(list(layer.stride) or [1, 1, 1], float)
        p = np.array(list(layer.padding) or [0, 0, 0], float)
        d = np.array(list(layer.dilation) or [1, 1, 1], float)
        offset = offset + scale * (-p + d * (k - 1) / 2)
        scale = scale * s
    return scale[::-1], offset[::-1]


def infer_nifti(client, model, src, dst, output_dtype="float32"):
    img = nib.load(src)
    data = np.asanyarray(img.dataobj)  # stored dtype when unscaled
    if img.dataobj.slope != 1 or img.dataobj.inter != 0:
        data = img.get_fdata(dtype=np.float32)  # scaled intensities
    if data.ndim == 3:
        data = data[..., None]
    x = np.transpose(data, (3, 2, 1, 0))  # [C, z, y, x]
    y = client.infer(model, x, output_dtype=output_dtype)  # [C_out, z', y', x']
    out = np.transpose(y, (3, 2, 1, 0)).astype(np.float32)  # (x', y', z', C_out)
    if out.shape[3] == 1:
        out = out[..., 0]
    scale, offset = voxel_map(client.get_model(model))
    m = np.eye(4)
    m[:3, :3] = np.diag(scale)
    m[:3, 3] = offset
    affine = img.affine @ m
    hdr = img.header.copy()
    hdr.set_data_dtype(np.float32)
    result = nib.Nifti1Image(out, affine, hdr)
    result.set_qform(affine, code=int(img.header["qform_code"]) or 1)
    result.set_sform(affine, code=int(img.header["sform_code"]) or 1)
    nib.save(result, dst)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--server", default="127.0.0.1:50051")
    ap.add_argument("--model", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--output-dtype", default="float32", choices=["float32", "float16"])
    a = ap.parse_args()
    with Client(a.server) as c:
        r = infer_nifti(c, a.model, a.input, a.output, a.output_dtype)
        s = c.last_summary
    print(f"{a.model}: {a.input} -> {a.output} {r.shape}, compute {s.compute_ms:.1f} ms")


if __name__ == "__main__":
    main()
