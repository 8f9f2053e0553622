//! Errors of the stream encoder/decoder. Every decode error names the byte offset (from the
//! start of the stream) of what was wrong.

use std::io;

/// Error of [`super::StreamReader`], [`super::StreamWriter`] and the return path.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// An I/O error other than end of input.
    #[error("I/O error at byte {offset} ({what})")]
    Io {
        /// Stream offset.
        offset: u64,
        /// What was being read or written.
        what: &'static str,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// End of input before a complete field.
    #[error("stream truncated at byte {offset}: expected {what}")]
    Truncated {
        /// Stream offset where the input ended.
        offset: u64,
        /// What was expected.
        what: &'static str,
    },
    /// The first 8 bytes are not `TERNMIG\0`.
    #[error("bad magic {found:02x?} at byte 0: not a Tern migration stream")]
    BadMagic {
        /// The bytes found.
        found: [u8; 8],
    },
    /// Stream version 0 or newer than this reader.
    #[error("unsupported stream version {found} at byte 8 (this reader supports 1..={supported})")]
    UnsupportedVersion {
        /// Version in the stream.
        found: u32,
        /// Newest version this reader supports.
        supported: u32,
    },
    /// A record kind byte this reader does not know.
    #[error("unknown record kind {kind:#04x} at byte {offset}")]
    UnknownRecordKind {
        /// The kind byte.
        kind: u8,
        /// Stream offset of the frame.
        offset: u64,
    },
    /// A length or count above its limit.
    #[error("{what} of {len} at byte {offset} exceeds the limit of {limit}")]
    TooLarge {
        /// The field.
        what: &'static str,
        /// The value found.
        len: u64,
        /// The limit.
        limit: u64,
        /// Stream offset of the field.
        offset: u64,
    },
    /// A field with an invalid value.
    #[error("invalid {field} at byte {offset}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Stream offset of the field.
        offset: u64,
        /// Why it is invalid.
        reason: String,
    },
    /// A record body ended before one of its fields.
    #[error("{record} record body too short at byte {offset}: missing {what}")]
    ShortBody {
        /// Record kind name.
        record: &'static str,
        /// Missing field.
        what: &'static str,
        /// Stream offset.
        offset: u64,
    },
    /// A record body length does not match its contents.
    #[error("{what} at byte {offset}: length {len} but its contents need {expected}")]
    LengthMismatch {
        /// Record (or field) name.
        what: &'static str,
        /// Stream offset.
        offset: u64,
        /// Length declared.
        len: u64,
        /// Length implied by the contents.
        expected: u64,
    },
    /// The stream's configuration does not match the destination.
    #[error("configuration mismatch: {0}")]
    ConfigMismatch(String),
    /// The first record is not CONFIG.
    #[error("expected the config record at byte {offset}, found record kind {kind:#04x}")]
    ConfigNotFirst {
        /// The kind found.
        kind: u8,
        /// Stream offset.
        offset: u64,
    },
    /// A second CONFIG record.
    #[error("duplicate config record at byte {offset}")]
    DuplicateConfig {
        /// Stream offset.
        offset: u64,
    },
    /// A record where the protocol does not allow it (a SECTION before `SWITCHOVER_START`, a
    /// second `SWITCHOVER_START`, a DEVICE_CHUNK after its component's SECTION).
    #[error("{record} record at byte {offset} out of order: {reason}")]
    OutOfOrder {
        /// Record kind name.
        record: &'static str,
        /// Stream offset of the record frame.
        offset: u64,
        /// What rule it breaks.
        reason: String,
    },
    /// A second SECTION for the same component instance.
    #[error("duplicate section '{id}' instance {instance} at byte {offset}")]
    DuplicateSection {
        /// Component id.
        id: String,
        /// Instance.
        instance: u32,
        /// Stream offset of the record frame.
        offset: u64,
    },
    /// A component the destination does not know.
    #[error("unknown component '{id}' instance {instance} at byte {offset}")]
    UnknownComponent {
        /// Component id.
        id: String,
        /// Instance.
        instance: u32,
        /// Stream offset.
        offset: u64,
    },
    /// A component version outside what the destination loads.
    #[error(
        "component '{id}' version {version} at byte {offset} is not supported \
         (this destination loads versions {min}..={max})"
    )]
    UnsupportedComponentVersion {
        /// Component id.
        id: String,
        /// Version found.
        version: u32,
        /// Oldest supported.
        min: u32,
        /// Newest supported.
        max: u32,
        /// Stream offset.
        offset: u64,
    },
    /// A RAM entry naming a block or page the destination does not have.
    #[error("RAM page out of range at byte {offset}: block {block} page {page} ({reason})")]
    PageOutOfRange {
        /// Block index.
        block: u32,
        /// Page index.
        page: u64,
        /// Why.
        reason: String,
        /// Stream offset of the entry.
        offset: u64,
    },
    /// A page kind reserved for a later version.
    #[error("page kind {kind} ({name}) at byte {offset} is not supported by this reader")]
    UnsupportedPageKind {
        /// Kind byte.
        kind: u8,
        /// Its name.
        name: &'static str,
        /// Stream offset.
        offset: u64,
    },
    /// An unknown page kind.
    #[error("unknown page kind {kind} at byte {offset}")]
    BadPageKind {
        /// Kind byte.
        kind: u8,
        /// Stream offset.
        offset: u64,
    },
    /// An unknown command.
    #[error("unknown command {cmd:#06x} at byte {offset}")]
    UnknownCommand {
        /// Command number.
        cmd: u16,
        /// Stream offset.
        offset: u64,
    },
    /// A command reserved for post-copy.
    #[error("command {cmd:#06x} at byte {offset} is reserved for post-copy and not supported")]
    UnsupportedCommand {
        /// Command number.
        cmd: u16,
        /// Stream offset.
        offset: u64,
    },
    /// The END record's checksum does not match the data.
    #[error(
        "checksum mismatch at byte {offset}: end record says {expected:#010x}, \
         computed {actual:#010x} over {bytes} bytes"
    )]
    ChecksumMismatch {
        /// CRC in the END record.
        expected: u32,
        /// CRC computed.
        actual: u32,
        /// Bytes covered.
        bytes: u64,
        /// Stream offset of the END record.
        offset: u64,
    },
    /// A RAM batch whose CRC-32C does not match its bytes (version 5): refused before any of its
    /// pages was handed out. `channel` is the connection it was read from and `seq` the
    /// sequence the reader expected there (the batch's own fields cannot be trusted).
    #[error(
        "RAM batch {seq} on channel {channel} at byte {offset}: checksum mismatch (the batch \
         says {expected:#010x}, its bytes give {actual:#010x}): corrupted in transit, refused \
         before any of its pages was placed"
    )]
    BatchChecksumMismatch {
        /// The connection the batch was read from (0 = the main stream).
        channel: u16,
        /// The sequence number the reader expected on that channel.
        seq: u64,
        /// Stream offset of the record frame.
        offset: u64,
        /// CRC-32C in the batch's trailer.
        expected: u32,
        /// CRC-32C of the batch's bytes.
        actual: u32,
    },
    /// A compressed multifd batch (version 7, §5.3) whose data cannot be what its table says:
    /// wrong uncompressed length, a decompression bomb, garbage, trailing bytes. Refused
    /// before any of its pages is placed.
    #[error(
        "RAM batch {seq} on channel {channel} at byte {offset}: compressed data refused: {reason}"
    )]
    BadCompressedBatch {
        /// The multifd channel the batch was read from.
        channel: u16,
        /// The batch's sequence on that channel.
        seq: u64,
        /// Stream offset of the record frame.
        offset: u64,
        /// What was wrong.
        reason: String,
    },
    /// A RAM batch (version 5) that is not the next one of its channel, or not of the current
    /// sync generation: lost, duplicated, replayed or reordered across a sync point.
    #[error("RAM batch at byte {offset} on channel {channel} out of order: {reason}")]
    BatchOutOfOrder {
        /// The connection the batch was read from.
        channel: u16,
        /// Stream offset of the record frame.
        offset: u64,
        /// What was expected and what came.
        reason: String,
    },
    /// `next_record` after END or after an error.
    #[error("stream already {0}")]
    Finished(&'static str),
    /// An unknown return-path message type.
    #[error("unknown return-path message type {ty} at byte {offset}")]
    UnknownMessage {
        /// Type.
        ty: u16,
        /// Offset in the return-path stream.
        offset: u64,
    },
    /// The caller passed something the format cannot encode (writer side).
    #[error("cannot encode: {0}")]
    InvalidArgument(String),
    /// The writer was asked for a RAM_DISCARD before `SWITCHOVER_START` (the early discard,
    /// §13.3) in a stream below version 7, which every reader of that version refuses.
    #[error(
        "cannot encode: a RAM_DISCARD before SWITCHOVER_START (an early discard) needs stream \
         version {needs}; this stream is version {version}"
    )]
    EarlyDiscardNeedsVersion {
        /// The stream's version.
        version: u32,
        /// The first version with the early discard.
        needs: u32,
    },
}

