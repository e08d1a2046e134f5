//! The one mapping of memory another process reads: a memory file sealed against shrinking.

/// A shared, writable mapping of a memory file sealed against shrinking: output buffers in
/// memory another process on the host reads (server-created shared memory, see the parent module).
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
}
