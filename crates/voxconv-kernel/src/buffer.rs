//! Large zeroed output buffers, and cache-line alignment of scratch buffers.
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

/// Elements a scratch buffer holds beyond its use so that [`cache_aligned`] can drop up to
/// this many less one from its front.
pub const ALIGN_SLACK: usize = 16;

/// `buf` from its first element on a 64-byte boundary. The Winograd buffers are written and
/// read in whole 16-float vectors at multiples of 16 floats from their start; on a cache line
/// each is one line, not two (the allocator hands out 16-byte alignment: 16→16 over 48³ at
/// one thread 10.0 → 9.3 ms, AMD Zen 4, 2026-12-07).
pub fn cache_aligned(buf: &mut [f32]) -> &mut [f32] {
    let skip = buf
        .as_ptr()
        .align_offset(64)
        .min(ALIGN_SLACK - 1)
        .min(buf.len());
    &mut buf[skip..]
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
    fn cache_aligned_starts_on_a_cache_line_and_drops_less_than_the_slack() {
        use super::{cache_aligned, ALIGN_SLACK};
        for len in [ALIGN_SLACK, 100, 4096] {
            for shift in 0..ALIGN_SLACK {
                let mut v = vec![0f32; len + shift];
                let whole = v.len();
                let end = v.as_ptr_range().end;
                let a = cache_aligned(&mut v[shift..]);
                assert_eq!(a.as_ptr() as usize % 64, 0, "len {len} shift {shift}");
                assert!(
                    a.len() + ALIGN_SLACK > whole - shift,
                    "len {len} shift {shift}"
                );
                assert_eq!(a.as_ptr_range().end, end);
            }
        }
    }
}
