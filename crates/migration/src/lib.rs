//! Tern's migration engine. It knows nothing of KVM: it drives a machine through the small
//! traits in [`machine`] and speaks the stream format of [`wire`] (spec: `docs/stream-format.md`).
//!
//! Module owners add their `pub mod` lines here; keep this file a table of contents.

pub mod convergence;
pub mod dest;
pub mod digest;
pub mod events;
#[cfg(any(test, feature = "fakes"))]
pub mod fakes;
pub mod liveness;
pub mod machine;
pub mod params;
mod priority;
pub mod source;
pub mod stats;
pub mod status;
pub mod tap;
pub mod throttle;
pub mod transport;
pub mod wire;
