//! What each op computes ([`eval`], used for constant folding and at run time) and the
//! shape it gives ([`infer`], used at planning), with ONNX semantics.

use std::borrow::Cow;

use super::tensor::{self, axis, numel, BinOp, Data, Elem, OpResult, Tensor};
use super::{Op, Unary};
use crate::kernel::{ops, ChannelAct};

/// What planning knows of an input: its shape and type, and its value if constant.
#[derive(Clone, Copy, Debug)]
pub struct Info<'a> {
    pub shape: &'a [usize],
    pub elem: Elem,
    pub value: Option<&'a Tensor>,
}

/// `Shape` of a tensor of `shape`, with ONNX's `start`/`end` (opset 15).
pub fn shape_of(shape: &[usize], start: i64, end: Option<i64>) -> Tensor {
    let r = shape.len() as i64;
    let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
    let (s, e) = (clamp(start), clamp(end.unwrap_or(r)));
    let v: Vec<i64> = shape[s..e.max(s)].iter().map(|&d| d as i64).collect();
    Tensor::i64(vec![v.len()], v)
}

type In<'a> = Option<Cow<'a, Tensor>>;

fn need<'a, 'b>(ins: &'b [In<'a>], i: usize, what: &str) -> OpResult<&'b Tensor> {
    ins.get(i)
        .and_then(|x| x.as_deref())
        .ok_or_else(|| format!("{what} (input {i}) is missing"))
}

fn take(ins: &mut [In<'_>], i: usize) -> OpResult<Tensor> {
    ins.get_mut(i)
        .and_then(Option::take)
        .map(Cow::into_owned)
        .ok_or_else(|| format!("input {i} is missing"))
}

/// Calls `work(k, block)` on every `block`-value block of `v` (block `k`: a channel, a
/// group), the blocks split over up to `threads` scoped threads in contiguous runs; the
/// first error, or a thread's panic, is returned as an error. Blocks are independent, so
/// the bits do not depend on `threads`.
pub(super) fn par_blocks_try(
    v: &mut [f32],
    block: usize,
    threads: usize,
    work: impl Fn(usize, &mut [f32]) -> OpResult<()> + Sync,
) -> OpResult<()> {
    let block = block.max(1);
    let run = |first: usize, part: &mut [f32]| -> OpResult<()> {
        part.chunks_mut(block)
            .enumerate()
            .try_for_each(|(j, b)| work(first + j, b))
    };
    let blocks = v.len().div_ceil(block);
    let threads = threads.min(blocks).max(1);
    if threads <= 1 {
        return run(0, v);
    }
    let per = blocks.div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = v
            .chunks_mut(per * block)
            .enumerate()
            .map(|(i, part)| {
                let run = &run;
                s.spawn(move || run(i * per, part))
            })
            .collect();
        handles.into_iter().try_for_each(|h| {
            h.join()
                .map_err(|_| "a worker thread panicked".to_string())?
        })
    })
}

fn five(shape: &[usize]) -> OpResult<[usize; 5]> {
    shape
        .try_into()
        .map_err(|_| format!("expects a 5-D input [N, C, D, H, W], got shape {shape:?}"))
}

/// `(n, c, spatial)` of an `[N, C, ...]` tensor.
fn ncs(shape: &[usize]) -> OpResult<(usize, usize, usize)> {
    if shape.len() < 2 {
        return Err(format!("expects an input [N, C, ...], got shape {shape:?}"));
    }
    Ok((shape[0], shape[1], shape[2..].iter().product()))
}

fn unary(u: Unary, x: f32) -> f32 {
    match u {
        Unary::Relu => x.max(0.0),
        Unary::LeakyRelu(a) => {
            if x >= 0.0 {
                x
            } else {
                a * x
            }
        }
        Unary::Elu(a) => {
            if x >= 0.0 {
                x
            } else {
                a * (x.exp() - 1.0)
            }
        }
        Unary::Sigmoid => 1.0 / (1.0 + (-x).exp()),
        Unary::Tanh => x.tanh(),
        Unary::Exp => x.exp(),
        Unary::Log => x.ln(),
        Unary::Sqrt => x.sqrt(),
        Unary::Neg => -x,
        Unary::Abs => x.abs(),
        Unary::Reciprocal => 1.0 / x,
        Unary::Erf => erf(x),
        Unary::Floor => x.floor(),
        Unary::Ceil => x.ceil(),
    }
}

