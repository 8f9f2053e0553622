//! Compressed multifd batches (`docs/stream-format.md` §5.3, `multifd-compression`): the
//! method as the wire names it, and one reusable compressor / decompressor per channel.
//!
//! A batch's page data is one complete zlib stream (RFC 1950) or one zstd frame (RFC 8878).
//! The contexts are created once per channel and reset per batch (their allocations are
//! kept: no per-batch allocation churn), so every batch is independent. The decompressor
//! writes into a buffer of exactly the length the batch's table implies and never grows it:
//! a stream that would produce more is refused as a decompression bomb.

use std::fmt;

use flate2::{Compress, Decompress, FlushCompress, FlushDecompress, Status};

/// The compression a multifd migration negotiated (`MULTIFD_CHANNELS` byte 2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compression {
    /// Page data as it is (0).
    #[default]
    None,
    /// zlib (1).
    Zlib,
    /// zstd (2).
    Zstd,
}

impl Compression {
    /// The wire byte.
    pub fn to_wire(self) -> u8 {
        match self {
            Self::None => 0,
            Self::Zlib => 1,
            Self::Zstd => 2,
        }
    }

    /// From the wire byte; `None` for an unknown value.
    pub fn from_wire(b: u8) -> Option<Self> {
        match b {
            0 => Some(Self::None),
            1 => Some(Self::Zlib),
            2 => Some(Self::Zstd),
            _ => None,
        }
    }

    /// QEMU's name (`multifd-compression`).
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Zlib => "zlib",
            Self::Zstd => "zstd",
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

enum Packer {
    Zlib(Box<Compress>),
    Zstd(zstd::bulk::Compressor<'static>),
}

/// One channel's compressor (reused for every batch of the channel).
pub struct BatchCompressor {
    packer: Packer,
    /// The pages gathered for zstd's one-shot API (reused).
    staging: Vec<u8>,
}

impl fmt::Debug for BatchCompressor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = match self.packer {
            Packer::Zlib(_) => "zlib",
            Packer::Zstd(_) => "zstd",
        };
        f.debug_struct("BatchCompressor")
            .field("method", &m)
            .finish()
    }
}

impl BatchCompressor {
    /// A compressor for `method` at `level` (zlib 0..=9, zstd 0..=20; QEMU's ranges, checked
    /// by the parameters). `None` for `Compression::None`.
    pub fn new(method: Compression, level: u8) -> Result<Option<Self>, String> {
        let packer = match method {
            Compression::None => return Ok(None),
            Compression::Zlib => Packer::Zlib(Box::new(Compress::new(
                flate2::Compression::new(u32::from(level.min(9))),
                true,
            ))),
            Compression::Zstd => Packer::Zstd(
                zstd::bulk::Compressor::new(i32::from(level))
                    .map_err(|e| format!("zstd level {level}: {e}"))?,
            ),
        };
        Ok(Some(Self {
            packer,
            staging: Vec::new(),
        }))
    }

