//! The public entry points: run into a caller's output, or stream finished slabs (lent from
//! a ring, or handed over in owned buffers).

use std::ops::{ControlFlow, Range};
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};

use crate::{check_len, KernelError};

use super::schedule::{ring_slabs, Output, SlabInfo};
use super::tile::{Dest, TileStats};
use super::{Conv3dPlan, Filters};

/// A finished slab of output: depth planes `depth` of batch item `batch`, all channels,
/// laid out `[C_out, depth.len(), oH, oW]`.
#[derive(Debug)]
pub struct Slab<'a> {
    pub batch: usize,
    pub depth: Range<usize>,
    pub data: &'a [f32],
}

/// A finished slab in a buffer its consumer now owns (see [`Conv3dPlan::run_slabs_owned`]):
/// `data.len()` is `C_out · depth.len() · oH · oW`, laid out as in [`Slab`].
#[derive(Debug)]
pub struct OwnedSlab {
    pub batch: usize,
    pub depth: Range<usize>,
    pub data: Vec<f32>,
}

/// A raw pointer that may cross threads; what it points to is split between threads by the
/// tile protocol (see SAFETY notes at the uses).
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: the pointer is only dereferenced under the tile/slab protocol of `drive`:
// each tile writes a region no other thread touches until the slab is delivered.
unsafe impl Send for SendPtr {}
// SAFETY: as above; shared references to `SendPtr` only copy the address.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// `self + off` elements (a method, so closures capture the whole `SendPtr`).
    fn offset(self, off: usize) -> *mut f32 {
        self.0.wrapping_add(off)
    }
}

impl Conv3dPlan {
    fn check(
        &self,
        input: &[f32],
        filters: Filters<'_>,
        bias: Option<&[f32]>,
        threads: usize,
    ) -> Result<(), KernelError> {
        if threads == 0 {
            return Err(KernelError::ZeroThreads);
        }
        check_len("input", self.shape.input_len(), input.len())?;
        self.check_filters(filters)?;
        if let Some(b) = bias {
            check_len("bias", self.shape.c_out(), b.len())?;
        }
        self.activation.check(self.shape.c_out())
    }

