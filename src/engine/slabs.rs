//! Output slabs to response chunks.
//!
//! A slab holds depth planes `d0..d1` of one batch item for all channels; in the NCDHW
//! output each channel's part is contiguous at `((n·C + c)·oD + d0)·oH·oW` elements, so a
//! slab becomes, per channel, pieces of at most `chunk` bytes.
//!
//! float32 output on a little-endian machine is already in wire format: the slab's buffer
//! itself becomes the chunks' `Bytes` (slices of one buffer, no copy), and goes back to the
//! server's [`Recycler`] once the last chunk is sent, for the next slab of this or a later
//! call (its pages stay mapped: no page faults on the next use). Other dtypes are converted piece by
//! piece into new buffers.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::kernel::{OwnedSlab, Slab};
use crate::tensor::dtype::{self, DType};

/// Slabs larger than this are copied out piece by piece even when they could be sent as
/// they are: a handed-over slab stays alive until its last chunk is encoded, and the
/// per-call reservation counts whole slabs for every chunk in flight.
pub const ZERO_COPY_MAX_SLAB_BYTES: usize = 16 << 20;

/// Whether float32 slabs of `slab_bytes` go out without a copy (see the module docs).
pub fn zero_copy(out_dtype: DType, slab_bytes: usize) -> bool {
    out_dtype == DType::F32
        && cfg!(target_endian = "little")
        && slab_bytes <= ZERO_COPY_MAX_SLAB_BYTES
}

/// Chunks a full slab of `slab_bytes` is cut into: each channel's part of it
/// (`slab_bytes / c_out` bytes) in pieces of at most `chunk` bytes. A shorter last slab
/// gives fewer, but at least one per channel.
fn pieces_per_slab(slab_bytes: usize, c_out: usize, chunk: usize) -> usize {
    let c = c_out.max(1);
    c.saturating_mul((slab_bytes / c).div_ceil(chunk.max(1)).max(1))
}

/// Output bytes alive outside the kernel's ring while a stream runs: up to `depth` chunks
/// queued (see [`queue_depth`]), one being encoded and one being cut. Copied chunks are at
/// most `chunk` bytes each. Zero-copy chunks keep their whole slab alive. `k = depth + 2`
/// consecutive chunks span at most `⌈k / P⌉ + 2` slabs, `P` the chunks of a full slab (a
/// partial first slab, full ones, and a short last one), and at most `⌈k / C_out⌉ + 1`
/// (every slab has at least one chunk per channel); the smaller bound is used.
pub fn in_flight_bytes(
    zero_copy: bool,
    slab_bytes: usize,
    c_out: usize,
    chunk: usize,
    depth: usize,
) -> usize {
    let chunks = depth.saturating_add(2);
    if zero_copy {
        let per_slab = pieces_per_slab(slab_bytes, c_out, chunk);
        let slabs = (chunks.div_ceil(per_slab) + 2).min(chunks.div_ceil(c_out.max(1)) + 1);
        slabs.saturating_mul(slab_bytes)
    } else {
        chunks.saturating_add(1).saturating_mul(chunk)
    }
}

/// Chunks a stream's queue holds before the producer waits: `stream_buffer`, and with
/// `whole_slab` also all chunks of one slab, so that the kernel can hand a whole slab over and
/// compute the next one while it is being written (with a queue shorter than a slab it waits
/// for most of each slab's transfer). `whole_slab` is for output into shared memory, whose
/// writer thread drains the queue by itself; towards a socket the queue stays short, so a
/// client that stops reading stops the kernel within the call's deadline. The reservation
/// ([`in_flight_bytes`]) follows the depth either way.
pub fn queue_depth(
    whole_slab: bool,
    slab_bytes: usize,
    c_out: usize,
    chunk: usize,
    stream_buffer: usize,
) -> usize {
    if whole_slab {
        stream_buffer.saturating_add(pieces_per_slab(slab_bytes, c_out, chunk))
    } else {
        stream_buffer
    }
}