    /// Compresses the concatenation of `pieces` into `out` (cleared first, grown as needed
    /// once, then reused). Returns `false` when the compressed form would not be smaller than
    /// the input (the caller then sends the batch plain; §5.3), `out` then undefined.
    pub fn compress<'a, I>(&mut self, pieces: I, out: &mut Vec<u8>) -> Result<bool, String>
    where
        I: IntoIterator<Item = &'a [u8]>,
        I::IntoIter: Clone,
    {
        let pieces = pieces.into_iter();
        let raw: usize = pieces.clone().map(<[u8]>::len).sum();
        if raw == 0 {
            return Ok(false);
        }
        // Room for exactly `raw - 1` bytes: anything that does not fit is not worth sending.
        out.clear();
        out.resize(raw - 1, 0);
        match &mut self.packer {
            Packer::Zlib(c) => {
                c.reset();
                for piece in pieces {
                    let mut input = piece;
                    while !input.is_empty() {
                        let (in0, at) = (c.total_in(), c.total_out() as usize);
                        let Some(dst) = out.get_mut(at..).filter(|d| !d.is_empty()) else {
                            return Ok(false);
                        };
                        c.compress(input, dst, FlushCompress::None)
                            .map_err(|e| format!("zlib: {e}"))?;
                        let used = (c.total_in() - in0) as usize;
                        if used == 0 && c.total_out() as usize == at {
                            return Ok(false);
                        }
                        input = input.get(used..).unwrap_or(&[]);
                    }
                }
                loop {
                    let at = c.total_out() as usize;
                    let Some(dst) = out.get_mut(at..).filter(|d| !d.is_empty()) else {
                        return Ok(false);
                    };
                    let status = c
                        .compress(&[], dst, FlushCompress::Finish)
                        .map_err(|e| format!("zlib: {e}"))?;
                    if status == Status::StreamEnd {
                        break;
                    }
                    if c.total_out() as usize == at {
                        return Ok(false);
                    }
                }
                let n = c.total_out() as usize;
                out.truncate(n);
                Ok(true)
            }
            Packer::Zstd(z) => {
                self.staging.clear();
                for p in pieces {
                    self.staging.extend_from_slice(p);
                }
                match z.compress_to_buffer(self.staging.as_slice(), out.as_mut_slice()) {
                    Ok(n) => {
                        out.truncate(n);
                        Ok(true)
                    }
                    // "Destination buffer is too small": not smaller than the input.
                    Err(_) => Ok(false),
                }
            }
        }
    }
}

enum Unpacker {
    Zlib(Box<Decompress>),
    Zstd(zstd::bulk::Decompressor<'static>),
}

/// One channel's decompressor (reused for every batch of the channel).
pub struct BatchDecompressor {
    unpacker: Unpacker,
}

impl fmt::Debug for BatchDecompressor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = match self.unpacker {
            Unpacker::Zlib(_) => "zlib",
            Unpacker::Zstd(_) => "zstd",
        };
        f.debug_struct("BatchDecompressor")
            .field("method", &m)
            .finish()
    }
}

impl BatchDecompressor {
    /// A decompressor for `method`; `None` for `Compression::None`.
    pub fn new(method: Compression) -> Result<Option<Self>, String> {
        let unpacker = match method {
            Compression::None => return Ok(None),
            Compression::Zlib => Unpacker::Zlib(Box::new(Decompress::new(true))),
            Compression::Zstd => {
                Unpacker::Zstd(zstd::bulk::Decompressor::new().map_err(|e| format!("zstd: {e}"))?)
            }
        };
        Ok(Some(Self { unpacker }))
    }

