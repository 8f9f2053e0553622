//! The destination's per-page digests (`x-tern-ram-digest`), shared by every thread that loads
//! pages: `mig-dst` (the main stream) and multifd's receivers `mig-mfd-recv-K`
//! (`docs/migration-engine.md` §2.5, decision 252).
//!
//! One `AtomicU64` per page, written with relaxed stores by whichever thread loaded the page
//! last. No lock: a page is written by one thread at a time, and the order between two loads
//! of the same page is the engine's, not this module's. Two loads of a page in one generation
//! do not happen (the source sends a dirty page once per pass, and every dirty-log sync
//! follows a sync point); across generations, the receiver that loaded the page in generation
//! g recorded its `SYNC` under the sync barrier's mutex before `mig-dst` released generation
//! g+1 under the same mutex, and the receiver that loads it in g+1 saw that release under the
//! mutex: the earlier store happens before the later one, so the slot ends with the digest of
//! the last write. At END `mig-dst` reads the slots only after every receiver's final `SYNC`
//! (under the mutex) and after joining the receivers, so every store happens before the check.
//!
//! Two loads of one page in one generation (against `docs/stream-format.md` §5.1; Tern's
//! source never does it) would leave memory and digest in an undefined order across channels:
//! one receiver's read-back could be stored after the other's write, so the digest would say
//! one copy while memory holds the other. With multifd the digests therefore keep the
//! generation of each page's last load (swapped atomically), and a second load in the same
//! generation fails the migration ([`DigestError::Twice`]).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{chunk_digest, page_digest, DigestError};
use crate::machine::{MachineError, RamSink};

/// Per block, the digest of each page as the destination holds it.
#[derive(Debug, Default)]
pub struct PageDigests {
    blocks: Vec<Vec<AtomicU64>>,
    /// With multifd: per page, the generation of its last load on a channel (0: none yet).
    generations: Vec<Vec<AtomicU32>>,
    page_size: u32,
    /// Time spent reading back and hashing, summed over every thread that loads pages (so with
    /// several multifd channels it is CPU time, and may exceed the wall time it overlapped).
    hashing_ns: AtomicU64,
}

impl PageDigests {
    /// Every page of `ram` as a zero page (fresh memory, until it is loaded); with `multifd`,
    /// the generation of each page's last load is kept too (4 bytes a page).
    pub fn new(ram: &dyn RamSink, multifd: bool) -> Self {
        let ps = ram.page_size();
        let zero = page_digest(&vec![0u8; ps as usize]);
        let blocks = ram.blocks();
        Self {
            blocks: blocks
                .iter()
                .map(|b| (0..b.pages(ps)).map(|_| AtomicU64::new(zero)).collect())
                .collect(),
            generations: if multifd {
                blocks
                    .iter()
                    .map(|b| (0..b.pages(ps)).map(|_| AtomicU32::new(0)).collect())
                    .collect()
            } else {
                Vec::new()
            },
            page_size: ps,
            hashing_ns: AtomicU64::new(0),
        }
    }

    /// Page size in bytes.
    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    /// Records the digest of page `page` of `block` (out of range: ignored, the engine checked
    /// the page against the sink's blocks before loading it).
    pub fn set(&self, block: usize, page: u64, digest: u64) {
        if let Some(slot) = self
            .blocks
            .get(block)
            .and_then(|b| b.get(usize::try_from(page).ok()?))
        {
            slot.store(digest, Ordering::Relaxed);
        }
    }

    /// A channel loads page `page` of `block` in `generation` (≥ 1): `false` when it was
    /// already loaded in that generation. Always `true` without multifd.
    fn first_in_generation(&self, block: usize, page: u64, generation: u32) -> bool {
        self.generations
            .get(block)
            .and_then(|b| b.get(usize::try_from(page).ok()?))
            .is_none_or(|g| g.swap(generation, Ordering::Relaxed) != generation)
    }

    /// The digest of page `page` of `block`, if it exists.
    pub fn get(&self, block: usize, page: u64) -> Option<u64> {
        let b = self.blocks.get(block)?;
        Some(b.get(usize::try_from(page).ok()?)?.load(Ordering::Relaxed))
    }

    /// Per block, the digest of each chunk of `1 << chunk_shift` bytes.
    pub fn chunk_digests(&self, chunk_shift: u32) -> Vec<Vec<u64>> {
        let per_chunk = ((1u64 << chunk_shift) / u64::from(self.page_size.max(1))).max(1) as usize;
        let mut pages = Vec::with_capacity(per_chunk);
        self.blocks
            .iter()
            .map(|b| {
                b.chunks(per_chunk)
                    .map(|c| {
                        pages.clear();
                        pages.extend(c.iter().map(|s| s.load(Ordering::Relaxed)));
                        chunk_digest(&pages)
                    })
                    .collect()
            })
            .collect()
    }

