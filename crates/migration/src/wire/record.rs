//! Decoded records. Payloads borrow the reader's buffer: no copy per page or per section.

use super::compress::Compression;
use super::format::{page_kind, BATCH_OVERHEAD, RAM_ENTRY_LEN};
use super::ram_batch::BatchHeader;
use crate::digest::RamDigest;

/// One record of the stream, as returned by [`super::StreamReader::next_record`].
#[derive(Debug, PartialEq, Eq)]
pub enum Record<'a> {
    /// Complete state of one component.
    Section(ComponentRecord<'a>),
    /// One chunk of an iterative device's pre-copy data.
    DeviceChunk(ComponentRecord<'a>),
    /// A batch of RAM pages (already checked against the configuration).
    Ram(RamBatch<'a>),
    /// A command.
    Command(Command),
    /// The end marker; its checksum has been verified.
    End(EndRecord),
    /// The source's RAM digest at the switchover (shape checked against the CONFIG).
    RamDigest(RamDigest),
    /// Page ranges the destination must drop before post-copy (checked against the CONFIG).
    RamDiscard(RamDiscard),
}

impl Record<'_> {
    /// Lower-case record name (`section`, `device-chunk`, `ram`, `command`, `end`).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Section(_) => "section",
            Self::DeviceChunk(_) => "device-chunk",
            Self::Ram(_) => "ram",
            Self::Command(_) => "command",
            Self::End(_) => "end",
            Self::RamDigest(_) => "ram-digest",
            Self::RamDiscard(_) => "ram-discard",
        }
    }
}

/// A SECTION or DEVICE_CHUNK: opaque component data with id, instance and version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ComponentRecord<'a> {
    /// Component id.
    pub id: &'a str,
    /// Instance number.
    pub instance: u32,
    /// The component's state version.
    pub version: u32,
    /// The opaque state.
    pub data: &'a [u8],
}

/// Commands carried in the main stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// End of dirty pass `pass` (starting at 1).
    IterationEnd {
        /// Pass number.
        pass: u64,
    },
    /// The destination must open the return path.
    OpenReturnPath,
    /// Answer with `PONG{seq}` on the return path.
    Ping {
        /// Sequence number.
        seq: u32,
    },
    /// The source VM is stopped; the final RAM and device state follow.
    SwitchoverStart,
    /// The source's capabilities that must be set on both sides (QEMU has no such check and
    /// simply hangs when `switchover-ack` is set on one side only).
    Capabilities {
        /// `switchover-ack` is on at the source (and the channel has a return path).
        switchover_ack: bool,
        /// `validate-uuid` is on at the source: the destination compares the UUIDs.
        validate_uuid: bool,
        /// `x-tern-ram-digest` is on at the source: a RAM_DIGEST record precedes END.
        ram_digest: bool,
        /// `postcopy-ram` is on at the source (version 3): `POSTCOPY_ADVISE` follows.
        postcopy_ram: bool,
        /// `postcopy-preempt` is on at the source (version 6, only with `postcopy_ram`): the
        /// requested pages travel on a preempt channel (§13.8).
        postcopy_preempt: bool,
        /// `multifd` is on at the source (version 6): `MULTIFD_CHANNELS` follows.
        multifd: bool,
    },
    /// Multifd (version 6, right after `CAPABILITIES` bit 6): the source opens `channels`
    /// extra connections whose handshakes repeat `id` (`docs/stream-format.md` §5.2).
    MultifdChannels {
        /// Number of channels, 1 ..= 255.
        channels: u16,
        /// `multifd-compression` (version 7, §5.3): how the channels' page data is packed.
        compression: Compression,
        /// This migration's random id.
        id: [u8; 16],
    },
    /// Multifd with post-copy (version 8, §5.4): every channel sent its final `SYNC` and
    /// ended (the switch to post-copy); nothing is read from a channel after it.
    MultifdEnd,
    /// Post-copy setup (version 3); `page_size` equals the CONFIG's.
    PostcopyAdvise {
        /// The source's page size.
        page_size: u32,
    },
    /// The switch to post-copy (version 3): the device package follows.
    PostcopyListen,
    /// The device package is complete (version 3): checksum of the stream before this record.
    PostcopyRun {
        /// CRC-32 of every byte after the header up to this record's frame.
        crc32: u32,
        /// How many bytes those were.
        total_bytes: u64,
    },
    /// Post-copy recovery (version 4, recovery channel only): send the received bitmap of
    /// `block`.
    RecvBitmap {
        /// Block index.
        block: u16,
    },
    /// Post-copy recovery (version 4, recovery channel only): the source re-queued every page
    /// the destination lacks; answered by `RESUME_ACK`.
    PostcopyResume,
    /// The preempt channel (version 6, §13.8): on the main or a recovery channel, "a preempt
    /// channel with this token follows"; as a preempt channel's first record, "this is it".
    PostcopyPreempt {
        /// 16 random bytes drawn by the source for this preempt channel.
        token: [u8; 16],
    },
    /// Whether the source VM was running when the switchover stopped it.
    RunState {
        /// Running (the destination resumes it, autostart permitting) or paused (stays paused).
        running: bool,
    },
}

