//! Large zeroed output buffers.
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

#[cfg(test)]
mod tests {
    #[test]
    fn zeroed_buffers_of_any_size_are_zero() {
        for len in [0, 1, 1023, (4 << 20) / 4 + 3, (9 << 20) / 4] {
            let v = super::zeroed_f32(len);
            assert_eq!(v.len(), len);
            assert!(v.iter().all(|&x| x == 0.0));
        }
    }
}