    /// Adds a thread's reading-back and hashing time.
    pub fn add_hashing(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.hashing_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Reading back and hashing, summed over the threads so far.
    pub fn hashing(&self) -> Duration {
        Duration::from_nanos(self.hashing_ns.load(Ordering::Relaxed))
    }
}

/// One loading thread's side: a page buffer of its own and its hashing time, added to the
/// shared total at [`PageHasher::flush`] (each sync point of a channel) and when dropped.
#[derive(Debug)]
pub struct PageHasher {
    digests: Arc<PageDigests>,
    buf: Vec<u8>,
    hashing: Duration,
}

impl PageHasher {
    /// A hasher recording into `digests`.
    pub fn new(digests: Arc<PageDigests>) -> Self {
        let buf = vec![0; digests.page_size as usize];
        Self {
            digests,
            buf,
            hashing: Duration::ZERO,
        }
    }

    /// Page `page` of `block` was loaded (written or zeroed), in `generation` when a multifd
    /// channel loaded it: `read` copies it back out of guest memory into the buffer it is
    /// given; its digest is recorded. A second load in one generation is refused.
    pub fn loaded(
        &mut self,
        block: usize,
        page: u64,
        generation: Option<u32>,
        read: impl FnOnce(&mut [u8]) -> Result<(), MachineError>,
    ) -> Result<(), DigestError> {
        if let Some(g) = generation {
            if !self.digests.first_in_generation(block, page, g) {
                return Err(DigestError::Twice {
                    block,
                    page,
                    generation: g,
                });
            }
        }
        let t = Instant::now();
        read(&mut self.buf).map_err(|source| DigestError::ReadBack {
            block,
            page,
            source,
        })?;
        self.digests.set(block, page, page_digest(&self.buf));
        self.hashing += t.elapsed();
        Ok(())
    }

    /// Adds the time spent since the last flush to the shared total.
    pub fn flush(&mut self) {
        if !self.hashing.is_zero() {
            self.digests
                .add_hashing(std::mem::replace(&mut self.hashing, Duration::ZERO));
        }
    }
}

impl Drop for PageHasher {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::tests::blocks;
    use crate::digest::RamDigest;
    use crate::fakes::FakeRam;

    fn ram() -> FakeRam {
        FakeRam::new(4096, &[("ram0", 0, 3 << 20), ("ram1", 1 << 32, 8 << 12)])
    }

    fn page(byte: u8) -> Vec<u8> {
        let mut p = vec![0u8; 4096];
        p[100] = byte;
        p[4000] = byte.wrapping_mul(3);
        p
    }

    /// Two threads load disjoint pages at once through the shared digests, as multifd's
    /// receivers do; the chunk digests equal those the source computes from the same memory.
    #[test]
    fn page_digests_from_two_threads_equal_the_source_digest() {
        let mut dst = ram();
        let digests = Arc::new(PageDigests::new(&dst, true));
        let placer = dst.placer().unwrap();
        std::thread::scope(|s| {
            for t in 0..2u64 {
                let (digests, placer) = (digests.clone(), placer.clone());
                s.spawn(move || {
                    let mut h = PageHasher::new(digests);
                    for p in (t..768).step_by(2) {
                        placer.write_page(0, p, &page(p as u8 + 1)).unwrap();
                        h.loaded(0, p, Some(1), |buf| placer.read_page(0, p, buf))
                            .unwrap();
                    }
                });
            }
        });
        let src = ram();
        for p in 0..768u64 {
            RamSink::write_page(&mut src.clone(), 0, p, &page(p as u8 + 1)).unwrap();
        }
        let expect = RamDigest::compute(
            &crate::machine::RamSource::view(&src),
            &blocks(),
            4096,
            super::super::DEFAULT_CHUNK_SHIFT,
            2,
        )
        .unwrap();
        assert_eq!(
            digests.chunk_digests(super::super::DEFAULT_CHUNK_SHIFT),
            expect.blocks
        );
        assert!(digests.hashing() > Duration::ZERO);
    }

    /// A page loaded twice in one generation (two channels, or one) is refused; once per
    /// generation is the rule, and a later generation may load it again.
    #[test]
    fn a_page_loaded_twice_in_one_generation_is_refused() {
        let dst = ram();
        let read = |buf: &mut [u8]| -> Result<(), MachineError> {
            buf.fill(0);
            Ok(())
        };
        let digests = Arc::new(PageDigests::new(&dst, true));
        let (mut one, mut two) = (
            PageHasher::new(digests.clone()),
            PageHasher::new(digests.clone()),
        );
        one.loaded(1, 3, Some(1), read).unwrap();
        let e = two.loaded(1, 3, Some(1), read).unwrap_err();
        assert!(
            e.to_string()
                .contains("RAM block 1 page 3 was loaded twice in generation 1"),
            "{e}"
        );
        two.loaded(1, 3, Some(2), read).unwrap();
        // The main stream (no generation) and a digest without multifd never refuse.
        one.loaded(1, 3, None, read).unwrap();
        let mut h = PageHasher::new(Arc::new(PageDigests::new(&dst, false)));
        for _ in 0..2 {
            h.loaded(1, 3, Some(1), read).unwrap();
        }
    }
}
