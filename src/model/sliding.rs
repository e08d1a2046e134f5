//! Sliding-window inference over a whole scan, with the semantics of MONAI's
//! `monai.inferers.sliding_window_inference`, and nnU-Net's test-time mirroring.
//!
//! - Window starts per axis every `int(roi · (1 − overlap))` voxels (`roi` where the scan is
//!   exactly the roi), the last one flush with the end; a scan smaller than the roi along an
//!   axis is padded with zeros, `⌊diff/2⌋` before and the rest after, and the output cropped
//!   back.
//! - Each window's prediction is weighted by the importance map (a separable gaussian with
//!   `σ = roi · sigma_scale`, clamped below at `max(min, 1e-3)`, or constant ones) and the output
//!   is `Σ wᵢ·predᵢ / Σ wᵢ`.
//! - Mirroring over a set of spatial axes: the prediction of a window is the average over every
//!   subset of those axes of `flip(net(flip(x)))` (the identity first).
//!
//! Windows run in MONAI's order (depth outermost), `batch` per network call. Their weighted
//! predictions go into a ring of output rows `roi depth` deep (deeper when a batch spans
//! several depth positions): once the next window starts at depth `z`, every row above `z` is
//! final and leaves as a slab, normalised and converted (logits, softmax probabilities or
//! argmax labels). Working memory is that ring, not the scan × classes.

use std::ops::{ControlFlow, Range};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde::Deserialize;

use super::graph::Arena;
use super::{LayerTiming, Model, ModelPlan};
use crate::kernel::par::par_blocks;
use crate::kernel::KernelError;

/// How a window's prediction is weighted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Blend {
    #[default]
    Gaussian,
    Constant,
}

impl Blend {
    pub fn name(self) -> &'static str {
        match self {
            Blend::Gaussian => "gaussian",
            Blend::Constant => "constant",
        }
    }
}

/// What a sliding-window call returns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WindowOutput {
    /// The blended logits, `[N, C, D, H, W]`.
    #[default]
    Logits,
    /// Softmax over the channels of the blended logits.
    Probabilities,
    /// Argmax over the channels (first on ties), `[N, 1, D, H, W]`.
    Labels,
}

impl WindowOutput {
    pub fn name(self) -> &'static str {
        match self {
            WindowOutput::Logits => "logits",
            WindowOutput::Probabilities => "probabilities",
            WindowOutput::Labels => "labels",
        }
    }
}

/// One value for every axis, or one per axis `[D, H, W]`.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PerAxis {
    One(f64),
    Three([f64; 3]),
}

impl PerAxis {
    pub fn axes(self) -> [f64; 3] {
        match self {
            PerAxis::One(v) => [v; 3],
            PerAxis::Three(v) => v,
        }
    }
}

/// Sliding-window options as asked for (a request, or `[sliding_window]` in a model.toml):
/// `None` takes the default.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowRequest {
    pub roi: Option<[usize; 3]>,
    pub overlap: Option<PerAxis>,
    pub blend: Option<Blend>,
    pub sigma_scale: Option<PerAxis>,
    pub batch: Option<usize>,
    pub mirror: Option<Vec<usize>>,
    pub output: Option<WindowOutput>,
}

/// Most windows per network call.
pub const MAX_BATCH: usize = 64;

/// Built-in defaults (MONAI's).
pub const DEFAULT_OVERLAP: f64 = 0.25;
pub const DEFAULT_SIGMA_SCALE: f64 = 0.125;

/// A bad option: the field (of the `SlidingWindow` message) and why.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct WindowError {
    pub field: &'static str,
    pub message: String,
}

fn bad(field: &'static str, message: String) -> WindowError {
    WindowError { field, message }
}

/// Options resolved: every value set and checked.
#[derive(Clone, Debug, PartialEq)]
pub struct WindowOptions {
    pub roi: [usize; 3],
    pub overlap: [f64; 3],
    pub blend: Blend,
    pub sigma_scale: [f64; 3],
    pub batch: usize,
    /// Spatial axes (0 = D, 1 = H, 2 = W), ascending, no repeats.
    pub mirror: Vec<usize>,
    pub output: WindowOutput,
}

impl WindowRequest {
    /// Each field of `self`, or of `defaults` where `self` leaves it unset.
    pub fn or(&self, defaults: &WindowRequest) -> WindowRequest {
        WindowRequest {
            roi: self.roi.or(defaults.roi),
            overlap: self.overlap.or(defaults.overlap),
            blend: self.blend.or(defaults.blend),
            sigma_scale: self.sigma_scale.or(defaults.sigma_scale),
            batch: self.batch.or(defaults.batch),
            mirror: self.mirror.clone().or_else(|| defaults.mirror.clone()),
            output: self.output.or(defaults.output),
        }
    }

    /// Checks every value and fills the defaults; `model_roi` is the model's fixed input
    /// spatial shape, if it has one.
    pub fn resolve(&self, model_roi: Option<[usize; 3]>) -> Result<WindowOptions, WindowError> {
        let roi =
            match (self.roi, model_roi) {
                (Some(r), _) => r,
                (None, Some(r)) => r,
                (None, None) => return Err(bad(
                    "roi",
                    "the model's input has no fixed spatial shape: give the window size [D, H, W]"
                        .into(),
                )),
            };
        if roi.contains(&0) {
            return Err(bad(
                "roi",
                format!("expected three sizes >= 1 [D, H, W], got {roi:?}"),
            ));
        }
        if let Some(m) = model_roi.filter(|&m| m != roi) {
            return Err(bad(
                "roi",
                format!("the model takes windows of exactly {m:?} [D, H, W], got {roi:?}"),
            ));
        }
        let overlap = self.overlap.map_or([DEFAULT_OVERLAP; 3], PerAxis::axes);
        if let Some(o) = overlap.iter().find(|o| !(0.0..1.0).contains(*o)) {
            return Err(bad(
                "overlap",
                format!("expected values in [0, 1), got {o} ({overlap:?})"),
            ));
        }
        let sigma_scale = self
            .sigma_scale
            .map_or([DEFAULT_SIGMA_SCALE; 3], PerAxis::axes);
        if let Some(s) = sigma_scale.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            return Err(bad(
                "sigma_scale",
                format!("expected finite values > 0, got {s} ({sigma_scale:?})"),
            ));
        }
        let batch = self.batch.unwrap_or(1);
        if !(1..=MAX_BATCH).contains(&batch) {
            return Err(bad(
                "batch",
                format!("expected 1 to {MAX_BATCH} windows per call, got {batch}"),
            ));
        }
        let mut mirror = self.mirror.clone().unwrap_or_default();
        mirror.sort_unstable();
        let repeated = mirror.windows(2).any(|w| w[0] == w[1]);
        if repeated || mirror.iter().any(|&a| a > 2) {
            return Err(bad(
                "mirror",
                format!(
                    "expected spatial axes among 0 (D), 1 (H), 2 (W), each at most once, got {:?}",
                    self.mirror.as_deref().unwrap_or_default()
                ),
            ));
        }
        Ok(WindowOptions {
            roi,
            overlap,
            blend: self.blend.unwrap_or_default(),
            sigma_scale,
            batch,
            mirror,
            output: self.output.unwrap_or_default(),
        })
    }
}

