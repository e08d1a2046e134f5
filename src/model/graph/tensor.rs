//! Tensors of a graph (f32 activations and constants, i64 shape plumbing) and the
//! layout operations both constant folding and execution use: numpy broadcasting,
//! concat, slice, gather, transpose, reshape rules.

use std::sync::Arc;

/// An error of one node, as text (the caller names the node).
pub type OpResult<T> = Result<T, String>;

/// Element storage.
#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

/// A dense row-major tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Data,
}

/// Element type of a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elem {
    F32,
    I64,
}

impl Elem {
    pub fn name(self) -> &'static str {
        match self {
            Elem::F32 => "float32",
            Elem::I64 => "int64",
        }
    }
}

/// Number of elements of `shape`, checked.
pub fn numel(shape: &[usize]) -> OpResult<usize> {
    shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| format!("shape {shape:?} overflows the address space"))
}

/// Row-major strides of `shape`.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1usize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// An axis in `[-rank, rank)` as an index.
pub fn axis(a: i64, rank: usize) -> OpResult<usize> {
    let r = rank as i64;
    if a < -r || a >= r {
        return Err(format!("axis {a} is out of range for rank {rank}"));
    }
    Ok(if a < 0 { (a + r) as usize } else { a as usize })
}

impl Tensor {
    pub fn f32(shape: Vec<usize>, v: Vec<f32>) -> Self {
        Self {
            shape,
            data: Data::F32(v),
        }
    }

    pub fn i64(shape: Vec<usize>, v: Vec<i64>) -> Self {
        Self {
            shape,
            data: Data::I64(v),
        }
    }

    pub fn scalar_f32(v: f32) -> Self {
        Self::f32(vec![], vec![v])
    }

    pub fn elem(&self) -> Elem {
        match self.data {
            Data::F32(_) => Elem::F32,
            Data::I64(_) => Elem::I64,
        }
    }

    pub fn len(&self) -> usize {
        match &self.data {
            Data::F32(v) => v.len(),
            Data::I64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn bytes(&self) -> usize {
        self.len() * 4
    }

    pub fn as_f32(&self) -> OpResult<&[f32]> {
        match &self.data {
            Data::F32(v) => Ok(v),
            Data::I64(_) => Err(format!(
                "expected a float32 tensor, got int64 {:?}",
                self.shape
            )),
        }
    }

    pub fn into_f32(self) -> OpResult<Vec<f32>> {
        match self.data {
            Data::F32(v) => Ok(v),
            Data::I64(_) => Err(format!(
                "expected a float32 tensor, got int64 {:?}",
                self.shape
            )),
        }
    }

    /// The values as i64 (floats truncated), for shape-like operands.
    pub fn to_i64(&self) -> Vec<i64> {
        match &self.data {
            Data::F32(v) => v.iter().map(|&x| x as i64).collect(),
            Data::I64(v) => v.clone(),
        }
    }

    /// The values as f32.
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            Data::F32(v) => v.clone(),
            Data::I64(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }

    pub fn cast(&self, to: Elem) -> Tensor {
        match to {
            Elem::F32 => Tensor::f32(self.shape.clone(), self.to_f32()),
            Elem::I64 => Tensor::i64(self.shape.clone(), self.to_i64()),
        }
    }

    /// Same data, another shape of the same element count.
    pub fn reshaped(mut self, shape: Vec<usize>) -> OpResult<Tensor> {
        if numel(&shape)? != self.len() {
            return Err(format!(
                "cannot reshape {:?} ({} elements) to {shape:?}",
                self.shape,
                self.len()
            ));
        }
        self.shape = shape;
        Ok(self)
    }

    /// Gathers elements by flat index (shared by the layout ops).
    fn take(&self, shape: Vec<usize>, idx: impl Iterator<Item = usize>) -> Tensor {
        match &self.data {
            Data::F32(v) => Tensor::f32(shape, idx.map(|i| v[i]).collect()),
            Data::I64(v) => Tensor::i64(shape, idx.map(|i| v[i]).collect()),
        }
    }
}

/// The numpy broadcast of two shapes.
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> OpResult<Vec<usize>> {
    let r = a.len().max(b.len());
    let mut out = vec![0; r];
    for i in 0..r {
        let da = if i + a.len() >= r {
            a[i + a.len() - r]
        } else {
            1
        };
        let db = if i + b.len() >= r {
            b[i + b.len() - r]
        } else {
            1
        };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return Err(format!("shapes {a:?} and {b:?} do not broadcast")),
        };
    }
    Ok(out)
}

/// For each output element of `out` (a broadcast of `shape`), the flat index into a tensor
/// of `shape`.
fn broadcast_index(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let r = out.len();
    let st = strides(shape);
    // Stride 0 along broadcast axes.
    let mut bs = vec![0usize; r];
    for i in 0..shape.len() {
        let o = i + r - shape.len();
        bs[o] = if shape[i] == 1 { 0 } else { st[i] };
    }
    let total: usize = out.iter().product();
    let mut idx = Vec::with_capacity(total);
    let mut pos = vec![0usize; r];
    let mut flat = 0usize;
    for _ in 0..total {
        idx.push(flat);
        for a in (0..r).rev() {
            pos[a] += 1;
            flat += bs[a];
            if pos[a] < out[a] {
                break;
            }
            flat -= bs[a] * pos[a];
            pos[a] = 0;
        }
    }
    idx
}

/// Binary elementwise operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Pow,
    Equal,
    Less,
    Greater,
    /// `x` where `x >= 0`, else `x·slope` (ONNX PRelu; the slope broadcasts).
    PRelu,
}

