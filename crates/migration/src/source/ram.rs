//! The RAM half of the sender: the dirty bitmaps (pages still to send), the cursor that walks
//! them round-robin across passes, zero-page detection and batching into RAM records.

use std::io::Write;
use std::time::Instant;

use crate::convergence::rate_per_second;
use crate::machine::{DirtyBitmap, MachineError, RamSource};
use crate::wire::{is_zero_page, RamPage, StreamWriter, WireError};

/// Pages per RAM record the sender builds (1 MiB of 4 KiB pages).
pub(crate) const BATCH_PAGES: usize = 256;

/// Error of a RAM step: the machine or the stream.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RamError {
    #[error("reading guest RAM block {block} page {page}")]
    Read {
        block: usize,
        page: u64,
        #[source]
        source: MachineError,
    },
    #[error("syncing the dirty log")]
    Sync(#[source] MachineError),
    #[error("writing RAM")]
    Wire(#[source] WireError),
}

/// What one chunk sent.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sent {
    pub pages: u64,
    pub bytes: u64,
}

pub(crate) struct RamSender {
    page_size: usize,
    /// Pages still to send (set by the first pass and by syncs, cleared when sent).
    dirty: Vec<DirtyBitmap>,
    /// Scratch bitmaps for a sync (to count what the guest dirtied in the period).
    scratch: Vec<DirtyBitmap>,
    /// Number of set bits in `dirty`.
    remaining: u64,
    /// Where the walk continues: (block, page).
    cursor: (usize, u64),
    buf: Vec<u8>,
    pub zero_pages: u64,
    pub normal_pages: u64,
    pub dirty_sync_count: u64,
    pub dirty_pages_rate: u64,
    last_sync: Option<Instant>,
    total_pages: u64,
    /// First pass only: pages the machine knows to be zero (sent as ZERO without reading).
    known_zero: Option<Vec<DirtyBitmap>>,
    /// `zero-page-detection` is not `none`: zero pages go as ZERO entries, without data.
    detect_zero: bool,
    /// `release-ram` after `POSTCOPY_RUN`: every page written, in order, until taken
    /// ([`RamSender::take_sent`]); `None` = not logging.
    sent_log: Option<Vec<(usize, u64)>>,
}

impl RamSender {
    /// Everything dirty (first pass), pass counter at 1 (QEMU counts the setup sync). Without
    /// `detect_zero` (`zero-page-detection` = `none`) every page is sent with its data.
    pub fn new(ram: &dyn RamSource, now: Instant, detect_zero: bool) -> Self {
        let page_size = ram.page_size() as usize;
        let blocks = ram.blocks();
        let ps32 = ram.page_size();
        let mut dirty: Vec<DirtyBitmap> = blocks
            .iter()
            .map(|b| DirtyBitmap::new(b.pages(ps32)))
            .collect();
        for d in &mut dirty {
            d.set_all();
        }
        let scratch = blocks
            .iter()
            .map(|b| DirtyBitmap::new(b.pages(ps32)))
            .collect();
        let total_pages = blocks.iter().map(|b| b.pages(ps32)).sum();
        Self {
            page_size,
            dirty,
            scratch,
            remaining: total_pages,
            cursor: (0, 0),
            buf: vec![0; BATCH_PAGES * page_size],
            zero_pages: 0,
            normal_pages: 0,
            dirty_sync_count: 1,
            dirty_pages_rate: 0,
            last_sync: Some(now),
            total_pages,
            known_zero: None,
            detect_zero,
            sent_log: None,
        }
    }

    /// Asks the machine which pages are known to read as zero, for the first pass (nothing
    /// without zero-page detection: those pages are read and sent like any other).
    pub fn probe_known_zero(&mut self, ram: &mut dyn RamSource) -> Result<u64, RamError> {
        if !self.detect_zero {
            return Ok(0);
        }
        let mut known = self.scratch.clone();
        for k in &mut known {
            k.clear();
        }
        if !ram.known_zero_pages(&mut known).map_err(RamError::Sync)? {
            return Ok(0);
        }
        let n = known.iter().map(DirtyBitmap::count).sum();
        self.known_zero = Some(known);
        Ok(n)
    }

    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Bytes of guest RAM.
    pub fn total_bytes(&self) -> u64 {
        self.total_pages * self.page_size as u64
    }

    /// When the dirty log was last synced (the setup counts).
    pub fn last_sync(&self) -> Option<Instant> {
        self.last_sync
    }

    /// Bytes still dirty (QEMU `ram_bytes_remaining`).
    pub fn remaining_bytes(&self) -> u64 {
        self.remaining * self.page_size as u64
    }

    /// Pages still to send.
    pub fn remaining_pages(&self) -> u64 {
        self.remaining
    }

