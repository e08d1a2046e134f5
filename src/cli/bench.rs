//! `voxconv bench`: a closed-loop load generator for a running server, and `voxconv
//! ghz-data`: a pre-serialized request for `ghz --binary-file`.
//!
//! Each of `--concurrency` workers sends one request, waits for the whole answer, and sends
//! the next, until `--duration` has passed or `--requests` have been sent. Latency is
//! recorded per request in an HDR histogram (microseconds, 3 significant digits); failures
//! are counted by gRPC status code.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use prost::Message;
use serde::Serialize;

use crate::kernel::{seeded, WorkloadFile};
use crate::proto::inference as kpb;
use crate::proto::voxconv::v1 as pb;
use crate::proto::voxconv::v1::inference_client::InferenceClient;

type BoxError = Box<dyn std::error::Error>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Rpc {
    /// voxconv.v1.Inference/Infer (unary; whole tensors in one message).
    Infer,
    /// voxconv.v1.Inference/InferStream (chunked both ways).
    Stream,
}

/// The input shape and model of a `bench` or `ghz-data` run.
#[derive(Debug, Args)]
pub struct TargetArgs {
    /// Model (default with --workload: the built-in `bench-<workload>`).
    #[arg(long)]
    pub model: Option<String>,
    /// Input shape from a named workload (see benches/workloads.toml).
    #[arg(long, conflicts_with = "shape", required_unless_present = "shape")]
    pub workload: Option<String>,
    /// Input shape N,C,D,H,W.
    #[arg(long)]
    pub shape: Option<String>,
    /// Workload file (default: the one built into the binary).
    #[arg(long)]
    pub workloads: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub connect: super::connect::ConnectArgs,
    #[command(flatten)]
    pub target: TargetArgs,
    /// Requests in flight (closed loop: each worker waits for its answer).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub concurrency: u32,
    /// Run for this long, e.g. 10s (default 10s unless --requests is given).
    #[arg(long, conflicts_with = "requests")]
    pub duration: Option<humantime::Duration>,
    /// Send this many requests in all.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub requests: Option<u64>,
    /// Which RPC to call.
    #[arg(long, value_enum, default_value_t = Rpc::Stream)]
    pub rpc: Rpc,
    /// Output dtype requested from the server.
    #[arg(long, value_enum, default_value_t = super::client::OutDType::Fp32)]
    pub output_dtype: super::client::OutDType,
    /// HTTP/2 connections the workers share (round robin).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub connections: u32,
    /// Deadline of each request.
    #[arg(long, default_value = "60s")]
    pub timeout: humantime::Duration,
    /// Input chunk size for --rpc stream.
    #[arg(long, default_value_t = 1 << 20)]
    pub chunk_bytes: usize,
    /// --rpc stream through shared memory in this directory (normally /dev/shm; the server
    /// must share it and run with --shared-memory-dir): each worker registers one region and
    /// reuses it; each call writes the input there and ends when the output is there.
    #[arg(long)]
    pub shared_memory_dir: Option<PathBuf>,
    /// Like --shared-memory-dir, but each worker's region is memory the server creates and
    /// maps (CreateSharedMemory): float32 outputs are computed straight into it.
    #[arg(long, conflicts_with = "shared_memory_dir")]
    pub server_shared_memory: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Percentiles in milliseconds.
#[derive(Debug, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub server: String,
    pub model: String,
    pub rpc: Rpc,
    pub input_shape: Vec<usize>,
    pub concurrency: u32,
    pub connections: u32,
    pub duration_s: f64,
    pub requests: u64,
    pub ok: u64,
    /// Failed requests by gRPC status code name.
    pub errors: BTreeMap<String, u64>,
    /// Code and message of one failure, when there were any.
    pub first_error: Option<String>,
    pub requests_per_s: f64,
    /// Input plus output bytes of successful requests, per second (10^6 bytes).
    pub mb_per_s: f64,
    pub input_bytes: u64,
    pub output_bytes: u64,
    /// Latency of successful requests.
    pub latency_ms: Latency,
}

