//! Multifd channels (`docs/stream-format.md` §5.2, version 6): the 32-byte handshake that opens
//! each extra connection, the writer and reader of the RAM batches it carries (the version-5
//! batch of §5.1 with the channel's index, plus the `SYNC` and `KEEPALIVE` flags), and the
//! order rules multifd adds to the main stream. Compressed batches (§5.3) are in
//! `channel/compressed.rs`.

mod compressed;

use std::io::{IoSlice, Read, Write};

use super::compress::{BatchCompressor, BatchDecompressor};
use super::config::StreamConfig;
use super::error::WireError;
use super::format::{
    page_kind, Cursor, Limits, RecordKind, BATCH_FLAG_COMPRESSED, BATCH_FLAG_KEEPALIVE,
    BATCH_FLAG_SYNC, BATCH_HEADER_LEN, BATCH_OVERHEAD, CHANNEL_HANDSHAKE_LEN, CHANNEL_MAGIC,
    FRAME_LEN, MAGIC, MAX_MULTIFD_CHANNELS, RAM_ENTRY_LEN,
};
use super::ram_batch::{check_table, BatchCrc, BatchHeader, TableAt};
use super::reader::{body_of, read_body, read_exact_at, read_frame};
use super::record::{PageData, RamBatch, RamPage};

/// The first 32 bytes of a multifd channel (§5.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelHandshake {
    /// The main stream's version (6).
    pub version: u32,
    /// This channel's index, 1 ..= `channels`.
    pub channel: u16,
    /// How many channels the migration has (`MULTIFD_CHANNELS`).
    pub channels: u16,
    /// The migration's id (`MULTIFD_CHANNELS`).
    pub id: [u8; 16],
}

/// What the main stream announced, against which every channel's handshake is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelExpect {
    /// The main stream's version.
    pub version: u32,
    /// `MULTIFD_CHANNELS`'s count.
    pub channels: u16,
    /// `MULTIFD_CHANNELS`'s id.
    pub id: [u8; 16],
}

impl ChannelHandshake {
    /// The 32 bytes on the wire.
    pub fn encode(&self) -> [u8; CHANNEL_HANDSHAKE_LEN] {
        let mut b = [0u8; CHANNEL_HANDSHAKE_LEN];
        b[..8].copy_from_slice(&CHANNEL_MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..14].copy_from_slice(&self.channel.to_le_bytes());
        b[14..16].copy_from_slice(&self.channels.to_le_bytes());
        b[16..32].copy_from_slice(&self.id);
        b
    }

    /// Reads the 32 bytes of a connection that should be a multifd channel and checks them
    /// against what the main stream announced and the channels already connected (`seen[k]`
    /// = channel k+1 connected). A wrong magic, version, count or id, an index out of range
    /// or repeated → `Invalid`, naming the field.
    pub fn read_checked<R: Read>(
        r: &mut R,
        expect: &ChannelExpect,
        seen: &[bool],
    ) -> Result<Self, WireError> {
        let mut pos = 0u64;
        let mut b = [0u8; CHANNEL_HANDSHAKE_LEN];
        read_exact_at(r, &mut pos, &mut b, "multifd channel handshake")?;
        let mut c = Cursor::new(&b, 0, "multifd handshake");
        let magic = c.take(8, "channel magic")?;
        if magic != CHANNEL_MAGIC {
            let what = if magic == MAGIC {
                "a second main stream (magic TERNMIG), not a multifd channel".to_owned()
            } else {
                format!("{magic:02x?}: not a multifd channel (expected \"TERNMFD\\0\")")
            };
            return Err(WireError::Invalid {
                field: "channel magic",
                offset: 0,
                reason: what,
            });
        }
        let h = Self {
            version: c.u32("channel version")?,
            channel: c.u16("channel index")?,
            channels: c.u16("channel count")?,
            id: c.bytes16("migration id")?,
        };
        h.check(expect, seen)?;
        Ok(h)
    }

