//! Client side of same-host shared memory (the server side is `crate::shm`): a region the client creates
//! in the shared-memory directory and registers with the server, or one the server creates
//! and the client opens; the input is written at its start and the output read back after it.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::kernel::maxpool::maxpool3d_shape;
use crate::kernel::shape::output_dim;
use crate::kernel::KernelError;
use crate::proto::voxconv::v1 as pb;
use crate::proto::voxconv::v1::inference_client::InferenceClient;

type BoxError = Box<dyn std::error::Error>;
type Client = InferenceClient<super::connect::Authed>;

/// The output shape a model gives for `input` ([N, C, D, H, W]), from its `GetModel`
/// layers, through the kernel's own checked geometry (what the server plans with): every
/// value from the server is checked, none trusted.
pub fn output_shape(info: &pb::ModelInfo, input: &[u64]) -> Result<[u64; 5], BoxError> {
    let dims: [u64; 5] = input
        .try_into()
        .map_err(|_| format!("input shape: expected 5 dimensions, got {input:?}"))?;
    let mut shape = [0usize; 5];
    for (d, &v) in shape.iter_mut().zip(&dims) {
        *d = usize::try_from(v).map_err(|_| format!("input shape {input:?}: too large"))?;
    }
    let bad = |e: KernelError| -> BoxError {
        format!("input shape {input:?} through model {}: {e}", info.name).into()
    };
    if info.format == "onnx" {
        // A graph's output dims as GetModel gives them; a dynamic one (-1) is taken to follow
        // the input's (segmentation networks keep N, D, H, W). The server checks the
        // region's size against its own plan either way.
        let out = info
            .outputs
            .first()
            .ok_or("GetModel gave an ONNX model no output")?;
        if out.shape.len() != 5 {
            return Err(format!(
                "model {}: output shape {:?} is not 5-D",
                info.name, out.shape
            )
            .into());
        }
        let mut s = [0u64; 5];
        for (i, (o, &d)) in s.iter_mut().zip(&out.shape).enumerate() {
            *o = if d < 0 { dims[i] } else { d as u64 };
        }
        return Ok(s);
    }
    for (n, l) in info.layers.iter().enumerate() {
        let at = |v: &[u32], i: usize, default: u32| v.get(i).copied().unwrap_or(default) as usize;
        let triple = |v: &[u32], default: u32| [0, 1, 2].map(|i| at(v, i, default));
        match l.op.as_str() {
            "conv3d" => {
                for a in 0..3 {
                    shape[2 + a] = output_dim(
                        a,
                        shape[2 + a],
                        at(&l.kernel, a, 1),
                        at(&l.padding, a, 0),
                        at(&l.dilation, a, 1),
                        at(&l.stride, a, 1),
                    )
                    .map_err(bad)?;
                }
                shape[1] = l.out_channels as usize;
            }
            "maxpool3d" => {
                shape = maxpool3d_shape(shape, triple(&l.kernel, 1), triple(&l.stride, 1))
                    .map_err(bad)?;
            }
            op => {
                return Err(
                    format!("layers[{n}].op: expected conv3d or maxpool3d, got {op:?}").into(),
                )
            }
        }
    }
    shape[1] = info.output_channels as usize;
    Ok(shape.map(|d| d as u64))
}

/// Bytes of the output a model gives for `input` in elements of `dtype_size` bytes.
pub fn output_bytes(info: &pb::ModelInfo, input: &[u64], dtype_size: u64) -> Result<u64, BoxError> {
    output_shape(info, input)?
        .iter()
        .try_fold(dtype_size, |a, &d| a.checked_mul(d))
        .ok_or_else(|| "the output is too large to address".into())
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

    /// A region for one call of `info`'s model on `input_shape`: the input's bytes, then
    /// the output (elements of `out_dtype_size` bytes) the model gives for that shape.
    pub async fn for_call(
        client: &mut Client,
        placement: &Placement,
        info: &pb::ModelInfo,
        input_shape: &[u64],
        input_bytes: u64,
        out_dtype_size: u64,
    ) -> Result<Self, BoxError> {
        let out = output_bytes(info, input_shape, out_dtype_size)?;
        Self::create(client, placement, input_bytes, out).await
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
