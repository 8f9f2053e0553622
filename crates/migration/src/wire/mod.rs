//! Stream format (see docs/stream-format.md).