    fn check(&self, expect: &ChannelExpect, seen: &[bool]) -> Result<(), WireError> {
        if self.version != expect.version {
            return Err(WireError::Invalid {
                field: "channel version",
                offset: 8,
                reason: format!(
                    "{}, the main stream is version {}",
                    self.version, expect.version
                ),
            });
        }
        if self.channels != expect.channels {
            return Err(WireError::Invalid {
                field: "channel count",
                offset: 14,
                reason: format!(
                    "{}, the main stream announced {} channel(s)",
                    self.channels, expect.channels
                ),
            });
        }
        if self.id != expect.id {
            return Err(WireError::Invalid {
                field: "migration id",
                offset: 16,
                reason: format!(
                    "{}: this channel belongs to another migration (this one is {})",
                    uuid::Uuid::from_bytes(self.id),
                    uuid::Uuid::from_bytes(expect.id)
                ),
            });
        }
        if self.channel == 0 || self.channel > expect.channels {
            return Err(WireError::Invalid {
                field: "channel index",
                offset: 12,
                reason: format!(
                    "channel {} out of range 1..={}",
                    self.channel, expect.channels
                ),
            });
        }
        if seen
            .get(usize::from(self.channel) - 1)
            .copied()
            .unwrap_or(false)
        {
            return Err(WireError::Invalid {
                field: "channel index",
                offset: 12,
                reason: format!("channel {} connected twice", self.channel),
            });
        }
        Ok(())
    }
}

/// Writes the RAM batches of one multifd channel (after its handshake): version-5 batches
/// numbered on this channel, `SYNC` at the end of each generation, `KEEPALIVE` when idle. Each
/// batch goes out with one vectored write (frame, header and table; page data from the
/// caller's slices; CRC), so wrap nothing in a `BufWriter`.
///
/// After an I/O error the writer is poisoned: every later call fails.
#[derive(Debug)]
pub struct ChannelWriter<W: Write> {
    inner: W,
    channel: u16,
    generation: u32,
    next_seq: u64,
    page_size: usize,
    block_pages: Vec<u64>,
    max_pages_per_batch: usize,
    head: Vec<u8>,
    bytes: u64,
    poisoned: bool,
    /// `multifd-compression` (§5.3): this channel's compressor and its output buffer.
    compressor: Option<BatchCompressor>,
    packed: Vec<u8>,
    raw_bytes: u64,
    packed_bytes: u64,
}

impl<W: Write> ChannelWriter<W> {
    /// A writer for channel `channel` (1 ..= 255) of a migration with `config`; the handshake
    /// must have been written already. Generation 1, sequence 0.
    pub fn new(inner: W, channel: u16, config: &StreamConfig) -> Result<Self, WireError> {
        if channel == 0 || channel > MAX_MULTIFD_CHANNELS {
            return Err(WireError::InvalidArgument(format!(
                "multifd channel {channel} (1..={MAX_MULTIFD_CHANNELS})"
            )));
        }
        Ok(Self {
            inner,
            channel,
            generation: 1,
            next_seq: 0,
            page_size: config.page_size as usize,
            block_pages: config
                .ram_blocks
                .iter()
                .map(|b| b.pages(config.page_size))
                .collect(),
            max_pages_per_batch: Limits::default().max_pages_per_batch as usize,
            head: Vec::new(),
            bytes: 0,
            poisoned: false,
            compressor: None,
            packed: Vec::new(),
            raw_bytes: 0,
            packed_bytes: 0,
        })
    }

    /// Bytes written on this channel (the handshake not included).
    pub fn bytes_written(&self) -> u64 {
        self.bytes
    }

