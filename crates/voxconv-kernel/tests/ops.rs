//! Tensor operations of `voxconv_kernel::ops`: golden values from PyTorch and onnxruntime
//! (tests/fixtures/golden_ops, written by scripts/make_golden_ops.py), typed errors for bad
//! shapes, lengths and parameters (never a panic), NaN propagation and a few exact properties.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use serde::Deserialize;
use voxconv_kernel::ops::{
    avgpool3d, global_avgpool, group_norm, instance_norm, maxpool3d_padded,
    maxpool3d_padded_threads, pad3d, pool3d_shape, resize3d, softmax_channels, CoordMode,
    NearestMode, PadMode, Pool3d, ResizeMode,
};
use voxconv_kernel::KernelError;

// ---------------------------------------------------------------------------------------------
// Golden cases

/// A float32 `.npy` file as (shape, data), read by ndarray-npy.
struct Npy {
    shape: Vec<usize>,
    data: Vec<f32>,
}

fn read_npy(path: &Path) -> Npy {
    let a: ndarray::ArrayD<f32> =
        ndarray_npy::read_npy(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Npy {
        shape: a.shape().to_vec(),
        data: a.as_standard_layout().iter().copied().collect(),
    }
}

#[derive(Deserialize)]
struct GoldenFile {
    case: Vec<GoldenCase>,
}

#[derive(Deserialize)]
struct GoldenCase {
    name: String,
    op: String,
    source: String,
    eps: Option<f64>,
    groups: Option<usize>,
    out_dhw: Option<[usize; 3]>,
    scales: Option<[f64; 3]>,
    mode: Option<String>,
    nearest_mode: Option<String>,
    coord: Option<String>,
    pad_mode: Option<String>,
    value: Option<f64>,
    pads_begin: Option<[usize; 3]>,
    pads_end: Option<[usize; 3]>,
    kernel: Option<[usize; 3]>,
    stride: Option<[usize; 3]>,
    dilation: Option<[usize; 3]>,
    ceil_mode: Option<bool>,
    count_include_pad: Option<bool>,
}

fn fixtures() -> PathBuf {
    // At the workspace root, beside the Conv3D goldens.
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/golden_ops")
}

fn d5(v: &[usize]) -> [usize; 5] {
    [v[0], v[1], v[2], v[3], v[4]]
}

/// `|got − want| ≤ max(1e-5 · max|want|, 1e-6)` everywhere; NaN only where `want` is NaN.
fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mag = want
        .iter()
        .filter(|v| v.is_finite())
        .fold(0f32, |m, v| m.max(v.abs()));
    let tol = (1e-5 * mag).max(1e-6);
    let worst = got
        .iter()
        .zip(want)
        .filter(|(_, w)| w.is_finite())
        .fold(0f32, |m, (g, w)| m.max((g - w).abs()));
    // Shown with --nocapture: how much of the tolerance each case uses.
    println!("{what}: max error {worst:.3e}, tolerance {tol:.3e}");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = if w.is_nan() {
            g.is_nan()
        } else if w.is_infinite() {
            g == w
        } else {
            (g - w).abs() <= tol
        };
        assert!(ok, "{what}: value {i}: got {g}, want {w} (tolerance {tol})");
    }
}

fn coord_mode(s: &str) -> CoordMode {
    match s {
        "half_pixel" => CoordMode::HalfPixel,
        "pytorch_half_pixel" => CoordMode::PytorchHalfPixel,
        "align_corners" => CoordMode::AlignCorners,
        "asymmetric" => CoordMode::Asymmetric,
        _ => panic!("unknown coordinate mode {s}"),
    }
}

fn nearest_mode(s: &str) -> NearestMode {
    match s {
        "round_prefer_floor" => NearestMode::RoundPreferFloor,
        "round_prefer_ceil" => NearestMode::RoundPreferCeil,
        "floor" => NearestMode::Floor,
        "ceil" => NearestMode::Ceil,
        _ => panic!("unknown nearest mode {s}"),
    }
}

fn pool_of(c: &GoldenCase) -> Pool3d {
    Pool3d {
        kernel: c.kernel.unwrap(),
        stride: c.stride.unwrap(),
        pads_begin: c.pads_begin.unwrap(),
        pads_end: c.pads_end.unwrap(),
        dilation: c.dilation.unwrap(),
        ceil_mode: c.ceil_mode.unwrap(),
    }
}