impl BinOp {
    fn f(self, x: f32, y: f32) -> f32 {
        match self {
            BinOp::Add => x + y,
            BinOp::Sub => x - y,
            BinOp::Mul => x * y,
            BinOp::Div => x / y,
            BinOp::Pow => x.powf(y),
            BinOp::Equal => f32::from(u8::from(x == y)),
            BinOp::Less => f32::from(u8::from(x < y)),
            BinOp::Greater => f32::from(u8::from(x > y)),
            BinOp::PRelu => {
                if x < 0.0 {
                    x * y
                } else {
                    x
                }
            }
        }
    }

    fn i(self, x: i64, y: i64) -> OpResult<i64> {
        Ok(match self {
            BinOp::Add => x.wrapping_add(y),
            BinOp::Sub => x.wrapping_sub(y),
            BinOp::Mul => x.wrapping_mul(y),
            BinOp::Div => {
                if y == 0 {
                    return Err("integer division by zero".into());
                }
                x.wrapping_div(y)
            }
            BinOp::Pow => x.wrapping_pow(u32::try_from(y).map_err(|_| "negative power")?),
            BinOp::Equal => i64::from(x == y),
            BinOp::Less => i64::from(x < y),
            BinOp::Greater => i64::from(x > y),
            BinOp::PRelu => {
                if x < 0 {
                    x.wrapping_mul(y)
                } else {
                    x
                }
            }
        })
    }

    /// `x op y` for every `x` of `xs` (one `y`); the arithmetic ops as loops of their own,
    /// so they vectorise.
    fn apply_scalar(self, xs: &mut [f32], y: f32) {
        match self {
            BinOp::Add => xs.iter_mut().for_each(|x| *x += y),
            BinOp::Sub => xs.iter_mut().for_each(|x| *x -= y),
            BinOp::Mul => xs.iter_mut().for_each(|x| *x *= y),
            BinOp::Div => xs.iter_mut().for_each(|x| *x /= y),
            BinOp::PRelu => xs
                .iter_mut()
                .for_each(|x| *x = if *x < 0.0 { *x * y } else { *x }),
            op => xs.iter_mut().for_each(|x| *x = op.f(*x, y)),
        }
    }

    /// `x op y` elementwise over two slices of one length.
    fn apply_zip(self, xs: &mut [f32], ys: &[f32]) {
        let z = xs.iter_mut().zip(ys);
        match self {
            BinOp::Add => z.for_each(|(x, y)| *x += y),
            BinOp::Sub => z.for_each(|(x, y)| *x -= y),
            BinOp::Mul => z.for_each(|(x, y)| *x *= y),
            BinOp::Div => z.for_each(|(x, y)| *x /= y),
            BinOp::PRelu => z.for_each(|(x, &y)| *x = if *x < 0.0 { *x * y } else { *x }),
            op => z.for_each(|(x, &y)| *x = op.f(*x, y)),
        }
    }

