//! Constants, limits and the bounded byte cursor shared by the encoder and the decoder.
//! Layouts are specified in `docs/stream-format.md`.

use super::error::WireError;

/// Stream magic, `"TERNMIG\0"`.
pub const MAGIC: [u8; 8] = *b"TERNMIG\0";
/// Newest stream version this code reads and writes; the reader accepts `1..=CURRENT_VERSION`.
/// A writer writes the lowest version whose records it uses (`docs/stream-format.md` §10).
pub const CURRENT_VERSION: u32 = 8;
/// The version of a stream without any version-2 record.
pub const VERSION_1: u32 = 1;
/// The version that added `RAM_DIGEST` (and `CAPABILITIES` bit 3).
pub const VERSION_RAM_DIGEST: u32 = 2;
/// The version that added post-copy (`RAM_DISCARD`, commands 0x10..=0x12, `CAPABILITIES` bit 4).
pub const VERSION_POSTCOPY: u32 = 3;
/// The version that made every RAM record self-checking and self-describing: a batch header
/// (channel, sync generation, per-channel sequence) and a CRC-32C trailer; END's CRC leaves RAM
/// records out (`docs/stream-format.md` §5.1). Version 4 is post-copy recovery.
pub const VERSION_BATCH_INTEGRITY: u32 = 5;
/// Bytes of the batch header at the start of a version-5 RAM body (`u16 channel`, `u16 flags`,
/// `u32 generation`, `u64 seq`), before `u32 count`.
pub const BATCH_HEADER_LEN: usize = 16;
/// Bytes a version-5 RAM body adds to the version-1 layout: the batch header and the `u32
/// crc32c` trailer.
pub const BATCH_OVERHEAD: usize = BATCH_HEADER_LEN + 4;
/// Connections a reader of the main stream accepts RAM batches from: the main stream only
/// (multifd channels are read by [`super::ChannelReader`], `docs/stream-format.md` §5.2).
pub const BATCH_CHANNELS: u16 = 1;
/// The version that added multifd (`docs/stream-format.md` §5.2): `CAPABILITIES` bit 6,
/// `MULTIFD_CHANNELS`, the channel handshake and the batch flags `SYNC` / `KEEPALIVE`.
/// Written only when the `multifd` capability is on.
pub const VERSION_MULTIFD: u32 = 6;
/// First 8 bytes of a multifd channel, `"TERNMFD\0"`.
pub const CHANNEL_MAGIC: [u8; 8] = *b"TERNMFD\0";
/// Bytes of a multifd channel's handshake.
pub const CHANNEL_HANDSHAKE_LEN: usize = 32;
/// Most multifd channels (QEMU's `multifd-channels` range is 1..=255).
pub const MAX_MULTIFD_CHANNELS: u16 = 255;
/// Batch flag (version 6, multifd channels only): the channel sent every batch of the
/// generation (QEMU's `MULTIFD_FLAG_SYNC`); no pages.
pub const BATCH_FLAG_SYNC: u16 = 1;
/// Batch flag (version 6, multifd channels only): an idle channel's keepalive; no pages.
pub const BATCH_FLAG_KEEPALIVE: u16 = 2;
/// Batch flag (version 7, multifd channels with `multifd-compression` only): the page data is
/// one zlib stream / zstd frame after a `u32 raw_len` (`docs/stream-format.md` §5.3).
pub const BATCH_FLAG_COMPRESSED: u16 = 4;
/// The version that added post-copy recovery (commands 0x13, 0x14; return-path `RECV_BITMAP`,
/// `RESUME_ACK`): written only on a recovery channel (§13.6).
pub const VERSION_RECOVERY: u32 = 4;
/// The version that added the post-copy preempt channel (command 0x15 `POSTCOPY_PREEMPT`,
/// `CAPABILITIES` bit 5, return-path `PREEMPT_ACK`; `docs/stream-format.md` §13.8): written
/// only when `postcopy-preempt` is on.
pub const VERSION_PREEMPT: u32 = 6;
/// The version that made RAM_DISCARD legal during pre-copy after `POSTCOPY_ADVISE` (the early
/// post-copy discard, `docs/stream-format.md` §13.3): written whenever `postcopy-ram` is on.
pub const VERSION_EARLY_DISCARD: u32 = 7;
/// The version that added compressed multifd batches (`MULTIFD_CHANNELS`' compression byte,
/// batch flag `COMPRESSED`; `docs/stream-format.md` §5.3): written when `multifd-compression`
/// is not `none`.
pub const VERSION_COMPRESSION: u32 = 7;
/// The version that allowed `multifd` together with `postcopy-ram` (`MULTIFD_END`,
/// `docs/stream-format.md` §5.4): written only when both are on.
pub const VERSION_MULTIFD_POSTCOPY: u32 = 8;
/// Size of the header (magic, version, flags). Not covered by the checksum.
pub const HEADER_LEN: u64 = 16;
/// Size of a record frame (`u8 kind`, `u32 len`).
pub const FRAME_LEN: usize = 5;
/// Size of one RAM entry in a batch table.
pub const RAM_ENTRY_LEN: usize = 8;
/// Body length of the END record.
pub const END_BODY_LEN: usize = 12;
/// Largest COMMAND body.
pub const MAX_COMMAND_LEN: u32 = 64;
/// Smallest and largest page size accepted in a CONFIG record.
pub const MIN_PAGE_SIZE: u32 = 4096;
/// Largest page size accepted in a CONFIG record.
pub const MAX_PAGE_SIZE: u32 = 2 << 20;