/// `u` over `v` in place; the common activations as branch-free loops of their own (the
/// compiler vectorises them; one loop with a `match` per element it does not).
fn apply_unary(u: Unary, v: &mut [f32]) {
    match u {
        Unary::Relu => v.iter_mut().for_each(|x| *x = x.max(0.0)),
        Unary::LeakyRelu(a) => v
            .iter_mut()
            .for_each(|x| *x = if *x < 0.0 { *x * a } else { *x }),
        Unary::Sigmoid => v.iter_mut().for_each(|x| *x = 1.0 / (1.0 + (-*x).exp())),
        Unary::Neg => v.iter_mut().for_each(|x| *x = -*x),
        u => v.iter_mut().for_each(|x| *x = unary(u, *x)),
    }
}

/// The error function (Abramowitz–Stegun 7.1.26 refined by one Newton step in f64).
fn erf(x: f32) -> f32 {
    let x = f64::from(x);
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
    let y = 1.0
        - (((((1.061_405_429 * t - 1.453_152_027) * t) + 1.421_413_741) * t - 0.284_496_736) * t
            + 0.254_829_592)
            * t
            * (-x * x).exp();
    (if x >= 0.0 { y } else { -y }) as f32
}

/// A per-channel vector of length `c` (a scalar broadcasts).
fn per_channel(t: &Tensor, c: usize, what: &str) -> OpResult<Vec<f32>> {
    let v = t.to_f32();
    match v.len() {
        n if n == c => Ok(v),
        1 => Ok(vec![v[0]; c]),
        n => Err(format!(
            "{what} must have {c} values (one per channel), got {n}"
        )),
    }
}

fn nonempty(t: Option<&Tensor>) -> Option<&Tensor> {
    t.filter(|t| !t.is_empty())
}

/// Resize (`op` must be [`Op::Resize`]) of `x` with the node's `scales`/`sizes` inputs into
/// `out` (sized for the planned output), on up to `threads` threads: the run-time path,
/// which writes into a buffer the caller reuses.
pub fn resize_into(
    op: &Op,
    x: &Tensor,
    scales: Option<&Tensor>,
    sizes: Option<&Tensor>,
    out: &mut [f32],
    threads: usize,
) -> OpResult<()> {
    let Op::Resize { mode, coord } = op else {
        return Err(format!("{} is not a Resize", op.name()));
    };
    let s = five(&x.shape)?;
    let (dims, sc) = resize_dims(&x.shape, scales, sizes)?;
    ops::resize3d_into(x.as_f32()?, s, dims, sc, *mode, *coord, out, threads)
        .map_err(|e| e.to_string())
}

/// Output spatial size and coordinate scales of a Resize over D, H, W.
fn resize_dims(
    shape: &[usize],
    scales: Option<&Tensor>,
    sizes: Option<&Tensor>,
) -> OpResult<([usize; 3], [f32; 3])> {
    let s5 = five(shape)?;
    if let Some(sz) = nonempty(sizes) {
        let v = sz.to_i64();
        if v.len() != 5 || v[0] as usize != s5[0] || v[1] as usize != s5[1] {
            return Err(format!(
                "sizes must be [N, C, D, H, W] with N and C unchanged ({:?}), got {v:?}",
                &s5[..2]
            ));
        }
        let mut out = [0usize; 3];
        let mut sc = [0f32; 3];
        for a in 0..3 {
            let o = usize::try_from(v[2 + a])
                .ok()
                .filter(|&o| o > 0 && o <= 1 << 20)
                .ok_or_else(|| format!("size {} is out of range", v[2 + a]))?;
            out[a] = o;
            sc[a] = o as f32 / s5[2 + a] as f32;
        }
        return Ok((out, sc));
    }
    let sc = nonempty(scales)
        .ok_or("Resize needs scales or sizes")?
        .to_f32();
    if sc.len() != 5 || sc[0] != 1.0 || sc[1] != 1.0 {
        return Err(format!("scales must be [1, 1, sD, sH, sW], got {sc:?}"));
    }
    let mut out = [0usize; 3];
    for a in 0..3 {
        let o = (s5[2 + a] as f64 * f64::from(sc[2 + a])).floor();
        if !(1.0..=(1u64 << 20) as f64).contains(&o) {
            return Err(format!(
                "scale {} gives an output size out of range",
                sc[2 + a]
            ));
        }
        out[a] = o as usize;
    }
    Ok((out, [sc[2], sc[3], sc[4]]))
}

