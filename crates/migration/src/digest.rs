//! The RAM digest (`x-tern-ram-digest`, stream record `RAM_DIGEST`, `docs/stream-format.md`
//! §7a): every migration can prove that the destination's memory is the source's.
//!
//! Digest of a chunk (2 MiB): XXH3-64 of the list of the XXH3-64 of each of its pages. The
//! source reads its guest memory in place with the vCPUs stopped ([`RamView`]), in the
//! background while the final pages and device state go out, and sends the chunk digests before
//! END. The destination keeps the digest of every page up to date as it loads them, from the
//! page it reads back out of guest memory right after writing it (so a page written to the wrong
//! place or with the wrong bytes is caught, not only a flipped byte on the wire), and at END only
//! combines them per chunk and compares: its part of the check costs no full pass over memory in
//! the downtime. A page the dirty log missed keeps its old content on the destination while the
//! source hashes the new one: caught too.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::machine::{MachineError, RamBlockInfo, RamSink, RamSource};
use crate::stats::RamDigestStats;

mod pages;
pub use pages::{PageDigests, PageHasher};

/// Threads that hash on the source (its vCPUs are stopped while they do: their cores are free).
pub const HASH_THREADS: usize = 2;

/// `algorithm` 1: XXH3-64 (seed 0) of the page digests (XXH3-64 of each page) of a chunk.
pub const ALGORITHM_XXH3_64: u16 = 1;
/// 2 MiB chunks: 4 KiB of digests per GiB of RAM, and a mismatch located to 2 MiB.
pub const DEFAULT_CHUNK_SHIFT: u32 = 21;
/// Largest chunk the format allows (1 GiB).
pub const MAX_CHUNK_SHIFT: u32 = 30;

/// Read access to guest RAM, shareable between threads: in place for hashing (the vCPUs
/// stopped), by copy for multifd's senders (the vCPUs running).
pub trait RamView: Send + Sync {
    /// Hands `f` the `len` bytes of block `block` starting at byte `offset` (inside the block;
    /// page aligned), read where they lie. Only while nothing writes the range (the vCPUs
    /// stopped): a `&[u8]` of memory the guest writes meanwhile is a data race.
    fn with_range(
        &self,
        block: usize,
        offset: u64,
        len: u64,
        f: &mut dyn FnMut(&[u8]),
    ) -> Result<(), MachineError>;
    /// Copies `buf.len()` bytes of block `block` from byte `offset` into `buf` with volatile
    /// reads: sound while the guest writes the range (the bytes may then be any mix of old and
    /// new; the dirty log sends the page again).
    fn copy_range(&self, block: usize, offset: u64, buf: &mut [u8]) -> Result<(), MachineError>;
}

/// XXH3-64 of one page.
pub fn page_digest(page: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(page)
}

