//! The protocol vocabulary the server and the client share: dtype names on both APIs,
//! status-code names, KServe tensor names, HTTP/2 frame and window sizes, and deadlines.
//! Written once here so the two sides cannot drift apart.

pub mod deadline;

use crate::error::ServiceError;
use crate::proto::voxconv::v1 as pb;
use crate::tensor::dtype::DType;

/// Largest HTTP/2 DATA frame either side accepts (announced in SETTINGS; the peer's
/// announcement bounds what is sent). The default 16 KiB costs one `writev` per 16 KiB:
/// 8,192 system calls per 128 MiB output, about a fifth of the time a stream takes on
/// loopback.
pub const HTTP2_MAX_FRAME: u32 = 4 << 20;
/// HTTP/2 flow-control window per stream. Volumes stream in MiB-sized chunks: the default
/// 64 KiB window would stall every chunk on a round trip.
pub const HTTP2_STREAM_WINDOW: u32 = 4 << 20;
/// HTTP/2 flow-control window per connection.
pub const HTTP2_CONNECTION_WINDOW: u32 = 8 << 20;

/// KServe tensor names of the single-input, single-output models.
pub const KSERVE_INPUT_NAME: &str = "input";
pub const KSERVE_OUTPUT_NAME: &str = "output";

/// The dtype a voxconv.v1 enum value names; `field` names the request field in the error.
/// An unspecified output dtype means FP32; outputs are FP32 or FP16.
pub fn dtype_from_pb(field: &str, v: i32, output: bool) -> Result<DType, ServiceError> {
    let d = match pb::DType::try_from(v) {
        Ok(pb::DType::Fp32) => DType::F32,
        Ok(pb::DType::Fp16) => DType::F16,
        Ok(pb::DType::Bf16) => DType::BF16,
        Ok(pb::DType::Int16) => DType::I16,
        Ok(pb::DType::Uint16) => DType::U16,
        Ok(pb::DType::Uint8) => DType::U8,
        Ok(pb::DType::DtypeUnspecified) if output => DType::F32,
        Ok(pb::DType::DtypeUnspecified) | Err(_) => {
            return Err(ServiceError::invalid(format!(
                "{field}: expected one of {}, got {v}",
                names(&DType::ALL)
            )))
        }
    };
    if output && !d.is_output() {
        return Err(ServiceError::invalid(format!(
            "{field}: expected FP32 or FP16, got {}",
            d.name()
        )));
    }
    Ok(d)
}

/// A requested output dtype: `None` when unspecified (the server's choice), any dtype
/// otherwise (whether it suits the call is checked when the call is planned).
pub fn out_dtype_from_pb(field: &str, v: i32) -> Result<Option<(&str, DType)>, ServiceError> {
    if v == pb::DType::DtypeUnspecified as i32 {
        return Ok(None);
    }
    dtype_from_pb(field, v, false).map(|d| Some((field, d)))
}

/// The voxconv.v1 enum value of a dtype.
pub fn dtype_to_pb(d: DType) -> pb::DType {
    match d {
        DType::F32 => pb::DType::Fp32,
        DType::F16 => pb::DType::Fp16,
        DType::BF16 => pb::DType::Bf16,
        DType::I16 => pb::DType::Int16,
        DType::U16 => pb::DType::Uint16,
        DType::U8 => pb::DType::Uint8,
    }
}

/// The dtype a KServe datatype string names (`FP32`, ..., the names [`DType::name`] gives).
pub fn dtype_from_kserve(field: &str, s: &str) -> Result<DType, ServiceError> {
    DType::ALL
        .into_iter()
        .find(|d| d.name() == s)
        .ok_or_else(|| {
            ServiceError::invalid(format!(
                "{field}: expected one of {}, got {s:?}",
                names(&DType::ALL)
            ))
        })
}

fn names(ds: &[DType]) -> String {
    ds.iter().map(|d| d.name()).collect::<Vec<_>>().join(", ")
}

/// The canonical name of a status code (`INVALID_ARGUMENT`, ...).
pub fn code_name(c: tonic::Code) -> &'static str {
    use tonic::Code;
    match c {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtypes_round_trip_through_both_apis() {
        for d in DType::ALL {
            assert_eq!(dtype_from_pb("f", dtype_to_pb(d) as i32, false), Ok(d));
            assert_eq!(dtype_from_kserve("f", d.name()), Ok(d));
        }
        assert_eq!(
            dtype_from_pb("output_dtype", 0, true),
            Ok(DType::F32),
            "unspecified output"
        );
        let e = dtype_from_pb("input.dtype", 0, false).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("input.dtype: expected one of FP32"),
            "{e}"
        );
        let e = dtype_from_pb("output_dtype", dtype_to_pb(DType::U8) as i32, true).unwrap_err();
        assert_eq!(
            e.to_string(),
            "output_dtype: expected FP32 or FP16, got UINT8"
        );
        let e = dtype_from_kserve("inputs[0].datatype", "FP64").unwrap_err();
        assert!(e.to_string().ends_with("got \"FP64\""), "{e}");
    }
}
