//! The fast path against the f64 reference, PyTorch golden values, determinism across thread
//! counts, slab streaming, cancellation and every error case.

use std::ops::ControlFlow;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use serde::Deserialize;
use voxconv_kernel::reference::conv3d_reference_with_magnitude;
use voxconv_kernel::{
    Activation, Conv3dParams, Conv3dPlan, Conv3dShape, GemmImpl, KernelError,
    Strategy as KernelStrategy, Tiling,
};

fn data(len: usize, seed: u64) -> Vec<f32> {
    voxconv_kernel::seeded(len, seed)
}

/// Asserts `got` is within the f32 rounding bound of the f64 reference: for each element,
/// `|got − ref| <= 2·(K + 1)·ε·Σ|w·x| + 3ε` (K = reduction length; the activations used are
/// 1-Lipschitz, so the bound carries through them; the `eˣ` of sigmoid and ELU, within 2 ulp
/// and at most 1 where they use it, adds up to 2ε more).
fn assert_close(shape: &Conv3dShape, got: &[f32], want: &[f32], mag: &[f64], what: &str) {
    let k = shape.reduction_len() as f64 + 1.0;
    let eps = f32::EPSILON as f64;
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, ((&g, &w), &m)) in got.iter().zip(want).zip(mag).enumerate() {
        let tol = 2.0 * k * eps * m + 3.0 * eps;
        let err = (g as f64 - w as f64).abs();
        assert!(
            err <= tol,
            "{what}: element {i}: got {g}, want {w} (|err| {err:e} > tol {tol:e}), shape {shape:?}"
        );
    }
}

fn run_plan(
    plan: &Conv3dPlan,
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    threads: usize,
) -> Vec<f32> {
    let mut out = vec![f32::NAN; plan.shape().output_len()];
    plan.run_into(x, w, b, &mut out, threads, None).unwrap();
    out
}

/// Every activation, 1-Lipschitz (ELU's alpha and PReLU's slopes within ±1). PReLU gets 20
/// slopes (or one shared): [`fit`] cuts them to a layer's channels.
fn activation_strategy() -> impl proptest::strategy::Strategy<Value = Activation> {
    prop_oneof![
        Just(Activation::None),
        Just(Activation::Relu),
        (0.0f32..0.5).prop_map(Activation::LeakyRelu),
        Just(Activation::Sigmoid),
        (0.05f32..1.0).prop_map(Activation::Elu),
        prop::collection::vec(-1.0f32..1.0, 20).prop_map(|s| Activation::PRelu(s.into())),
        (-1.0f32..1.0).prop_map(|s| Activation::PRelu(vec![s].into())),
    ]
}

/// `act` for a layer of `c_out` channels: per-channel PReLU slopes cut to `c_out`.
fn fit(act: Activation, c_out: usize) -> Activation {
    match act {
        Activation::PRelu(s) if s.len() > 1 => Activation::PRelu(s[..c_out].into()),
        a => a,
    }
}

/// A random valid problem: per axis, input size, kernel, stride, padding, dilation such that
/// the dilated kernel fits the padded input.
fn problem() -> impl proptest::strategy::Strategy<Value = (Conv3dShape, Activation, bool)> {
    // Width gets more room: 16-lane row segments (also at stride 2) need long rows.
    let axis = |extra: usize| {
        (1usize..4, 1usize..4, 0usize..3, 1usize..4, 0usize..extra).prop_map(
            |(k, s, p, d, extra)| {
                let eff = d * (k - 1) + 1;
                // input x such that x + 2p >= eff, plus some slack for odd sizes
                let x = eff.saturating_sub(2 * p).max(1) + extra;
                (x, k, s, p, d)
            },
        )
    };
    (
        1usize..3,
        1usize..5,
        // Past 16 output channels, so random channel blocks split a tile's channels.
        1usize..20,
        [axis(9), axis(9), axis(48)],
        activation_strategy(),
        any::<bool>(),
    )
        .prop_map(|(n, cin, cout, axes, act, bias)| {
            let input = [n, cin, axes[0].0, axes[1].0, axes[2].0];
            let filters = [cout, cin, axes[0].1, axes[1].1, axes[2].1];
            let params = Conv3dParams {
                stride: [axes[0].2, axes[1].2, axes[2].2],
                padding: [axes[0].3, axes[1].3, axes[2].3],
                dilation: [axes[0].4, axes[1].4, axes[2].4],
            };
            (
                Conv3dShape::new(input, filters, params).unwrap(),
                fit(act, cout),
                bias,
            )
        })
}

/// Every (strategy, GEMM) combination this CPU supports for `shape`, default first.
fn variants(shape: Conv3dShape, act: Activation) -> Vec<Conv3dPlan> {
    let base = Conv3dPlan::new(shape, act);
    let mut out = vec![base.clone()];
    for gemm in [GemmImpl::Portable, GemmImpl::Avx512, GemmImpl::Avx2] {
        for strategy in [
            KernelStrategy::Im2colGemm,
            KernelStrategy::Pointwise,
            KernelStrategy::Direct,
            KernelStrategy::Winograd,
        ] {
            let g = match base.clone().with_gemm(gemm) {
                Ok(g) => g,
                Err(e) => {
                    // Only a GEMM this CPU lacks is refused.
                    assert!(!gemm.available(), "{gemm:?}: {e}");
                    continue;
                }
            };
            if !g.supports(strategy) {
                assert!(
                    matches!(
                        g.clone().with_strategy(strategy),
                        Err(KernelError::Unsupported { .. })
                    ),
                    "{strategy:?}/{gemm:?} is unsupported, forcing it must fail"
                );
                continue;
            }
            let p = g.with_strategy(strategy).unwrap();
            if p.strategy() == strategy
                && p.gemm_impl() == gemm
                && !out
                    .iter()
                    .any(|q| q.strategy() == strategy && q.gemm_impl() == gemm)
            {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn variants_cover_every_supported_path() {
    let shape =
        Conv3dShape::new([1, 2, 6, 6, 6], [3, 2, 1, 1, 1], Conv3dParams::default()).unwrap();
    let names: Vec<_> = variants(shape, Activation::None)
        .iter()
        .map(|p| (p.strategy(), p.gemm_impl()))
        .collect();
    assert!(names.contains(&(KernelStrategy::Im2colGemm, GemmImpl::Portable)));
    assert!(names.contains(&(KernelStrategy::Pointwise, GemmImpl::Portable)));
    if voxconv_kernel::avx512::available() {
        assert!(
            names.contains(&(KernelStrategy::Direct, GemmImpl::Avx512)),
            "{names:?}"
        );
        assert!(names.contains(&(KernelStrategy::Im2colGemm, GemmImpl::Avx512)));
    }
    if GemmImpl::Avx2.available() {
        assert!(names.contains(&(KernelStrategy::Im2colGemm, GemmImpl::Avx2)));
        assert!(names.contains(&(KernelStrategy::Pointwise, GemmImpl::Avx2)));
    }
}

proptest! {
    #![proptest_config(Config {
        cases: 160,
        rng_seed: RngSeed::Fixed(0x766f78),
        failure_persistence: None,
        ..Config::default()
    })]

    /// Default tiling and random tilings (tile widths that split output rows, reduction
    /// chunks that do not divide K, one-plane slabs), 1–3 threads, against the reference.
    #[test]
    fn fast_path_matches_reference(
        (shape, act, with_bias) in problem(),
        tile_cols in 1usize..70,
        k_chunk in 1usize..40,
        slab_depth in 1usize..4,
        chan_block in 1usize..20,
        threads in 1usize..4,
        seed in 0u64..1000,
    ) {
        let x = data(shape.input_len(), seed);
        let w = data(shape.filters_len(), seed + 1);
        let b = data(shape.c_out(), seed + 2);
        let bias = with_bias.then_some(b.as_slice());
        let (want, mag) = conv3d_reference_with_magnitude(&shape, &x, &w, bias, act.clone()).unwrap();
        for plan in variants(shape, act) {
            let what = format!("{:?}/{:?} default tiling", plan.strategy(), plan.gemm_impl());
            assert_close(&shape, &run_plan(&plan, &x, &w, bias, threads), &want, &mag, &what);
            let tiled = plan.clone().with_tiling(Tiling { tile_cols, k_chunk, slab_depth, chan_block });
            let what = format!("{:?}/{:?} {:?}", plan.strategy(), plan.gemm_impl(), tiled.tiling());
            assert_close(&shape, &run_plan(&tiled, &x, &w, bias, threads), &want, &mag, &what);
        }
    }
}

proptest! {
    #![proptest_config(Config {
        cases: 48,
        rng_seed: RngSeed::Fixed(0x77696e6f),
        failure_persistence: None,
        ..Config::default()
    })]

    /// Winograd F(2×2×2, 3×3×3) (3×3×3, stride 1, dilation 1): odd and even sizes, every
    /// padding, partial blocks at every edge, lane groups spanning block rows and plane
    /// pairs, random tilings and channel blocks, against the reference. Its
    /// transforms add rounding, so the bound is `WINOGRAD_TOLERANCE` times the direct one.
    #[test]
    fn winograd_matches_reference(
        n in 1usize..3,
        c_in in 1usize..6,
        c_out in 1usize..20,
        dims in [1usize..12, 1usize..12, 1usize..40],
        pads in [0usize..3, 0usize..3, 0usize..3],
        act in activation_strategy(),
        slab_depth in 1usize..6,
        chan_block in 1usize..20,
        threads in 1usize..4,
        seed in 0u64..1000,
    ) {
        let input = [n, c_in, dims[0] + 2, dims[1] + 2, dims[2] + 2];
        let params = Conv3dParams { padding: pads, ..Conv3dParams::default() };
        let shape = Conv3dShape::new(input, [c_out, c_in, 3, 3, 3], params).unwrap();
        let act = fit(act, c_out);
        let plan = match Conv3dPlan::new(shape, act.clone()).with_strategy(KernelStrategy::Winograd) {
            Ok(plan) => plan,
            Err(e) => {
                prop_assert_eq!(GemmImpl::best_available(), GemmImpl::Portable, "{}", e);
                return Ok(()); // no microkernel here
            }
        };
        prop_assert_eq!(plan.strategy(), KernelStrategy::Winograd);
        let x = data(shape.input_len(), seed);
        let w = data(shape.filters_len(), seed + 1);
        let b = data(c_out, seed + 2);
        let (want, mag) = conv3d_reference_with_magnitude(&shape, &x, &w, Some(&b), act).unwrap();
        let mag: Vec<f64> = mag.iter().map(|m| m * WINOGRAD_TOLERANCE).collect();
        assert_close(&shape, &run_plan(&plan, &x, &w, Some(&b), threads), &want, &mag, "winograd");
        let t = plan.tiling();
        // Other plane pairs per slab, and output channels in blocks (each repeats the input
        // transform of its tile).
        let tiled = plan.with_tiling(Tiling { slab_depth, chan_block, ..t });
        let got = run_plan(&tiled, &x, &w, Some(&b), threads);
        assert_close(&shape, &got, &want, &mag, "winograd tiled");
        // One thread runs a voxel tile's channel blocks as one: the same bits.
        let one = run_plan(&tiled, &x, &w, Some(&b), 1);
        prop_assert!(one.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits()), "1 vs {} threads", threads);
    }
}

