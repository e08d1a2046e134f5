//! KServe v2 / Open Inference Protocol (`inference.GRPCInferenceService`), so Triton's
//! clients and KServe work unchanged. Thin: it maps OIP messages onto the same validation,
//! admission and worker path as `voxconv.v1.Inference/Infer`.
//!
//! Each model has one input `input` (`[N, C_in, D, H, W]`, dims -1 where free) and one output
//! `output` (`[N, C_out, oD, oH, oW]`, FP32). The OIP has no chunking: outputs larger than
//! the message limit are refused with a pointer to `voxconv.v1.Inference/InferStream`.

use std::pin::Pin;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::{info_span, Instrument};

use super::{origin_of, ServiceError};
use crate::engine::{Engine, Origin, Prepared};
use crate::model::sliding::{Blend, PerAxis, WindowOutput, WindowRequest};
use crate::model::Model;
use crate::proto::inference as kv;
use crate::tensor::dtype::DType;

use crate::obs::telemetry::set_remote_parent;
use crate::wire::deadline;
use crate::wire::{
    dtype_from_kserve, KSERVE_INPUT_NAME as INPUT_NAME, KSERVE_OUTPUT_NAME as OUTPUT_NAME,
};

/// The OIP service; shares the engine (models, pool, limits) with `voxconv.v1`.
#[derive(Clone)]
pub struct KserveService {
    inner: std::sync::Arc<Engine>,
}

impl KserveService {
    pub fn new(inner: std::sync::Arc<Engine>) -> Self {
        Self { inner }
    }

    fn model(&self, field: &str, name: &str) -> Result<std::sync::Arc<Model>, ServiceError> {
        self.inner
            .models
            .snapshot()
            .get(name)
            .ok_or_else(|| ServiceError::NotFound(format!("{field}: no model named {name:?}")))
    }

    /// One ModelInfer request, start to finish.
    async fn infer_one(
        &self,
        req: kv::ModelInferRequest,
        deadline: Option<Instant>,
        metadata: &tonic::metadata::MetadataMap,
        origin: &Origin,
    ) -> Result<kv::ModelInferResponse, ServiceError> {
        let started = Instant::now();
        let span = info_span!(
            "rpc",
            method = "ModelInfer",
            model = %self.inner.loggable_model(&req.model_name)
        );
        set_remote_parent(&span, metadata);
        let model_name = req.model_name.clone();
        let mut prepared = None;
        let result = self
            .infer_inner(req, deadline, started, &mut prepared)
            .instrument(span.clone())
            .await;
        let _e = span.enter();
        let status = result.as_ref().map(|_| ()).map_err(Clone::clone);
        self.inner.finish_call(
            origin,
            "ModelInfer",
            &model_name,
            prepared.as_ref(),
            &status,
            started,
        );
        result
    }

