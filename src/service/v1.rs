//! The `voxconv.v1.Inference` handlers: validate → convert → submit to the engine → stream.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::{info_span, Instrument};

use super::convert::{event_to_pb, input_chunk, model_info, origin_of, summary_to_pb, OutputAsk};
use super::{error, InferenceService};
use crate::engine::log_region;
use crate::error::ServiceError;
use crate::obs::telemetry::set_remote_parent;
use crate::proto::voxconv::v1 as pb;
use crate::wire::deadline;
use crate::wire::{dtype_from_pb, dtype_to_pb};

type StreamOut = Pin<Box<dyn Stream<Item = Result<pb::InferStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::inference_server::Inference for InferenceService {
    async fn infer(
        &self,
        request: Request<pb::InferRequest>,
    ) -> Result<Response<pb::InferResponse>, Status> {
        let started = Instant::now();
        let deadline = deadline::of_request(&request);
        let origin = origin_of(&request);
        let (metadata, _, req) = request.into_parts();
        let span =
            info_span!("rpc", method = "Infer", model = %self.engine.loggable_model(&req.model));
        set_remote_parent(&span, &metadata);
        let mut prepared = None;
        let result: Result<pb::InferResponse, ServiceError> = async {
            let input = req.input.unwrap_or_default();
            let in_dtype = dtype_from_pb("input.dtype", input.dtype, false)?;
            let ask = OutputAsk::from_pb(false, req.output_dtype, req.sliding_window.as_ref())?;
            let (p, bytes, summary) = self
                .engine
                .run_whole(
                    ("model", "input.shape", "input.data"),
                    &req.model,
                    in_dtype,
                    &input.shape,
                    input.data,
                    ask.dtype,
                    ask.window(),
                    deadline,
                    started,
                )
                .await?;
            let resp = pb::InferResponse {
                model: p.model.name.clone(),
                output: Some(pb::Tensor {
                    dtype: dtype_to_pb(p.out_dtype) as i32,
                    shape: p.plan.output.iter().map(|&d| d as u64).collect(),
                    data: Bytes::from(bytes),
                }),
                summary: Some(summary_to_pb(&summary)),
            };
            prepared = Some(p);
            Ok(resp)
        }
        .instrument(span.clone())
        .await;
        let _e = span.enter();
        match result {
            Ok(resp) => {
                self.engine.finish_call(
                    &origin,
                    "Infer",
                    &req.model,
                    prepared.as_ref(),
                    &Ok(()),
                    started,
                );
                Ok(Response::new(resp))
            }
            Err(e) => {
                self.engine.finish_call(
                    &origin,
                    "Infer",
                    &req.model,
                    prepared.as_ref(),
                    &Err(e.clone()),
                    started,
                );
                Err(e.into())
            }
        }
    }

    type InferStreamStream = StreamOut;

    async fn infer_stream(
        &self,
        request: Request<Streaming<pb::InferStreamRequest>>,
    ) -> Result<Response<Self::InferStreamStream>, Status> {
        let started = Instant::now();
        let deadline = deadline::of_request(&request);
        let origin = origin_of(&request);
        let (metadata, _, mut inbound) = request.into_parts();
        let header = async {
            let first = crate::engine::until(deadline, "waiting for the header", inbound.message())
                .await?
                .map_err(|s| error::input_stream(&s))?;
            match first.and_then(|m| m.msg) {
                Some(pb::infer_stream_request::Msg::Header(h)) => Ok(h),
                Some(pb::infer_stream_request::Msg::Chunk(_)) => Err(ServiceError::invalid(
                    "header: expected a header as the first message, got a chunk",
                )),
                None => Err(ServiceError::invalid(
                    "header: expected a header as the first message, got none",
                )),
            }
        }
        .await;
        let header = match header {
            Ok(h) => h,
            Err(e) => {
                // Recorded like every other failed call (no model named yet).
                self.engine
                    .finish_call(&origin, "InferStream", "", None, &Err(e.clone()), started);
                return Err(e.into());
            }
        };
        let span = info_span!(
            "rpc",
            method = "InferStream",
            model = %self.engine.loggable_model(&header.model)
        );
        set_remote_parent(&span, &metadata);
        let p = {
            let _e = span.enter();
            let e = &self.engine;
            dtype_from_pb("header.input_dtype", header.input_dtype, false).and_then(|i| {
                let ask =
                    OutputAsk::from_pb(true, header.output_dtype, header.sliding_window.as_ref())?;
                let p = e.prepare(
                    "header.model",
                    "header.input_shape",
                    &header.model,
                    i,
                    &header.input_shape,
                    ask.dtype,
                    ask.window(),
                )?;
                fn region(r: &Option<pb::SharedMemoryRef>) -> Option<(&str, u64)> {
                    r.as_ref().map(|r| (r.region.as_str(), r.offset))
                }
                let output = e.shm_target(
                    "header.output_shared_memory",
                    region(&header.output_shared_memory),
                    p.output_bytes,
                )?;
                let input = e.shm_target(
                    "header.input_shared_memory",
                    region(&header.input_shared_memory),
                    p.input_bytes,
                )?;
                let route = e.route(&p, header.max_chunk_bytes, input, output);
                Ok((p, route))
            })
        };
        let (p, route) = match p {
            Ok(p) => p,
            Err(e) => {
                let _e = span.enter();
                self.engine.finish_call(
                    &origin,
                    "InferStream",
                    &header.model,
                    None,
                    &Err(e.clone()),
                    started,
                );
                return Err(e.into());
            }
        };
        let (tx, rx) = mpsc::channel(route.depth);
        let engine = Arc::clone(&self.engine);
        let model_name = header.model.clone();
        tokio::spawn(
            async move {
                let chunks = inbound.map(input_chunk);
                let (result, p) = engine
                    .run_stream(p, chunks, tx, route, deadline, started)
                    .await;
                engine.finish_call(
                    &origin,
                    "InferStream",
                    &model_name,
                    Some(&p),
                    &result,
                    started,
                );
            }
            .instrument(span),
        );
        let out = ReceiverStream::new(rx).map(|r| r.map(event_to_pb).map_err(Status::from));
        Ok(Response::new(Box::pin(out)))
    }

    async fn register_shared_memory(
        &self,
        request: Request<pb::RegisterSharedMemoryRequest>,
    ) -> Result<Response<pb::RegisterSharedMemoryResponse>, Status> {
        let r = request.into_inner();
        let result = self
            .engine
            .shm
            .register(&r.name, &r.key, r.offset, r.byte_size);
        log_region("registered", r.byte_size, &result);
        result?;
        Ok(Response::new(pb::RegisterSharedMemoryResponse {}))
    }

    async fn create_shared_memory(
        &self,
        request: Request<pb::CreateSharedMemoryRequest>,
    ) -> Result<Response<pb::CreateSharedMemoryResponse>, Status> {
        let r = request.into_inner();
        // Creating allocates and maps (up to --shared-memory-create-limit): off the runtime.
        let shm = Arc::clone(&self.engine.shm);
        let (name, byte_size) = (r.name, r.byte_size);
        let result = tokio::task::spawn_blocking(move || shm.create(&name, byte_size))
            .await
            .unwrap_or_else(|_| Err(ServiceError::Internal("creating the region stopped".into())));
        log_region("created", byte_size, &result);
        let (key, memfd_name) = result?;
        Ok(Response::new(pb::CreateSharedMemoryResponse {
            key,
            memfd_name,
        }))
    }

    async fn unregister_shared_memory(
        &self,
        request: Request<pb::UnregisterSharedMemoryRequest>,
    ) -> Result<Response<pb::UnregisterSharedMemoryResponse>, Status> {
        self.engine.shm.unregister(&request.into_inner().name)?;
        Ok(Response::new(pb::UnregisterSharedMemoryResponse {}))
    }

    async fn shared_memory_status(
        &self,
        request: Request<pb::SharedMemoryStatusRequest>,
    ) -> Result<Response<pb::SharedMemoryStatusResponse>, Status> {
        let regions = self
            .engine
            .shm
            .status(&request.into_inner().name)?
            .iter()
            .map(|r| pb::SharedMemoryRegion {
                name: r.name.clone(),
                key: r.key.clone(),
                offset: r.offset,
                byte_size: r.byte_size,
                server_created: r.server_created(),
            })
            .collect();
        Ok(Response::new(pb::SharedMemoryStatusResponse { regions }))
    }

    async fn list_models(
        &self,
        _request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let set = self.engine.models.snapshot();
        let mut models: Vec<pb::ModelInfo> = set
            .iter()
            .map(|m| {
                let mut info = model_info(m);
                info.error = set.error(&m.name).cloned().unwrap_or_default();
                info
            })
            .collect();
        // Models that failed to load and have no earlier version serving.
        for (name, error) in set.broken() {
            if set.get(name).is_none() {
                models.push(pb::ModelInfo {
                    name: name.clone(),
                    ready: false,
                    error: error.clone(),
                    ..Default::default()
                });
            }
        }
        Ok(Response::new(pb::ListModelsResponse { models }))
    }

    async fn get_model(
        &self,
        request: Request<pb::GetModelRequest>,
    ) -> Result<Response<pb::ModelInfo>, Status> {
        let req = request.into_inner();
        let name = req.name;
        let set = self.engine.models.snapshot();
        let m = set.get(&name).ok_or_else(|| match set.error(&name) {
            Some(e) => Status::from(ServiceError::Unavailable(format!(
                "name: model {name:?} failed to load: {e}"
            ))),
            None => Status::from(ServiceError::NotFound(format!(
                "name: no model named {name:?}"
            ))),
        })?;
        let mut info = model_info(&m);
        info.error = set.error(&name).cloned().unwrap_or_default();
        if !req.scan_shape.is_empty() {
            info.scan_working_bytes = self
                .engine
                .scan_working_bytes("scan_shape", &m, &req.scan_shape)
                .map_err(Status::from)?;
        }
        Ok(Response::new(info))
    }
}
