//! ConvTranspose3d: every strategy against the f64 reference and against each other, PyTorch
//! golden values, determinism across thread counts, strategy selection, cancellation and
//! every error case.

use std::path::Path;
use std::sync::atomic::AtomicBool;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use serde::Deserialize;
use voxconv_kernel::transpose::{
    conv_transpose3d, conv_transpose3d_reference, ConvTranspose3dParams, ConvTranspose3dPlan,
    ConvTranspose3dShape, TransposeStrategy,
};
use voxconv_kernel::{Activation, KernelError, Tiling};

fn data(len: usize, seed: u64) -> Vec<f32> {
    voxconv_kernel::seeded(len, seed)
}

/// Asserts `|got − want| <= 1e-4 · max|want|` (plus a tiny absolute floor) element by element.
fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
    let tol = 1e-4 * scale + 1e-6;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w as f64).abs();
        assert!(
            err <= tol,
            "{what}: element {i}: got {g}, want {w} (|err| {err:e} > tol {tol:e})"
        );
    }
}

fn run(plan: &ConvTranspose3dPlan, x: &[f32], threads: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; plan.shape().output_len()];
    plan.run_into(x, &mut out, threads, None).unwrap();
    out
}

fn activation_strategy() -> impl proptest::strategy::Strategy<Value = Activation> {
    prop_oneof![
        Just(Activation::None),
        Just(Activation::Relu),
        (0.0f32..0.5).prop_map(Activation::LeakyRelu),
        Just(Activation::Sigmoid),
        (0.05f32..1.0).prop_map(Activation::Elu),
        // One shared slope (per-channel slopes: the golden cases from PyTorch).
        (-1.0f32..1.0).prop_map(|s| Activation::PRelu(vec![s].into())),
    ]
}

/// One axis: (input extent, kernel, stride, pad_begin, pad_end, output_padding, dilation),
/// pads reduced so the output keeps at least one voxel, output padding below stride or
/// dilation.
type Axis = (usize, usize, usize, usize, usize, usize, usize);

fn axis(max_x: usize) -> impl proptest::strategy::Strategy<Value = Axis> {
    (
        1usize..max_x,
        1usize..4,
        1usize..4,
        0usize..4,
        0usize..4,
        0usize..3,
        1usize..3,
    )
        .prop_map(|(x, k, s, pb, pe, op, d)| {
            let op = op % s.max(d);
            let full = (x - 1) * s + d * (k - 1) + 1 + op;
            let pb = pb.min(full - 1);
            let pe = pe.min(full - 1 - pb);
            (x, k, s, pb, pe, op, d)
        })
}

fn build(
    n: usize,
    c_in: usize,
    c_out: usize,
    axes: [Axis; 3],
) -> Result<ConvTranspose3dShape, KernelError> {
    let input = [n, c_in, axes[0].0, axes[1].0, axes[2].0];
    let filters = [c_in, c_out, axes[0].1, axes[1].1, axes[2].1];
    let params = ConvTranspose3dParams {
        stride: [axes[0].2, axes[1].2, axes[2].2],
        pads_begin: [axes[0].3, axes[1].3, axes[2].3],
        pads_end: [axes[0].4, axes[1].4, axes[2].4],
        output_padding: [axes[0].5, axes[1].5, axes[2].5],
        dilation: [axes[0].6, axes[1].6, axes[2].6],
    };
    ConvTranspose3dShape::new(input, filters, params)
}

/// How a test plans: a forced strategy (else the default) and a slab depth for the inner
/// convolution (else its own, one slab per item on these small shapes).
#[derive(Clone, Copy, Debug, Default)]
struct Planning {
    strategy: Option<TransposeStrategy>,
    slab_depth: Option<usize>,
}

/// Plans `shape` as `how` says, every thread used however small the problem.
fn plan_for(
    shape: ConvTranspose3dShape,
    w: &[f32],
    b: Option<&[f32]>,
    act: Activation,
    how: Planning,
) -> ConvTranspose3dPlan {
    let mut plan = ConvTranspose3dPlan::new(shape, w, b, act).unwrap();
    if let Some(strategy) = how.strategy {
        plan = plan.with_strategy(strategy).unwrap();
        assert_eq!(plan.strategy(), strategy);
    }
    plan = plan.with_min_flops_per_thread(0.0);
    if let Some(depth) = how.slab_depth {
        let tiling = plan.conv_plan().tiling();
        plan = plan.with_tiling(Tiling {
            slab_depth: depth,
            ..tiling
        });
        if !matches!(
            plan.strategy(),
            TransposeStrategy::General | TransposeStrategy::SubPixel
        ) {
            // Input planes per slab of the pointwise convolution.
            let planes = depth.min(shape.in_dims()[0]);
            assert_eq!(plan.conv_plan().tiling().slab_depth, planes);
        }
    }
    plan
}

/// Runs `shape` through the plan on `threads` threads (every thread used, however small the
/// problem) into a NaN-prefilled output and compares with the reference.
fn check_against_reference(
    shape: ConvTranspose3dShape,
    act: Activation,
    with_bias: bool,
    threads: usize,
    seed: u64,
    how: Planning,
) -> TransposeStrategy {
    let x = data(shape.input_len(), seed);
    let w = data(shape.filters_len(), seed + 1);
    let b = data(shape.c_out(), seed + 2);
    let b = with_bias.then_some(&b[..]);
    let plan = plan_for(shape, &w, b, act.clone(), how);
    let got = run(&plan, &x, threads);
    let want = conv_transpose3d_reference(&shape, &x, &w, b, act.clone());
    assert!(got.iter().all(|v| v.is_finite()), "{shape:?}: NaN left");
    assert_close(
        &got,
        &want,
        &format!(
            "{} {shape:?} {act:?} bias {with_bias} {how:?}",
            plan.strategy().name()
        ),
    );
    plan.strategy()
}