    /// Runs the convolution into `output` (`[N, C_out, oD, oH, oW]`, fully overwritten) on
    /// `threads` threads. Returns `Cancelled` if `cancel` is set before the end.
    pub fn run_into<'f>(
        &self,
        input: &[f32],
        filters: impl Into<Filters<'f>>,
        bias: Option<&[f32]>,
        output: &mut [f32],
        threads: usize,
        cancel: Option<&AtomicBool>,
    ) -> Result<(), KernelError> {
        let filters = filters.into();
        if let Some(inner) = &self.inner {
            self.check(input, filters, bias, threads)?;
            check_len("output", self.shape.output_len(), output.len())?;
            return self
                .run_sublattice(inner, input, filters, bias, output, threads, cancel, false)
                .map(|_| ());
        }
        self.run_in_place(input, filters, bias, output, threads, cancel, None)
    }

    /// `run_into`, each tile's moments left in `stats` if given.
    #[allow(clippy::too_many_arguments)]
    fn run_in_place(
        &self,
        input: &[f32],
        filters: Filters<'_>,
        bias: Option<&[f32]>,
        output: &mut [f32],
        threads: usize,
        cancel: Option<&AtomicBool>,
        stats: Option<&TileStats>,
    ) -> Result<(), KernelError> {
        self.check(input, filters, bias, threads)?;
        check_len("output", self.shape.output_len(), output.len())?;
        let out_vox = self.shape.out_voxels();
        let item = self.shape.c_out() * out_vox;
        let base = SendPtr(output.as_mut_ptr());
        let dest_of = move |s: &SlabInfo| Dest {
            // SAFETY (of the arithmetic): batch·item + start < output.len().
            base: base.offset(s.batch * item + s.start),
            row_stride: out_vox,
        };
        self.drive(
            input,
            filters,
            bias,
            threads,
            cancel,
            Output::InPlace,
            &dest_of,
            &mut |_| ControlFlow::Continue(()),
            stats,
        )
    }

    /// Runs the convolution and hands each finished slab, in output order, to `on_slab`.
    /// Memory: `streaming_workspace_bytes(threads)`, not the output size. `on_slab` may
    /// return `Break` to stop early (the result is then `Cancelled`).
    pub fn run_slabs<'f>(
        &self,
        input: &[f32],
        filters: impl Into<Filters<'f>>,
        bias: Option<&[f32]>,
        threads: usize,
        cancel: Option<&AtomicBool>,
        on_slab: &mut dyn FnMut(Slab<'_>) -> ControlFlow<()>,
    ) -> Result<(), KernelError> {
        self.run_slabs_ring(
            input,
            filters.into(),
            bias,
            threads,
            cancel,
            ring_slabs(threads),
            on_slab,
        )
    }

    /// Like [`run_slabs`](Self::run_slabs), but in lockstep: the workers compute slab `k + 1`
    /// only once slab `k` has been handed over, so the computing and the consuming never
    /// share the cores. For a consumer that itself uses every thread (the col2im scatter of
    /// a transposed convolution): each side gets all of them in turn. One slab buffer.
    pub fn run_slabs_lockstep<'f>(
        &self,
        input: &[f32],
        filters: impl Into<Filters<'f>>,
        bias: Option<&[f32]>,
        threads: usize,
        cancel: Option<&AtomicBool>,
        on_slab: &mut dyn FnMut(Slab<'_>) -> ControlFlow<()>,
    ) -> Result<(), KernelError> {
        self.run_slabs_ring(input, filters.into(), bias, threads, cancel, 1, on_slab)
    }

    #[allow(clippy::too_many_arguments)]
    fn run_slabs_ring(
        &self,
        input: &[f32],
        filters: Filters<'_>,
        bias: Option<&[f32]>,
        threads: usize,
        cancel: Option<&AtomicBool>,
        ring: usize,
        on_slab: &mut dyn FnMut(Slab<'_>) -> ControlFlow<()>,
    ) -> Result<(), KernelError> {
        self.check(input, filters, bias, threads)?;
        if let Some(inner) = &self.inner {
            return self.stream_sublattice(
                inner,
                input,
                filters,
                bias,
                threads,
                cancel,
                &mut |batch, depth, data| on_slab(Slab { batch, depth, data }),
            );
        }
        let ring = ring.max(1);
        let slab_len = self.slab_bytes() / 4;
        let mut buffers = vec![0f32; ring * slab_len];
        let base = SendPtr(buffers.as_mut_ptr());
        // Slab k lives in ring slot k % ring.
        let dest_of = move |s: &SlabInfo| Dest {
            base: base.offset((s.index % ring) * slab_len),
            row_stride: s.voxels,
        };
        let result = self.drive(
            input,
            filters,
            bias,
            threads,
            cancel,
            Output::Ring(ring),
            &dest_of,
            &mut |s| {
                // SAFETY: the slab is complete and its ring slot is not written again until
                // `drive` marks it delivered, after this callback returns.
                let data = unsafe {
                    std::slice::from_raw_parts(dest_of(s).base, self.shape.c_out() * s.voxels)
                };
                on_slab(Slab {
                    batch: s.batch,
                    depth: s.depth.clone(),
                    data,
                })
            },
            None,
        );
        drop(buffers);
        result
    }

    /// Like [`run_slabs`](Self::run_slabs), but each finished slab is handed over in its
    /// own buffer instead of being lent from a ring: tiles are computed straight into
    /// buffers from `fresh(len)` (at least `len` values; recycled ones save page faults),
    /// so a consumer that sends the values on needs no copy. Memory is the same ring of
    /// [`slab_bytes`](Self::slab_bytes) buffers plus whatever the consumer keeps.
    #[allow(clippy::too_many_arguments)]
    pub fn run_slabs_owned<'f>(
        &self,
        input: &[f32],
        filters: impl Into<Filters<'f>>,
        bias: Option<&[f32]>,
        threads: usize,
        cancel: Option<&AtomicBool>,
        fresh: &mut dyn FnMut(usize) -> Vec<f32>,
        on_slab: &mut dyn FnMut(OwnedSlab) -> ControlFlow<()>,
    ) -> Result<(), KernelError> {
        let filters = filters.into();
        self.check(input, filters, bias, threads)?;
        if self.inner.is_some() {
            // A sub-lattice plan lends its slabs from its whole output (`run_slabs_ring`):
            // each one is copied into a buffer from `fresh`.
            return self.run_slabs_ring(input, filters, bias, threads, cancel, 1, &mut |s| {
                let mut data = fresh(s.data.len());
                data.resize(s.data.len(), 0.0);
                data.copy_from_slice(s.data);
                on_slab(OwnedSlab {
                    batch: s.batch,
                    depth: s.depth,
                    data,
                })
            });
        }
        let ring = ring_slabs(threads);
        let slab_len = self.slab_bytes() / 4;
        let count = self.slabs().len();
        let mut sized = |len: usize| {
            let mut v = fresh(len);
            v.resize(len.max(v.len()), 0.0);
            v
        };
        let mut owned: Vec<Vec<f32>> = (0..ring.min(count)).map(|_| sized(slab_len)).collect();
        // Slab k is computed into the buffer of ring slot k % ring; a slot's buffer is
        // replaced when its slab is delivered, before any tile of slab k + ring may start
        // (`drive` publishes each delivery with a SeqCst store the workers wait on).
        let slots: Vec<AtomicPtr<f32>> = owned
            .iter_mut()
            .map(|b| AtomicPtr::new(b.as_mut_ptr()))
            .collect();
        let dest_of = |s: &SlabInfo| Dest {
            base: slots[s.index % ring].load(Ordering::Acquire),
            row_stride: s.voxels,
        };
        let c_out = self.shape.c_out();
        self.drive(
            input,
            filters,
            bias,
            threads,
            cancel,
            Output::Ring(ring),
            &dest_of,
            &mut |s| {
                let slot = s.index % ring;
                let next = if s.index + ring < count {
                    sized(slab_len)
                } else {
                    Vec::new()
                };
                let mut data = std::mem::replace(&mut owned[slot], next);
                slots[slot].store(owned[slot].as_mut_ptr(), Ordering::Release);
                data.truncate(c_out * s.voxels);
                on_slab(OwnedSlab {
                    batch: s.batch,
                    depth: s.depth.clone(),
                    data,
                })
            },
            None,
        )
    }

    /// [`run_into`](Self::run_into), also returning each `(item, output channel)`'s mean
    /// and biased variance of the output (`N·C_out` pairs, item-major), gathered per tile
    /// while the tile is in cache: an InstanceNormalization after the convolution then
    /// needs one pass over the output instead of two. Per tile, the moments are taken as
    /// `ops::instance_norm` takes a channel's (f32 lanes in blocks, f64 across, shifted by
    /// the first value); tiles are merged in tile order with Chan et al.'s pairwise update,
    /// so the statistics are the same at any thread count.
    pub fn run_into_with_stats<'f>(
        &self,
        input: &[f32],
        filters: impl Into<Filters<'f>>,
        bias: Option<&[f32]>,
        output: &mut [f32],
        threads: usize,
        cancel: Option<&AtomicBool>,
    ) -> Result<Vec<(f64, f64)>, KernelError> {
        let filters = filters.into();
        if let Some(inner) = &self.inner {
            self.check(input, filters, bias, threads)?;
            check_len("output", self.shape.output_len(), output.len())?;
            return self
                .run_sublattice(inner, input, filters, bias, output, threads, cancel, true)
                .map(Option::unwrap_or_default);
        }
        let c_out = self.shape.c_out();
        let blocks = self.tiling.chan_blocks(c_out);
        let slabs = self.slabs();
        let voxel_tiles = slabs.iter().map(|s| s.tiles / blocks).sum();
        let stats = TileStats::new(voxel_tiles, c_out);
        self.run_in_place(input, filters, bias, output, threads, cancel, Some(&stats))?;
        // (count, mean, M2) per (item, channel), merged tile by tile in output order.
        let mut acc = vec![(0f64, 0f64, 0f64); self.shape.batch() * c_out];
        for s in &slabs {
            let first = s.first_tile / blocks;
            for t in 0..s.tiles / blocks {
                let cols = self
                    .tiling
                    .tile_cols
                    .min(s.voxels - t * self.tiling.tile_cols);
                let nb = cols as f64;
                for co in 0..c_out {
                    let (mb, m2b) = stats.get(first + t, co);
                    let (na, ma, m2a) = &mut acc[s.batch * c_out + co];
                    let n = *na + nb;
                    let delta = mb - *ma;
                    *ma += delta * nb / n;
                    *m2a += m2b + delta * delta * *na * nb / n;
                    *na = n;
                }
            }
        }
        Ok(acc
            .into_iter()
            .map(|(n, mean, m2)| (mean, (m2 / n.max(1.0)).max(0.0)))
            .collect())
    }
}