/// Window starts along one axis of (padded) size `size`: MONAI's `_get_scan_interval` and
/// `dense_patch_slices`.
pub fn window_starts(size: usize, roi: usize, overlap: f64) -> Vec<usize> {
    let interval = if roi == size {
        roi
    } else {
        ((roi as f64 * (1.0 - overlap)) as usize).max(1)
    };
    let num = size.div_ceil(interval);
    let count = (0..num)
        .find(|d| d * interval + roi >= size)
        .map_or(1, |d| d + 1);
    (0..count)
        .map(|i| {
            let s = i * interval;
            s - (s + roi).saturating_sub(size)
        })
        .collect()
}

/// The importance map over a window `[rd, rh, rw]`, as MONAI's `compute_importance_map`
/// computes it (float32).
pub fn importance_map(roi: [usize; 3], blend: Blend, sigma_scale: [f64; 3]) -> Vec<f32> {
    let n = roi.iter().product::<usize>();
    if blend == Blend::Constant {
        return vec![1.0; n];
    }
    let axis = |a: usize| -> Vec<f32> {
        let r = roi[a];
        let sigma = r as f64 * sigma_scale[a];
        let denom = (-2.0 * sigma * sigma) as f32;
        (0..r)
            .map(|k| {
                let x = (-((r as f64 - 1.0) / 2.0) + k as f64) as f32;
                (x * x / denom).exp()
            })
            .collect()
    };
    let (gz, gy, gx) = (axis(0), axis(1), axis(2));
    let mut map = Vec::with_capacity(n);
    for &z in &gz {
        for &y in &gy {
            let zy = z * y;
            map.extend(gx.iter().map(|&x| zy * x));
        }
    }
    let min = map.iter().copied().fold(f32::INFINITY, f32::min);
    let floor = min.max(1e-3);
    for v in &mut map {
        *v = v.max(floor);
    }
    map
}

/// Element type of label outputs for `classes` classes: values up to 255 fit a byte.
pub fn labels_fit_u8(classes: usize) -> bool {
    classes <= 256
}

/// A scan planned for sliding windows: windows, importance map, the model's plans per
/// window batch, and the ring's depth.
#[derive(Clone, Debug)]
pub struct SlidingPlan {
    pub opts: WindowOptions,
    /// The scan, `[N, C, D, H, W]`.
    pub scan: [usize; 5],
    /// The output, `[N, K, D, H, W]` (`K` = 1 for labels).
    pub output: [usize; 5],
    /// The model's output channels.
    pub classes: usize,
    padded: [usize; 3],
    pad_before: [usize; 3],
    /// Window starts in padded coordinates, MONAI's order (depth outermost).
    windows: Vec<[usize; 3]>,
    /// Windows per network call: `batch`, and the remainder of the last call of an item.
    full: ModelPlan,
    rest: Option<ModelPlan>,
    importance: Vec<f32>,
    ring_depth: usize,
    /// Output depth rows per slab at most.
    slab_rows: usize,
    /// Window starts per axis (padded coordinates).
    starts: [Vec<usize>; 3],
    /// Network calls run at once (each on `threads / lanes` threads).
    lanes: usize,
}

impl SlidingPlan {
    /// Plans `opts` over `scan` for `model`, with up to `lanes` network calls at once
    /// (windows in parallel: U-Nets scale better over windows than over one window's
    /// threads; each lane holds its own windows and network working memory).
    pub fn new(
        model: &Model,
        scan: [usize; 5],
        opts: WindowOptions,
        lanes: usize,
    ) -> Result<Self, PlanError> {
        let [n, c, d, h, w] = scan;
        let dims = [d, h, w];
        const NAMES: [&str; 5] = ["N", "C", "D", "H", "W"];
        if let Some(i) = scan.iter().position(|&v| v == 0) {
            return Err(PlanError::Kernel(KernelError::EmptyDimension {
                tensor: "input",
                dim: NAMES[i],
            }));
        }
        let roi = opts.roi;
        let padded = [0, 1, 2].map(|a| dims[a].max(roi[a]));
        let pad_before = [0, 1, 2].map(|a| (padded[a] - dims[a]) / 2);
        let starts = [0, 1, 2].map(|a| window_starts(padded[a], roi[a], opts.overlap[a]));
        let mut windows = Vec::new();
        for &z in &starts[0] {
            for &y in &starts[1] {
                for &x in &starts[2] {
                    windows.push([z, y, x]);
                }
            }
        }
        let per_item = windows.len();
        let batch = opts.batch.min(per_item);
        let plan_for = |b: usize| -> Result<ModelPlan, PlanError> {
            let input = [b, c, roi[0], roi[1], roi[2]];
            let dims = model.input_dims();
            if dims.first().is_some_and(|&d0| d0 > 0 && d0 as usize != b) {
                return Err(PlanError::Window(bad(
                    "batch",
                    format!(
                        "model {} takes exactly {} window(s) per call (its input's batch \
                         dimension is fixed), got {b}",
                        model.name, dims[0]
                    ),
                )));
            }
            let plan = model.plan(input).map_err(PlanError::Kernel)?;
            let o = plan.output;
            if o[0] != b || o[2..] != roi[..] {
                return Err(PlanError::Window(bad(
                    "roi",
                    format!(
                        "model {} turns a {:?} window into {:?}; sliding windows need an output \
                         of the window's spatial size",
                        model.name, input, o
                    ),
                )));
            }
            Ok(plan)
        };
        let full = plan_for(batch)?;
        let classes = full.output[1];
        let rest = match per_item % batch {
            0 => None,
            r => Some(plan_for(r)?),
        };
        let lanes = lanes.clamp(1, per_item.div_ceil(batch));
        let wave = batch * lanes;
        if opts.output != WindowOutput::Logits && classes < 2 {
            return Err(PlanError::Window(bad(
                "output",
                format!(
                    "{} needs at least 2 output channels; model {} gives {classes} (allowed: logits)",
                    opts.output.name(),
                    model.name
                ),
            )));
        }
        if opts.output == WindowOutput::Labels && classes > 1 << 16 {
            return Err(PlanError::Window(bad(
                "output",
                format!("labels take at most 65536 classes, model {} gives {classes} (allowed: logits, probabilities)", model.name),
            )));
        }
        // The ring: rows from the first not yet sent to the end of the window being weighted
        // in. Rows are sent as [`SlidingPlan::run`] sends them: those above a window's start
        // before it is weighted in (windows come in depth order), and those above the next
        // wave's first window after each wave. So a wave spanning two rows of windows needs
        // no deeper ring: the ring is one window deep. Also the most rows sent at once.
        let (mut ring_depth, mut max_rows, mut sent) = (0usize, 0usize, 0usize);
        for (i, group) in windows.chunks(wave).enumerate() {
            for s in group {
                max_rows = max_rows.max(s[0].saturating_sub(sent));
                sent = sent.max(s[0]);
                ring_depth = ring_depth.max(s[0] + roi[0] - sent);
            }
            let next = windows.get((i + 1) * wave).map_or(padded[0], |s| s[0]);
            max_rows = max_rows.max(next.saturating_sub(sent));
            sent = sent.max(next);
        }
        let out_channels = if opts.output == WindowOutput::Labels {
            1
        } else {
            classes
        };
        let output = [n, out_channels, d, h, w];
        // Checked sizes before anything is allocated.
        let overflow = || {
            PlanError::Kernel(KernelError::Overflow {
                what: "sliding-window buffers",
            })
        };
        [
            (classes + 1)
                .checked_mul(ring_depth)
                .and_then(|v| v.checked_mul(padded[1]))
                .and_then(|v| v.checked_mul(padded[2])),
            output.iter().try_fold(1usize, |a, &v| a.checked_mul(v)),
        ]
        .iter()
        .all(Option::is_some)
        .then_some(())
        .ok_or_else(overflow)?;
        let importance = importance_map(roi, opts.blend, opts.sigma_scale);
        Ok(Self {
            opts,
            scan,
            output,
            classes,
            padded,
            pad_before,
            windows,
            full,
            rest,
            importance,
            ring_depth,
            slab_rows: max_rows
                .min(d)
                .min((SLAB_BYTES / (out_channels * h * w * 4)).max(1))
                .max(1),
            starts,
            lanes,
        })
    }