/// An axis of the patch case: stride = kernel, no padding, dilation 1.
fn patch_axis(max_x: usize) -> impl proptest::strategy::Strategy<Value = Axis> {
    (1usize..max_x, 1usize..4, 0usize..3).prop_map(|(x, k, op)| (x, k, k, 0, 0, op % k, 1))
}

proptest! {
    #![proptest_config(Config {
        cases: 96,
        rng_seed: RngSeed::Fixed(0x7472_616e),
        failure_persistence: None,
        ..Config::default()
    })]

    /// Any shape (odd sizes, stride 1–3, asymmetric pads, crops past `dil·(k − 1)`, output
    /// padding, dilation 1–2), N = 1–2, every activation, with and without bias, 1–3 threads,
    /// with the default strategy (`Col2im` but for the few patch shapes drawn), streamed in
    /// the default slabs or 1–3 input planes per slab.
    #[test]
    fn general_matches_reference(
        n in 1usize..3,
        c_in in 1usize..4,
        c_out in 1usize..4,
        axes in [axis(5), axis(5), axis(8)],
        act in activation_strategy(),
        with_bias in any::<bool>(),
        threads in 1usize..4,
        slab_depth in proptest::option::of(1usize..4),
        seed in 0u64..1000,
    ) {
        let shape = build(n, c_in, c_out, axes).unwrap();
        let how = Planning { strategy: None, slab_depth };
        let strategy = check_against_reference(shape, act, with_bias, threads, seed, how);
        prop_assert_eq!(strategy, TransposeStrategy::for_shape(&shape));
        if TransposeStrategy::PatchGemm.supports(&shape) {
            prop_assert_eq!(strategy, TransposeStrategy::PatchGemm);
        } else {
            prop_assert_eq!(strategy, TransposeStrategy::Col2im);
        }
    }

    /// The general strategy, forced, on any shape.
    #[test]
    fn forced_general_matches_reference(
        n in 1usize..3,
        c_in in 1usize..4,
        c_out in 1usize..4,
        axes in [axis(5), axis(5), axis(8)],
        act in activation_strategy(),
        with_bias in any::<bool>(),
        threads in 1usize..4,
        seed in 0u64..1000,
    ) {
        let shape = build(n, c_in, c_out, axes).unwrap();
        let how = Planning { strategy: Some(TransposeStrategy::General), slab_depth: None };
        check_against_reference(shape, act, with_bias, threads, seed, how);
    }

    /// The sub-pixel strategy, forced, on any shape of dilation 1 where some tap lands
    /// (stride 1–3, asymmetric pads, crops, output padding: phases without taps are the bias).
    #[test]
    fn forced_subpixel_matches_reference(
        n in 1usize..3,
        c_in in 1usize..4,
        c_out in 1usize..4,
        axes in [axis(5), axis(5), axis(8)],
        act in activation_strategy(),
        with_bias in any::<bool>(),
        threads in 1usize..4,
        seed in 0u64..1000,
    ) {
        let axes = axes.map(|(x, k, s, pb, pe, op, _)| (x, k, s, pb, pe, op.min(s - 1), 1));
        let Ok(shape) = build(n, c_in, c_out, axes) else {
            return Ok(());
        };
        prop_assume!(TransposeStrategy::SubPixel.supports(&shape));
        let how = Planning { strategy: Some(TransposeStrategy::SubPixel), slab_depth: None };
        check_against_reference(shape, act, with_bias, threads, seed, how);
    }

    /// Every strategy that can run a shape (all three on patch shapes, which are drawn often
    /// here) gives the same result within tolerance, on 1–3 threads, in several slabs or
    /// one; the ones that cannot say so.
    #[test]
    fn strategies_agree(
        n in 1usize..3,
        c_in in 1usize..4,
        c_out in 1usize..4,
        all_patch in any::<bool>(),
        general_axes in [axis(5), axis(5), axis(7)],
        patch_axes in [patch_axis(5), patch_axis(5), patch_axis(7)],
        act in activation_strategy(),
        threads in 1usize..4,
        slab_depth in proptest::option::of(1usize..3),
        seed in 0u64..1000,
    ) {
        let axes = if all_patch { patch_axes } else { general_axes };
        let shape = build(n, c_in, c_out, axes).unwrap();
        let x = data(shape.input_len(), seed);
        let w = data(shape.filters_len(), seed + 1);
        let b = data(shape.c_out(), seed + 2);
        let col2im = plan_for(
            shape,
            &w,
            Some(&b),
            act.clone(),
            Planning { strategy: Some(TransposeStrategy::Col2im), slab_depth },
        );
        let want = run(&col2im, &x, threads);
        for strategy in TransposeStrategy::ALL {
            let planned = ConvTranspose3dPlan::new(shape, &w, Some(&b), act.clone())
                .unwrap()
                .with_strategy(strategy);
            if !strategy.supports(&shape) {
                prop_assert!(
                    matches!(planned, Err(KernelError::Unsupported { .. })),
                    "{} on {:?}", strategy.name(), shape
                );
                continue;
            }
            let how = Planning { strategy: Some(strategy), slab_depth };
            let got = run(&plan_for(shape, &w, Some(&b), act.clone(), how), &x, threads);
            assert_close(&got, &want, &format!("{} vs col2im {shape:?} {how:?}", strategy.name()));
        }
        if all_patch {
            prop_assert!(TransposeStrategy::PatchGemm.supports(&shape));
        }
    }

    /// The patch strategy (stride = kernel, no padding, dilation 1), output padding included.
    #[test]
    fn patch_gemm_matches_reference(
        n in 1usize..3,
        c_in in 1usize..5,
        c_out in 1usize..4,
        k in [1usize..4, 1usize..4, 1usize..4],
        x in [1usize..5, 1usize..5, 1usize..8],
        op in [0usize..3, 0usize..3, 0usize..3],
        act in activation_strategy(),
        with_bias in any::<bool>(),
        threads in 1usize..4,
        seed in 0u64..1000,
    ) {
        let axes = [0, 1, 2].map(|a| (x[a], k[a], k[a], 0, 0, op[a] % k[a], 1));
        let shape = build(n, c_in, c_out, axes).unwrap();
        let how = Planning::default();
        let strategy = check_against_reference(shape, act, with_bias, threads, seed, how);
        prop_assert_eq!(strategy, TransposeStrategy::PatchGemm);
    }
}

