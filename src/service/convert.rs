//! Protobuf ↔ engine types for voxconv.v1: summaries, stream events, input chunks, model
//! descriptions.

use tonic::{Request, Status};

use super::error;
use crate::auth::Caller;
use crate::engine::{CallSummary, InputChunk, Origin, StreamEvent};
use crate::error::ServiceError;
use crate::model::sliding::{Blend, PerAxis, WindowOptions, WindowOutput, WindowRequest};
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
        windows: s.windows,
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
        StreamEvent::Progress { done, total } => Msg::Progress(pb::Progress {
            windows_done: done,
            windows_total: total,
        }),
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

fn activation_name(a: &crate::kernel::Activation) -> String {
    a.name()
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
                        activation: activation_name(&c.activation),
                    },
                    Layer::Graph(_) => return None,
                    Layer::MaxPool(p) => pb::LayerInfo {
                        op: "maxpool3d".into(),
                        kernel: u(&p.kernel),
                        stride: u(&p.stride),
                        activation: activation_name(&p.activation),
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
        sliding_window: m
            .window_options(&WindowRequest::default())
            .ok()
            .map(|o| window_to_pb(&o)),
        scan_working_bytes: 0,
    }
}

/// One value or three (`[D, H, W]`), none for the default.
fn per_axis(field: &str, v: &[f64]) -> Result<Option<PerAxis>, ServiceError> {
    match *v {
        [] => Ok(None),
        [a] => Ok(Some(PerAxis::One(a))),
        [a, b, c] => Ok(Some(PerAxis::Three([a, b, c]))),
        _ => Err(ServiceError::invalid(format!(
            "{field}: expected 1 value (all axes) or 3 [D, H, W], got {}",
            v.len()
        ))),
    }
}

/// A request's `SlidingWindow` (`field` names it) as options; values are checked when the
/// call is planned.
pub(crate) fn window_from_pb(
    field: &str,
    w: &pb::SlidingWindow,
) -> Result<WindowRequest, ServiceError> {
    let roi = match w.roi[..] {
        [] => None,
        [d, h, w] => Some([d as usize, h as usize, w as usize]),
        _ => {
            return Err(ServiceError::invalid(format!(
                "{field}.roi: expected 3 sizes [D, H, W], got {}",
                w.roi.len()
            )))
        }
    };
    let blend = match pb::Blend::try_from(w.blend) {
        Ok(pb::Blend::Default) => None,
        Ok(pb::Blend::Gaussian) => Some(Blend::Gaussian),
        Ok(pb::Blend::Constant) => Some(Blend::Constant),
        Err(_) => {
            return Err(ServiceError::invalid(format!(
                "{field}.blend: expected BLEND_GAUSSIAN or BLEND_CONSTANT, got {}",
                w.blend
            )))
        }
    };
    let output = match pb::WindowOutput::try_from(w.output) {
        Ok(pb::WindowOutput::Default) => None,
        Ok(pb::WindowOutput::Logits) => Some(WindowOutput::Logits),
        Ok(pb::WindowOutput::Probabilities) => Some(WindowOutput::Probabilities),
        Ok(pb::WindowOutput::Labels) => Some(WindowOutput::Labels),
        Err(_) => {
            return Err(ServiceError::invalid(format!(
                "{field}.output: expected WINDOW_OUTPUT_LOGITS, WINDOW_OUTPUT_PROBABILITIES or \
                 WINDOW_OUTPUT_LABELS, got {}",
                w.output
            )))
        }
    };
    Ok(WindowRequest {
        roi,
        overlap: per_axis(&format!("{field}.overlap"), &w.overlap)?,
        blend,
        sigma_scale: per_axis(&format!("{field}.sigma_scale"), &w.sigma_scale)?,
        batch: (w.batch != 0).then_some(w.batch as usize),
        mirror: w
            .mirror
            .as_ref()
            .map(|m| m.axes.iter().map(|&a| a as usize).collect()),
        output,
    })
}

/// What a request asks of its output, each with the field that names it: the dtype
/// (`None`: unspecified, the server's choice) and the sliding window.
pub(crate) struct OutputAsk {
    pub dtype: Option<(&'static str, DType)>,
    window: Option<(&'static str, WindowRequest)>,
}

impl OutputAsk {
    /// A request's `output_dtype` and `sliding_window`; `header` for a `StreamHeader`'s.
    pub fn from_pb(
        header: bool,
        output_dtype: i32,
        window: Option<&pb::SlidingWindow>,
    ) -> Result<Self, ServiceError> {
        let (dtype_field, window_field) = if header {
            ("header.output_dtype", "header.sliding_window")
        } else {
            ("output_dtype", "sliding_window")
        };
        Ok(Self {
            dtype: crate::wire::out_dtype_from_pb(dtype_field, output_dtype)?,
            window: window
                .map(|w| window_from_pb(window_field, w).map(|r| (window_field, r)))
                .transpose()?,
        })
    }

    /// The window as the engine takes it.
    pub fn window(&self) -> Option<(&'static str, &WindowRequest)> {
        self.window.as_ref().map(|(f, w)| (*f, w))
    }
}

/// Resolved options as the message (GetModel's defaults).
pub(crate) fn window_to_pb(o: &WindowOptions) -> pb::SlidingWindow {
    pb::SlidingWindow {
        roi: o.roi.iter().map(|&v| v as u32).collect(),
        overlap: o.overlap.to_vec(),
        blend: match o.blend {
            Blend::Gaussian => pb::Blend::Gaussian,
            Blend::Constant => pb::Blend::Constant,
        } as i32,
        sigma_scale: o.sigma_scale.to_vec(),
        batch: o.batch as u32,
        mirror: Some(pb::MirrorAxes {
            axes: o.mirror.iter().map(|&a| a as u32).collect(),
        }),
        output: match o.output {
            WindowOutput::Logits => pb::WindowOutput::Logits,
            WindowOutput::Probabilities => pb::WindowOutput::Probabilities,
            WindowOutput::Labels => pb::WindowOutput::Labels,
        } as i32,
    }
}
