//! `release-ram` on the source (QEMU's capability, `docs/postcopy.md` §6, decision 180): after
//! `POSTCOPY_RUN` the source frees each page of guest RAM (through
//! [`RamSource::discard_range`]) once the **destination has confirmed that it holds it**, so
//! the source's memory shrinks as post-copy goes on.
//!
//! QEMU frees a page as soon as it is queued on the socket, and the pages migrated in pre-copy
//! as soon as the package is written. Tern waits for a confirmation, because a recovery
//! (§4) re-sends every page the destination's received bitmap lacks: a page lost in the old
//! channel's buffers after it was freed would be sent again as zeros. A page is released only
//! after one of these proved it was placed on the destination:
//!
//! | proof | covers |
//! | --- | --- |
//! | `RESUMED` | every page migrated before the switch and not discarded (the destination loaded everything before `POSTCOPY_RUN`) |
//! | the `PONG` of a `PING` written after the page | every page written before that `PING` on this channel (the destination answers in stream order, after placing the batches before it) |
//! | `SHUT{0}` | every page (the destination had all of them) |
//! | the destination's received bitmap at a recovery | every page it reports |
//!
//! Confirmed pages are freed in runs, at most [`RELEASE_BUDGET`] pages per round of the push,
//! so that freeing what pre-copy migrated (most of RAM, confirmed at once by `RESUMED`) does not
//! delay the pages the guest is waiting for (`MADV_DONTNEED` of 512 MiB: ~40 ms here).
//!
//! Hence a released page is always one the destination holds, its received bitmap says so, and
//! [`RamSender::requeue_unreceived`] never queues it again; should a bitmap ever contradict a
//! confirmation (a destination bug), the recovery fails for good instead of sending a freed
//! page ([`ReleaseError::ReleasedPageMissing`]).

use std::collections::VecDeque;

use super::*;
use crate::machine::DirtyBitmap;
use crate::stats::ReleaseRamStats;

/// Pages freed at most per round of the post-copy push (16 MiB of 4 KiB pages: about a
/// millisecond of `MADV_DONTNEED`).
const RELEASE_BUDGET: u64 = 4096;

/// Why releasing stopped or a recovery cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    /// The destination's received bitmap lacks a page this source released after the
    /// destination had confirmed it: its contents are gone from both sides.
    #[error(
        "the destination lacks page {page} of RAM block {block}, which this source released \
         (release-ram) after the destination had confirmed holding it: the page is lost on \
         both sides, so the migration cannot be recovered"
    )]
    ReleasedPageMissing {
        /// Block index.
        block: usize,
        /// Page index.
        page: u64,
    },
}

/// The source's `release-ram` bookkeeping, from the post-copy switch on.
pub(super) struct Release {
    /// Per block: pages released (never read, never sent again).
    released: Vec<DirtyBitmap>,
    /// Pages migrated before the switch and not discarded, waiting for `RESUMED`.
    before_run: Option<Vec<DirtyBitmap>>,
    /// Pages written on this channel, per `PING` written after them, waiting for its `PONG`.
    sealed: VecDeque<(u32, Vec<(usize, u64)>)>,
    /// Confirmed runs `(block, first, pages)` not freed yet (bounded work per round).
    ready: VecDeque<(usize, u64, u64)>,
    /// Pages released so far.
    count: u64,
    /// The machine refused a release: nothing more is released (the migration goes on).
    failed: Option<String>,
}

impl Release {
    /// At the switch, after the final sync: `sent` = every page not in the to-send set.
    pub(super) fn new(sent: Vec<DirtyBitmap>) -> Self {
        let released = sent.iter().map(|s| DirtyBitmap::new(s.pages())).collect();
        Self {
            released,
            before_run: Some(sent),
            sealed: VecDeque::new(),
            ready: VecDeque::new(),
            count: 0,
            failed: None,
        }
    }

    /// A `PING` with `seq` was written after `pages` (the pages written since the last one).
    pub(super) fn seal(&mut self, seq: u32, pages: Vec<(usize, u64)>) {
        if !pages.is_empty() {
            self.sealed.push_back((seq, pages));
        }
    }

    /// Moves what the destination has confirmed to the pages to free: everything migrated
    /// before the switch once `RESUMED` arrived (`resumed`), and what was written before every
    /// `PING` up to `pong`. Returns the pages moved.
    fn confirm(&mut self, pong: u32, resumed: bool) -> u64 {
        let mut pages = Vec::new();
        if resumed {
            if let Some(before) = self.before_run.take() {
                for (b, bits) in before.iter().enumerate() {
                    pages.extend(set_bits(bits).map(|p| (b, p)));
                }
            }
        }
        while self.sealed.front().is_some_and(|(seq, _)| *seq <= pong) {
            if let Some((_, p)) = self.sealed.pop_front() {
                pages.extend(p);
            }
        }
        self.make_ready(pages)
    }