/// Shapes with several tiles (and several batch items, and several slabs per item), run on
/// 1 and 3 threads: the same bits, for every strategy.
#[test]
fn bit_identical_across_thread_counts() {
    let p = |s: [usize; 3], pb: [usize; 3], pe: [usize; 3], op: [usize; 3], d: [usize; 3]| {
        ConvTranspose3dParams {
            stride: s,
            pads_begin: pb,
            pads_end: pe,
            output_padding: op,
            dilation: d,
        }
    };
    let patch = TransposeStrategy::PatchGemm;
    let col2im = TransposeStrategy::Col2im;
    let general = TransposeStrategy::General;
    let subpixel = TransposeStrategy::SubPixel;
    let monai = p([2; 3], [1; 3], [1; 3], [1; 3], [1; 3]);
    let dilated = p([1; 3], [1; 3], [1; 3], [0; 3], [2, 1, 2]);
    let cropped = p([2, 3, 2], [3, 0, 2], [1, 4, 0], [1, 2, 0], [2, 1, 1]);
    let unet = p([2; 3], [0; 3], [0; 3], [0; 3], [1; 3]);
    let cases = [
        // U-Net upsampling, 2 items of 1716 voxels (2 tiles each); also in slabs of 4 planes.
        ([2, 3, 11, 12, 13], [3, 4, 2, 2, 2], unet, patch, None),
        ([2, 3, 11, 12, 13], [3, 4, 2, 2, 2], unet, patch, Some(4)),
        ([2, 3, 11, 12, 13], [3, 4, 2, 2, 2], unet, col2im, Some(3)),
        // A patch slab large enough that its scatter splits output channels over threads.
        ([1, 4, 16, 16, 16], [4, 8, 2, 2, 2], unet, patch, None),
        // k = 3, s = 2, pad 1, output padding 1 (the MONAI UNet case), in one slab per item
        // and in slabs of 2 planes; general staged.
        ([2, 3, 7, 8, 9], [3, 2, 3, 3, 3], monai, col2im, None),
        ([2, 3, 7, 8, 9], [3, 2, 3, 3, 3], monai, col2im, Some(2)),
        ([2, 3, 7, 8, 9], [3, 2, 3, 3, 3], monai, general, None),
        // Enough scatter work per slab that col2im splits its output channels over threads.
        ([1, 4, 16, 16, 16], [4, 8, 3, 3, 3], monai, col2im, None),
        ([1, 4, 16, 16, 16], [4, 8, 3, 3, 3], monai, col2im, Some(8)),
        // Sub-pixel phases: the MONAI case, the U-Net patch case, and one large enough that
        // the interleaving copy splits its channels over threads.
        ([2, 3, 7, 8, 9], [3, 2, 3, 3, 3], monai, subpixel, None),
        ([2, 3, 11, 12, 13], [3, 4, 2, 2, 2], unet, subpixel, None),
        ([1, 2, 32, 32, 32], [2, 16, 3, 3, 3], monai, subpixel, None),
        // Stride 1, symmetric padding, dilated (general: read in place, no staging).
        ([1, 2, 9, 10, 12], [2, 3, 3, 3, 3], dilated, col2im, None),
        ([1, 2, 9, 10, 12], [2, 3, 3, 3, 3], dilated, col2im, Some(1)),
        ([1, 2, 9, 10, 12], [2, 3, 3, 3, 3], dilated, general, None),
        // Asymmetric crops, output padding, mixed strides and dilations.
        ([2, 2, 7, 9, 11], [2, 3, 3, 2, 3], cropped, col2im, Some(2)),
        ([2, 2, 7, 9, 11], [2, 3, 3, 2, 3], cropped, general, None),
    ];
    for (i, (input, filters, params, strategy, slab_depth)) in cases.into_iter().enumerate() {
        let shape = ConvTranspose3dShape::new(input, filters, params).unwrap();
        let x = data(shape.input_len(), 10 + i as u64);
        let w = data(shape.filters_len(), 20 + i as u64);
        let b = data(shape.c_out(), 30 + i as u64);
        let act = Activation::LeakyRelu(0.1);
        let how = Planning {
            strategy: Some(strategy),
            slab_depth,
        };
        let plan = plan_for(shape, &w, Some(&b), act.clone(), how);
        let one = run(&plan, &x, 1);
        let three = run(&plan, &x, 3);
        assert!(
            one.iter()
                .zip(&three)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "case {i} ({}): 1 and 3 threads differ",
            strategy.name()
        );
        let want = conv_transpose3d_reference(&shape, &x, &w, Some(&b), act);
        assert_close(&one, &want, &format!("case {i} ({})", strategy.name()));
    }
}