/// How much more rounding error Winograd F(2,3) may add than the direct method's bound (the
/// seeded cases pass at 1.0; 2.0 leaves headroom for other seeds).
const WINOGRAD_TOLERANCE: f64 = 2.0;

#[test]
fn one_two_and_three_threads_are_bit_identical() {
    // Big enough for many tiles and slabs, with a reduction split into several chunks.
    let shape = Conv3dShape::new(
        [2, 16, 20, 24, 28],
        [12, 16, 3, 3, 3],
        Conv3dParams {
            stride: [1, 1, 1],
            padding: [1, 1, 1],
            dilation: [1, 1, 1],
        },
    )
    .unwrap();
    let x = data(shape.input_len(), 7);
    let w = data(shape.filters_len(), 8);
    let b = data(12, 9);
    let mut plans = variants(shape, Activation::LeakyRelu(0.1));
    plans.push(
        Conv3dPlan::new(shape, Activation::Relu).with_tiling(Tiling {
            tile_cols: 100,
            k_chunk: 50,
            slab_depth: 3,
            chan_block: 8,
        }),
    );
    // Winograd in channel blocks: threads share the blocks of a voxel tile, one thread runs
    // them as one.
    if let Ok(wino) =
        Conv3dPlan::new(shape, Activation::Relu).with_strategy(KernelStrategy::Winograd)
    {
        let t = wino.tiling();
        plans.push(wino.with_tiling(Tiling {
            chan_block: 8,
            slab_depth: 4,
            ..t
        }));
    }
    for plan in plans {
        let one = run_plan(&plan, &x, &w, Some(&b), 1);
        for threads in [2, 3] {
            let many = run_plan(&plan, &x, &w, Some(&b), threads);
            let same = one
                .iter()
                .zip(&many)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "{threads} threads differ from 1 thread ({:?})",
                plan.tiling()
            );
        }
    }
}

/// Winograd on a small volume with many channel blocks: threads take groups of a voxel
/// tile's channel blocks (all of them, some, or one each, as the thread count asks), and
/// every grouping gives the bits of one thread; default tiling (the volume split into voxel
/// tiles) and one voxel tile.
#[test]
fn winograd_channel_block_groups_are_bit_identical() {
    let shape = Conv3dShape::new(
        [1, 8, 8, 8, 8],
        [44, 8, 3, 3, 3],
        Conv3dParams {
            padding: [1, 1, 1],
            ..Conv3dParams::default()
        },
    )
    .unwrap();
    let Ok(wino) = Conv3dPlan::new(shape, Activation::Relu)
        .with_min_flops_per_thread(0.0)
        .with_strategy(KernelStrategy::Winograd)
    else {
        return; // no microkernel on this CPU
    };
    let x = data(shape.input_len(), 31);
    let w = data(shape.filters_len(), 32);
    let b = data(44, 33);
    let t = wino.tiling();
    assert!(t.tile_cols < 512, "8³ outputs in two voxel tiles: {t:?}");
    let one_tile = Tiling {
        slab_depth: 8,
        tile_cols: usize::MAX,
        ..t
    };
    for tiling in [t, one_tile] {
        let plan = wino.clone().with_tiling(Tiling {
            chan_block: 8,
            ..tiling
        });
        let one = run_plan(&plan, &x, &w, Some(&b), 1);
        let (want, mag) =
            conv3d_reference_with_magnitude(&shape, &x, &w, Some(&b), Activation::Relu).unwrap();
        let mag: Vec<f64> = mag.iter().map(|m| m * WINOGRAD_TOLERANCE).collect();
        assert_close(&shape, &one, &want, &mag, "winograd, one thread");
        for threads in [2, 3, 4, 6, 11] {
            let many = run_plan(&plan, &x, &w, Some(&b), threads);
            assert!(
                bit_identical(&one, &many),
                "{threads} threads differ from 1 thread ({:?})",
                plan.tiling()
            );
        }
    }
}

/// Every strategy with small slabs and tiles, at 1, 2 and 3 threads (for slab tests).
fn slab_plans(shape: Conv3dShape) -> impl Iterator<Item = (Conv3dPlan, usize)> {
    variants(shape, Activation::None)
        .into_iter()
        .flat_map(|p| [1, 2, 3].map(|t| (p.clone(), t)))
        .map(|(plan, threads)| {
            let plan = plan
                .with_tiling(Tiling {
                    tile_cols: 37,
                    k_chunk: 20,
                    slab_depth: 2,
                    chan_block: 8,
                })
                .with_min_flops_per_thread(0.0);
            (plan, threads)
        })
}

/// Rebuilds an output from slabs, checking they come in order and have the right size.
struct Rebuild {
    output: [usize; 5],
    next: (usize, usize),
    data: Vec<f32>,
}

impl Rebuild {
    fn new(shape: &Conv3dShape) -> Self {
        Self {
            output: shape.output,
            next: (0, 0),
            data: vec![f32::NAN; shape.output_len()],
        }
    }

    /// Where channel `c` of a slab starts in the output, and its length.
    fn range(&self, batch: usize, depth: &std::ops::Range<usize>, c: usize) -> (usize, usize) {
        let [_, c_out, od, oh, ow] = self.output;
        let len = depth.len() * oh * ow;
        (((batch * c_out + c) * od + depth.start) * oh * ow, len)
    }

    fn add(&mut self, batch: usize, depth: &std::ops::Range<usize>, data: &[f32]) {
        let [_, c_out, od, ..] = self.output;
        assert_eq!((batch, depth.start), self.next, "slab out of order");
        let (_, per) = self.range(batch, depth, 0);
        assert_eq!(data.len(), c_out * per);
        for c in 0..c_out {
            let (at, len) = self.range(batch, depth, c);
            self.data[at..at + len].copy_from_slice(&data[c * per..(c + 1) * per]);
        }
        self.next = if depth.end == od {
            (batch + 1, 0)
        } else {
            (batch, depth.end)
        };
    }

    /// Every slab arrived and the output is bit-identical to `full`.
    fn check(&self, full: &[f32], what: &str) {
        assert_eq!(
            self.next,
            (self.output[0], 0),
            "every slab delivered ({what})"
        );
        assert!(bit_identical(&self.data, full), "{what}");
    }
}