/// The pieces of a slab: (byte offset in the output tensor, element range in the slab).
fn pieces(
    batch: usize,
    depth: &Range<usize>,
    output: [usize; 5],
    elem: usize,
    chunk: usize,
) -> impl Iterator<Item = (u64, Range<usize>)> {
    let [_, c_out, od, oh, ow] = output;
    let plane = oh * ow;
    let per_channel = depth.len() * plane;
    let per_chunk = (chunk / elem).max(1);
    let d0 = depth.start;
    (0..c_out).flat_map(move |c| {
        let first = ((batch * c_out + c) * od + d0) * plane;
        (0..per_channel).step_by(per_chunk).map(move |i| {
            let end = (i + per_chunk).min(per_channel);
            (
                ((first + i) * elem) as u64,
                c * per_channel + i..c * per_channel + end,
            )
        })
    })
}

/// Emits a lent slab as converted pieces; false as soon as `emit` refuses one.
pub fn lent_chunks(
    slab: &Slab<'_>,
    output: [usize; 5],
    out_dtype: DType,
    chunk: usize,
    mut emit: impl FnMut(u64, Bytes) -> bool,
) -> bool {
    let elem = out_dtype.size();
    for (offset, r) in pieces(slab.batch, &slab.depth, output, elem, chunk) {
        let mut buf = Vec::with_capacity(r.len() * elem);
        dtype::encode(out_dtype, &slab.data[r], &mut buf);
        if !emit(offset, Bytes::from(buf)) {
            return false;
        }
    }
    true
}

/// Emits a float32 slab handed over by the kernel as slices of its own buffer (see
/// [`zero_copy`]); the buffer returns to `home` when the last slice is dropped.
pub fn owned_f32_chunks(
    slab: OwnedSlab,
    home: &Arc<Recycler>,
    output: [usize; 5],
    chunk: usize,
    mut emit: impl FnMut(u64, Bytes) -> bool,
) -> bool {
    let (batch, depth) = (slab.batch, slab.depth);
    let all = Bytes::from_owner(Recycled {
        buf: slab.data,
        home: Arc::clone(home),
    });
    for (offset, r) in pieces(batch, &depth, output, 4, chunk) {
        if !emit(offset, all.slice(r.start * 4..r.end * 4)) {
            return false;
        }
    }
    true
}

/// Slab buffers, reused once their chunks have been sent. Keeps at most `keep` idle
/// buffers (the rest are freed), so the memory it holds between calls is bounded.
pub struct Recycler {
    free: Mutex<Vec<Vec<f32>>>,
    keep: usize,
}

impl Default for Recycler {
    fn default() -> Self {
        Self::new(DEFAULT_KEPT_SLABS)
    }
}

/// Idle slab buffers a server keeps: enough for one stream's ring and queue.
pub const DEFAULT_KEPT_SLABS: usize = 6;

impl Recycler {
    pub fn new(keep: usize) -> Self {
        Self {
            free: Mutex::default(),
            keep,
        }
    }

    /// Idle buffers held now.
    pub fn idle(&self) -> usize {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// A buffer for the kernel: a returned one when there is one (its pages are already
    /// mapped), else an empty one the kernel sizes.
    pub fn take(&self, len: usize) -> Vec<f32> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        // The smallest that fits: a large slab's buffer stays for calls that need it.
        let best = free
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= len)
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i);
        match best {
            Some(i) => free.swap_remove(i),
            None => Vec::new(),
        }
    }

    fn give(&self, buf: Vec<f32>) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < self.keep && buf.capacity() > 0 {
            free.push(buf);
        }
    }
}

/// A slab buffer viewed as little-endian float32 bytes.
struct Recycled {
    buf: Vec<f32>,
    home: Arc<Recycler>,
}

impl AsRef<[u8]> for Recycled {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.buf)
    }
}