/// Runs one golden case; returns the output and its shape.
fn run_case(c: &GoldenCase, dir: &Path) -> (Vec<f32>, Vec<usize>) {
    let load = |s: &str| read_npy(&dir.join(format!("{}.{s}.npy", c.name)));
    let x = load("input");
    let (n, ch) = (x.shape[0], x.shape[1]);
    let spatial: usize = x.shape[2..].iter().product();
    match c.op.as_str() {
        "instance_norm" | "group_norm" => {
            let (scale, bias) = (load("scale"), load("bias"));
            let eps = c.eps.unwrap() as f32;
            let mut y = x.data.clone();
            if c.op == "instance_norm" {
                instance_norm(&mut y, n, ch, spatial, &scale.data, &bias.data, eps).unwrap();
            } else {
                let g = c.groups.unwrap();
                group_norm(&mut y, n, ch, spatial, g, &scale.data, &bias.data, eps).unwrap();
            }
            (y, x.shape)
        }
        "softmax" => {
            let mut y = x.data.clone();
            softmax_channels(&mut y, n, ch, spatial).unwrap();
            (y, x.shape)
        }
        "global_avgpool" => (
            global_avgpool(&x.data, n, ch, spatial).unwrap(),
            vec![n, ch],
        ),
        "resize" => {
            let shape = d5(&x.shape);
            let out = c.out_dhw.unwrap();
            let s = c.scales.unwrap().map(|v| v as f32);
            let mode = match c.mode.as_deref() {
                Some("linear") => ResizeMode::Linear,
                Some("nearest") => {
                    ResizeMode::Nearest(nearest_mode(c.nearest_mode.as_ref().unwrap()))
                }
                m => panic!("unknown resize mode {m:?}"),
            };
            let coord = coord_mode(c.coord.as_ref().unwrap());
            let y = resize3d(&x.data, shape, out, s, mode, coord).unwrap();
            (y, vec![n, ch, out[0], out[1], out[2]])
        }
        "pad" => {
            let mode = match c.pad_mode.as_deref() {
                Some("constant") => PadMode::Constant(c.value.unwrap() as f32),
                Some("edge") => PadMode::Edge,
                Some("reflect") => PadMode::Reflect,
                m => panic!("unknown pad mode {m:?}"),
            };
            let (y, s) = pad3d(
                &x.data,
                d5(&x.shape),
                c.pads_begin.unwrap(),
                c.pads_end.unwrap(),
                mode,
            )
            .unwrap();
            (y, s.to_vec())
        }
        "maxpool" | "avgpool" => {
            let p = pool_of(c);
            let shape = d5(&x.shape);
            let y = if c.op == "maxpool" {
                maxpool3d_padded(&x.data, shape, &p).unwrap()
            } else {
                avgpool3d(&x.data, shape, &p, c.count_include_pad.unwrap()).unwrap()
            };
            (y, pool3d_shape(shape, &p).unwrap().to_vec())
        }
        op => panic!("{}: unknown op {op}", c.name),
    }
}

