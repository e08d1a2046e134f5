//! Client subcommands: `voxconv infer` (streaming, NIfTI or NumPy) and `voxconv health`.

use std::path::PathBuf;
use std::time::Instant;

use bytes::Bytes;
use clap::{Args, ValueEnum};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use super::connect::ConnectArgs;
use crate::proto::voxconv::v1 as pb;
use crate::tensor::dtype::{self, DType};
use crate::tensor::nifti::{is_nifti, output_header, read_scan, write_volume, AxisMap};
use crate::tensor::{read_npy_raw, write_npy, write_npy_typed};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum OutDType {
    Fp32,
    Fp16,
}

#[derive(Debug, Args)]
pub struct InferArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Model name (see ListModels).
    #[arg(long)]
    pub model: String,
    /// Input volume: .nii / .nii.gz (3-D, or 4-D with channels last), or .npy
    /// ([N, C, D, H, W], [C, D, H, W] or [D, H, W]) of float32, int16, uint16 or uint8. Sent
    /// in its own dtype.
    #[arg(long)]
    pub input: PathBuf,
    /// Output: .nii / .nii.gz (the input's header, affine adjusted for the model; channels on
    /// the 4th dimension) or .npy ([N, C, D, H, W]). Written as float32.
    #[arg(long)]
    pub output: PathBuf,
    /// Dtype the server sends back (fp16 halves the bytes on the wire).
    #[arg(long, value_enum, default_value_t = OutDType::Fp32)]
    pub output_dtype: OutDType,
    /// Input chunk size in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub chunk_bytes: usize,
    /// Deadline for the whole call, e.g. 30s or 2m (sent as grpc-timeout).
    #[arg(long)]
    pub timeout: Option<humantime::Duration>,
    /// Receive the output through shared memory in this directory (normally /dev/shm)
    /// instead of over the socket: for a server on this host started with
    /// --shared-memory-dir on the same directory. The region is removed afterwards.
    #[arg(long)]
    pub shared_memory_dir: Option<PathBuf>,
    /// Like --shared-memory-dir, but in memory the server creates and maps
    /// (CreateSharedMemory): the output is computed straight into it. Same host, same PID
    /// namespace, same user as the server.
    #[arg(long, conflicts_with = "shared_memory_dir")]
    pub server_shared_memory: bool,
    #[command(flatten)]
    pub window: WindowArgs,
}