    /// Decompresses `input` (one complete stream / frame) into exactly `out` (its length is
    /// what the batch's table implies). The error says what was wrong.
    pub fn decompress(&mut self, input: &[u8], out: &mut [u8]) -> Result<(), String> {
        let want = out.len();
        match &mut self.unpacker {
            Unpacker::Zlib(d) => {
                d.reset(true);
                let status = d
                    .decompress(input, out, FlushDecompress::Finish)
                    .map_err(|e| format!("not a valid zlib stream: {e}"))?;
                let produced = d.total_out() as usize;
                let consumed = d.total_in() as usize;
                match status {
                    Status::StreamEnd if produced != want => Err(format!(
                        "decompresses to {produced} bytes, the table says {want}"
                    )),
                    Status::StreamEnd if consumed != input.len() => Err(format!(
                        "{} byte(s) after the end of the zlib stream",
                        input.len() - consumed
                    )),
                    Status::StreamEnd => Ok(()),
                    _ if produced >= want => Err(format!(
                        "decompresses to more than the {want} bytes the table says (a \
                         decompression bomb)"
                    )),
                    _ => Err(format!(
                        "the zlib stream ends early: {produced} of {want} bytes"
                    )),
                }
            }
            Unpacker::Zstd(d) => {
                // The frame header may state its content size: refuse a lie before decoding.
                if let Ok(Some(size)) = zstd::zstd_safe::get_frame_content_size(input) {
                    if size != want as u64 {
                        return Err(if size > want as u64 {
                            format!(
                                "the zstd frame says {size} bytes, more than the {want} the \
                                 table says (a decompression bomb)"
                            )
                        } else {
                            format!("the zstd frame says {size} bytes, the table says {want}")
                        });
                    }
                }
                let n = d.decompress_to_buffer(input, out).map_err(|e| {
                    let text = e.to_string();
                    if text.contains("too small") {
                        format!(
                            "decompresses to more than the {want} bytes the table says (a \
                             decompression bomb)"
                        )
                    } else {
                        format!("not a valid zstd frame: {text}")
                    }
                })?;
                if n != want {
                    return Err(format!("decompresses to {n} bytes, the table says {want}"));
                }
                let frame = zstd::zstd_safe::find_frame_compressed_size(input)
                    .map_err(|e| format!("not a valid zstd frame: {e}"))?;
                if frame != input.len() {
                    return Err(format!(
                        "{} byte(s) after the end of the zstd frame",
                        input.len() - frame
                    ));
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(len: usize) -> Vec<u8> {
        (0..len).map(|i| b"tern migrates pages "[i % 20]).collect()
    }

    #[test]
    fn round_trip_both_methods_from_several_pieces() {
        let a = text(4096);
        let b = text(4096);
        for m in [Compression::Zlib, Compression::Zstd] {
            let mut c = BatchCompressor::new(m, 1).unwrap().unwrap();
            let mut d = BatchDecompressor::new(m).unwrap().unwrap();
            let mut z = Vec::new();
            for _ in 0..3 {
                assert!(c.compress([&a[..], &b[..]], &mut z).unwrap(), "{m}");
                assert!(z.len() < 8192, "{m}: {}", z.len());
                let mut out = vec![0u8; 8192];
                d.decompress(&z, &mut out).unwrap();
                assert_eq!(&out[..4096], &a[..]);
                assert_eq!(&out[4096..], &b[..]);
            }
        }
    }

    #[test]
    fn incompressible_data_is_not_compressed() {
        let mut x = 0x1234_5678_9abc_def0u64;
        let noise: Vec<u8> = (0..8192)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        for m in [Compression::Zlib, Compression::Zstd] {
            let mut c = BatchCompressor::new(m, 1).unwrap().unwrap();
            let mut z = Vec::new();
            assert!(!c.compress([&noise[..]], &mut z).unwrap(), "{m}");
        }
        // zlib level 0 stores: never smaller.
        let mut c = BatchCompressor::new(Compression::Zlib, 0).unwrap().unwrap();
        let mut z = Vec::new();
        assert!(!c.compress([&text(4096)[..]], &mut z).unwrap());
    }

    #[test]
    fn wrong_length_bomb_garbage_and_trailing_bytes_are_refused() {
        let page = text(4096);
        for m in [Compression::Zlib, Compression::Zstd] {
            let mut c = BatchCompressor::new(m, 1).unwrap().unwrap();
            let mut d = BatchDecompressor::new(m).unwrap().unwrap();
            let mut z = Vec::new();
            assert!(c.compress([&page[..], &page[..]], &mut z).unwrap());
            let mut small = vec![0u8; 4096];
            let e = d.decompress(&z, &mut small).unwrap_err();
            assert!(e.contains("more than"), "{m}: {e}");
            let mut big = vec![0u8; 3 * 4096];
            let e = d.decompress(&z, &mut big).unwrap_err();
            assert!(e.contains("8192") && e.contains("12288"), "{m}: {e}");
            let mut out = vec![0u8; 8192];
            let e = d.decompress(&[0x55; 64], &mut out).unwrap_err();
            assert!(e.contains("not a valid"), "{m}: {e}");
            let mut trailing = z.clone();
            trailing.extend_from_slice(&[1, 2, 3]);
            let e = d.decompress(&trailing, &mut out).unwrap_err();
            assert!(
                e.contains("after the end") || e.contains("not a valid"),
                "{m}: {e}"
            );
            // The context is still good after refusals.
            d.decompress(&z, &mut out).unwrap();
            assert_eq!(&out[..4096], &page[..]);
        }
    }

    #[test]
    fn wire_bytes_round_trip() {
        for m in [Compression::None, Compression::Zlib, Compression::Zstd] {
            assert_eq!(Compression::from_wire(m.to_wire()), Some(m));
        }
        assert_eq!(Compression::from_wire(3), None);
    }
}