fn bit_identical(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

#[test]
fn slabs_arrive_in_order_and_tile_the_output() {
    let shape =
        Conv3dShape::new([2, 3, 9, 10, 11], [5, 3, 3, 3, 3], Conv3dParams::default()).unwrap();
    let x = data(shape.input_len(), 1);
    let w = data(shape.filters_len(), 2);
    for (plan, threads) in slab_plans(shape) {
        let full = run_plan(&plan, &x, &w, None, 2);
        let mut rebuilt = Rebuild::new(&shape);
        plan.run_slabs(&x, &w, None, threads, None, &mut |s| {
            rebuilt.add(s.batch, &s.depth, s.data);
            ControlFlow::Continue(())
        })
        .unwrap();
        rebuilt.check(&full, &format!("{:?} threads {threads}", plan.strategy()));
    }
}

/// Guards the hand-over of slab buffers (`run_slabs_owned`): every strategy, 1–3 threads,
/// buffers recycled dirty (NaN-filled, as a consumer returns them) must come back fully
/// overwritten, in order, bit-identical to the lent path; a buffer kept by the consumer is
/// never written again.
#[test]
fn owned_slabs_match_lent_slabs_with_dirty_recycled_buffers() {
    let shape =
        Conv3dShape::new([2, 3, 9, 10, 11], [5, 3, 3, 3, 3], Conv3dParams::default()).unwrap();
    let x = data(shape.input_len(), 3);
    let w = data(shape.filters_len(), 4);
    let c_out = shape.output[1];
    for (plan, threads) in slab_plans(shape) {
        let full = run_plan(&plan, &x, &w, None, 2);
        let mut rebuilt = Rebuild::new(&shape);
        // Every second slab is kept (and checked at the end); the others return dirty.
        let mut kept = Vec::new();
        let free = std::cell::RefCell::new(Vec::<Vec<f32>>::new());
        let mut fresh_calls = 0usize;
        let mut delivered = 0usize;
        plan.run_slabs_owned(
            &x,
            &w,
            None,
            threads,
            None,
            &mut |len| {
                fresh_calls += 1;
                free.borrow_mut()
                    .pop()
                    .unwrap_or_else(|| vec![f32::NAN; len / 2])
            },
            &mut |s| {
                rebuilt.add(s.batch, &s.depth, &s.data);
                if delivered.is_multiple_of(2) {
                    kept.push((s.batch, s.depth, s.data));
                } else {
                    let mut dirty = s.data;
                    dirty.fill(f32::NAN);
                    free.borrow_mut().push(dirty);
                }
                delivered += 1;
                ControlFlow::Continue(())
            },
        )
        .unwrap();
        assert!(fresh_calls >= 1);
        let what = format!("{:?} threads {threads}", plan.strategy());
        rebuilt.check(&full, &what);
        for (b, depth, data) in kept {
            let per = data.len() / c_out;
            for c in 0..c_out {
                let (at, len) = rebuilt.range(b, &depth, c);
                assert!(
                    bit_identical(&data[c * per..(c + 1) * per], &full[at..at + len]),
                    "a kept slab was written after it was handed over ({what})"
                );
            }
        }
    }
}

#[test]
fn packed_filters_give_the_raw_filters_result_and_refuse_other_plans() {
    let conv = |c_in: usize, c_out: usize, k: usize, pad: usize| {
        let params = Conv3dParams {
            stride: [1; 3],
            padding: [pad; 3],
            dilation: [1; 3],
        };
        Conv3dShape::new([2, c_in, 7, 6, 9], [c_out, c_in, k, k, k], params).unwrap()
    };
    // Winograd- and direct-eligible, pointwise, and an odd channel count (partial groups).
    for shape in [conv(16, 24, 3, 1), conv(5, 11, 1, 0), conv(3, 13, 3, 0)] {
        let x = data(shape.input_len(), 1);
        let w = data(shape.filters_len(), 2);
        let b = data(shape.c_out(), 3);
        let plans = variants(shape, Activation::Relu);
        for plan in &plans {
            let packed = plan.pack_filters(&w).unwrap();
            let raw = run_plan(plan, &x, &w, Some(&b), 2);
            let mut out = vec![f32::NAN; shape.output_len()];
            plan.run_into(&x, &packed, Some(&b), &mut out, 2, None)
                .unwrap();
            assert!(
                bit_identical(&raw, &out),
                "{:?}/{:?}: packed and raw filters differ",
                plan.strategy(),
                plan.gemm_impl()
            );
            // Filters packed for another path of the same shape are refused, not misread.
            for other in plans
                .iter()
                .filter(|o| o.strategy() != plan.strategy() || o.gemm_impl() != plan.gemm_impl())
            {
                let mut out = vec![0f32; shape.output_len()];
                let err = other.run_into(&x, &packed, Some(&b), &mut out, 1, None);
                assert!(
                    matches!(err, Err(KernelError::Invalid { .. })),
                    "{:?}/{:?} ran filters packed for {:?}/{:?}: {err:?}",
                    other.strategy(),
                    other.gemm_impl(),
                    plan.strategy(),
                    plan.gemm_impl()
                );
            }
        }
    }
    // ... and so are filters packed for another shape.
    let (a, b) = (conv(16, 24, 3, 1), conv(16, 16, 3, 1));
    let packed = Conv3dPlan::new(b, Activation::None)
        .pack_filters(&data(b.filters_len(), 2))
        .unwrap();
    let plan = Conv3dPlan::new(a, Activation::None);
    let mut out = vec![0f32; a.output_len()];
    let err = plan.run_into(&data(a.input_len(), 1), &packed, None, &mut out, 1, None);
    assert!(matches!(err, Err(KernelError::Invalid { .. })), "{err:?}");
    // Raw filters of the wrong length are an error too, before any packing.
    assert!(matches!(
        plan.pack_filters(&[0.0; 5]),
        Err(KernelError::BufferLength {
            what: "filters",
            got: 5,
            ..
        })
    ));
}

#[test]
fn pointwise_strategy_matches_general_path() {
    let shape =
        Conv3dShape::new([2, 7, 5, 6, 7], [9, 7, 1, 1, 1], Conv3dParams::default()).unwrap();
    let plan = Conv3dPlan::new(shape, Activation::Sigmoid);
    assert_eq!(plan.strategy(), KernelStrategy::Pointwise);
    assert_eq!(plan.workspace_bytes(4), 0);
    let general = plan
        .clone()
        .with_strategy(KernelStrategy::Im2colGemm)
        .unwrap();
    assert_eq!(general.strategy(), KernelStrategy::Im2colGemm);
    let x = data(shape.input_len(), 3);
    let w = data(shape.filters_len(), 4);
    let b = data(9, 5);
    let (want, mag) =
        conv3d_reference_with_magnitude(&shape, &x, &w, Some(&b), Activation::Sigmoid).unwrap();
    assert_close(
        &shape,
        &run_plan(&plan, &x, &w, Some(&b), 2),
        &want,
        &mag,
        "pointwise",
    );
    assert_close(
        &shape,
        &run_plan(&general, &x, &w, Some(&b), 2),
        &want,
        &mag,
        "general",
    );
    // A 1×1×1 kernel with stride or padding is not pointwise.
    let strided = Conv3dShape::new(
        [1, 2, 4, 4, 4],
        [3, 2, 1, 1, 1],
        Conv3dParams {
            stride: [2, 1, 1],
            ..Conv3dParams::default()
        },
    )
    .unwrap();
    assert_ne!(
        Conv3dPlan::new(strided, Activation::None).strategy(),
        KernelStrategy::Pointwise
    );
}

/// A float32 `.npy` file as (shape, data), read by ndarray-npy.
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
    padding: [usize; 3],
    dilation: [usize; 3],
    activation: String,
}

#[test]
fn golden_values_from_pytorch() {
    // The fixtures live at the workspace root (the CLI tests use them too).
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/golden");
    let cases: GoldenFile =
        toml::from_str(&std::fs::read_to_string(dir.join("cases.toml")).unwrap()).unwrap();
    assert!(cases.case.len() >= 3);
    for c in cases.case {
        let load = |s: &str| read_npy(&dir.join(format!("{}.{s}.npy", c.name)));
        let (x, w, b, want) = (
            load("input"),
            load("filters"),
            load("bias"),
            load("expected"),
        );
        let d5 = |v: &[usize]| [v[0], v[1], v[2], v[3], v[4]];
        let params = Conv3dParams {
            stride: c.stride,
            padding: c.padding,
            dilation: c.dilation,
        };
        let shape = Conv3dShape::new(d5(&x.shape), d5(&w.shape), params).unwrap();
        assert_eq!(
            shape.output.to_vec(),
            want.shape,
            "{}: output shape",
            c.name
        );
        let act: Activation = c.activation.parse().unwrap();
        let (_, mag) =
            conv3d_reference_with_magnitude(&shape, &x.data, &w.data, Some(&b.data), act.clone())
                .unwrap();
        // Every strategy and GEMM this CPU runs for the shape (the epilogues differ).
        for plan in variants(shape, act.clone()) {
            for threads in [1, 2] {
                let got = run_plan(&plan, &x.data, &w.data, Some(&b.data), threads);
                let what = format!("{} ({})", c.name, plan.strategy().name());
                assert_close(&shape, &got, &want.data, &mag, &what);
            }
        }
        let reference =
            voxconv_kernel::conv3d_reference(&shape, &x.data, &w.data, Some(&b.data), act).unwrap();
        assert_close(
            &shape,
            &reference,
            &want.data,
            &mag,
            &format!("{} (reference)", c.name),
        );
    }
}

// ---- named regression cases -------------------------------------------------------------

/// Guards the right-edge clamp of strided row copies: with stride 2 and padding 2 the last
/// output taps read past the input's end and must be zero, not the next row's values.
#[test]
fn regression_strided_taps_past_row_end_are_zero() {
    let shape = Conv3dShape::new(
        [1, 1, 3, 3, 5],
        [1, 1, 1, 1, 3],
        Conv3dParams {
            stride: [1, 1, 2],
            padding: [0, 0, 2],
            dilation: [1, 1, 1],
        },
    )
    .unwrap();
    let x: Vec<f32> = (0..shape.input_len()).map(|i| i as f32 + 1.0).collect();
    let w = vec![1.0; 3];
    let want = voxconv_kernel::conv3d_reference(&shape, &x, &w, None, Activation::None).unwrap();
    let got = run_plan(&Conv3dPlan::new(shape, Activation::None), &x, &w, None, 1);
    assert_eq!(got, want);
}

/// Guards the first GEMM of a tile overwriting its destination: a NaN-prefilled output must
/// come back without NaN, also when the reduction is split into chunks.
#[test]
fn regression_nan_prefilled_output_is_overwritten() {
    let shape =
        Conv3dShape::new([1, 4, 6, 6, 6], [3, 4, 3, 3, 3], Conv3dParams::default()).unwrap();
    let x = data(shape.input_len(), 1);
    let w = data(shape.filters_len(), 2);
    for k_chunk in [7, 108] {
        let plan = Conv3dPlan::new(shape, Activation::None).with_tiling(Tiling {
            tile_cols: 10,
            k_chunk,
            slab_depth: 1,
            chan_block: usize::MAX,
        });
        let got = run_plan(&plan, &x, &w, None, 2);
        assert!(got.iter().all(|v| v.is_finite()), "k_chunk {k_chunk}");
    }
}