#[test]
fn strategy_selection() {
    let plan_of = |input: [usize; 5], filters: [usize; 5], params| {
        let shape = ConvTranspose3dShape::new(input, filters, params).unwrap();
        let w = vec![0.5; shape.filters_len()];
        ConvTranspose3dPlan::new(shape, &w, None, Activation::None).unwrap()
    };
    let p = |s: [usize; 3], pad: usize, op: [usize; 3], d: [usize; 3]| ConvTranspose3dParams {
        stride: s,
        pads_begin: [pad; 3],
        pads_end: [pad; 3],
        output_padding: op,
        dilation: d,
    };
    let patch = TransposeStrategy::PatchGemm;
    let general = TransposeStrategy::Col2im;
    for (input, filters, params, want) in [
        // stride == kernel, no padding: patch.
        (
            [1, 4, 3, 3, 3],
            [4, 2, 2, 2, 2],
            p([2; 3], 0, [0; 3], [1; 3]),
            patch,
        ),
        (
            [1, 4, 3, 3, 3],
            [4, 2, 2, 3, 1],
            p([2, 3, 1], 0, [0; 3], [1; 3]),
            patch,
        ),
        (
            [1, 4, 3, 3, 3],
            [4, 2, 1, 1, 1],
            p([1; 3], 0, [0; 3], [1; 3]),
            patch,
        ),
        // ... output padding does not change that.
        (
            [1, 4, 3, 3, 3],
            [4, 2, 2, 2, 2],
            p([2; 3], 0, [1; 3], [1; 3]),
            patch,
        ),
        // Padding, stride != kernel or dilation: col2im (never the general strategy).
        (
            [1, 4, 3, 3, 3],
            [4, 2, 2, 2, 2],
            p([2; 3], 1, [0; 3], [1; 3]),
            general,
        ),
        (
            [1, 4, 3, 3, 3],
            [4, 2, 3, 3, 3],
            p([2; 3], 1, [1; 3], [1; 3]),
            general,
        ),
        (
            [1, 4, 3, 3, 3],
            [4, 2, 2, 2, 2],
            p([2; 3], 0, [0; 3], [1, 1, 2]),
            general,
        ),
        (
            [1, 4, 3, 3, 3],
            [4, 2, 2, 2, 2],
            p([2, 2, 1], 0, [0; 3], [1; 3]),
            general,
        ),
        (
            [1, 4, 3, 3, 3],
            [4, 2, 3, 3, 3],
            p([1; 3], 1, [0; 3], [1; 3]),
            general,
        ),
    ] {
        let plan = plan_of(input, filters, params);
        assert_eq!(plan.strategy(), want, "{filters:?} {params:?}");
        assert_eq!(TransposeStrategy::for_shape(plan.shape()), want);
    }
    assert_eq!(patch.name(), "transpose-patch-gemm");
    assert_eq!(TransposeStrategy::Col2im.name(), "transpose-col2im");
    assert_eq!(TransposeStrategy::General.name(), "transpose-general");
    // The MONAI UNet up-convolutions (k 3, s 2, pads 1, output padding 1): col2im.
    let monai = p([2; 3], 1, [1; 3], [1; 3]);
    for (input, filters) in [
        ([1, 24, 6, 6, 6], [24, 4, 3, 3, 3]),
        ([1, 8, 12, 12, 12], [8, 3, 3, 3, 3]),
    ] {
        let plan = plan_of(input, filters, monai);
        assert_eq!(plan.strategy(), TransposeStrategy::Col2im);
        assert_eq!(plan.strategy().name(), "transpose-col2im");
        // Forcing: the general strategy runs any shape, the patch one refuses this one.
        let plan = plan.with_strategy(TransposeStrategy::General).unwrap();
        assert_eq!(plan.strategy(), TransposeStrategy::General);
        assert!(!patch.supports(plan.shape()));
        assert!(matches!(
            plan.clone().with_strategy(patch),
            Err(KernelError::Unsupported { .. })
        ));
        let plan = plan.with_strategy(TransposeStrategy::Col2im).unwrap();
        assert_eq!(plan.strategy(), TransposeStrategy::Col2im);
    }
    // A patch shape can run all three.
    let plan = plan_of(
        [1, 4, 3, 3, 3],
        [4, 2, 2, 2, 2],
        p([2; 3], 0, [1; 3], [1; 3]),
    );
    for s in TransposeStrategy::ALL {
        assert!(s.supports(plan.shape()));
        assert_eq!(plan.clone().with_strategy(s).unwrap().strategy(), s);
    }
    // Asymmetric pads with stride == kernel are not the patch case either.
    let params = ConvTranspose3dParams {
        stride: [2; 3],
        pads_begin: [0, 0, 1],
        pads_end: [0; 3],
        ..ConvTranspose3dParams::default()
    };
    let plan = plan_of([1, 1, 3, 3, 3], [1, 1, 2, 2, 2], params);
    assert_eq!(plan.strategy(), general);
}