    /// Fetches the machine's dirty log into the to-send set; returns the pages the guest
    /// dirtied since the previous sync. Increments the pass counter.
    pub fn sync(&mut self, ram: &mut dyn RamSource, now: Instant) -> Result<u64, RamError> {
        for s in &mut self.scratch {
            s.clear();
        }
        ram.sync_dirty_log(&mut self.scratch)
            .map_err(RamError::Sync)?;
        // The first pass is over: from now on every page to send is read.
        self.known_zero = None;
        let mut newly = 0;
        for (d, s) in self.dirty.iter_mut().zip(&self.scratch) {
            newly += s.count();
            d.or_with(s);
        }
        self.remaining = self.dirty.iter().map(DirtyBitmap::count).sum();
        if let Some(prev) = self.last_sync {
            self.dirty_pages_rate = rate_per_second(newly, now.saturating_duration_since(prev));
        }
        self.last_sync = Some(now);
        self.dirty_sync_count += 1;
        Ok(newly)
    }

    /// The next dirty page from the cursor, wrapping around once; clears its bit.
    fn take_next(&mut self) -> Option<(usize, u64)> {
        if self.remaining == 0 {
            return None;
        }
        let nblocks = self.dirty.len();
        let (start_block, start_page) = self.cursor;
        for i in 0..=nblocks {
            let b = (start_block + i) % nblocks;
            let from = if i == 0 { start_page } else { 0 };
            if let Some(p) = self.dirty[b].take_next(from) {
                self.remaining -= 1;
                self.cursor = (b, p + 1);
                return Some((b, p));
            }
        }
        // The counter disagreed with the bitmaps (cannot happen): resynchronise it.
        self.remaining = 0;
        None
    }

    /// Multifd: takes up to `max` dirty pages from the cursor (clearing their bits) without
    /// reading them: `(block, page, known zero)`. The sender threads read and count them.
    pub fn take_pages(&mut self, max: usize) -> Vec<(u16, u32, bool)> {
        let mut out = Vec::with_capacity(max.min(BATCH_PAGES));
        while out.len() < max {
            let Some((block, page)) = self.take_next() else {
                break;
            };
            let known = self
                .known_zero
                .as_ref()
                .and_then(|k| k.get(block))
                .is_some_and(|k| k.get(page));
            // Block and page indexes fit: the config validated blocks ≤ u16 and pages ≤ 2^32.
            out.push((block as u16, page as u32, known));
        }
        out
    }

    /// Post-copy: clears page `page` of `block` from the to-send set; whether it was there
    /// (a page already sent is in flight and never sent again, decision 73).
    pub fn take_page(&mut self, block: usize, page: u64) -> bool {
        let Some(d) = self.dirty.get_mut(block) else {
            return false;
        };
        if !d.get(page) {
            return false;
        }
        d.take_next(page);
        self.remaining -= 1;
        true
    }

    /// Post-copy recovery (QEMU's `ram_dirty_bitmap_reload`): the to-send set becomes every
    /// page the destination has not received, whether it was sent or not (pages lost with the
    /// old channel go again; a page it holds never does). Returns the pages to send and, of
    /// those, the pages that had been sent already (lost with the old channel: sent again).
    pub fn requeue_unreceived(&mut self, received: impl Fn(usize, u64) -> bool) -> (u64, u64) {
        let (mut remaining, mut resent) = (0, 0);
        for (b, d) in self.dirty.iter_mut().enumerate() {
            for p in 0..d.pages() {
                if received(b, p) {
                    d.unset(p);
                } else {
                    if !d.get(p) {
                        resent += 1;
                    }
                    d.set(p);
                    remaining += 1;
                }
            }
        }
        self.remaining = remaining;
        self.cursor = (0, 0);
        (remaining, resent)
    }

    /// `release-ram`: the pages not in the to-send set (sent and not dirtied since), per block.
    pub fn sent_set(&self) -> Vec<DirtyBitmap> {
        self.dirty
            .iter()
            .map(|d| {
                let mut s = DirtyBitmap::new(d.pages());
                s.set_all();
                for (w, dw) in s.words_mut().iter_mut().zip(d.words()) {
                    *w &= !dw;
                }
                s
            })
            .collect()
    }

    /// `release-ram`: from now on, note every page written (`on`), or stop and forget.
    pub fn log_sent(&mut self, on: bool) {
        self.sent_log = on.then(Vec::new);
    }

    /// The pages written since the last call, in order (empty when not logging).
    pub fn take_sent(&mut self) -> Vec<(usize, u64)> {
        match &mut self.sent_log {
            Some(log) => std::mem::take(log),
            None => Vec::new(),
        }
    }

    /// Where the round-robin walk continues (post-copy: just after the last requested page).
    pub fn set_cursor(&mut self, block: usize, page: u64) {
        if block < self.dirty.len() {
            self.cursor = (block, page);
        }
    }