    /// The generation of the next batch.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// The underlying writer.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// Writes `pages` (1 ..= `max_pages_per_batch`, every one checked like
    /// `StreamWriter::write_ram_batch` checks them) as one batch of the current generation.
    pub fn write_batch(&mut self, pages: &[RamPage<'_>]) -> Result<(), WireError> {
        let mut head = std::mem::take(&mut self.head);
        let mut trailer = [0u8; 4];
        let r = self.write_batch_parts(pages, &mut head, &mut trailer);
        self.head = head;
        r
    }

    /// The mutable underlying writer (the zero-copy sender arms its sends through it).
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// [`ChannelWriter::write_batch`] with the frame, batch header and page table encoded into
    /// the caller's `head` and the CRC into the caller's `trailer`: one vectored write of
    /// `head`, the pages' data and `trailer`, every byte of it in memory the caller owns. The
    /// zero-copy sender keeps all three untouched until the kernel reports the send complete
    /// (`source/multifd_zerocopy.rs`); the same bytes as `write_batch`.
    pub fn write_batch_parts(
        &mut self,
        pages: &[RamPage<'_>],
        head: &mut Vec<u8>,
        trailer: &mut [u8; 4],
    ) -> Result<(), WireError> {
        if pages.is_empty() || pages.len() > self.max_pages_per_batch {
            return Err(WireError::InvalidArgument(format!(
                "a multifd batch of {} pages (1..={})",
                pages.len(),
                self.max_pages_per_batch
            )));
        }
        head.clear();
        head.extend_from_slice(&[0u8; FRAME_LEN + BATCH_HEADER_LEN]);
        head.extend_from_slice(&(pages.len() as u32).to_le_bytes());
        let mut normal = 0usize;
        let mut bad = None;
        for p in pages {
            let npages = self.block_pages.get(usize::from(p.block)).copied();
            let kind = match p.data {
                PageData::Zero => page_kind::ZERO,
                PageData::Normal(d) if d.len() == self.page_size => {
                    normal += 1;
                    page_kind::NORMAL
                }
                PageData::Normal(d) => {
                    bad = Some(format!(
                        "page {} of block {}: {} bytes, page size {}",
                        p.page,
                        p.block,
                        d.len(),
                        self.page_size
                    ));
                    break;
                }
            };
            if npages.is_none_or(|n| u64::from(p.page) >= n) {
                bad = Some(format!(
                    "page {} of block {} is outside the configuration",
                    p.page, p.block
                ));
                break;
            }
            head.extend_from_slice(&p.page.to_le_bytes());
            head.extend_from_slice(&p.block.to_le_bytes());
            head.push(kind);
            head.push(0);
        }
        if let Some(b) = bad {
            return Err(WireError::InvalidArgument(b));
        }
        if normal > 0 && self.compressor.is_some() {
            let r = self.write_compressed(head, pages, normal);
            if !matches!(r, Ok(false)) {
                return r.map(|_| ());
            }
            // Not smaller compressed: the batch goes plain (§5.3).
        }
        let len = BATCH_OVERHEAD + 4 + pages.len() * RAM_ENTRY_LEN + normal * self.page_size;
        self.fill_prefix(head, len, 0);
        let mut crc = BatchCrc::new();
        crc.update(head);
        let mut slices = Vec::with_capacity(normal + 2);
        slices.push(IoSlice::new(head));
        for p in pages {
            if let PageData::Normal(d) = p.data {
                crc.update(d);
                slices.push(IoSlice::new(d));
            }
        }
        *trailer = crc.value().to_le_bytes();
        slices.push(IoSlice::new(trailer));
        self.write_slices(&mut slices, (FRAME_LEN + len) as u64)
    }

    /// Writes `SYNC` for the current generation (every batch of it was written before) and
    /// moves to the next generation. Flushes.
    pub fn write_sync(&mut self) -> Result<(), WireError> {
        self.write_marker(BATCH_FLAG_SYNC)?;
        self.generation = self.generation.saturating_add(1);
        self.flush()
    }

    /// Writes a `KEEPALIVE` (nothing to place) and flushes.
    pub fn write_keepalive(&mut self) -> Result<(), WireError> {
        self.write_marker(BATCH_FLAG_KEEPALIVE)?;
        self.flush()
    }

    /// Flushes the underlying writer.
    pub fn flush(&mut self) -> Result<(), WireError> {
        self.check()?;
        let offset = self.bytes;
        self.inner.flush().map_err(|source| {
            self.poisoned = true;
            WireError::Io {
                offset,
                what: "flushing a multifd channel",
                source,
            }
        })
    }

    fn write_marker(&mut self, flags: u16) -> Result<(), WireError> {
        const AT: usize = FRAME_LEN + BATCH_HEADER_LEN + 4;
        let mut rec = [0u8; AT + 4];
        self.fill_prefix(&mut rec, BATCH_OVERHEAD + 4, flags);
        // `count` = 0 (already zero), then the CRC-32C of everything before the trailer.
        let mut crc = BatchCrc::new();
        crc.update(&rec[..AT]);
        rec[AT..].copy_from_slice(&crc.value().to_le_bytes());
        let mut slices = [IoSlice::new(&rec)];
        self.write_slices(&mut slices, rec.len() as u64)
    }

    /// Frame and batch header for a record of body `len`; takes the next sequence number.
    fn fill_prefix(&self, head: &mut [u8], len: usize, flags: u16) {
        let h = BatchHeader {
            channel: self.channel,
            generation: self.generation,
            seq: self.next_seq,
        }
        .encode();
        head[0] = RecordKind::Ram as u8;
        // A batch is at most 1024 pages of at most 2 MiB: its length fits in u32.
        head[1..FRAME_LEN].copy_from_slice(&(len as u32).to_le_bytes());
        head[FRAME_LEN..FRAME_LEN + BATCH_HEADER_LEN].copy_from_slice(&h);
        head[FRAME_LEN + 2..FRAME_LEN + 4].copy_from_slice(&flags.to_le_bytes());
    }

    /// Writes every slice (vectored, resuming after short writes); counts the batch.
    fn write_slices(&mut self, slices: &mut [IoSlice<'_>], total: u64) -> Result<(), WireError> {
        self.check()?;
        let mut rest: &mut [IoSlice<'_>] = slices;
        let mut done = 0u64;
        while !rest.is_empty() {
            match self.inner.write_vectored(rest) {
                Ok(0) => {
                    return Err(self.io_err(
                        done,
                        std::io::Error::new(std::io::ErrorKind::WriteZero, "wrote nothing"),
                    ))
                }
                Ok(n) => {
                    done += n as u64;
                    IoSlice::advance_slices(&mut rest, n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io_err(done, e)),
            }
        }
        debug_assert_eq!(done, total);
        self.bytes += total;
        self.next_seq += 1;
        Ok(())
    }

    fn io_err(&mut self, done: u64, source: std::io::Error) -> WireError {
        self.poisoned = true;
        WireError::Io {
            offset: self.bytes + done,
            what: "writing a multifd channel",
            source,
        }
    }

    fn check(&self) -> Result<(), WireError> {
        if self.poisoned {
            Err(WireError::Finished("broken by an earlier write error"))
        } else {
            Ok(())
        }
    }
}

/// One record of a multifd channel, checked.
#[derive(Debug)]
pub enum ChannelRecord<'a> {
    /// Pages of the current generation.
    Batch(RamBatch<'a>),
    /// The channel sent every batch of `generation`; the reader is now in the next one.
    Sync {
        /// The generation that ended.
        generation: u32,
    },
    /// An idle channel's keepalive.
    Keepalive,
}

/// Reads and checks the records of one multifd channel after its handshake: only RAM
/// records, each checked as §5.1 says (CRC first, then channel = this connection, flags,
/// generation, this channel's sequence, the page table against the main stream's CONFIG).
/// Offsets in errors count from the channel's first byte (the handshake).
#[derive(Debug)]
pub struct ChannelReader<R: Read> {
    inner: R,
    channel: u16,
    pos: u64,
    generation: u32,
    next_seq: u64,
    block_pages: Vec<u64>,
    page_size: usize,
    max_pages_per_batch: u32,
    max_ram_body: u64,
    buf: Vec<u8>,
    body_len: usize,
    failed: bool,
    /// `multifd-compression` (§5.3): this channel's decompressor, its output buffer, and
    /// whether the last batch's data is there.
    decompressor: Option<BatchDecompressor>,
    unpacked: Vec<u8>,
    last_unpacked: bool,
}

impl<R: Read> ChannelReader<R> {
    /// A reader for channel `channel` whose handshake was read; `config` is the main stream's.
    pub fn new(inner: R, channel: u16, config: &StreamConfig, limits: &Limits) -> Self {
        Self {
            inner,
            channel,
            pos: CHANNEL_HANDSHAKE_LEN as u64,
            generation: 1,
            next_seq: 0,
            block_pages: config
                .ram_blocks
                .iter()
                .map(|b| b.pages(config.page_size))
                .collect(),
            page_size: config.page_size as usize,
            max_pages_per_batch: limits.max_pages_per_batch,
            max_ram_body: limits.max_ram_body(config.page_size).unwrap_or(u64::MAX),
            buf: Vec::new(),
            body_len: 0,
            failed: false,
            decompressor: None,
            unpacked: Vec::new(),
            last_unpacked: false,
        }
    }

    /// The generation the next batch must carry.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// Bytes read so far, handshake included.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The underlying reader.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// Reads the next record. After an error every call fails with `Finished`.
    pub fn next_record(&mut self) -> Result<ChannelRecord<'_>, WireError> {
        if self.failed {
            return Err(WireError::Finished("failed"));
        }
        match self.read_one() {
            Ok(Some((start, end, count, normal, header))) => {
                let body = body_of(&self.buf, self.body_len);
                let table_end = start + 4 + count * RAM_ENTRY_LEN;
                let table = body.get(start + 4..table_end).unwrap_or(&[]);
                let data = if self.last_unpacked {
                    self.unpacked.get(..normal * self.page_size).unwrap_or(&[])
                } else {
                    body.get(table_end..end).unwrap_or(&[])
                };
                Ok(ChannelRecord::Batch(RamBatch {
                    table,
                    data,
                    page_size: self.page_size,
                    normal,
                    header: Some(header),
                }))
            }
            Ok(None) => Ok(self.marker()),
            Err(e) => {
                self.failed = true;
                Err(e)
            }
        }
    }

    /// The marker that [`Self::read_one`] just accepted (flags kept in `body_len`'s header).
    fn marker(&mut self) -> ChannelRecord<'static> {
        let body = body_of(&self.buf, self.body_len);
        let flags = u16::from_le_bytes([
            body.get(2).copied().unwrap_or(0),
            body.get(3).copied().unwrap_or(0),
        ]);
        if flags == BATCH_FLAG_SYNC {
            let ended = self.generation;
            self.generation = self.generation.saturating_add(1);
            ChannelRecord::Sync { generation: ended }
        } else {
            ChannelRecord::Keepalive
        }
    }

    /// Reads one record; `Some(table start, body end, count, normal, header)` for a batch with
    /// pages, `None` for an accepted marker.
    #[allow(clippy::type_complexity)]
    fn read_one(&mut self) -> Result<Option<(usize, usize, usize, usize, BatchHeader)>, WireError> {
        let frame_at = self.pos;
        let (kind, len, frame) = read_frame(&mut self.inner, &mut self.pos)?;
        if kind != RecordKind::Ram as u8 {
            return Err(WireError::UnknownRecordKind {
                kind,
                offset: frame_at,
            });
        }
        if u64::from(len) > self.max_ram_body {
            return Err(WireError::TooLarge {
                what: "ram",
                len: u64::from(len),
                limit: self.max_ram_body,
                offset: frame_at + 1,
            });
        }
        if (len as usize) < BATCH_OVERHEAD + 4 {
            return Err(WireError::LengthMismatch {
                what: "ram record (batch header, count and checksum)",
                offset: frame_at + 1,
                len: u64::from(len),
                expected: (BATCH_OVERHEAD + 4) as u64,
            });
        }
        read_body(
            &mut self.inner,
            &mut self.pos,
            &mut self.buf,
            len as usize,
            "ram",
        )?;
        self.body_len = len as usize;
        let body = body_of(&self.buf, self.body_len);
        let (covered, trailer) = body.split_at(body.len() - 4);
        let mut t = [0u8; 4];
        t.copy_from_slice(trailer);
        let expected = u32::from_le_bytes(t);
        let mut crc = BatchCrc::new();
        crc.update(&frame);
        crc.update(covered);
        let actual = crc.value();
        if actual != expected {
            return Err(WireError::BatchChecksumMismatch {
                channel: self.channel,
                seq: self.next_seq,
                offset: frame_at,
                expected,
                actual,
            });
        }
        let body_at = frame_at + FRAME_LEN as u64;
        let mut c = Cursor::new(covered, body_at, "ram");
        let claimed = c.u16("batch channel")?;
        let flags = c.u16("batch flags")?;
        let generation = c.u32("batch generation")?;
        let seq = c.u64("batch sequence")?;
        if claimed != self.channel {
            return Err(WireError::Invalid {
                field: "batch channel",
                offset: body_at,
                reason: format!(
                    "{claimed}: the batch arrived on multifd channel {} (a batch on the wrong \
                     connection)",
                    self.channel
                ),
            });
        }
        let compressed = flags == BATCH_FLAG_COMPRESSED;
        if compressed && self.decompressor.is_none() {
            return Err(WireError::Invalid {
                field: "batch flags",
                offset: body_at + 2,
                reason: "COMPRESSED (4) on a channel without multifd-compression".into(),
            });
        }
        if !compressed
            && (flags & !(BATCH_FLAG_SYNC | BATCH_FLAG_KEEPALIVE) != 0
                || flags == BATCH_FLAG_SYNC | BATCH_FLAG_KEEPALIVE)
        {
            return Err(WireError::Invalid {
                field: "batch flags",
                offset: body_at + 2,
                reason: format!(
                    "{flags:#x}: only SYNC (1), KEEPALIVE (2) or COMPRESSED (4), one of them"
                ),
            });
        }
        if generation != self.generation {
            let when = if generation < self.generation {
                "an earlier"
            } else {
                "a later"
            };
            return Err(WireError::BatchOutOfOrder {
                channel: self.channel,
                offset: frame_at,
                reason: format!(
                    "generation {generation}, the channel is at generation {}: a batch of \
                     {when} generation",
                    self.generation
                ),
            });
        }
        if seq != self.next_seq {
            let what = if seq < self.next_seq {
                "a duplicate or replayed batch".to_owned()
            } else {
                format!("{} batch(es) lost", seq - self.next_seq)
            };
            return Err(WireError::BatchOutOfOrder {
                channel: self.channel,
                offset: frame_at,
                reason: format!("sequence {seq}, expected {}: {what}", self.next_seq),
            });
        }
        self.last_unpacked = false;
        if compressed {
            let at = body_at + BATCH_HEADER_LEN as u64;
            let (count, normal, table_end) =
                self.unpack(frame_at, at, seq, BATCH_HEADER_LEN, covered.len())?;
            self.next_seq += 1;
            let header = BatchHeader {
                channel: self.channel,
                generation,
                seq,
            };
            return Ok(Some((BATCH_HEADER_LEN, table_end, count, normal, header)));
        }
        let count_at = c.offset();
        let count = c.u32("page count")?;
        if flags != 0 {
            if count != 0 || len as usize != BATCH_OVERHEAD + 4 {
                return Err(WireError::LengthMismatch {
                    what: "ram marker (SYNC / KEEPALIVE: no pages)",
                    offset: count_at,
                    len: u64::from(len),
                    expected: (BATCH_OVERHEAD + 4) as u64,
                });
            }
            self.next_seq += 1;
            return Ok(None);
        }
        let table_body = covered.get(BATCH_HEADER_LEN..).unwrap_or(&[]);
        let at = TableAt {
            body_at: body_at + BATCH_HEADER_LEN as u64,
            len_field_at: frame_at + 1,
            overhead: BATCH_OVERHEAD as u64,
        };
        let (count, normal) = check_table(
            table_body,
            at,
            &self.block_pages,
            self.max_pages_per_batch,
            self.page_size,
        )?;
        self.next_seq += 1;
        let header = BatchHeader {
            channel: self.channel,
            generation,
            seq,
        };
        Ok(Some((
            BATCH_HEADER_LEN,
            BATCH_HEADER_LEN + table_body.len(),
            count,
            normal,
            header,
        )))
    }
}
