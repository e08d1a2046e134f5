//! The gRPC services, thin handlers over the [`Engine`]: `voxconv.v1` ([`v1`]), KServe v2
//! ([`kserve`]); protobuf ↔ engine types in [`convert`]; errors become statuses in one
//! place, [`error`].

pub mod convert;
pub mod error;
pub mod kserve;
mod v1;

use std::sync::Arc;

use tonic::Status;

pub use convert::model_info;
pub(crate) use convert::origin_of;
pub use error::ServiceError;

use crate::engine::Engine;
use crate::proto::voxconv::v1 as pb;
use crate::wire::dtype_from_pb;
use convert::OutputAsk;

/// The voxconv.v1 service: the engine behind thin handlers.
#[derive(Clone)]
pub struct InferenceService {
    engine: Arc<Engine>,
}

impl InferenceService {
    pub fn new(engine: Arc<Engine>) -> Self {
        Self { engine }
    }

    /// A service over the built-in models with test-sized settings (fuzzing, tests).
    pub fn for_validation() -> Self {
        Self::new(Arc::new(Engine::for_validation()))
    }

    /// Validates a whole-tensor request as `Infer` does before any allocation: dtypes, model,
    /// shape, data length. For fuzzing and property tests; never panics.
    pub fn validate_infer(&self, req: &pb::InferRequest) -> Result<(), Status> {
        let empty = pb::Tensor::default();
        let input = req.input.as_ref().unwrap_or(&empty);
        let in_dtype = dtype_from_pb("input.dtype", input.dtype, false)?;
        let ask = OutputAsk::from_pb(false, req.output_dtype, req.sliding_window.as_ref())?;
        let p = self.engine.prepare(
            "model",
            "input.shape",
            &req.model,
            in_dtype,
            &input.shape,
            ask.dtype,
            ask.window(),
        )?;
        if input.data.len() != p.input_bytes {
            return Err(ServiceError::invalid(format!(
                "input.data: expected {} bytes, got {}",
                p.input_bytes,
                input.data.len()
            ))
            .into());
        }
        Ok(())
    }

