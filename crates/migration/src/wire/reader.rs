//! The stream decoder. Treats its input as hostile: every length, count, index and version is
//! checked before it is used, and nothing larger than a [`Limits`] bound is allocated.

use std::collections::HashSet;
use std::io::Read;

use super::command::parse_command;
use super::config::{Expectations, StreamConfig};
use super::error::WireError;
use super::format::{
    Cursor, Limits, RecordKind, BATCH_HEADER_LEN, BATCH_OVERHEAD, CURRENT_VERSION, END_BODY_LEN,
    FRAME_LEN, HEADER_LEN, MAGIC, MAX_COMMAND_LEN, RAM_ENTRY_LEN, VERSION_BATCH_INTEGRITY,
    VERSION_POSTCOPY, VERSION_PREEMPT, VERSION_RAM_DIGEST, VERSION_RECOVERY,
};
use super::multifd_order::MultifdOrder;
use super::postcopy::{max_discard_body, parse_discard, PostcopyOrder};
use super::ram_batch::{check_table, BatchHeader, BatchTracker, TableAt};
use super::record::{Command, ComponentRecord, EndRecord, RamBatch, RamDiscard, Record};
use crate::digest::{chunk_count, RamDigest, ALGORITHM_XXH3_64, MAX_CHUNK_SHIFT};

/// The stream header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Stream version.
    pub version: u32,
    /// Header flags (0 in version 1).
    pub flags: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Records,
    Ended,
    Failed,
}

/// Reads a stream: header and CONFIG in [`StreamReader::new`], then records with
/// [`StreamReader::next_record`] until [`Record::End`]. Generic over [`Read`] (socket, file,
/// byte slice, fuzzer input). Reads exactly up to the end of the END record, never beyond.
#[derive(Debug)]
pub struct StreamReader<R: Read> {
    inner: R,
    pos: u64,
    crc: crc32fast::Hasher,
    limits: Limits,
    expect: Expectations,
    header: Header,
    config: StreamConfig,
    block_pages: Vec<u64>,
    max_ram_body: u64,
    buf: Vec<u8>,
    body_len: usize,
    state: State,
    /// What the record order rules of §4 need to remember.
    order: OrderState,
    /// Version 5: the sync generation and the next batch sequence (§5.1); `None` before.
    batches: Option<BatchTracker>,
}

/// The SECTIONs seen so far and whether `SWITCHOVER_START` came: the destination keeps every
/// SECTION until END, so their count and bytes are bounded here, as they arrive.
#[derive(Debug, Default)]
struct OrderState {
    switchover_started: bool,
    /// (id, instance) of every SECTION (at most `Limits::max_sections` entries).
    sections: HashSet<(String, u32)>,
    /// Bytes of all SECTION bodies so far.
    section_bytes: u64,
    /// A RAM_DIGEST came: only END may follow.
    digest_seen: bool,
    /// The post-copy rules (§13.1).
    postcopy: PostcopyOrder,
    /// The multifd rules (§5.2).
    multifd: MultifdOrder,
}

impl OrderState {
    /// A SECTION's (id, instance) must be new; a DEVICE_CHUNK must not follow the SECTION of
    /// the same component (its final state). Records the SECTION.
    fn check_component(
        &mut self,
        kind: RecordKind,
        id: &str,
        instance: u32,
        len: u32,
        frame_at: u64,
    ) -> Result<(), WireError> {
        if kind != RecordKind::Section && self.sections.is_empty() {
            return Ok(());
        }
        let key = (id.to_owned(), instance);
        let seen = self.sections.contains(&key);
        if kind != RecordKind::Section {
            if seen {
                return Err(WireError::OutOfOrder {
                    record: kind.name(),
                    offset: frame_at,
                    reason: format!(
                        "pre-copy data for '{id}' instance {instance} after its final SECTION"
                    ),
                });
            }
            return Ok(());
        }
        if seen {
            return Err(WireError::DuplicateSection {
                id: key.0,
                instance,
                offset: frame_at,
            });
        }
        self.section_bytes += u64::from(len);
        self.sections.insert(key);
        Ok(())
    }
}