    /// Windows over the whole call (every batch item).
    pub fn windows_total(&self) -> u64 {
        (self.windows.len() * self.scan[0]) as u64
    }

    /// Network runs per window: 2^(mirrored axes).
    pub fn runs_per_window(&self) -> usize {
        1 << self.opts.mirror.len()
    }

    /// FLOPs of the convolutions over the whole call.
    pub fn flops(&self) -> f64 {
        let per_window = self.full.flops() / self.full.input[0] as f64;
        per_window * self.windows_total() as f64 * self.runs_per_window() as f64
    }

    /// The model's plan for a full call of windows.
    pub fn window_plan(&self) -> &ModelPlan {
        &self.full
    }

    /// Network calls run at once.
    pub fn lanes(&self) -> usize {
        self.lanes
    }

    /// Bytes of one output slab at most (`[K, rows, H, W]` float32).
    pub fn slab_bytes(&self) -> usize {
        let [_, k, _, h, w] = self.output;
        k * self.slab_rows * h * w * 4
    }

    /// Working memory besides the decoded scan: the ring and its weights, a call's windows
    /// in and out (mirrored copies included), the model's own working memory, one slab.
    pub fn working_bytes(&self, threads: usize) -> usize {
        let [_, c, ..] = self.scan;
        let win = self.opts.roi.iter().product::<usize>();
        let b = self.full.input[0];
        let mirrored = usize::from(!self.opts.mirror.is_empty());
        // The ring of weighted predictions and one plane of weights.
        let ring = (self.classes * self.ring_depth + 1) * self.padded[1] * self.padded[2] * 4;
        let input = b * c * win * 4 * (1 + mirrored);
        let pred = b * self.classes * win * 4 * (1 + mirrored);
        let lanes = self.lanes.min(threads.max(1));
        let per_lane = (threads / lanes).max(1);
        // A lane's arena releases free buffers too small for a request: the network holds
        // its largest live set.
        let lane = input + pred + self.full.lane_working_bytes(per_lane);
        ring + lanes * lane + self.slab_bytes()
    }

