//! Same-host shared memory for outputs (as Triton's system shared-memory extension): a client
//! on the server's host creates a file in the shared-memory directory (POSIX `shm_open`,
//! i.e. `/dev/shm/<key>`), registers it under a name, and asks InferStream to write the
//! output there instead of streaming it over the socket. The output then never crosses TCP.
//!
//! The server only ever `pwrite`s into the file (it never maps it): a client that truncates
//! or removes the file after registering it can lose its own output, but cannot crash the
//! server (writing through a mapping past the end of a shrunk file would raise SIGBUS).
//! Off unless `--shared-memory-dir` is set: any caller allowed to call the server can then
//! make it write into files of that directory that the server's user may open.
//!
//! Server-created regions (`CreateSharedMemory`) go one step further: the server makes a
//! memory file (`memfd`), allocates it, seals it against shrinking and growing, and maps it;
//! the client opens it through `/proc/<server pid>/fd/<n>` (same host, same PID namespace,
//! same user). A sealed file cannot shrink under the mapping, so the kernel can write a
//! float32 output straight into it, with no copy at all. Their total size is bounded by
//! `--shared-memory-create-limit`, charged when created and returned when the last call
//! using the region ends after it is unregistered.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

// The one mapping of memory another process writes: unsafe by nature (mmap).
#[allow(unsafe_code)]
mod map;

use map::SealedMap;

use bytes::Bytes;

use crate::error::ServiceError;

/// Regions registered at once, at most.
pub const MAX_REGIONS: usize = 256;

/// Longest key or name accepted.
pub const MAX_KEY_LEN: usize = 255;

/// A registered window `[offset, offset + byte_size)` of one shared-memory file.
#[derive(Debug)]
pub struct Region {
    pub name: String,
    pub key: String,
    pub offset: u64,
    pub byte_size: u64,
    file: File,
    /// Server-created regions: the mapping outputs are computed into (one call at a time).
    map: Option<Mutex<SealedMap>>,
    /// Server-created regions: their share of the create limit, returned on drop.
    _charge: Option<Charge>,
}

/// Bytes of server-created regions, held against the limit until dropped.
#[derive(Debug)]
struct Charge {
    total: Arc<AtomicU64>,
    bytes: u64,
}

impl Charge {
    /// Takes `bytes` from `total` if it stays within `limit`.
    fn take(total: &Arc<AtomicU64>, bytes: u64, limit: u64) -> Option<Self> {
        total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                t.checked_add(bytes).filter(|&n| n <= limit)
            })
            .ok()?;
        Some(Self {
            total: Arc::clone(total),
            bytes,
        })
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.total.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// A float32 output window of a server-created region, held by one call.
pub struct DirectWindow<'r> {
    map: MutexGuard<'r, SealedMap>,
    at: usize,
    count: usize,
}

impl DirectWindow<'_> {
    /// The window, for the kernel to write into.
    pub fn floats(&mut self) -> &mut [f32] {
        // Checked when the window was taken; an empty slice would fail the kernel's own
        // length check rather than write anywhere else.
        self.map.f32_window(self.at, self.count).unwrap_or_default()
    }
}

impl Region {
    /// Whether the server created (and maps) this region.
    pub fn server_created(&self) -> bool {
        self.map.is_some()
    }