    /// Comparisons give booleans (kept as int64 0/1).
    fn is_comparison(self) -> bool {
        matches!(self, BinOp::Equal | BinOp::Less | BinOp::Greater)
    }
}

/// Below this many values per extra thread, an elementwise op stays on one thread.
const PAR_MIN_VALUES: usize = 1 << 18;

/// Calls `f(first_row, rows)` on blocks of whole `row`-value rows of `v`, split over up to
/// `threads` scoped threads where `v` is large (elementwise work: the same bits on any
/// thread count).
pub fn par_rows(v: &mut [f32], row: usize, threads: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let threads = threads.min(v.len() / PAR_MIN_VALUES).max(1);
    crate::kernel::par::par_blocks(v, row, threads, f);
}

/// `a op b` with numpy broadcasting. Float if either side is float. When `a` already has
/// the output shape (the common case: an activation plus a per-channel constant), the
/// result is computed in `a`'s buffer.
pub fn binary(op: BinOp, a: Tensor, b: &Tensor) -> OpResult<Tensor> {
    binary_threads(op, a, b, 1)
}

/// [`binary`] with the common float cases (same shape, a scalar, a per-channel constant)
/// split over up to `threads` threads.
pub fn binary_threads(op: BinOp, a: Tensor, b: &Tensor, threads: usize) -> OpResult<Tensor> {
    let shape = broadcast_shape(&a.shape, &b.shape)?;
    numel(&shape)?;
    let float = a.elem() == Elem::F32 || b.elem() == Elem::F32;
    if !float {
        let (av, bv) = (a.to_i64(), b.to_i64());
        let ia = broadcast_index(&a.shape, &shape);
        let ib = broadcast_index(&b.shape, &shape);
        let v = ia
            .iter()
            .zip(&ib)
            .map(|(&i, &j)| op.i(av[i], bv[j]))
            .collect::<OpResult<Vec<_>>>()?;
        return Ok(Tensor::i64(shape, v));
    }
    let out_is_int = op.is_comparison();
    // b is read in place when it is float (a residual Add's second operand is a whole
    // activation: copying it cost as much as the addition).
    let bv: std::borrow::Cow<'_, [f32]> = match &b.data {
        Data::F32(v) => std::borrow::Cow::Borrowed(v),
        Data::I64(_) => std::borrow::Cow::Owned(b.to_f32()),
    };
    let mut out = if a.shape == shape {
        let sh = a.shape.clone();
        let mut av = match a.data {
            Data::F32(v) => v,
            Data::I64(v) => v.iter().map(|&x| x as f32).collect(),
        };
        if b.shape == shape {
            const ROW: usize = 4096;
            par_rows(&mut av, ROW, threads, |first, xs| {
                op.apply_zip(xs, &bv[first * ROW..]);
            });
        } else if bv.len() == 1 {
            par_rows(&mut av, 4096, threads, |_, xs| op.apply_scalar(xs, bv[0]));
        } else if let Some(inner) = per_row(&b.shape, &shape) {
            // b varies along one leading block of axes only (e.g. [C,1,1,1] against
            // [N,C,D,H,W]): one constant per contiguous run of `inner` values.
            let inner = inner.max(1);
            par_rows(&mut av, inner, threads, |first, xs| {
                for (k, run) in xs.chunks_mut(inner).enumerate() {
                    op.apply_scalar(run, bv[(first + k) % bv.len()]);
                }
            });
        } else {
            let ib = broadcast_index(&b.shape, &shape);
            av.iter_mut()
                .zip(&ib)
                .for_each(|(x, &j)| *x = op.f(*x, bv[j]));
        }
        Tensor::f32(sh, av)
    } else {
        let av = a.to_f32();
        let ia = broadcast_index(&a.shape, &shape);
        let ib = broadcast_index(&b.shape, &shape);
        let v = ia
            .iter()
            .zip(&ib)
            .map(|(&i, &j)| op.f(av[i], bv[j]))
            .collect();
        Tensor::f32(shape, v)
    };
    if out_is_int {
        out = out.cast(Elem::I64);
    }
    Ok(out)
}