#[test]
fn golden_values_from_pytorch_and_onnxruntime() {
    let dir = fixtures();
    let file: GoldenFile =
        toml::from_str(&std::fs::read_to_string(dir.join("cases.toml")).unwrap()).unwrap();
    let mut per_op: BTreeMap<String, usize> = BTreeMap::new();
    for c in &file.case {
        let want = read_npy(&dir.join(format!("{}.expected.npy", c.name)));
        let (got, shape) = run_case(c, &dir);
        let what = format!("{} ({})", c.name, c.source);
        assert_eq!(shape, want.shape, "{what}: output shape");
        assert_close(&got, &want.data, &what);
        *per_op.entry(c.op.clone()).or_default() += 1;
    }
    // Every op is covered, and the variants the brief names are there.
    for (op, at_least) in [
        ("instance_norm", 3),
        ("group_norm", 2),
        ("softmax", 2),
        ("global_avgpool", 1),
        ("resize", 10),
        ("pad", 3),
        ("maxpool", 5),
        ("avgpool", 5),
    ] {
        let got = per_op.get(op).copied().unwrap_or(0);
        assert!(
            got >= at_least,
            "{op}: {got} golden cases, expected >= {at_least}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Typed errors

const BIG: usize = usize::MAX / 2 + 1;

fn pool(k: usize, s: usize, p: usize) -> Pool3d {
    Pool3d {
        kernel: [k; 3],
        stride: [s; 3],
        pads_begin: [p; 3],
        pads_end: [p; 3],
        dilation: [1; 3],
        ceil_mode: false,
    }
}

#[test]
fn normalization_errors() {
    let mut x = vec![0.5f32; 24];
    let one = [1.0f32; 3];
    let zero = [0.0f32; 3];
    // Lengths.
    assert_eq!(
        instance_norm(&mut x, 2, 3, 5, &one, &zero, 1e-5),
        Err(KernelError::BufferLength {
            what: "input",
            expected: 30,
            got: 24
        })
    );
    assert!(matches!(
        instance_norm(&mut x, 2, 3, 4, &one[..2], &zero, 1e-5),
        Err(KernelError::BufferLength { what: "scale", .. })
    ));
    assert!(matches!(
        instance_norm(&mut x, 2, 3, 4, &one, &zero[..1], 1e-5),
        Err(KernelError::BufferLength { what: "bias", .. })
    ));
    // Zero-size dimensions, overflow.
    for (n, c, s, dim) in [(0, 3, 8, "N"), (2, 0, 12, "C"), (3, 8, 0, "spatial")] {
        assert_eq!(
            instance_norm(&mut x, n, c, s, &one, &zero, 1e-5),
            Err(KernelError::EmptyDimension {
                tensor: "input",
                dim
            })
        );
    }
    assert!(matches!(
        instance_norm(&mut x, BIG, 3, 2, &one, &zero, 1e-5),
        Err(KernelError::Overflow { .. })
    ));
    assert!(matches!(
        instance_norm(
            &mut [],
            usize::MAX,
            usize::MAX,
            usize::MAX,
            &one,
            &zero,
            1e-5
        ),
        Err(KernelError::Overflow { .. })
    ));
    // Epsilon.
    for eps in [-1e-5, f32::NAN, f32::INFINITY] {
        assert!(matches!(
            instance_norm(&mut x, 2, 3, 4, &one, &zero, eps),
            Err(KernelError::Unsupported { .. })
        ));
    }
    // Group norm: groups must divide C.
    let four = [1.0f32; 4];
    let mut y = vec![0.5f32; 32];
    for g in [0, 3, 5] {
        assert!(matches!(
            group_norm(&mut y, 2, 4, 4, g, &four, &four, 1e-5),
            Err(KernelError::Unsupported { .. })
        ));
    }
    assert!(matches!(
        group_norm(&mut y, 2, 4, 4, 2, &four[..2], &four, 1e-5),
        Err(KernelError::BufferLength { what: "scale", .. })
    ));
    assert!(matches!(
        group_norm(&mut y, 2, 4, 5, 2, &four, &four, 1e-5),
        Err(KernelError::BufferLength { what: "input", .. })
    ));
    assert!(matches!(
        group_norm(&mut y, BIG, 4, 4, 2, &four, &four, 1e-5),
        Err(KernelError::Overflow { .. })
    ));
    // Nothing was written by the failed calls.
    assert!(x.iter().chain(&y).all(|&v| v == 0.5));

    // Softmax, global average pooling.
    assert!(matches!(
        softmax_channels(&mut x, 2, 3, 5),
        Err(KernelError::BufferLength { .. })
    ));
    assert!(matches!(
        softmax_channels(&mut x, 2, 0, 12),
        Err(KernelError::EmptyDimension { dim: "C", .. })
    ));
    assert!(matches!(
        softmax_channels(&mut x, BIG, 2, 2),
        Err(KernelError::Overflow { .. })
    ));
    assert!(matches!(
        global_avgpool(&x, 2, 3, 5),
        Err(KernelError::BufferLength { .. })
    ));
    assert!(matches!(
        global_avgpool(&x, 24, 1, 0),
        Err(KernelError::EmptyDimension { dim: "spatial", .. })
    ));
    assert!(matches!(
        global_avgpool(&x, 3, BIG, 4),
        Err(KernelError::Overflow { .. })
    ));
}

#[test]
fn resize_errors() {
    let x = vec![0f32; 2 * 3 * 4];
    let lin = ResizeMode::Linear;
    let hp = CoordMode::HalfPixel;
    assert!(matches!(
        resize3d(&x, [1, 1, 2, 3, 5], [4, 6, 8], [2.0; 3], lin, hp),
        Err(KernelError::BufferLength { what: "input", .. })
    ));
    assert!(matches!(
        resize3d(&x, [1, 0, 2, 3, 4], [4, 6, 8], [2.0; 3], lin, hp),
        Err(KernelError::EmptyDimension {
            tensor: "input",
            dim: "C"
        })
    ));
    assert!(matches!(
        resize3d(&x, [1, 1, 2, 3, 4], [4, 0, 8], [2.0; 3], lin, hp),
        Err(KernelError::EmptyDimension {
            tensor: "output",
            dim: "H"
        })
    ));
    for bad in [0.0, -2.0, f32::NAN, f32::INFINITY] {
        assert!(matches!(
            resize3d(&x, [1, 1, 2, 3, 4], [4, 6, 8], [2.0, bad, 2.0], lin, hp),
            Err(KernelError::Unsupported { .. })
        ));
    }
    // Overflow-sized outputs are refused before anything is allocated.
    let near = ResizeMode::Nearest(NearestMode::Floor);
    for out in [[BIG, 2, 1], [usize::MAX, usize::MAX, usize::MAX]] {
        for mode in [lin, near] {
            assert!(matches!(
                resize3d(&x, [1, 1, 2, 3, 4], out, [2.0; 3], mode, hp),
                Err(KernelError::Overflow { .. })
            ));
        }
    }
    assert!(matches!(
        resize3d(&x, [BIG, 2, 1, 1, 1], [1, 1, 1], [1.0; 3], lin, hp),
        Err(KernelError::Overflow { .. })
    ));
}

#[test]
fn pad_errors() {
    let x = vec![0f32; 2 * 3 * 4];
    assert!(matches!(
        pad3d(&x, [1, 1, 2, 3, 5], [1; 3], [1; 3], PadMode::Edge),
        Err(KernelError::BufferLength { .. })
    ));
    assert!(matches!(
        pad3d(&x, [1, 1, 0, 3, 4], [1; 3], [1; 3], PadMode::Edge),
        Err(KernelError::EmptyDimension { dim: "D", .. })
    ));
    // Reflect needs pad < dim, on both sides.
    for (pb, pe) in [
        ([2, 0, 0], [0; 3]),
        ([0; 3], [0, 0, 4]),
        ([0, 3, 0], [0; 3]),
    ] {
        assert!(matches!(
            pad3d(&x, [1, 1, 2, 3, 4], pb, pe, PadMode::Reflect),
            Err(KernelError::Unsupported { .. })
        ));
    }
    assert!(pad3d(&x, [1, 1, 2, 3, 4], [1, 2, 3], [1, 2, 3], PadMode::Reflect).is_ok());
    // Pads that overflow a dimension, or the product.
    assert!(matches!(
        pad3d(
            &x,
            [1, 1, 2, 3, 4],
            [usize::MAX, 0, 0],
            [0; 3],
            PadMode::Constant(0.0)
        ),
        Err(KernelError::Overflow { .. })
    ));
    assert!(matches!(
        pad3d(
            &x,
            [1, 1, 2, 3, 4],
            [BIG, BIG / 4, 0],
            [0; 3],
            PadMode::Edge
        ),
        Err(KernelError::Overflow { .. })
    ));
}

#[test]
fn pooling_errors() {
    let x = vec![0f32; 4 * 4 * 4];
    let s = [1, 1, 4, 4, 4];
    let mut p = pool(2, 2, 0);
    p.stride[1] = 0;
    assert_eq!(
        pool3d_shape(s, &p),
        Err(KernelError::ZeroStride { axis: "height" })
    );
    let mut p = pool(2, 2, 0);
    p.dilation[2] = 0;
    assert_eq!(
        maxpool3d_padded(&x, s, &p),
        Err(KernelError::ZeroDilation { axis: "width" })
    );
    let mut p = pool(2, 2, 0);
    p.kernel[0] = 0;
    assert!(matches!(
        avgpool3d(&x, s, &p, true),
        Err(KernelError::EmptyDimension {
            tensor: "kernel",
            dim: "depth"
        })
    ));
    assert!(matches!(
        pool3d_shape(s, &pool(6, 1, 0)),
        Err(KernelError::KernelTooLarge { axis: "depth", .. })
    ));
    let mut p = pool(3, 1, 0);
    p.dilation = [1, 2, 1];
    assert!(matches!(
        maxpool3d_padded(&x, s, &p),
        Err(KernelError::KernelTooLarge {
            axis: "height",
            effective: 5,
            padded: 4
        })
    ));
    // Average pooling has no dilation.
    assert!(matches!(
        avgpool3d(&x, s, &p, false),
        Err(KernelError::Unsupported { .. })
    ));
    // Lengths, zero-size dimensions, overflow.
    assert!(matches!(
        maxpool3d_padded(&x[1..], s, &pool(2, 2, 0)),
        Err(KernelError::BufferLength { what: "input", .. })
    ));
    assert!(matches!(
        avgpool3d(&x, [1, 1, 4, 0, 4], &pool(1, 1, 0), true),
        Err(KernelError::EmptyDimension { dim: "H", .. })
    ));
    assert!(matches!(
        maxpool3d_padded(&x, [BIG, 4, 4, 4, 4], &pool(1, 1, 0)),
        Err(KernelError::Overflow { .. })
    ));
    let mut p = pool(2, 1, 0);
    p.pads_end = [usize::MAX, 0, 0];
    assert!(matches!(
        pool3d_shape(s, &p),
        Err(KernelError::Overflow { .. })
    ));
    let mut p = pool(2, 1, 0);
    p.kernel = [2, 2, usize::MAX];
    p.dilation = [1, 1, 2];
    assert!(matches!(
        pool3d_shape(s, &p),
        Err(KernelError::Overflow { .. })
    ));
    // Huge pads: the output would not fit in memory.
    let mut p = pool(1, 1, 0);
    p.pads_begin = [BIG / 2; 3];
    assert!(matches!(
        avgpool3d(&x, s, &p, true),
        Err(KernelError::Overflow { .. })
    ));
    // A window entirely in the padding: no max, no exclude-pad mean; zero with include-pad.
    let mut p = pool(1, 1, 0);
    p.pads_begin = [0, 0, 1];
    assert!(matches!(
        maxpool3d_padded(&x, s, &p),
        Err(KernelError::Unsupported { .. })
    ));
    assert!(matches!(
        avgpool3d(&x, s, &p, false),
        Err(KernelError::Unsupported { .. })
    ));
    let ones = vec![1f32; 64];
    let y = avgpool3d(&ones, s, &p, true).unwrap();
    assert_eq!(pool3d_shape(s, &p).unwrap(), [1, 1, 4, 4, 5]);
    for (i, v) in y.iter().enumerate() {
        assert_eq!(*v, if i % 5 == 0 { 0.0 } else { 1.0 });
    }
}

// ---------------------------------------------------------------------------------------------
// NaN, exact properties

/// The row-at-once max pooling against the definition (every window scanned voxel by voxel)
/// with NaNs and signed zeros in the data, whole and clipped windows, strides and dilations;
/// and 1, 2 and 3 threads give the same bits.
#[test]
fn maxpool_rows_match_definition_on_any_thread_count() {
    let cases: [([usize; 5], Pool3d); 4] = [
        ([2, 4, 52, 40, 48], pool(2, 2, 0)),
        ([1, 3, 9, 10, 11], pool(3, 2, 1)),
        (
            [1, 2, 7, 8, 13],
            Pool3d {
                dilation: [1, 2, 2],
                ceil_mode: true,
                ..pool(2, 3, 1)
            },
        ),
        (
            [1, 1, 6, 6, 9],
            Pool3d {
                stride: [1, 1, 1],
                ..pool(3, 1, 0)
            },
        ),
    ];
    for (i, (shape, p)) in cases.into_iter().enumerate() {
        let len: usize = shape.iter().product();
        let mut seed = 0x9e37_79b9_u64 + i as u64;
        let x: Vec<f32> = (0..len)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                match seed >> 56 {
                    0 => f32::NAN,
                    1 => -0.0,
                    2 => 0.0,
                    v => (v as f32 - 128.0) / 7.0,
                }
            })
            .collect();
        let out = pool3d_shape(shape, &p).unwrap();
        let one = maxpool3d_padded_threads(&x, shape, &p, 1).unwrap();
        for t in [2, 3] {
            let y = maxpool3d_padded_threads(&x, shape, &p, t).unwrap();
            assert!(
                one.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()),
                "case {i}: 1 and {t} threads differ"
            );
        }
        // The definition, output by output.
        let [_, _, d, h, w] = shape;
        let [od, oh, ow] = [out[2], out[3], out[4]];
        for (k, &got) in one.iter().enumerate() {
            let (nc, z, y, xo) = (k / (od * oh * ow), k / (oh * ow) % od, k / ow % oh, k % ow);
            let mut m = f32::NEG_INFINITY;
            for a in 0..p.kernel[0] {
                for b in 0..p.kernel[1] {
                    for c in 0..p.kernel[2] {
                        let iz = (z * p.stride[0] + a * p.dilation[0]) as isize
                            - p.pads_begin[0] as isize;
                        let iy = (y * p.stride[1] + b * p.dilation[1]) as isize
                            - p.pads_begin[1] as isize;
                        let ix = (xo * p.stride[2] + c * p.dilation[2]) as isize
                            - p.pads_begin[2] as isize;
                        if iz < 0
                            || iy < 0
                            || ix < 0
                            || iz >= d as isize
                            || iy >= h as isize
                            || ix >= w as isize
                        {
                            continue;
                        }
                        let v =
                            x[nc * d * h * w + ((iz as usize * h) + iy as usize) * w + ix as usize];
                        if v > m || v.is_nan() {
                            m = v;
                        }
                    }
                }
            }
            assert_eq!(got.to_bits(), m.to_bits(), "case {i}: output {k}");
        }
    }
}