    async fn infer_inner(
        &self,
        mut req: kv::ModelInferRequest,
        deadline: Option<Instant>,
        started: Instant,
        prepared: &mut Option<Prepared>,
    ) -> Result<kv::ModelInferResponse, ServiceError> {
        // `timeout` (µs) bounds queueing beside the gRPC deadline; other parameters
        // (priority, unknown ones) are accepted and ignored.
        let deadline = match req
            .parameters
            .get("timeout")
            .and_then(|p| p.parameter_choice.as_ref())
        {
            Some(kv::infer_parameter::ParameterChoice::Int64Param(us)) if *us > 0 => {
                let t = Instant::now() + Duration::from_micros(*us as u64);
                Some(deadline.map_or(t, |d| d.min(t)))
            }
            Some(kv::infer_parameter::ParameterChoice::Int64Param(us)) => {
                return Err(ServiceError::invalid(format!(
                    "parameters.timeout: expected a positive number of microseconds, got {us}"
                )))
            }
            Some(_) => {
                return Err(ServiceError::invalid(
                    "parameters.timeout: expected an int64 (microseconds)",
                ))
            }
            None => deadline,
        };
        if !req.model_version.is_empty() && req.model_version != "1" {
            return Err(ServiceError::NotFound(format!(
                "model_version: {} has only version \"1\", got {:?}",
                req.model_name, req.model_version
            )));
        }
        // Tensors are named as the model's graph names them (an unknown model is
        // NOT_FOUND below, from the engine).
        let (in_name, out_name) = match self.inner.models.snapshot().get(&req.model_name) {
            Some(m) => (m.input_name().to_string(), m.output_name().to_string()),
            None => (INPUT_NAME.to_string(), OUTPUT_NAME.to_string()),
        };
        if req.inputs.len() != 1 {
            return Err(ServiceError::invalid(format!(
                "inputs: expected exactly 1 input ({in_name:?}), got {}",
                req.inputs.len()
            )));
        }
        for (i, o) in req.outputs.iter().enumerate() {
            if o.name != out_name {
                return Err(ServiceError::invalid(format!(
                    "outputs[{i}].name: expected {out_name:?}, got {:?}",
                    o.name
                )));
            }
        }
        let input = req.inputs.remove(0);
        if input.name != in_name {
            return Err(ServiceError::invalid(format!(
                "inputs[0].name: expected {in_name:?}, got {:?}",
                input.name
            )));
        }
        let dtype = dtype_from_kserve("inputs[0].datatype", &input.datatype)?;
        let mut shape = Vec::with_capacity(input.shape.len());
        for &d in &input.shape {
            shape.push(u64::try_from(d).map_err(|_| {
                ServiceError::invalid(format!(
                    "inputs[0].shape: dimensions must be non-negative, got {:?}",
                    input.shape
                ))
            })?);
        }
        let data = match (req.raw_input_contents.len(), input.contents) {
            (0, Some(c)) => typed_contents(dtype, &c)?,
            (0, None) => return Err(ServiceError::invalid(
                "inputs[0]: expected data in raw_input_contents or inputs[0].contents, got neither",
            )),
            (1, None) => req.raw_input_contents.remove(0),
            (1, Some(_)) => {
                return Err(ServiceError::invalid(
                    "inputs[0].contents: data came both raw and typed; send one",
                ))
            }
            (n, _) => {
                return Err(ServiceError::invalid(format!(
                    "raw_input_contents: expected 1 entry (one per input), got {n}"
                )))
            }
        };
        let window = window_from_params(&req.parameters)?;
        let (p, bytes, _summary) = self
            .inner
            .run_whole(
                ("model_name", "inputs[0].shape", "raw_input_contents[0]"),
                &req.model_name,
                dtype,
                &shape,
                data,
                None,
                window.as_ref().map(|w| ("parameters", w)),
                deadline,
                started,
            )
            .await?;
        let response = kv::ModelInferResponse {
            model_name: p.model.name.clone(),
            model_version: "1".into(),
            id: req.id,
            parameters: Default::default(),
            outputs: vec![kv::model_infer_response::InferOutputTensor {
                name: p.model.output_name().into(),
                datatype: p.out_dtype.name().into(),
                shape: p.plan.output.iter().map(|&d| d as i64).collect(),
                parameters: Default::default(),
                contents: None,
            }],
            raw_output_contents: vec![Bytes::from(bytes)],
        };
        *prepared = Some(p);
        Ok(response)
    }
}