    /// Validates an `InferStream` header as the handler does. For fuzzing; never panics.
    pub fn validate_stream_header(&self, h: &pb::StreamHeader) -> Result<(), Status> {
        let i = dtype_from_pb("header.input_dtype", h.input_dtype, false)?;
        let ask = OutputAsk::from_pb(true, h.output_dtype, h.sliding_window.as_ref())?;
        self.engine.prepare(
            "header.model",
            "header.input_shape",
            &h.model,
            i,
            &h.input_shape,
            ask.dtype,
            ask.window(),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod validation_props {
    //! Request validation never panics and accepts exactly the consistent requests: a
    //! known model, five positive dimensions, the model's channel count, and sizes that fit
    //! the address space (checked here independently, in u128).
    use super::*;
    use crate::tensor::dtype::DType;
    use proptest::prelude::*;

    /// One service for every case (building the built-in models' seeded weights per case
    /// would dominate the run).
    fn service() -> InferenceService {
        static SERVICE: std::sync::OnceLock<InferenceService> = std::sync::OnceLock::new();
        SERVICE
            .get_or_init(InferenceService::for_validation)
            .clone()
    }

    /// (name, C_in, C_out, kernel, stride, padding) of the models the property draws from.
    const MODELS: [(&str, u128, u128, u128, u128, u128); 3] = [
        ("sobel3d", 1, 3, 3, 1, 1),
        ("gaussian3d", 1, 1, 5, 1, 2),
        ("bench-strided-downsample", 16, 32, 3, 2, 1),
    ];

    fn dim() -> impl Strategy<Value = u64> {
        prop_oneof![
            8 => 1u64..40,
            1 => Just(0u64),
            1 => 1u64 << 20..1u64 << 42,
            1 => Just(u64::MAX),
        ]
    }

    fn consistent(model: usize, shape: &[u64], in_size: u128, out_size: u128) -> bool {
        let Some(&(_, c_in, c_out, k, s, p)) = MODELS.get(model) else {
            return false; // unknown model
        };
        if shape.len() != 5 || shape.contains(&0) {
            return false;
        }
        let d: Vec<u128> = shape.iter().map(|&v| u128::from(v)).collect();
        if d[1] != c_in || d.iter().any(|&v| v > usize::MAX as u128) {
            return false;
        }
        let out_sp: Vec<u128> = d[2..].iter().map(|&x| (x + 2 * p - k) / s + 1).collect();
        let fits = |v: Option<u128>| v.is_some_and(|v| v <= usize::MAX as u128);
        let input = d.iter().try_fold(1u128, |a, &x| a.checked_mul(x));
        let output = out_sp
            .iter()
            .try_fold(d[0] * c_out, |a, &x| a.checked_mul(x));
        fits(input)
            && fits(input.and_then(|v| v.checked_mul(in_size)))
            && fits(output)
            && fits(output.and_then(|v| v.checked_mul(out_size)))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]
        /// The fuzz target's body on stable: arbitrary bytes, and a valid request with bytes
        /// flipped, decoded and validated, never panic.
        #[test]
        fn decoding_and_validating_arbitrary_bytes_never_panics(
            raw in proptest::collection::vec(any::<u8>(), 0..256),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        ) {
            use prost::Message;
            let svc = service();
            let valid = pb::InferRequest {
                model: "sobel3d".into(),
                input: Some(pb::Tensor {
                    dtype: pb::DType::Fp32 as i32,
                    shape: vec![1, 1, 2, 2, 2],
                    data: vec![0u8; 32].into(),
                }),
                output_dtype: 0,
                // Mutations reach the sliding-window options too.
                sliding_window: Some(pb::SlidingWindow {
                    roi: vec![2, 1, 2],
                    overlap: vec![0.5],
                    ..Default::default()
                }),
            };
            prop_assert!(svc.validate_infer(&valid).is_ok());
            let mut mutated = valid.encode_to_vec();
            for (at, b) in flips {
                let n = mutated.len();
                mutated[at % n] ^= b;
            }
            for bytes in [&raw[..], &mutated[..]] {
                if let Ok(r) = pb::InferRequest::decode(bytes) {
                    let _ = svc.validate_infer(&r);
                }
                if let Ok(r) = pb::InferStreamRequest::decode(bytes) {
                    if let Some(pb::infer_stream_request::Msg::Header(h)) = r.msg {
                        let _ = svc.validate_stream_header(&h);
                    }
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]
        #[test]
        fn validation_accepts_exactly_the_consistent_requests(
            model in 0usize..4,
            len in prop_oneof![8 => Just(5usize), 1 => 0usize..8],
            dims in proptest::collection::vec(dim(), 8),
            channel_hit in any::<bool>(),
            in_dtype in proptest::sample::select(DType::ALL.to_vec()),
            out_f16 in any::<bool>(),
        ) {
            let svc = service();
            let mut shape: Vec<u64> = dims[..len].to_vec();
            if channel_hit && shape.len() > 1 {
                if let Some(m) = MODELS.get(model) {
                    shape[1] = m.1 as u64;
                }
            }
            let name = MODELS.get(model).map_or("no-such-model", |m| m.0);
            let out = if out_f16 { DType::F16 } else { DType::F32 };
            let got = svc.engine.prepare("model", "shape", name, in_dtype, &shape, Some(("output_dtype", out)), None);
            let want = consistent(model, &shape, in_dtype.size() as u128, out.size() as u128);
            prop_assert_eq!(got.is_ok(), want, "shape {:?} model {} -> {:?}", shape, name,
                got.as_ref().err());
            if let Ok(p) = got {
                prop_assert_eq!(p.input_bytes as u128,
                    shape.iter().map(|&v| u128::from(v)).product::<u128>() * in_dtype.size() as u128);
            }
        }
    }
}
