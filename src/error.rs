//! Every way a call can fail, as data. Which gRPC status each becomes is decided in one
//! place, `service::error`.

use tonic::Code;

use crate::kernel::KernelError;

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

    /// The status code this error is answered with.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::NotFound(_) => Code::NotFound,
            Self::AlreadyExists(_) => Code::AlreadyExists,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::ResourceExhausted(_) => Code::ResourceExhausted,
            Self::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Self::Cancelled(_) => Code::Cancelled,
            Self::Unavailable(_) => Code::Unavailable,
            Self::Internal(_) => Code::Internal,
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
            | KernelError::BufferLength { .. }
            | KernelError::Invalid { .. } => Self::InvalidArgument(format!("{field}: {e}")),
            KernelError::ZeroThreads => Self::Internal(format!("server misconfigured: {e}")),
            // The server never forces a strategy or GEMM, so this is a server bug.
            KernelError::Unsupported { .. } => Self::Internal(format!("{field}: {e}")),
            KernelError::Cancelled => Self::Cancelled("the call was cancelled".into()),
        }
    }
}