/// Record kinds (first byte of every record frame).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    /// Configuration section, first record.
    Config = 0x01,
    /// Complete state of one component.
    Section = 0x02,
    /// One chunk of an iterative device's pre-copy data.
    DeviceChunk = 0x03,
    /// A batch of RAM pages.
    Ram = 0x04,
    /// A command (iteration end, open return path, ping, switchover start).
    Command = 0x05,
    /// End marker with the checksum.
    End = 0x06,
    /// Digest of the source's guest memory at the switchover (version 2).
    RamDigest = 0x07,
    /// Re-dirtied pages the destination must drop before post-copy (version 3).
    RamDiscard = 0x08,
}

impl RecordKind {
    /// Decodes a kind byte.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0x01 => Self::Config,
            0x02 => Self::Section,
            0x03 => Self::DeviceChunk,
            0x04 => Self::Ram,
            0x05 => Self::Command,
            0x06 => Self::End,
            0x07 => Self::RamDigest,
            0x08 => Self::RamDiscard,
            _ => return None,
        })
    }

    /// Lower-case name used in errors and in `analyze` output.
    pub fn name(self) -> &'static str {
        match self {
            Self::Config => "config",
            Self::Section => "section",
            Self::DeviceChunk => "device-chunk",
            Self::Ram => "ram",
            Self::Command => "command",
            Self::End => "end",
            Self::RamDigest => "ram-digest",
            Self::RamDiscard => "ram-discard",
        }
    }
}

/// Page kinds in a RAM entry.
pub mod page_kind {
    /// `page_size` bytes of data follow in the data area.
    pub const NORMAL: u8 = 0;
    /// All-zero page, no data.
    pub const ZERO: u8 = 1;
    /// Reserved for zstd-compressed pages (rejected by version 1 readers).
    pub const COMPRESSED: u8 = 2;
}

