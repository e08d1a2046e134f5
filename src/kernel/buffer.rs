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

/// A shared, writable mapping of a memory file sealed against shrinking: output buffers in
/// memory another process on the host reads (server-created shared memory, see `crate::shm`).
///
/// A mapping of an ordinary file raises SIGBUS when the file shrinks under it; this type
/// refuses files that can still shrink (`F_SEAL_SHRINK` missing), so every page of the
/// mapping stays backed for its whole life.
#[cfg(target_os = "linux")]
#[derive(Debug)]
pub struct SealedMap {
    ptr: std::ptr::NonNull<f32>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value (unmapped on drop); it is only
// reached through `&mut self` (`f32_window`), so moving or sharing the handle between threads
// cannot create unsynchronised access from this process.
#[cfg(target_os = "linux")]
unsafe impl Send for SealedMap {}
// SAFETY: as for Send: `&SealedMap` gives no access to the memory at all.
#[cfg(target_os = "linux")]
unsafe impl Sync for SealedMap {}

#[cfg(target_os = "linux")]
impl SealedMap {
    /// Maps the first `bytes` bytes of `file` (shared, read-write, pages populated). Fails
    /// unless `file` is sealed against shrinking and holds at least `bytes` bytes.
    pub fn new(file: &std::fs::File, bytes: usize) -> std::io::Result<Self> {
        use rustix::fs::SealFlags;
        use rustix::mm::{MapFlags, ProtFlags};
        let seals = rustix::fs::fcntl_get_seals(file)?;
        if !seals.contains(SealFlags::SHRINK) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the file can still shrink (F_SEAL_SHRINK not set)",
            ));
        }
        if (file.metadata()?.len() as u128) < bytes as u128 || bytes == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the file is shorter than the mapping, or the mapping is empty",
            ));
        }
        // SAFETY: a fresh mapping chosen by the system (no fixed address, so nothing of ours
        // is replaced) of `bytes` bytes that the file holds; the file cannot shrink (sealed,
        // checked above), so no access inside the mapping can fault with SIGBUS. Other
        // processes may change the bytes at any time: f32 has no invalid bit patterns, and
        // the mapping is only handed out as an output buffer whose contents belong to them.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                bytes,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED | MapFlags::POPULATE,
                file,
                0,
            )?
        };
        let ptr = std::ptr::NonNull::new(ptr.cast::<f32>())
            .ok_or_else(|| std::io::Error::other("mmap returned a null mapping"))?;
        Ok(Self { ptr, len: bytes })
    }

    /// `count` floats from `byte_offset` (4-byte aligned) as a slice, or `None` when the
    /// window is misaligned or does not fit the mapping.
    pub fn f32_window(&mut self, byte_offset: usize, count: usize) -> Option<&mut [f32]> {
        let end = count.checked_mul(4)?.checked_add(byte_offset)?;
        if !byte_offset.is_multiple_of(4) || end > self.len {
            return None;
        }
        // SAFETY: [byte_offset, end) lies inside the live mapping (checked above) and starts
        // 4-byte aligned (the mapping starts page-aligned); `&mut self` makes this the only
        // slice of the mapping in this process for its lifetime.
        Some(unsafe {
            std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(byte_offset / 4), count)
        })
    }
}

#[cfg(target_os = "linux")]
impl Drop for SealedMap {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping made in `new`, unmapped once, here; no
        // slice of it outlives `self` (they borrow it).
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_os = "linux")]
    #[test]
    fn sealed_maps_refuse_unsealed_files_and_write_through_to_the_file() {
        use rustix::fs::{MemfdFlags, SealFlags};
        use std::os::unix::fs::FileExt;
        let fd =
            rustix::fs::memfd_create("t", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
        let file = std::fs::File::from(fd);
        file.set_len(4096).unwrap();
        // Unsealed: it could shrink under the mapping.
        assert!(super::SealedMap::new(&file, 4096).is_err());
        rustix::fs::fcntl_add_seals(&file, SealFlags::SHRINK | SealFlags::GROW).unwrap();
        assert!(
            super::SealedMap::new(&file, 8192).is_err(),
            "longer than the file"
        );
        let mut m = super::SealedMap::new(&file, 4096).unwrap();
        assert!(m.f32_window(2, 1).is_none(), "misaligned");
        assert!(m.f32_window(4092, 2).is_none(), "past the end");
        m.f32_window(4, 2).unwrap().copy_from_slice(&[1.5, -2.0]);
        let mut back = [0u8; 8];
        file.read_exact_at(&mut back, 4).unwrap();
        assert_eq!(back[..4], 1.5f32.to_le_bytes());
        assert_eq!(back[4..], (-2.0f32).to_le_bytes());
        // The seal holds: the file cannot shrink under the mapping.
        assert!(file.set_len(0).is_err());
    }

    #[test]
    fn zeroed_buffers_of_any_size_are_zero() {
        for len in [0, 1, 1023, (4 << 20) / 4 + 3, (9 << 20) / 4] {
            let v = super::zeroed_f32(len);
            assert_eq!(v.len(), len);
            assert!(v.iter().all(|&x| x == 0.0));
        }
    }
}