/// Pads of a 5-D Pad over the spatial axes only.
fn pad_dims(
    shape: &[usize],
    pads: &Tensor,
    axes: Option<&Tensor>,
) -> OpResult<([usize; 3], [usize; 3])> {
    let rank = shape.len();
    five(shape)?;
    let p = pads.to_i64();
    let axes: Vec<usize> = match axes.filter(|a| !a.is_empty()) {
        Some(a) => a
            .to_i64()
            .iter()
            .map(|&x| axis(x, rank))
            .collect::<OpResult<_>>()?,
        None => (0..rank).collect(),
    };
    if p.len() != 2 * axes.len() {
        return Err(format!(
            "pads must have {} values, got {}",
            2 * axes.len(),
            p.len()
        ));
    }
    let (mut b, mut e) = ([0usize; 3], [0usize; 3]);
    for (k, &a) in axes.iter().enumerate() {
        let (pb, pe) = (p[k], p[k + axes.len()]);
        if pb < 0 || pe < 0 {
            return Err(format!("negative pads are not supported, got {p:?}"));
        }
        if a < 2 {
            if pb != 0 || pe != 0 {
                return Err(format!(
                    "only the spatial axes D, H, W may be padded, got {p:?}"
                ));
            }
            continue;
        }
        b[a - 2] = usize::try_from(pb).map_err(|_| "pad too large")?;
        e[a - 2] = usize::try_from(pe).map_err(|_| "pad too large")?;
    }
    Ok((b, e))
}

fn unsqueeze_shape(shape: &[usize], axes: &[i64]) -> OpResult<Vec<usize>> {
    let r = shape.len() + axes.len();
    let mut ax: Vec<usize> = axes.iter().map(|&a| axis(a, r)).collect::<OpResult<_>>()?;
    ax.sort_unstable();
    ax.dedup();
    if ax.len() != axes.len() {
        return Err(format!("Unsqueeze: repeated axes {axes:?}"));
    }
    let mut out = Vec::with_capacity(r);
    let mut it = shape.iter();
    for i in 0..r {
        if ax.binary_search(&i).is_ok() {
            out.push(1);
        } else {
            out.push(*it.next().ok_or("Unsqueeze: axes out of range")?);
        }
    }
    Ok(out)
}

fn squeeze_shape(shape: &[usize], axes: Option<&[i64]>) -> OpResult<Vec<usize>> {
    match axes {
        None => Ok(shape.iter().copied().filter(|&d| d != 1).collect()),
        Some(a) => {
            let ax: Vec<usize> = a
                .iter()
                .map(|&x| axis(x, shape.len()))
                .collect::<OpResult<_>>()?;
            for &i in &ax {
                if shape[i] != 1 {
                    return Err(format!("Squeeze: axis {i} has size {}, not 1", shape[i]));
                }
            }
            Ok(shape
                .iter()
                .enumerate()
                .filter(|(i, _)| !ax.contains(i))
                .map(|(_, &d)| d)
                .collect())
        }
    }
}

fn reduce_axes(rank: usize, axes: Option<&[i64]>) -> OpResult<Vec<usize>> {
    match axes {
        None | Some([]) => Ok((0..rank).collect()),
        Some(a) => a.iter().map(|&x| axis(x, rank)).collect(),
    }
}

fn reduce_shape(shape: &[usize], axes: &[usize], keep: bool) -> Vec<usize> {
    shape
        .iter()
        .enumerate()
        .filter_map(|(i, &d)| match (axes.contains(&i), keep) {
            (true, true) => Some(1),
            (true, false) => None,
            (false, _) => Some(d),
        })
        .collect()
}

fn range_len(start: f64, limit: f64, delta: f64) -> OpResult<usize> {
    if delta == 0.0 {
        return Err("Range: delta 0".into());
    }
    let n = ((limit - start) / delta).ceil().max(0.0);
    if n > (1u64 << 24) as f64 {
        return Err(format!("Range: {n} elements is too many"));
    }
    Ok(n as usize)
}

