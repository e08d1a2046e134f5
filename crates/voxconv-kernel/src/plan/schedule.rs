//! The scheduler: slabs and tiles of a shape, how many threads are worth starting, and
//! `drive`, which runs the tiles on worker threads and delivers finished slabs in order.

use std::ops::{ControlFlow, Range};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crate::KernelError;

use super::tile::{Dest, TileStats};
use super::{Conv3dPlan, Filters};

/// Work (FLOPs) below which another thread costs more to start than it saves. With the
/// kernel's parked pool (`par::run_parts`) a thread costs a wake-up, not a spawn: 16 MFLOP
/// when every call spawned; at 2 MFLOP, small-batch-odd (3.3 MFLOP) at 2 threads went
/// 0.15 -> 0.10-0.13 ms and tiny (6.4 MFLOP) 0.09 -> 0.07 ms (AMD Zen 4, 300 runs,
/// medians, 2026-12-06).
pub(super) const MIN_FLOPS_PER_THREAD: f64 = 2e6;
/// Slab buffers in flight in streaming mode (one being delivered, the rest being computed).
const RING_SLABS: usize = 3;

/// Slab buffers a streaming run on `threads` threads keeps in flight.
pub(super) fn ring_slabs(threads: usize) -> usize {
    if threads <= 1 {
        1
    } else {
        RING_SLABS
    }
}

/// Where [`Conv3dPlan::drive`] computes tiles, which decides who computes and who waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Output {
    /// Straight into the caller's output: every slab has a place of its own, so tiles
    /// never wait for a delivery, and the calling thread computes too (delivering after).
    InPlace,
    /// Into a ring of this many slab buffers: a tile of slab `k` waits until slab
    /// `k - ring` has been delivered; the calling thread only delivers, so a slow consumer
    /// never holds up a tile.
    Ring(usize),
}

/// One slab of the output and its tiles.
pub(super) struct SlabInfo {
    /// Position in output order.
    pub(super) index: usize,
    pub(super) batch: usize,
    pub(super) depth: Range<usize>,
    /// First output voxel (within the batch item) and voxel count.
    pub(super) start: usize,
    pub(super) voxels: usize,
    /// Index of the slab's first tile in the global tile sequence.
    pub(super) first_tile: usize,
    pub(super) tiles: usize,
}

impl Conv3dPlan {
    /// Most threads worth starting for this problem: about one per `MIN_FLOPS_PER_THREAD`,
    /// and never more than there are tiles.
    pub fn useful_threads(&self) -> usize {
        if let Some(inner) = &self.inner {
            return inner.useful_threads();
        }
        let by_work = if self.min_flops_per_thread > 0.0 {
            (self.shape.flops() / self.min_flops_per_thread)
                .ceil()
                .max(1.0) as usize
        } else {
            usize::MAX
        };
        let tiles: usize = self.slabs().iter().map(|s| s.tiles).sum();
        by_work.min(tiles).max(1)
    }

    /// The slabs of the output, in output order, with their tiles.
    pub(super) fn slabs(&self) -> Vec<SlabInfo> {
        let [od, oh, ow] = self.shape.out_dims();
        let plane = oh * ow;
        let mut out = Vec::new();
        let mut first_tile = 0;
        for batch in 0..self.shape.batch() {
            let mut d0 = 0;
            while d0 < od {
                let d1 = (d0 + self.tiling.slab_depth).min(od);
                let voxels = (d1 - d0) * plane;
                let tiles = voxels.div_ceil(self.tiling.tile_cols)
                    * self.tiling.chan_blocks(self.shape.c_out());
                out.push(SlabInfo {
                    index: out.len(),
                    batch,
                    depth: d0..d1,
                    start: d0 * plane,
                    voxels,
                    first_tile,
                    tiles,
                });
                first_tile += tiles;
                d0 = d1;
            }
        }
        out
    }

