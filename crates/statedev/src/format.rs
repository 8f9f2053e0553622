//! The device's own chunk format, carried inside the engine's `DEVICE_CHUNK` (pre-copy) and
//! `SECTION` (final state) payloads. One payload holds one or more records, little-endian:
//!
//! | tag | record | body |
//! | --- | --- | --- |
//! | 1 | `META` | magic `TSDV`, format u32, size u64, chunk size u32, seed u64 |
//! | 2 | `DATA` | flags u8 (bit 0 = initial pass), offset u64, length u32, `length` bytes |
//! | 3 | `INIT_DONE` | initial bytes u64 (= size): the initial data is complete (QEMU VFIO `VFIO_MIG_FLAG_DEV_INIT_DATA_SENT`) |
//! | 4 | `FINAL` | digest u64, mutation generation u64 (last record of the `SECTION`) |
//!
//! Offsets and lengths of `DATA` are multiples of [`GRAIN`]. The decoder only checks the
//! framing; the loader checks the values against its device.

use crate::error::StateDevError;

/// Version of this record format (in `META`).
pub const FORMAT_VERSION: u32 = 1;
/// Alignment of `DATA` offsets and lengths.
pub const GRAIN: u64 = 512;
/// `META` magic.
pub const MAGIC: [u8; 4] = *b"TSDV";

const TAG_META: u8 = 1;
const TAG_DATA: u8 = 2;
const TAG_INIT_DONE: u8 = 3;
const TAG_FINAL: u8 = 4;

/// Encoded size of a `META` record.
pub const META_LEN: usize = 1 + 4 + 4 + 8 + 4 + 8;
/// Encoded size of a `DATA` record without its bytes.
pub const DATA_HEADER_LEN: usize = 1 + 1 + 8 + 4;
/// Encoded size of an `INIT_DONE` record.
pub const INIT_DONE_LEN: usize = 1 + 8;
/// Encoded size of a `FINAL` record.
pub const FINAL_LEN: usize = 1 + 8 + 8;

/// `DATA` flag: the piece belongs to the initial pass.
pub const DATA_INITIAL: u8 = 1;

/// One decoded record (borrowing the payload).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record<'a> {
    /// Device metadata: the first record of the stream.
    Meta {
        /// Record format version.
        format: u32,
        /// Bytes of device state.
        size: u64,
        /// The source's dirty-tracking chunk size.
        chunk_size: u32,
        /// The source's content seed (informational).
        seed: u64,
    },
    /// A piece of the state.
    Data {
        /// [`DATA_INITIAL`] or 0.
        flags: u8,
        /// Byte offset in the state.
        offset: u64,
        /// The bytes.
        bytes: &'a [u8],
    },
    /// The initial data is complete.
    InitDone {
        /// Bytes the initial pass covered.
        initial_bytes: u64,
    },
    /// The state at the switchover.
    Final {
        /// [`crate::digest_bytes`] of the whole state.
        digest: u64,
        /// Number of mutations the device had done.
        generation: u64,
    },
}

/// Appends a `META` record.
pub fn put_meta(out: &mut Vec<u8>, size: u64, chunk_size: u32, seed: u64) {
    out.push(TAG_META);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&size.to_le_bytes());
    out.extend_from_slice(&chunk_size.to_le_bytes());
    out.extend_from_slice(&seed.to_le_bytes());
}

