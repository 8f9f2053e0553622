//! The RAM record's body (`docs/stream-format.md` §5) and, from version 5, its batch framing
//! (§5.1): the batch header (channel, sync generation, per-channel sequence) and the CRC-32C
//! trailer. The writer numbers batches with a [`BatchNumbering`]; the reader checks them with a
//! [`BatchTracker`], checksum first, and validates the page table with [`check_table`].

use super::error::WireError;
use super::format::{page_kind, Cursor, BATCH_CHANNELS, BATCH_HEADER_LEN, RAM_ENTRY_LEN};
use super::record::Command;

/// Where a version-5 RAM batch belongs: the connection it was written to, the sync generation
/// whose pages it carries, and its place in its channel's sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchHeader {
    /// The connection the batch was written to (0 = the main stream).
    pub channel: u16,
    /// 1 + the number of sync points (`ITERATION_END`, `SWITCHOVER_START`) before the batch.
    pub generation: u32,
    /// The batch's sequence on its channel, from 0.
    pub seq: u64,
}

impl BatchHeader {
    /// The 16 header bytes (`u16 channel`, `u16 flags` = 0, `u32 generation`, `u64 seq`).
    pub(crate) fn encode(&self) -> [u8; BATCH_HEADER_LEN] {
        let mut h = [0u8; BATCH_HEADER_LEN];
        h[0..2].copy_from_slice(&self.channel.to_le_bytes());
        h[4..8].copy_from_slice(&self.generation.to_le_bytes());
        h[8..16].copy_from_slice(&self.seq.to_le_bytes());
        h
    }
}

/// The CRC-32C (Castagnoli) of a version-5 RAM batch, fed piece by piece as the writer writes
/// them. `crc-fast` folds with PCLMULQDQ (VPCLMULQDQ with AVX-512) on Intel and AMD alike: about
/// twice the `crc32c` crate's speed (SSE4.2 `crc32`) on 4 KiB pieces here (decision 131).
pub(crate) struct BatchCrc(crc_fast::Digest);

impl BatchCrc {
    pub(crate) fn new() -> Self {
        Self(crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi))
    }

    pub(crate) fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub(crate) fn value(&self) -> u32 {
        // A CRC-32's state fits in 32 bits.
        self.0.finalize() as u32
    }
}

/// True for the commands that end a sync generation (§5.1).
fn is_sync_point(command: &Command) -> bool {
    matches!(
        command,
        Command::IterationEnd { .. } | Command::SwitchoverStart
    )
}

/// The writer's side: the generation and sequence of the next batch on the main stream.
#[derive(Clone, Debug)]
pub(crate) struct BatchNumbering {
    generation: u32,
    next_seq: u64,
}

impl BatchNumbering {
    pub(crate) fn new() -> Self {
        Self {
            generation: 1,
            next_seq: 0,
        }
    }

    /// The header of the next batch (not yet counted: see [`BatchNumbering::written`]).
    pub(crate) fn next(&self) -> BatchHeader {
        BatchHeader {
            channel: 0,
            generation: self.generation,
            seq: self.next_seq,
        }
    }

    /// The batch [`BatchNumbering::next`] described was written.
    pub(crate) fn written(&mut self) {
        self.next_seq += 1;
    }

    /// `command` was written on the main stream.
    pub(crate) fn command_written(&mut self, command: &Command) {
        if is_sync_point(command) {
            self.generation = self.generation.saturating_add(1);
        }
    }
}

/// The reader's side: the current sync generation and the next sequence expected on each
/// channel. Only the main stream exists today (channel 0).
#[derive(Clone, Debug)]
pub(crate) struct BatchTracker {
    generation: u32,
    next_seq: [u64; BATCH_CHANNELS as usize],
}

impl BatchTracker {
    pub(crate) fn new() -> Self {
        Self {
            generation: 1,
            next_seq: [0; BATCH_CHANNELS as usize],
        }
    }

    /// A command was read on the main stream.
    pub(crate) fn command_read(&mut self, command: &Command) {
        if is_sync_point(command) {
            self.generation = self.generation.saturating_add(1);
        }
    }

