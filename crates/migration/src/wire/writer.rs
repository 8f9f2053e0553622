//! The stream encoder.

use std::io::{IoSlice, Write};

use super::config::StreamConfig;
use super::error::WireError;
use super::format::{
    cmd, page_kind, put_str8, Limits, RecordKind, BATCH_OVERHEAD, CURRENT_VERSION, END_BODY_LEN,
    MAGIC, RAM_ENTRY_LEN, VERSION_1, VERSION_BATCH_INTEGRITY, VERSION_EARLY_DISCARD,
    VERSION_MULTIFD, VERSION_MULTIFD_POSTCOPY, VERSION_POSTCOPY, VERSION_PREEMPT,
    VERSION_RAM_DIGEST, VERSION_RECOVERY,
};
use super::ram_batch::{BatchCrc, BatchNumbering};
use super::record::{Command, PageData, RamPage};
use crate::digest::{chunk_count, RamDigest, ALGORITHM_XXH3_64, MAX_CHUNK_SHIFT};

/// Writes a stream: the header and CONFIG in [`StreamWriter::new`], records, then END in
/// [`StreamWriter::finish`]. Wrap sockets and files in a `BufWriter`: records are written with
/// several small `write_all` calls (page data are written straight from the caller's slices).
///
/// After an I/O error the writer is poisoned: every later call fails.
#[derive(Debug)]
pub struct StreamWriter<W: Write> {
    inner: W,
    crc: crc32fast::Hasher,
    /// Bytes written after the header (covered by the CRC).
    body_bytes: u64,
    page_size: u32,
    /// Pages per block, from the config.
    block_pages: Vec<u64>,
    max_pages_per_batch: usize,
    max_string_len: usize,
    max_section_size: u32,
    max_discard_ranges: usize,
    table: Vec<u8>,
    poisoned: bool,
    /// The stream version in the header: records newer than it are refused.
    version: u32,
    /// Version 5: the generation and sequence of the next RAM batch (§5.1); `None` before.
    batches: Option<BatchNumbering>,
    /// `SWITCHOVER_START` was written: a RAM_DISCARD before it is the early discard (§13.3).
    switchover_started: bool,
}

impl<W: Write> StreamWriter<W> {
    /// Writes the header and the CONFIG record. `config` is validated against the default
    /// [`Limits`] (what a default reader accepts).
    pub fn new(inner: W, config: &StreamConfig) -> Result<Self, WireError> {
        Self::with_limits(inner, config, &Limits::default())
    }

    /// Like [`StreamWriter::new`] with explicit limits (batch size, id length, section size).
    pub fn with_limits(
        inner: W,
        config: &StreamConfig,
        limits: &Limits,
    ) -> Result<Self, WireError> {
        Self::with_version(inner, config, limits, VERSION_1)
    }

    /// Like [`StreamWriter::with_limits`] writing stream `version` (`1..=CURRENT_VERSION`): the
    /// lowest version that has every record the caller will write (`docs/stream-format.md` §10).
    pub fn with_version(
        inner: W,
        config: &StreamConfig,
        limits: &Limits,
        version: u32,
    ) -> Result<Self, WireError> {
        if !(VERSION_1..=CURRENT_VERSION).contains(&version) {
            return Err(WireError::InvalidArgument(format!(
                "stream version {version} (this writer writes 1..={CURRENT_VERSION})"
            )));
        }
        config
            .validate(limits, 0)
            .map_err(|e| WireError::InvalidArgument(format!("config: {e}")))?;
        let body = config.encode();
        if body.len() as u64 > u64::from(limits.max_config_size) {
            return Err(WireError::InvalidArgument(format!(
                "config of {} bytes exceeds {}",
                body.len(),
                limits.max_config_size
            )));
        }
        let mut w = Self {
            inner,
            crc: crc32fast::Hasher::new(),
            body_bytes: 0,
            page_size: config.page_size,
            block_pages: config
                .ram_blocks
                .iter()
                .map(|b| b.pages(config.page_size))
                .collect(),
            max_pages_per_batch: limits.max_pages_per_batch.max(1) as usize,
            max_string_len: limits.max_string_len,
            max_section_size: limits.max_section_size,
            max_discard_ranges: limits.max_discard_ranges.max(1) as usize,
            table: Vec::new(),
            poisoned: false,
            version,
            batches: (version >= VERSION_BATCH_INTEGRITY).then(BatchNumbering::new),
            switchover_started: false,
        };
        let mut header = [0u8; 16];
        header[..8].copy_from_slice(&MAGIC);
        header[8..12].copy_from_slice(&version.to_le_bytes());
        w.inner
            .write_all(&header)
            .map_err(|e| w.io_err(e, "writing the header"))?;
        w.record(RecordKind::Config, &[&body])?;
        Ok(w)
    }