/// Appends a `DATA` record (`bytes.len()` must fit in u32).
pub fn put_data(out: &mut Vec<u8>, flags: u8, offset: u64, bytes: &[u8]) {
    out.push(TAG_DATA);
    out.push(flags);
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Appends an `INIT_DONE` record.
pub fn put_init_done(out: &mut Vec<u8>, initial_bytes: u64) {
    out.push(TAG_INIT_DONE);
    out.extend_from_slice(&initial_bytes.to_le_bytes());
}

/// Appends a `FINAL` record.
pub fn put_final(out: &mut Vec<u8>, digest: u64, generation: u64) {
    out.push(TAG_FINAL);
    out.extend_from_slice(&digest.to_le_bytes());
    out.extend_from_slice(&generation.to_le_bytes());
}

/// Iterates over the records of one payload; every length is checked against what is left, so
/// a hostile payload yields an error, never a panic or an allocation.
#[derive(Debug)]
pub struct RecordReader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> RecordReader<'a> {
    /// A reader over `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], StateDevError> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(StateDevError::Stream(format!(
                "truncated {what} record at byte {} of a {}-byte payload",
                self.pos,
                self.buf.len()
            ))),
        }
    }

    fn u8(&mut self, what: &str) -> Result<u8, StateDevError> {
        Ok(self.take(1, what)?[0])
    }

    fn u32(&mut self, what: &str) -> Result<u32, StateDevError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &str) -> Result<u64, StateDevError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// The next record, `Ok(None)` at the end of the payload.
    pub fn next_record(&mut self) -> Result<Option<Record<'a>>, StateDevError> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let at = self.pos;
        let tag = self.u8("record")?;
        let rec = match tag {
            TAG_META => {
                let magic = self.take(4, "META")?;
                if magic != MAGIC {
                    return Err(StateDevError::Stream(format!(
                        "META magic {magic:02x?} is not {MAGIC:02x?} (not a statedev stream)"
                    )));
                }
                Record::Meta {
                    format: self.u32("META")?,
                    size: self.u64("META")?,
                    chunk_size: self.u32("META")?,
                    seed: self.u64("META")?,
                }
            }
            TAG_DATA => {
                let flags = self.u8("DATA")?;
                let offset = self.u64("DATA")?;
                let len = self.u32("DATA")?;
                let bytes = self.take(len as usize, "DATA")?;
                Record::Data {
                    flags,
                    offset,
                    bytes,
                }
            }
            TAG_INIT_DONE => Record::InitDone {
                initial_bytes: self.u64("INIT_DONE")?,
            },
            TAG_FINAL => Record::Final {
                digest: self.u64("FINAL")?,
                generation: self.u64("FINAL")?,
            },
            t => {
                return Err(StateDevError::Stream(format!(
                    "unknown record tag {t} at byte {at}"
                )))
            }
        };
        Ok(Some(rec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut b = Vec::new();
        put_meta(&mut b, 1 << 20, 4096, 7);
        put_data(&mut b, DATA_INITIAL, 512, &[9; 1024]);
        put_init_done(&mut b, 1 << 20);
        put_final(&mut b, 0xabcd, 3);
        assert_eq!(
            b.len(),
            META_LEN + DATA_HEADER_LEN + 1024 + INIT_DONE_LEN + FINAL_LEN
        );
        let mut r = RecordReader::new(&b);
        assert_eq!(
            r.next_record().unwrap(),
            Some(Record::Meta {
                format: FORMAT_VERSION,
                size: 1 << 20,
                chunk_size: 4096,
                seed: 7
            })
        );
        assert!(matches!(
            r.next_record().unwrap(),
            Some(Record::Data { flags: 1, offset: 512, bytes }) if bytes.len() == 1024
        ));
        assert_eq!(
            r.next_record().unwrap(),
            Some(Record::InitDone {
                initial_bytes: 1 << 20
            })
        );
        assert_eq!(
            r.next_record().unwrap(),
            Some(Record::Final {
                digest: 0xabcd,
                generation: 3
            })
        );
        assert_eq!(r.next_record().unwrap(), None);
    }

    #[test]
    fn every_truncation_and_garbage_is_an_error_not_a_panic() {
        let mut b = Vec::new();
        put_meta(&mut b, 1 << 20, 4096, 7);
        put_data(&mut b, 0, 0, &[1; 600]);
        put_final(&mut b, 1, 2);
        for cut in 0..b.len() {
            let mut r = RecordReader::new(&b[..cut]);
            let mut n = 0;
            loop {
                match r.next_record() {
                    Ok(Some(_)) => n += 1,
                    Ok(None) => break,
                    Err(e) => {
                        assert!(e.to_string().contains("truncated"), "{e}");
                        break;
                    }
                }
                assert!(n < 4);
            }
        }
        // A DATA record claiming 4 GiB of bytes in a tiny payload.
        let mut h = vec![TAG_DATA, 0];
        h.extend_from_slice(&0u64.to_le_bytes());
        h.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(RecordReader::new(&h).next_record().is_err());
        let e = RecordReader::new(&[0x77]).next_record().unwrap_err();
        assert!(e.to_string().contains("unknown record tag 119"), "{e}");
        let mut m = Vec::new();
        put_meta(&mut m, 1, 1, 1);
        m[1] = b'X';
        let e = RecordReader::new(&m).next_record().unwrap_err();
        assert!(e.to_string().contains("magic"), "{e}");
    }
}