#[test]
fn maxpool_propagates_nan_and_ignores_padding() {
    let mut x: Vec<f32> = (0..64).map(|i| -(i as f32) - 1.0).collect();
    x[21] = f32::NAN; // (1, 1, 1)
    let mut p = pool(2, 2, 1);
    p.ceil_mode = true;
    let shape = [1, 1, 4, 4, 4];
    assert_eq!(pool3d_shape(shape, &p).unwrap(), [1, 1, 3, 3, 3]);
    let y = maxpool3d_padded(&x, shape, &p).unwrap();
    // Window (0, 0, 0) covers only input (0, 0, 0): −1, not the padding.
    assert_eq!(y[0], -1.0);
    // Windows (0|1, 0|1, 0|1) overlapping input (1, 1, 1) are NaN; no other.
    for (i, v) in y.iter().enumerate() {
        let (z, yy, xx) = (i / 9, i / 3 % 3, i % 3);
        let covers = z == 1 && yy == 1 && xx == 1;
        assert_eq!(v.is_nan(), covers, "output {i}");
        if !covers {
            assert!(v.is_finite() && *v < 0.0, "output {i}: {v}");
        }
    }
    // A NaN first in its window, and infinities.
    let mut x = vec![1f32; 8];
    x[0] = f32::NAN;
    x[7] = f32::INFINITY;
    let y = maxpool3d_padded(&x, [1, 1, 2, 2, 2], &pool(2, 1, 0)).unwrap();
    assert!(y[0].is_nan());
    let y = avgpool3d(&x, [1, 1, 2, 2, 2], &pool(2, 1, 0), false).unwrap();
    assert!(y[0].is_nan());
}