    /// Runs every window of `input` (`[N, C, D, H, W]`); finished slabs go to `emit`
    /// (batch item, output depth rows, `[K, rows, H, W]`), `progress` hears
    /// (windows done, total) after every wave of network calls. With `lanes` > 1 (see
    /// [`SlidingPlan::new`]) that many calls run at once, each on `threads / lanes` threads;
    /// their predictions are weighted in in window order, so the result has the same bits
    /// whatever the threads and lanes.
    pub fn run(
        &self,
        model: &Model,
        input: Source<'_>,
        threads: usize,
        cancel: Option<&AtomicBool>,
        progress: Option<&(dyn Fn(u64, u64) + Send + Sync)>,
        emit: &mut EmitSlab<'_>,
    ) -> Result<Vec<LayerTiming>, KernelError> {
        let [n, c, d, h, w] = self.scan;
        let [rd, rh, rw] = self.opts.roi;
        let k = self.classes;
        let [_, ph, pw] = self.padded;
        let plane = ph * pw;
        let depth = self.ring_depth;
        let mut ring = vec![0f32; k * depth * plane];
        let mut buf = FinishBuffers::default();
        let mut timings: Vec<LayerTiming> = Vec::new();
        let mut blend_time = std::time::Duration::ZERO;
        let total = self.windows_total();
        let mut done = 0u64;
        let batch = self.full.input[0];
        let lanes = self.lanes.min(threads.max(1));
        let per_lane = (threads / lanes).max(1);
        let wave = batch * lanes;
        let item_len = c * d * h * w;
        // Each lane's buffers, kept from window to window: its windows' inputs, the
        // network's activations, its predictions (the allocator would map and zero them
        // afresh every window).
        let mut arenas: Vec<Arena> = (0..lanes).map(|_| Arena::default()).collect();
        for item in 0..n {
            let mut sent = 0usize;
            for (g, windows) in self.windows.chunks(wave).enumerate() {
                if cancel.is_some_and(|f| f.load(Ordering::Relaxed)) {
                    return Err(KernelError::Cancelled);
                }
                let groups: Vec<&[[usize; 3]]> = windows.chunks(batch).collect();
                // The windows' inputs: from the scan, or from the rows fed so far (then
                // the rows no later window reads are released for the next ones).
                let t0 = Instant::now();
                let mut xs: Vec<Vec<f32>> = groups
                    .iter()
                    .zip(&mut arenas)
                    .map(|(grp, arena)| {
                        let mut x = arena.take(grp.len() * c * rd * rh * rw);
                        x.fill(0.0);
                        x
                    })
                    .collect();
                // Window by window, in order. A fed scan releases the rows above the next
                // window before the one after is waited for, so the feed holds one window's
                // depth even when a wave spans two rows of windows.
                let dsts = xs
                    .iter_mut()
                    .flat_map(|x| x.chunks_exact_mut(c * rd * rh * rw));
                for (index, (win, dst)) in (g * wave + 1..).zip(windows.iter().zip(dsts)) {
                    match input {
                        Source::Whole(scan) => {
                            let scan = &scan[item * item_len..(item + 1) * item_len];
                            self.gather_one(
                                |ch, z| &scan[(ch * d + z) * h * w..][..h * w],
                                win,
                                dst,
                            );
                        }
                        Source::Fed(feed) => {
                            let end = self.scan_rows(win).end;
                            let state = feed.wait_rows(item * d + end, cancel)?;
                            self.gather_one(|_, z| state.row(item * d + z), win, dst);
                            let next = self
                                .windows
                                .get(index)
                                .map_or(d, |s| self.scan_rows(s).start);
                            feed.release(state, item * d + next);
                        }
                    }
                }
                blend_time += t0.elapsed();
                let mut xs = xs.into_iter();
                let first_x = xs.next().unwrap_or_default();
                let (first_arena, other_arenas) =
                    arenas.split_first_mut().expect("at least one lane");
                let preds = if groups.len() == 1 {
                    vec![self.predict(model, first_x, groups[0], per_lane, cancel, first_arena)]
                } else {
                    std::thread::scope(|sc| {
                        let handles: Vec<_> = groups[1..]
                            .iter()
                            .zip(xs)
                            .zip(other_arenas.iter_mut())
                            .map(|((grp, x), arena)| {
                                sc.spawn(move || {
                                    self.predict(model, x, grp, per_lane, cancel, arena)
                                })
                            })
                            .collect();
                        let first =
                            self.predict(model, first_x, groups[0], per_lane, cancel, first_arena);
                        std::iter::once(first)
                            .chain(handles.into_iter().map(|hd| {
                                hd.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
                            }))
                            .collect::<Vec<_>>()
                    })
                };
                let t0 = Instant::now();
                for ((group, pred), arena) in groups.iter().zip(preds).zip(&mut arenas) {
                    let (pred, t) = pred?;
                    merge_timings(&mut timings, t);
                    // Weighted into the ring, after the rows above the window's start are
                    // sent: no later window (depth order) touches them.
                    for (j, &[z0, y0, x0]) in group.iter().enumerate() {
                        if z0 > sent {
                            let f = self.finish_rows(item, sent..z0, &mut ring, &mut buf, emit);
                            sent = z0;
                            if f.is_break() {
                                return Err(KernelError::Cancelled);
                            }
                        }
                        // Ring rows (class, row) split over the threads: each voxel's sum
                        // still grows window by window, the same bits on any thread count.
                        let pred = &pred;
                        par_blocks(&mut ring, plane, threads, |b0, part| {
                            for (i, ring_row) in part.chunks_mut(plane).enumerate() {
                                let (ch, row) = ((b0 + i) / depth, (b0 + i) % depth);
                                // The window's depth z landing on this ring row.
                                let z = (row + depth - z0 % depth) % depth;
                                if z >= rd {
                                    continue;
                                }
                                for y in 0..rh {
                                    let wm = &self.importance[(z * rh + y) * rw..][..rw];
                                    let at = (y0 + y) * pw + x0;
                                    let p =
                                        &pred[((j * k + ch) * rd + z) * rh * rw + y * rw..][..rw];
                                    for ((acc, v), m) in
                                        ring_row[at..at + rw].iter_mut().zip(p).zip(wm)
                                    {
                                        *acc += v * m;
                                    }
                                }
                            }
                        });
                    }
                    arena.give_vec(pred);
                }
                done += windows.len() as u64;
                // Rows no later window of this item touches are final.
                let next = self
                    .windows
                    .get((g + 1) * wave)
                    .map_or(self.padded[0], |s| s[0]);
                let flow = if next > sent {
                    let f = self.finish_rows(item, sent..next, &mut ring, &mut buf, emit);
                    sent = next;
                    f
                } else {
                    ControlFlow::Continue(())
                };
                blend_time += t0.elapsed();
                if let Some(p) = progress {
                    p(done, total);
                }
                if flow.is_break() {
                    return Err(KernelError::Cancelled);
                }
            }
        }
        timings.push(LayerTiming {
            strategy: "sliding_window_blend",
            compute_ms: blend_time.as_secs_f64() * 1e3,
            stages: Default::default(),
        });
        Ok(timings)
    }

    /// One call's prediction `[b, K, rd, rh, rw]` from its windows' inputs `x`: the identity
    /// run, then each mirrored one flipped back, averaged; with the network's layer times.
    fn predict(
        &self,
        model: &Model,
        x: Vec<f32>,
        group: &[[usize; 3]],
        threads: usize,
        cancel: Option<&AtomicBool>,
        arena: &mut Arena,
    ) -> Result<(Vec<f32>, Vec<LayerTiming>), KernelError> {
        let [_, c, ..] = self.scan;
        let [rd, rh, rw] = self.opts.roi;
        let (b, k) = (group.len(), self.classes);
        let plan = if b == self.full.input[0] {
            &self.full
        } else {
            self.rest.as_ref().unwrap_or(&self.full)
        };
        let subsets = mirror_subsets(&self.opts.mirror);
        let mut timings = Vec::new();
        let mut pred = Vec::new();
        // The identity run takes `x` itself unless mirrored runs still need it.
        let mut own = Some(x);
        for (s, &axes) in subsets.iter().enumerate() {
            let x = own.as_ref().expect("kept until the last run");
            let xin = if axes != 0 {
                let mut v = arena.take(x.len());
                flip_into(x, [b * c, rd, rh, rw], axes, &mut v);
                v
            } else if subsets.len() > 1 {
                let mut v = arena.take(x.len());
                v.copy_from_slice(x);
                v
            } else {
                own.take().expect("the only run")
            };
            let (y, t) = plan.run_whole(model, xin, threads, cancel, arena)?;
            if y.len() != b * k * rd * rh * rw {
                return Err(KernelError::BufferLength {
                    what: "window prediction",
                    expected: b * k * rd * rh * rw,
                    got: y.len(),
                });
            }
            merge_timings(&mut timings, t);
            if s == 0 {
                pred = y;
            } else {
                let mut back = arena.take(y.len());
                flip_into(&y, [b * k, rd, rh, rw], axes, &mut back);
                for (p, v) in pred.iter_mut().zip(&back) {
                    *p += v;
                }
                arena.give_vec(back);
                arena.give_vec(y);
            }
        }
        if let Some(x) = own {
            arena.give_vec(x);
        }
        if subsets.len() > 1 {
            let runs = subsets.len() as f32;
            for p in &mut pred {
                *p /= runs;
            }
        }
        Ok((pred, timings))
    }