/// Reads exactly `out.len()` bytes; EOF becomes `Truncated`.
pub(super) fn read_exact_at<R: Read>(
    r: &mut R,
    pos: &mut u64,
    out: &mut [u8],
    what: &'static str,
) -> Result<(), WireError> {
    let mut done = 0;
    while done < out.len() {
        match r.read(&mut out[done..]) {
            Ok(0) => {
                return Err(WireError::Truncated {
                    offset: *pos + done as u64,
                    what,
                })
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(WireError::read(*pos + done as u64, what, e)),
        }
    }
    *pos += out.len() as u64;
    Ok(())
}

/// Reads `len` bytes into `buf[..len]`. The buffer keeps its (initialised) length between
/// records, so the steady state is one `read` into existing memory, no memset. When it must
/// grow, it grows with the data actually received, so a lying length on a short stream does
/// not allocate `len` up front.
pub(super) fn read_body<R: Read>(
    r: &mut R,
    pos: &mut u64,
    buf: &mut Vec<u8>,
    len: usize,
    what: &'static str,
) -> Result<(), WireError> {
    if let Some(dst) = buf.get_mut(..len) {
        return read_exact_at(r, pos, dst, what);
    }
    buf.clear();
    let got = r
        .by_ref()
        .take(len as u64)
        .read_to_end(buf)
        .map_err(|e| WireError::read(*pos + buf.len() as u64, what, e))?;
    if got < len {
        return Err(WireError::Truncated {
            offset: *pos + got as u64,
            what,
        });
    }
    *pos += len as u64;
    Ok(())
}

/// `buf[..len]` (always in bounds after `read_body`).
pub(super) fn body_of(buf: &[u8], len: usize) -> &[u8] {
    buf.get(..len).unwrap_or(buf)
}

impl<R: Read> StreamReader<R> {
    /// Reads and checks the header and the CONFIG record, then checks the configuration
    /// against `expect` (the destination's machine).
    pub fn new(mut inner: R, limits: Limits, expect: Expectations) -> Result<Self, WireError> {
        let mut pos = 0u64;
        let mut head = [0u8; HEADER_LEN as usize];
        read_exact_at(&mut inner, &mut pos, &mut head, "stream header")?;
        let (magic, rest) = head.split_at(8);
        if magic != MAGIC {
            let mut found = [0u8; 8];
            found.copy_from_slice(magic);
            return Err(WireError::BadMagic { found });
        }
        let mut c = Cursor::new(rest, 8, "header");
        let version = c.u32("version")?;
        let flags = c.u32("flags")?;
        if version == 0 || version > CURRENT_VERSION {
            return Err(WireError::UnsupportedVersion {
                found: version,
                supported: CURRENT_VERSION,
            });
        }
        if flags != 0 {
            return Err(WireError::Invalid {
                field: "header flags",
                offset: 12,
                reason: format!("{flags:#x}, reserved bits must be 0"),
            });
        }
        let mut crc = crc32fast::Hasher::new();
        let frame_at = pos;
        let (kind, len, frame) = read_frame(&mut inner, &mut pos)?;
        crc.update(&frame);
        if kind != RecordKind::Config as u8 {
            return Err(WireError::ConfigNotFirst {
                kind,
                offset: frame_at,
            });
        }
        check_len(
            "config record",
            len,
            u64::from(limits.max_config_size),
            frame_at + 1,
        )?;
        let mut buf = Vec::new();
        read_body(
            &mut inner,
            &mut pos,
            &mut buf,
            len as usize,
            "config record",
        )?;
        let body = body_of(&buf, len as usize);
        crc.update(body);
        let config = StreamConfig::decode(body, frame_at + FRAME_LEN as u64, &limits)?;
        expect.check(&config)?;
        let block_pages = config
            .ram_blocks
            .iter()
            .map(|b| b.pages(config.page_size))
            .collect();
        let batched = version >= VERSION_BATCH_INTEGRITY;
        let max_ram_body = limits.max_ram_body(config.page_size).map_or(u64::MAX, |m| {
            m - if batched { 0 } else { BATCH_OVERHEAD as u64 }
        });
        Ok(Self {
            inner,
            pos,
            crc,
            limits,
            expect,
            header: Header { version, flags },
            config,
            block_pages,
            max_ram_body,
            buf,
            body_len: 0,
            state: State::Records,
            order: OrderState {
                postcopy: PostcopyOrder::first_channel(version),
                ..OrderState::default()
            },
            batches: batched.then(BatchTracker::new),
        })
    }

    /// Like [`StreamReader::new`], for a post-copy recovery channel (§13.6): the version must
    /// be at least 4, and the handshake (`OPEN_RETURN_PATH`, `RECV_BITMAP` per block,
    /// `POSTCOPY_RESUME`) must come before the records allowed after `POSTCOPY_RUN`.
    pub fn recovery(inner: R, limits: Limits, expect: Expectations) -> Result<Self, WireError> {
        let mut r = Self::new(inner, limits, expect)?;
        if r.header.version < VERSION_RECOVERY {
            return Err(WireError::Invalid {
                field: "version",
                offset: 8,
                reason: format!(
                    "{}: a post-copy recovery channel needs stream version {VERSION_RECOVERY}",
                    r.header.version
                ),
            });
        }
        r.order.switchover_started = true;
        r.order.postcopy = PostcopyOrder::recovery(r.block_pages.len());
        Ok(r)
    }

    /// Like [`StreamReader::new`], for a post-copy preempt channel (§13.8): the version must
    /// be at least 6, the first record `POSTCOPY_PREEMPT` (its token is the caller's to
    /// check), then only RAM and END.
    pub fn preempt(inner: R, limits: Limits, expect: Expectations) -> Result<Self, WireError> {
        let mut r = Self::new(inner, limits, expect)?;
        if r.header.version < VERSION_PREEMPT {
            return Err(WireError::Invalid {
                field: "version",
                offset: 8,
                reason: format!(
                    "{}: a post-copy preempt channel needs stream version {VERSION_PREEMPT}",
                    r.header.version
                ),
            });
        }
        r.order.postcopy = PostcopyOrder::preempt();
        Ok(r)
    }

    /// The stream header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The source's configuration (already checked against the expectations).
    pub fn config(&self) -> &StreamConfig {
        &self.config
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Bytes consumed so far (the stream offset of the next record).
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// True once the END record has been returned.
    pub fn is_ended(&self) -> bool {
        self.state == State::Ended
    }

    /// Gives back the underlying reader (positioned right after the last record read).
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// Capacity of the record buffer (tests check it stays within the limits).
    #[cfg(test)]
    pub(crate) fn buffer_capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// The underlying reader.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// Reads the next record. After [`Record::End`] or an error, every call fails with
    /// [`WireError::Finished`].
    pub fn next_record(&mut self) -> Result<Record<'_>, WireError> {
        match self.state {
            State::Records => {}
            State::Ended => return Err(WireError::Finished("ended")),
            State::Failed => return Err(WireError::Finished("failed")),
        }
        // Parse into an owned description first so that a failure can poison the reader
        // without fighting the borrow of `self.buf` held by the returned record.
        let parsed = match self.read_one() {
            Ok(p) => p,
            Err(e) => {
                self.state = State::Failed;
                return Err(e);
            }
        };
        if matches!(parsed, Parsed::End(_)) {
            self.state = State::Ended;
        }
        Ok(parsed.into_record(body_of(&self.buf, self.body_len)))
    }

    fn read_one(&mut self) -> Result<Parsed, WireError> {
        let crc_before = self.crc.clone();
        let bytes_before = self.pos - HEADER_LEN;
        let frame_at = self.pos;
        let (kind_byte, len, frame) = read_frame(&mut self.inner, &mut self.pos)?;
        let body_at = frame_at + FRAME_LEN as u64;
        // Version 5: a RAM record checks itself (CRC-32C) and is left out of END's CRC.
        let batch = kind_byte == RecordKind::Ram as u8 && self.batches.is_some();
        if !batch {
            self.crc.update(&frame);
        }
        let known = RecordKind::from_u8(kind_byte)
            .filter(|k| *k != RecordKind::RamDigest || self.header.version >= VERSION_RAM_DIGEST)
            .filter(|k| *k != RecordKind::RamDiscard || self.header.version >= VERSION_POSTCOPY);
        let Some(kind) = known else {
            return Err(WireError::UnknownRecordKind {
                kind: kind_byte,
                offset: frame_at,
            });
        };
        if self.order.digest_seen && kind != RecordKind::End {
            return Err(WireError::OutOfOrder {
                record: kind.name(),
                offset: frame_at,
                reason: "a record after RAM_DIGEST (only END may follow the digest)".into(),
            });
        }
        let limit = match kind {
            RecordKind::Config => return Err(WireError::DuplicateConfig { offset: frame_at }),
            RecordKind::Section => u64::from(self.limits.max_section_size),
            RecordKind::DeviceChunk => u64::from(self.limits.max_section_size),
            RecordKind::Ram => self.max_ram_body,
            RecordKind::Command => u64::from(MAX_COMMAND_LEN),
            RecordKind::End => END_BODY_LEN as u64,
            RecordKind::RamDigest => u64::from(self.limits.max_digest_size),
            RecordKind::RamDiscard => max_discard_body(self.limits.max_discard_ranges),
        };
        check_len(kind.name(), len, limit, frame_at + 1)?;
        if batch && (len as usize) < BATCH_OVERHEAD + 4 {
            return Err(WireError::LengthMismatch {
                what: "ram record (batch header, count and checksum)",
                offset: frame_at + 1,
                len: u64::from(len),
                expected: (BATCH_OVERHEAD + 4) as u64,
            });
        }
        if kind == RecordKind::RamDigest && !self.order.switchover_started {
            return Err(WireError::OutOfOrder {
                record: "ram-digest",
                offset: frame_at,
                reason: "a RAM_DIGEST before SWITCHOVER_START (the digest is of the stopped VM)"
                    .into(),
            });
        }
        if kind != RecordKind::Command {
            self.order
                .postcopy
                .check_frame(kind, self.order.switchover_started, frame_at)?;
            self.order.multifd.check_frame(kind, frame_at)?;
        }
        if kind == RecordKind::Section {
            self.check_section_frame(len, frame_at)?;
        }
        read_body(
            &mut self.inner,
            &mut self.pos,
            &mut self.buf,
            len as usize,
            kind.name(),
        )?;
        self.body_len = len as usize;
        let body = body_of(&self.buf, self.body_len);
        if kind != RecordKind::End && !batch {
            self.crc.update(body);
        }
        match kind {
            RecordKind::Section | RecordKind::DeviceChunk => {
                let mut c = Cursor::new(body, body_at, kind.name());
                let id_at = c.offset();
                let id = c.str8("component id", self.limits.max_string_len)?;
                let instance = c.u32("instance")?;
                let version = c.u32("version")?;
                self.expect.check_component(id, instance, version, id_at)?;
                self.order
                    .check_component(kind, id, instance, len, frame_at)?;
                let id_len = id.len();
                let data_start = 1 + id_len + 8;
                Ok(Parsed::Component {
                    section: kind == RecordKind::Section,
                    id_len,
                    instance,
                    version,
                    data_start,
                })
            }
            RecordKind::Ram => self.parse_ram(&frame, frame_at),
            RecordKind::RamDigest => {
                let digest = self.parse_digest(body, body_at)?;
                self.order.digest_seen = true;
                Ok(Parsed::RamDigest(digest))
            }
            RecordKind::RamDiscard => Ok(Parsed::RamDiscard(parse_discard(
                body,
                body_at,
                &self.block_pages,
                self.limits.max_discard_ranges,
            )?)),
            RecordKind::Command => {
                let command = parse_command(body, body_at, self.header.version)?;
                self.order.multifd.check_command(&command, frame_at)?;
                self.order.postcopy.check_command(
                    &command,
                    self.order.switchover_started,
                    self.config.page_size,
                    crc_before.clone().finalize(),
                    bytes_before,
                    frame_at,
                )?;
                if command == Command::SwitchoverStart {
                    if self.order.switchover_started {
                        return Err(WireError::OutOfOrder {
                            record: "command",
                            offset: frame_at,
                            reason: "a second SWITCHOVER_START".into(),
                        });
                    }
                    self.order.switchover_started = true;
                }
                if let Some(b) = &mut self.batches {
                    b.command_read(&command);
                }
                Ok(Parsed::Command(command))
            }
            RecordKind::End => {
                let mut c = Cursor::new(body, body_at, "end");
                let crc32 = c.u32("crc32")?;
                let total_bytes = c.u64("total_bytes")?;
                c.finish()?;
                if total_bytes != bytes_before {
                    return Err(WireError::LengthMismatch {
                        what: "end record total_bytes",
                        offset: body_at + 4,
                        len: total_bytes,
                        expected: bytes_before,
                    });
                }
                let actual = crc_before.finalize();
                if actual != crc32 {
                    return Err(WireError::ChecksumMismatch {
                        expected: crc32,
                        actual,
                        bytes: bytes_before,
                        offset: frame_at,
                    });
                }
                Ok(Parsed::End(EndRecord { crc32, total_bytes }))
            }
            RecordKind::Config => Err(WireError::DuplicateConfig { offset: frame_at }),
        }
    }

    /// The order and size rules of a SECTION that the frame alone decides (§4), checked before
    /// its body is read.
    fn check_section_frame(&self, len: u32, frame_at: u64) -> Result<(), WireError> {
        if !self.order.switchover_started {
            return Err(WireError::OutOfOrder {
                record: "section",
                offset: frame_at,
                reason: "a SECTION (final component state) before SWITCHOVER_START".into(),
            });
        }
        let count = self.order.sections.len() as u64 + 1;
        if count > u64::from(self.limits.max_sections) {
            return Err(WireError::TooLarge {
                what: "section count",
                len: count,
                limit: u64::from(self.limits.max_sections),
                offset: frame_at,
            });
        }
        let total = self.order.section_bytes + u64::from(len);
        if total > self.limits.max_section_bytes_total {
            return Err(WireError::TooLarge {
                what: "total section bytes",
                len: total,
                limit: self.limits.max_section_bytes_total,
                offset: frame_at,
            });
        }
        Ok(())
    }

    /// RAM_DIGEST body (§7a): algorithm, chunk size, and exactly one digest per chunk of every
    /// CONFIG block.
    fn parse_digest(&self, body: &[u8], body_at: u64) -> Result<RamDigest, WireError> {
        let mut c = Cursor::new(body, body_at, "ram-digest");
        let algorithm = c.u16("digest algorithm")?;
        if algorithm != ALGORITHM_XXH3_64 {
            return Err(WireError::Invalid {
                field: "digest algorithm",
                offset: body_at,
                reason: format!("{algorithm} (this reader knows 1 = XXH3-64)"),
            });
        }
        if c.u16("reserved")? != 0 {
            return Err(WireError::Invalid {
                field: "ram-digest reserved",
                offset: body_at + 2,
                reason: "must be 0".into(),
            });
        }
        let shift = c.u32("chunk shift")?;
        let page_shift = self.config.page_size.trailing_zeros();
        if !(page_shift..=MAX_CHUNK_SHIFT).contains(&shift) {
            return Err(WireError::Invalid {
                field: "chunk shift",
                offset: body_at + 4,
                reason: format!("{shift}, expected {page_shift}..={MAX_CHUNK_SHIFT}"),
            });
        }
        let counts: Vec<u64> = self
            .config
            .ram_blocks
            .iter()
            .map(|b| chunk_count(b.size, shift))
            .collect();
        let expected = counts
            .iter()
            .sum::<u64>()
            .saturating_mul(8)
            .saturating_add(8);
        if expected != body.len() as u64 {
            return Err(WireError::LengthMismatch {
                what: "ram-digest record",
                offset: body_at,
                len: body.len() as u64,
                expected,
            });
        }
        let mut blocks = Vec::with_capacity(counts.len());
        for n in counts {
            let mut v = Vec::with_capacity(n as usize);
            for _ in 0..n {
                v.push(c.u64("chunk digest")?);
            }
            blocks.push(v);
        }
        c.finish()?;
        Ok(RamDigest {
            chunk_shift: shift,
            blocks,
        })
    }

    /// A RAM record: in version 5 its batch framing first (checksum, then channel, generation,
    /// sequence: §5.1), then the page table (§5).
    fn parse_ram(&mut self, frame: &[u8; FRAME_LEN], frame_at: u64) -> Result<Parsed, WireError> {
        let body = body_of(&self.buf, self.body_len);
        let body_at = frame_at + FRAME_LEN as u64;
        let (header, table_body, at) = match &mut self.batches {
            Some(tracker) => {
                let (h, inner) = tracker.check(0, frame, body, frame_at)?;
                let at = TableAt {
                    body_at: body_at + BATCH_HEADER_LEN as u64,
                    len_field_at: frame_at + 1,
                    overhead: BATCH_OVERHEAD as u64,
                };
                (Some(h), inner, at)
            }
            None => {
                let at = TableAt {
                    body_at,
                    len_field_at: frame_at + 1,
                    overhead: 0,
                };
                (None, body, at)
            }
        };
        let (count, normal) = check_table(
            table_body,
            at,
            &self.block_pages,
            self.limits.max_pages_per_batch,
            self.config.page_size as usize,
        )?;
        let start = if header.is_some() {
            BATCH_HEADER_LEN
        } else {
            0
        };
        Ok(Parsed::Ram {
            start,
            end: start + table_body.len(),
            count,
            normal,
            header,
        })
    }
}

fn check_len(what: &'static str, len: u32, limit: u64, offset: u64) -> Result<(), WireError> {
    if u64::from(len) > limit {
        Err(WireError::TooLarge {
            what,
            len: u64::from(len),
            limit,
            offset,
        })
    } else {
        Ok(())
    }
}

/// Reads a record frame: kind, body length, and the 5 bytes (for the checksums).
pub(super) fn read_frame<R: Read>(
    r: &mut R,
    pos: &mut u64,
) -> Result<(u8, u32, [u8; FRAME_LEN]), WireError> {
    let mut frame = [0u8; FRAME_LEN];
    read_exact_at(r, pos, &mut frame, "record frame (or END record)")?;
    let [kind, a, b, c, d] = frame;
    Ok((kind, u32::from_le_bytes([a, b, c, d]), frame))
}

/// A parsed record with offsets into the body buffer instead of borrows.
enum Parsed {
    Component {
        section: bool,
        id_len: usize,
        instance: u32,
        version: u32,
        data_start: usize,
    },
    /// `buf[start..end]` is the version-1 layout (count, table, data).
    Ram {
        start: usize,
        end: usize,
        count: usize,
        normal: usize,
        header: Option<BatchHeader>,
    },
    Command(Command),
    End(EndRecord),
    RamDigest(RamDigest),
    RamDiscard(RamDiscard),
}

impl Parsed {
    fn into_record(self, buf: &[u8]) -> Record<'_> {
        match self {
            Self::Component {
                section,
                id_len,
                instance,
                version,
                data_start,
            } => {
                // Validated by `read_one` (UTF-8, lengths): the fallbacks are unreachable.
                let id = buf
                    .get(1..1 + id_len)
                    .and_then(|b| std::str::from_utf8(b).ok())
                    .unwrap_or("");
                let data = buf.get(data_start..).unwrap_or(&[]);
                let r = ComponentRecord {
                    id,
                    instance,
                    version,
                    data,
                };
                if section {
                    Record::Section(r)
                } else {
                    Record::DeviceChunk(r)
                }
            }
            Self::Ram {
                start,
                end,
                count,
                normal,
                header,
            } => {
                let table_end = start + 4 + count * RAM_ENTRY_LEN;
                let table = buf.get(start + 4..table_end).unwrap_or(&[]);
                let data = buf.get(table_end..end).unwrap_or(&[]);
                let page_size = data.len().checked_div(normal).unwrap_or(0);
                Record::Ram(RamBatch {
                    table,
                    data,
                    page_size,
                    normal,
                    header,
                })
            }
            Self::Command(c) => Record::Command(c),
            Self::End(e) => Record::End(e),
            Self::RamDigest(d) => Record::RamDigest(d),
            Self::RamDiscard(d) => Record::RamDiscard(d),
        }
    }
}