#[test]
fn softmax_and_norm_edge_values() {
    // Softmax: columns sum to one, NaN poisons only its own position.
    let mut x = vec![0f32, 1.0, 1000.0, 2.0, 3.0, -1000.0];
    x[1] = f32::NAN; // channel 0, position 1
    softmax_channels(&mut x, 1, 2, 3).unwrap();
    assert!(x[1].is_nan() && x[4].is_nan());
    for s in [0, 2] {
        assert!((x[s] + x[3 + s] - 1.0).abs() < 1e-6);
    }
    assert_eq!(x[2], 1.0);
    // Instance norm of a constant with eps = 0 is NaN (0 / 0), as in PyTorch; with eps > 0 it
    // is the bias.
    let mut c = vec![3f32; 8];
    instance_norm(&mut c, 1, 2, 4, &[1.0, 1.0], &[0.25, -0.5], 1e-5).unwrap();
    assert_eq!(c, [0.25, 0.25, 0.25, 0.25, -0.5, -0.5, -0.5, -0.5]);
    let mut c = vec![3f32; 4];
    instance_norm(&mut c, 1, 1, 4, &[1.0], &[0.0], 0.0).unwrap();
    assert!(c.iter().all(|v| v.is_nan()));
    // GroupNorm with one channel per group is InstanceNorm.
    let x: Vec<f32> = (0..2 * 3 * 7)
        .map(|i| ((i * 37 % 11) as f32).sin())
        .collect();
    let (s, b) = ([0.5f32, 1.0, 2.0], [0.1f32, 0.2, -0.3]);
    let (mut a, mut g) = (x.clone(), x);
    instance_norm(&mut a, 2, 3, 7, &s, &b, 1e-5).unwrap();
    group_norm(&mut g, 2, 3, 7, 3, &s, &b, 1e-5).unwrap();
    assert_eq!(a, g);
}