/// If `b` (broadcast to `out`) is constant over runs of `inner` contiguous output values
/// and its values cycle with the run index, returns `inner`: true when `b`'s non-1 axes
/// form one block that ends before the trailing 1-axes, e.g. `[C,1,1,1]`, `[1,C,1,1,1]`.
fn per_row(b: &[usize], out: &[usize]) -> Option<usize> {
    let r = out.len();
    let mut bb = vec![1usize; r];
    bb[r - b.len()..].copy_from_slice(b);
    let last = bb.iter().rposition(|&d| d != 1)?;
    let first = bb.iter().position(|&d| d != 1)?;
    if (first..=last).any(|a| bb[a] != out[a]) {
        return None;
    }
    // Axes before `first` repeat the whole block (cycling is handled by `k % len`).
    Some(out[last + 1..].iter().product())
}

/// Concatenation along `axis`.
pub fn concat(parts: &[&Tensor], axis_: i64) -> OpResult<Tensor> {
    let first = parts.first().ok_or("Concat needs at least one input")?;
    let rank = first.shape.len();
    let ax = axis(axis_, rank)?;
    let mut shape = first.shape.clone();
    shape[ax] = 0;
    for p in parts {
        if p.shape.len() != rank || (0..rank).any(|i| i != ax && p.shape[i] != first.shape[i]) {
            return Err(format!(
                "Concat along axis {ax}: shapes {:?} and {:?} differ off that axis",
                first.shape, p.shape
            ));
        }
        shape[ax] = shape[ax]
            .checked_add(p.shape[ax])
            .ok_or("Concat overflows")?;
    }
    numel(&shape)?;
    let outer: usize = shape[..ax].iter().product();
    let float = parts.iter().any(|p| p.elem() == Elem::F32);
    if float {
        // Float parts are read in place; only integer ones (never in a real network) convert.
        let converted: Vec<Option<Vec<f32>>> = parts
            .iter()
            .map(|p| match &p.data {
                Data::F32(_) => None,
                Data::I64(_) => Some(p.to_f32()),
            })
            .collect();
        let vs: Vec<&[f32]> = parts
            .iter()
            .zip(&converted)
            .map(|(p, c)| match (&p.data, c) {
                (Data::F32(v), _) => v.as_slice(),
                (_, Some(c)) => c.as_slice(),
                (Data::I64(_), None) => &[],
            })
            .collect();
        let mut out = Vec::with_capacity(numel(&shape)?);
        for o in 0..outer {
            for (p, v) in parts.iter().zip(&vs) {
                let run: usize = p.shape[ax..].iter().product();
                out.extend_from_slice(&v[o * run..(o + 1) * run]);
            }
        }
        Ok(Tensor::f32(shape, out))
    } else {
        let vs: Vec<Vec<i64>> = parts.iter().map(|p| p.to_i64()).collect();
        let mut out = Vec::new();
        for o in 0..outer {
            for (p, v) in parts.iter().zip(&vs) {
                let run: usize = p.shape[ax..].iter().product();
                out.extend_from_slice(&v[o * run..(o + 1) * run]);
            }
        }
        Ok(Tensor::i64(shape, out))
    }
}

/// Transpose's `perm` as axes, checked to be a permutation of `rank` (default: reversed).
pub fn permutation(perm: Option<&[i64]>, rank: usize) -> OpResult<Vec<usize>> {
    let perm: Vec<usize> = match perm {
        Some(p) => p.iter().map(|&a| axis(a, rank)).collect::<OpResult<_>>()?,
        None => (0..rank).rev().collect(),
    };
    let mut seen = vec![false; rank];
    if perm.len() != rank || perm.iter().any(|&a| std::mem::replace(&mut seen[a], true)) {
        return Err(format!("perm {perm:?} is not a permutation of {rank} axes"));
    }
    Ok(perm)
}

/// Transpose by `perm` (default: reversed axes).
pub fn transpose(t: &Tensor, perm: Option<&[i64]>) -> OpResult<Tensor> {
    let perm = permutation(perm, t.shape.len())?;
    let shape: Vec<usize> = perm.iter().map(|&a| t.shape[a]).collect();
    let st = strides(&t.shape);
    let pst: Vec<usize> = perm.iter().map(|&a| st[a]).collect();
    let idx = index_walk(&shape, &pst, 0);
    Ok(t.take(shape, idx.into_iter()))
}

