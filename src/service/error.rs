//! Errors to gRPC statuses, in one place.

use tonic::{Code, Status};

pub use crate::error::ServiceError;

/// The request stream failed while the input was being read: a message over the limit
/// is RESOURCE_EXHAUSTED, one that does not decode INVALID_ARGUMENT, anything else (the
/// client reset the stream, the connection broke) CANCELLED.
pub fn input_stream(s: &Status) -> ServiceError {
    let m = format!("input stream failed: {}", s.message());
    match s.code() {
        Code::OutOfRange | Code::ResourceExhausted => ServiceError::ResourceExhausted(m),
        Code::Internal | Code::InvalidArgument => ServiceError::InvalidArgument(m),
        _ => ServiceError::Cancelled(m),
    }
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::InvalidArgument(m) => Status::invalid_argument(m),
            ServiceError::NotFound(m) => Status::not_found(m),
            ServiceError::AlreadyExists(m) => Status::already_exists(m),
            ServiceError::FailedPrecondition(m) => Status::failed_precondition(m),
            ServiceError::ResourceExhausted(m) => Status::resource_exhausted(m),
            ServiceError::DeadlineExceeded(m) => Status::deadline_exceeded(m),
            ServiceError::Cancelled(m) => Status::cancelled(m),
            ServiceError::Unavailable(m) => Status::unavailable(m),
            ServiceError::Internal(m) => Status::internal(m),
        }
    }
}
