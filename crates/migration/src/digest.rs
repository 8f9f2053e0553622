//! The RAM digest (`x-tern-ram-digest`, stream record `RAM_DIGEST`, `docs/stream-format.md`
//! §7a): every migration can prove that the destination's memory is the source's.
//!
//! The source hashes its guest memory with the vCPUs stopped, chunk by chunk (XXH3-64 of each
//! [`DEFAULT_CHUNK_SHIFT`]-sized chunk), and sends the digests before END. The destination hashes
//! its own memory the same way once every page has arrived and before anything is restored; a
//! difference fails the migration (the source resumes). Memory is read where it lies (a
//! [`RamView`]), not from what was sent, so a page the dirty log missed, a page written to the
//! wrong place or one lost in transit is caught, not only a flipped byte on the wire.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::machine::{MachineError, RamBlockInfo, RamSink, RamSource};
use crate::stats::RamDigestStats;

/// Threads that hash (the vCPUs are stopped while they do: their cores are free).
pub const HASH_THREADS: usize = 2;

/// `algorithm` 1: XXH3-64 (seed 0) of each chunk's bytes.
pub const ALGORITHM_XXH3_64: u16 = 1;
/// 2 MiB chunks: 4 KiB of digests per GiB of RAM, and a mismatch located to 2 MiB.
pub const DEFAULT_CHUNK_SHIFT: u32 = 21;
/// Largest chunk the format allows (1 GiB).
pub const MAX_CHUNK_SHIFT: u32 = 30;

/// Read access to guest RAM for hashing, shareable between hashing threads. The engine calls it
/// only with the vCPUs stopped (source) or before the guest first runs (destination).
pub trait RamView: Send + Sync {
    /// Hands `f` the `len` bytes of block `block` starting at byte `offset` (inside the block;
    /// page aligned), or `None` when the machine knows without reading that they are all zero
    /// (e.g. destination memory that nothing has written since it was created).
    fn with_range(
        &self,
        block: usize,
        offset: u64,
        len: u64,
        f: &mut dyn FnMut(Option<&[u8]>),
    ) -> Result<(), MachineError>;
}

/// XXH3-64 of one chunk.
pub fn chunk_digest(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

/// Digest of `len` zero bytes (chunks known to be zero are not read).
fn zero_digest(len: u64) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let zeros = [0u8; 64 << 10];
    let mut left = len;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        h.update(&zeros[..n]);
        left -= n as u64;
    }
    h.digest()
}

/// Number of chunks of `1 << shift` bytes covering `size` bytes.
pub fn chunk_count(size: u64, shift: u32) -> u64 {
    size.div_ceil(1u64 << shift)
}

/// The digests of every RAM block, chunk by chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamDigest {
    /// Chunk size is `1 << chunk_shift` bytes.
    pub chunk_shift: u32,
    /// Per block (CONFIG order), the digest of each chunk.
    pub blocks: Vec<Vec<u64>>,
}

/// How the destination's memory differs from the source's.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "RAM digest mismatch: {differing} of {chunks} chunk(s) of {chunk_kib} KiB differ in block '{block}', \
     the first at GPA {first_gpa:#x}..{first_end:#x}: the destination's memory is not the source's"
)]
pub struct DigestMismatch {
    /// Block id of the first difference.
    pub block: String,
    /// Chunks that differ in that block.
    pub differing: u64,
    /// Chunks in that block.
    pub chunks: u64,
    /// Chunk size in KiB.
    pub chunk_kib: u64,
    /// First differing chunk, guest physical start.
    pub first_gpa: u64,
    /// Its end (exclusive).
    pub first_end: u64,
}