/// Flat indices of a strided walk over `shape` starting at `base`.
fn index_walk(shape: &[usize], st: &[usize], base: usize) -> Vec<usize> {
    let total: usize = shape.iter().product();
    let mut idx = Vec::with_capacity(total);
    if total == 0 {
        return idx;
    }
    let r = shape.len();
    let mut pos = vec![0usize; r];
    let mut flat = base;
    for _ in 0..total {
        idx.push(flat);
        for a in (0..r).rev() {
            pos[a] += 1;
            flat += st[a];
            if pos[a] < shape[a] {
                break;
            }
            flat -= st[a] * pos[a];
            pos[a] = 0;
        }
    }
    idx
}

/// Geometry of an ONNX Slice (opset 13): per axis of `shape`, the first index, the step and
/// the output extent.
pub fn slice_geometry(
    shape: &[usize],
    starts: &[i64],
    ends: &[i64],
    axes: Option<&[i64]>,
    steps: Option<&[i64]>,
) -> OpResult<(Vec<i64>, Vec<i64>, Vec<usize>)> {
    let rank = shape.len();
    if starts.len() != ends.len() {
        return Err(format!(
            "Slice: {} starts but {} ends",
            starts.len(),
            ends.len()
        ));
    }
    let axes: Vec<usize> = match axes {
        Some(a) => a.iter().map(|&x| axis(x, rank)).collect::<OpResult<_>>()?,
        None => (0..starts.len()).collect(),
    };
    if axes.len() != starts.len() {
        return Err("Slice: axes and starts differ in length".into());
    }
    let mut begin = vec![0i64; rank];
    let mut step = vec![1i64; rank];
    let mut out = shape.to_vec();
    for (k, &a) in axes.iter().enumerate() {
        let dim = shape[a] as i64;
        let s = steps.map_or(1, |s| s.get(k).copied().unwrap_or(1));
        if s == 0 {
            return Err("Slice: step 0".into());
        }
        let clamp = |v: i64, lo: i64, hi: i64| v.max(lo).min(hi);
        let norm = |v: i64| if v < 0 { v.saturating_add(dim) } else { v };
        let (b, e) = if s > 0 {
            (clamp(norm(starts[k]), 0, dim), clamp(norm(ends[k]), 0, dim))
        } else {
            (
                clamp(norm(starts[k]), -1, dim - 1),
                clamp(norm(ends[k]), -1, dim - 1),
            )
        };
        // In i128: a step near i64::MIN or MAX must not overflow.
        let (b128, e128, s128) = (i128::from(b), i128::from(e), i128::from(s));
        let n = if s > 0 {
            ((e128 - b128).max(0) + s128 - 1) / s128
        } else {
            ((b128 - e128).max(0) + (-s128) - 1) / (-s128)
        };
        begin[a] = b;
        step[a] = s;
        out[a] = n as usize;
    }
    Ok((begin, step, out))
}

/// ONNX Slice (opset 13): `starts`, `ends`, optional `axes` and `steps`.
pub fn slice(
    t: &Tensor,
    starts: &[i64],
    ends: &[i64],
    axes: Option<&[i64]>,
    steps: Option<&[i64]>,
) -> OpResult<Tensor> {
    let rank = t.shape.len();
    let (begin, step, shape) = slice_geometry(&t.shape, starts, ends, axes, steps)?;
    let st = strides(&t.shape);
    let total = numel(&shape)?;
    let mut idx = Vec::with_capacity(total);
    let mut pos = vec![0usize; rank];
    for _ in 0..total {
        let mut flat = 0i128;
        for a in 0..rank {
            flat += (i128::from(begin[a]) + pos[a] as i128 * i128::from(step[a])) * st[a] as i128;
        }
        idx.push(flat as usize);
        for a in (0..rank).rev() {
            pos[a] += 1;
            if pos[a] < shape[a] {
                break;
            }
            pos[a] = 0;
        }
    }
    Ok(t.take(shape, idx.into_iter()))
}