    /// `count` floats at `at` bytes into a server-created region, for the kernel to write
    /// into directly; `None` for client files, misaligned windows, or while another call
    /// writes into the region (that call then goes through `write_at`).
    pub fn direct_f32(&self, at: u64, count: usize) -> Option<DirectWindow<'_>> {
        let at = usize::try_from(self.offset.checked_add(at)?).ok()?;
        let mut map = match self.map.as_ref()?.try_lock() {
            Ok(g) => g,
            // The kernel panicked while writing: the bytes are the client's to overwrite.
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return None,
        };
        map.f32_window(at, count)?;
        Some(DirectWindow { map, at, count })
    }

    /// Writes `data` at `at` bytes into the region. The caller has checked the bounds
    /// against [`Region::byte_size`] (`check_window`).
    pub fn write_at(&self, at: u64, data: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(data, self.offset + at)
    }

    /// Reads the decoder's whole input from `at` bytes into the region, in pieces. The
    /// caller has checked the bounds; an object truncated since is an INVALID_ARGUMENT.
    pub fn read_into(
        &self,
        at: u64,
        dec: &mut crate::tensor::dtype::StreamDecoder,
    ) -> Result<(), ServiceError> {
        // Input chunk-sized pieces: the buffer is not part of the call's reservation.
        const PIECE: usize = 1 << 20;
        let total = dec.bytes_expected();
        let mut buf = vec![0u8; total.min(PIECE)];
        let mut done = 0usize;
        while done < total {
            let n = (total - done).min(PIECE);
            self.file
                .read_exact_at(&mut buf[..n], self.offset + at + done as u64)
                .map_err(|e| {
                    ServiceError::invalid(format!(
                        "header.input_shared_memory: region {:?} ended after {done} of the                          input's {total} bytes ({})",
                        self.name,
                        e.kind()
                    ))
                })?;
            dec.push(&buf[..n]);
            done += n;
        }
        Ok(())
    }

    /// Runs `produce` with a sink that hands `(offset, bytes)` pieces to a writer thread,
    /// which writes each at `base + offset` of the region while `produce` goes on (at most
    /// `depth` pieces wait). Once the writer fails, the sink refuses further pieces; the
    /// failure comes back beside `produce`'s result, after every accepted piece is written.
    pub fn with_writer<R>(
        &self,
        base: u64,
        depth: usize,
        produce: impl FnOnce(&mut dyn FnMut(u64, Bytes) -> bool) -> R,
    ) -> (R, Option<std::io::ErrorKind>) {
        std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, Bytes)>(depth.max(1));
            let writer = std::thread::Builder::new()
                .name("voxconv-shm".into())
                .spawn_scoped(scope, move || {
                    for (offset, data) in rx {
                        if let Err(e) = self.write_at(base + offset, &data) {
                            return Some(e.kind());
                        }
                    }
                    None
                });
            match writer {
                Ok(writer) => {
                    let r = produce(&mut |offset, data| tx.send((offset, data)).is_ok());
                    drop(tx);
                    let failed = writer.join().unwrap_or(Some(std::io::ErrorKind::Other));
                    (r, failed)
                }
                // No thread to spare: write in line.
                Err(_) => {
                    let mut failed = None;
                    let r = produce(
                        &mut |offset, data| match self.write_at(base + offset, &data) {
                            Ok(()) => true,
                            Err(e) => {
                                failed = Some(e.kind());
                                false
                            }
                        },
                    );
                    (r, failed)
                }
            }
        })
    }

    /// Whether `len` bytes at `at` lie in the region; the error names `field`.
    pub fn check_window(&self, field: &str, at: u64, len: u64) -> Result<(), ServiceError> {
        match at.checked_add(len) {
            Some(end) if end <= self.byte_size => Ok(()),
            _ => Err(ServiceError::invalid(format!(
                "{field}: the output needs {len} bytes at offset {at} of region {:?}, \
                 which holds {} bytes",
                self.name, self.byte_size
            ))),
        }
    }
}

/// The regions of one server, by name.
#[derive(Debug, Default)]
pub struct SharedMemory {
    /// Where keys are looked up; `None`: the feature is off.
    dir: Option<PathBuf>,
    regions: Mutex<HashMap<String, Arc<Region>>>,
    /// Most bytes of server-created regions alive at once (0: none may be created).
    create_limit: u64,
    /// Bytes of server-created regions alive now.
    created: Arc<AtomicU64>,
}

fn disabled() -> ServiceError {
    ServiceError::FailedPrecondition(
        "shared memory is off on this server (start it with --shared-memory-dir /dev/shm)".into(),
    )
}

/// Checks a name or key: 1..=255 characters of `[A-Za-z0-9._-]`, not `.` or `..`; a key may
/// start with one `/` as POSIX `shm_open` keys do.
fn check_token(field: &str, v: &str, slash: bool) -> Result<String, ServiceError> {
    let bare = if slash {
        v.strip_prefix('/').unwrap_or(v)
    } else {
        v
    };
    let ok = !bare.is_empty()
        && bare.len() <= MAX_KEY_LEN
        && bare != "."
        && bare != ".."
        && bare
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(bare.to_string())
    } else {
        Err(ServiceError::invalid(format!(
            "{field}: expected 1 to {MAX_KEY_LEN} characters of A-Z a-z 0-9 . _ -{}, got {} \
             characters",
            if slash {
                " after an optional leading /"
            } else {
                ""
            },
            v.chars().count()
        )))
    }
}

impl SharedMemory {
    pub fn new(dir: Option<PathBuf>, create_limit: u64) -> Self {
        Self {
            dir,
            regions: Mutex::default(),
            create_limit,
            created: Arc::default(),
        }
    }