fn parse_shape(s: &str) -> Result<[usize; 5], String> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    let mut out = [0usize; 5];
    if parts.len() != 5 {
        return Err(format!(
            "--shape: expected N,C,D,H,W (five integers), got {s:?}"
        ));
    }
    for (o, p) in out.iter_mut().zip(&parts) {
        *o = p
            .parse()
            .map_err(|_| format!("--shape: expected a positive integer, got {p:?} in {s:?}"))?;
        if *o == 0 {
            return Err(format!("--shape: dimensions must be positive, got {s:?}"));
        }
    }
    Ok(out)
}

/// The input shape and model a bench or ghz-data run uses.
fn target(t: &TargetArgs) -> Result<([usize; 5], String), BoxError> {
    let model = t.model.as_deref();
    match (t.workload.as_deref(), t.shape.as_deref()) {
        (Some(name), _) => {
            let file = match &t.workloads {
                Some(p) => WorkloadFile::load(p)?,
                None => WorkloadFile::builtin(),
            };
            let w = file.get(name)?;
            let model = model.map_or_else(|| format!("bench-{name}"), str::to_string);
            Ok((w.input, model))
        }
        (None, Some(s)) => {
            let model = model.ok_or("--model: required with --shape")?;
            Ok((parse_shape(s)?, model.to_string()))
        }
        (None, None) => Err("--workload or --shape: one is required".into()),
    }
}

/// Seeded float32 input bytes for a shape, checked against overflow.
fn input_bytes(shape: [usize; 5]) -> Result<Bytes, BoxError> {
    let n = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|&n| n <= (1 << 30))
        .ok_or_else(|| format!("input shape {shape:?}: more than 2^30 voxels"))?;
    let mut raw = Vec::with_capacity(n * 4);
    crate::tensor::dtype::encode(crate::tensor::dtype::DType::F32, &seeded(n, 11), &mut raw);
    Ok(Bytes::from(raw))
}

fn out_dtype(o: super::client::OutDType) -> pb::DType {
    match o {
        super::client::OutDType::Fp32 => pb::DType::Fp32,
        super::client::OutDType::Fp16 => pb::DType::Fp16,
    }
}

/// What one worker saw.
struct WorkerStats {
    hist: Histogram<u64>,
    errors: BTreeMap<String, u64>,
    first_error: Option<String>,
    in_bytes: u64,
    out_bytes: u64,
}

struct Job {
    model: String,
    shape: [usize; 5],
    raw: Bytes,
    rpc: Rpc,
    out_dtype: pb::DType,
    timeout: Duration,
    chunk: usize,
}

impl Job {
    /// One request; output bytes on success. With `region`, InferStream writes the output
    /// there.
    async fn call(
        &self,
        client: &mut InferenceClient<super::connect::Authed>,
        region: Option<&crate::client::shm::ClientRegion>,
    ) -> Result<u64, tonic::Status> {
        match self.rpc {
            Rpc::Infer => {
                let mut req = tonic::Request::new(pb::InferRequest {
                    model: self.model.clone(),
                    input: Some(pb::Tensor {
                        dtype: pb::DType::Fp32 as i32,
                        shape: self.shape.iter().map(|&d| d as u64).collect(),
                        data: self.raw.clone(),
                    }),
                    output_dtype: self.out_dtype as i32,
                    sliding_window: None,
                });
                req.set_timeout(self.timeout);
                let r = client.infer(req).await?.into_inner();
                Ok(r.output.map_or(0, |t| t.data.len() as u64))
            }
            Rpc::Stream => {
                let header = pb::InferStreamRequest {
                    msg: Some(pb::infer_stream_request::Msg::Header(pb::StreamHeader {
                        model: self.model.clone(),
                        input_dtype: pb::DType::Fp32 as i32,
                        input_shape: self.shape.iter().map(|&d| d as u64).collect(),
                        output_dtype: self.out_dtype as i32,
                        max_chunk_bytes: 0,
                        input_shared_memory: region.map(|r| r.at(0)),
                        output_shared_memory: region.map(|r| {
                            r.at(crate::client::shm::ClientRegion::output_at(
                                self.raw.len() as u64
                            ))
                        }),
                        sliding_window: None,
                    })),
                };
                // With shared memory, "sending" the input is writing it into the region.
                let raw = match region {
                    Some(r) => {
                        r.write(0, &self.raw)
                            .map_err(|e| tonic::Status::internal(format!("shared memory: {e}")))?;
                        Bytes::new()
                    }
                    None => self.raw.clone(),
                };
                let chunk = self.chunk;
                let chunks = crate::client::stream::input_chunks(raw, chunk);
                let mut req =
                    tonic::Request::new(tokio_stream::iter(std::iter::once(header).chain(chunks)));
                req.set_timeout(self.timeout);
                let mut inbound = client.infer_stream(req).await?.into_inner();
                let mut out = 0u64;
                let mut summary = false;
                while let Some(m) = inbound.message().await? {
                    match m.msg {
                        Some(pb::infer_stream_response::Msg::Chunk(c)) => {
                            out += c.data.len() as u64
                        }
                        Some(pb::infer_stream_response::Msg::Summary(s)) => {
                            if region.is_some() {
                                out = s.output_bytes;
                            }
                            summary = true
                        }
                        _ => {}
                    }
                }
                if !summary {
                    return Err(tonic::Status::data_loss("stream ended without a summary"));
                }
                Ok(out)
            }
        }
    }
}

