//! Large zeroed output buffers, and the kernel's pool of workspace buffers (on cache lines).
//!
//! A 128 MiB output touched for the first time costs 32,768 page faults of 4 KiB, each with
//! its own trip into the kernel; on Linux with transparent huge pages in `madvise` mode
//! (a common default), asking for huge pages turns them into 64 faults of 2 MiB. The memory
//! is the same; only the fault count changes.

/// Buffers from this size on are advised to use huge pages.
const HUGE_FROM_BYTES: usize = 4 << 20;

/// A zeroed `Vec<f32>` of `len` elements, backed by huge pages where the system allows.
pub fn zeroed_f32(len: usize) -> Vec<f32> {
    let v = vec![0f32; len];
    advise_huge(&v);
    v
}

#[cfg(target_os = "linux")]
fn advise_huge(v: &[f32]) {
    let bytes = std::mem::size_of_val(v);
    if bytes < HUGE_FROM_BYTES {
        return;
    }
    // madvise wants a page-aligned start: advise the whole pages inside the buffer.
    const PAGE: usize = 4096;
    let start = v.as_ptr() as usize;
    let aligned = start.next_multiple_of(PAGE);
    let end = (start + bytes) / PAGE * PAGE;
    if end <= aligned {
        return;
    }
    // SAFETY: [aligned, end) lies inside `v`'s allocation, which stays alive (and unmoved)
    // for the call; MADV_HUGEPAGE only changes how future faults are served, never the
    // contents or validity of the mapping. Failure (e.g. THP disabled) is harmless.
    unsafe {
        libc::madvise(
            aligned as *mut libc::c_void,
            end - aligned,
            libc::MADV_HUGEPAGE,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge(_: &[f32]) {}

/// Workspace buffers (im2col tiles, Winograd transforms, running sums) kept between kernel
/// calls, shared by every plan: a fresh buffer of a few MiB costs a page fault per 4 KiB on
/// first touch, every call (unet-deep, 256 → 256 channels over 8³ with Winograd on 2
/// threads: about 1,200 faults a call, a tenth of its time).
static SCRATCH_POOL: std::sync::Mutex<Vec<Vec<f32>>> = std::sync::Mutex::new(Vec::new());
/// Buffers kept at most (the smallest are released past this) ...
const SCRATCH_POOL_MAX: usize = 8;
/// ... and kept only from this many values on (the allocator serves smaller ones well).
const SCRATCH_POOL_MIN: usize = 1 << 14;

/// A kept buffer that holds `len` values without wasting more than 3/4 of itself (its
/// contents and length as they were given back).
fn take_kept(len: usize) -> Option<Vec<f32>> {
    if len < SCRATCH_POOL_MIN {
        return None;
    }
    let mut pool = SCRATCH_POOL.lock().unwrap_or_else(|e| e.into_inner());
    let best = pool
        .iter()
        .enumerate()
        .filter(|(_, v)| v.capacity() >= len && v.capacity() / 4 <= len)
        .min_by_key(|(_, v)| v.capacity())
        .map(|(i, _)| i)?;
    Some(pool.swap_remove(best))
}

/// A zeroed buffer of `len` values for workspace: a kept one (see `take_kept`), else a new
/// one. Give it back with [`scratch_give`].
pub(crate) fn scratch_take(len: usize) -> Vec<f32> {
    match take_kept(len) {
        Some(mut v) => {
            v.clear();
            v.resize(len, 0.0);
            v
        }
        None => vec![0f32; len],
    }
}

/// A buffer of `len` values for workspace that the caller overwrites whole before reading
/// it: as [`scratch_take`], but a kept buffer keeps its earlier values instead of being
/// zeroed first (the sub-lattice copies: two memsets of the input's and output's size a
/// run, 8 % of 16→16 dilation 2 over 48³). Never hand its contents out before overwriting.
pub(crate) fn scratch_take_stale(len: usize) -> Vec<f32> {
    match take_kept(len) {
        Some(mut v) => {
            v.truncate(len);
            v.resize(len, 0.0);
            v
        }
        None => vec![0f32; len],
    }
}

/// Keeps a workspace buffer for a later call.
pub(crate) fn scratch_give(v: Vec<f32>) {
    if v.capacity() < SCRATCH_POOL_MIN {
        return;
    }
    let mut pool = SCRATCH_POOL.lock().unwrap_or_else(|e| e.into_inner());
    pool.push(v);
    if pool.len() > SCRATCH_POOL_MAX {
        if let Some(i) = pool
            .iter()
            .enumerate()
            .min_by_key(|(_, v)| v.capacity())
            .map(|(i, _)| i)
        {
            let small = pool.swap_remove(i);
            drop(pool);
            drop(small);
        }
    }
}

/// Elements a [`LineBuf`] holds beyond its length, so that its start can be moved up to a
/// cache line.
const ALIGN_SLACK: usize = 16;

/// A workspace buffer whose first element sits on a 64-byte cache line, taken from the
/// kernel's pool zeroed and given back to it when dropped. The Winograd buffers are written
/// and read in whole 16-float vectors at multiples of 16 floats from their start; on a cache
/// line each is one line, not two (the allocator hands out 16-byte alignment: 16→16 over
/// 48³ at one thread 10.0 → 9.3 ms, AMD Zen 4, 2026-12-07); also the im2col columns and the
/// accumulator.
pub(crate) struct LineBuf {
    buf: Vec<f32>,
    /// Elements skipped at the front of `buf` to reach the cache line.
    skip: usize,
    len: usize,
}

impl LineBuf {
    /// `len` zeroed values on a cache line (nothing is allocated for `len == 0`).
    pub(crate) fn zeroed(len: usize) -> Self {
        if len == 0 {
            return Self {
                buf: Vec::new(),
                skip: 0,
                len: 0,
            };
        }
        let buf = scratch_take(len + ALIGN_SLACK);
        let skip = buf.as_ptr().align_offset(64).min(ALIGN_SLACK);
        Self { buf, skip, len }
    }

    /// Bytes a `LineBuf` of `len` values holds (its slack included).
    pub(crate) fn bytes(len: usize) -> usize {
        if len == 0 {
            0
        } else {
            (len + ALIGN_SLACK) * 4
        }
    }

    /// Its `len` values, from the cache line on.
    pub(crate) fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.buf[self.skip..self.skip + self.len]
    }
}

impl Drop for LineBuf {
    fn drop(&mut self) {
        scratch_give(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn kept_scratch_comes_back_zeroed_and_sized() {
        let mut v = super::scratch_take(1 << 15);
        v.iter_mut().for_each(|x| *x = f32::NAN);
        super::scratch_give(v);
        for len in [1 << 14, 1 << 15, 3 << 14, 10] {
            let v = super::scratch_take(len);
            assert_eq!(v.len(), len);
            assert!(v.iter().all(|&x| x == 0.0));
            super::scratch_give(v);
        }
    }

    #[test]
    fn zeroed_buffers_of_any_size_are_zero() {
        for len in [0, 1, 1023, (4 << 20) / 4 + 3, (9 << 20) / 4] {
            let v = super::zeroed_f32(len);
            assert_eq!(v.len(), len);
            assert!(v.iter().all(|&x| x == 0.0));
        }
    }

    #[test]
    fn line_buffers_start_on_a_cache_line_and_hold_their_length() {
        use super::LineBuf;
        // Kept buffers of every alignment the allocator hands out come back through the
        // pool: take several sizes, give them back, take them again.
        for round in 0..2 {
            let mut held = Vec::new();
            for len in [1, 15, 16, 100, 4096, (1 << 14) + 3, 1 << 15] {
                let mut b = LineBuf::zeroed(len);
                let s = b.as_mut_slice();
                assert_eq!(s.len(), len, "round {round} len {len}");
                assert_eq!(s.as_ptr() as usize % 64, 0, "round {round} len {len}");
                assert!(s.iter().all(|&x| x == 0.0), "round {round} len {len}");
                s.fill(f32::NAN);
                assert_eq!(LineBuf::bytes(len), (len + super::ALIGN_SLACK) * 4);
                held.push(b);
            }
        }
        assert_eq!(LineBuf::zeroed(0).as_mut_slice().len(), 0);
        assert_eq!(LineBuf::bytes(0), 0);
    }
}
