//! Request decoding and validation: arbitrary bytes decoded as each request message the
//! server accepts, then validated exactly as the handlers do before allocating anything.
//! Must never panic, hang or allocate by a size the bytes merely announce.
//!
//!     cargo +nightly fuzz run decode_validate -- -max_total_time=60

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use voxconv::proto::inference::ModelInferRequest;
use voxconv::proto::voxconv::v1::{infer_stream_request, InferRequest, InferStreamRequest};
use voxconv::service::InferenceService;

fn service() -> &'static InferenceService {
    static S: OnceLock<InferenceService> = OnceLock::new();
    S.get_or_init(InferenceService::for_validation)
}

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = InferRequest::decode(data) {
        let _ = service().validate_infer(&req);
    }
    if let Ok(req) = InferStreamRequest::decode(data) {
        if let Some(infer_stream_request::Msg::Header(h)) = req.msg {
            let _ = service().validate_stream_header(&h);
        }
    }
    let _ = ModelInferRequest::decode(data);
});