    /// One window's input `[C, rd, rh, rw]` into `x` (zero outside the scan; `x` zeroed).
    fn gather_one<'s>(
        &self,
        plane: impl Fn(usize, usize) -> &'s [f32],
        &[z0, y0, x0]: &[usize; 3],
        x: &mut [f32],
    ) {
        let [_, c, d, h, w] = self.scan;
        let [rd, rh, rw] = self.opts.roi;
        let [pd, ph, pw] = self.pad_before;
        for ch in 0..c {
            let dst = &mut x[ch * rd * rh * rw..][..rd * rh * rw];
            // Padded column range that lies inside the scan.
            let lo = pw.saturating_sub(x0).min(rw);
            let hi = (pw + w).saturating_sub(x0).min(rw).max(lo);
            for z in 0..rd {
                let Some(sz) = (z0 + z).checked_sub(pd).filter(|&v| v < d) else {
                    continue;
                };
                let src = plane(ch, sz);
                for y in 0..rh {
                    let Some(sy) = (y0 + y).checked_sub(ph).filter(|&v| v < h) else {
                        continue;
                    };
                    let row = &src[sy * w..][..w];
                    let out = &mut dst[(z * rh + y) * rw..][..rw];
                    out[lo..hi].copy_from_slice(&row[x0 + lo - pw..x0 + hi - pw]);
                }
            }
        }
    }

    /// Scan depth rows `[lo, hi)` the window starting at `z0` reads (padding aside).
    fn scan_rows(&self, &[z0, ..]: &[usize; 3]) -> Range<usize> {
        let (pd, d, rd) = (self.pad_before[0], self.scan[2], self.opts.roi[0]);
        let lo = z0.saturating_sub(pd).min(d);
        lo..(z0 + rd).saturating_sub(pd).min(d).max(lo)
    }

    /// Rows an [`InputFeed`] for this plan holds at once: one window's depth span (single-
    /// channel scans only: in NCDHW order a second channel's first rows arrive after the
    /// whole first channel, so nothing could be released early).
    pub fn feed_rows(&self) -> Option<usize> {
        (self.scan[1] == 1).then(|| self.ring_depth.min(self.scan[2]).max(1))
    }

    /// Bytes of the decoded scan held during a run: the feed's rows, or the whole scan.
    pub fn input_bytes_held(&self, fed: bool) -> usize {
        let [n, c, d, h, w] = self.scan;
        match self.feed_rows().filter(|_| fed) {
            Some(rows) => rows * h * w * 4,
            None => n * c * d * h * w * 4,
        }
    }

    /// Normalises padded rows `rows` of the ring, sends their part inside the scan, and
    /// clears them for the windows further down.
    fn finish_rows(
        &self,
        item: usize,
        rows: Range<usize>,
        ring: &mut [f32],
        buf: &mut FinishBuffers,
        emit: &mut EmitSlab<'_>,
    ) -> ControlFlow<()> {
        let [_, k_out, d, h, w] = self.output;
        let k = self.classes;
        let [pd, ph0, pw0] = self.pad_before;
        let [_, ph, pw] = self.padded;
        let plane = ph * pw;
        let depth = self.ring_depth;
        let lo = rows.start.max(pd);
        let hi = rows.end.min(pd + d);
        let mut start = lo;
        while start < hi {
            let end = (start + self.slab_rows).min(hi);
            let n_rows = end - start;
            buf.slab.clear();
            buf.slab.resize(k_out * n_rows * h * w, 0.0);
            buf.values.resize(k, 0.0);
            for (r, prow) in (start..end).enumerate() {
                self.weight_plane(prow, &mut buf.weight);
                let row = prow % depth;
                for y in 0..h {
                    let at = row * plane + (y + ph0) * pw + pw0;
                    let wsum = &buf.weight[(y + ph0) * pw + pw0..][..w];
                    match self.opts.output {
                        WindowOutput::Logits => {
                            for ch in 0..k {
                                let src = &ring[ch * depth * plane + at..][..w];
                                let dst = &mut buf.slab[((ch * n_rows + r) * h + y) * w..][..w];
                                for ((o, a), s) in dst.iter_mut().zip(src).zip(wsum) {
                                    *o = a / s;
                                }
                            }
                        }
                        kind => {
                            for x in 0..w {
                                for (ch, val) in buf.values.iter_mut().enumerate() {
                                    *val = ring[ch * depth * plane + at + x] / wsum[x];
                                }
                                if kind == WindowOutput::Labels {
                                    buf.slab[(r * h + y) * w + x] = argmax(&buf.values) as f32;
                                } else {
                                    softmax(&mut buf.values);
                                    for (ch, p) in buf.values.iter().enumerate() {
                                        buf.slab[((ch * n_rows + r) * h + y) * w + x] = *p;
                                    }
                                }
                            }
                        }
                    }
                }
            }
            if emit(item, start - pd..end - pd, &buf.slab).is_break() {
                return ControlFlow::Break(());
            }
            start = end;
        }
        for prow in rows {
            let row = prow % depth;
            for ch in 0..k {
                ring[(ch * depth + row) * plane..(ch * depth + row + 1) * plane].fill(0.0);
            }
        }
        ControlFlow::Continue(())
    }

    /// Σ w over the windows covering padded depth row `prow`, per voxel of the padded
    /// plane: the same sums in the same (window) order as weighting each window in would
    /// give, without a ring of weights (they do not depend on the scan).
    fn weight_plane(&self, prow: usize, plane: &mut Vec<f32>) {
        let [rd, rh, rw] = self.opts.roi;
        let [_, ph, pw] = self.padded;
        plane.clear();
        plane.resize(ph * pw, 0.0);
        for &z0 in self.starts[0]
            .iter()
            .filter(|&&z0| z0 <= prow && prow < z0 + rd)
        {
            let dz = prow - z0;
            for &y0 in &self.starts[1] {
                for &x0 in &self.starts[2] {
                    for y in 0..rh {
                        let wm = &self.importance[(dz * rh + y) * rw..][..rw];
                        let at = (y0 + y) * pw + x0;
                        for (acc, m) in plane[at..at + rw].iter_mut().zip(wm) {
                            *acc += m;
                        }
                    }
                }
            }
        }
    }
}