/// Sliding-window request parameters (`sliding_window = true`, then `roi` "D,H,W",
/// `overlap` and `sigma_scale` (a number or "a,b,c"), `blend`, `batch` (or `sw_batch_size`), `mirror`
/// "0,1,2" ("" for none), `output` logits|probabilities|labels); `None` without
/// `sliding_window`.
fn window_from_params(
    params: &std::collections::HashMap<String, kv::InferParameter>,
) -> Result<Option<WindowRequest>, ServiceError> {
    use kv::infer_parameter::ParameterChoice as P;
    const KEYS: [&str; 8] = [
        "roi",
        "overlap",
        "blend",
        "sigma_scale",
        "batch",
        "sw_batch_size",
        "mirror",
        "output",
    ];
    let get = |k: &str| params.get(k).and_then(|p| p.parameter_choice.as_ref());
    let on = match get("sliding_window") {
        None => false,
        Some(P::BoolParam(b)) => *b,
        Some(_) => {
            return Err(ServiceError::invalid(
                "parameters.sliding_window: expected a bool",
            ))
        }
    };
    if !on {
        if let Some(k) = KEYS.iter().find(|k| params.contains_key(**k)) {
            return Err(ServiceError::invalid(format!(
                "parameters.{k}: a sliding-window option; set parameters.sliding_window = true"
            )));
        }
        return Ok(None);
    }
    let text = |k: &str| -> Result<Option<String>, ServiceError> {
        match get(k) {
            None => Ok(None),
            Some(P::StringParam(s)) => Ok(Some(s.clone())),
            Some(_) => Err(ServiceError::invalid(format!(
                "parameters.{k}: expected a string"
            ))),
        }
    };
    let per_axis = |k: &str| -> Result<Option<PerAxis>, ServiceError> {
        let v = match get(k) {
            None => return Ok(None),
            Some(P::DoubleParam(v)) => vec![*v],
            Some(P::Int64Param(v)) => vec![*v as f64],
            Some(P::StringParam(s)) => comma_list(k, s, "numbers")?,
            Some(_) => {
                return Err(ServiceError::invalid(format!(
                    "parameters.{k}: expected a number or \"a,b,c\""
                )))
            }
        };
        match v[..] {
            [a] => Ok(Some(PerAxis::One(a))),
            [a, b, c] => Ok(Some(PerAxis::Three([a, b, c]))),
            _ => Err(ServiceError::invalid(format!(
                "parameters.{k}: expected 1 value or 3 [D, H, W], got {}",
                v.len()
            ))),
        }
    };
    let roi = match text("roi")? {
        None => None,
        Some(s) => match comma_list::<usize>("roi", &s, "whole numbers")?[..] {
            [d, h, w] => Some([d, h, w]),
            _ => {
                return Err(ServiceError::invalid(format!(
                    "parameters.roi: expected \"D,H,W\", got {s:?}"
                )))
            }
        },
    };
    let blend = match text("blend")?.as_deref() {
        None => None,
        Some("gaussian") => Some(Blend::Gaussian),
        Some("constant") => Some(Blend::Constant),
        Some(other) => {
            return Err(ServiceError::invalid(format!(
                "parameters.blend: expected gaussian or constant, got {other:?}"
            )))
        }
    };
    let output = match text("output")?.as_deref() {
        None => None,
        Some("logits") => Some(WindowOutput::Logits),
        Some("probabilities") => Some(WindowOutput::Probabilities),
        Some("labels") => Some(WindowOutput::Labels),
        Some(other) => {
            return Err(ServiceError::invalid(format!(
                "parameters.output: expected logits, probabilities or labels, got {other:?}"
            )))
        }
    };
    // `batch` as voxconv.v1 names it (and errors do), `sw_batch_size` as MONAI does.
    let batch = match get("batch").or_else(|| get("sw_batch_size")) {
        None => None,
        Some(P::Int64Param(v)) if *v >= 0 => Some(*v as usize),
        Some(_) => {
            return Err(ServiceError::invalid(
                "parameters.batch (or sw_batch_size): expected a non-negative int64",
            ))
        }
    };
    let mirror = text("mirror")?
        .map(|s| comma_list("mirror", &s, "whole numbers"))
        .transpose()?;
    Ok(Some(WindowRequest {
        roi,
        overlap: per_axis("overlap")?,
        blend,
        sigma_scale: per_axis("sigma_scale")?,
        batch,
        mirror,
        output,
    }))
}

/// A comma-separated parameter `k` of `what` (empty pieces skipped).
fn comma_list<T: std::str::FromStr>(k: &str, s: &str, what: &str) -> Result<Vec<T>, ServiceError> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            p.trim().parse::<T>().map_err(|_| {
                ServiceError::invalid(format!(
                    "parameters.{k}: expected {what} separated by commas, got {s:?}"
                ))
            })
        })
        .collect()
}

/// Typed `contents` → little-endian bytes (FP16/BF16 travel only raw).
fn typed_contents(dtype: DType, c: &kv::InferTensorContents) -> Result<Bytes, ServiceError> {
    let mut out = Vec::new();
    let range = |v: u64, lo: i64, hi: i64, what: &str| -> Result<(), ServiceError> {
        let v = v as i64;
        if v < lo || v > hi {
            Err(ServiceError::invalid(format!(
                "inputs[0].contents: {what} value out of range {lo}..={hi}"
            )))
        } else {
            Ok(())
        }
    };
    match dtype {
        DType::F32 => c
            .fp32_contents
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::I16 => {
            for &v in &c.int_contents {
                if v < i32::from(i16::MIN) || v > i32::from(i16::MAX) {
                    return Err(ServiceError::invalid(
                        "inputs[0].contents.int_contents: value out of the INT16 range",
                    ));
                }
                out.extend_from_slice(&(v as i16).to_le_bytes());
            }
        }
        DType::U16 => {
            for &v in &c.uint_contents {
                range(u64::from(v), 0, i64::from(u16::MAX), "UINT16")?;
                out.extend_from_slice(&(v as u16).to_le_bytes());
            }
        }
        DType::U8 => {
            for &v in &c.uint_contents {
                range(u64::from(v), 0, i64::from(u8::MAX), "UINT8")?;
                out.push(v as u8);
            }
        }
        DType::F16 | DType::BF16 => {
            return Err(ServiceError::invalid(format!(
                "inputs[0].contents: {} data must come in raw_input_contents",
                dtype.name()
            )))
        }
    }
    Ok(Bytes::from(out))
}

/// KServe's platform string: what kind of model this is.
fn platform(m: &crate::model::Model) -> &'static str {
    if m.graph().is_some() {
        "voxconv_onnx"
    } else {
        "voxconv_conv3d"
    }
}