    /// Checks a version-5 RAM record read from `channel`: its CRC-32C over `frame` and `body`
    /// first, then channel, flags, generation and sequence. Returns the header and the part of
    /// the body between the header and the trailer (`u32 count`, table, data). The caller
    /// checked `body.len() >= BATCH_OVERHEAD + 4` at the frame.
    pub(crate) fn check<'b>(
        &mut self,
        channel: u16,
        frame: &[u8],
        body: &'b [u8],
        frame_at: u64,
    ) -> Result<(BatchHeader, &'b [u8]), WireError> {
        let expected_seq = self
            .next_seq
            .get(usize::from(channel))
            .copied()
            .unwrap_or(0);
        let trailer_at = body.len().saturating_sub(4);
        let (covered, trailer) = body.split_at(trailer_at);
        let mut t = [0u8; 4];
        t.copy_from_slice(trailer);
        let expected = u32::from_le_bytes(t);
        let mut crc = BatchCrc::new();
        crc.update(frame);
        crc.update(covered);
        let actual = crc.value();
        if actual != expected {
            return Err(WireError::BatchChecksumMismatch {
                channel,
                seq: expected_seq,
                offset: frame_at,
                expected,
                actual,
            });
        }
        let body_at = frame_at + frame.len() as u64;
        let mut c = Cursor::new(covered, body_at, "ram");
        let claimed_channel = c.u16("batch channel")?;
        let flags = c.u16("batch flags")?;
        let generation = c.u32("batch generation")?;
        let seq = c.u64("batch sequence")?;
        if claimed_channel != channel || claimed_channel >= BATCH_CHANNELS {
            return Err(WireError::Invalid {
                field: "batch channel",
                offset: body_at,
                reason: format!(
                    "{claimed_channel}: the batch arrived on channel {channel} and this \
                     destination reads {BATCH_CHANNELS} channel(s)"
                ),
            });
        }
        if flags != 0 {
            return Err(WireError::Invalid {
                field: "batch flags",
                offset: body_at + 2,
                reason: format!("{flags:#x}, reserved bits must be 0"),
            });
        }
        if generation != self.generation {
            let when = if generation < self.generation {
                "before"
            } else {
                "after"
            };
            return Err(WireError::BatchOutOfOrder {
                channel,
                offset: frame_at,
                reason: format!(
                    "generation {generation}, the stream is at generation {}: a batch from \
                     {when} a sync point (ITERATION_END / SWITCHOVER_START)",
                    self.generation
                ),
            });
        }
        if seq != expected_seq {
            let what = if seq < expected_seq {
                "a duplicate or replayed batch".to_owned()
            } else {
                format!("{} batch(es) lost", seq - expected_seq)
            };
            return Err(WireError::BatchOutOfOrder {
                channel,
                offset: frame_at,
                reason: format!("sequence {seq}, expected {expected_seq}: {what}"),
            });
        }
        if let Some(n) = self.next_seq.get_mut(usize::from(channel)) {
            *n += 1;
        }
        let header = BatchHeader {
            channel,
            generation,
            seq,
        };
        Ok((header, covered.get(BATCH_HEADER_LEN..).unwrap_or(&[])))
    }
}

/// Where a RAM body in the version-1 layout sits in its record: its stream offset, the offset
/// of the frame's `len` field, and the bytes of framing around it in the record body (0, or
/// version 5's header and trailer).
#[derive(Clone, Copy, Debug)]
pub(crate) struct TableAt {
    pub(crate) body_at: u64,
    pub(crate) len_field_at: u64,
    pub(crate) overhead: u64,
}

/// Validates a RAM body in the version-1 layout (`u32 count`, entry table, page data) against
/// the CONFIG's blocks (`block_pages`) and the batch limit. Returns `(count, normal pages)`.
pub(crate) fn check_table(
    body: &[u8],
    at: TableAt,
    block_pages: &[u64],
    max_pages_per_batch: u32,
    page_size: usize,
) -> Result<(usize, usize), WireError> {
    let (count, normal) = check_entries(body, at.body_at, block_pages, max_pages_per_batch)?;
    let expected = 4 + (count * RAM_ENTRY_LEN) as u64 + (normal as u64) * page_size as u64;
    if expected != body.len() as u64 {
        return Err(WireError::LengthMismatch {
            what: "ram record",
            offset: at.len_field_at,
            len: body.len() as u64 + at.overhead,
            expected: expected + at.overhead,
        });
    }
    Ok((count, normal))
}

/// Validates the `u32 count` and the entry table at the start of `body` (what follows the
/// table is the caller's: page data, or version 7's compressed data). Returns
/// `(count, normal pages)`.
pub(crate) fn check_entries(
    body: &[u8],
    body_at: u64,
    block_pages: &[u64],
    max_pages_per_batch: u32,
) -> Result<(usize, usize), WireError> {
    let mut c = Cursor::new(body, body_at, "ram");
    let count = c.u32("page count")?;
    if count == 0 || count > max_pages_per_batch {
        return Err(WireError::Invalid {
            field: "page count",
            offset: body_at,
            reason: format!("{count} not in 1..={max_pages_per_batch}"),
        });
    }
    let table_at = c.offset();
    let table = c.take(count as usize * RAM_ENTRY_LEN, "page table")?;
    let mut normal = 0usize;
    for (i, e) in table.chunks_exact(RAM_ENTRY_LEN).enumerate() {
        let at = table_at + (i * RAM_ENTRY_LEN) as u64;
        let mut ec = Cursor::new(e, at, "ram");
        let page = ec.u32("page index")?;
        let block = ec.u16("block index")?;
        let kind = ec.u8("page kind")?;
        let reserved = ec.u8("reserved")?;
        let Some(&npages) = block_pages.get(usize::from(block)) else {
            return Err(WireError::PageOutOfRange {
                block: u32::from(block),
                page: u64::from(page),
                reason: format!("the stream has {} RAM blocks", block_pages.len()),
                offset: at,
            });
        };
        if u64::from(page) >= npages {
            return Err(WireError::PageOutOfRange {
                block: u32::from(block),
                page: u64::from(page),
                reason: format!("block has {npages} pages"),
                offset: at,
            });
        }
        match kind {
            page_kind::NORMAL => normal += 1,
            page_kind::ZERO => {}
            page_kind::COMPRESSED => {
                return Err(WireError::UnsupportedPageKind {
                    kind,
                    name: "compressed",
                    offset: at + 6,
                })
            }
            _ => {
                return Err(WireError::BadPageKind {
                    kind,
                    offset: at + 6,
                })
            }
        }
        if reserved != 0 {
            return Err(WireError::Invalid {
                field: "page entry reserved byte",
                offset: at + 7,
                reason: format!("{reserved:#x}, must be 0"),
            });
        }
    }
    Ok((count as usize, normal))
}
