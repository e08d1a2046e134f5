//! The activation fused into a convolution's epilogue, after the bias.
//!
//! [`Activation`] is a layer's activation; it may carry per-channel data (PReLU's slopes).
//! [`ChannelAct`] is what one output channel applies: a `Copy` value the epilogue resolves
//! once per channel row (`Activation::channel`), so the inner loops stay branch-free.

use std::str::FromStr;
use std::sync::Arc;

use crate::KernelError;

/// The activation fused after bias.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Activation {
    #[default]
    None,
    Relu,
    /// `x` for `x >= 0`, else `alpha·x` (PyTorch's LeakyReLU).
    LeakyRelu(f32),
    Sigmoid,
    /// `x` for `x > 0`, else `alpha·(eˣ − 1)` (PyTorch's ELU, ONNX `Elu`).
    Elu(f32),
    /// `x` for `x >= 0`, else `slope[c]·x` for output channel `c` (PyTorch's PReLU, ONNX
    /// `PRelu` with a per-channel slope). One slope is shared by every channel.
    PRelu(Arc<[f32]>),
}

/// The activation of one output channel.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum ChannelAct {
    #[default]
    None,
    Relu,
    LeakyRelu(f32),
    Sigmoid,
    Elu(f32),
}

impl Activation {
    /// True for [`Activation::None`].
    pub fn is_none(&self) -> bool {
        matches!(self, Activation::None)
    }

    /// What channel `co` applies (PReLU's slope for that channel).
    #[inline]
    pub fn channel(&self, co: usize) -> ChannelAct {
        match self {
            Activation::None => ChannelAct::None,
            Activation::Relu => ChannelAct::Relu,
            Activation::LeakyRelu(a) => ChannelAct::LeakyRelu(*a),
            Activation::Sigmoid => ChannelAct::Sigmoid,
            Activation::Elu(a) => ChannelAct::Elu(*a),
            Activation::PRelu(s) => {
                // `check` guarantees one slope or one per channel; never index past them.
                let a = if s.len() == 1 {
                    s[0]
                } else {
                    s.get(co).copied().unwrap_or(0.0)
                };
                ChannelAct::LeakyRelu(a)
            }
        }
    }

    /// Checks the activation fits a layer of `c_out` output channels: PReLU needs one slope
    /// or one per channel, and every parameter must be finite.
    pub fn check(&self, c_out: usize) -> Result<(), KernelError> {
        let bad = |reason: String| {
            Err(KernelError::Invalid {
                what: "activation".into(),
                reason,
            })
        };
        match self {
            Activation::LeakyRelu(a) | Activation::Elu(a) if !a.is_finite() => {
                bad(format!("the activation's alpha must be finite, got {a}"))
            }
            Activation::PRelu(s) if s.len() != 1 && s.len() != c_out => bad(format!(
                "PReLU needs 1 slope or one per output channel ({c_out}), got {}",
                s.len()
            )),
            Activation::PRelu(s) if s.iter().any(|v| !v.is_finite()) => {
                bad("PReLU slopes must be finite".into())
            }
            _ => Ok(()),
        }
    }

    /// A short name: `none`, `relu`, `leaky_relu:A`, `sigmoid`, `elu:A` or `prelu[N]`.
    pub fn name(&self) -> String {
        match self {
            Activation::None => "none".into(),
            Activation::Relu => "relu".into(),
            Activation::LeakyRelu(a) => format!("leaky_relu:{a}"),
            Activation::Sigmoid => "sigmoid".into(),
            Activation::Elu(a) => format!("elu:{a}"),
            Activation::PRelu(s) => format!("prelu[{}]", s.len()),
        }
    }
}