/// Digest of a chunk from its pages' digests.
pub fn chunk_digest(page_digests: &[u64]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for d in page_digests {
        h.update(&d.to_le_bytes());
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
        page_size: u32,
        chunk_shift: u32,
        threads: usize,
    ) -> Result<Self, MachineError> {
        let ps = page_size.max(1) as usize;
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
                            let mut pages = Vec::with_capacity((chunk as usize) / ps);
                            for (j, &(b, off, len)) in jobs.iter().enumerate() {
                                if j % threads != t {
                                    continue;
                                }
                                let mut d = 0;
                                view.with_range(b, off, len, &mut |bytes| {
                                    pages.clear();
                                    pages.extend(bytes.chunks(ps).map(page_digest));
                                    d = chunk_digest(&pages);
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
        let page_size = ram.page_size();
        let handle = std::thread::Builder::new()
            .name("mig-digest".into())
            .spawn(move || {
                let t = Instant::now();
                let d = RamDigest::compute(&view, &blocks, page_size, shift, HASH_THREADS)?;
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
            verify: Duration::ZERO,
            verified: false,
        };
        Ok((d, stats))
    }
}

/// The destination's side: whether a digest was announced (`CAPABILITIES` bit 3), the digest
/// of every page as loaded (shared with multifd's receivers, [`PageDigests`]), the source's
/// digest, and the check before the guest runs.
#[derive(Debug, Default)]
pub struct DigestCheck {
    announced: bool,
    /// Per block, the digest of each page as this side holds it (announced only).
    pages: Option<Arc<PageDigests>>,
    /// `mig-dst`'s own hasher (pages loaded from the main stream).
    main: Option<PageHasher>,
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
    /// A multifd channel loaded a page a second time in one generation (against
    /// `docs/stream-format.md` §5.1): the order of the two loads is undefined.
    #[error(
        "RAM block {block} page {page} was loaded twice in generation {generation} (a page is \
         sent at most once per generation, docs/stream-format.md §5.1): the order of its writes \
         across multifd channels is undefined"
    )]
    Twice {
        /// Block index.
        block: usize,
        /// Page index.
        page: u64,
        /// The generation.
        generation: u32,
    },
    /// Reading back a loaded page failed.
    #[error("reading back RAM block {block} page {page} for the digest")]
    ReadBack {
        /// Block index.
        block: usize,
        /// Page index.
        page: u64,
        /// The machine's error.
        #[source]
        source: MachineError,
    },
}

impl DigestCheck {
    /// `CAPABILITIES` arrived: `announced` = bit 3; `required` = this side's capability;
    /// `multifd` = bit 6 (channels will load pages too). With a digest coming, every page
    /// starts as a zero page (fresh memory) until it is loaded.
    pub fn on_capabilities(
        &mut self,
        announced: bool,
        required: bool,
        multifd: bool,
        ram: &dyn RamSink,
    ) -> Result<(), DigestError> {
        if required && !announced {
            return Err(DigestError::NotAnnounced);
        }
        self.announced = announced;
        if announced && self.pages.is_none() {
            let pages = Arc::new(PageDigests::new(ram, multifd));
            self.main = Some(PageHasher::new(pages.clone()));
            self.pages = Some(pages);
        }
        Ok(())
    }

    /// The shared page digests, for another thread that loads pages (a multifd receiver, with
    /// its own [`PageHasher`]). `None` when no digest was announced.
    pub fn shared(&self) -> Option<Arc<PageDigests>> {
        self.pages.clone()
    }

    /// A page was loaded from the main stream (written or zeroed): reads it back out of guest
    /// memory and records its digest. Nothing when no digest was announced.
    pub fn page_loaded(
        &mut self,
        ram: &mut dyn RamSink,
        block: usize,
        page: u64,
    ) -> Result<(), DigestError> {
        match &mut self.main {
            Some(h) if self.announced => {
                h.loaded(block, page, None, |buf| ram.read_page(block, page, buf))
            }
            _ => Ok(()),
        }
    }

    /// A RAM_DIGEST record arrived (the reader checked its shape and place).
    pub fn on_record(&mut self, digest: RamDigest) -> Result<(), DigestError> {
        if !self.announced {
            return Err(DigestError::Unannounced);
        }
        self.received = Some(digest);
        Ok(())
    }

    /// After a verified END, before anything is restored: combines the page digests per chunk
    /// and compares. `None` when no digest was announced.
    pub fn verify(
        &mut self,
        blocks: &[RamBlockInfo],
    ) -> Result<Option<RamDigestStats>, DigestError> {
        if !self.announced {
            return Ok(None);
        }
        let source = self.received.take().ok_or(DigestError::Missing)?;
        let pages = self.pages.as_ref().ok_or(DigestError::Missing)?;
        if let Some(h) = &mut self.main {
            h.flush();
        }
        let t = Instant::now();
        let mine = RamDigest {
            chunk_shift: source.chunk_shift,
            blocks: pages.chunk_digests(source.chunk_shift),
        };
        mine.compare(&source, blocks)?;
        let verify = t.elapsed();
        Ok(Some(RamDigestStats {
            chunks: mine.blocks.iter().map(|b| b.len() as u64).sum(),
            chunk_bytes: 1 << source.chunk_shift,
            hash: pages.hashing() + verify,
            verify,
            verified: true,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct Mem(Mutex<Vec<Vec<u8>>>);
    impl RamView for Mem {
        fn with_range(
            &self,
            block: usize,
            offset: u64,
            len: u64,
            f: &mut dyn FnMut(&[u8]),
        ) -> Result<(), MachineError> {
            let g = self
                .0
                .lock()
                .map_err(|_| MachineError::Failed("poisoned".into()))?;
            f(&g[block][offset as usize..(offset + len) as usize]);
            Ok(())
        }

        fn copy_range(
            &self,
            block: usize,
            offset: u64,
            buf: &mut [u8],
        ) -> Result<(), MachineError> {
            self.with_range(block, offset, buf.len() as u64, &mut |b| {
                buf.copy_from_slice(b)
            })
        }
    }

    /// Two blocks: 3 MiB at 0 and 8 pages above 4 GiB (also `pages.rs`'s tests).
    pub(super) fn blocks() -> Vec<RamBlockInfo> {
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

    fn mem() -> Arc<dyn RamView> {
        let mut a = vec![0u8; 3 << 20];
        a[5] = 1;
        a[(2 << 20) + 7] = 9;
        Arc::new(Mem(Mutex::new(vec![a, vec![0u8; 8 << 12]])))
    }

    #[test]
    fn threads_agree_and_page_digests_combine_to_the_same_chunks() {
        let b = blocks();
        let one = RamDigest::compute(&mem(), &b, 4096, DEFAULT_CHUNK_SHIFT, 1).unwrap();
        let three = RamDigest::compute(&mem(), &b, 4096, DEFAULT_CHUNK_SHIFT, 3).unwrap();
        assert_eq!(one, three);
        // 3 MiB in 2 MiB chunks: 2 chunks (the last one 1 MiB); 32 KiB: 1 chunk.
        assert_eq!(one.blocks.iter().map(Vec::len).collect::<Vec<_>>(), [2, 1]);
        assert_eq!(one.compare(&three, &b), Ok(()));
        // The destination's way: every page's digest, combined per chunk at the end.
        let mut check = DigestCheck::default();
        let mut ram =
            crate::fakes::FakeRam::new(4096, &[("ram0", 0, 3 << 20), ("ram1", 1 << 32, 8 << 12)]);
        let mut a = vec![0u8; 4096];
        a[5] = 1;
        ram.write_page(0, 0, &a).unwrap();
        a[5] = 0;
        a[7] = 9;
        ram.write_page(0, 512, &a).unwrap();
        check.on_capabilities(true, false, false, &ram).unwrap();
        check.page_loaded(&mut ram, 0, 0).unwrap();
        check.page_loaded(&mut ram, 0, 512).unwrap();
        check.on_record(one.clone()).unwrap();
        let stats = check.verify(&b).unwrap().unwrap();
        assert!(stats.verified);
        assert_eq!(stats.chunks, 3);
    }

    #[test]
    fn a_flipped_byte_is_located() {
        let b = blocks();
        let src = RamDigest::compute(&mem(), &b, 4096, 16, 2).unwrap();
        let mut a = vec![0u8; 3 << 20];
        a[5] = 1;
        a[(2 << 20) + 7] = 9;
        a[(1 << 20) + 3] = 0xff; // chunk 16 of 48 (64 KiB chunks)
        let view: Arc<dyn RamView> = Arc::new(Mem(Mutex::new(vec![a, vec![0u8; 8 << 12]])));
        let dst = RamDigest::compute(&view, &b, 4096, 16, 2).unwrap();
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
