//! Tern's migration stream format: one format for snapshot files and live migration
//! (spec: `docs/stream-format.md`).
//!
//! * [`StreamWriter`] encodes: header + CONFIG, then sections, device chunks, RAM batches
//!   (from version 5 each with its own CRC-32C, channel, generation and sequence), commands,
//!   then END with a CRC-32 of everything since the header (but RAM batches, from version 5).
//! * [`StreamReader`] decodes hostile input into [`Record`]s, checked against [`Limits`] and
//!   the destination's [`Expectations`]; RAM page data are handed out as slices.
//! * [`RpMessage`] / [`ReturnPathReader`]: the destination → source return path.
//! * [`analyze`]: JSON description of a stream (`tern analyze-stream`).

mod analyze;
mod channel;
mod command;
mod compress;
mod config;
mod error;
mod format;
mod multifd_order;
mod postcopy;
mod ram_batch;
mod reader;
mod record;
mod return_path;
mod writer;

#[cfg(test)]
mod batch_tests;
#[cfg(test)]
mod channel_test_support;
#[cfg(test)]
mod channel_tests;
#[cfg(test)]
mod compress_tests;
#[cfg(test)]
mod digest_tests;
#[cfg(test)]
mod early_discard_tests;
#[cfg(test)]
mod fuzz_channel_tests;
#[cfg(test)]
mod fuzz_support;
#[cfg(test)]
mod fuzz_tests;
#[cfg(test)]
mod hostile_tests;
#[cfg(test)]
mod multifd_postcopy_tests;
#[cfg(test)]
mod postcopy_tests;
#[cfg(test)]
mod preempt_tests;
#[cfg(test)]
mod recovery_tests;
#[cfg(test)]
mod tests;

pub use analyze::{analyze, analyze_file};
pub use channel::{ChannelExpect, ChannelHandshake, ChannelReader, ChannelRecord, ChannelWriter};
pub use compress::{BatchCompressor, BatchDecompressor, Compression};
pub use config::{ComponentVersion, CpuidEntry, Expectations, RamBlockInfo, StreamConfig};
pub use error::WireError;
pub use format::{
    cmd, is_zero_page, page_kind, Limits, RecordKind, BATCH_CHANNELS, BATCH_FLAG_KEEPALIVE,
    BATCH_FLAG_SYNC, CHANNEL_HANDSHAKE_LEN, CHANNEL_MAGIC, CURRENT_VERSION, HEADER_LEN, MAGIC,
    MAX_MULTIFD_CHANNELS, VERSION_1, VERSION_BATCH_INTEGRITY, VERSION_COMPRESSION,
    VERSION_EARLY_DISCARD, VERSION_MULTIFD, VERSION_MULTIFD_POSTCOPY, VERSION_POSTCOPY,
    VERSION_PREEMPT, VERSION_RAM_DIGEST, VERSION_RECOVERY,
};
pub use ram_batch::BatchHeader;
pub use reader::{Header, StreamReader};
pub use record::{
    Command, ComponentRecord, EndRecord, PageData, RamBatch, RamDiscard, RamPage, RamPages, Record,
};
pub use return_path::{
    rp_type, ReturnPathReader, RpMessage, RP_MAX_BITMAP_BYTES, RP_MAX_LEN, RP_MAX_REQ_PAGES,
};
pub use writer::StreamWriter;