impl WireError {
    /// The stream offset the error refers to, when there is one.
    pub fn offset(&self) -> Option<u64> {
        match self {
            Self::Io { offset, .. }
            | Self::Truncated { offset, .. }
            | Self::UnknownRecordKind { offset, .. }
            | Self::TooLarge { offset, .. }
            | Self::Invalid { offset, .. }
            | Self::ShortBody { offset, .. }
            | Self::LengthMismatch { offset, .. }
            | Self::ConfigNotFirst { offset, .. }
            | Self::DuplicateConfig { offset }
            | Self::OutOfOrder { offset, .. }
            | Self::DuplicateSection { offset, .. }
            | Self::UnknownComponent { offset, .. }
            | Self::UnsupportedComponentVersion { offset, .. }
            | Self::PageOutOfRange { offset, .. }
            | Self::UnsupportedPageKind { offset, .. }
            | Self::BadPageKind { offset, .. }
            | Self::UnknownCommand { offset, .. }
            | Self::UnsupportedCommand { offset, .. }
            | Self::ChecksumMismatch { offset, .. }
            | Self::BatchChecksumMismatch { offset, .. }
            | Self::BatchOutOfOrder { offset, .. }
            | Self::BadCompressedBatch { offset, .. }
            | Self::UnknownMessage { offset, .. } => Some(*offset),
            Self::BadMagic { .. } => Some(0),
            Self::UnsupportedVersion { .. } => Some(8),
            Self::ConfigMismatch(_)
            | Self::Finished(_)
            | Self::InvalidArgument(_)
            | Self::EarlyDiscardNeedsVersion { .. } => None,
        }
    }

    /// Maps an I/O error from a read: end of input becomes [`WireError::Truncated`].
    pub(crate) fn read(offset: u64, what: &'static str, e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Self::Truncated { offset, what }
        } else {
            Self::Io {
                offset,
                what,
                source: e,
            }
        }
    }
}