/// Server-side sliding-window inference over the whole scan (MONAI semantics).
#[derive(Debug, Args)]
pub struct WindowArgs {
    /// Run the model over the whole scan in sliding windows on the server; the options
    /// below default to the model's (GetModel), then to MONAI's.
    #[arg(long)]
    pub sliding_window: bool,
    /// Window size D,H,W (default: the model's fixed input size).
    #[arg(long, requires = "sliding_window", value_parser = parse_roi)]
    pub roi: Option<[u32; 3]>,
    /// Overlap of neighbouring windows in [0, 1): one value or D,H,W (default 0.25).
    #[arg(long, requires = "sliding_window", value_parser = parse_floats)]
    pub overlap: Option<Floats>,
    /// Window weighting (default gaussian).
    #[arg(long, requires = "sliding_window", value_enum)]
    pub blend: Option<BlendArg>,
    /// Gaussian sigma as a fraction of the roi: one value or D,H,W (default 0.125).
    #[arg(long, requires = "sliding_window", value_parser = parse_floats)]
    pub sigma_scale: Option<Floats>,
    /// Windows per network call (default 1).
    #[arg(long, requires = "sliding_window")]
    pub sw_batch: Option<u32>,
    /// Test-time mirroring over these spatial axes, e.g. 0,1,2 (0 = D, 1 = H, 2 = W), or
    /// "none".
    #[arg(long, requires = "sliding_window", value_parser = parse_axes)]
    pub mirror: Option<Axes>,
    /// Return the label map (argmax over channels): uint8 [N, 1, D, H, W] (.npy), or a NIfTI
    /// label map (uint8/uint16, intent "label").
    #[arg(long, requires = "sliding_window", conflicts_with = "probabilities")]
    pub labels: bool,
    /// Return softmax probabilities instead of the blended logits.
    #[arg(long, requires = "sliding_window")]
    pub probabilities: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum BlendArg {
    Gaussian,
    Constant,
}

/// One value or three (D,H,W).
#[derive(Clone, Debug)]
pub struct Floats(pub Vec<f64>);

/// Spatial axes (0 = D, 1 = H, 2 = W); empty for none.
#[derive(Clone, Debug)]
pub struct Axes(pub Vec<u32>);

fn parse_floats(s: &str) -> Result<Floats, String> {
    let v: Vec<f64> = s
        .split(',')
        .map(|p| p.trim().parse::<f64>().map_err(|e| format!("{p:?}: {e}")))
        .collect::<Result<_, _>>()?;
    match v.len() {
        1 | 3 => Ok(Floats(v)),
        n => Err(format!("expected 1 value or 3 (D,H,W), got {n}")),
    }
}

fn parse_roi(s: &str) -> Result<[u32; 3], String> {
    let v: Vec<u32> = s
        .split(',')
        .map(|p| p.trim().parse::<u32>().map_err(|e| format!("{p:?}: {e}")))
        .collect::<Result<_, _>>()?;
    v.try_into()
        .map_err(|v: Vec<u32>| format!("expected D,H,W, got {} values", v.len()))
}

fn parse_axes(s: &str) -> Result<Axes, String> {
    if s.trim().eq_ignore_ascii_case("none") || s.trim().is_empty() {
        return Ok(Axes(Vec::new()));
    }
    s.split(',')
        .map(|p| p.trim().parse::<u32>().map_err(|e| format!("{p:?}: {e}")))
        .collect::<Result<_, _>>()
        .map(Axes)
}

impl WindowArgs {
    /// The request's `SlidingWindow`, if asked for.
    pub(crate) fn to_pb(&self) -> Option<pb::SlidingWindow> {
        if !self.sliding_window {
            return None;
        }
        let output = if self.labels {
            pb::WindowOutput::Labels
        } else if self.probabilities {
            pb::WindowOutput::Probabilities
        } else {
            pb::WindowOutput::Default
        };
        Some(pb::SlidingWindow {
            roi: self.roi.map(|r| r.to_vec()).unwrap_or_default(),
            overlap: self.overlap.clone().map(|f| f.0).unwrap_or_default(),
            blend: match self.blend {
                None => pb::Blend::Default,
                Some(BlendArg::Gaussian) => pb::Blend::Gaussian,
                Some(BlendArg::Constant) => pb::Blend::Constant,
            } as i32,
            sigma_scale: self.sigma_scale.clone().map(|f| f.0).unwrap_or_default(),
            batch: self.sw_batch.unwrap_or(0),
            mirror: self.mirror.clone().map(|a| pb::MirrorAxes { axes: a.0 }),
            output: output as i32,
        })
    }
}

#[derive(Debug, Args)]
pub struct HealthArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Service to ask about ("" = the whole server).
    #[arg(long, default_value = "")]
    pub service: String,
}

type BoxError = Box<dyn std::error::Error>;

/// A gRPC status as one line: `CODE: message`.
pub fn status_error(s: tonic::Status) -> BoxError {
    // tonic's channel times the call out locally from the same grpc-timeout and calls that
    // CANCELLED; it is the deadline passing.
    let local_timeout = std::error::Error::source(&s)
        .and_then(|e| e.downcast_ref::<tonic::transport::Error>())
        .and_then(std::error::Error::source)
        .is_some_and(|e| e.is::<tonic::TimeoutExpired>());
    if s.code() == tonic::Code::Cancelled && local_timeout {
        return "DEADLINE_EXCEEDED: --timeout passed before the server answered".into();
    }
    format!("{}: {}", crate::wire::code_name(s.code()), s.message()).into()
}

pub fn infer(a: InferArgs) -> Result<(), BoxError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(infer_async(a))
}

/// The volume to send, in its own dtype, and its NIfTI header when it came from one.
struct Input {
    shape: Vec<usize>,
    dtype: DType,
    bytes: Vec<u8>,
    header: Option<nifti::NiftiHeader>,
}