    /// Bytes of server-created regions alive now (unregistered ones still in use count).
    pub fn created_bytes(&self) -> u64 {
        self.created.load(Ordering::Acquire)
    }

    /// The live count behind [`created_bytes`](Self::created_bytes), for metrics.
    pub fn created_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.created)
    }

    /// The limit that applies to server-created regions (0 when they cannot be created).
    pub fn create_limit(&self) -> u64 {
        if self.enabled() {
            self.create_limit
        } else {
            0
        }
    }

    /// Inserts `region` unless the name is taken or the table is full.
    fn insert(&self, region: Region) -> Result<(), ServiceError> {
        let mut regions = self.lock();
        if regions.len() >= MAX_REGIONS {
            return Err(ServiceError::ResourceExhausted(format!(
                "name: {MAX_REGIONS} regions are registered already (the most a server keeps); \
                 unregister some"
            )));
        }
        if regions.contains_key(&region.name) {
            return Err(ServiceError::AlreadyExists(format!(
                "name: a region named {:?} is already registered (unregister it first)",
                region.name
            )));
        }
        regions.insert(region.name.clone(), Arc::new(region));
        Ok(())
    }

    /// Creates, allocates, seals and maps a memory file of `byte_size` bytes and registers
    /// it as `name`. Returns the key a client on this host opens it by
    /// (`/proc/<pid>/fd/<n>`) and the file's name, which the client checks (reading the link
    /// of the descriptor it opened gives `/memfd:<name> (deleted)`).
    pub fn create(&self, name: &str, byte_size: u64) -> Result<(String, String), ServiceError> {
        use rustix::fs::{FallocateFlags, MemfdFlags, SealFlags};
        if !self.enabled() {
            return Err(disabled());
        }
        check_token("name", name, false)?;
        if self.create_limit == 0 {
            return Err(ServiceError::FailedPrecondition(
                "server-created shared memory is off on this server \
                 (--shared-memory-create-limit is 0)"
                    .into(),
            ));
        }
        let len = usize::try_from(byte_size)
            .ok()
            .filter(|&l| l > 0)
            .ok_or_else(|| {
                ServiceError::invalid(format!(
                    "byte_size: expected 1 to {} bytes, got {byte_size}",
                    self.create_limit
                ))
            })?;
        let charge =
            Charge::take(&self.created, byte_size, self.create_limit).ok_or_else(|| {
                ServiceError::ResourceExhausted(format!(
                    "byte_size: {byte_size} bytes asked, but {} of the {} bytes this server gives \
                 created regions are in use (unregister some)",
                    self.created_bytes(),
                    self.create_limit
                ))
            })?;
        let memfd_name = format!("voxconv-{:016x}", rand::random::<u64>());
        let io = |what: &str, e: std::io::Error| {
            ServiceError::Internal(format!(
                "creating shared memory: {what} failed ({})",
                e.kind()
            ))
        };
        let fd = rustix::fs::memfd_create(
            memfd_name.as_str(),
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )
        .map_err(|e| io("memfd_create", e.into()))?;
        let file = File::from(fd);
        file.set_len(byte_size).map_err(|e| io("ftruncate", e))?;
        // Allocate now: a page the kernel touches later must not fail for want of memory.
        rustix::fs::fallocate(&file, FallocateFlags::empty(), 0, byte_size).map_err(|_| {
            ServiceError::ResourceExhausted(format!(
                "byte_size: the server could not allocate {byte_size} bytes of shared memory"
            ))
        })?;
        rustix::fs::fcntl_add_seals(&file, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)
            .map_err(|e| io("sealing", e.into()))?;
        let map = SealedMap::new(&file, len).map_err(|e| io("mmap", e))?;
        let key = format!("/proc/{}/fd/{}", std::process::id(), file.as_raw_fd());
        self.insert(Region {
            name: name.to_string(),
            key: key.clone(),
            offset: 0,
            byte_size,
            file,
            map: Some(Mutex::new(map)),
            _charge: Some(charge),
        })?;
        Ok((key, memfd_name))
    }

    pub fn enabled(&self) -> bool {
        self.dir.is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Region>>> {
        // A panic while holding the lock cannot leave the map half-updated (single inserts
        // and removals), so a poisoned lock is still usable.
        self.regions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens `key` in the shared-memory directory and registers `[offset, offset+byte_size)`
    /// of it as `name`.
    pub fn register(
        &self,
        name: &str,
        key: &str,
        offset: u64,
        byte_size: u64,
    ) -> Result<(), ServiceError> {
        let dir = self.dir.as_ref().ok_or_else(disabled)?;
        check_token("name", name, false)?;
        let file_name = check_token("key", key, true)?;
        if byte_size == 0 {
            return Err(ServiceError::invalid(
                "byte_size: expected at least 1 byte, got 0",
            ));
        }
        let end = offset.checked_add(byte_size).ok_or_else(|| {
            ServiceError::invalid(format!(
                "byte_size: offset {offset} + byte_size {byte_size} overflows"
            ))
        })?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(dir.join(&file_name))
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::IsADirectory => ServiceError::invalid(format!(
                    "key: {key:?} is not a regular shared-memory object"
                )),
                std::io::ErrorKind::NotFound => {
                    ServiceError::NotFound(format!("key: {key:?}: no such shared-memory object"))
                }
                std::io::ErrorKind::PermissionDenied => {
                    ServiceError::NotFound(format!("key: {key:?}: permission denied"))
                }
                _ => ServiceError::NotFound(format!("key: {key:?} cannot be opened")),
            })?;
        let meta = file
            .metadata()
            .map_err(|_| ServiceError::invalid(format!("key: {key:?} cannot be inspected")))?;
        if !meta.is_file() {
            return Err(ServiceError::invalid(format!(
                "key: {key:?} is not a regular shared-memory object"
            )));
        }
        if meta.len() < end {
            return Err(ServiceError::invalid(format!(
                "byte_size: offset {offset} + byte_size {byte_size} = {end} bytes, but {key:?} \
                 holds {} bytes",
                meta.len()
            )));
        }
        self.insert(Region {
            name: name.to_string(),
            key: key.to_string(),
            offset,
            byte_size,
            file,
            map: None,
            _charge: None,
        })
    }

    /// Forgets region `name` (all regions when `name` is empty). Calls already writing to it
    /// finish first: they hold the region.
    pub fn unregister(&self, name: &str) -> Result<(), ServiceError> {
        if !self.enabled() {
            return Err(disabled());
        }
        let mut regions = self.lock();
        if name.is_empty() {
            regions.clear();
            return Ok(());
        }
        regions.remove(name).map(|_| ()).ok_or_else(|| {
            ServiceError::NotFound(format!("name: no region named {name:?} is registered"))
        })
    }

    /// The region named `name`; the error names `field`.
    pub fn get(&self, field: &str, name: &str) -> Result<Arc<Region>, ServiceError> {
        if !self.enabled() {
            return Err(disabled());
        }
        self.lock().get(name).cloned().ok_or_else(|| {
            ServiceError::NotFound(format!("{field}: no region named {name:?} is registered"))
        })
    }

    /// Registered regions (one when `name` is set), sorted by name.
    pub fn status(&self, name: &str) -> Result<Vec<Arc<Region>>, ServiceError> {
        if !name.is_empty() {
            return Ok(vec![self.get("name", name)?]);
        }
        if !self.enabled() {
            return Err(disabled());
        }
        let mut all: Vec<_> = self.lock().values().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> tempfile::TempDir {
        tempfile::tempdir().expect("temp dir")
    }

    #[test]
    fn registers_writes_within_bounds_and_unregisters() {
        let d = dir();
        std::fs::write(d.path().join("vol"), vec![0u8; 64]).unwrap();
        let shm = SharedMemory::new(Some(d.path().into()), 1 << 20);
        shm.register("out", "/vol", 16, 32).unwrap();
        let r = shm.get("output", "out").unwrap();
        assert!(r.check_window("f", 0, 32).is_ok());
        assert!(r.check_window("f", 1, 32).is_err());
        assert!(r.check_window("f", u64::MAX, 2).is_err());
        r.write_at(4, &[7, 7]).unwrap();
        let bytes = std::fs::read(d.path().join("vol")).unwrap();
        assert_eq!(&bytes[18..22], &[0, 0, 7, 7]);
        assert_eq!(
            shm.register("out", "vol", 0, 1).unwrap_err(),
            ServiceError::AlreadyExists(
                "name: a region named \"out\" is already registered (unregister it first)".into()
            )
        );
        assert_eq!(shm.status("").unwrap().len(), 1);
        shm.unregister("out").unwrap();
        assert!(matches!(
            shm.get("output", "out"),
            Err(ServiceError::NotFound(_))
        ));
        assert!(matches!(
            shm.unregister("out"),
            Err(ServiceError::NotFound(_))
        ));
    }

    #[test]
    fn refuses_bad_keys_sizes_and_a_disabled_server() {
        let d = dir();
        std::fs::write(d.path().join("small"), vec![0u8; 8]).unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::os::unix::fs::symlink(d.path().join("small"), d.path().join("link")).unwrap();
        let shm = SharedMemory::new(Some(d.path().into()), 1 << 20);
        let invalid =
            |r: Result<(), ServiceError>| matches!(r, Err(ServiceError::InvalidArgument(_)));
        for key in ["", "/", "..", "/../etc", "a/b", "sp ace", &"k".repeat(300)] {
            assert!(invalid(shm.register("r", key, 0, 1)), "key {key:?}");
        }
        assert!(invalid(shm.register("a/b", "small", 0, 1)));
        assert!(invalid(shm.register("r", "small", 0, 0)));
        assert!(invalid(shm.register("r", "small", 4, 5)));
        assert!(invalid(shm.register("r", "small", u64::MAX, 1)));
        assert!(invalid(shm.register("r", "sub", 0, 1)));
        assert!(matches!(
            shm.register("r", "link", 0, 1),
            Err(ServiceError::NotFound(_))
        ));
        assert!(matches!(
            shm.register("r", "missing", 0, 1),
            Err(ServiceError::NotFound(_))
        ));
        assert!(shm.status("").unwrap().is_empty());
        shm.register("r", "small", 4, 4).unwrap();

        let off = SharedMemory::new(None, 1 << 20);
        for r in [
            off.register("r", "small", 0, 1),
            off.unregister(""),
            off.get("f", "r").map(|_| ()),
            off.status("").map(|_| ()),
        ] {
            assert!(matches!(r, Err(ServiceError::FailedPrecondition(_))));
        }
    }

    #[test]
    fn a_truncated_file_loses_output_but_never_faults_the_server() {
        let d = dir();
        let path = d.path().join("vol");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let shm = SharedMemory::new(Some(d.path().into()), 1 << 20);
        shm.register("out", "vol", 0, 4096).unwrap();
        let r = shm.get("output", "out").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(0)
            .unwrap();
        // pwrite past the end extends the file instead of raising SIGBUS.
        r.write_at(4000, &[1; 96]).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4096);
    }

    #[test]
    fn created_regions_are_charged_until_dropped_and_computed_into_one_call_at_a_time() {
        let d = dir();
        let shm = SharedMemory::new(Some(d.path().into()), 3 * 4096);
        let (key, memfd) = shm.create("a", 8192).unwrap();
        assert!(key.starts_with("/proc/"));
        assert!(memfd.starts_with("voxconv-"));
        assert_eq!(shm.created_bytes(), 8192);
        let err = shm.create("b", 8192).unwrap_err();
        assert!(matches!(err, ServiceError::ResourceExhausted(_)), "{err:?}");
        assert_eq!(shm.created_bytes(), 8192, "a refused request holds nothing");
        let r = shm.get("f", "a").unwrap();
        assert!(r.server_created());
        {
            let mut w = r.direct_f32(4, 3).unwrap();
            w.floats().copy_from_slice(&[1.0, 2.0, 3.0]);
            // Busy while held: a second call falls back to writing.
            assert!(r.direct_f32(100, 1).is_none());
        }
        assert!(r.direct_f32(2, 1).is_none(), "misaligned");
        assert!(r.direct_f32(8192 - 4, 2).is_none(), "past the end");
        let mut back = [0u8; 12];
        r.file.read_exact_at(&mut back, 4).unwrap();
        assert_eq!(back[8..], 3.0f32.to_le_bytes());
        // Unregistered while a call still holds it: charged until that call lets go.
        shm.unregister("a").unwrap();
        assert_eq!(shm.created_bytes(), 8192);
        drop(r);
        assert_eq!(shm.created_bytes(), 0);
        // Client files are never computed into in place.
        std::fs::write(d.path().join("vol"), vec![0u8; 64]).unwrap();
        shm.register("c", "/vol", 0, 64).unwrap();
        assert!(shm.get("f", "c").unwrap().direct_f32(0, 1).is_none());
        let off = SharedMemory::new(Some(d.path().into()), 0);
        assert!(matches!(
            off.create("a", 4),
            Err(ServiceError::FailedPrecondition(_))
        ));
    }
}