pub fn bench(a: BenchArgs) -> Result<(), BoxError> {
    let (shape, model) = target(&a.target)?;
    let raw = input_bytes(shape)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(run_bench(&a, shape, model, raw))?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

async fn run_bench(
    a: &BenchArgs,
    shape: [usize; 5],
    model: String,
    raw: Bytes,
) -> Result<Report, BoxError> {
    let mut channels = Vec::new();
    for _ in 0..a.connections {
        channels.push(a.connect.channel().await?);
    }
    let job = Arc::new(Job {
        model: model.clone(),
        shape,
        raw,
        rpc: a.rpc,
        out_dtype: out_dtype(a.output_dtype),
        timeout: *a.timeout,
        chunk: crate::client::stream::chunk_size(a.chunk_bytes),
    });
    let duration = match (a.duration, a.requests) {
        (Some(d), _) => Some(*d),
        (None, Some(_)) => None,
        (None, None) => Some(Duration::from_secs(10)),
    };
    let limit = a.requests.unwrap_or(u64::MAX);
    let issued = Arc::new(AtomicU64::new(0));
    let progress = match duration {
        Some(d) => {
            let pb = ProgressBar::with_draw_target(
                Some(d.as_millis() as u64),
                ProgressDrawTarget::stderr(),
            );
            pb.set_style(
                ProgressStyle::with_template("[{bar:32}] {elapsed}/{duration} {msg}")
                    .expect("a valid template")
                    .progress_chars("=> "),
            );
            pb
        }
        None => {
            let pb = ProgressBar::with_draw_target(Some(limit), ProgressDrawTarget::stderr());
            pb.set_style(
                ProgressStyle::with_template("[{bar:32}] {pos}/{len} requests {msg}")
                    .expect("a valid template")
                    .progress_chars("=> "),
            );
            pb
        }
    };
    let start = Instant::now();
    let stop_at = duration.map(|d| start + d);
    let mut tasks = Vec::new();
    let mut regions = Vec::new();
    for w in 0..a.concurrency {
        let mut client = a
            .connect
            .inference(channels[w as usize % channels.len()].clone())?;
        let placement = crate::client::shm::Placement::from_flags(
            a.shared_memory_dir.as_deref(),
            a.server_shared_memory,
        );
        regions.push(match &placement {
            None => None,
            Some(place) => {
                if a.rpc != Rpc::Stream {
                    return Err(
                        "--shared-memory-dir / --server-shared-memory: needs --rpc stream".into(),
                    );
                }
                let info = client
                    .get_model(pb::GetModelRequest {
                        name: model.clone(),
                        scan_shape: Vec::new(),
                    })
                    .await
                    .map_err(|s| format!("GetModel: {}: {}", s.code(), s.message()))?
                    .into_inner();
                let shape: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
                let size = match a.output_dtype {
                    super::client::OutDType::Fp32 => 4,
                    super::client::OutDType::Fp16 => 2,
                };
                Some(Arc::new(
                    crate::client::shm::ClientRegion::for_call(
                        &mut client,
                        place,
                        &info,
                        &shape,
                        job.raw.len() as u64,
                        size,
                    )
                    .await?,
                ))
            }
        });
        let region = regions[w as usize].clone();
        let job = job.clone();
        let issued = issued.clone();
        let progress = progress.clone();
        tasks.push(tokio::spawn(async move {
            let mut st = WorkerStats {
                hist: Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)
                    .expect("valid histogram bounds"),
                errors: BTreeMap::new(),
                first_error: None,
                in_bytes: 0,
                out_bytes: 0,
            };
            loop {
                if stop_at.is_some_and(|t| Instant::now() >= t) {
                    break;
                }
                if issued.fetch_add(1, Ordering::Relaxed) >= limit {
                    break;
                }
                let t0 = Instant::now();
                match job.call(&mut client, region.as_deref()).await {
                    Ok(out) => {
                        let us = t0.elapsed().as_micros().max(1) as u64;
                        st.hist.saturating_record(us);
                        st.in_bytes += job.raw.len() as u64;
                        st.out_bytes += out;
                    }
                    Err(s) => {
                        let code = crate::wire::code_name(s.code()).to_string();
                        st.first_error
                            .get_or_insert_with(|| format!("{code}: {}", s.message()));
                        *st.errors.entry(code).or_default() += 1;
                    }
                }
                match stop_at {
                    Some(_) => progress.set_position(start.elapsed().as_millis() as u64),
                    None => progress.inc(1),
                }
            }
            st
        }));
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?;
    let mut errors = BTreeMap::new();
    let mut first_error = None;
    let (mut in_bytes, mut out_bytes) = (0u64, 0u64);
    for t in tasks {
        let st = t.await?;
        hist.add(&st.hist)?;
        for (k, v) in st.errors {
            *errors.entry(k).or_default() += v;
        }
        first_error = first_error.or(st.first_error);
        in_bytes += st.in_bytes;
        out_bytes += st.out_bytes;
    }
    progress.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    for (w, r) in regions.into_iter().enumerate() {
        if let Some(r) = r.and_then(|r| Arc::try_unwrap(r).ok()) {
            let mut client = a.connect.inference(channels[w % channels.len()].clone())?;
            r.release(&mut client).await?;
        }
    }
    let ok = hist.len();
    let failed: u64 = errors.values().sum();
    let ms = |us: u64| us as f64 / 1e3;
    Ok(Report {
        server: a.connect.server.clone(),
        model,
        rpc: a.rpc,
        input_shape: shape.to_vec(),
        concurrency: a.concurrency,
        connections: a.connections,
        duration_s: secs,
        requests: ok + failed,
        ok,
        errors,
        first_error,
        requests_per_s: ok as f64 / secs,
        mb_per_s: (in_bytes + out_bytes) as f64 / 1e6 / secs,
        input_bytes: in_bytes,
        output_bytes: out_bytes,
        latency_ms: Latency {
            p50: ms(hist.value_at_quantile(0.50)),
            p90: ms(hist.value_at_quantile(0.90)),
            p99: ms(hist.value_at_quantile(0.99)),
            max: ms(hist.max()),
            mean: hist.mean() / 1e3,
        },
    })
}

fn print_report(r: &Report) {
    println!(
        "{} {:?} on {}: input {:?}, concurrency {}, connections {}, {:.1} s",
        r.model, r.rpc, r.server, r.input_shape, r.concurrency, r.connections, r.duration_s
    );
    println!(
        "requests: {} ok, {} failed; {:.1} req/s; {:.1} MB/s (in + out)",
        r.ok,
        r.requests - r.ok,
        r.requests_per_s,
        r.mb_per_s
    );
    let l = &r.latency_ms;
    println!(
        "latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}  mean {:.2}",
        l.p50, l.p90, l.p99, l.max, l.mean
    );
    if r.errors.is_empty() {
        println!("errors: none");
    } else {
        let list: Vec<String> = r.errors.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!("errors: {}", list.join(", "));
        if let Some(e) = &r.first_error {
            println!("first error: {e}");
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GhzRpc {
    /// voxconv.v1.Inference/Infer
    Infer,
    /// inference.GRPCInferenceService/ModelInfer (KServe v2)
    Kserve,
}

#[derive(Debug, Args)]
pub struct GhzDataArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Which request message to write.
    #[arg(long, value_enum, default_value_t = GhzRpc::Infer)]
    pub rpc: GhzRpc,
    /// Output file (the serialized request message, for `ghz --binary-file`).
    #[arg(long)]
    pub output: PathBuf,
}

/// The serialized request message `ghz --binary-file` sends.
pub fn ghz_request(rpc: GhzRpc, model: &str, shape: [usize; 5], raw: Bytes) -> Vec<u8> {
    match rpc {
        GhzRpc::Infer => pb::InferRequest {
            model: model.to_string(),
            input: Some(pb::Tensor {
                dtype: pb::DType::Fp32 as i32,
                shape: shape.iter().map(|&d| d as u64).collect(),
                data: raw,
            }),
            output_dtype: pb::DType::Fp32 as i32,
            sliding_window: None,
        }
        .encode_to_vec(),
        GhzRpc::Kserve => kpb::ModelInferRequest {
            model_name: model.to_string(),
            inputs: vec![kpb::model_infer_request::InferInputTensor {
                name: crate::wire::KSERVE_INPUT_NAME.to_string(),
                datatype: "FP32".into(),
                shape: shape.iter().map(|&d| d as i64).collect(),
                ..Default::default()
            }],
            raw_input_contents: vec![raw],
            ..Default::default()
        }
        .encode_to_vec(),
    }
}

pub fn ghz_data(a: GhzDataArgs) -> Result<(), BoxError> {
    let (shape, model) = target(&a.target)?;
    let raw = input_bytes(shape)?;
    let msg = ghz_request(a.rpc, &model, shape, raw);
    std::fs::write(&a.output, &msg).map_err(|e| format!("{}: {e}", a.output.display()))?;
    eprintln!(
        "ghz-data: {:?} request for model {model}, input {shape:?} float32: {} bytes -> {}",
        a.rpc,
        msg.len(),
        a.output.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names_are_canonical() {
        use crate::wire::code_name;
        assert_eq!(code_name(tonic::Code::InvalidArgument), "INVALID_ARGUMENT");
        assert_eq!(code_name(tonic::Code::Ok), "OK");
        assert_eq!(
            code_name(tonic::Code::ResourceExhausted),
            "RESOURCE_EXHAUSTED"
        );
    }

    #[test]
    fn shapes_parse_with_field_named_errors() {
        assert_eq!(parse_shape("1, 2,3,4,5").unwrap(), [1, 2, 3, 4, 5]);
        assert!(parse_shape("1,2,3,4").unwrap_err().contains("--shape"));
        assert!(parse_shape("1,2,0,4,5").unwrap_err().contains("positive"));
    }

    #[test]
    fn ghz_requests_decode_as_the_rpc_messages() {
        let raw = input_bytes([2, 3, 4, 4, 4]).unwrap();
        let b = ghz_request(GhzRpc::Infer, "bench-tiny", [2, 3, 4, 4, 4], raw.clone());
        let r = pb::InferRequest::decode(&b[..]).unwrap();
        assert_eq!(r.model, "bench-tiny");
        assert_eq!(r.input.unwrap().data, raw);
        let b = ghz_request(GhzRpc::Kserve, "bench-tiny", [2, 3, 4, 4, 4], raw.clone());
        let r = kpb::ModelInferRequest::decode(&b[..]).unwrap();
        assert_eq!(r.inputs[0].shape, vec![2, 3, 4, 4, 4]);
        assert_eq!(r.raw_input_contents[0], raw);
    }
}