    /// Queues `pages` (any order; duplicates and released ones skipped) as runs to free.
    fn make_ready(&mut self, mut pages: Vec<(usize, u64)>) -> u64 {
        pages.sort_unstable();
        pages.dedup();
        let mut n = 0;
        for (b, p) in pages {
            if self.released.get(b).is_none_or(|r| r.get(p)) {
                continue;
            }
            n += 1;
            match self.ready.back_mut() {
                Some((rb, first, len)) if *rb == b && *first + *len == p => *len += 1,
                _ => self.ready.push_back((b, p, 1)),
            }
        }
        n
    }

    /// The channel broke: what was waiting for its `PONG`s is left to the received bitmap of
    /// the recovery (the pages may have been lost with the channel).
    pub(super) fn channel_lost(&mut self) {
        self.sealed.clear();
    }

    /// At a recovery, with the destination's received bitmap (everything confirmed already
    /// freed, [`Release::free`] with no budget): fails if it lacks a released page; otherwise
    /// queues every page it holds that is not released yet.
    fn after_bitmaps(&mut self, received: impl Fn(usize, u64) -> bool) -> Result<(), ReleaseError> {
        let mut out = Vec::new();
        for (b, rel) in self.released.iter().enumerate() {
            for p in 0..rel.pages() {
                match (rel.get(p), received(b, p)) {
                    (true, false) => {
                        return Err(ReleaseError::ReleasedPageMissing { block: b, page: p })
                    }
                    (false, true) => out.push((b, p)),
                    _ => {}
                }
            }
        }
        self.before_run = None;
        self.sealed.clear();
        self.make_ready(out);
        Ok(())
    }

    /// Frees confirmed runs, at most `budget` pages (a run may be split).
    fn free(&mut self, ram: &mut dyn RamSource, budget: u64) {
        let mut left = budget;
        while left > 0 && self.failed.is_none() {
            let Some((b, first, n)) = self.ready.pop_front() else {
                return;
            };
            let take = n.min(left);
            if take < n {
                self.ready.push_front((b, first + take, n - take));
            }
            self.discard(ram, (b, first, take));
            left -= take;
        }
    }

    fn discard(&mut self, ram: &mut dyn RamSource, (block, first, n): (usize, u64, u64)) {
        match ram.discard_range(block, first, n) {
            Ok(()) => {
                if let Some(r) = self.released.get_mut(block) {
                    for p in first..first + n {
                        if !r.get(p) {
                            r.set(p);
                            self.count += 1;
                        }
                    }
                }
            }
            Err(e) => {
                let text = format!(
                    "releasing {n} pages from page {first} of RAM block {block} failed, \
                     nothing more is released: {}",
                    crate::stats::error_chain(&e)
                );
                tracing::warn!(%text, "release-ram");
                self.failed = Some(text);
                self.ready.clear();
            }
        }
    }

    fn stats(&self) -> ReleaseRamStats {
        ReleaseRamStats {
            released_pages: self.count,
            error: self.failed.clone(),
        }
    }
}

/// The set bits of `bits`, ascending.
fn set_bits(bits: &DirtyBitmap) -> impl Iterator<Item = u64> + '_ {
    bits.words().iter().enumerate().flat_map(|(i, &w)| {
        let mut w = w;
        std::iter::from_fn(move || {
            if w == 0 {
                return None;
            }
            let bit = u64::from(w.trailing_zeros());
            w &= w - 1;
            Some(i as u64 * 64 + bit)
        })
    })
}

impl Sender {
    /// At the post-copy switch, after the final sync (`release-ram` only): the pages migrated
    /// so far wait for `RESUMED`; from now on every page written is noted.
    pub(super) fn release_at_switch(&mut self) -> Result<(), SourceError> {
        if !self.opts.release_ram {
            return Ok(());
        }
        let ram = self.ram()?;
        let sent = ram.sent_set();
        ram.log_sent(true);
        self.release = Some(Release::new(sent));
        self.stats.set_release_ram(ReleaseRamStats::default());
        Ok(())
    }

    /// A `PING` with `seq` was written: the pages written before it wait for its `PONG`.
    pub(super) fn release_seal(&mut self, seq: u32) {
        if let (Some(rel), Some(ram)) = (self.release.as_mut(), self.ram.as_mut()) {
            rel.seal(seq, ram.take_sent());
        }
    }

    /// One round of the push: takes what the destination confirmed (`RESUMED` if `resumed`,
    /// the `PONG`s up to `pong`) and frees at most [`RELEASE_BUDGET`] pages of it.
    pub(super) fn release_confirmed(&mut self, pong: u32, resumed: bool) {
        let Some(rel) = self.release.as_mut() else {
            return;
        };
        rel.confirm(pong, resumed);
        if rel.ready.is_empty() {
            return;
        }
        rel.free(self.m.ram.as_mut(), RELEASE_BUDGET);
        self.stats.set_release_ram(rel.stats());
    }