/// Where a run's scan comes from.
#[derive(Clone, Copy)]
pub enum Source<'a> {
    /// The whole decoded scan, `[N, C, D, H, W]`.
    Whole(&'a [f32]),
    /// Rows as they arrive (single-channel scans).
    Fed(&'a InputFeed),
}

/// A single-channel scan consumed as it arrives: a ring of depth rows (`[H, W]` each) that
/// the receiver fills in order and the windows release once no later window reads them.
/// The receiver may fill a row only once it is free ([`InputFeed::room`]); the worker waits
/// for the rows its windows read ([`InputFeed::wait_rows`]).
pub struct InputFeed {
    row_len: usize,
    cap: usize,
    total: usize,
    state: std::sync::Mutex<FeedState>,
    ready: std::sync::Condvar,
    on_release: Box<dyn Fn() + Send + Sync>,
}

/// The feed's rows, locked: read a row the worker waited for.
pub struct FeedState {
    buf: Vec<f32>,
    /// Values received (scan order).
    filled: usize,
    /// Rows before this one are no longer read.
    released: usize,
    closed: bool,
    row_len: usize,
    cap: usize,
}

impl std::fmt::Debug for InputFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InputFeed")
            .field("rows", &self.cap)
            .field("row_len", &self.row_len)
            .finish()
    }
}

impl FeedState {
    /// Global row `r` (`item · D + z`), which must have arrived and not be released.
    fn row(&self, r: usize) -> &[f32] {
        &self.buf[(r % self.cap) * self.row_len..][..self.row_len]
    }
}