/// The threaded Resize writes every value (NaN-prefilled output) with the same bits as the
/// one-thread one, for both modes, odd plane counts and sizes.
#[test]
fn resize_into_threads_same_bits() {
    let shape = [2, 3, 5, 7, 9];
    let x: Vec<f32> = (0..shape.iter().product::<usize>())
        .map(|i| ((i * 29 % 17) as f32).sin())
        .collect();
    for mode in [
        ResizeMode::Linear,
        ResizeMode::Nearest(voxconv_kernel::ops::NearestMode::RoundPreferFloor),
    ] {
        for out in [[10, 14, 18], [5, 13, 4], [64, 32, 48]] {
            let scales = [0, 1, 2].map(|a| out[a] as f32 / shape[a + 2] as f32);
            let want = resize3d(&x, shape, out, scales, mode, CoordMode::HalfPixel).unwrap();
            for threads in [1, 2, 3, 8] {
                let mut got = vec![f32::NAN; want.len()];
                voxconv_kernel::ops::resize3d_into(
                    &x,
                    shape,
                    out,
                    scales,
                    mode,
                    CoordMode::HalfPixel,
                    &mut got,
                    threads,
                )
                .unwrap();
                let same = got
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{mode:?} {out:?} {threads} threads");
            }
        }
    }
}