/// Computes `op` on `ins` (absent optional inputs are `None`).
pub fn eval(op: &Op, mut ins: Vec<In<'_>>, threads: usize) -> OpResult<Vec<Tensor>> {
    let y = match op {
        Op::Conv(_) | Op::ConvTranspose { .. } => {
            return Err("convolutions run through their kernel plan".into())
        }
        Op::BatchNorm { eps } => {
            let x = take(&mut ins, 0)?;
            let (n, c, sp) = ncs(&x.shape)?;
            let scale = per_channel(need(&ins, 1, "scale")?, c, "scale")?;
            let b = per_channel(need(&ins, 2, "B")?, c, "B")?;
            let mean = per_channel(need(&ins, 3, "mean")?, c, "mean")?;
            let var = per_channel(need(&ins, 4, "var")?, c, "var")?;
            let shape = x.shape.clone();
            let mut v = x.into_f32()?;
            for (k, run) in v.chunks_mut(sp.max(1)).enumerate().take(n * c) {
                let ch = k % c;
                let inv =
                    (f64::from(scale[ch]) / (f64::from(var[ch]) + f64::from(*eps)).sqrt()) as f32;
                let sh = b[ch] - mean[ch] * inv;
                run.iter_mut().for_each(|x| *x = *x * inv + sh);
            }
            Tensor::f32(shape, v)
        }
        Op::InstanceNorm { eps, act } => {
            let x = take(&mut ins, 0)?;
            let (n, c, sp) = ncs(&x.shape)?;
            let scale = per_channel(need(&ins, 1, "scale")?, c, "scale")?;
            let b = per_channel(need(&ins, 2, "B")?, c, "B")?;
            let shape = x.shape.clone();
            let mut v = x.into_f32()?;
            // Channels are independent: split over threads in whole channels (the same bits
            // at any thread count), the fused activation applied while a channel is hot.
            let (sc, bi): (Vec<f32>, Vec<f32>) =
                (0..n * c).map(|k| (scale[k % c], b[k % c])).unzip();
            let act = |k: usize| act.as_ref().map_or(ChannelAct::None, |a| a.channel(k % c));
            par_blocks_try(&mut v, sp, threads, |k, ch| {
                ops::instance_norm_act(ch, 1, 1, sp, &sc[k..=k], &bi[k..=k], *eps, |_| act(k))
                    .map_err(|e| e.to_string())
            })?;
            Tensor::f32(shape, v)
        }
        Op::GroupNorm {
            eps,
            groups,
            per_group_affine,
            act,
        } => {
            let x = take(&mut ins, 0)?;
            let (_, c, sp) = ncs(&x.shape)?;
            if *groups == 0 || c % groups != 0 {
                return Err(format!("num_groups {groups} must divide the {c} channels"));
            }
            let expand = |t: &Tensor, what: &str| -> OpResult<Vec<f32>> {
                if *per_group_affine {
                    let g = per_channel(t, *groups, what)?;
                    Ok((0..c).map(|ch| g[ch / (c / groups)]).collect())
                } else {
                    per_channel(t, c, what)
                }
            };
            let scale = expand(need(&ins, 1, "scale")?, "scale")?;
            let b = expand(need(&ins, 2, "bias")?, "bias")?;
            let shape = x.shape.clone();
            let mut v = x.into_f32()?;
            // Groups are independent: split over threads in whole (item, group) blocks (the
            // same bits at any thread count), the fused activation applied while hot.
            let per = c / groups;
            par_blocks_try(&mut v, per * sp, threads, |k, grp| {
                let ch0 = (k % groups) * per;
                let (sc, bi) = (&scale[ch0..ch0 + per], &b[ch0..ch0 + per]);
                let act = |j: usize| {
                    act.as_ref()
                        .map_or(ChannelAct::None, |a| a.channel(ch0 + j))
                };
                ops::group_norm_act(grp, 1, per, sp, 1, sc, bi, *eps, act)
                    .map_err(|e| e.to_string())
            })?;
            Tensor::f32(shape, v)
        }
        Op::Unary(u) => {
            let x = take(&mut ins, 0)?;
            let shape = x.shape.clone();
            let mut v = x.into_f32()?;
            let threads = if v.len() < 1 << 16 { 1 } else { threads };
            crate::kernel::par::par_blocks(&mut v, 1, threads, |_, part| apply_unary(*u, part));
            Tensor::f32(shape, v)
        }
        Op::Binary(b) => {
            let x = take(&mut ins, 0)?;
            let y = need(&ins, 1, "B")?;
            tensor::binary_threads(*b, x, y, threads)?
        }
        Op::Clip => {
            let x = take(&mut ins, 0)?;
            let lo = ins.get(1).and_then(|t| t.as_deref()).map(|t| t.to_f32()[0]);
            let hi = ins.get(2).and_then(|t| t.as_deref()).map(|t| t.to_f32()[0]);
            let shape = x.shape.clone();
            let mut v = x.into_f32()?;
            v.iter_mut().for_each(|x| {
                if let Some(l) = lo {
                    *x = x.max(l);
                }
                if let Some(h) = hi {
                    *x = x.min(h);
                }
            });
            Tensor::f32(shape, v)
        }
        Op::Softmax { axis: a } => {
            let x = take(&mut ins, 0)?;
            let ax = axis(*a, x.shape.len())?;
            let outer: usize = x.shape[..ax].iter().product();
            let dim = x.shape[ax];
            let inner: usize = x.shape[ax + 1..].iter().product();
            let shape = x.shape.clone();
            let mut v = x.into_f32()?;
            for o in 0..outer {
                let block = &mut v[o * dim * inner..(o + 1) * dim * inner];
                for i in 0..inner {
                    let mut m = f32::NEG_INFINITY;
                    for k in 0..dim {
                        m = m.max(block[k * inner + i]);
                    }
                    let mut sum = 0f64;
                    for k in 0..dim {
                        let e = (block[k * inner + i] - m).exp();
                        block[k * inner + i] = e;
                        sum += f64::from(e);
                    }
                    let inv = (1.0 / sum) as f32;
                    for k in 0..dim {
                        block[k * inner + i] *= inv;
                    }
                }
            }
            Tensor::f32(shape, v)
        }
        Op::Concat { axis: a } => {
            let parts: Vec<&Tensor> = ins.iter().flatten().map(|c| &**c).collect();
            tensor::concat(&parts, *a)?
        }
        Op::MaxPool(p) => {
            let x = need(&ins, 0, "X")?;
            let s = five(&x.shape)?;
            let out_shape = ops::pool3d_shape(s, p).map_err(|e| e.to_string())?;
            let v = ops::maxpool3d_padded_threads(x.as_f32()?, s, p, threads)
                .map_err(|e| e.to_string())?;
            Tensor::f32(out_shape.to_vec(), v)
        }
        Op::AveragePool {
            pool,
            count_include_pad,
        } => {
            let x = need(&ins, 0, "X")?;
            let s = five(&x.shape)?;
            let out_shape = ops::pool3d_shape(s, pool).map_err(|e| e.to_string())?;
            let v = ops::avgpool3d(x.as_f32()?, s, pool, *count_include_pad)
                .map_err(|e| e.to_string())?;
            Tensor::f32(out_shape.to_vec(), v)
        }
        Op::GlobalAveragePool => {
            let x = need(&ins, 0, "X")?;
            let (n, c, sp) = ncs(&x.shape)?;
            let v = ops::global_avgpool(x.as_f32()?, n, c, sp).map_err(|e| e.to_string())?;
            let mut shape = vec![1usize; x.shape.len()];
            shape[0] = n;
            shape[1] = c;
            Tensor::f32(shape, v)
        }
        Op::Resize { mode, coord } => {
            let x = need(&ins, 0, "X")?;
            let s = five(&x.shape)?;
            let scales = ins.get(2).and_then(|t| t.as_deref());
            let sizes = ins.get(3).and_then(|t| t.as_deref());
            let (out, sc) = resize_dims(&x.shape, scales, sizes)?;
            let v =
                ops::resize3d(x.as_f32()?, s, out, sc, *mode, *coord).map_err(|e| e.to_string())?;
            Tensor::f32(vec![s[0], s[1], out[0], out[1], out[2]], v)
        }
        Op::Pad { mode } => {
            let x = need(&ins, 0, "data")?;
            let s = five(&x.shape)?;
            let (b, e) = pad_dims(
                &x.shape,
                need(&ins, 1, "pads")?,
                ins.get(3).and_then(|t| t.as_deref()),
            )?;
            if b == [0; 3] && e == [0; 3] {
                // No padding (BasicUNet pads by the size difference, usually none): the
                // input itself, moved when this is its last reader.
                return Ok(vec![take(&mut ins, 0)?]);
            }
            let mode = match mode {
                ops::PadMode::Constant(_) => ops::PadMode::Constant(
                    ins.get(2)
                        .and_then(|t| t.as_deref())
                        .filter(|t| !t.is_empty())
                        .map_or(0.0, |t| t.to_f32()[0]),
                ),
                m => *m,
            };
            let (v, shape) = ops::pad3d(x.as_f32()?, s, b, e, mode).map_err(|e| e.to_string())?;
            Tensor::f32(shape.to_vec(), v)
        }
        Op::Identity => take(&mut ins, 0)?,
        Op::Flatten { axis: a } => {
            let x = take(&mut ins, 0)?;
            let r = x.shape.len();
            let ax = if *a == r as i64 { r } else { axis(*a, r)? };
            let shape = vec![
                x.shape[..ax].iter().product(),
                x.shape[ax..].iter().product(),
            ];
            x.reshaped(shape)?
        }
        Op::Reshape { allowzero } => {
            let x = take(&mut ins, 0)?;
            let target = need(&ins, 1, "shape")?.to_i64();
            let shape = tensor::reshape_target(&x.shape, &target, *allowzero)?;
            x.reshaped(shape)?
        }
        Op::Shape { start, end } => shape_of(&need(&ins, 0, "data")?.shape, *start, *end),
        Op::Size => Tensor::i64(vec![], vec![need(&ins, 0, "data")?.len() as i64]),
        Op::Gather { axis: a } => {
            tensor::gather(need(&ins, 0, "data")?, need(&ins, 1, "indices")?, *a)?
        }
        Op::Slice => {
            let x = need(&ins, 0, "data")?;
            let starts = need(&ins, 1, "starts")?.to_i64();
            let ends = need(&ins, 2, "ends")?.to_i64();
            let axes = ins.get(3).and_then(|t| t.as_deref()).map(Tensor::to_i64);
            let steps = ins.get(4).and_then(|t| t.as_deref()).map(Tensor::to_i64);
            tensor::slice(x, &starts, &ends, axes.as_deref(), steps.as_deref())?
        }
        Op::Transpose { perm } => tensor::transpose(need(&ins, 0, "data")?, perm.as_deref())?,
        Op::Cast { to } => need(&ins, 0, "input")?.cast(*to),
        Op::Constant(c) => (**c).clone(),
        Op::ConstantOfShape(value) => {
            let dims = need(&ins, 0, "shape")?.to_i64();
            let shape: Vec<usize> = dims
                .iter()
                .map(|&d| usize::try_from(d).map_err(|_| format!("negative dimension {d}")))
                .collect::<OpResult<_>>()?;
            let n = numel(&shape)?;
            if n > 1 << 26 {
                return Err(format!("ConstantOfShape of {n} elements is too large"));
            }
            match &value.data {
                Data::F32(v) => Tensor::f32(shape, vec![v.first().copied().unwrap_or(0.0); n]),
                Data::I64(v) => Tensor::i64(shape, vec![v.first().copied().unwrap_or(0); n]),
            }
        }
        Op::Unsqueeze => {
            let x = take(&mut ins, 0)?;
            let axes = need(&ins, 1, "axes")?.to_i64();
            let shape = unsqueeze_shape(&x.shape, &axes)?;
            x.reshaped(shape)?
        }
        Op::Squeeze => {
            let x = take(&mut ins, 0)?;
            let axes = ins.get(1).and_then(|t| t.as_deref()).map(Tensor::to_i64);
            let shape = squeeze_shape(&x.shape, axes.as_deref())?;
            x.reshaped(shape)?
        }
        Op::Expand => tensor::expand(need(&ins, 0, "input")?, &need(&ins, 1, "shape")?.to_i64())?,
        Op::Where => tensor::where_(
            need(&ins, 0, "condition")?,
            need(&ins, 1, "X")?,
            need(&ins, 2, "Y")?,
        )?,
        Op::Range => {
            let (s, l, d) = (
                need(&ins, 0, "start")?,
                need(&ins, 1, "limit")?,
                need(&ins, 2, "delta")?,
            );
            if s.elem() == Elem::I64 && l.elem() == Elem::I64 && d.elem() == Elem::I64 {
                let (s, l, d) = (s.to_i64()[0], l.to_i64()[0], d.to_i64()[0]);
                let n = range_len(s as f64, l as f64, d as f64)?;
                Tensor::i64(vec![n], (0..n as i64).map(|i| s + i * d).collect())
            } else {
                let (s, l, d) = (s.to_f32()[0], l.to_f32()[0], d.to_f32()[0]);
                let n = range_len(f64::from(s), f64::from(l), f64::from(d))?;
                Tensor::f32(vec![n], (0..n).map(|i| s + i as f32 * d).collect())
            }
        }
        Op::Not => {
            let x = need(&ins, 0, "X")?;
            Tensor::i64(
                x.shape.clone(),
                x.to_i64().iter().map(|&v| i64::from(v == 0)).collect(),
            )
        }
        Op::ReduceMean { axes, keepdims } => {
            let x = need(&ins, 0, "data")?;
            let from_input = ins.get(1).and_then(|t| t.as_deref()).map(Tensor::to_i64);
            let ax = reduce_axes(x.shape.len(), from_input.as_deref().or(axes.as_deref()))?;
            let out_keep = reduce_shape(&x.shape, &ax, true);
            let n_out = numel(&out_keep)?;
            let mut sum = vec![0f64; n_out];
            let st_out = tensor::strides(&out_keep);
            let v = x.to_f32();
            let st_in = tensor::strides(&x.shape);
            for (flat, &val) in v.iter().enumerate() {
                let mut o = 0;
                for a in 0..x.shape.len() {
                    let p = (flat / st_in[a]) % x.shape[a];
                    if !ax.contains(&a) {
                        o += p * st_out[a];
                    }
                }
                sum[o] += f64::from(val);
            }
            let count: usize = ax.iter().map(|&a| x.shape[a]).product();
            let out: Vec<f32> = sum
                .iter()
                .map(|s| (s / count.max(1) as f64) as f32)
                .collect();
            Tensor::f32(reduce_shape(&x.shape, &ax, *keepdims), out)
        }
    };
    Ok(vec![y])
}

