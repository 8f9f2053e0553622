//! tern-qmp: QEMU's QMP wire protocol (server and blocking client), independent of any VM.
//!
//! See `docs/qmp.md` for the protocol subset, limits and error texts.

mod args;
mod builtins;
mod client;
mod client_schema;
mod conn;
mod error;
mod events;
mod framer;
mod introspect;
mod json;
mod request;
pub mod schema;
mod server;
mod wire;

pub use args::{no_args, parse_args};
pub use client::QmpClient;
pub use client_schema::QmpSchema;
pub use error::{ClientError, ErrorClass, QmpError, ServerError};
pub use events::EventSink;
pub use server::{AfterReply, ClientCtx, Dispatcher, Limits, QmpServer, ServerConfig};
pub use wire::QemuVersion;