/// Command numbers (COMMAND record, `u16 cmd`).
pub mod cmd {
    /// End of one dirty pass, `u64 pass`.
    pub const ITERATION_END: u16 = 1;
    /// The destination must open the return path.
    pub const OPEN_RETURN_PATH: u16 = 2;
    /// `u32 seq`, answered by PONG.
    pub const PING: u16 = 3;
    /// The source stopped; final state follows.
    pub const SWITCHOVER_START: u16 = 4;
    /// `u32 flags`: the source's migration capabilities that both sides must agree on.
    pub const CAPABILITIES: u16 = 5;
    /// `CAPABILITIES` flag: `switchover-ack` is on at the source (and the channel has a return
    /// path).
    pub const CAP_SWITCHOVER_ACK: u32 = 1;
    /// `CAPABILITIES` flag: `validate-uuid` is on at the source; the destination compares the
    /// UUIDs whatever its own setting.
    pub const CAP_VALIDATE_UUID: u32 = 2;
    /// `CAPABILITIES` flag (version 2): `x-tern-ram-digest` is on at the source; a RAM_DIGEST
    /// record precedes END.
    pub const CAP_RAM_DIGEST: u32 = 8;
    /// `CAPABILITIES` flag (version 3): `postcopy-ram` is on at the source; `POSTCOPY_ADVISE`
    /// follows.
    pub const CAP_POSTCOPY_RAM: u32 = 0x10;
    /// `CAPABILITIES` flag (version 6): `postcopy-preempt` is on at the source (only with
    /// `CAP_POSTCOPY_RAM`); a preempt channel carries the requested pages (§13.8).
    pub const CAP_POSTCOPY_PREEMPT: u32 = 0x20;
    /// `CAPABILITIES` flag (version 6): `multifd` is on at the source; `MULTIFD_CHANNELS`
    /// follows.
    pub const CAP_MULTIFD: u32 = 0x40;
    /// Every `CAPABILITIES` flag this reader knows.
    pub const CAP_KNOWN: u32 = CAP_SWITCHOVER_ACK
        | CAP_VALIDATE_UUID
        | CAP_RAM_DIGEST
        | CAP_POSTCOPY_RAM
        | CAP_POSTCOPY_PREEMPT
        | CAP_MULTIFD;
    /// Multifd (version 6): `u16 channels`, `u16 reserved`, 16-byte migration id.
    pub const MULTIFD_CHANNELS: u16 = 0x20;
    /// Multifd with post-copy (version 8, §5.4): every channel delivered its final `SYNC` and
    /// ended; no body.
    pub const MULTIFD_END: u16 = 0x21;
    /// `u8 running`: whether the source VM was running when the migration stopped it (QEMU's
    /// global-state run state): a paused guest stays paused on the destination.
    pub const RUN_STATE: u16 = 6;
    /// Post-copy setup (version 3): `u32 page_size`, `u32 reserved`.
    pub const POSTCOPY_ADVISE: u16 = 0x10;
    /// The switch to post-copy (version 3): register the missing pages, start requesting.
    pub const POSTCOPY_LISTEN: u16 = 0x11;
    /// The device package is complete (version 3): `u32 crc32`, `u64 total_bytes`.
    pub const POSTCOPY_RUN: u16 = 0x12;
    /// Post-copy recovery (version 4): `u16 block`, `u16 reserved`; answered by the
    /// destination's received bitmap of that block.
    pub const RECV_BITMAP: u16 = 0x13;
    /// Post-copy recovery (version 4): the source re-queued what the destination lacks.
    pub const POSTCOPY_RESUME: u16 = 0x14;
    /// The preempt channel (version 6): `u8 token[16]`; on the main or a recovery channel it
    /// announces the preempt channel, as a preempt channel's first record it identifies it.
    pub const POSTCOPY_PREEMPT: u16 = 0x15;
    /// First post-copy command.
    pub const POSTCOPY_FIRST: u16 = 0x10;
    /// Last reserved post-copy command.
    pub const POSTCOPY_LAST: u16 = 0x1f;
}

