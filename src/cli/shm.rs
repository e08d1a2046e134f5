//! Client side of same-host shared memory (see [`crate::shm`]): a region the client creates
//! in the shared-memory directory and registers with the server, or one the server creates
//! and the client opens; the input is written at its start and the output read back after it.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::proto::voxconv::v1 as pb;
use crate::proto::voxconv::v1::inference_client::InferenceClient;

type BoxError = Box<dyn std::error::Error>;
type Client = InferenceClient<super::connect::Authed>;

/// The output shape a model gives for `input` ([N, C, D, H, W]), from its `GetModel`
/// layers: per spatial axis `(n + 2p - d(k-1) - 1) / s + 1`, as the server plans it.
pub fn output_shape(info: &pb::ModelInfo, input: &[u64]) -> Result<[u64; 5], BoxError> {
    let [n, _, d, h, w]: [u64; 5] = input
        .try_into()
        .map_err(|_| format!("input shape: expected 5 dimensions, got {input:?}"))?;
    let mut spatial = [d, h, w];
    for l in &info.layers {
        let at =
            |v: &[u32], i: usize, default: u32| u64::from(v.get(i).copied().unwrap_or(default));
        for (i, x) in spatial.iter_mut().enumerate() {
            let (k, s, p, dil) = (
                at(&l.kernel, i, 1),
                at(&l.stride, i, 1).max(1),
                at(&l.padding, i, 0),
                at(&l.dilation, i, 1),
            );
            let span = dil * (k.max(1) - 1) + 1;
            let padded = *x + 2 * p;
            if padded < span {
                return Err(format!(
                    "input shape {input:?}: too small for model {} ({} of {span} voxels)",
                    info.name, padded
                )
                .into());
            }
            *x = (padded - span) / s + 1;
        }
    }
    Ok([
        n,
        u64::from(info.output_channels),
        spatial[0],
        spatial[1],
        spatial[2],
    ])
}

/// Where a client's shared-memory region lives.
#[derive(Clone, Debug)]
pub enum Placement {
    /// A file the client creates in this directory (normally /dev/shm) and registers.
    Dir(PathBuf),
    /// Memory the server creates and maps (CreateSharedMemory): outputs computed in place.
    Server,
}

impl Placement {
    /// From the `--shared-memory-dir` and `--server-shared-memory` flags.
    pub fn from_flags(dir: Option<&Path>, server: bool) -> Option<Self> {
        match (dir, server) {
            (_, true) => Some(Self::Server),
            (Some(d), false) => Some(Self::Dir(d.to_path_buf())),
            (None, false) => None,
        }
    }
}

/// A shared-memory region for one client: input bytes at 0, output at
/// [`ClientRegion::output_at`]. A file the client created is removed when the region is
/// dropped; [`ClientRegion::release`] unregisters it (frees a server-created one).
pub struct ClientRegion {
    /// The client's file, removed on drop (`None`: the server's memory).
    path: Option<PathBuf>,
    file: File,
    name: String,
    bytes: u64,
}

impl ClientRegion {
    /// Where the output starts: after the input, 64-byte aligned.
    pub fn output_at(input_bytes: u64) -> u64 {
        input_bytes.div_ceil(64) * 64
    }

    /// Creates a region for `input_bytes` then `output_bytes` where `placement` says, and
    /// registers it.
    pub async fn create(
        client: &mut Client,
        placement: &Placement,
        input_bytes: u64,
        output_bytes: u64,
    ) -> Result<Self, BoxError> {
        let bytes = Self::output_at(input_bytes)
            .checked_add(output_bytes)
            .ok_or("the input and output are too large to address")?;
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!(
            "voxconv-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        match placement {
            Placement::Dir(dir) => Self::in_dir(client, dir, name, bytes).await,
            Placement::Server => Self::on_server(client, name, bytes).await,
        }
    }

    async fn in_dir(
        client: &mut Client,
        dir: &Path,
        name: String,
        bytes: u64,
    ) -> Result<Self, BoxError> {
        let path = dir.join(&name);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| format!("--shared-memory-dir {}: {e}", dir.display()))?;
        let region = Self {
            path: Some(path),
            file,
            name,
            bytes,
        };
        region.file.set_len(bytes)?;
        client
            .register_shared_memory(pb::RegisterSharedMemoryRequest {
                name: region.name.clone(),
                key: format!("/{}", region.name),
                offset: 0,
                byte_size: bytes,
            })
            .await
            .map_err(|s| format!("RegisterSharedMemory: {}: {}", s.code(), s.message()))?;
        Ok(region)
    }

    async fn on_server(client: &mut Client, name: String, bytes: u64) -> Result<Self, BoxError> {
        let made = client
            .create_shared_memory(pb::CreateSharedMemoryRequest {
                name: name.clone(),
                byte_size: bytes,
            })
            .await
            .map_err(|s| format!("CreateSharedMemory: {}: {}", s.code(), s.message()))?
            .into_inner();
        let opened = open_server_region(&made.key, &made.memfd_name);
        let file = match opened {
            Ok(f) => f,
            Err(e) => {
                // Unusable from here: give the server its memory back.
                let _ = client
                    .unregister_shared_memory(pb::UnregisterSharedMemoryRequest { name })
                    .await;
                return Err(e);
            }
        };
        Ok(Self {
            path: None,
            file,
            name,
            bytes,
        })
    }

    /// A reference to `offset` bytes into the region, for a StreamHeader.
    pub fn at(&self, offset: u64) -> pb::SharedMemoryRef {
        pb::SharedMemoryRef {
            region: self.name.clone(),
            offset,
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Writes `data` at `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    /// Fills `out` from `offset`.
    pub fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.file.read_exact_at(out, offset)
    }

    /// Unregisters the region (the file goes when `self` is dropped).
    pub async fn release(self, client: &mut Client) -> Result<(), BoxError> {
        client
            .unregister_shared_memory(pb::UnregisterSharedMemoryRequest {
                name: self.name.clone(),
            })
            .await
            .map_err(|s| format!("UnregisterSharedMemory: {}: {}", s.code(), s.message()))?;
        Ok(())
    }
}

impl Drop for ClientRegion {
    fn drop(&mut self) {
        if let Some(path) = &self.path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Opens a server-created region by its key and checks it is the server's memory file (the
/// same descriptor number on another host or in another PID namespace is something else).
pub fn open_server_region(key: &str, memfd_name: &str) -> Result<File, BoxError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(key)
        .map_err(|e| {
            format!(
                "the server's shared memory {key} cannot be opened here ({e}): server-created \
                 regions need the server on this host, in this PID namespace, as this user"
            )
        })?;
    let link = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
    let want = format!("/memfd:{memfd_name} (deleted)");
    if link.as_os_str() != want.as_str() {
        return Err(format!(
            "{key} is not the server's shared memory here (another host or PID namespace?): \
             use --shared-memory-dir instead"
        )
        .into());
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_shape_follows_the_layers_like_the_server_plan() {
        use crate::model::ModelSet;
        let set = ModelSet::builtin();
        for m in set.iter() {
            let info = crate::service::model_info(m);
            for dims in [[1usize, 0, 17, 9, 12], [2, 0, 33, 40, 31]] {
                let mut dims = dims;
                dims[1] = m.in_channels();
                let Ok(plan) = m.plan(dims) else { continue };
                let input: Vec<u64> = dims.iter().map(|&d| d as u64).collect();
                let want: Vec<u64> = plan.output.iter().map(|&d| d as u64).collect();
                assert_eq!(
                    output_shape(&info, &input).unwrap().to_vec(),
                    want,
                    "model {}",
                    m.name
                );
            }
        }
    }
}