#[test]
fn resize_identity_and_nearest_upsample() {
    let x: Vec<f32> = (0..2 * 3 * 4 * 5).map(|i| i as f32 * 0.25).collect();
    let shape = [1, 2, 3, 4, 5];
    for mode in [
        ResizeMode::Linear,
        ResizeMode::Nearest(NearestMode::RoundPreferFloor),
    ] {
        for coord in [
            CoordMode::HalfPixel,
            CoordMode::PytorchHalfPixel,
            CoordMode::AlignCorners,
            CoordMode::Asymmetric,
        ] {
            let y = resize3d(&x, shape, [3, 4, 5], [1.0; 3], mode, coord).unwrap();
            assert_eq!(y, x, "{mode:?} {coord:?}");
        }
    }
    // Nearest ×2, asymmetric + floor: every value repeated 2×2×2 (PyTorch `nearest`).
    let y = resize3d(
        &x,
        shape,
        [6, 8, 10],
        [2.0; 3],
        ResizeMode::Nearest(NearestMode::Floor),
        CoordMode::Asymmetric,
    )
    .unwrap();
    for (i, v) in y.iter().enumerate() {
        let (c, z, yy, xx) = (i / 480, i / 80 % 6, i / 10 % 8, i % 10);
        assert_eq!(*v, x[((c * 3 + z / 2) * 4 + yy / 2) * 5 + xx / 2]);
    }
    // Linear to size 1 with align_corners takes the first value of every channel.
    let y = resize3d(
        &x,
        shape,
        [1, 1, 1],
        [1.0 / 3.0, 0.25, 0.2],
        ResizeMode::Linear,
        CoordMode::AlignCorners,
    )
    .unwrap();
    assert_eq!(y, [x[0], x[60]]);
}

#[test]
fn pad_zero_is_identity_and_global_mean() {
    let x: Vec<f32> = (0..2 * 2 * 3 * 4).map(|i| i as f32).collect();
    for mode in [PadMode::Constant(7.0), PadMode::Edge, PadMode::Reflect] {
        let (y, s) = pad3d(&x, [2, 1, 2, 3, 4], [0; 3], [0; 3], mode).unwrap();
        assert_eq!((y.as_slice(), s), (x.as_slice(), [2, 1, 2, 3, 4]));
    }
    let m = global_avgpool(&x, 2, 2, 12).unwrap();
    assert_eq!(m, [5.5, 17.5, 29.5, 41.5]);
}

// ---------------------------------------------------------------------------------------------
// Never a panic