#[test]
fn output_shape_formula() {
    // U-Net upsampling doubles every extent; k = 3, s = 2, pad 1, output padding 1 too.
    let params = ConvTranspose3dParams {
        stride: [2; 3],
        ..ConvTranspose3dParams::default()
    };
    let s = ConvTranspose3dShape::new([2, 8, 4, 5, 6], [8, 3, 2, 2, 2], params).unwrap();
    assert_eq!(s.output, [2, 3, 8, 10, 12]);
    assert_eq!(s.output_len(), 2 * 3 * 8 * 10 * 12);
    assert_eq!(s.input_len(), 2 * 8 * 4 * 5 * 6);
    assert_eq!(s.flops(), 2.0 * (2 * 8 * 4 * 5 * 6) as f64 * 3.0 * 8.0);
    let params = ConvTranspose3dParams {
        stride: [2; 3],
        pads_begin: [1; 3],
        pads_end: [1; 3],
        output_padding: [1; 3],
        dilation: [1; 3],
    };
    let s = ConvTranspose3dShape::new([1, 8, 4, 5, 6], [8, 3, 3, 3, 3], params).unwrap();
    assert_eq!(s.output, [1, 3, 8, 10, 12]);
    // Asymmetric pads, dilation: (x − 1)·s − pb − pe + dil·(k − 1) + op + 1.
    let params = ConvTranspose3dParams {
        stride: [1, 2, 3],
        pads_begin: [0, 2, 1],
        pads_end: [1, 0, 4],
        output_padding: [1, 1, 2],
        dilation: [2, 1, 1],
    };
    let s = ConvTranspose3dShape::new([1, 1, 5, 5, 5], [1, 1, 3, 3, 3], params).unwrap();
    assert_eq!(
        s.out_dims(),
        [4 - 1 + 4 + 1 + 1, 8 - 2 + 2 + 1 + 1, 12 - 5 + 2 + 2 + 1]
    );
}

/// The oracle on a hand-computed case: 1-D along width, x = [1, 2], w = [1, 10, 100],
/// stride 2: [1, 10, 100 + 2, 20, 200]; with pads (1, 2): [10, 102].
#[test]
fn reference_matches_hand_computed_values() {
    let mut params = ConvTranspose3dParams {
        stride: [1, 1, 2],
        ..ConvTranspose3dParams::default()
    };
    let shape = ConvTranspose3dShape::new([1, 1, 1, 1, 2], [1, 1, 1, 1, 3], params).unwrap();
    let (x, w) = ([1.0, 2.0], [1.0, 10.0, 100.0]);
    let want = [1.0, 10.0, 102.0, 20.0, 200.0];
    assert_eq!(
        conv_transpose3d_reference(&shape, &x, &w, None, Activation::None),
        want
    );
    let got = conv_transpose3d(&shape, &x, &w, None, Activation::None, 1).unwrap();
    assert_eq!(got, want);
    params.pads_begin = [0, 0, 1];
    params.pads_end = [0, 0, 2];
    let shape = ConvTranspose3dShape::new([1, 1, 1, 1, 2], [1, 1, 1, 1, 3], params).unwrap();
    let want = [10.0 + 0.5, 102.0 + 0.5];
    assert_eq!(
        conv_transpose3d_reference(&shape, &x, &w, Some(&[0.5]), Activation::None),
        want
    );
    let got = conv_transpose3d(&shape, &x, &w, Some(&[0.5]), Activation::None, 1).unwrap();
    assert_eq!(got, want);
}