    /// Total bytes written so far, header included.
    pub fn bytes_written(&self) -> u64 {
        16 + self.body_bytes
    }

    /// The page size from the config.
    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    /// The underlying writer.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// The underlying writer, mutably (do not write to it: it would corrupt the stream).
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// Flushes the underlying writer.
    pub fn flush(&mut self) -> Result<(), WireError> {
        self.check()?;
        self.inner.flush().map_err(|e| self.io_err(e, "flushing"))
    }

    /// Writes a SECTION: the complete state of one component.
    pub fn write_section(
        &mut self,
        id: &str,
        instance: u32,
        version: u32,
        data: &[u8],
    ) -> Result<(), WireError> {
        self.component(RecordKind::Section, id, instance, version, data)
    }

    /// Writes a DEVICE_CHUNK: one piece of an iterative device's pre-copy data.
    pub fn write_device_chunk(
        &mut self,
        id: &str,
        instance: u32,
        version: u32,
        data: &[u8],
    ) -> Result<(), WireError> {
        self.component(RecordKind::DeviceChunk, id, instance, version, data)
    }

    /// Writes `pages` as one or more RAM records (at most `max_pages_per_batch` pages each).
    /// Every page is checked: block and page index in range, data exactly `page_size` bytes.
    pub fn write_ram_batch(&mut self, pages: &[RamPage<'_>]) -> Result<(), WireError> {
        self.check()?;
        for chunk in pages.chunks(self.max_pages_per_batch) {
            self.ram_record(chunk)?;
        }
        Ok(())
    }

    /// Writes a COMMAND record.
    pub fn write_command(&mut self, command: Command) -> Result<(), WireError> {
        let mut body = [0u8; 2 + 16];
        let n = match command {
            Command::IterationEnd { pass } => {
                body[..2].copy_from_slice(&cmd::ITERATION_END.to_le_bytes());
                body[2..10].copy_from_slice(&pass.to_le_bytes());
                10
            }
            Command::OpenReturnPath => {
                body[..2].copy_from_slice(&cmd::OPEN_RETURN_PATH.to_le_bytes());
                2
            }
            Command::Ping { seq } => {
                body[..2].copy_from_slice(&cmd::PING.to_le_bytes());
                body[2..6].copy_from_slice(&seq.to_le_bytes());
                6
            }
            Command::SwitchoverStart => {
                body[..2].copy_from_slice(&cmd::SWITCHOVER_START.to_le_bytes());
                2
            }
            Command::RunState { running } => {
                body[..2].copy_from_slice(&cmd::RUN_STATE.to_le_bytes());
                body[2] = u8::from(running);
                3
            }
            Command::PostcopyAdvise { page_size } => {
                self.need_version(VERSION_POSTCOPY, "POSTCOPY_ADVISE")?;
                body[..2].copy_from_slice(&cmd::POSTCOPY_ADVISE.to_le_bytes());
                body[2..6].copy_from_slice(&page_size.to_le_bytes());
                10
            }
            Command::RecvBitmap { block } => {
                self.need_version(VERSION_RECOVERY, "RECV_BITMAP")?;
                body[..2].copy_from_slice(&cmd::RECV_BITMAP.to_le_bytes());
                body[2..4].copy_from_slice(&block.to_le_bytes());
                6
            }
            Command::PostcopyResume => {
                self.need_version(VERSION_RECOVERY, "POSTCOPY_RESUME")?;
                body[..2].copy_from_slice(&cmd::POSTCOPY_RESUME.to_le_bytes());
                2
            }
            Command::PostcopyPreempt { token } => {
                self.need_version(VERSION_PREEMPT, "POSTCOPY_PREEMPT")?;
                body[..2].copy_from_slice(&cmd::POSTCOPY_PREEMPT.to_le_bytes());
                body[2..18].copy_from_slice(&token);
                18
            }
            Command::PostcopyListen => {
                self.need_version(VERSION_POSTCOPY, "POSTCOPY_LISTEN")?;
                body[..2].copy_from_slice(&cmd::POSTCOPY_LISTEN.to_le_bytes());
                2
            }
            Command::MultifdChannels {
                channels,
                compression,
                id,
            } => {
                self.need_version(VERSION_MULTIFD, "MULTIFD_CHANNELS")?;
                body[..2].copy_from_slice(&cmd::MULTIFD_CHANNELS.to_le_bytes());
                body[2..4].copy_from_slice(&channels.to_le_bytes());
                body[4] = compression.to_wire();
                // body[5]: reserved, 0.
                let mut full = [0u8; 22];
                full[..6].copy_from_slice(&body[..6]);
                full[6..].copy_from_slice(&id);
                self.record(RecordKind::Command, &[&full])?;
                return Ok(());
            }
            Command::MultifdEnd => {
                self.need_version(VERSION_MULTIFD_POSTCOPY, "MULTIFD_END")?;
                body[..2].copy_from_slice(&cmd::MULTIFD_END.to_le_bytes());
                2
            }
            Command::PostcopyRun { crc32, total_bytes } => {
                self.need_version(VERSION_POSTCOPY, "POSTCOPY_RUN")?;
                body[..2].copy_from_slice(&cmd::POSTCOPY_RUN.to_le_bytes());
                body[2..6].copy_from_slice(&crc32.to_le_bytes());
                body[6..14].copy_from_slice(&total_bytes.to_le_bytes());
                14
            }
            Command::Capabilities {
                switchover_ack,
                validate_uuid,
                ram_digest,
                postcopy_ram,
                postcopy_preempt,
                multifd,
            } => {
                body[..2].copy_from_slice(&cmd::CAPABILITIES.to_le_bytes());
                let mut flags = 0;
                if switchover_ack {
                    flags |= cmd::CAP_SWITCHOVER_ACK;
                }
                if validate_uuid {
                    flags |= cmd::CAP_VALIDATE_UUID;
                }
                if ram_digest {
                    self.need_version(VERSION_RAM_DIGEST, "CAPABILITIES x-tern-ram-digest")?;
                    flags |= cmd::CAP_RAM_DIGEST;
                }
                if postcopy_ram {
                    self.need_version(VERSION_POSTCOPY, "CAPABILITIES postcopy-ram")?;
                    flags |= cmd::CAP_POSTCOPY_RAM;
                }
                if postcopy_preempt {
                    self.need_version(VERSION_PREEMPT, "CAPABILITIES postcopy-preempt")?;
                    flags |= cmd::CAP_POSTCOPY_PREEMPT;
                }
                if multifd && postcopy_ram {
                    self.need_version(
                        VERSION_MULTIFD_POSTCOPY,
                        "CAPABILITIES multifd with postcopy-ram",
                    )?;
                }
                if multifd {
                    self.need_version(VERSION_MULTIFD, "CAPABILITIES multifd")?;
                    flags |= cmd::CAP_MULTIFD;
                }
                body[2..6].copy_from_slice(&flags.to_le_bytes());
                6
            }
        };
        self.record(RecordKind::Command, &[&body[..n]])?;
        if let Some(b) = &mut self.batches {
            b.command_written(&command);
        }
        if command == Command::SwitchoverStart {
            self.switchover_started = true;
        }
        Ok(())
    }

    /// Writes a RAM_DIGEST record (§7a; version 2). `digest` must cover exactly the CONFIG's
    /// blocks; it must be the last record before [`StreamWriter::finish`].
    pub fn write_ram_digest(&mut self, digest: &RamDigest) -> Result<(), WireError> {
        self.check()?;
        self.need_version(VERSION_RAM_DIGEST, "RAM_DIGEST")?;
        let shift_ok =
            (self.page_size.trailing_zeros()..=MAX_CHUNK_SHIFT).contains(&digest.chunk_shift);
        let block_sizes: Vec<u64> = self
            .block_pages
            .iter()
            .map(|p| p * u64::from(self.page_size))
            .collect();
        let shape_ok = shift_ok
            && digest.blocks.len() == block_sizes.len()
            && digest
                .blocks
                .iter()
                .zip(&block_sizes)
                .all(|(d, &size)| d.len() as u64 == chunk_count(size, digest.chunk_shift));
        if !shape_ok {
            return Err(WireError::InvalidArgument(
                "RAM digest does not match the stream's RAM blocks".into(),
            ));
        }
        let mut body =
            Vec::with_capacity(8 + 8 * digest.blocks.iter().map(Vec::len).sum::<usize>());
        body.extend_from_slice(&ALGORITHM_XXH3_64.to_le_bytes());
        body.extend_from_slice(&0u16.to_le_bytes());
        body.extend_from_slice(&digest.chunk_shift.to_le_bytes());
        for d in digest.blocks.iter().flatten() {
            body.extend_from_slice(&d.to_le_bytes());
        }
        self.record(RecordKind::RamDigest, &[&body])
    }

    fn need_version(&mut self, version: u32, what: &str) -> Result<(), WireError> {
        if self.version < version {
            return Err(WireError::InvalidArgument(format!(
                "{what} needs stream version {version}; this stream is version {}",
                self.version
            )));
        }
        Ok(())
    }

    /// Writes `POSTCOPY_RUN` with the checksum of everything written so far (§13.4).
    pub fn write_postcopy_run(&mut self) -> Result<(), WireError> {
        let crc32 = self.crc.clone().finalize();
        let total_bytes = self.body_bytes;
        self.write_command(Command::PostcopyRun { crc32, total_bytes })
    }

    /// Writes RAM_DISCARD records for `block` (§13.3; version 3), split at `max_discard_ranges`.
    /// `ranges` are `(first_page, pages)`, ascending, not overlapping, inside the block.
    /// Before `SWITCHOVER_START` (the early discard) it needs version 7
    /// ([`WireError::EarlyDiscardNeedsVersion`]): an older reader refuses it.
    pub fn write_ram_discard(
        &mut self,
        block: u16,
        ranges: &[(u32, u32)],
    ) -> Result<(), WireError> {
        self.check()?;
        self.need_version(VERSION_POSTCOPY, "RAM_DISCARD")?;
        if !self.switchover_started && self.version < VERSION_EARLY_DISCARD {
            return Err(WireError::EarlyDiscardNeedsVersion {
                version: self.version,
                needs: VERSION_EARLY_DISCARD,
            });
        }
        let pages = self
            .block_pages
            .get(usize::from(block))
            .copied()
            .ok_or_else(|| WireError::InvalidArgument(format!("discard of block {block}")))?;
        let mut end = 0u64;
        for &(first, n) in ranges {
            let stop = u64::from(first) + u64::from(n);
            if n == 0 || u64::from(first) < end || stop > pages {
                return Err(WireError::InvalidArgument(format!(
                    "discard range {first}+{n} of block {block} (ascending, non-empty, inside {pages} pages)"
                )));
            }
            end = stop;
        }
        for chunk in ranges.chunks(self.max_discard_ranges) {
            let mut body = Vec::with_capacity(8 + 8 * chunk.len());
            body.extend_from_slice(&block.to_le_bytes());
            body.extend_from_slice(&0u16.to_le_bytes());
            body.extend_from_slice(&(chunk.len() as u32).to_le_bytes());
            for &(first, n) in chunk {
                body.extend_from_slice(&first.to_le_bytes());
                body.extend_from_slice(&n.to_le_bytes());
            }
            self.record(RecordKind::RamDiscard, &[&body])?;
        }
        Ok(())
    }

    /// Writes the END record (checksum of everything since the header), flushes and returns the
    /// underlying writer.
    pub fn finish(mut self) -> Result<W, WireError> {
        self.check()?;
        let crc = self.crc.clone().finalize();
        let mut body = [0u8; END_BODY_LEN];
        body[..4].copy_from_slice(&crc.to_le_bytes());
        body[4..].copy_from_slice(&self.body_bytes.to_le_bytes());
        self.record(RecordKind::End, &[&body])?;
        self.inner
            .flush()
            .map_err(|e| self.io_err(e, "flushing the end record"))?;
        Ok(self.inner)
    }

    fn check(&self) -> Result<(), WireError> {
        if self.poisoned {
            Err(WireError::Finished("broken by an earlier write error"))
        } else {
            Ok(())
        }
    }

    fn io_err(&mut self, e: std::io::Error, what: &'static str) -> WireError {
        self.poisoned = true;
        WireError::Io {
            offset: self.bytes_written(),
            what,
            source: e,
        }
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), WireError> {
        self.put_uncovered(bytes)?;
        self.crc.update(bytes);
        Ok(())
    }

    /// Writes bytes that END's CRC does not cover (a version-5 RAM record, §5.1).
    fn put_uncovered(&mut self, bytes: &[u8]) -> Result<(), WireError> {
        self.inner
            .write_all(bytes)
            .map_err(|e| self.io_err(e, "writing a record"))?;
        self.body_bytes += bytes.len() as u64;
        Ok(())
    }

    /// Writes `slices` in order (vectored, resuming after short writes), uncovered by END's
    /// CRC as [`StreamWriter::put_uncovered`].
    fn put_vectored(&mut self, slices: &mut [IoSlice<'_>]) -> Result<(), WireError> {
        let mut rest: &mut [IoSlice<'_>] = slices;
        while !rest.is_empty() {
            match self.inner.write_vectored(rest) {
                Ok(0) => {
                    let e = std::io::Error::new(std::io::ErrorKind::WriteZero, "wrote nothing");
                    return Err(self.io_err(e, "writing a record"));
                }
                Ok(n) => {
                    self.body_bytes += n as u64;
                    IoSlice::advance_slices(&mut rest, n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io_err(e, "writing a record")),
            }
        }
        Ok(())
    }

    /// Writes one record whose body is the concatenation of `parts`.
    fn record(&mut self, kind: RecordKind, parts: &[&[u8]]) -> Result<(), WireError> {
        self.check()?;
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let len = u32::try_from(len).map_err(|_| {
            WireError::InvalidArgument(format!("{} record of {len} bytes", kind.name()))
        })?;
        let mut frame = [0u8; 5];
        frame[0] = kind as u8;
        frame[1..].copy_from_slice(&len.to_le_bytes());
        self.put(&frame)?;
        for p in parts {
            self.put(p)?;
        }
        Ok(())
    }

    fn component(
        &mut self,
        kind: RecordKind,
        id: &str,
        instance: u32,
        version: u32,
        data: &[u8],
    ) -> Result<(), WireError> {
        if id.is_empty() || id.len() > self.max_string_len {
            return Err(WireError::InvalidArgument(format!(
                "component id '{id}': length {} not in 1..={}",
                id.len(),
                self.max_string_len
            )));
        }
        let mut head = Vec::with_capacity(1 + id.len() + 8);
        put_str8(&mut head, id);
        head.extend_from_slice(&instance.to_le_bytes());
        head.extend_from_slice(&version.to_le_bytes());
        if (head.len() + data.len()) as u64 > u64::from(self.max_section_size) {
            return Err(WireError::InvalidArgument(format!(
                "{} '{id}' of {} bytes exceeds the section limit of {}",
                kind.name(),
                data.len(),
                self.max_section_size
            )));
        }
        self.record(kind, &[&head, data])
    }

    fn ram_record(&mut self, pages: &[RamPage<'_>]) -> Result<(), WireError> {
        if pages.is_empty() {
            return Ok(());
        }
        let ps = self.page_size as usize;
        let mut table = std::mem::take(&mut self.table);
        table.clear();
        table.extend_from_slice(&(pages.len() as u32).to_le_bytes());
        let mut normal = 0usize;
        for p in pages {
            let Some(&npages) = self.block_pages.get(usize::from(p.block)) else {
                self.table = table;
                return Err(WireError::InvalidArgument(format!(
                    "RAM block {} does not exist ({} blocks)",
                    p.block,
                    self.block_pages.len()
                )));
            };
            if u64::from(p.page) >= npages {
                self.table = table;
                return Err(WireError::InvalidArgument(format!(
                    "page {} out of range for block {} ({npages} pages)",
                    p.page, p.block
                )));
            }
            let kind = match p.data {
                PageData::Zero => page_kind::ZERO,
                PageData::Normal(d) => {
                    if d.len() != ps {
                        self.table = table;
                        return Err(WireError::InvalidArgument(format!(
                            "page {} of block {}: {} bytes of data, page size is {ps}",
                            p.page,
                            p.block,
                            d.len()
                        )));
                    }
                    normal += 1;
                    page_kind::NORMAL
                }
            };
            table.extend_from_slice(&p.page.to_le_bytes());
            table.extend_from_slice(&p.block.to_le_bytes());
            table.push(kind);
            table.push(0);
        }
        debug_assert_eq!(table.len(), 4 + pages.len() * RAM_ENTRY_LEN);
        let framing = if self.batches.is_some() {
            BATCH_OVERHEAD
        } else {
            0
        };
        let len = framing + table.len() + normal * ps;
        let result = (|| {
            let len = u32::try_from(len)
                .map_err(|_| WireError::InvalidArgument(format!("RAM record of {len} bytes")))?;
            self.check()?;
            let mut frame = [0u8; 5];
            frame[0] = RecordKind::Ram as u8;
            frame[1..].copy_from_slice(&len.to_le_bytes());
            match self.batches.as_ref().map(BatchNumbering::next) {
                // Version 5: header, table, data, then the CRC-32C of all of it and the frame,
                // computed as the bytes go out (they are hot in the cache); END leaves it out.
                // One vectored write: a `BufWriter` hands a batch larger than its buffer
                // straight to the socket instead of copying every page into its buffer.
                Some(header) => {
                    let head = header.encode();
                    let mut crc = BatchCrc::new();
                    let mut slices = Vec::with_capacity(normal + 4);
                    for part in [&frame[..], &head[..], &table[..]] {
                        crc.update(part);
                        slices.push(IoSlice::new(part));
                    }
                    for p in pages {
                        if let PageData::Normal(d) = p.data {
                            crc.update(d);
                            slices.push(IoSlice::new(d));
                        }
                    }
                    let trailer = crc.value().to_le_bytes();
                    slices.push(IoSlice::new(&trailer));
                    self.put_vectored(&mut slices)?;
                    if let Some(b) = &mut self.batches {
                        b.written();
                    }
                }
                None => {
                    self.put(&frame)?;
                    self.put(&table)?;
                    for p in pages {
                        if let PageData::Normal(d) = p.data {
                            self.put(d)?;
                        }
                    }
                }
            }
            Ok(())
        })();
        self.table = table;
        result
    }
}