fn load_input(path: &std::path::Path) -> Result<Input, BoxError> {
    if is_nifti(path) {
        let scan = read_scan(path)?;
        if scan.converted {
            eprintln!(
                "note: {}: stored dtype or intensity scaling (scl_slope/scl_inter) has no wire \
                 equivalent; sending float32",
                path.display()
            );
        }
        return Ok(Input {
            shape: scan.shape.to_vec(),
            dtype: scan.dtype,
            bytes: scan.bytes,
            header: Some(scan.header),
        });
    }
    let t = read_npy_raw(path)?;
    let shape = match t.shape.len() {
        3 => [&[1, 1][..], &t.shape].concat(),
        4 => [&[1][..], &t.shape].concat(),
        5 => t.shape.clone(),
        _ => {
            return Err(format!(
                "{}: expected [N, C, D, H, W], [C, D, H, W] or [D, H, W], got shape {:?}",
                path.display(),
                t.shape
            )
            .into())
        }
    };
    Ok(Input {
        shape,
        dtype: t.dtype,
        bytes: t.bytes,
        header: None,
    })
}

/// Per-axis maps from output voxels to input voxels for `(x, y, z)` = `(W, H, D)`, from the
/// model's layers as GetModel describes them.
fn axis_maps(info: &pb::ModelInfo) -> [AxisMap; 3] {
    let mut maps = [AxisMap::IDENTITY; 3];
    for l in &info.layers {
        let at = |v: &[u32], i: usize, default: u32| v.get(i).copied().unwrap_or(default);
        for (xyz, map) in maps.iter_mut().enumerate() {
            let dhw = 2 - xyz;
            let k = at(&l.kernel, dhw, 1);
            *map = map.then(
                k,
                at(&l.stride, dhw, 1),
                at(&l.padding, dhw, 0),
                at(&l.dilation, dhw, 1),
            );
        }
    }
    maps
}

fn bar(multi: &MultiProgress, prefix: &'static str, len: u64) -> ProgressBar {
    let style = ProgressStyle::with_template(
        "{prefix:>8} [{bar:32}] {bytes:>10}/{total_bytes:<10} {binary_bytes_per_sec:>12} {msg}",
    )
    .expect("a valid template")
    .progress_chars("=> ");
    let pb = multi.add(ProgressBar::new(len));
    pb.set_style(style);
    pb.set_prefix(prefix);
    pb
}

