//! Client subcommands: `voxconv infer` (streaming) and `voxconv health`.

use std::path::PathBuf;
use std::time::Instant;

use bytes::Bytes;
use clap::{Args, ValueEnum};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::proto::voxconv::v1 as pb;
use crate::proto::voxconv::v1::inference_client::InferenceClient;
use crate::tensor::dtype::{self, DType};
use crate::tensor::{read_npy_rank, write_npy};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum OutDType {
    Fp32,
    Fp16,
}

#[derive(Debug, Args)]
pub struct InferArgs {
    /// Server URL, e.g. http://127.0.0.1:50051
    #[arg(long, env = "VOXCONV_SERVER", default_value = "http://127.0.0.1:50051")]
    pub server: String,
    /// Model name (see ListModels).
    #[arg(long)]
    pub model: String,
    /// Input volume, float32 .npy [N, C, D, H, W].
    #[arg(long)]
    pub input: PathBuf,
    /// Output .npy (float32).
    #[arg(long)]
    pub output: PathBuf,
    /// Dtype the server sends back.
    #[arg(long, value_enum, default_value_t = OutDType::Fp32)]
    pub output_dtype: OutDType,
    /// Input chunk size in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub chunk_bytes: usize,
}

#[derive(Debug, Args)]
pub struct HealthArgs {
    /// Server URL.
    #[arg(long, env = "VOXCONV_SERVER", default_value = "http://127.0.0.1:50051")]
    pub server: String,
    /// Service to ask about ("" = the whole server).
    #[arg(long, default_value = "")]
    pub service: String,
}

type BoxError = Box<dyn std::error::Error>;

pub fn infer(a: InferArgs) -> Result<(), BoxError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(infer_async(a))
}

async fn infer_async(a: InferArgs) -> Result<(), BoxError> {
    let t0 = Instant::now();
    let x = read_npy_rank(&a.input, 5)?;
    let channel = tonic::transport::Endpoint::from_shared(a.server.clone())?
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(8 << 20))
        .connect()
        .await
        .map_err(|e| format!("{}: {e}", a.server))?;
    let mut client = InferenceClient::new(channel).max_decoding_message_size(64 << 20);
    let out_dtype = match a.output_dtype {
        OutDType::Fp32 => DType::F32,
        OutDType::Fp16 => DType::F16,
    };
    let header = pb::InferStreamRequest {
        msg: Some(pb::infer_stream_request::Msg::Header(pb::StreamHeader {
            model: a.model.clone(),
            input_dtype: pb::DType::Fp32 as i32,
            input_shape: x.shape.iter().map(|&d| d as u64).collect(),
            output_dtype: crate::service::to_pb_dtype(out_dtype) as i32,
            max_chunk_bytes: 0,
        })),
    };
    let mut raw = Vec::with_capacity(x.data.len() * 4);
    dtype::encode(DType::F32, &x.data, &mut raw);
    drop(x);
    let raw = Bytes::from(raw);
    let chunk = a.chunk_bytes.clamp(4096, 3 << 20);
    let chunks: Vec<pb::InferStreamRequest> = (0..raw.len())
        .step_by(chunk)
        .map(|off| pb::InferStreamRequest {
            msg: Some(pb::infer_stream_request::Msg::Chunk(pb::Chunk {
                offset: off as u64,
                data: raw.slice(off..(off + chunk).min(raw.len())),
            })),
        })
        .collect();
    let outbound = tokio_stream::iter(std::iter::once(header).chain(chunks));
    let t_call = Instant::now();
    let mut inbound = client.infer_stream(outbound).await?.into_inner();
    let mut shape = Vec::new();
    let mut y: Vec<f32> = Vec::new();
    let mut received = 0usize;
    let mut summary = None;
    while let Some(msg) = inbound.message().await? {
        match msg.msg {
            Some(pb::infer_stream_response::Msg::Header(h)) => {
                shape = h.shape.iter().map(|&d| d as usize).collect();
                y = vec![0f32; shape.iter().product()];
            }
            Some(pb::infer_stream_response::Msg::Chunk(c)) => {
                let size = out_dtype.size();
                let at = c.offset as usize / size;
                let n = c.data.len() / size;
                let dst = y
                    .get_mut(at..at + n)
                    .ok_or("server sent a chunk outside the announced output")?;
                dtype::decode(out_dtype, &c.data, dst);
                received += c.data.len();
            }
            Some(pb::infer_stream_response::Msg::Summary(s)) => summary = Some(s),
            None => {}
        }
    }
    let stream_ms = t_call.elapsed().as_secs_f64() * 1e3;
    let s = summary.ok_or("stream ended without a summary")?;
    if received as u64 != s.output_bytes {
        return Err(format!("received {received} of {} output bytes", s.output_bytes).into());
    }
    write_npy(&a.output, &shape, y)?;
    eprintln!(
        "{}: output {:?} ({} bytes); call {:.1} ms, total with files {:.1} ms (server: receive \
         {:.1} ms, queue {:.1} ms, compute {:.1} ms)",
        a.model,
        shape,
        s.output_bytes,
        stream_ms,
        t0.elapsed().as_secs_f64() * 1e3,
        s.receive_ms,
        s.queue_ms,
        s.compute_ms
    );
    Ok(())
}

/// Exit 0 when SERVING, 1 otherwise (usable as a container health check).
pub fn health(a: HealthArgs) -> Result<(), BoxError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(a.server.clone())?
            .connect()
            .await
            .map_err(|e| format!("{}: {e}", a.server))?;
        let mut client = HealthClient::new(channel);
        let r = client
            .check(HealthCheckRequest {
                service: a.service.clone(),
            })
            .await?
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