impl RamDigest {
    /// Hashes every block through `view` with `threads` threads (chunks are dealt round-robin).
    pub fn compute(
        view: &Arc<dyn RamView>,
        blocks: &[RamBlockInfo],
        chunk_shift: u32,
        threads: usize,
    ) -> Result<Self, MachineError> {
        let chunk = 1u64 << chunk_shift;
        let jobs: Vec<(usize, u64, u64)> = blocks
            .iter()
            .enumerate()
            .flat_map(|(b, info)| {
                (0..chunk_count(info.size, chunk_shift)).map(move |i| {
                    let off = i * chunk;
                    (b, off, chunk.min(info.size - off))
                })
            })
            .collect();
        let threads = threads.clamp(1, 16);
        let results: Vec<Result<Vec<(usize, u64)>, MachineError>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let jobs = &jobs;
                    std::thread::Builder::new()
                        .name(format!("mig-digest-{t}"))
                        .spawn_scoped(s, move || {
                            let mut out = Vec::new();
                            for (j, &(b, off, len)) in jobs.iter().enumerate() {
                                if j % threads != t {
                                    continue;
                                }
                                let mut d = 0;
                                view.with_range(b, off, len, &mut |bytes| {
                                    d = match bytes {
                                        Some(bytes) => chunk_digest(bytes),
                                        None => zero_digest(len),
                                    }
                                })?;
                                out.push((j, d));
                            }
                            Ok(out)
                        })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| match h {
                    Ok(h) => h.join().unwrap_or_else(|_| {
                        Err(MachineError::Failed("a RAM digest thread panicked".into()))
                    }),
                    Err(e) => Err(MachineError::Failed(format!(
                        "cannot start a RAM digest thread: {e}"
                    ))),
                })
                .collect()
        });
        let mut flat = vec![0u64; jobs.len()];
        for r in results {
            for (j, d) in r? {
                flat[j] = d;
            }
        }
        let mut it = flat.into_iter();
        let blocks = blocks
            .iter()
            .map(|info| {
                it.by_ref()
                    .take(chunk_count(info.size, chunk_shift) as usize)
                    .collect()
            })
            .collect();
        Ok(Self {
            chunk_shift,
            blocks,
        })
    }

    /// Compares the destination's digest (`self`) with the source's; the error names the first
    /// block that differs.
    pub fn compare(
        &self,
        source: &RamDigest,
        blocks: &[RamBlockInfo],
    ) -> Result<(), DigestMismatch> {
        let chunk = 1u64 << self.chunk_shift;
        for (i, info) in blocks.iter().enumerate() {
            let (mine, theirs) = (
                self.blocks.get(i).map(Vec::as_slice).unwrap_or(&[]),
                source.blocks.get(i).map(Vec::as_slice).unwrap_or(&[]),
            );
            let chunks = chunk_count(info.size, self.chunk_shift);
            let differ: Vec<u64> = (0..chunks)
                .filter(|&c| mine.get(c as usize) != theirs.get(c as usize))
                .collect();
            if let Some(&first) = differ.first() {
                let start = first * chunk;
                return Err(DigestMismatch {
                    block: info.id.clone(),
                    differing: differ.len() as u64,
                    chunks,
                    chunk_kib: chunk >> 10,
                    first_gpa: info.gpa + start,
                    first_end: info.gpa + (start + chunk).min(info.size),
                });
            }
        }
        Ok(())
    }
}

/// The source's digest, computed in the background (`mig-digest`) while the final state is
/// sent. Dropping it unjoined leaves the thread to finish reading and exit (a failed switchover
/// does not wait for it).
pub struct RamDigestJob {
    handle: Option<JoinHandle<Result<(RamDigest, Duration), MachineError>>>,
    chunk_shift: u32,
}

impl RamDigestJob {
    /// Starts hashing `ram` (vCPUs stopped) with [`DEFAULT_CHUNK_SHIFT`] chunks.
    pub fn start(ram: &dyn RamSource) -> Self {
        let (view, blocks, shift) = (ram.view(), ram.blocks(), DEFAULT_CHUNK_SHIFT);
        let handle = std::thread::Builder::new()
            .name("mig-digest".into())
            .spawn(move || {
                let t = Instant::now();
                let d = RamDigest::compute(&view, &blocks, shift, HASH_THREADS)?;
                Ok((d, t.elapsed()))
            })
            .ok();
        Self {
            handle,
            chunk_shift: shift,
        }
    }

    /// Waits for the digest.
    pub fn wait(mut self) -> Result<(RamDigest, RamDigestStats), MachineError> {
        let h = self
            .handle
            .take()
            .ok_or_else(|| MachineError::Failed("cannot start the RAM digest thread".into()))?;
        let (d, hash) = h
            .join()
            .map_err(|_| MachineError::Failed("the RAM digest thread panicked".into()))??;
        let stats = RamDigestStats {
            chunks: d.blocks.iter().map(|b| b.len() as u64).sum(),
            chunk_bytes: 1 << self.chunk_shift,
            hash,
            verified: false,
        };
        Ok((d, stats))
    }
}

/// The destination's side: whether a digest was announced (`CAPABILITIES` bit 3), the one that
/// arrived, and the check before the guest runs.
#[derive(Debug, Default)]
pub struct DigestCheck {
    announced: bool,
    received: Option<RamDigest>,
}