#[test]
fn shape_errors_are_typed() {
    let ok = ConvTranspose3dParams::default();
    let new = |input, filters, params| ConvTranspose3dShape::new(input, filters, params);
    let with = |f: &dyn Fn(&mut ConvTranspose3dParams)| {
        let mut p = ok;
        f(&mut p);
        p
    };
    let (x, w) = ([1, 2, 4, 4, 4], [2, 3, 3, 3, 3]);
    assert!(new(x, w, ok).is_ok());
    assert_eq!(
        new(x, w, with(&|p| p.stride[1] = 0)),
        Err(KernelError::ZeroStride { axis: "height" })
    );
    assert_eq!(
        new(x, w, with(&|p| p.dilation[2] = 0)),
        Err(KernelError::ZeroDilation { axis: "width" })
    );
    // Output padding must be smaller than the stride or the dilation.
    assert!(matches!(
        new(x, w, with(&|p| p.output_padding[0] = 1)),
        Err(KernelError::Unsupported { .. })
    ));
    assert!(matches!(
        new(
            x,
            w,
            with(&|p| {
                p.stride[0] = 2;
                p.output_padding[0] = 2;
            })
        ),
        Err(KernelError::Unsupported { .. })
    ));
    // ... either one is enough (PyTorch's rule).
    assert!(new(
        x,
        w,
        with(&|p| {
            p.stride[0] = 2;
            p.output_padding[0] = 1;
        })
    )
    .is_ok());
    assert!(new(
        x,
        w,
        with(&|p| {
            p.dilation[0] = 2;
            p.output_padding[0] = 1;
        })
    )
    .is_ok());
    // Padding that leaves no output voxel: full extent 6, pads 3 + 3.
    assert!(matches!(
        new(
            x,
            w,
            with(&|p| {
                p.pads_begin[2] = 3;
                p.pads_end[2] = 3;
            })
        ),
        Err(KernelError::Unsupported { .. })
    ));
    // Pads 3 + 2 leave one voxel.
    let one = new(
        x,
        w,
        with(&|p| {
            p.pads_begin[2] = 3;
            p.pads_end[2] = 2;
        }),
    )
    .unwrap();
    assert_eq!(one.out_dims()[2], 1);
    // Channels: the filters' first dimension is C_in.
    assert_eq!(
        new(x, [3, 2, 3, 3, 3], ok),
        Err(KernelError::ChannelMismatch {
            input: 2,
            filters: 3
        })
    );
    assert_eq!(
        new([1, 2, 4, 0, 4], w, ok),
        Err(KernelError::EmptyDimension {
            tensor: "input",
            dim: "H"
        })
    );
    assert_eq!(
        new(x, [2, 0, 3, 3, 3], ok),
        Err(KernelError::EmptyDimension {
            tensor: "filters",
            dim: "C_out"
        })
    );
    // Overflow: the extent, and the element count.
    assert!(matches!(
        new(x, w, with(&|p| p.stride[0] = usize::MAX)),
        Err(KernelError::Overflow { .. })
    ));
    assert!(matches!(
        new(
            x,
            w,
            with(&|p| {
                p.pads_begin[0] = usize::MAX;
                p.pads_end[0] = 1;
            })
        ),
        Err(KernelError::Overflow { .. })
    ));
    assert!(matches!(
        new(
            [1, 2, 1 << 20, 1 << 20, 1 << 20],
            w,
            with(&|p| p.stride = [1 << 10; 3])
        ),
        Err(KernelError::Overflow { .. })
    ));

    // Buffer lengths, at planning and at running.
    let shape = new(x, w, with(&|p| p.stride = [2; 3])).unwrap();
    let wv = vec![0.1; shape.filters_len()];
    assert_eq!(
        ConvTranspose3dPlan::new(shape, &wv[1..], None, Activation::None).err(),
        Some(KernelError::BufferLength {
            what: "filters",
            expected: shape.filters_len(),
            got: shape.filters_len() - 1
        })
    );
    assert_eq!(
        ConvTranspose3dPlan::new(shape, &wv, Some(&[0.0; 2]), Activation::None).err(),
        Some(KernelError::BufferLength {
            what: "bias",
            expected: 3,
            got: 2
        })
    );
    for params in [with(&|p| p.stride = [2; 3]), with(&|p| p.stride = [3; 3])] {
        let shape = new(x, [2, 3, 3, 3, 3], params).unwrap();
        let plan = ConvTranspose3dPlan::new(shape, &wv, None, Activation::None).unwrap();
        let xv = vec![0.1; shape.input_len()];
        let mut out = vec![0.0; shape.output_len()];
        assert_eq!(
            plan.run_into(&xv[1..], &mut out, 1, None),
            Err(KernelError::BufferLength {
                what: "input",
                expected: shape.input_len(),
                got: shape.input_len() - 1
            })
        );
        assert_eq!(
            plan.run_into(&xv, &mut out[1..], 1, None),
            Err(KernelError::BufferLength {
                what: "output",
                expected: shape.output_len(),
                got: shape.output_len() - 1
            })
        );
        assert_eq!(
            plan.run_into(&xv, &mut out, 0, None),
            Err(KernelError::ZeroThreads)
        );
    }
}

#[test]
fn cancelled_run_returns_cancelled() {
    let patch = ConvTranspose3dParams {
        stride: [2; 3],
        ..ConvTranspose3dParams::default()
    };
    let general = ConvTranspose3dParams {
        stride: [2; 3],
        pads_begin: [1; 3],
        pads_end: [1; 3],
        output_padding: [1; 3],
        dilation: [1; 3],
    };
    let stride1 = ConvTranspose3dParams {
        pads_begin: [1; 3],
        pads_end: [1; 3],
        ..ConvTranspose3dParams::default()
    };
    for (filters, params, strategy) in [
        ([2, 3, 2, 2, 2], patch, TransposeStrategy::PatchGemm),
        ([2, 3, 2, 2, 2], patch, TransposeStrategy::Col2im),
        ([2, 3, 3, 3, 3], general, TransposeStrategy::Col2im),
        ([2, 3, 3, 3, 3], general, TransposeStrategy::General),
        ([2, 3, 3, 3, 3], stride1, TransposeStrategy::General),
    ] {
        let shape = ConvTranspose3dShape::new([2, 2, 5, 6, 7], filters, params).unwrap();
        let plan =
            ConvTranspose3dPlan::new(shape, &data(shape.filters_len(), 1), None, Activation::None)
                .unwrap()
                .with_strategy(strategy)
                .unwrap();
        let x = data(shape.input_len(), 2);
        let mut out = vec![0.0; shape.output_len()];
        let cancel = AtomicBool::new(true);
        for threads in [1, 3] {
            assert_eq!(
                plan.run_into(&x, &mut out, threads, Some(&cancel)),
                Err(KernelError::Cancelled),
                "{:?}",
                plan.strategy()
            );
        }
        // Not set: runs.
        let go = AtomicBool::new(false);
        plan.run_into(&x, &mut out, 2, Some(&go)).unwrap();
    }
}