    /// `SHUT{0}`: the destination has every page; everything left is freed.
    pub(super) fn release_all(&mut self) {
        let Some(rel) = self.release.as_mut() else {
            return;
        };
        rel.confirm(u32::MAX, true);
        if let Some(ram) = self.ram.as_mut() {
            rel.make_ready(ram.take_sent());
            ram.log_sent(false);
        }
        rel.free(self.m.ram.as_mut(), u64::MAX);
        self.stats.set_release_ram(rel.stats());
    }

    /// The channel broke (post-copy paused): pages written and not confirmed wait for the
    /// recovery's received bitmap.
    pub(super) fn release_channel_lost(&mut self) {
        if let Some(rel) = self.release.as_mut() {
            rel.channel_lost();
            if let Some(ram) = self.ram.as_mut() {
                ram.take_sent();
            }
        }
    }

    /// At a recovery, before the to-send set is rebuilt from the destination's bitmap: frees
    /// everything confirmed, checks that the destination holds every freed page, then queues
    /// every page it reports.
    pub(super) fn release_after_bitmaps(
        &mut self,
        received: impl Fn(usize, u64) -> bool,
    ) -> Result<(), SourceError> {
        let Some(rel) = self.release.as_mut() else {
            return Ok(());
        };
        rel.free(self.m.ram.as_mut(), u64::MAX);
        let checked = rel.after_bitmaps(received);
        self.stats.set_release_ram(rel.stats());
        checked.map_err(SourceError::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fakes::{FakeRam, RELEASED_BYTE};
    use crate::machine::RamSource;

    fn bits(pages: u64, set: &[u64]) -> DirtyBitmap {
        let mut b = DirtyBitmap::new(pages);
        for p in set {
            b.set(*p);
        }
        b
    }

    fn read(ram: &mut FakeRam, block: usize, page: u64) -> u8 {
        let mut buf = vec![0u8; 4096];
        RamSource::read_page(ram, block, page, &mut buf).unwrap();
        buf[0]
    }

    #[test]
    fn pages_are_released_only_once_confirmed() {
        let mut ram = FakeRam::small();
        // Block 0: 768 pages, block 1: 256. Pages 0..4 of block 0 were migrated before the
        // switch; 10 and 11 of block 0, 5 of block 1 are written after RUN.
        let mut rel = Release::new(vec![bits(768, &[0, 1, 2, 3]), bits(256, &[])]);
        rel.seal(7, vec![(0, 10), (1, 5)]);
        rel.seal(9, vec![(0, 11)]);
        assert_eq!(rel.confirm(6, false), 0, "no RESUMED, no PONG 7 yet");
        assert_eq!(rel.confirm(8, false), 2, "PONG 8 confirms PING 7");
        rel.free(&mut ram, u64::MAX);
        assert_eq!(ram.released_pages(), 2);
        assert_eq!(read(&mut ram, 0, 10), RELEASED_BYTE);
        assert_eq!(read(&mut ram, 1, 5), RELEASED_BYTE);
        assert_ne!(read(&mut ram, 0, 11), RELEASED_BYTE, "PING 9 not answered");
        assert_eq!(rel.confirm(8, true), 4, "RESUMED: pages 0..4");
        // A budget splits the run.
        rel.free(&mut ram, 3);
        assert_eq!(ram.released_pages(), 5);
        assert_ne!(read(&mut ram, 0, 3), RELEASED_BYTE, "beyond the budget");
        rel.free(&mut ram, 3);
        assert_eq!(ram.released_pages(), 6);
        // The channel breaks before PONG 9: page 11 waits for the bitmap.
        rel.channel_lost();
        assert_eq!(rel.confirm(u32::MAX, true), 0);
        let held = |b: usize, p: u64| (b == 0 && p < 11) || (b == 1 && p == 5);
        rel.after_bitmaps(held).unwrap();
        rel.free(&mut ram, u64::MAX);
        assert_eq!(ram.released_pages(), 12, "pages 4..=9 of block 0 as well");
        assert_ne!(
            read(&mut ram, 0, 11),
            RELEASED_BYTE,
            "not received: sent again"
        );
        assert_eq!(rel.stats().released_pages, 12);
        // A bitmap that lacks a released page is refused, naming it.
        let e = rel.after_bitmaps(|b, p| !(b == 1 && p == 5)).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("the destination lacks page 5 of RAM block 1"),
            "{e}"
        );
    }

    #[test]
    fn a_refused_release_stops_releasing_and_says_why() {
        let mut ram = FakeRam::small();
        let mut rel = Release::new(vec![bits(768, &[]), bits(256, &[])]);
        // Past the end of block 1: the fake refuses.
        assert_eq!(rel.make_ready(vec![(1, 255), (1, 256)]), 2);
        rel.make_ready(vec![(0, 1)]);
        rel.free(&mut ram, u64::MAX);
        assert_eq!(ram.released_pages(), 0);
        let s = rel.stats();
        assert!(s.error.is_some_and(|e| e.contains("RAM block 1")));
    }

    #[test]
    fn set_bits_walks_every_word() {
        let b = bits(200, &[0, 63, 64, 130, 199]);
        assert_eq!(set_bits(&b).collect::<Vec<_>>(), [0, 63, 64, 130, 199]);
    }
}