impl InputFeed {
    /// A feed for `plan`'s scan holding `plan.feed_rows()` rows; `on_release` is called
    /// whenever rows are released (to wake the receiver).
    pub fn new(plan: &SlidingPlan, on_release: Box<dyn Fn() + Send + Sync>) -> Option<Self> {
        let cap = plan.feed_rows()?;
        let [n, _, d, h, w] = plan.scan;
        Some(Self {
            row_len: h * w,
            cap,
            total: n * d * h * w,
            state: std::sync::Mutex::new(FeedState {
                buf: vec![0f32; cap * h * w],
                filled: 0,
                released: 0,
                closed: false,
                row_len: h * w,
                cap,
            }),
            ready: std::sync::Condvar::new(),
            on_release,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FeedState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Values that may be pushed now (0: wait for a release).
    pub fn room(&self) -> usize {
        let s = self.lock();
        ((s.released + self.cap) * self.row_len).min(self.total) - s.filled
    }

    /// Values received so far.
    pub fn filled(&self) -> usize {
        self.lock().filled
    }

    /// Appends the next values, at most [`room`](Self::room) of them; returns how many.
    pub fn push(&self, values: &[f32]) -> usize {
        let mut s = self.lock();
        let room = ((s.released + self.cap) * self.row_len).min(self.total) - s.filled;
        let n = values.len().min(room);
        let len = s.buf.len();
        let mut done = 0;
        while done < n {
            let at = (s.filled + done) % len;
            let k = (n - done).min(len - at);
            s.buf[at..at + k].copy_from_slice(&values[done..done + k]);
            done += k;
        }
        s.filled += n;
        drop(s);
        self.ready.notify_all();
        n
    }

    /// The input failed or the call ended: a waiting worker stops.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }

    /// Waits until every row before global row `end` has arrived (checking `cancel`).
    fn wait_rows(
        &self,
        end: usize,
        cancel: Option<&AtomicBool>,
    ) -> Result<std::sync::MutexGuard<'_, FeedState>, KernelError> {
        let need = (end * self.row_len).min(self.total);
        let mut s = self.lock();
        while s.filled < need {
            if s.closed || cancel.is_some_and(|f| f.load(Ordering::Relaxed)) {
                return Err(KernelError::Cancelled);
            }
            s = self
                .ready
                .wait_timeout(s, std::time::Duration::from_millis(50))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(s)
    }

    /// Rows before global row `upto` are read by no later window.
    fn release(&self, mut s: std::sync::MutexGuard<'_, FeedState>, upto: usize) {
        if upto > s.released {
            s.released = upto;
            drop(s);
            (self.on_release)();
        }
    }
}

/// Scratch of [`SlidingPlan::finish_rows`]: one slab, one weight plane, one voxel's classes.
#[derive(Default)]
struct FinishBuffers {
    slab: Vec<f32>,
    weight: Vec<f32>,
    values: Vec<f32>,
}

/// Most bytes of one output slab (float32): a finished band of rows leaves in slabs of
/// this size, so a wide scan needs no band-sized buffer.
pub const SLAB_BYTES: usize = 4 << 20;

/// Where finished slabs go: (batch item, output depth rows, `[K, rows, H, W]`).
pub type EmitSlab<'a> = dyn FnMut(usize, Range<usize>, &[f32]) -> ControlFlow<()> + 'a;

/// Why a sliding-window call cannot be planned: a bad option, or the model refusing the
/// window shape.
#[derive(Clone, Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Window(#[from] WindowError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
}

/// Bit masks of the mirrored axis subsets (bit 0 = D, 1 = H, 2 = W), the identity first,
/// then by size as nnU-Net's `itertools.combinations`.
fn mirror_subsets(axes: &[usize]) -> Vec<u8> {
    let mut out = vec![0u8];
    for size in 1..=axes.len() {
        let mut combo: Vec<usize> = (0..size).collect();
        loop {
            out.push(combo.iter().fold(0u8, |m, &i| m | (1 << axes[i])));
            // Next combination in lexicographic order.
            let Some(i) = (0..size).rev().find(|&i| combo[i] != i + axes.len() - size) else {
                break;
            };
            combo[i] += 1;
            for j in i + 1..size {
                combo[j] = combo[j - 1] + 1;
            }
        }
    }
    out
}

/// `x` (`[m, d, h, w]`) flipped along the spatial axes in `mask` (bit 0 = d, 1 = h, 2 = w)
/// into `out` (of `x`'s length, every element overwritten).
fn flip_into(x: &[f32], [m, d, h, w]: [usize; 4], mask: u8, out: &mut [f32]) {
    for i in 0..m {
        for z in 0..d {
            let sz = if mask & 1 != 0 { d - 1 - z } else { z };
            for y in 0..h {
                let sy = if mask & 2 != 0 { h - 1 - y } else { y };
                let src = &x[((i * d + sz) * h + sy) * w..][..w];
                let dst = &mut out[((i * d + z) * h + y) * w..][..w];
                if mask & 4 != 0 {
                    for (o, v) in dst.iter_mut().zip(src.iter().rev()) {
                        *o = *v;
                    }
                } else {
                    dst.copy_from_slice(src);
                }
            }
        }
    }
}

/// Adds one network run's per-layer times to the call's (same plan, same layers).
fn merge_timings(acc: &mut Vec<LayerTiming>, run: Vec<LayerTiming>) {
    if acc.len() != run.len() {
        if acc.is_empty() {
            *acc = run;
        } else {
            acc.extend(run);
        }
        return;
    }
    for (a, r) in acc.iter_mut().zip(run) {
        a.compute_ms += r.compute_ms;
        a.stages.im2col += r.stages.im2col;
        a.stages.gemm += r.stages.gemm;
        a.stages.epilogue += r.stages.epilogue;
    }
}

/// Index of the first largest value (NaN never wins).
fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate().skip(1) {
        if x > v[best] || v[best].is_nan() && !x.is_nan() {
            best = i;
        }
    }
    best
}

/// Softmax in place, shifted by the maximum as PyTorch does.
fn softmax(v: &mut [f32]) {
    let m = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for x in v.iter_mut() {
        *x = (*x - m).exp();
        sum += *x;
    }
    for x in v.iter_mut() {
        *x /= sum;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_follow_monai() {
        // roi 96, overlap 0.25: interval 72; the last window flush with the end.
        assert_eq!(window_starts(256, 96, 0.25), vec![0, 72, 144, 160]);
        assert_eq!(window_starts(96, 96, 0.25), vec![0]);
        assert_eq!(window_starts(100, 96, 0.5), vec![0, 4]);
        // overlap so large the interval truncates to 0: one voxel steps.
        assert_eq!(window_starts(5, 3, 0.9), vec![0, 1, 2]);
    }

    #[test]
    fn mirror_subsets_in_nnunet_order() {
        assert_eq!(mirror_subsets(&[]), vec![0]);
        assert_eq!(mirror_subsets(&[2]), vec![0, 4]);
        assert_eq!(mirror_subsets(&[0, 1, 2]), vec![0, 1, 2, 4, 3, 5, 6, 7]);
    }

    fn flip(x: &[f32], dims: [usize; 4], mask: u8) -> Vec<f32> {
        let mut out = vec![f32::NAN; x.len()];
        flip_into(x, dims, mask, &mut out);
        out
    }

    #[test]
    fn flip_twice_is_identity() {
        let x: Vec<f32> = (0..2 * 3 * 4 * 5).map(|v| v as f32).collect();
        for mask in 0..8u8 {
            let y = flip(&x, [2, 3, 4, 5], mask);
            assert_eq!(flip(&y, [2, 3, 4, 5], mask), x, "mask {mask}");
        }
        let y = flip(&x, [1, 1, 1, 120], 4);
        assert_eq!(y[0], 119.0);
    }

    #[test]
    fn gaussian_map_is_clamped_and_symmetric() {
        let m = importance_map([7, 4, 9], Blend::Gaussian, [0.125; 3]);
        assert_eq!(m.len(), 7 * 4 * 9);
        let min = m.iter().copied().fold(f32::INFINITY, f32::min);
        assert_eq!(min, 1e-3);
        assert!(m.iter().all(|v| *v <= 1.0));
        assert_eq!(m[0], m[m.len() - 1]);
    }

    #[test]
    fn bad_options_name_their_field() {
        let r = |f: fn(&mut WindowRequest)| {
            let mut q = WindowRequest::default();
            f(&mut q);
            q.resolve(Some([8, 8, 8])).unwrap_err().field
        };
        assert_eq!(r(|q| q.overlap = Some(PerAxis::One(1.0))), "overlap");
        assert_eq!(
            r(|q| q.overlap = Some(PerAxis::Three([0.1, -0.1, 0.0]))),
            "overlap"
        );
        assert_eq!(
            r(|q| q.sigma_scale = Some(PerAxis::One(0.0))),
            "sigma_scale"
        );
        assert_eq!(r(|q| q.batch = Some(0)), "batch");
        assert_eq!(r(|q| q.mirror = Some(vec![3])), "mirror");
        assert_eq!(r(|q| q.mirror = Some(vec![1, 1])), "mirror");
        assert_eq!(r(|q| q.roi = Some([8, 8, 9])), "roi");
        assert_eq!(
            WindowRequest::default().resolve(None).unwrap_err().field,
            "roi"
        );
        let ok = WindowRequest::default().resolve(Some([8, 8, 8])).unwrap();
        assert_eq!(ok.overlap, [0.25; 3]);
        assert_eq!(ok.batch, 1);
    }

    /// A pointwise model gives every window the same prediction at a voxel, so the blend
    /// of any windowing equals the whole-volume output: windows, ring, padding and crop,
    /// batches, mirroring and the output kinds against the plain run.
    mod pointwise {
        use super::super::*;
        use crate::kernel::{Activation, Conv3dParams};
        use crate::model::{ConvLayer, Model};
        use proptest::prelude::*;

        fn model(c: usize, k: usize, seed: u64) -> Model {
            Model::single(
                "pw",
                String::new(),
                ConvLayer {
                    filter_shape: [k, c, 1, 1, 1],
                    weights: crate::kernel::seeded(k * c, seed),
                    bias: Some(crate::kernel::seeded(k, seed + 1)),
                    params: Conv3dParams::default(),
                    activation: Activation::None,
                },
            )
        }

        fn direct(m: &Model, scan: [usize; 5], x: &[f32]) -> Vec<f32> {
            let plan = m.plan(scan).unwrap();
            let mut y = vec![f32::NAN; plan.output_len()];
            plan.run_to(m, x.to_vec(), 1, None, &mut y).unwrap();
            y
        }

        fn windowed(m: &Model, scan: [usize; 5], x: &[f32], q: &WindowRequest) -> Vec<f32> {
            let plan = m.plan_sliding(scan, q, 2).unwrap();
            let mut y = vec![f32::NAN; plan.output_len()];
            plan.run_to(m, x.to_vec(), 2, None, &mut y).unwrap();
            y
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(40))]
            #[test]
            fn equals_the_whole_volume(
                n in 1usize..3, c in 1usize..3, k in 2usize..4,
                d in 1usize..14, h in 1usize..12, w in 1usize..12,
                rd in 1usize..9, rh in 1usize..9, rw in 1usize..9,
                o in 0.0f64..0.9, batch in 1usize..5, mirror in 0u8..8,
                constant: bool, seed in 0u64..1000,
            ) {
                let m = model(c, k, seed);
                let scan = [n, c, d, h, w];
                let x = crate::kernel::seeded(scan.iter().product(), seed + 7);
                let mut q = WindowRequest {
                    roi: Some([rd, rh, rw]),
                    overlap: Some(PerAxis::Three([o, o / 2.0, 0.9 - o])),
                    blend: Some(if constant { Blend::Constant } else { Blend::Gaussian }),
                    batch: Some(batch),
                    mirror: Some((0..3).filter(|a| mirror & (1 << a) != 0).collect()),
                    ..Default::default()
                };
                let want = direct(&m, scan, &x);
                let got = windowed(&m, scan, &x, &q);
                let max = want.iter().fold(0f32, |a, v| a.max(v.abs()));
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    prop_assert!((a - b).abs() <= 1e-5 * max.max(1.0), "logits[{i}]: {a} vs {b}");
                }
                // Labels: the argmax of the whole-volume output (ties aside).
                q.output = Some(WindowOutput::Labels);
                let labels = windowed(&m, scan, &x, &q);
                let plane = d * h * w;
                for b in 0..n {
                    for v in 0..plane {
                        let logits: Vec<f32> = (0..k).map(|ch| want[(b * k + ch) * plane + v]).collect();
                        let best = argmax(&logits);
                        let got = labels[b * plane + v] as usize;
                        prop_assert!(got == best || (logits[got] - logits[best]).abs() < 1e-5 * max.max(1.0));
                    }
                }
                // Probabilities sum to one per voxel.
                q.output = Some(WindowOutput::Probabilities);
                let p = windowed(&m, scan, &x, &q);
                for b in 0..n {
                    for v in 0..plane {
                        let s: f32 = (0..k).map(|ch| p[(b * k + ch) * plane + v]).sum();
                        prop_assert!((s - 1.0).abs() < 1e-5);
                    }
                }
            }
        }