/// ONNX Gather along `axis` with (possibly negative) indices.
pub fn gather(t: &Tensor, indices: &Tensor, axis_: i64) -> OpResult<Tensor> {
    let rank = t.shape.len();
    let ax = axis(axis_, rank)?;
    let dim = t.shape[ax] as i64;
    let ind: Vec<usize> = indices
        .to_i64()
        .iter()
        .map(|&i| {
            let j = if i < 0 { i + dim } else { i };
            if j < 0 || j >= dim {
                Err(format!(
                    "Gather: index {i} out of range for dimension {dim}"
                ))
            } else {
                Ok(j as usize)
            }
        })
        .collect::<OpResult<_>>()?;
    let outer: usize = t.shape[..ax].iter().product();
    let inner: usize = t.shape[ax + 1..].iter().product();
    let mut shape = t.shape[..ax].to_vec();
    shape.extend_from_slice(&indices.shape);
    shape.extend_from_slice(&t.shape[ax + 1..]);
    numel(&shape)?;
    let mut idx = Vec::new();
    for o in 0..outer {
        for &i in &ind {
            let base = (o * t.shape[ax] + i) * inner;
            idx.extend(base..base + inner);
        }
    }
    Ok(t.take(shape, idx.into_iter()))
}

/// ONNX Reshape's target: 0 copies the input dim (unless `allowzero`), -1 is inferred.
pub fn reshape_target(input: &[usize], target: &[i64], allowzero: bool) -> OpResult<Vec<usize>> {
    let total = numel(input)?;
    let mut out = Vec::with_capacity(target.len());
    let mut infer = None;
    for (i, &d) in target.iter().enumerate() {
        match d {
            -1 => {
                if infer.replace(i).is_some() {
                    return Err(format!("Reshape: more than one -1 in {target:?}"));
                }
                out.push(1);
            }
            0 if !allowzero => out.push(*input.get(i).ok_or_else(|| {
                format!("Reshape: 0 at {i} but the input has rank {}", input.len())
            })?),
            d if d >= 0 => out.push(d as usize),
            _ => return Err(format!("Reshape: invalid dimension {d} in {target:?}")),
        }
    }
    let known = numel(&out)?;
    if let Some(i) = infer {
        if known == 0 || total % known != 0 {
            return Err(format!(
                "Reshape: cannot infer -1 of {target:?} for {input:?}"
            ));
        }
        out[i] = total / known;
    }
    if numel(&out)? != total {
        return Err(format!("Reshape: {input:?} cannot become {target:?}"));
    }
    Ok(out)
}

/// ONNX Expand: broadcast `t` to `shape` (bidirectionally).
pub fn expand(t: &Tensor, shape: &[i64]) -> OpResult<Tensor> {
    let want: Vec<usize> = shape
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| format!("Expand: negative dimension {d}")))
        .collect::<OpResult<_>>()?;
    let out = broadcast_shape(&t.shape, &want)?;
    numel(&out)?;
    let idx = broadcast_index(&t.shape, &out);
    Ok(t.take(out, idx.into_iter()))
}

/// ONNX Where(cond, x, y) with broadcasting.
pub fn where_(c: &Tensor, x: &Tensor, y: &Tensor) -> OpResult<Tensor> {
    let s = broadcast_shape(&broadcast_shape(&c.shape, &x.shape)?, &y.shape)?;
    numel(&s)?;
    let (ic, ix, iy) = (
        broadcast_index(&c.shape, &s),
        broadcast_index(&x.shape, &s),
        broadcast_index(&y.shape, &s),
    );
    let cv = c.to_i64();
    if x.elem() == Elem::F32 || y.elem() == Elem::F32 {
        let (xv, yv) = (x.to_f32(), y.to_f32());
        let v = (0..ic.len())
            .map(|k| if cv[ic[k]] != 0 { xv[ix[k]] } else { yv[iy[k]] })
            .collect();
        Ok(Tensor::f32(s, v))
    } else {
        let (xv, yv) = (x.to_i64(), y.to_i64());
        let v = (0..ic.len())
            .map(|k| if cv[ic[k]] != 0 { xv[ix[k]] } else { yv[iy[k]] })
            .collect();
        Ok(Tensor::i64(s, v))
    }
}