impl Drop for Recycled {
    fn drop(&mut self) {
        self.home.give(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_keeps_a_bounded_number_of_buffers_and_hands_out_the_best_fit() {
        let pool = Recycler::new(3);
        for cap in [100, 10, 50, 70] {
            pool.give(Vec::with_capacity(cap));
        }
        pool.give(Vec::new());
        assert_eq!(
            pool.idle(),
            3,
            "the fourth buffer and the empty one are freed"
        );
        let b = pool.take(20);
        assert!(
            (50..70).contains(&b.capacity()),
            "best fit: {}",
            b.capacity()
        );
        assert_eq!(pool.take(200).capacity(), 0, "none fits: a new one");
        assert_eq!(pool.idle(), 2);
    }

    /// The reservation covers every window of queued chunks: simulates the chunk sequence of
    /// whole outputs (full slabs and a short last one) and counts the slabs each window of
    /// `depth + 2` consecutive chunks touches.
    #[test]
    fn in_flight_bound_covers_every_window_of_queued_chunks() {
        for (c_out, od, plane, slab_planes, chunk, stream_buffer) in [
            (16, 20, 64, 6, 4096, 4),
            (16, 20, 64, 6, 1 << 20, 4),
            (3, 7, 10, 2, 16, 1),
            (1, 9, 100, 4, 100, 2),
            (5, 13, 33, 5, 77, 3),
            (16, 128, 128 * 128, 8, 512 << 10, 4),
        ] {
            let output = [1, c_out, od, plane, 1];
            let slab_bytes = slab_planes * c_out * plane * 4;
            let mut seq = Vec::new();
            for (i, d0) in (0..od).step_by(slab_planes).enumerate() {
                let d = d0..(d0 + slab_planes).min(od);
                seq.extend(pieces(0, &d, output, 4, chunk).map(|_| i));
            }
            let depth = queue_depth(true, slab_bytes, c_out, chunk, stream_buffer);
            let bound = in_flight_bytes(true, slab_bytes, c_out, chunk, depth) / slab_bytes;
            let worst = seq
                .windows((depth + 2).min(seq.len()))
                .map(|w| w.last().unwrap() - w.first().unwrap() + 1)
                .max()
                .unwrap();
            assert!(
                worst <= bound,
                "c_out {c_out}, chunk {chunk}: a window spans {worst} slabs, reserved {bound}"
            );
            assert!(
                depth >= stream_buffer + c_out,
                "the queue takes a whole slab"
            );
        }
    }

    /// Both paths tile the output exactly: every byte once, in order, same values.
    #[test]
    fn lent_and_owned_chunks_cover_the_output_with_the_same_bytes() {
        let output = [2, 3, 5, 4, 3]; // N, C, oD, oH, oW
        let plane = 4 * 3;
        for chunk in [4, 12, 20, 48, 1 << 20] {
            let mut lent = Vec::new();
            let mut owned = Vec::new();
            let home = Arc::new(Recycler::default());
            for batch in 0..2 {
                for depth in [0..2, 2..5] {
                    let data: Vec<f32> = (0..3 * depth.len() * plane)
                        .map(|i| (batch * 1000 + depth.start * 100 + i) as f32)
                        .collect();
                    let slab = Slab {
                        batch,
                        depth: depth.clone(),
                        data: &data,
                    };
                    assert!(lent_chunks(&slab, output, DType::F32, chunk, |o, b| {
                        lent.push((o, b));
                        true
                    }));
                    let slab = OwnedSlab {
                        batch,
                        depth,
                        data: data.clone(),
                    };
                    assert!(owned_f32_chunks(slab, &home, output, chunk, |o, b| {
                        owned.push((o, b));
                        true
                    }));
                }
            }
            assert_eq!(lent, owned, "chunk {chunk}");
            let mut got = vec![None; 2 * 3 * 5 * plane * 4];
            for (o, b) in &lent {
                assert!(b.len() <= chunk.max(4), "chunk {chunk}: {} bytes", b.len());
                for (i, &x) in b.iter().enumerate() {
                    let at = *o as usize + i;
                    assert!(got[at].is_none(), "byte {at} sent twice");
                    got[at] = Some(x);
                }
            }
            assert!(
                got.iter().all(Option::is_some),
                "chunk {chunk}: a byte was never sent"
            );
            drop(owned);
            assert_eq!(
                home.free.lock().unwrap().len(),
                4,
                "all four slabs came back"
            );
        }
    }

    #[test]
    fn a_refused_chunk_stops_the_slab_and_still_returns_its_buffer() {
        let home = Arc::new(Recycler::default());
        let slab = OwnedSlab {
            batch: 0,
            depth: 0..1,
            data: vec![1.0; 2 * 4],
        };
        let mut n = 0;
        assert!(!owned_f32_chunks(
            slab,
            &home,
            [1, 2, 1, 2, 2],
            8,
            |_, _| {
                n += 1;
                false
            }
        ));
        assert_eq!(n, 1);
        assert_eq!(home.take(8).capacity(), 8);
    }
}