        /// A scan fed in odd-sized pieces by another thread, through a ring of one wave's
        /// rows, gives the same bits as the whole scan.
        #[test]
        fn a_fed_scan_equals_the_whole_scan() {
            let m = model(1, 3, 5);
            for (scan, lanes, batch) in [
                ([2, 1, 37, 9, 11], 2, 1),
                ([1, 1, 5, 30, 7], 1, 3),
                // Calls of 2 windows on 2 lanes, rows of 9 windows: calls and waves both
                // span two rows of windows.
                ([1, 1, 23, 10, 7], 2, 2),
            ] {
                let q = WindowRequest {
                    roi: Some([6, 5, 4]),
                    batch: Some(batch),
                    overlap: Some(PerAxis::One(0.4)),
                    ..Default::default()
                };
                let plan = m.plan_sliding(scan, &q, lanes).unwrap();
                let w = plan.window.clone().unwrap();
                let x = crate::kernel::seeded(scan.iter().product(), 3);
                let mut want = Vec::new();
                w.run(&m, Source::Whole(&x), 2, None, None, &mut |_, _, d| {
                    want.extend_from_slice(d);
                    ControlFlow::Continue(())
                })
                .unwrap();
                let feed = InputFeed::new(&w, Box::new(|| {})).unwrap();
                // One window deep, though waves of 2 span two rows of windows here.
                assert_eq!(w.feed_rows(), Some(scan[2].min(6)));
                let mut got = Vec::new();
                std::thread::scope(|sc| {
                    sc.spawn(|| {
                        let mut at = 0;
                        while at < x.len() {
                            let n = feed.push(&x[at..(at + 97).min(x.len())]);
                            if n == 0 {
                                std::thread::yield_now();
                            }
                            at += n;
                        }
                    });
                    w.run(&m, Source::Fed(&feed), 2, None, None, &mut |_, _, d| {
                        got.extend_from_slice(d);
                        ControlFlow::Continue(())
                    })
                    .unwrap();
                });
                assert_eq!(feed.filled(), x.len());
                assert!(got
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()));
                assert_eq!(got.len(), want.len());
            }
            // A closed feed stops a waiting run.
            let scan = [1, 1, 20, 4, 4];
            let plan = m
                .plan_sliding(
                    scan,
                    &WindowRequest {
                        roi: Some([4, 4, 4]),
                        ..Default::default()
                    },
                    1,
                )
                .unwrap();
            let w = plan.window.clone().unwrap();
            let feed = InputFeed::new(&w, Box::new(|| {})).unwrap();
            feed.push(&[0.0; 16 * 3]);
            feed.close();
            let r = w.run(&m, Source::Fed(&feed), 1, None, None, &mut |_, _, _| {
                ControlFlow::Continue(())
            });
            assert_eq!(r.unwrap_err(), KernelError::Cancelled);
        }

        #[test]
        fn slabs_cover_the_output_once_in_depth_order() {
            let m = model(1, 2, 3);
            let scan = [2, 1, 23, 9, 7];
            let q = WindowRequest {
                roi: Some([6, 4, 4]),
                batch: Some(3),
                ..Default::default()
            };
            let plan = m.plan_sliding(scan, &q, 2).unwrap();
            let w = plan.window.clone().unwrap();
            let x = crate::kernel::seeded(scan.iter().product(), 1);
            let mut seen = Vec::new();
            let mut progress = Vec::new();
            let calls = std::sync::Mutex::new(&mut progress);
            let hook = |done: u64, total: u64| calls.lock().unwrap().push((done, total));
            w.run(
                &m,
                Source::Whole(&x),
                1,
                None,
                Some(&hook),
                &mut |b, rows, data| {
                    assert_eq!(data.len(), 2 * rows.len() * 9 * 7);
                    seen.push((b, rows));
                    ControlFlow::Continue(())
                },
            )
            .unwrap();
            for b in 0..2 {
                let mut next = 0;
                for (_, r) in seen.iter().filter(|s| s.0 == b) {
                    assert_eq!(r.start, next);
                    next = r.end;
                }
                assert_eq!(next, 23);
            }
            let total = w.windows_total();
            assert_eq!(progress.last(), Some(&(total, total)));
            assert!(progress.windows(2).all(|p| p[0].0 < p[1].0));
            // The ring holds a batch's depth span, not the scan.
            assert!(w.working_bytes(1) < 3 * 23 * 9 * 7 * 4 * 2);
        }
    }

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5, 0.2]), 1);
    }
}
