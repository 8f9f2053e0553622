//! The API's errors (libvirt's error codes, as an enum that travels over the wire).

use serde::{Deserialize, Serialize};

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// An error of the management API. Every variant carries a message that names what failed.
#[derive(Debug, Clone, thiserror::Error, Serialize, Deserialize, PartialEq, Eq)]
pub enum Error {
    /// `VIR_ERR_NO_DOMAIN`
    #[error("Domain not found: {0}")]
    NoDomain(String),
    /// `VIR_ERR_OPERATION_FAILED` for a duplicate name or UUID
    #[error("operation failed: {0}")]
    DomainExists(String),
    /// `VIR_ERR_XML_ERROR`
    #[error("XML error: {0}")]
    Xml(String),
    /// `VIR_ERR_OPERATION_INVALID`: not allowed in the domain's current state
    #[error("Requested operation is not valid: {0}")]
    OperationInvalid(String),
    /// `VIR_ERR_ARGUMENT_UNSUPPORTED` / `VIR_ERR_OPERATION_UNSUPPORTED`
    #[error("Operation not supported: {0}")]
    Unsupported(String),
    /// `VIR_ERR_OPERATION_FAILED`
    #[error("operation failed: {0}")]
    OperationFailed(String),
    /// `VIR_ERR_OPERATION_ABORTED`
    #[error("operation aborted: {0}")]
    Aborted(String),
    /// The VMM's monitor (QMP) failed or answered with an error
    #[error("internal error: monitor: {0}")]
    Monitor(String),
    /// Connecting to or talking to a daemon failed (`VIR_ERR_SYSTEM_ERROR` / `RPC`)
    #[error("Failed to connect to {uri}: {message}")]
    Connect { uri: String, message: String },
    /// The connection broke. `sent` says whether the request had been written out completely
    /// (then the peer may have acted on it) or not (then it certainly did not).
    #[error("RPC failure: {message}")]
    Rpc { message: String, sent: bool },
    /// `VIR_ERR_ACCESS_DENIED`
    #[error("access denied: {0}")]
    AccessDenied(String),
    /// `VIR_ERR_INVALID_ARG`
    #[error("invalid argument: {0}")]
    InvalidArg(String),
    /// `VIR_ERR_INTERNAL_ERROR`
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<virt_conf::ConfError> for Error {
    fn from(e: virt_conf::ConfError) -> Self {
        Error::Xml(e.to_string())
    }
}