impl Command {
    /// Name used in `analyze` and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Self::IterationEnd { .. } => "iteration-end",
            Self::OpenReturnPath => "open-return-path",
            Self::Ping { .. } => "ping",
            Self::SwitchoverStart => "switchover-start",
            Self::Capabilities { .. } => "capabilities",
            Self::RunState { .. } => "run-state",
            Self::PostcopyAdvise { .. } => "postcopy-advise",
            Self::PostcopyListen => "postcopy-listen",
            Self::PostcopyRun { .. } => "postcopy-run",
            Self::RecvBitmap { .. } => "recv-bitmap",
            Self::PostcopyResume => "postcopy-resume",
            Self::PostcopyPreempt { .. } => "postcopy-preempt",
            Self::MultifdChannels { .. } => "multifd-channels",
            Self::MultifdEnd => "multifd-end",
        }
    }
}

/// The END record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndRecord {
    /// CRC-32 of every byte between the header and the END frame (verified by the reader).
    pub crc32: u32,
    /// Number of those bytes.
    pub total_bytes: u64,
}

/// The content of one page in a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageData<'a> {
    /// An all-zero page (no data on the wire).
    Zero,
    /// `page_size` bytes.
    Normal(&'a [u8]),
}

/// One page of a RAM batch: also the writer's input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamPage<'a> {
    /// Index of the block in the CONFIG record.
    pub block: u16,
    /// Page index inside the block.
    pub page: u32,
    /// Zero flag or data.
    pub data: PageData<'a>,
}

impl<'a> RamPage<'a> {
    /// A page with data.
    pub fn normal(block: u16, page: u32, data: &'a [u8]) -> Self {
        Self {
            block,
            page,
            data: PageData::Normal(data),
        }
    }

    /// An all-zero page.
    pub fn zero(block: u16, page: u32) -> Self {
        Self {
            block,
            page,
            data: PageData::Zero,
        }
    }
}

/// A validated RAM batch. Iterate with [`RamBatch::pages`]; page data are slices of the reader's
/// buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamBatch<'a> {
    pub(crate) table: &'a [u8],
    pub(crate) data: &'a [u8],
    pub(crate) page_size: usize,
    pub(crate) normal: usize,
    pub(crate) header: Option<BatchHeader>,
}

impl<'a> RamBatch<'a> {
    /// Number of pages in the batch.
    pub fn len(&self) -> usize {
        self.table.len() / RAM_ENTRY_LEN
    }

    /// True when the batch has no pages (never the case for a decoded batch).
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Version 5: the batch's channel, generation and sequence (checked by the reader, like its
    /// checksum); `None` in older streams.
    pub fn header(&self) -> Option<BatchHeader> {
        self.header
    }

    /// Bytes of the whole record on the wire, frame included.
    pub fn wire_len(&self) -> u64 {
        let framing = if self.header.is_some() {
            BATCH_OVERHEAD
        } else {
            0
        };
        (5 + framing + 4 + self.table.len() + self.data.len()) as u64
    }

    /// Pages with data.
    pub fn normal_pages(&self) -> usize {
        self.normal
    }

    /// Zero pages.
    pub fn zero_pages(&self) -> usize {
        self.len() - self.normal
    }

    /// Iterates over the pages in stream order.
    pub fn pages(&self) -> RamPages<'a> {
        RamPages {
            table: self.table,
            data: self.data,
            page_size: self.page_size,
        }
    }
}

/// Iterator over the pages of a [`RamBatch`].
#[derive(Clone, Debug)]
pub struct RamPages<'a> {
    table: &'a [u8],
    data: &'a [u8],
    page_size: usize,
}

impl<'a> Iterator for RamPages<'a> {
    type Item = RamPage<'a>;

    fn next(&mut self) -> Option<RamPage<'a>> {
        // The reader validated the table and the data length, so the `get`s below cannot fail;
        // they still end the iteration instead of panicking.
        let (entry, rest) = self.table.split_first_chunk::<RAM_ENTRY_LEN>()?;
        self.table = rest;
        let page = u32::from_le_bytes([entry[0], entry[1], entry[2], entry[3]]);
        let block = u16::from_le_bytes([entry[4], entry[5]]);
        let data = if entry[6] == page_kind::ZERO {
            PageData::Zero
        } else {
            let (d, rest) = self.data.split_at_checked(self.page_size)?;
            self.data = rest;
            PageData::Normal(d)
        };
        Some(RamPage { block, page, data })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.table.len() / RAM_ENTRY_LEN;
        (n, Some(n))
    }
}

impl ExactSizeIterator for RamPages<'_> {}

/// A RAM_DISCARD record (version 3): pages of one block the source sent before the switch and
/// found dirty again; the destination drops them so the running guest never reads them stale.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamDiscard {
    /// Index into the CONFIG's block list.
    pub block: u16,
    /// `(first_page, pages)`, ascending, not overlapping, inside the block, `pages >= 1`.
    pub ranges: Vec<(u32, u32)>,
}