fn tensor_meta(
    name: &str,
    datatype: &str,
    shape: Vec<i64>,
) -> kv::model_metadata_response::TensorMetadata {
    kv::model_metadata_response::TensorMetadata {
        name: name.into(),
        datatype: datatype.into(),
        shape,
    }
}

type StreamOut = Pin<Box<dyn Stream<Item = Result<kv::ModelStreamInferResponse, Status>> + Send>>;

#[tonic::async_trait]
impl kv::grpc_inference_service_server::GrpcInferenceService for KserveService {
    async fn server_live(
        &self,
        _r: Request<kv::ServerLiveRequest>,
    ) -> Result<Response<kv::ServerLiveResponse>, Status> {
        Ok(Response::new(kv::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _r: Request<kv::ServerReadyRequest>,
    ) -> Result<Response<kv::ServerReadyResponse>, Status> {
        Ok(Response::new(kv::ServerReadyResponse { ready: true }))
    }

    async fn model_ready(
        &self,
        r: Request<kv::ModelReadyRequest>,
    ) -> Result<Response<kv::ModelReadyResponse>, Status> {
        let r = r.into_inner();
        let ready = self.inner.models.snapshot().get(&r.name).is_some()
            && (r.version.is_empty() || r.version == "1");
        Ok(Response::new(kv::ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _r: Request<kv::ServerMetadataRequest>,
    ) -> Result<Response<kv::ServerMetadataResponse>, Status> {
        Ok(Response::new(kv::ServerMetadataResponse {
            name: "voxconv".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: vec!["model_configuration".into()],
        }))
    }

    async fn model_metadata(
        &self,
        r: Request<kv::ModelMetadataRequest>,
    ) -> Result<Response<kv::ModelMetadataResponse>, Status> {
        let r = r.into_inner();
        let m = self.model("name", &r.name)?;
        Ok(Response::new(kv::ModelMetadataResponse {
            name: m.name.clone(),
            versions: vec!["1".into()],
            platform: platform(&m).into(),
            inputs: vec![tensor_meta(m.input_name(), "FP32", m.input_dims())],
            outputs: vec![tensor_meta(m.output_name(), "FP32", m.output_dims())],
        }))
    }

    async fn model_config(
        &self,
        r: Request<kv::ModelConfigRequest>,
    ) -> Result<Response<kv::ModelConfigResponse>, Status> {
        let r = r.into_inner();
        let m = self.model("name", &r.name)?;
        Ok(Response::new(kv::ModelConfigResponse {
            config: Some(kv::ModelConfig {
                name: m.name.clone(),
                platform: platform(&m).into(),
                backend: "voxconv".into(),
                max_batch_size: 0,
                input: vec![kv::ModelInput {
                    name: m.input_name().into(),
                    data_type: kv::DataType::TypeFp32 as i32,
                    format: kv::model_input::Format::None as i32,
                    dims: m.input_dims(),
                }],
                output: vec![kv::ModelOutput {
                    name: m.output_name().into(),
                    data_type: kv::DataType::TypeFp32 as i32,
                    dims: m.output_dims(),
                }],
            }),
        }))
    }

    async fn model_infer(
        &self,
        r: Request<kv::ModelInferRequest>,
    ) -> Result<Response<kv::ModelInferResponse>, Status> {
        let deadline = deadline::of_request(&r);
        let origin = origin_of(&r);
        let (metadata, _, req) = r.into_parts();
        let resp = self.infer_one(req, deadline, &metadata, &origin).await?;
        Ok(Response::new(resp))
    }

    type ModelStreamInferStream = StreamOut;

    /// Requests are answered in order; a failed one is reported in `error_message` and the
    /// stream stays open.
    async fn model_stream_infer(
        &self,
        r: Request<Streaming<kv::ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        let deadline = deadline::of_request(&r);
        let origin = origin_of(&r);
        let (metadata, _, mut inbound) = r.into_parts();
        let (tx, rx) = mpsc::channel(4);
        let this = self.clone();
        tokio::spawn(async move {
            while let Some(msg) = inbound.next().await {
                let reply = match msg {
                    Err(_) => break, // the client's stream failed or was cancelled
                    Ok(req) => {
                        let id = req.id.clone();
                        match this.infer_one(req, deadline, &metadata, &origin).await {
                            Ok(resp) => kv::ModelStreamInferResponse {
                                error_message: String::new(),
                                infer_response: Some(resp),
                            },
                            Err(e) => kv::ModelStreamInferResponse {
                                error_message: e.to_string(),
                                infer_response: Some(kv::ModelInferResponse {
                                    id,
                                    ..Default::default()
                                }),
                            },
                        }
                    }
                };
                if tx.send(Ok(reply)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