/// Why the destination refused the digest or its absence.
#[derive(Debug, thiserror::Error)]
pub enum DigestError {
    /// This side requires a digest the source does not send.
    #[error(
        "capability 'x-tern-ram-digest' is on at the destination but off at the source: \
         enable it on the source, or disable it here to migrate without the memory check"
    )]
    NotAnnounced,
    /// A RAM_DIGEST record without `CAPABILITIES` bit 3.
    #[error("a RAM_DIGEST record the source did not announce in CAPABILITIES")]
    Unannounced,
    /// END without the announced digest.
    #[error("the source announced a RAM digest (x-tern-ram-digest) but sent none before END")]
    Missing,
    /// The memories differ.
    #[error(transparent)]
    Mismatch(#[from] DigestMismatch),
    /// Hashing this side's memory failed.
    #[error("hashing guest RAM for the digest check")]
    Hash(#[source] MachineError),
}

impl DigestCheck {
    /// `CAPABILITIES` arrived: `announced` = bit 3; `required` = this side's capability.
    pub fn on_capabilities(&mut self, announced: bool, required: bool) -> Result<(), DigestError> {
        if required && !announced {
            return Err(DigestError::NotAnnounced);
        }
        self.announced = announced;
        Ok(())
    }

    /// A RAM_DIGEST record arrived (the reader checked its shape and place).
    pub fn on_record(&mut self, digest: RamDigest) -> Result<(), DigestError> {
        if !self.announced {
            return Err(DigestError::Unannounced);
        }
        self.received = Some(digest);
        Ok(())
    }

    /// After a verified END, before anything is restored: hashes `ram` and compares. `None`
    /// when no digest was announced.
    pub fn verify(&mut self, ram: &dyn RamSink) -> Result<Option<RamDigestStats>, DigestError> {
        if !self.announced {
            return Ok(None);
        }
        let source = self.received.take().ok_or(DigestError::Missing)?;
        let (view, blocks) = (ram.view(), ram.blocks());
        let t = Instant::now();
        let mine = RamDigest::compute(&view, &blocks, source.chunk_shift, HASH_THREADS)
            .map_err(DigestError::Hash)?;
        let hash = t.elapsed();
        mine.compare(&source, &blocks)?;
        Ok(Some(RamDigestStats {
            chunks: mine.blocks.iter().map(|b| b.len() as u64).sum(),
            chunk_bytes: 1 << source.chunk_shift,
            hash,
            verified: true,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct Mem(Mutex<Vec<Vec<u8>>>, bool);
    impl RamView for Mem {
        fn with_range(
            &self,
            block: usize,
            offset: u64,
            len: u64,
            f: &mut dyn FnMut(Option<&[u8]>),
        ) -> Result<(), MachineError> {
            let g = self
                .0
                .lock()
                .map_err(|_| MachineError::Failed("poisoned".into()))?;
            let b = &g[block][offset as usize..(offset + len) as usize];
            if self.1 && b.iter().all(|&x| x == 0) {
                f(None)
            } else {
                f(Some(b))
            }
            Ok(())
        }
    }

    fn blocks() -> Vec<RamBlockInfo> {
        vec![
            RamBlockInfo {
                id: "ram0".into(),
                gpa: 0,
                size: 3 << 20,
            },
            RamBlockInfo {
                id: "ram1".into(),
                gpa: 1 << 32,
                size: 8 << 12,
            },
        ]
    }

    fn mem(skip_zero: bool) -> Arc<dyn RamView> {
        let mut a = vec![0u8; 3 << 20];
        a[5] = 1;
        a[(2 << 20) + 7] = 9;
        Arc::new(Mem(Mutex::new(vec![a, vec![0u8; 8 << 12]]), skip_zero))
    }

    #[test]
    fn known_zero_chunks_hash_like_read_ones_and_threads_agree() {
        let b = blocks();
        let read = RamDigest::compute(&mem(false), &b, DEFAULT_CHUNK_SHIFT, 1).unwrap();
        let skipped = RamDigest::compute(&mem(true), &b, DEFAULT_CHUNK_SHIFT, 3).unwrap();
        assert_eq!(read, skipped);
        // 3 MiB in 2 MiB chunks: 2 chunks (the last one 1 MiB); 32 KiB: 1 chunk.
        assert_eq!(read.blocks.iter().map(Vec::len).collect::<Vec<_>>(), [2, 1]);
        assert_eq!(read.compare(&skipped, &b), Ok(()));
    }

    #[test]
    fn a_flipped_byte_is_located() {
        let b = blocks();
        let src = RamDigest::compute(&mem(false), &b, 16, 2).unwrap();
        let mut a = vec![0u8; 3 << 20];
        a[5] = 1;
        a[(2 << 20) + 7] = 9;
        a[(1 << 20) + 3] = 0xff; // chunk 16 of 48 (64 KiB chunks)
        let view: Arc<dyn RamView> = Arc::new(Mem(Mutex::new(vec![a, vec![0u8; 8 << 12]]), true));
        let dst = RamDigest::compute(&view, &b, 16, 2).unwrap();
        let e = dst.compare(&src, &b).unwrap_err();
        assert_eq!(e.block, "ram0");
        assert_eq!(e.differing, 1);
        assert_eq!(e.chunks, 48);
        assert_eq!(
            (e.first_gpa, e.first_end),
            (1 << 20, (1 << 20) + (64 << 10))
        );
        assert!(e.to_string().contains("0x100000..0x110000"), "{e}");
    }
}