    /// The scheduler. Sequential for one thread; otherwise `threads` workers take tiles in
    /// order from a shared counter while the calling thread delivers slabs in order. With
    /// `Output::Ring(ring)`, at most `ring` slabs are in flight (computed but not delivered).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn drive(
        &self,
        input: &[f32],
        filters: Filters<'_>,
        bias: Option<&[f32]>,
        threads: usize,
        cancel: Option<&AtomicBool>,
        output: Output,
        dest_of: &(dyn Fn(&SlabInfo) -> Dest + Sync),
        deliver: &mut dyn FnMut(&SlabInfo) -> ControlFlow<()>,
        stats: Option<&TileStats>,
    ) -> Result<(), KernelError> {
        let slabs = self.slabs();
        let mut ops = self.operands(input, filters, bias);
        ops.stats = stats;
        let ops = &ops;
        let cancelled = || cancel.is_some_and(|c| c.load(Ordering::Relaxed));
        // `threads` is an upper bound: spawning costs tens of microseconds, so tiny problems
        // stay on fewer threads. Tiling does not depend on it, so neither do the results.
        let threads = threads.min(self.useful_threads());
        let units = Units::new(self, &slabs, threads);
        if threads == 1 {
            let mut scratch = self.scratch();
            for (si, s) in slabs.iter().enumerate() {
                for u in 0..units.count[si] {
                    if cancelled() {
                        return Err(KernelError::Cancelled);
                    }
                    let (vt, chans) = units.unit(u);
                    // SAFETY: one thread; dest_of gives the slab's own rows.
                    unsafe { self.compute_voxel_tile(ops, s, vt, chans, dest_of(s), &mut scratch) };
                }
                if deliver(s).is_break() {
                    return Err(KernelError::Cancelled);
                }
            }
            return Ok(());
        }

        let total_tiles: usize = units.count.iter().sum();
        let next_tile = AtomicUsize::new(0);
        let done: Vec<AtomicUsize> = slabs.iter().map(|_| AtomicUsize::new(0)).collect();
        let delivered = AtomicUsize::new(0);
        let abort = AtomicBool::new(false);
        let lock = Mutex::new(());
        let cv = Condvar::new();
        let notify = || {
            drop(lock.lock().unwrap_or_else(|e| e.into_inner()));
            cv.notify_all();
        };
        // Wakes everyone if a worker unwinds, so the deliverer never waits forever.
        struct PanicGuard<'a>(&'a AtomicBool, &'a dyn Fn());
        impl Drop for PanicGuard<'_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    self.0.store(true, Ordering::SeqCst);
                    (self.1)();
                }
            }
        }
        let wait_until = |ready: &dyn Fn() -> bool| {
            let mut g = lock.lock().unwrap_or_else(|e| e.into_inner());
            while !ready() && !abort.load(Ordering::SeqCst) {
                if cancelled() {
                    abort.store(true, Ordering::SeqCst);
                    cv.notify_all();
                    break;
                }
                g = cv
                    .wait_timeout(g, Duration::from_millis(20))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        };

        let mut outcome = Ok(());
        let work = || {
            let _guard = PanicGuard(&abort, &notify);
            let mut scratch = self.scratch();
            loop {
                if abort.load(Ordering::Relaxed) {
                    break;
                }
                if cancelled() {
                    abort.store(true, Ordering::SeqCst);
                    notify();
                    break;
                }
                let g = next_tile.fetch_add(1, Ordering::Relaxed);
                if g >= total_tiles {
                    break;
                }
                let si = units.first.partition_point(|&f| f <= g) - 1;
                let s = &slabs[si];
                let (vt, chans) = units.unit(g - units.first[si]);
                if let Output::Ring(ring) = output {
                    wait_until(&|| si < delivered.load(Ordering::SeqCst) + ring);
                    if abort.load(Ordering::SeqCst) {
                        break;
                    }
                }
                // SAFETY: unit g (these channel blocks of voxel tile vt) is taken by this
                // thread alone (atomic counter); its slab's ring slot is free (waited
                // above) and stays reserved until the slab is delivered, which needs this
                // unit to finish.
                unsafe { self.compute_voxel_tile(ops, s, vt, chans, dest_of(s), &mut scratch) };
                if done[si].fetch_add(1, Ordering::SeqCst) + 1 == units.count[si] {
                    notify();
                }
            }
        };
        // Writing straight into the output (no ring), the calling thread computes too (with
        // the kernel's parked pool threads: no spawn per call) and delivers afterwards;
        // streaming, it only delivers, so a slow consumer never holds up a tile, and the
        // workers are threads of this call's own (a ring's tiles wait for deliveries, which
        // must not hold up pool threads other calls share).
        let calling_thread_works = output == Output::InPlace;
        if calling_thread_works {
            crate::par::run_parts(threads, &|_| work());
        }
        std::thread::scope(|scope| {
            if !calling_thread_works {
                for _ in 0..threads {
                    scope.spawn(work);
                }
            }
            for (si, s) in slabs.iter().enumerate() {
                wait_until(&|| done[si].load(Ordering::SeqCst) == units.count[si]);
                if abort.load(Ordering::SeqCst) {
                    outcome = Err(KernelError::Cancelled);
                    break;
                }
                if deliver(s).is_break() {
                    abort.store(true, Ordering::SeqCst);
                    notify();
                    outcome = Err(KernelError::Cancelled);
                    break;
                }
                delivered.store(si + 1, Ordering::SeqCst);
                notify();
            }
        });
        outcome
    }
}

/// The work units of a run: a voxel tile's channel blocks, in groups. Winograd's channel
/// blocks let threads share a voxel tile, each block repeating the tile's input transform;
/// where there are voxel tiles enough for the threads (always on one), a unit takes several
/// blocks, the transform done once for them. Each output is computed the same way whatever
/// the grouping, so the results do not depend on it.
struct Units {
    /// Channel blocks per unit, and units per voxel tile.
    per_unit: usize,
    per_vtile: usize,
    chan_block: usize,
    c_out: usize,
    /// Per slab: its units and the index of its first one.
    count: Vec<usize>,
    first: Vec<usize>,
}

impl Units {
    fn new(plan: &Conv3dPlan, slabs: &[SlabInfo], threads: usize) -> Self {
        let c_out = plan.shape.c_out();
        let blocks = plan.tiling.chan_blocks(c_out);
        let vtiles: usize = slabs.iter().map(|s| s.tiles / blocks).sum();
        let per_unit = if plan.strategy == super::Strategy::Winograd && blocks > 1 {
            blocks.div_ceil(threads.div_ceil(vtiles.max(1)).clamp(1, blocks))
        } else {
            1
        };
        let per_vtile = blocks.div_ceil(per_unit);
        let count: Vec<usize> = slabs.iter().map(|s| s.tiles / blocks * per_vtile).collect();
        let first = count
            .iter()
            .scan(0, |acc, &u| {
                let first = *acc;
                *acc += u;
                Some(first)
            })
            .collect();
        Self {
            per_unit,
            per_vtile,
            chan_block: plan.tiling.chan_block,
            c_out,
            count,
            first,
        }
    }

    /// Unit `u` of a slab: its voxel tile and channels.
    fn unit(&self, u: usize) -> (usize, Range<usize>) {
        let (vt, part) = (u / self.per_vtile, u % self.per_vtile);
        let span = self.per_unit * self.chan_block;
        (
            vt,
            (part * span).min(self.c_out)..((part + 1) * span).min(self.c_out),
        )
    }
}
