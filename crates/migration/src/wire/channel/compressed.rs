//! Compressed batches on a multifd channel (`docs/stream-format.md` §5.3, version 7): the
//! writer packs a batch's page data with its channel's [`BatchCompressor`] (or leaves the batch
//! plain when that does not make it smaller), the reader checks a compressed batch's table and
//! lengths and only then decompresses it into its channel's own buffer.

use std::io::{IoSlice, Read, Write};

use super::{ChannelReader, ChannelWriter};
use crate::wire::compress::{BatchCompressor, BatchDecompressor, Compression};
use crate::wire::error::WireError;
use crate::wire::format::{BATCH_FLAG_COMPRESSED, BATCH_OVERHEAD, FRAME_LEN, RAM_ENTRY_LEN};
use crate::wire::ram_batch::{check_entries, BatchCrc};
use crate::wire::reader::body_of;
use crate::wire::record::{PageData, RamPage};

impl<W: Write> ChannelWriter<W> {
    /// Packs the page data of every later batch with `method` at `level` (zlib 0..=9, zstd
    /// 0..=20); `Compression::None` writes plain batches. The destination must have been told
    /// the same method in `MULTIFD_CHANNELS`.
    pub fn set_compression(&mut self, method: Compression, level: u8) -> Result<(), WireError> {
        self.compressor = BatchCompressor::new(method, level).map_err(|e| {
            WireError::InvalidArgument(format!("multifd channel {}: {e}", self.channel))
        })?;
        Ok(())
    }

    /// Writes `pages` as a compressed batch; `head` holds the frame and batch header to fill,
    /// the count and the entry table. `Ok(false)`: compressed it would not be smaller, nothing
    /// was written and `head` is as it was.
    pub(super) fn write_compressed(
        &mut self,
        head: &mut Vec<u8>,
        pages: &[RamPage<'_>],
        normal: usize,
    ) -> Result<bool, WireError> {
        let Some(c) = self.compressor.as_mut() else {
            return Ok(false);
        };
        let pieces = pages.iter().filter_map(|p| match p.data {
            PageData::Normal(d) => Some(d),
            PageData::Zero => None,
        });
        let mut packed = std::mem::take(&mut self.packed);
        let smaller = c.compress(pieces, &mut packed).map_err(|e| {
            WireError::InvalidArgument(format!(
                "multifd channel {}: compressing a batch: {e}",
                self.channel
            ))
        });
        if !matches!(smaller, Ok(true)) {
            self.packed = packed;
            return smaller;
        }
        let raw = normal * self.page_size;
        // A batch is at most 1024 pages of at most 2 MiB: its lengths fit in u32.
        head.extend_from_slice(&(raw as u32).to_le_bytes());
        let len = BATCH_OVERHEAD + 4 + pages.len() * RAM_ENTRY_LEN + 4 + packed.len();
        self.fill_prefix(head, len, BATCH_FLAG_COMPRESSED);
        let mut crc = BatchCrc::new();
        crc.update(head);
        crc.update(&packed);
        let trailer = crc.value().to_le_bytes();
        let mut slices = [
            IoSlice::new(head),
            IoSlice::new(&packed),
            IoSlice::new(&trailer),
        ];
        let r = self.write_slices(&mut slices, (FRAME_LEN + len) as u64);
        self.raw_bytes += raw as u64;
        self.packed_bytes += packed.len() as u64;
        self.packed = packed;
        r.map(|()| true)
    }

    /// Page data bytes packed so far and the compressed bytes they became (0, 0 without
    /// compression; batches sent plain are not counted).
    pub fn compression_counts(&self) -> (u64, u64) {
        (self.raw_bytes, self.packed_bytes)
    }
}

impl<R: Read> ChannelReader<R> {
    /// Expects batches packed with `method` (what `MULTIFD_CHANNELS` said and this side's
    /// `multifd-compression` agreed to); `Compression::None` refuses the `COMPRESSED` flag.
    pub fn with_decompression(mut self, method: Compression) -> Result<Self, WireError> {
        self.decompressor = BatchDecompressor::new(method).map_err(|e| {
            WireError::InvalidArgument(format!("multifd channel {}: {e}", self.channel))
        })?;
        Ok(self)
    }

    /// Capacities of the record buffer and the decompression buffer (the fuzz tests check
    /// they stay within the limits).
    #[cfg(test)]
    pub(crate) fn buffer_capacities(&self) -> (usize, usize) {
        (self.buf.capacity(), self.unpacked.capacity())
    }

    /// The compressed batch in the body buffer, whose CRC, header, generation and sequence
    /// were checked: its table (at body offset `start`, stream offset `table_at`), `raw_len`,
    /// the compressed length, then the data is decompressed into the channel's buffer.
    /// Returns `(count, normal, body offset where the table ends)`.
    pub(super) fn unpack(
        &mut self,
        frame_at: u64,
        table_at: u64,
        seq: u64,
        start: usize,
        covered_len: usize,
    ) -> Result<(usize, usize, usize), WireError> {
        let channel = self.channel;
        let bad = |reason: String| WireError::BadCompressedBatch {
            channel,
            seq,
            offset: frame_at,
            reason,
        };
        let body = body_of(&self.buf, self.body_len);
        let covered = body.get(..covered_len).unwrap_or(&[]);
        let rest = covered.get(start..).unwrap_or(&[]);
        let (count, normal) =
            check_entries(rest, table_at, &self.block_pages, self.max_pages_per_batch)?;
        if normal == 0 {
            return Err(bad(
                "no NORMAL page in its table: nothing to decompress".into()
            ));
        }
        let table_end = start + 4 + count * RAM_ENTRY_LEN;
        let Some(raw) = covered.get(table_end..table_end + 4) else {
            return Err(bad("the batch ends before its uncompressed length".into()));
        };
        let raw = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]) as usize;
        let want = normal * self.page_size;
        if raw != want {
            return Err(bad(format!(
                "uncompressed length {raw}, but its table's {normal} page(s) of {} bytes make \
                 {want}",
                self.page_size
            )));
        }
        let data = covered.get(table_end + 4..).unwrap_or(&[]);
        if data.is_empty() || data.len() > want {
            return Err(bad(format!(
                "{} compressed byte(s) for {want} bytes of pages: must be 1..={want} (a batch \
                 that does not shrink travels plain)",
                data.len()
            )));
        }
        if self.unpacked.len() < want {
            self.unpacked.resize(want, 0);
        }
        let (Some(d), Some(out)) = (self.decompressor.as_mut(), self.unpacked.get_mut(..want))
        else {
            return Err(bad("no decompressor on this channel".into()));
        };
        d.decompress(data, out).map_err(bad)?;
        self.last_unpacked = true;
        Ok((count, normal, table_end))
    }
}