async fn infer_async(a: InferArgs) -> Result<(), BoxError> {
    let t0 = Instant::now();
    let out_nifti = is_nifti(&a.output);
    let out_npy = a
        .output
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("npy"));
    if !out_nifti && !out_npy {
        return Err(format!(
            "--output: expected a .nii, .nii.gz or .npy path, got {}",
            a.output.display()
        )
        .into());
    }
    let input = load_input(&a.input)?;
    let channel = a.connect.channel().await?;
    let mut client = a.connect.inference(channel)?;
    let window = a.window.to_pb();
    if window.is_some() && (a.shared_memory_dir.is_some() || a.server_shared_memory) {
        return Err(
            "--sliding-window: shared-memory output is not supported with sliding \
                    windows (the output streams over the socket)"
                .into(),
        );
    }
    let labels = a.window.labels;
    // Labels come as the server's UINT8/UINT16 (see the output header).
    let mut out_dtype = match a.output_dtype {
        OutDType::Fp32 => DType::F32,
        OutDType::Fp16 => DType::F16,
    };
    // NIfTI output needs the model's geometry to place the output voxels; a shared-memory
    // region is sized from the output shape it gives.
    let placement = crate::client::shm::Placement::from_flags(
        a.shared_memory_dir.as_deref(),
        a.server_shared_memory,
    );
    let info = if out_nifti || placement.is_some() {
        Some(
            client
                .get_model(pb::GetModelRequest {
                    name: a.model.clone(),
                    scan_shape: Vec::new(),
                })
                .await
                .map_err(status_error)?
                .into_inner(),
        )
    } else {
        None
    };
    let maps = info.as_ref().filter(|_| out_nifti).map(axis_maps);
    let input_len = input.bytes.len();
    let output_at = crate::client::shm::ClientRegion::output_at(input_len as u64);
    let region = match (&placement, &info) {
        (Some(place), Some(info)) => {
            let shape: Vec<u64> = input.shape.iter().map(|&d| d as u64).collect();
            let region = crate::client::shm::ClientRegion::for_call(
                &mut client,
                place,
                info,
                &shape,
                input.bytes.len() as u64,
                out_dtype.size() as u64,
            )
            .await?;
            region.write(0, &input.bytes)?;
            Some(region)
        }
        _ => None,
    };
    let header = pb::InferStreamRequest {
        msg: Some(pb::infer_stream_request::Msg::Header(pb::StreamHeader {
            model: a.model.clone(),
            input_dtype: crate::wire::dtype_to_pb(input.dtype) as i32,
            input_shape: input.shape.iter().map(|&d| d as u64).collect(),
            output_dtype: if labels {
                pb::DType::DtypeUnspecified as i32
            } else {
                crate::wire::dtype_to_pb(out_dtype) as i32
            },
            max_chunk_bytes: 0,
            input_shared_memory: region.as_ref().map(|r| r.at(0)),
            output_shared_memory: region.as_ref().map(|r| r.at(output_at)),
            sliding_window: window.clone(),
        })),
    };
    // Through shared memory the input is already in the region: no chunks.
    let raw = match region {
        Some(_) => Bytes::new(),
        None => Bytes::from(input.bytes),
    };
    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
    let up = bar(&multi, "sent", raw.len() as u64);
    let down = bar(&multi, "received", 0);
    let windows = window.as_ref().map(|_| {
        let pb = multi.add(ProgressBar::new(0));
        pb.set_style(
            ProgressStyle::with_template(
                "{prefix:>8} [{bar:32}] {pos:>10}/{len:<10} {per_sec:>12} eta {eta}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        pb.set_prefix("windows");
        pb
    });
    let chunk = crate::client::stream::chunk_size(a.chunk_bytes);
    let up_tick = up.clone();
    let chunks = crate::client::stream::input_chunks(raw.clone(), chunk).inspect(move |m| {
        if let Some(pb::infer_stream_request::Msg::Chunk(c)) = &m.msg {
            up_tick.inc(c.data.len() as u64);
        }
    });
    let mut request =
        tonic::Request::new(tokio_stream::iter(std::iter::once(header).chain(chunks)));
    if let Some(t) = a.timeout {
        request.set_timeout(*t);
    }
    let t_call = Instant::now();
    // The region is unregistered whatever the call's outcome (a server-created one holds
    // server memory until then).
    let outcome: Result<_, BoxError> = async {
        let mut inbound = client
            .infer_stream(request)
            .await
            .map_err(status_error)?
            .into_inner();
        let mut shape = Vec::new();
        let mut y: Vec<f32> = Vec::new();
        let mut received = 0usize;
        let mut summary = None;
        while let Some(msg) = inbound.message().await.map_err(status_error)? {
            match msg.msg {
                Some(pb::infer_stream_response::Msg::Header(h)) => {
                    shape = h.shape.iter().map(|&d| d as usize).collect();
                    let elements = shape
                        .iter()
                        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                        .ok_or("server announced an output too large to address")?;
                    y = crate::kernel::buffer::zeroed_f32(elements);
                    down.set_length(h.total_bytes);
                    up.finish();
                    out_dtype = crate::wire::dtype_from_pb("header.dtype", h.dtype, false)
                        .map_err(|e| format!("server sent an output header with {e}"))?;
                }
                Some(pb::infer_stream_response::Msg::Progress(p)) => {
                    if let Some(w) = &windows {
                        w.set_length(p.windows_total);
                        w.set_position(p.windows_done);
                    }
                }
                Some(pb::infer_stream_response::Msg::Chunk(c)) => {
                    let size = out_dtype.size();
                    let at = c.offset as usize / size;
                    let n = c.data.len() / size;
                    let dst = at
                        .checked_add(n)
                        .and_then(|end| y.get_mut(at..end))
                        .ok_or("server sent a chunk outside the announced output")?;
                    dtype::decode(out_dtype, &c.data, dst);
                    received += c.data.len();
                    down.inc(c.data.len() as u64);
                }
                Some(pb::infer_stream_response::Msg::Summary(s)) => summary = Some(s),
                None => {}
            }
        }
        let s = summary.ok_or("stream ended without a summary")?;
        if let Some(r) = &region {
            // The output is in the region: copy it out (as it would come off the socket).
            let want = y.len() * out_dtype.size();
            if output_at.saturating_add(want as u64) > r.bytes() {
                return Err(format!(
                    "server announced {want} output bytes, the region holds {}",
                    r.bytes()
                )
                .into());
            }
            if out_dtype == DType::F32 && cfg!(target_endian = "little") {
                r.read(output_at, bytemuck::cast_slice_mut(&mut y))?;
            } else {
                let mut raw = vec![0u8; want];
                r.read(output_at, &mut raw)?;
                dtype::decode(out_dtype, &raw, &mut y);
            }
            received = want;
            down.inc(want as u64);
        }
        Ok((shape, y, received, s))
    }
    .await;
    if let Some(r) = region {
        let released = r.release(&mut client).await;
        if outcome.is_ok() {
            released?;
        }
    }
    let (shape, y, received, s) = outcome?;
    down.finish();
    if let Some(w) = &windows {
        w.finish();
    }
    multi.clear().ok();
    let stream_ms = t_call.elapsed().as_secs_f64() * 1e3;
    if received as u64 != s.output_bytes {
        return Err(format!("received {received} of {} output bytes", s.output_bytes).into());
    }
    if out_nifti {
        let shape5: [usize; 5] = shape
            .as_slice()
            .try_into()
            .map_err(|_| format!("server sent a rank-{} output", shape.len()))?;
        let reference = input.header.unwrap_or_default();
        // Sliding windows keep the scan's grid: the output overlays the input voxel for voxel.
        let maps = match window {
            Some(_) => [AxisMap::IDENTITY; 3],
            None => maps.expect("fetched for NIfTI output"),
        };
        let mut h = output_header(&reference, maps, &format!("voxconv {}", a.model));
        match (labels, out_dtype) {
            (true, DType::U8) => {
                label_header(&mut h, &y);
                let v: Vec<u8> = y.iter().map(|&v| v as u8).collect();
                write_volume(&a.output, &h, shape5, &v)?;
            }
            (true, _) => {
                label_header(&mut h, &y);
                let v: Vec<u16> = y.iter().map(|&v| v as u16).collect();
                write_volume(&a.output, &h, shape5, &v)?;
            }
            _ => write_volume(&a.output, &h, shape5, &y)?,
        }
    } else if labels && out_dtype == DType::U8 {
        write_npy_typed(&a.output, &shape, y.iter().map(|&v| v as u8).collect())?;
    } else if labels {
        write_npy_typed(&a.output, &shape, y.iter().map(|&v| v as u16).collect())?;
    } else {
        write_npy(&a.output, &shape, y)?;
    }
    eprintln!(
        "{}: sent {} {:?} ({}), received {} {:?} ({}); call {:.1} ms, total with files {:.1} ms \
         (server: receive {:.1} ms, queue {:.1} ms, compute {:.1} ms)",
        a.model,
        input.dtype.name(),
        input.shape,
        bytesize::ByteSize(input_len as u64),
        out_dtype.name(),
        shape,
        bytesize::ByteSize(s.output_bytes),
        stream_ms,
        t0.elapsed().as_secs_f64() * 1e3,
        s.receive_ms,
        s.queue_ms,
        s.compute_ms
    );
    Ok(())
}

/// Marks a NIfTI header as a label map (intent "label", display range over the labels).
fn label_header(h: &mut nifti::NiftiHeader, labels: &[f32]) {
    h.intent_code = 1002; // NIFTI_INTENT_LABEL
    h.cal_min = 0.0;
    h.cal_max = labels.iter().copied().fold(0.0, f32::max);
}

/// Exit 0 when SERVING, 1 otherwise (usable as a container health check).
pub fn health(a: HealthArgs) -> Result<(), BoxError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let channel = a.connect.channel().await?;
        let mut client = HealthClient::with_interceptor(channel, a.connect.interceptor()?);
        let r = client
            .check(HealthCheckRequest {
                service: a.service.clone(),
            })
            .await
            .map_err(status_error)?
            .into_inner();
        let status = ServingStatus::try_from(r.status).unwrap_or(ServingStatus::Unknown);
        println!("{}", status.as_str_name());
        if status == ServingStatus::Serving {
            Ok(())
        } else {
            Err(format!("service {:?} is {}", a.service, status.as_str_name()).into())
        }
    })
}