#[test]
fn workspace_is_reported() {
    // Patch: at least the pointwise convolution's slab ring, not the whole intermediate.
    let params = ConvTranspose3dParams {
        stride: [2; 3],
        ..ConvTranspose3dParams::default()
    };
    let shape = ConvTranspose3dShape::new([2, 4, 6, 6, 6], [4, 3, 2, 2, 2], params).unwrap();
    let plan =
        ConvTranspose3dPlan::new(shape, &data(shape.filters_len(), 1), None, Activation::None)
            .unwrap();
    assert!(plan.workspace_bytes(1) >= plan.conv_plan().slab_bytes());
    assert!(plan.workspace_bytes(3) >= plan.workspace_bytes(1));
    assert_eq!(plan.staging_bytes(), 0);
    // General, strided: one batch item of the zero-inserted, padded input.
    let params = ConvTranspose3dParams {
        stride: [2; 3],
        pads_begin: [1; 3],
        pads_end: [1; 3],
        output_padding: [1; 3],
        dilation: [1; 3],
    };
    let shape = ConvTranspose3dShape::new([2, 4, 6, 6, 6], [4, 3, 3, 3, 3], params).unwrap();
    let plan =
        ConvTranspose3dPlan::new(shape, &data(shape.filters_len(), 1), None, Activation::None)
            .unwrap();
    // Col2im (the default): the slab ring, nothing staged.
    assert_eq!(plan.strategy(), TransposeStrategy::Col2im);
    assert_eq!(plan.staging_bytes(), 0);
    assert!(plan.workspace_bytes(1) >= plan.conv_plan().slab_bytes());
    assert!(plan.workspace_bytes(3) >= plan.workspace_bytes(1));
    let plan = plan.with_strategy(TransposeStrategy::General).unwrap();
    // Per axis: (6 − 1)·2 + 1 = 11 inserted, padded by 1 before and 2 after, of which 1
    // each side is the convolution's own padding: 12.
    assert_eq!(plan.staging_bytes(), 4 * 12 * 12 * 12 * 4);
    assert!(plan.workspace_bytes(1) >= plan.staging_bytes());
    // Stride 1, symmetric padding: nothing staged.
    let params = ConvTranspose3dParams {
        pads_begin: [1; 3],
        pads_end: [1; 3],
        ..ConvTranspose3dParams::default()
    };
    let shape = ConvTranspose3dShape::new([2, 4, 6, 6, 6], [4, 3, 3, 3, 3], params).unwrap();
    let plan =
        ConvTranspose3dPlan::new(shape, &data(shape.filters_len(), 1), None, Activation::None)
            .unwrap()
            .with_strategy(TransposeStrategy::General)
            .unwrap();
    assert_eq!(plan.staging_bytes(), 0);
    // Col2im on a large volume (planned, not run): bounded by the slab ring, far below the
    // column matrix (`C_out·k³` values per input voxel, 216 MiB here).
    let params = ConvTranspose3dParams {
        stride: [2; 3],
        pads_begin: [1; 3],
        pads_end: [1; 3],
        output_padding: [1; 3],
        dilation: [1; 3],
    };
    let shape = ConvTranspose3dShape::new([1, 4, 64, 64, 64], [4, 8, 3, 3, 3], params).unwrap();
    let plan =
        ConvTranspose3dPlan::new(shape, &data(shape.filters_len(), 1), None, Activation::None)
            .unwrap();
    assert_eq!(plan.strategy(), TransposeStrategy::Col2im);
    let columns = 8 * 27 * shape.in_voxels() * 4;
    assert!(plan.workspace_bytes(3) >= plan.conv_plan().slab_bytes());
    assert!(
        plan.workspace_bytes(3) <= 4 * 8 * 1024 * 1024,
        "{} bytes",
        plan.workspace_bytes(3)
    );
    assert!(plan.workspace_bytes(3) < columns / 4);
}

// ---- golden values from PyTorch -----------------------------------------------------------

struct Npy {
    shape: Vec<usize>,
    data: Vec<f32>,
}

