//! Every way a call can fail, and its gRPC status, in one place.

use tonic::{Code, Status};

use crate::kernel::KernelError;
use crate::pool::PoolError;

/// A failed call. Messages name the field and the expected vs received value; they never
/// contain voxel values, tokens or identifiers.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ServiceError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("{0}")]
    Cancelled(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl ServiceError {
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::InvalidArgument(msg.into())
    }

    /// The status code's name, for logs.
    pub fn code(&self) -> Code {
        Status::from(self.clone()).code()
    }

    /// The request stream failed while the input was being read: a message over the limit
    /// is RESOURCE_EXHAUSTED, one that does not decode INVALID_ARGUMENT, anything else (the
    /// client reset the stream, the connection broke) CANCELLED.
    pub fn input_stream(s: &Status) -> Self {
        let m = format!("input stream failed: {}", s.message());
        match s.code() {
            Code::OutOfRange | Code::ResourceExhausted => Self::ResourceExhausted(m),
            Code::Internal | Code::InvalidArgument => Self::InvalidArgument(m),
            _ => Self::Cancelled(m),
        }
    }

    /// A kernel error about the tensor in `field`.
    pub fn kernel(field: &str, e: KernelError) -> Self {
        match e {
            KernelError::ZeroStride { .. }
            | KernelError::ZeroDilation { .. }
            | KernelError::KernelTooLarge { .. }
            | KernelError::ChannelMismatch { .. }
            | KernelError::EmptyDimension { .. }
            | KernelError::Overflow { .. }
            | KernelError::BufferLength { .. } => Self::InvalidArgument(format!("{field}: {e}")),
            KernelError::ZeroThreads => Self::Internal(format!("server misconfigured: {e}")),
            KernelError::Cancelled => Self::Cancelled("the call was cancelled".into()),
        }
    }
}

impl From<PoolError> for ServiceError {
    fn from(e: PoolError) -> Self {
        match e {
            PoolError::QueueFull { .. } | PoolError::TooLarge { .. } => {
                Self::ResourceExhausted(e.to_string())
            }
            PoolError::Skipped => Self::Cancelled(e.to_string()),
            PoolError::Panicked => Self::Internal("internal error while computing".into()),
        }
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