impl ChannelAct {
    #[inline]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            ChannelAct::None => x,
            ChannelAct::Relu => x.max(0.0),
            ChannelAct::LeakyRelu(a) => {
                if x >= 0.0 {
                    x
                } else {
                    a * x
                }
            }
            ChannelAct::Sigmoid => sigmoid(x),
            ChannelAct::Elu(a) => elu(x, a),
        }
    }

    /// The same function in f64 (libm's `exp`), for the reference.
    pub fn apply_f64(self, x: f64) -> f64 {
        match self {
            ChannelAct::None => x,
            ChannelAct::Relu => x.max(0.0),
            ChannelAct::LeakyRelu(a) => {
                if x >= 0.0 {
                    x
                } else {
                    f64::from(a) * x
                }
            }
            ChannelAct::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            ChannelAct::Elu(a) => {
                if x > 0.0 {
                    x
                } else {
                    f64::from(a) * x.exp_m1()
                }
            }
        }
    }

    /// Adds `bias` to every value of `row`, then applies the activation, in one pass.
    #[inline]
    pub fn bias_apply(self, row: &mut [f32], bias: f32) {
        self.map_apply(row, |x| x + bias);
    }

    /// `v ← act(f(v))` for every value of `row`, in one pass: each variant its own
    /// branch-free loop, which the compiler vectorises (a `match` per value it does not),
    /// compiled for AVX-512 where the CPU has it (ELU's and sigmoid's `eˣ` polynomial:
    /// ~3.5× faster than the baseline build's SSE2 loop). The same operations in the same
    /// order either way (no FMA contraction), so the same bits.
    #[inline]
    pub fn map_apply(self, row: &mut [f32], f: impl Fn(f32) -> f32) {
        #[cfg(target_arch = "x86_64")]
        if crate::avx512::available() {
            // SAFETY: AVX-512F was detected just above.
            unsafe { self.map_apply_avx512(row, f) };
            return;
        }
        self.map_apply_portable(row, f)
    }

    /// [`map_apply`](Self::map_apply) compiled for AVX-512, for callers that already run
    /// under it (no feature check per row).
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn map_apply_avx512(self, row: &mut [f32], f: impl Fn(f32) -> f32) {
        self.map_apply_portable(row, f)
    }

    #[inline(always)]
    fn map_apply_portable(self, row: &mut [f32], f: impl Fn(f32) -> f32) {
        match self {
            ChannelAct::None => row.iter_mut().for_each(|v| *v = f(*v)),
            ChannelAct::Relu => row.iter_mut().for_each(|v| *v = f(*v).max(0.0)),
            ChannelAct::LeakyRelu(a) => row.iter_mut().for_each(|v| {
                let x = f(*v);
                *v = if x >= 0.0 { x } else { a * x };
            }),
            ChannelAct::Sigmoid => row.iter_mut().for_each(|v| *v = sigmoid(f(*v))),
            ChannelAct::Elu(a) => row.iter_mut().for_each(|v| *v = elu(f(*v), a)),
        }
    }
}

impl From<ChannelAct> for Activation {
    fn from(c: ChannelAct) -> Self {
        match c {
            ChannelAct::None => Activation::None,
            ChannelAct::Relu => Activation::Relu,
            ChannelAct::LeakyRelu(a) => Activation::LeakyRelu(a),
            ChannelAct::Sigmoid => Activation::Sigmoid,
            ChannelAct::Elu(a) => Activation::Elu(a),
        }
    }
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-x))
}

#[inline(always)]
fn elu(x: f32, a: f32) -> f32 {
    // Both sides computed and selected: no branch, so the loop vectorises.
    let neg = a * (exp_f32(x) - 1.0);
    if x > 0.0 {
        x
    } else {
        neg
    }
}

/// `eˣ` in f32 without a libm call, so loops over it vectorise: Cody–Waite range reduction
/// `x = n·ln2 + r` (`|r| ≤ ln2/2`), a degree-6 polynomial for `eʳ` (Cephes' `expf`
/// coefficients) and `2ⁿ` built in the exponent bits. Within 2 ulp of `exp` over the whole
/// range (tested); saturates to `e^-87.3` / `e^88.4`; NaN stays NaN.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2²³: adding and subtracting it rounds to the nearest integer (|x·log2e| < 2²²).
    const ROUND: f32 = 12_582_912.0;
    // Comparisons keep NaN (both false), so NaN goes through as NaN.
    let x = if x > 88.376_26 { 88.376_26 } else { x };
    let x = if x < -87.336_55 { -87.336_55 } else { x };
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // n is in [-126, 127] after the clamps: 2ⁿ is a normal float. n read from t's low
    // mantissa bits (t = ROUND + n exactly): integer ops only, no saturating float-to-int
    // conversion, so the loop vectorises.
    let n_bits = t.to_bits().wrapping_sub(ROUND.to_bits());
    let two_n = f32::from_bits(n_bits.wrapping_add(127) << 23);
    y * two_n
}