fn read_npy(path: &Path) -> Npy {
    let a: ndarray::ArrayD<f32> =
        ndarray_npy::read_npy(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let shape = a.shape().to_vec();
    Npy {
        shape,
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
    stride: [usize; 3],
    pads_begin: [usize; 3],
    pads_end: [usize; 3],
    output_padding: [usize; 3],
    dilation: [usize; 3],
    activation: String,
}

/// Cases from `scripts/make_golden_transpose.py` (torch.nn.functional.conv_transpose3d in
/// f64): the plan on 1 and 2 threads, and the reference, match them.
#[test]
fn golden_values_from_pytorch() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/golden_transpose");
    let cases: GoldenFile =
        toml::from_str(&std::fs::read_to_string(dir.join("cases.toml")).unwrap()).unwrap();
    assert!(cases.case.len() >= 4);
    let mut seen = std::collections::HashSet::new();
    for c in cases.case {
        let load = |s: &str| read_npy(&dir.join(format!("{}.{s}.npy", c.name)));
        let (x, w, b, want) = (
            load("input"),
            load("filters"),
            load("bias"),
            load("expected"),
        );
        let d5 = |v: &[usize]| [v[0], v[1], v[2], v[3], v[4]];
        let params = ConvTranspose3dParams {
            stride: c.stride,
            pads_begin: c.pads_begin,
            pads_end: c.pads_end,
            output_padding: c.output_padding,
            dilation: c.dilation,
        };
        let shape = ConvTranspose3dShape::new(d5(&x.shape), d5(&w.shape), params).unwrap();
        assert_eq!(
            shape.output.to_vec(),
            want.shape,
            "{}: output shape",
            c.name
        );
        let act: Activation = c.activation.parse().unwrap();
        let plan = ConvTranspose3dPlan::new(shape, &w.data, Some(&b.data), act.clone())
            .unwrap()
            .with_min_flops_per_thread(0.0);
        seen.insert(plan.strategy());
        for threads in [1, 2] {
            let got = run(&plan, &x.data, threads);
            assert_close(&got, &want.data, &format!("{} ({threads} threads)", c.name));
        }
        // Every other strategy that can run the case, forced.
        for strategy in TransposeStrategy::ALL {
            if strategy == plan.strategy() || !strategy.supports(&shape) {
                continue;
            }
            let forced = plan.clone().with_strategy(strategy).unwrap();
            let got = run(&forced, &x.data, 2);
            assert_close(
                &got,
                &want.data,
                &format!("{} (forced {})", c.name, strategy.name()),
            );
        }
        let reference = conv_transpose3d_reference(&shape, &x.data, &w.data, Some(&b.data), act);
        assert_close(&reference, &want.data, &format!("{} (reference)", c.name));
    }
    assert_eq!(
        seen,
        [TransposeStrategy::PatchGemm, TransposeStrategy::Col2im].into(),
        "the golden cases cover both default strategies"
    );
}

/// U-Net decoder shapes with enough channels that the inner convolution picks its fast
/// strategies (Winograd for the stride-1 3×3×3 on CPUs with our microkernel), against the
/// reference.
#[test]
fn decoder_shapes_match_reference() {
    let p = |s: usize, pad: usize, op: usize| ConvTranspose3dParams {
        stride: [s; 3],
        pads_begin: [pad; 3],
        pads_end: [pad; 3],
        output_padding: [op; 3],
        dilation: [1; 3],
    };
    for (input, filters, params) in [
        ([1, 32, 4, 5, 6], [32, 16, 2, 2, 2], p(2, 0, 0)),
        ([1, 16, 4, 4, 32], [16, 16, 3, 3, 3], p(1, 1, 0)),
        ([1, 16, 4, 4, 5], [16, 8, 3, 3, 3], p(2, 1, 1)),
    ] {
        let shape = ConvTranspose3dShape::new(input, filters, params).unwrap();
        let x = data(shape.input_len(), 5);
        let w = data(shape.filters_len(), 6);
        let b = data(shape.c_out(), 7);
        let want = conv_transpose3d_reference(&shape, &x, &w, Some(&b), Activation::Relu);
        let default = ConvTranspose3dPlan::new(shape, &w, Some(&b), Activation::Relu).unwrap();
        // The default, and the general strategy forced (its inner convolution then picks
        // Winograd or the direct microkernel).
        for plan in [
            default.clone(),
            default.with_strategy(TransposeStrategy::General).unwrap(),
        ] {
            let got = run(&plan, &x, 2);
            assert_close(
                &got,
                &want,
                &format!(
                    "{} via {} {shape:?}",
                    plan.strategy().name(),
                    plan.conv_plan().strategy().name()
                ),
            );
        }
    }
}

/// Not a test: times the MONAI UNet up-convolutions (k 3, s 2, pads 1, output padding 1) on
/// one thread, general vs col2im. `cargo test --release --test transpose -- --ignored
/// --nocapture monai_timing`.
#[test]
#[ignore]
fn monai_timing() {
    let params = ConvTranspose3dParams {
        stride: [2; 3],
        pads_begin: [1; 3],
        pads_end: [1; 3],
        output_padding: [1; 3],
        dilation: [1; 3],
    };
    for (input, filters) in [
        ([1, 24, 6, 6, 6], [24, 4, 3, 3, 3]),
        ([1, 8, 12, 12, 12], [8, 3, 3, 3, 3]),
    ] {
        let shape = ConvTranspose3dShape::new(input, filters, params).unwrap();
        let x = data(shape.input_len(), 1);
        let w = data(shape.filters_len(), 2);
        let b = data(shape.c_out(), 3);
        let mut out = vec![0f32; shape.output_len()];
        for strategy in [TransposeStrategy::General, TransposeStrategy::Col2im] {
            let plan = ConvTranspose3dPlan::new(shape, &w, Some(&b), Activation::None)
                .unwrap()
                .with_strategy(strategy)
                .unwrap();
            for _ in 0..20 {
                plan.run_into(&x, &mut out, 1, None).unwrap();
            }
            let mut best = f64::INFINITY;
            let mut total = 0.0;
            let runs = 200;
            for _ in 0..runs {
                let t = std::time::Instant::now();
                plan.run_into(&x, &mut out, 1, None).unwrap();
                let ms = t.elapsed().as_secs_f64() * 1e3;
                best = best.min(ms);
                total += ms;
            }
            println!(
                "{input:?} -> {filters:?} {}: best {best:.4} ms, mean {:.4} ms (inner {})",
                strategy.name(),
                total / runs as f64,
                plan.conv_plan().strategy().name()
            );
        }
    }
}