/// Guards tiles that start mid-row: a tile width of 1 makes every column its own tile.
#[test]
fn regression_single_column_tiles() {
    let shape = Conv3dShape::new(
        [1, 2, 4, 5, 3],
        [2, 2, 2, 3, 2],
        Conv3dParams {
            stride: [1, 2, 1],
            padding: [1, 1, 0],
            dilation: [1, 1, 2],
        },
    )
    .unwrap();
    let x = data(shape.input_len(), 4);
    let w = data(shape.filters_len(), 5);
    let (want, mag) =
        conv3d_reference_with_magnitude(&shape, &x, &w, None, Activation::None).unwrap();
    let plan = Conv3dPlan::new(shape, Activation::None).with_tiling(Tiling {
        tile_cols: 1,
        k_chunk: 1,
        slab_depth: 1,
        chan_block: usize::MAX,
    });
    assert_close(
        &shape,
        &run_plan(&plan, &x, &w, None, 3),
        &want,
        &mag,
        "1-column tiles",
    );
}

/// Guards the stride-2 direct path's even-lane permute on full 16-voxel row segments (the
/// last lane is only used by rows of at least 16 output voxels).
#[test]
fn regression_direct_stride2_full_segments() {
    let shape = Conv3dShape::new(
        [1, 3, 5, 6, 70],
        [9, 3, 3, 3, 3],
        Conv3dParams {
            stride: [1, 2, 2],
            padding: [1, 1, 1],
            dilation: [1, 1, 1],
        },
    )
    .unwrap();
    let x = data(shape.input_len(), 11);
    let w = data(shape.filters_len(), 12);
    let b = data(9, 13);
    let (want, mag) =
        conv3d_reference_with_magnitude(&shape, &x, &w, Some(&b), Activation::None).unwrap();
    for plan in variants(shape, Activation::None) {
        let what = format!("{:?}", plan.strategy());
        assert_close(
            &shape,
            &run_plan(&plan, &x, &w, Some(&b), 2),
            &want,
            &mag,
            &what,
        );
    }
}

/// The direct path's two-row vectors (output rows short enough that one vector reads the
/// tail of one row and the head of the next): 7-voxel rows at width stride 2 (the shape of
/// small-batch-odd), 9- and 20-voxel rows with padding on every side, tile widths that end
/// vectors mid-row, against the reference.
/// `shape`'s plan forced to the direct strategy, or `None` where this CPU lacks AVX-512
/// (the only reason it may be refused).
fn direct_plan(shape: Conv3dShape) -> Option<Conv3dPlan> {
    match Conv3dPlan::new(shape, Activation::None).with_strategy(KernelStrategy::Direct) {
        Ok(p) => Some(p),
        Err(e) => {
            assert!(!voxconv_kernel::avx512::available(), "{e}");
            None
        }
    }
}

/// Filters wider than a vector's worth of taps (the direct kernel reads an input box: any
/// width, which the per-tap-column masks of reading in place once limited to 8), with width
/// padding, dilation and stride 2, against the reference.
#[test]
fn direct_wide_filters_match_the_reference() {
    for (input, filters, stride, padding, dilation) in [
        (
            [1, 2, 4, 5, 30],
            [3, 2, 1, 2, 11],
            [1, 1, 1],
            [0, 1, 5],
            [1, 1, 1],
        ),
        (
            [2, 1, 3, 3, 41],
            [9, 1, 2, 1, 17],
            [1, 1, 2],
            [1, 0, 8],
            [1, 1, 1],
        ),
        (
            [1, 3, 3, 4, 50],
            [5, 3, 1, 3, 9],
            [1, 1, 1],
            [0, 1, 4],
            [1, 1, 2],
        ),
    ] {
        let shape = Conv3dShape::new(
            input,
            filters,
            Conv3dParams {
                stride,
                padding,
                dilation,
            },
        )
        .unwrap();
        let Some(plan) = direct_plan(shape) else {
            return;
        };
        let x = data(shape.input_len(), 31);
        let w = data(shape.filters_len(), 32);
        let b = data(shape.c_out(), 33);
        let (want, mag) =
            conv3d_reference_with_magnitude(&shape, &x, &w, Some(&b), Activation::None).unwrap();
        for threads in [1, 2] {
            let what = format!("{shape:?} threads {threads}");
            let got = run_plan(&plan, &x, &w, Some(&b), threads);
            assert_close(&shape, &got, &want, &mag, &what);
        }
    }
}

#[test]
fn direct_vectors_spanning_two_rows_match_the_reference() {
    for (input, filters, stride, padding) in [
        ([4, 3, 19, 21, 15], [5, 3, 3, 2, 3], [2, 1, 2], [1, 1, 0]),
        ([1, 2, 5, 6, 9], [9, 2, 3, 3, 3], [1, 1, 1], [1, 1, 1]),
        ([1, 2, 4, 5, 20], [3, 2, 3, 3, 3], [1, 2, 1], [1, 0, 1]),
        ([2, 1, 3, 4, 17], [8, 1, 1, 3, 2], [1, 1, 2], [0, 1, 1]),
    ] {
        let shape = Conv3dShape::new(
            input,
            filters,
            Conv3dParams {
                stride,
                padding,
                dilation: [1, 1, 1],
            },
        )
        .unwrap();
        let ow = shape.out_dims()[2];
        assert_eq!(voxconv_kernel::avx512::direct_pieces(ow), 2, "{shape:?}");
        let Some(plan) = direct_plan(shape) else {
            return;
        };
        let x = data(shape.input_len(), 21);
        let w = data(shape.filters_len(), 22);
        let b = data(shape.c_out(), 23);
        let (want, mag) =
            conv3d_reference_with_magnitude(&shape, &x, &w, Some(&b), Activation::None).unwrap();
        let t = plan.tiling();
        for tile_cols in [t.tile_cols, 1, 5, 23, 33] {
            let tiled = plan.clone().with_tiling(Tiling { tile_cols, ..t });
            for threads in [1, 2] {
                let what = format!("{shape:?} tile_cols {tile_cols} threads {threads}");
                assert_close(
                    &shape,
                    &run_plan(&tiled, &x, &w, Some(&b), threads),
                    &want,
                    &mag,
                    &what,
                );
            }
        }
    }
}

/// 1×1×1 heads into at most 4 channels take the pointwise path's 96-voxel × 4-channel
/// blocks: against the reference (odd voxel counts, bias, an activation, tiles that end
/// mid-block, 1–2 threads) and bit for bit against im2col + GEMM's 48 × 8 blocks, which
/// sum each output in the same order.
#[test]
fn narrow_pointwise_heads_match_the_reference_and_the_wide_blocks() {
    for (c_in, c_out, dims) in [
        (16, 4, [9, 11, 13]),
        (3, 1, [5, 7, 33]),
        (32, 3, [2, 3, 97]),
    ] {
        let shape = Conv3dShape::new(
            [2, c_in, dims[0], dims[1], dims[2]],
            [c_out, c_in, 1, 1, 1],
            Conv3dParams::default(),
        )
        .unwrap();
        let act = Activation::LeakyRelu(0.1);
        let plan = Conv3dPlan::new(shape, act.clone());
        assert_eq!(plan.strategy(), KernelStrategy::Pointwise);
        let x = data(shape.input_len(), 41);
        let w = data(shape.filters_len(), 42);
        let b = data(c_out, 43);
        let (want, mag) =
            conv3d_reference_with_magnitude(&shape, &x, &w, Some(&b), act.clone()).unwrap();
        let t = plan.tiling();
        let wide = plan
            .clone()
            .with_strategy(KernelStrategy::Im2colGemm)
            .unwrap();
        let wide_out = run_plan(&wide, &x, &w, Some(&b), 1);
        for tile_cols in [t.tile_cols, 95, 97, 200] {
            let tiled = plan.clone().with_tiling(Tiling { tile_cols, ..t });
            for threads in [1, 2] {
                let got = run_plan(&tiled, &x, &w, Some(&b), threads);
                let what = format!("{shape:?} tile_cols {tile_cols} threads {threads}");
                assert_close(&shape, &got, &want, &mag, &what);
                if wide.gemm_impl() == GemmImpl::Avx512 && tiled.gemm_impl() == GemmImpl::Avx512 {
                    assert!(
                        bit_identical(&got, &wide_out),
                        "{what}: not the wide blocks' bits"
                    );
                }
            }
        }
    }
}

/// A 1×1×1 kernel over many input channels runs its reduction in passes of a few input
/// planes (partial sums through the output for one channel group, through the accumulator for
/// several): against the reference and bit for bit against the same plan in one pass (each
/// output is summed in the same order either way), into NaN-prefilled outputs, at 1 and 3
/// threads, with reductions that the passes do not divide and tiles that end mid-block.
#[test]
fn pointwise_reduction_passes_match_one_pass_bit_for_bit() {
    for (c_in, c_out, dims) in [
        (37, 3, [3, 7, 41]),
        (37, 8, [2, 9, 30]),
        (45, 20, [3, 5, 67]),
        (9, 5, [4, 4, 25]),
    ] {
        let shape = Conv3dShape::new(
            [2, c_in, dims[0], dims[1], dims[2]],
            [c_out, c_in, 1, 1, 1],
            Conv3dParams::default(),
        )
        .unwrap();
        let act = Activation::Elu(0.5);
        let plan = Conv3dPlan::new(shape, act.clone());
        assert_eq!(plan.strategy(), KernelStrategy::Pointwise);
        let x = data(shape.input_len(), 51);
        let w = data(shape.filters_len(), 52);
        let b = data(c_out, 53);
        let (want, mag) =
            conv3d_reference_with_magnitude(&shape, &x, &w, Some(&b), act.clone()).unwrap();
        let t = plan.tiling();
        let one_pass = plan.clone().with_tiling(Tiling { k_chunk: c_in, ..t });
        let whole = run_plan(&one_pass, &x, &w, Some(&b), 1);
        assert_close(&shape, &whole, &want, &mag, "one pass");
        for (tile_cols, k_chunk) in [(t.tile_cols, t.k_chunk), (97, 8), (250, 4), (48, 16)] {
            let passes = plan.clone().with_tiling(Tiling {
                tile_cols,
                k_chunk,
                ..t
            });
            for threads in [1, 3] {
                let got = run_plan(&passes, &x, &w, Some(&b), threads);
                let what =
                    format!("{shape:?} tile_cols {tile_cols} k_chunk {k_chunk} threads {threads}");
                assert_close(&shape, &got, &want, &mag, &what);
                assert!(bit_identical(&got, &whole), "{what}: not the one-pass bits");
            }
        }
    }
}