/// What the reader accepts. Every length, count and size in a stream is checked against these
/// before anything is allocated or read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest CONFIG body.
    pub max_config_size: u32,
    /// Largest SECTION / DEVICE_CHUNK body.
    pub max_section_size: u32,
    /// Longest id string.
    pub max_string_len: usize,
    /// Most pages in one RAM record.
    pub max_pages_per_batch: u32,
    /// Most RAM blocks in the CONFIG.
    pub max_ram_blocks: u16,
    /// Most vCPUs in the CONFIG.
    pub max_vcpus: u32,
    /// Most CPUID entries in the CONFIG.
    pub max_cpuid_entries: u16,
    /// Largest opaque machine blob in the CONFIG.
    pub max_machine_blob: u32,
    /// Longest return-path ERROR text.
    pub max_error_len: usize,
    /// Most SECTION records in a stream (the destination keeps them until END).
    pub max_sections: u32,
    /// Most bytes of all SECTION bodies together.
    pub max_section_bytes_total: u64,
    /// Largest RAM_DIGEST body.
    pub max_digest_size: u32,
    /// Most ranges in one RAM_DISCARD record.
    pub max_discard_ranges: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_config_size: 4 << 20,
            max_section_size: 64 << 20,
            max_string_len: 255,
            max_pages_per_batch: 1024,
            max_ram_blocks: 64,
            max_vcpus: 1024,
            max_cpuid_entries: 512,
            max_machine_blob: 1 << 20,
            max_error_len: 4096,
            max_sections: 4096,
            max_section_bytes_total: 256 << 20,
            max_digest_size: 16 << 20,
            max_discard_ranges: 65536,
        }
    }
}

impl Limits {
    /// Largest RAM record body for `page_size` (in the largest layout, version 5's), or `None`
    /// on overflow.
    pub fn max_ram_body(&self, page_size: u32) -> Option<u64> {
        let n = u64::from(self.max_pages_per_batch);
        n.checked_mul(u64::from(page_size) + RAM_ENTRY_LEN as u64)?
            .checked_add(4 + BATCH_OVERHEAD as u64)
    }
}

/// True when every byte of `page` is zero. Fast enough to run on every page sent.
pub fn is_zero_page(page: &[u8]) -> bool {
    let mut chunks = page.chunks_exact(64);
    for c in &mut chunks {
        let mut acc = 0u8;
        for b in c {
            acc |= *b;
        }
        if acc != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|b| *b == 0)
}

/// A bounds-checked little-endian reader over one record body. `base` is the stream offset of
/// `buf[0]`, so every error names an absolute byte offset.
pub(crate) struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    base: u64,
    record: &'static str,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(buf: &'a [u8], base: u64, record: &'static str) -> Self {
        Self {
            buf,
            pos: 0,
            base,
            record,
        }
    }

    /// Absolute stream offset of the next byte.
    pub(crate) fn offset(&self) -> u64 {
        self.base + self.pos as u64
    }

    pub(crate) fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or(WireError::ShortBody {
                record: self.record,
                what,
                offset: self.offset(),
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], WireError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.array::<1>(what)?[0])
    }

    pub(crate) fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    pub(crate) fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    pub(crate) fn bytes16(&mut self, what: &'static str) -> Result<[u8; 16], WireError> {
        self.array(what)
    }

    /// `str8`: `u8 len` + UTF-8, `1..=max` bytes.
    pub(crate) fn str8(&mut self, what: &'static str, max: usize) -> Result<&'a str, WireError> {
        let at = self.offset();
        let len = usize::from(self.u8(what)?);
        if len == 0 {
            return Err(WireError::Invalid {
                field: what,
                offset: at,
                reason: "empty string".into(),
            });
        }
        if len > max {
            return Err(WireError::TooLarge {
                what,
                len: len as u64,
                limit: max as u64,
                offset: at,
            });
        }
        let raw = self.take(len, what)?;
        std::str::from_utf8(raw).map_err(|e| WireError::Invalid {
            field: what,
            offset: at + 1,
            reason: format!("invalid UTF-8: {e}"),
        })
    }

    /// Fails unless the body was consumed exactly.
    pub(crate) fn finish(&self) -> Result<(), WireError> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(WireError::LengthMismatch {
                what: self.record,
                offset: self.offset(),
                len: self.buf.len() as u64,
                expected: self.pos as u64,
            })
        }
    }
}

/// Appends a `str8` to `out`; the caller checked the length.
pub(crate) fn put_str8(out: &mut Vec<u8>, s: &str) {
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}