/// The output shape and type of `op` on inputs known by shape (and value, if constant).
pub fn infer(op: &Op, ins: &[Option<Info<'_>>]) -> OpResult<(Vec<usize>, Elem)> {
    let get = |i: usize, what: &str| -> OpResult<Info<'_>> {
        ins.get(i)
            .copied()
            .flatten()
            .ok_or_else(|| format!("{what} (input {i}) is missing"))
    };
    let value = |i: usize, what: &str| -> OpResult<&Tensor> {
        get(i, what)?.value.ok_or_else(|| {
            format!("{what} (input {i}) must be known when the model is planned; it is computed from the scan")
        })
    };
    let opt_value = |i: usize| ins.get(i).copied().flatten().and_then(|v| v.value);
    let x = get(0, "input")?;
    let same = || Ok((x.shape.to_vec(), Elem::F32));
    let float = |e: Elem| -> OpResult<()> {
        if e == Elem::F32 {
            Ok(())
        } else {
            Err(format!(
                "expects float32 data computed from the scan, got {}",
                e.name()
            ))
        }
    };
    match op {
        Op::Conv(_) | Op::ConvTranspose { .. } => Err("planned by the kernel".into()),
        Op::BatchNorm { .. } | Op::InstanceNorm { .. } | Op::GroupNorm { .. } => {
            float(x.elem)?;
            let (_, c, _) = ncs(x.shape)?;
            for i in 1..ins.len().min(5) {
                if let Some(v) = opt_value(i) {
                    if v.len() != c
                        && v.len() != 1
                        && !matches!(
                            op,
                            Op::GroupNorm {
                                per_group_affine: true,
                                ..
                            }
                        )
                    {
                        return Err(format!(
                            "input {i} must have {c} values (one per channel), got {}",
                            v.len()
                        ));
                    }
                } else if ins.get(i).copied().flatten().is_some() {
                    return Err(format!("input {i} (scale/bias/stats) must be a constant"));
                }
            }
            same()
        }
        Op::Unary(_) | Op::Clip | Op::Softmax { .. } | Op::Identity => {
            float(x.elem)?;
            if let Op::Softmax { axis: a } = op {
                axis(*a, x.shape.len())?;
            }
            same()
        }
        Op::Binary(b) => {
            let y = get(1, "B")?;
            let s = tensor::broadcast_shape(x.shape, y.shape)?;
            let cmp = matches!(b, BinOp::Equal | BinOp::Less | BinOp::Greater);
            let e = if cmp {
                Elem::I64
            } else if x.elem == Elem::F32 || y.elem == Elem::F32 {
                Elem::F32
            } else {
                Elem::I64
            };
            Ok((s, e))
        }
        Op::Concat { axis: a } => {
            let parts: Vec<Info<'_>> = ins.iter().flatten().copied().collect();
            let rank = x.shape.len();
            let ax = axis(*a, rank)?;
            let mut s = x.shape.to_vec();
            s[ax] = 0;
            for p in &parts {
                if p.shape.len() != rank || (0..rank).any(|i| i != ax && p.shape[i] != x.shape[i]) {
                    return Err(format!(
                        "Concat along axis {ax}: shapes {:?} and {:?} differ off that axis",
                        x.shape, p.shape
                    ));
                }
                s[ax] = s[ax].checked_add(p.shape[ax]).ok_or("Concat overflows")?;
            }
            let e = if parts.iter().any(|p| p.elem == Elem::F32) {
                Elem::F32
            } else {
                Elem::I64
            };
            Ok((s, e))
        }
        Op::MaxPool(p) | Op::AveragePool { pool: p, .. } => {
            float(x.elem)?;
            let s = ops::pool3d_shape(five(x.shape)?, p).map_err(|e| e.to_string())?;
            Ok((s.to_vec(), Elem::F32))
        }
        Op::GlobalAveragePool => {
            float(x.elem)?;
            let (n, c, _) = ncs(x.shape)?;
            let mut s = vec![1usize; x.shape.len()];
            s[0] = n;
            s[1] = c;
            Ok((s, Elem::F32))
        }
        Op::Resize { .. } => {
            float(x.elem)?;
            let (out, _) = resize_dims(x.shape, opt_value(2), opt_value(3))?;
            if ins
                .get(2)
                .copied()
                .flatten()
                .is_some_and(|i| i.value.is_none())
                || ins
                    .get(3)
                    .copied()
                    .flatten()
                    .is_some_and(|i| i.value.is_none())
            {
                return Err("scales/sizes must be known when the model is planned".into());
            }
            Ok((
                vec![x.shape[0], x.shape[1], out[0], out[1], out[2]],
                Elem::F32,
            ))
        }
        Op::Pad { mode } => {
            float(x.elem)?;
            let (b, e) = pad_dims(x.shape, value(1, "pads")?, opt_value(3))?;
            let mut s = x.shape.to_vec();
            for a in 0..3 {
                if matches!(mode, ops::PadMode::Reflect) && (b[a] >= s[2 + a] || e[a] >= s[2 + a]) {
                    return Err(format!(
                        "reflect pad {} / {} must be smaller than the dimension {}",
                        b[a],
                        e[a],
                        s[2 + a]
                    ));
                }
                s[2 + a] = s[2 + a]
                    .checked_add(b[a])
                    .and_then(|v| v.checked_add(e[a]))
                    .ok_or("pad overflows")?;
            }
            Ok((s, Elem::F32))
        }
        Op::Flatten { axis: a } => {
            let r = x.shape.len();
            let ax = if *a == r as i64 { r } else { axis(*a, r)? };
            Ok((
                vec![
                    x.shape[..ax].iter().product(),
                    x.shape[ax..].iter().product(),
                ],
                x.elem,
            ))
        }
        Op::Reshape { allowzero } => {
            let t = value(1, "shape")?.to_i64();
            Ok((tensor::reshape_target(x.shape, &t, *allowzero)?, x.elem))
        }
        Op::Shape { .. } | Op::Size => Err("planned as a constant".into()),
        Op::Gather { axis: a } => {
            let idx = get(1, "indices")?;
            let ax = axis(*a, x.shape.len())?;
            if let Some(v) = idx.value {
                for &i in &v.to_i64() {
                    let d = x.shape[ax] as i64;
                    if i < -d || i >= d {
                        return Err(format!("Gather: index {i} out of range for dimension {d}"));
                    }
                }
            } else {
                return Err("Gather indices must be constant".into());
            }
            let mut s = x.shape[..ax].to_vec();
            s.extend_from_slice(idx.shape);
            s.extend_from_slice(&x.shape[ax + 1..]);
            Ok((s, x.elem))
        }
        Op::Slice => {
            let starts = value(1, "starts")?.to_i64();
            let ends = value(2, "ends")?.to_i64();
            let axes = opt_value(3).map(Tensor::to_i64);
            let steps = opt_value(4).map(Tensor::to_i64);
            let (_, _, s) =
                tensor::slice_geometry(x.shape, &starts, &ends, axes.as_deref(), steps.as_deref())?;
            Ok((s, x.elem))
        }
        Op::Transpose { perm } => {
            let p = tensor::permutation(perm.as_deref(), x.shape.len())?;
            Ok((p.iter().map(|&a| x.shape[a]).collect(), x.elem))
        }
        Op::Cast { to } => {
            if *to != Elem::F32 {
                return Err("casting scan data to integers is not supported".into());
            }
            Ok((x.shape.to_vec(), *to))
        }
        Op::Constant(_) | Op::ConstantOfShape(_) | Op::Range => Err("planned as a constant".into()),
        Op::Unsqueeze => Ok((
            unsqueeze_shape(x.shape, &value(1, "axes")?.to_i64())?,
            x.elem,
        )),
        Op::Squeeze => {
            let axes = match ins.get(1).copied().flatten() {
                Some(_) => Some(value(1, "axes")?.to_i64()),
                None => None,
            };
            Ok((squeeze_shape(x.shape, axes.as_deref())?, x.elem))
        }
        Op::Expand => {
            let want: Vec<usize> = value(1, "shape")?
                .to_i64()
                .iter()
                .map(|&d| usize::try_from(d).map_err(|_| format!("Expand: negative dimension {d}")))
                .collect::<OpResult<_>>()?;
            Ok((tensor::broadcast_shape(x.shape, &want)?, x.elem))
        }
        Op::Where => {
            let (a, b) = (get(1, "X")?, get(2, "Y")?);
            let s = tensor::broadcast_shape(&tensor::broadcast_shape(x.shape, a.shape)?, b.shape)?;
            let e = if a.elem == Elem::F32 || b.elem == Elem::F32 {
                Elem::F32
            } else {
                Elem::I64
            };
            Ok((s, e))
        }
        Op::Not => Ok((x.shape.to_vec(), Elem::I64)),
        Op::ReduceMean { axes, keepdims } => {
            float(x.elem)?;
            let from_input = match ins.get(1).copied().flatten() {
                Some(_) => Some(value(1, "axes")?.to_i64()),
                None => None,
            };
            let ax = reduce_axes(x.shape.len(), from_input.as_deref().or(axes.as_deref()))?;
            Ok((reduce_shape(x.shape, &ax, *keepdims), Elem::F32))
        }
    }
}