/// Dilated convolutions by the sub-lattice split (`Strategy::Sublattice`: the input's
/// residue classes as a batch of an undilated convolution): against the reference through
/// every entry point (run_into, packed filters, run_into_with_stats, lent and owned slabs),
/// same bits at 1 and 3 threads, NaN-prefilled outputs and dirty slab buffers, on the
/// portable GEMM too. Shapes: a 3×3×3 one whose sub-lattices take Winograd (so the split is
/// the default), an anisotropic one with an undilated axis and dilation 3, a 5×5×5 one.
#[test]
fn sublattice_split_matches_the_reference_through_every_entry_point() {
    let cases = [
        ([1, 32, 16, 16, 16], [32, 32, 3, 3, 3], [2, 2, 2], [2, 2, 2]),
        ([2, 3, 9, 8, 6], [5, 3, 3, 2, 3], [3, 0, 2], [3, 1, 2]),
        ([1, 4, 8, 8, 8], [6, 4, 5, 5, 5], [4, 4, 4], [2, 2, 2]),
    ];
    for (ci, (input, filters, padding, dilation)) in cases.into_iter().enumerate() {
        let params = Conv3dParams {
            stride: [1; 3],
            padding,
            dilation,
        };
        let shape = Conv3dShape::new(input, filters, params).unwrap();
        let act = Activation::LeakyRelu(0.2);
        let default = Conv3dPlan::new(shape, act.clone());
        if ci == 0 && default.gemm_impl().is_microkernel() {
            assert_eq!(default.strategy(), KernelStrategy::Sublattice);
        }
        let x = data(shape.input_len(), 61);
        let w = data(shape.filters_len(), 62);
        let b = data(shape.c_out(), 63);
        let (want, mag) =
            conv3d_reference_with_magnitude(&shape, &x, &w, Some(&b), act.clone()).unwrap();
        for gemm in [default.gemm_impl(), GemmImpl::Portable] {
            let plan = default
                .clone()
                .with_gemm(gemm)
                .and_then(|p| p.with_strategy(KernelStrategy::Sublattice))
                .unwrap()
                .with_min_flops_per_thread(0.0);
            assert_eq!(plan.strategy(), KernelStrategy::Sublattice);
            let what = format!("{shape:?} {gemm:?}");
            let one = run_plan(&plan, &x, &w, Some(&b), 1);
            assert_close(&shape, &one, &want, &mag, &what);
            assert!(
                bit_identical(&run_plan(&plan, &x, &w, Some(&b), 3), &one),
                "{what}: 3 threads"
            );
            // Packed filters.
            let packed = plan.pack_filters(&w).unwrap();
            let mut out = vec![f32::NAN; shape.output_len()];
            plan.run_into(&x, &packed, Some(&b), &mut out, 2, None)
                .unwrap();
            assert!(bit_identical(&out, &one), "{what}: packed filters");
            // Statistics: the same output, each (item, channel)'s moments of it.
            let mut out = vec![f32::NAN; shape.output_len()];
            let stats = plan
                .run_into_with_stats(&x, &w, Some(&b), &mut out, 2, None)
                .unwrap();
            assert!(bit_identical(&out, &one), "{what}: output with statistics");
            let sp = shape.out_voxels();
            assert_eq!(stats.len(), shape.batch() * shape.c_out());
            for (k, ch) in out.chunks(sp).enumerate() {
                let m = ch.iter().map(|&v| f64::from(v)).sum::<f64>() / sp as f64;
                let var = ch.iter().map(|&v| (f64::from(v) - m).powi(2)).sum::<f64>() / sp as f64;
                let scale = ch.iter().fold(0f64, |a, &v| a.max(f64::from(v).abs()));
                assert!(
                    (stats[k].0 - m).abs() <= 1e-6 * scale + 1e-12,
                    "{what}: mean {k}"
                );
                assert!(
                    (stats[k].1 - var).abs() <= 1e-5 * scale * scale + 1e-12,
                    "{what}: variance {k}"
                );
            }
            // Lent and owned slabs.
            for threads in [1, 3] {
                let mut rebuilt = Rebuild::new(&shape);
                plan.run_slabs(&x, &w, Some(&b), threads, None, &mut |s| {
                    rebuilt.add(s.batch, &s.depth, s.data);
                    ControlFlow::Continue(())
                })
                .unwrap();
                rebuilt.check(&one, &format!("{what}: lent slabs, {threads} threads"));
                let mut rebuilt = Rebuild::new(&shape);
                plan.run_slabs_owned(
                    &x,
                    &w,
                    Some(&b),
                    threads,
                    None,
                    &mut |len| vec![f32::NAN; len + 3],
                    &mut |s| {
                        rebuilt.add(s.batch, &s.depth, &s.data);
                        ControlFlow::Continue(())
                    },
                )
                .unwrap();
                rebuilt.check(&one, &format!("{what}: owned slabs, {threads} threads"));
            }
        }
    }
}

/// The split needs stride 1 and, on each dilated axis, padding and input size multiples of
/// the dilation: forcing it elsewhere is an error naming the condition, and such shapes
/// keep their other strategies.
#[test]
fn sublattice_split_refuses_shapes_it_cannot_split() {
    for (input, padding, stride) in [
        ([1, 2, 8, 8, 8], [1, 2, 2], [1, 1, 1]),
        ([1, 2, 8, 8, 9], [2, 2, 2], [1, 1, 1]),
        ([1, 2, 8, 8, 8], [2, 2, 2], [1, 2, 1]),
    ] {
        let params = Conv3dParams {
            stride,
            padding,
            dilation: [2, 2, 2],
        };
        let shape = Conv3dShape::new(input, [3, 2, 3, 3, 3], params).unwrap();
        let plan = Conv3dPlan::new(shape, Activation::None);
        assert_ne!(plan.strategy(), KernelStrategy::Sublattice);
        assert!(!plan.supports(KernelStrategy::Sublattice));
        match plan.with_strategy(KernelStrategy::Sublattice) {
            Err(KernelError::Unsupported { reason, .. }) => {
                assert!(reason.contains("multiples of the dilation"), "{reason}")
            }
            other => panic!("{input:?} {padding:?} {stride:?}: {other:?}"),
        }
    }
    // An undilated shape has nothing to split.
    let shape =
        Conv3dShape::new([1, 2, 8, 8, 8], [3, 2, 3, 3, 3], Conv3dParams::default()).unwrap();
    assert!(!Conv3dPlan::new(shape, Activation::None).supports(KernelStrategy::Sublattice));
}

// ---- cancellation -----------------------------------------------------------------------