fn small() -> impl Strategy<Value = usize> {
    0usize..5
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Arbitrary small geometry, buffer lengths off by one: an error or a result of the
    /// right length, never a panic.
    #[test]
    fn pooling_never_panics(
        shape in prop::array::uniform5(small()),
        k in prop::array::uniform3(0usize..4),
        s in prop::array::uniform3(0usize..4),
        pb in prop::array::uniform3(0usize..4),
        pe in prop::array::uniform3(0usize..4),
        dil in prop::array::uniform3(0usize..3),
        ceil_mode: bool,
        include: bool,
        len_delta in 0usize..3,
    ) {
        let p = Pool3d { kernel: k, stride: s, pads_begin: pb, pads_end: pe, dilation: dil, ceil_mode };
        let prod = shape.iter().product::<usize>();
        let len = [prod.saturating_sub(1), prod, prod + 1][len_delta];
        let x: Vec<f32> = (0..len).map(|i| (i as f32).sin()).collect();
        let out = pool3d_shape(shape, &p);
        let results = [maxpool3d_padded(&x, shape, &p), avgpool3d(&x, shape, &p, include)];
        for y in results.into_iter().flatten() {
            let o = out.clone().unwrap();
            prop_assert_eq!(y.len(), o.iter().product::<usize>());
            prop_assert!(o[2..].iter().all(|&d| d >= 1));
        }
    }

    #[test]
    fn resize_and_pad_never_panic(
        shape in prop::array::uniform5(small()),
        out in prop::array::uniform3(0usize..6),
        scale in prop::array::uniform3(prop_oneof![Just(0.0f32), Just(-1.0f32), 0.01f32..4.0]),
        pb in prop::array::uniform3(0usize..5),
        pe in prop::array::uniform3(0usize..5),
        mode in 0usize..5,
        coord in 0usize..4,
        pad_mode in 0usize..3,
        short: bool,
    ) {
        let len = shape.iter().product::<usize>().saturating_sub(usize::from(short));
        let x: Vec<f32> = (0..len).map(|i| (i as f32).cos()).collect();
        let rmode = [
            ResizeMode::Linear,
            ResizeMode::Nearest(NearestMode::RoundPreferFloor),
            ResizeMode::Nearest(NearestMode::RoundPreferCeil),
            ResizeMode::Nearest(NearestMode::Floor),
            ResizeMode::Nearest(NearestMode::Ceil),
        ][mode];
        let cmode = [CoordMode::HalfPixel, CoordMode::PytorchHalfPixel, CoordMode::AlignCorners,
            CoordMode::Asymmetric][coord];
        if let Ok(y) = resize3d(&x, shape, out, scale, rmode, cmode) {
            prop_assert_eq!(y.len(), shape[0] * shape[1] * out.iter().product::<usize>());
            // Interpolation and nearest stay within the input's range.
            let (lo, hi) = x.iter().fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
            prop_assert!(y.iter().all(|&v| v >= lo - 1e-6 && v <= hi + 1e-6));
        }
        let pm = [PadMode::Constant(2.0), PadMode::Edge, PadMode::Reflect][pad_mode];
        if let Ok((y, s)) = pad3d(&x, shape, pb, pe, pm) {
            prop_assert_eq!(y.len(), s.iter().product::<usize>());
        }
    }

    #[test]
    fn norms_never_panic(
        n in small(), c in small(), spatial in small(), groups in 0usize..5,
        len_delta in 0usize..2, eps in prop_oneof![Just(-1.0f32), Just(0.0f32), 1e-6f32..1.0],
    ) {
        let len = n * c * spatial + len_delta;
        let mut x: Vec<f32> = (0..len).map(|i| (i as f32 * 0.7).sin()).collect();
        let sb = vec![1f32; c];
        let _ = instance_norm(&mut x, n, c, spatial, &sb, &sb, eps);
        let _ = group_norm(&mut x, n, c, spatial, groups, &sb, &sb, eps);
        if softmax_channels(&mut x, n, c, spatial).is_ok() {
            for s in 0..spatial {
                let sum: f32 = (0..c).map(|ch| x[ch * spatial + s]).sum();
                prop_assert!((sum - 1.0).abs() < 1e-5 || sum.is_nan());
            }
        }
        if let Ok(m) = global_avgpool(&x, n, c, spatial) {
            prop_assert_eq!(m.len(), n * c);
        }
    }
}