/// Shared constant tensors.
pub type Const = Arc<Tensor>;

#[cfg(test)]
mod tests {
    use super::*;

    fn f(shape: &[usize]) -> Tensor {
        let n = shape.iter().product::<usize>();
        Tensor::f32(shape.to_vec(), (0..n).map(|i| i as f32).collect())
    }

    #[test]
    fn broadcasting_matches_numpy_rules() {
        assert_eq!(broadcast_shape(&[2, 3, 1], &[3, 4]).unwrap(), vec![2, 3, 4]);
        assert!(broadcast_shape(&[2, 3], &[4]).is_err());
        // Per-channel constant against [N, C, D, H, W], the fast per-row path.
        let x = f(&[2, 3, 2, 1, 2]);
        let c = Tensor::f32(vec![3, 1, 1, 1], vec![10.0, 20.0, 30.0]);
        let y = binary(BinOp::Add, x.clone(), &c).unwrap();
        let yv = y.as_f32().unwrap();
        for (i, v) in yv.iter().enumerate() {
            let ch = (i / 4) % 3;
            assert_eq!(*v, i as f32 + 10.0 * (ch + 1) as f32, "at {i}");
        }
        // General path (b broadcast along a middle axis) against the same rule.
        let b = f(&[2, 1, 2, 1, 2]);
        let y = binary(BinOp::Mul, x.clone(), &b).unwrap();
        let st = strides(&[2, 3, 2, 1, 2]);
        for (i, v) in y.as_f32().unwrap().iter().enumerate() {
            let (n, d, w) = (i / st[0], (i / st[2]) % 2, i % 2);
            assert_eq!(*v, i as f32 * (n * 4 + d * 2 + w) as f32);
        }
        // Comparisons give int64.
        let e = binary(
            BinOp::Equal,
            Tensor::i64(vec![2], vec![1, 2]),
            &Tensor::i64(vec![], vec![2]),
        )
        .unwrap();
        assert_eq!(e.data, Data::I64(vec![0, 1]));
    }

    #[test]
    fn layout_ops_follow_onnx() {
        let x = f(&[2, 3, 4]);
        let t = transpose(&x, Some(&[2, 0, 1])).unwrap();
        assert_eq!(t.shape, vec![4, 2, 3]);
        assert_eq!(t.as_f32().unwrap()[..4], [0.0, 4.0, 8.0, 12.0]);
        let s = slice(&x, &[1, -3], &[i64::MAX, -1], Some(&[0, 2]), None).unwrap();
        assert_eq!(s.shape, vec![1, 3, 2]);
        assert_eq!(s.as_f32().unwrap()[..2], [13.0, 14.0]);
        let r = slice(&x, &[-1], &[i64::MIN], Some(&[2]), Some(&[-2])).unwrap();
        assert_eq!(r.shape, vec![2, 3, 2]);
        assert_eq!(r.as_f32().unwrap()[..2], [3.0, 1.0]);
        let g = gather(
            &Tensor::i64(vec![5], vec![1, 1, 32, 32, 16]),
            &Tensor::i64(vec![], vec![-1]),
            0,
        )
        .unwrap();
        assert_eq!((g.shape.clone(), g.data), (vec![], Data::I64(vec![16])));
        let c = concat(&[&x, &f(&[2, 1, 4])], 1).unwrap();
        assert_eq!(c.shape, vec![2, 4, 4]);
        assert_eq!(c.as_f32().unwrap()[12..17], [0.0, 1.0, 2.0, 3.0, 12.0]);
        assert_eq!(
            reshape_target(&[2, 3, 4], &[0, -1], false).unwrap(),
            vec![2, 12]
        );
        assert!(reshape_target(&[2, 3, 4], &[5, -1], false).is_err());
        assert!(reshape_target(&[2, 3, 4], &[-1, -1], false).is_err());
        let e = expand(&Tensor::f32(vec![3, 1], vec![1.0, 2.0, 3.0]), &[2, 3, 2]).unwrap();
        assert_eq!(e.shape, vec![2, 3, 2]);
        assert_eq!(e.as_f32().unwrap()[..6], [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]);
    }
}