    /// The to-send set as runs of pages per block (post-copy's RAM_DISCARD): `(block, runs of
    /// (first_page, pages))`, ascending, only blocks with at least one page.
    pub fn dirty_runs(&self) -> Vec<(u16, Vec<(u32, u32)>)> {
        let mut out = Vec::new();
        for (b, d) in self.dirty.iter().enumerate() {
            let mut runs: Vec<(u32, u32)> = Vec::new();
            let mut p = 0;
            while p < d.pages() {
                if d.get(p) {
                    let start = p;
                    while p < d.pages() && d.get(p) {
                        p += 1;
                    }
                    // Block and page counts fit: the config validated blocks ≤ u16, pages ≤ 2^32.
                    runs.push((start as u32, (p - start) as u32));
                } else {
                    p += 1;
                }
            }
            if !runs.is_empty() {
                out.push((b as u16, runs));
            }
        }
        out
    }

    /// Sends the listed pages (already taken from the to-send set), in order.
    pub fn send_pages<W: Write>(
        &mut self,
        ram: &mut dyn RamSource,
        writer: &mut StreamWriter<W>,
        pages: &[(usize, u64)],
    ) -> Result<Sent, RamError> {
        let mut it = pages.iter().copied();
        self.send_from(ram, writer, u64::MAX, true, move |_| it.next())
    }

    /// Sends dirty pages until `max_bytes` of page data (at least one page) were queued or
    /// nothing is dirty.
    pub fn send<W: Write>(
        &mut self,
        ram: &mut dyn RamSource,
        writer: &mut StreamWriter<W>,
        max_bytes: u64,
    ) -> Result<Sent, RamError> {
        self.send_from(ram, writer, max_bytes, false, Self::take_next)
    }

    /// Sends the pages `next` yields until `max_bytes` were queued (at least one page);
    /// `listed`: `next` decides when it is done, not the to-send counter.
    fn send_from<W: Write>(
        &mut self,
        ram: &mut dyn RamSource,
        writer: &mut StreamWriter<W>,
        max_bytes: u64,
        listed: bool,
        mut next: impl FnMut(&mut Self) -> Option<(usize, u64)>,
    ) -> Result<Sent, RamError> {
        let ps = self.page_size;
        let mut sent = Sent::default();
        let before = writer.bytes_written();
        while (listed || self.remaining > 0) && (sent.pages == 0 || sent.bytes < max_bytes) {
            // Fill one batch: normal pages packed at the front of `buf`.
            let mut entries: Vec<(u16, u32, bool)> = Vec::with_capacity(BATCH_PAGES);
            let mut normal = 0usize;
            while entries.len() < BATCH_PAGES {
                if sent.pages > 0 && sent.bytes + (normal * ps) as u64 >= max_bytes {
                    break;
                }
                let Some((block, page)) = next(self) else {
                    break;
                };
                let known = self
                    .known_zero
                    .as_ref()
                    .and_then(|k| k.get(block))
                    .is_some_and(|k| k.get(page));
                let zero = known || {
                    // Copied once, into the batch (the CRC covers that copy, decision 163), by
                    // the machine's own copy: the guest runs, so its memory is never borrowed
                    // as a slice here (decision 232); the batch goes out in one vectored write.
                    let slot = &mut self.buf[normal * ps..(normal + 1) * ps];
                    ram.read_page(block, page, slot)
                        .map_err(|source| RamError::Read {
                            block,
                            page,
                            source,
                        })?;
                    self.detect_zero && is_zero_page(slot)
                };
                if !zero {
                    normal += 1;
                }
                // Block and page indexes fit: the config validated blocks ≤ u16 and pages ≤ 2^32.
                entries.push((block as u16, page as u32, zero));
                sent.pages += 1;
            }
            if entries.is_empty() {
                break;
            }
            let mut pages = Vec::with_capacity(entries.len());
            let mut slot = 0;
            for &(block, page, zero) in &entries {
                if zero {
                    pages.push(RamPage::zero(block, page));
                } else {
                    pages.push(RamPage::normal(
                        block,
                        page,
                        &self.buf[slot * ps..(slot + 1) * ps],
                    ));
                    slot += 1;
                }
            }
            writer.write_ram_batch(&pages).map_err(RamError::Wire)?;
            if let Some(log) = &mut self.sent_log {
                log.extend(
                    entries
                        .iter()
                        .map(|&(b, p, _)| (usize::from(b), u64::from(p))),
                );
            }
            self.normal_pages += normal as u64;
            self.zero_pages += (entries.len() - normal) as u64;
            sent.bytes = writer.bytes_written() - before;
        }
        Ok(sent)
    }
}
