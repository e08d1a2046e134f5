//! Protobuf ↔ engine types for voxconv.v1: summaries, stream events, input chunks, model
//! descriptions.

use tonic::{Request, Status};

use super::error;
use crate::auth::Caller;
use crate::engine::{CallSummary, InputChunk, Origin, StreamEvent};
use crate::error::ServiceError;
use crate::model::{Layer, Model};
use crate::proto::voxconv::v1 as pb;
use crate::tensor::dtype::DType;
use crate::wire::dtype_to_pb;

pub(crate) fn origin_of<T>(r: &Request<T>) -> Origin {
    Origin {
        caller: r.extensions().get::<Caller>().map(|c| c.0.clone()),
        peer: r.remote_addr(),
    }
}

/// A call's summary as sent to the client.
pub(crate) fn summary_to_pb(s: &CallSummary) -> pb::Summary {
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    pb::Summary {
        input_bytes: s.input_bytes,
        output_bytes: s.output_bytes,
        flops: s.flops,
        receive_ms: ms(s.receive),
        queue_ms: ms(s.queue),
        compute_ms: ms(s.compute),
        total_ms: ms(s.total),
        layers: s
            .layers
            .iter()
            .map(|l| pb::LayerTiming {
                strategy: l.strategy.to_string(),
                compute_ms: l.compute_ms,
                im2col_ms: ms(l.stages.im2col),
                gemm_ms: ms(l.stages.gemm),
                epilogue_ms: ms(l.stages.epilogue),
            })
            .collect(),
    }
}

/// One event of a streamed call as its response message.
pub(crate) fn event_to_pb(e: StreamEvent) -> pb::InferStreamResponse {
    use pb::infer_stream_response::Msg;
    let msg = match e {
        StreamEvent::Header {
            dtype,
            shape,
            total_bytes,
        } => Msg::Header(pb::OutputHeader {
            dtype: dtype_to_pb(dtype) as i32,
            shape: shape.iter().map(|&d| d as u64).collect(),
            total_bytes,
        }),
        StreamEvent::Chunk { offset, data } => Msg::Chunk(pb::Chunk { offset, data }),
        StreamEvent::Summary(s) => Msg::Summary(summary_to_pb(&s)),
    };
    pb::InferStreamResponse { msg: Some(msg) }
}

/// A request-stream message after the header, as an input chunk.
pub(crate) fn input_chunk(
    m: Result<pb::InferStreamRequest, Status>,
) -> Result<InputChunk, ServiceError> {
    let m = m.map_err(|s| error::input_stream(&s))?;
    match m.msg {
        Some(pb::infer_stream_request::Msg::Chunk(c)) => Ok(InputChunk {
            offset: c.offset,
            data: c.data,
        }),
        Some(pb::infer_stream_request::Msg::Header(_)) => Err(ServiceError::invalid(
            "header: expected chunks after the first header, got a second header",
        )),
        None => Err(ServiceError::invalid(
            "msg: expected header or chunk, got neither",
        )),
    }
}

fn activation_name(a: crate::kernel::Activation) -> String {
    match a {
        crate::kernel::Activation::None => "none".into(),
        crate::kernel::Activation::Relu => "relu".into(),
        crate::kernel::Activation::LeakyRelu(a) => format!("leaky_relu:{a}"),
        crate::kernel::Activation::Sigmoid => "sigmoid".into(),
    }
}

/// A model's description for ListModels / GetModel.
pub fn model_info(m: &Model) -> pb::ModelInfo {
    let u = |v: &[usize]| v.iter().map(|&x| x as u32).collect::<Vec<u32>>();
    pb::ModelInfo {
        name: m.name.clone(),
        description: m.description.clone(),
        input_channels: m.in_channels() as u32,
        output_channels: m.out_channels() as u32,
        layers: m
            .layers
            .iter()
            .filter_map(|l| {
                Some(match l {
                    Layer::Conv(c) => pb::LayerInfo {
                        op: "conv3d".into(),
                        in_channels: c.filter_shape[1] as u32,
                        out_channels: c.filter_shape[0] as u32,
                        kernel: u(&c.filter_shape[2..]),
                        stride: u(&c.params.stride),
                        padding: u(&c.params.padding),
                        dilation: u(&c.params.dilation),
                        bias: c.bias.is_some(),
                        activation: activation_name(c.activation),
                    },
                    Layer::Graph(_) => return None,
                    Layer::MaxPool(p) => pb::LayerInfo {
                        op: "maxpool3d".into(),
                        kernel: u(&p.kernel),
                        stride: u(&p.stride),
                        activation: activation_name(p.activation),
                        ..Default::default()
                    },
                })
            })
            .collect(),
        accepted_dtypes: DType::ALL.iter().map(|&d| dtype_to_pb(d) as i32).collect(),
        output_shape: m.output_shape_rule(),
        receptive_field: u(&m.receptive_field()),
        ready: true,
        error: String::new(),
        format: if m.graph().is_some() {
            "onnx"
        } else {
            "conv3d-stack"
        }
        .into(),
        inputs: vec![pb::TensorInfo {
            name: m.input_name().into(),
            datatype: "FP32".into(),
            shape: m.input_dims(),
        }],
        outputs: vec![pb::TensorInfo {
            name: m.output_name().into(),
            datatype: "FP32".into(),
            shape: m.output_dims(),
        }],
        ops: m.graph().map(|g| g.op_counts()).unwrap_or_default(),
        working_bytes: m
            .graph()
            .and_then(|g| g.declared_input())
            .and_then(|s| m.plan(s).ok())
            .map_or(0, |p| p.working_bytes(1) as u64),
    }
}