impl FromStr for Activation {
    type Err = String;
    /// `none`, `relu`, `sigmoid`, `leaky_relu` (alpha 0.01) or `leaky_relu:ALPHA`, `elu`
    /// (alpha 1) or `elu:ALPHA`, `prelu:S` or `prelu:S0,S1,...` (one slope per channel).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let finite = |a: &str, what: &str| {
            a.parse::<f32>()
                .ok()
                .filter(|a| a.is_finite())
                .ok_or_else(|| format!("{what} must be a finite number, got {a:?}"))
        };
        match s {
            "none" => Ok(Activation::None),
            "relu" => Ok(Activation::Relu),
            "sigmoid" => Ok(Activation::Sigmoid),
            "leaky_relu" => Ok(Activation::LeakyRelu(0.01)),
            "elu" => Ok(Activation::Elu(1.0)),
            _ => {
                if let Some(a) = s.strip_prefix("leaky_relu:") {
                    finite(a, "leaky_relu alpha").map(Activation::LeakyRelu)
                } else if let Some(a) = s.strip_prefix("elu:") {
                    finite(a, "elu alpha").map(Activation::Elu)
                } else if let Some(list) = s.strip_prefix("prelu:") {
                    let slopes = list
                        .split(',')
                        .map(|a| finite(a.trim(), "a prelu slope"))
                        .collect::<Result<Vec<f32>, _>>()?;
                    Ok(Activation::PRelu(slopes.into()))
                } else {
                    Err(format!(
                        "expected none, relu, leaky_relu[:ALPHA], sigmoid, elu[:ALPHA] or \
                         prelu:S[,S...], got {s:?}"
                    ))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units in the last place.
    fn ulps(a: f32, b: f32) -> u32 {
        let (a, b) = (a.to_bits() as i64, b.to_bits() as i64);
        (a - b).unsigned_abs() as u32
    }

    #[test]
    fn exp_f32_is_within_two_ulp_of_libm() {
        let mut worst = 0;
        let mut x = -87.0f32;
        while x < 88.0 {
            worst = worst.max(ulps(exp_f32(x), (x as f64).exp() as f32));
            x += 0.000_731;
        }
        assert!(worst <= 2, "worst {worst} ulp");
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(f32::NAN).is_nan());
        assert!(exp_f32(-1000.0) > 0.0 && exp_f32(-1000.0) < 1e-37);
        assert!(exp_f32(1000.0).is_finite() && exp_f32(1000.0) > 1e38);
    }

    #[test]
    fn elu_and_prelu_match_their_definitions() {
        let xs = [-30.0f32, -2.5, -0.3, -1e-6, 0.0, 1e-6, 0.7, 12.0];
        let elu = Activation::Elu(0.8).channel(3);
        for &x in &xs {
            let want = if x > 0.0 {
                x as f64
            } else {
                f64::from(0.8f32) * (x as f64).exp_m1()
            };
            assert!(
                (elu.apply(x) as f64 - want).abs() <= 1e-6 * want.abs().max(1.0),
                "{x}"
            );
            assert!((elu.apply_f64(x as f64) - want).abs() < 1e-12);
        }
        let prelu = Activation::PRelu(vec![0.1, -0.5, 2.0].into());
        assert_eq!(prelu.channel(1).apply(-2.0), 1.0);
        assert_eq!(prelu.channel(2).apply(-2.0), -4.0);
        assert_eq!(prelu.channel(2).apply(3.0), 3.0);
        assert!(prelu.check(3).is_ok());
        assert!(prelu.check(4).is_err());
        let shared = Activation::PRelu(vec![0.25].into());
        assert_eq!(shared.channel(7).apply(-4.0), -1.0);
        assert!(shared.check(9).is_ok());
        assert!(Activation::Elu(f32::NAN).check(1).is_err());
    }

    #[test]
    fn bias_apply_is_apply_after_bias() {
        let row: Vec<f32> = (0..37).map(|i| (i as f32 - 18.0) * 0.37).collect();
        for act in [
            Activation::None,
            Activation::Relu,
            Activation::LeakyRelu(0.2),
            Activation::Sigmoid,
            Activation::Elu(1.3),
            Activation::PRelu(vec![0.3, 0.6].into()),
        ] {
            let ch = act.channel(1);
            let mut got = row.clone();
            ch.bias_apply(&mut got, 0.5);
            for (g, x) in got.iter().zip(&row) {
                assert_eq!(g.to_bits(), ch.apply(x + 0.5).to_bits(), "{act:?}");
            }
        }
    }

    #[test]
    fn parses_every_name() {
        assert_eq!("elu".parse::<Activation>(), Ok(Activation::Elu(1.0)));
        assert_eq!("elu:0.5".parse::<Activation>(), Ok(Activation::Elu(0.5)));
        assert_eq!(
            "prelu:0.1, 0.2".parse::<Activation>(),
            Ok(Activation::PRelu(vec![0.1, 0.2].into()))
        );
        assert!("prelu:".parse::<Activation>().is_err());
        assert!("prelu:0.1,inf".parse::<Activation>().is_err());
        assert!("elu:x".parse::<Activation>().is_err());
        assert!("gelu".parse::<Activation>().is_err());
    }
}