#[test]
fn cancel_flag_and_callback_break_stop_the_run() {
    let shape =
        Conv3dShape::new([1, 2, 16, 16, 16], [4, 2, 3, 3, 3], Conv3dParams::default()).unwrap();
    let x = data(shape.input_len(), 1);
    let w = data(shape.filters_len(), 2);
    let plan = Conv3dPlan::new(shape, Activation::None)
        .with_tiling(Tiling {
            tile_cols: 14,
            k_chunk: 54,
            slab_depth: 1,
            chan_block: usize::MAX,
        })
        .with_min_flops_per_thread(0.0);
    let flag = AtomicBool::new(true);
    for threads in [1, 2] {
        let mut out = vec![0.0; shape.output_len()];
        assert_eq!(
            plan.run_into(&x, &w, None, &mut out, threads, Some(&flag)),
            Err(KernelError::Cancelled)
        );
        let mut seen = 0;
        let r = plan.run_slabs(&x, &w, None, threads, None, &mut |_| {
            seen += 1;
            if seen == 3 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        assert_eq!(r, Err(KernelError::Cancelled));
        assert_eq!(seen, 3, "no slab delivered after Break");
    }
}

// ---- errors -----------------------------------------------------------------------------

#[test]
fn every_error_is_typed() {
    let p = Conv3dParams::default();
    let e = |i, f, p| Conv3dShape::new(i, f, p).unwrap_err();
    assert_eq!(
        e(
            [1, 1, 4, 4, 4],
            [1, 1, 3, 3, 3],
            Conv3dParams {
                stride: [1, 0, 1],
                ..p
            }
        ),
        KernelError::ZeroStride { axis: "height" }
    );
    assert_eq!(
        e(
            [1, 1, 4, 4, 4],
            [1, 1, 3, 3, 3],
            Conv3dParams {
                dilation: [1, 1, 0],
                ..p
            }
        ),
        KernelError::ZeroDilation { axis: "width" }
    );
    assert_eq!(
        e([1, 1, 2, 4, 4], [1, 1, 3, 3, 3], p),
        KernelError::KernelTooLarge {
            axis: "depth",
            effective: 3,
            padded: 2
        }
    );
    assert_eq!(
        e(
            [1, 1, 9, 9, 9],
            [1, 1, 3, 3, 3],
            Conv3dParams {
                dilation: [5, 1, 1],
                ..p
            }
        ),
        KernelError::KernelTooLarge {
            axis: "depth",
            effective: 11,
            padded: 9
        }
    );
    assert_eq!(
        e([1, 2, 4, 4, 4], [1, 3, 3, 3, 3], p),
        KernelError::ChannelMismatch {
            input: 2,
            filters: 3
        }
    );
    assert_eq!(
        e([1, 1, 4, 0, 4], [1, 1, 1, 1, 1], p),
        KernelError::EmptyDimension {
            tensor: "input",
            dim: "H"
        }
    );
    assert_eq!(
        e([1, 1, 4, 4, 4], [0, 1, 1, 1, 1], p),
        KernelError::EmptyDimension {
            tensor: "filters",
            dim: "C_out"
        }
    );
    assert!(matches!(
        e([1 << 20, 1, 1 << 20, 1 << 20, 1 << 20], [1, 1, 1, 1, 1], p),
        KernelError::Overflow { .. }
    ));
    assert!(matches!(
        e(
            [1, 1, 4, 4, 4],
            [1, 1, 3, 3, 3],
            Conv3dParams {
                padding: [usize::MAX, 0, 0],
                ..p
            }
        ),
        KernelError::Overflow { .. }
    ));
    assert!(matches!(
        e(
            [1, 1, 4, 4, 4],
            [1, 1, usize::MAX, 1, 1],
            Conv3dParams {
                dilation: [2, 1, 1],
                ..p
            }
        ),
        KernelError::Overflow { .. }
    ));

    let shape = Conv3dShape::new([1, 1, 4, 4, 4], [2, 1, 3, 3, 3], p).unwrap();
    let plan = Conv3dPlan::new(shape, Activation::None);
    let x = vec![0.0; 64];
    let w = vec![0.0; 54];
    let mut out = vec![0.0; 16];
    assert_eq!(
        plan.run_into(&x[..63], &w, None, &mut out, 1, None),
        Err(KernelError::BufferLength {
            what: "input",
            expected: 64,
            got: 63
        })
    );
    assert_eq!(
        plan.run_into(&x, &w[..1], None, &mut out, 1, None),
        Err(KernelError::BufferLength {
            what: "filters",
            expected: 54,
            got: 1
        })
    );
    assert_eq!(
        plan.run_into(&x, &w, Some(&[1.0]), &mut out, 1, None),
        Err(KernelError::BufferLength {
            what: "bias",
            expected: 2,
            got: 1
        })
    );
    assert_eq!(
        plan.run_into(&x, &w, None, &mut out[..3], 1, None),
        Err(KernelError::BufferLength {
            what: "output",
            expected: 16,
            got: 3
        })
    );
    assert_eq!(
        plan.run_into(&x, &w, None, &mut out, 0, None),
        Err(KernelError::ZeroThreads)
    );
    // Messages name the field and both values.
    let msg = KernelError::KernelTooLarge {
        axis: "depth",
        effective: 3,
        padded: 2,
    }
    .to_string();
    assert!(
        msg.contains("depth") && msg.contains('3') && msg.contains('2'),
        "{msg}"
    );
}

#[test]
fn tiny_problems_use_fewer_threads_with_identical_results() {
    let shape =
        Conv3dShape::new([1, 2, 6, 20, 20], [4, 2, 3, 3, 3], Conv3dParams::default()).unwrap();
    let plan = Conv3dPlan::new(shape, Activation::None);
    assert_eq!(plan.useful_threads(), 1, "{} FLOPs", shape.flops());
    let all = plan.clone().with_min_flops_per_thread(0.0);
    assert!(all.useful_threads() > 1);
    let x = data(shape.input_len(), 1);
    let w = data(shape.filters_len(), 2);
    let mut capped = vec![f32::NAN; shape.output_len()];
    plan.run_into(&x, &w, None, &mut capped, 8, None).unwrap();
    let forced = run_plan(&all, &x, &w, None, 8);
    assert!(capped
        .iter()
        .zip(&forced)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
}

#[test]
fn activation_parsing() {
    assert_eq!("relu".parse::<Activation>(), Ok(Activation::Relu));
    assert_eq!(
        "leaky_relu:0.2".parse::<Activation>(),
        Ok(Activation::LeakyRelu(0.2))
    );
    assert_eq!(
        "leaky_relu".parse::<Activation>(),
        Ok(Activation::LeakyRelu(0.01))
    );
    assert!("leaky_relu:nan".parse::<Activation>().is_err());
    assert!("tanh".parse::<Activation>().unwrap_err().contains("tanh"));
}

#[test]
fn workspace_does_not_grow_with_the_volume() {
    let plan_for = |d: usize| {
        let s = Conv3dShape::new(
            [1, 4, d, d, d],
            [16, 4, 3, 3, 3],
            Conv3dParams {
                padding: [1; 3],
                ..Conv3dParams::default()
            },
        )
        .unwrap();
        Conv3dPlan::new(s, Activation::None)
            .with_strategy(KernelStrategy::Im2colGemm)
            .unwrap()
    };
    let small = plan_for(64).workspace_bytes(2);
    let large = plan_for(512).workspace_bytes(2);
    assert!(small > 0);
    // The direct strategy's workspace is one tile's input box per thread: a few planes of
    // a tile's rows, the same for any depth and far below the volume.
    let direct_for = |d: usize| plan_for(d).with_strategy(KernelStrategy::Direct);
    match (direct_for(64), direct_for(512)) {
        (Ok(small), Ok(large)) => {
            assert_eq!(small.strategy(), KernelStrategy::Direct);
            let bytes = small.workspace_bytes(2);
            assert!(bytes > 0);
            assert!(bytes <= 2 * 256 * 1024, "{bytes} bytes for 2 threads");
            assert!(large.workspace_bytes(2) <= 2 * 1024 * 1024);
        }
        (Err(e), _) | (_, Err(e)) => assert!(!voxconv_kernel::avx512::available(), "{e}"),
    }
    assert_eq!(small, large, "im2col workspace is per tile, not per volume");
    assert!(large <= 2 * 1024 * 1024);
}

#[test]
fn stage_times_are_accounted_per_strategy() {
    let shape = Conv3dShape::new(
        [1, 16, 12, 14, 16],
        [16, 16, 3, 3, 3],
        Conv3dParams {
            padding: [1; 3],
            ..Conv3dParams::default()
        },
    )
    .unwrap();
    let x = data(shape.input_len(), 1);
    let w = data(shape.filters_len(), 2);
    assert_eq!(
        Conv3dPlan::new(shape, Activation::Relu).stage_times(),
        Default::default(),
        "a fresh plan has spent no time"
    );
    for plan in variants(shape, Activation::Relu) {
        // Clones share the clock (a plan and the copy handed to a worker): compare deltas.
        let before = plan.stage_times();
        run_plan(&plan, &x, &w, None, 2);
        let after = plan.stage_times();
        let what = plan.strategy();
        assert!(
            after.gemm > before.gemm,
            "{what:?}: {before:?} -> {after:?}"
        );
        assert!(
            after.epilogue > before.epilogue,
            "{what:?}: {before:?} -> {after:?}"
        );
        if matches!(what, KernelStrategy::Im2colGemm | KernelStrategy::Winograd) {
            assert!(
                after.im2col > before.im2col,
                "{what:?}: {before:?} -> {after:?}"
            );
        }
    }
}

/// A shape with filter `k` (C_in = C_out = 4 on a 9³ volume) and the given parameters.
fn shape_with(k: [usize; 3], params: Conv3dParams) -> Conv3dShape {
    Conv3dShape::new([1, 4, 9, 9, 9], [4, 4, k[0], k[1], k[2]], params).unwrap()
}

/// `Err(Unsupported)` whose message names `what` and contains `because`.
fn assert_unsupported(r: Result<Conv3dPlan, KernelError>, what: &str, because: &str) {
    match r {
        Err(e @ KernelError::Unsupported { .. }) => {
            let msg = e.to_string();
            assert!(msg.starts_with(&format!("cannot use {what}: ")), "{msg}");
            assert!(msg.contains(because), "{msg}");
        }
        Err(e) => panic!("expected Unsupported for {what}, got {e:?}"),
        Ok(p) => panic!(
            "forcing {what} must fail, got {:?}/{:?}",
            p.strategy(),
            p.gemm_impl()
        ),
    }
}

#[test]
fn forcing_a_strategy_the_shape_cannot_run_is_an_error() {
    let plain = Conv3dParams::default();
    let strided = Conv3dParams {
        stride: [2, 2, 2],
        ..plain
    };
    let dilated = Conv3dParams {
        dilation: [1, 2, 1],
        ..plain
    };
    for (k, params) in [
        ([1, 1, 1], plain),
        ([5, 5, 5], plain),
        ([3, 3, 3], strided),
        ([3, 3, 3], dilated),
    ] {
        let plan = Conv3dPlan::new(shape_with(k, params), Activation::None);
        assert!(!plan.supports(KernelStrategy::Winograd));
        assert_unsupported(
            plan.with_strategy(KernelStrategy::Winograd),
            "strategy winograd-f2x3",
            "needs a 3x3x3 filter, stride 1 and dilation 1",
        );
    }
    let padded = Conv3dParams {
        padding: [0, 0, 1],
        ..plain
    };
    for (k, params) in [
        ([3, 3, 3], plain),
        ([1, 1, 1], strided),
        ([1, 1, 1], padded),
    ] {
        let plan = Conv3dPlan::new(shape_with(k, params), Activation::None);
        assert!(!plan.supports(KernelStrategy::Pointwise));
        assert_unsupported(
            plan.with_strategy(KernelStrategy::Pointwise),
            "strategy pointwise-1x1x1",
            "needs a 1x1x1 filter with stride 1 and no padding, or (with our microkernel) a \
             kx1x1 filter with stride 1, padding and dilation only in depth",
        );
    }
    // The direct microkernel takes width stride 1 or 2 only, whatever the CPU.
    let wide_stride = Conv3dParams {
        stride: [1, 1, 3],
        ..plain
    };
    assert_unsupported(
        Conv3dPlan::new(shape_with([3, 3, 3], wide_stride), Activation::None)
            .with_strategy(KernelStrategy::Direct),
        "strategy direct-avx512",
        "needs width stride 1 or 2 (this shape: 3)",
    );
}

#[test]
fn forcing_a_supported_strategy_is_honoured() {
    let pointwise = shape_with([1, 1, 1], Conv3dParams::default());
    let cube = shape_with([3, 3, 3], Conv3dParams::default());
    for shape in [pointwise, cube] {
        let plan = Conv3dPlan::new(shape, Activation::None)
            .with_strategy(KernelStrategy::Im2colGemm)
            .unwrap();
        assert_eq!(plan.strategy(), KernelStrategy::Im2colGemm);
    }
    let plan = Conv3dPlan::new(pointwise, Activation::None)
        .with_strategy(KernelStrategy::Im2colGemm)
        .and_then(|p| p.with_strategy(KernelStrategy::Pointwise))
        .unwrap();
    assert_eq!(plan.strategy(), KernelStrategy::Pointwise);
    // Direct needs the AVX-512 GEMM, Winograd our microkernel on AVX-512 or AVX2: there
    // when the CPU has it, else an error saying so.
    let r = Conv3dPlan::new(cube, Activation::None).with_strategy(KernelStrategy::Direct);
    if voxconv_kernel::avx512::available() {
        let plan = r.unwrap();
        assert_eq!(plan.strategy(), KernelStrategy::Direct);
        assert_eq!(plan.gemm_impl(), GemmImpl::Avx512);
    } else {
        assert_unsupported(
            r,
            "strategy direct-avx512",
            "needs AVX-512 (avx512f), which this CPU lacks",
        );
    }
    let r = Conv3dPlan::new(cube, Activation::None).with_strategy(KernelStrategy::Winograd);
    match GemmImpl::best_available() {
        GemmImpl::Portable => assert_unsupported(
            r,
            "strategy winograd-f2x3",
            "needs AVX-512 or AVX2 + FMA, which this CPU lacks",
        ),
        best => {
            let plan = r.unwrap();
            assert_eq!(plan.strategy(), KernelStrategy::Winograd);
            assert_eq!(plan.gemm_impl(), best);
        }
    }
}

#[test]
fn the_avx512_gemm_is_an_error_without_avx512() {
    let cube = shape_with([3, 3, 3], Conv3dParams::default());
    let r = Conv3dPlan::new(cube, Activation::None).with_gemm(GemmImpl::Avx512);
    if voxconv_kernel::avx512::available() {
        assert_eq!(r.unwrap().gemm_impl(), GemmImpl::Avx512);
    } else {
        assert_unsupported(
            r,
            "GEMM avx512",
            "needs AVX-512 (avx512f), which this CPU lacks",
        );
    }
    // The portable GEMM runs anywhere; it takes a plan off the strategies that need the
    // AVX-512 microkernel, and forcing one of those afterwards is an error.
    let portable = Conv3dPlan::new(cube, Activation::None)
        .with_gemm(GemmImpl::Portable)
        .unwrap();
    assert_eq!(portable.gemm_impl(), GemmImpl::Portable);
    assert_eq!(portable.strategy(), KernelStrategy::Im2colGemm);
    let best = GemmImpl::best_available();
    for (strategy, name, because) in [
        (
            KernelStrategy::Winograd,
            "strategy winograd-f2x3",
            match best {
                GemmImpl::Portable => "needs AVX-512 or AVX2 + FMA, which this CPU lacks".into(),
                g => format!(
                    "needs our microkernel ({}), but this plan uses the portable GEMM",
                    g.name()
                ),
            },
        ),
        (
            KernelStrategy::Direct,
            "strategy direct-avx512",
            if voxconv_kernel::avx512::available() {
                "needs the AVX-512 GEMM, but this plan uses gemm-crate".into()
            } else {
                "needs AVX-512 (avx512f), which this CPU lacks".to_string()
            },
        ),
    ] {
        assert!(!portable.supports(strategy));
        assert_unsupported(portable.clone().with_strategy(strategy), name, &because);
    }
    if best.is_microkernel() {
        let wino = Conv3dPlan::new(cube, Activation::None)
            .with_strategy(KernelStrategy::Winograd)
            .unwrap()
            .with_gemm(GemmImpl::Portable)
            .unwrap();
        assert_eq!(wino.strategy(), KernelStrategy::Im2colGemm);
        assert_eq!(
            wino.tiling(),
            Tiling::for_strategy(&cube, KernelStrategy::Im2colGemm)
        );
    }
}

#[test]
fn winograd_is_not_the_default_where_most_of_its_lanes_would_be_empty() {
    use voxconv_kernel::winograd::lane_use;
    let conv = |c: usize, d: usize| {
        let params = Conv3dParams {
            padding: [1; 3],
            ..Conv3dParams::default()
        };
        Conv3dShape::new([1, c, d, d, d], [c, c, 3, 3, 3], params).unwrap()
    };
    // Blocks fill lane groups across block rows and plane pairs: an 8³ output is 64 blocks,
    // four full groups; 20³ is 1000 blocks in 63 groups; 9³ leaves half-empty blocks (9 of
    // 10 on each axis) and 125 blocks in 8 groups; 3³ is 8 blocks in one group of 16.
    assert_eq!(lane_use(&conv(32, 8)), 1.0);
    assert_eq!(lane_use(&conv(32, 64)), 1.0);
    assert!((lane_use(&conv(32, 20)) - 1000.0 / 1008.0).abs() < 1e-12);
    let odd = 9.0 / 10.0;
    assert!((lane_use(&conv(32, 9)) - odd * odd * odd * 125.0 / 128.0).abs() < 1e-12);
    assert!((lane_use(&conv(32, 3)) - 0.75f64.powi(3) * 0.5).abs() < 1e-12);
    if GemmImpl::best_available().is_microkernel() {
        let tiny = Conv3dPlan::new(conv(64, 3), Activation::None);
        assert_ne!(tiny.strategy(), KernelStrategy::Winograd);
        let deep = Conv3dPlan::new(conv(64, 8), Activation::None);
        assert_eq!(deep.strategy(), KernelStrategy::Winograd);
        let wide = Conv3dPlan::new(conv(32, 64), Activation::None);
        assert_eq!(wide.strategy(), KernelStrategy::Winograd);
    }
}

#[test]
fn winograd_lane_groups_hold_every_output_block_once() {
    use voxconv_kernel::winograd::{lane_groups, LANES};
    for (pairs, oh, ow) in [
        (0..1, 1, 1),
        (0..4, 8, 8),
        (1..3, 7, 9),
        (0..2, 5, 40),
        (2..5, 3, 66),
    ] {
        let mut groups = Vec::new();
        lane_groups(pairs.clone(), oh, ow, &mut groups);
        let mut seen = std::collections::BTreeSet::new();
        for (gi, g) in groups.iter().enumerate() {
            let mut lane = 0;
            for r in g.runs() {
                assert_eq!(r.lane, lane, "runs fill lanes in order");
                assert!(r.len > 0 && r.tx0 + r.len <= ow.div_ceil(2));
                for tx in r.tx0..r.tx0 + r.len {
                    assert!(seen.insert((r.z0, r.ty, tx)), "block twice");
                }
                lane += r.len;
            }
            assert!(lane <= LANES);
            if gi + 1 < groups.len() {
                assert_eq!(lane, LANES, "only the last group is partly empty");
            }
        }
        let want = pairs.len() * oh.div_ceil(2) * ow.div_ceil(2);
        assert_eq!(seen.len(), want, "{pairs:?} {oh}x{ow}");
        assert!(seen
            .iter()
            .all(|&(z0, ty, _)| pairs.contains(&(z0 / 2)) && z0 % 2 == 0 && ty < oh.div_ceil(2)));
    }
}

// ---- statistics gathered in the epilogue ----

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    /// `run_into_with_stats` writes the same output as `run_into` and returns each (item,
    /// channel)'s mean and biased variance of it (checked against an f64 pass over the
    /// output), for every strategy, random tilings with channel blocks, and 1–3 threads with
    /// the same bits.
    #[test]
    fn statistics_from_the_epilogue_match_the_output(
        (shape, act, with_bias) in problem(),
        tile_cols in 1usize..300,
        chan_block in 1usize..20,
        seed in 0u64..1000,
    ) {
        let x = data(shape.input_len(), seed);
        let w = data(shape.filters_len(), seed + 1);
        let b = data(shape.c_out(), seed + 2);
        let bias = with_bias.then_some(b.as_slice());
        let [n, c, od, oh, ow] = shape.output;
        let sp = od * oh * ow;
        for plan in variants(shape, act.clone()) {
            let t = plan.tiling();
            for plan in [plan.clone(), plan.with_tiling(Tiling { tile_cols, chan_block, ..t })] {
                let plan = plan.with_min_flops_per_thread(0.0);
                // The first thread count's output and statistics.
                type Outcome = (Vec<f32>, Vec<(f64, f64)>);
                let mut first: Option<Outcome> = None;
                for threads in 1..=3 {
                    let mut out = vec![f32::NAN; shape.output_len()];
                    let stats = plan
                        .run_into_with_stats(&x, &w, bias, &mut out, threads, None)
                        .unwrap();
                    prop_assert_eq!(stats.len(), n * c);
                    let plain = run_plan(&plan, &x, &w, bias, threads);
                    prop_assert!(out.iter().zip(&plain).all(|(a, b)| a.to_bits() == b.to_bits()));
                    for (k, ch) in out.chunks(sp).enumerate() {
                        let m = ch.iter().map(|&v| f64::from(v)).sum::<f64>() / sp as f64;
                        let var = ch.iter().map(|&v| (f64::from(v) - m).powi(2)).sum::<f64>()
                            / sp as f64;
                        let scale = ch.iter().fold(0f64, |a, &v| a.max(f64::from(v).abs()));
                        let (gm, gv) = stats[k];
                        prop_assert!((gm - m).abs() <= 1e-6 * scale + 1e-12,
                            "{} mean {} vs {}", plan.strategy().name(), gm, m);
                        prop_assert!((gv - var).abs() <= 1e-5 * scale * scale + 1e-12,
                            "{} var {} vs {}", plan.strategy().name(), gv, var);
                    }
                    match &first {
                        None => first = Some((out, stats)),
                        Some((o, s)) => {
                            prop_assert!(o.iter().zip(&out).all(|(a, b)| a.to_bits() == b.to_bits()));
                            prop_assert!(s.iter().zip(&stats).all(|(a, b)| {
                                a.0.to_bits() == b.0.to_bits() && a.1.to_bits() == b.1.to_bits()
                            }), "{} threads: statistics differ", threads);
                        }
                    }
                }
            }
        }
    }
}

/// A channel whose values sit far from zero (a CT-like offset of 1000 with unit spread):
/// the per-tile shifted moments keep the variance exact where E[x²] − E[x]² would cancel.
#[test]
fn epilogue_statistics_survive_a_large_offset() {
    let shape =
        Conv3dShape::new([1, 1, 20, 24, 40], [2, 1, 1, 1, 1], Conv3dParams::default()).unwrap();
    let x: Vec<f32> = data(shape.input_len(), 5)
        .iter()
        .map(|v| 1000.0 + v)
        .collect();
    let w = vec![1.0f32, -1.0];
    let plan = Conv3dPlan::new(shape, Activation::None).with_tiling(Tiling {
        tile_cols: 100,
        ..Conv3dPlan::new(shape, Activation::None).tiling()
    });
    let mut out = vec![0f32; shape.output_len()];
    let stats = plan
        .run_into_with_stats(&x, &w, None, &mut out, 2, None)
        .unwrap();
    for (k, ch) in out.chunks(shape.output_len() / 2).enumerate() {
        let n = ch.len() as f64;
        let m = ch.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = ch.iter().map(|&v| (f64::from(v) - m).powi(2)).sum::<f64>() / n;
        assert!(
            (stats[k].0 - m).abs() < 1e-9 * m.abs(),
            "{k}: {:?} vs {m}",
            stats[k]
        );
        assert!(
            (stats[k].1 - var).abs() < 1e-4 * var,
            "{k}: {} vs {var}",
            stats[k].1
        );
    }
}

/// The GEMM microkernel computes only the vectors that hold voxels (1, 2 or 3 of 16): every
/// width 1..=48, with and without running sums and bias, every channel count, against a
/// scalar sum in the same order (so bit for bit), and nothing written past the block's
/// voxels or channels.
#[test]
fn gemm_blocks_of_every_width_match_a_scalar_sum_and_stay_in_bounds() {
    if !voxconv_kernel::avx512::available() {
        return;
    }
    use voxconv_kernel::avx512::{block_48x8, NC};
    let (kc, lda, ld) = (19, 50, 56);
    let a = data(kc * lda, 11);
    let b = data(kc * NC, 12);
    let src = data(NC * ld, 13);
    let bias = data(NC, 14);
    for nvox in 1..=48 {
        for nch in [1, 5, 8] {
            for (with_src, with_bias) in [(false, false), (true, true), (false, true)] {
                let mut dst = vec![f32::NAN; NC * ld];
                // SAFETY: a holds kc rows of lda >= nvox values, b kc·NC, src and dst NC rows
                // of ld >= nvox values, bias NC values; AVX-512F checked above.
                unsafe {
                    block_48x8(
                        kc,
                        a.as_ptr(),
                        lda,
                        b.as_ptr(),
                        if with_src {
                            src.as_ptr()
                        } else {
                            std::ptr::null()
                        },
                        ld,
                        dst.as_mut_ptr(),
                        ld,
                        nch,
                        nvox,
                        if with_bias {
                            bias.as_ptr()
                        } else {
                            std::ptr::null()
                        },
                    )
                };
                for j in 0..NC {
                    for i in 0..ld {
                        let got = dst[j * ld + i];
                        if j >= nch || i >= nvox {
                            assert!(got.is_nan(), "nvox {nvox} nch {nch}: wrote ({j}, {i})");
                            continue;
                        }
                        let mut want = if with_src { src[j * ld + i] } else { 0.0 };
                        for r in 0..kc {
                            want = a[r * lda + i].mul_add(b[r * NC + j], want);
                        }
                        if with_bias {
                            want += bias[j];
                        }
                        assert_eq!(
                            got.to_bits(),
                            want.to_bits(),
                            "nvox {nvox} nch {nch} ({j}, {i})"
                        );
                    }
                }
            }
        }
    }
}

/// Width stride 2 im2col's AVX-512 gather: every length 0..=40 from every start, the even
/// source values and nothing past the destination.
#[test]
fn stride2_gather_takes_every_other_value() {
    if !voxconv_kernel::avx512::available() {
        return;
    }
    let src = data(100, 21);
    for n in 0..=40 {
        for start in [0, 1, 3] {
            let mut dst = vec![f32::NAN; n + 5];
            // SAFETY: AVX-512F checked above.
            unsafe { voxconv_kernel::avx512::copy_stride2(&mut dst[..n], &src[start..]) };
            for (j, &v) in dst.iter().enumerate() {
                if j < n {
                    assert_eq!(
                        v.to_bits(),
                        src[start + 2 * j].to_bits(),
                        "n {n} start {start} j {j}"
                    );
                } else {
                    assert!(v.is_nan(), "n {n}: wrote past the end at {j}");
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(Config {
        cases: 64,
        rng_seed: RngSeed::Fixed(0x6b311),
        ..Config::default()
    })]

    /// k×1×1 filters (and 1×1×1 ones with depth padding) by pointwise passes over
    /// depth-shifted planes (the default strategy from 8 input channels, forced below),
    /// against the reference: depth padding and dilation, odd planes, batches, tiles that
    /// straddle planes, chunks shorter than a tap, one and several channel groups,
    /// NaN-prefilled outputs, 1–3 threads, packed and raw filters, bit-identical across
    /// thread counts.
    #[test]
    fn depth_passes_match_the_reference(
        n in 1usize..3,
        c_in in 1usize..20,
        c_out in 1usize..20,
        kd in 1usize..6,
        dd in 1usize..3,
        pd in 0usize..4,
        [d, h, w] in [3usize..12, 1usize..9, 1usize..11],
        tile_cols in 1usize..90,
        k_chunk in 1usize..30,
        threads in 1usize..4,
        seed in 0u64..1000,
    ) {
        let params = Conv3dParams { padding: [pd, 0, 0], dilation: [dd, 1, 1], ..Conv3dParams::default() };
        let Ok(shape) = Conv3dShape::new([n, c_in, d, h, w], [c_out, c_in, kd, 1, 1], params) else {
            return Ok(());
        };
        prop_assume!(shape.output_len() > 0);
        let Some(plan) = Conv3dPlan::new(shape, Activation::Relu)
            .with_gemm(GemmImpl::best_available())
            .ok()
            .filter(|p| p.gemm_impl().is_microkernel())
        else {
            return Ok(());
        };
        if c_in >= 8 {
            prop_assert_eq!(plan.strategy(), KernelStrategy::Pointwise);
        }
        let plan = plan.with_strategy(KernelStrategy::Pointwise).unwrap();
        let x = data(shape.input_len(), seed);
        let wts = data(shape.filters_len(), seed + 1);
        let b = data(c_out, seed + 2);
        let (want, mag) =
            conv3d_reference_with_magnitude(&shape, &x, &wts, Some(&b), Activation::Relu).unwrap();
        let one = run_plan(&plan, &x, &wts, Some(&b), 1);
        assert_close(&shape, &one, &want, &mag, "depth passes, default tiling");
        let many = run_plan(&plan, &x, &wts, Some(&b), threads);
        prop_assert!(one.iter().zip(&many).all(|(a, b)| a.to_bits() == b.to_bits()));
        let packed = plan.pack_filters(&wts).unwrap();
        let mut out = vec![f32::NAN; shape.output_len()];
        plan.run_into(&x, &packed, Some(&b), &mut out, threads, None).unwrap();
        prop_assert!(one.iter().zip(&out).all(|(a, b)| a.to_bits() == b.to_bits()));
        let t = plan.tiling();
        let tiled = plan.clone().with_tiling(Tiling { tile_cols, k_chunk, ..t });
        let what = format!("depth passes, {:?}", tiled.tiling());
        assert_close(&shape, &run_plan(&tiled, &x, &wts, Some(&b), threads), &want, &mag, &what);
    }
}
