//! Tern's migration engine. It knows nothing of KVM: it drives a machine through the small
//! traits in [`machine`] and speaks the stream format of [`wire`] (spec: `docs/stream-format.md`).
//!
//! Module owners add their `pub mod` lines here; keep this file a table of contents.

pub mod wire;
