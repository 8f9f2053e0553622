//! QMP error classes and the error type a command returns.

use std::fmt;

/// The `class` member of a QMP error reply (QEMU's `QapiErrorClass`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Everything that is not one of the specific classes below.
    GenericError,
    /// Unknown command, or command not available in the current mode.
    CommandNotFound,
    /// The device exists but is not active.
    DeviceNotActive,
    /// The device does not exist.
    DeviceNotFound,
    /// The KVM host lacks a capability the request needs.
    KvmMissingCap,
}

impl ErrorClass {
    /// The name as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KvmMissingCap => "KVMMissingCap",
        }
    }

    /// Parses a wire name; unknown names map to `GenericError` (QEMU may grow classes).
    pub fn from_wire(s: &str) -> ErrorClass {
        match s {
            "CommandNotFound" => ErrorClass::CommandNotFound,
            "DeviceNotActive" => ErrorClass::DeviceNotActive,
            "DeviceNotFound" => ErrorClass::DeviceNotFound,
            "KVMMissingCap" => ErrorClass::KvmMissingCap,
            _ => ErrorClass::GenericError,
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A QMP error: what goes into `{"error": {"class": ..., "desc": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{class}: {desc}")]
pub struct QmpError {
    /// Error class.
    pub class: ErrorClass,
    /// Human-readable description (QEMU's `desc`).
    pub desc: String,
}

impl QmpError {
    /// An error of any class.
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        QmpError {
            class,
            desc: desc.into(),
        }
    }

    /// `GenericError`.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::GenericError, desc)
    }

    /// `CommandNotFound`.
    pub fn command_not_found(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::CommandNotFound, desc)
    }

    /// `DeviceNotActive`.
    pub fn device_not_active(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::DeviceNotActive, desc)
    }

    /// `DeviceNotFound`.
    pub fn device_not_found(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::DeviceNotFound, desc)
    }

    /// `KVMMissingCap`.
    pub fn kvm_missing_cap(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::KvmMissingCap, desc)
    }
}

/// Errors from starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Another process is accepting connections on the socket path.
    #[error("QMP socket {0} is in use by another process")]
    AddrInUse(String),
    /// The dispatcher's tables give one type name to two different types (a programming
    /// error: `query-qmp-schema` could describe only one of them).
    #[error("QMP schema: type name(s) {0:?} given to different types")]
    SchemaClash(Vec<&'static str>),
    /// Socket or thread creation failed.
    #[error("QMP server I/O error on {path}: {source}")]
    Io {
        /// The socket path.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Errors seen by [`crate::QmpClient`].
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Socket I/O failed.
    #[error("QMP I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The server closed the connection.
    #[error("QMP connection closed by the server")]
    Closed,
    /// Nothing matching arrived in time.
    #[error("timed out waiting for {0}")]
    Timeout(String),
    /// The server sent something that is not valid QMP.
    #[error("QMP protocol error: {0}")]
    Protocol(String),
    /// The server answered the command with an error reply.
    #[error(transparent)]
    Qmp(#[from] QmpError),
}
