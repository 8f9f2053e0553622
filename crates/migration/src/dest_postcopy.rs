//! Post-copy on the destination (`postcopy-ram`, `docs/migration-engine.md` §9, stream format
//! §13; QEMU's `loadvm_postcopy_handle_*`).
//!
//! | record | what happens |
//! | --- | --- |
//! | `CAPABILITIES` bit 4 | must match this side's `postcopy-ram`; the machine must have a [`PostcopySink`] |
//! | `POSTCOPY_ADVISE` | [`PostcopySink::probe`]: a destination that cannot page on demand fails before `PONG 1` |
//! | RAM in pre-copy | the page is marked received (and no longer dropped) |
//! | RAM_DISCARD before `SWITCHOVER_START` (version 7, the early discard) | the pages held here are dropped at once ([`PostcopySink::drop_pages`]) and marked missing and dropped; the rest is left alone |
//! | RAM_DISCARD after `RUN_STATE` | the pages are marked missing again (the source re-dirtied them) |
//! | `POSTCOPY_LISTEN` | [`PostcopySink::start`] with missing = never received ∪ discarded, and the pages dropped early and not written since (not dropped twice); requests go out as `REQ_PAGES`; status `postcopy-active` |
//! | SECTIONs, `POSTCOPY_RUN` | the package: restored, then the guest runs (`RESUMED`) |
//! | RAM after RUN | placed; a page already here fails the migration (decision 73) |
//! | END | every page must be here; paging stops; `SHUT{0}`, `completed` |
//!
//! A failure after RUN is [`DestError::PostcopyLost`] with the count of pages never received:
//! the sink is not finished, so vCPUs touching those pages stay blocked (decision 74).

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::rp::{send_rp, RpWriter};
use super::{DestError, Receiver};
use crate::machine::{
    ComponentState, DirtyBitmap, MachineError, PageRange, PageRequester, PostcopyPagingStats,
    PostcopySink,
};
use crate::stats::{MigrationStats, PostcopyBlocktime, PostcopySwitch};
use crate::status::MigrationStatus;
use crate::wire::{PageData, RamBatch, RamDiscard, RpMessage};

/// Where post-copy stands on this side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Negotiated: pre-copy pages are tracked.
    Negotiated,
    /// `POSTCOPY_LISTEN`: paging started, the package loads.
    Listening,
    /// `POSTCOPY_RUN`: the guest runs here; pages are placed.
    Running,
}

/// Per block, the pages this side does not hold (set = missing): the one received set of
/// every channel (the main one and the preempt channel place through it, decision 153).
pub(super) struct Missing {
    pub(super) bits: Vec<DirtyBitmap>,
    /// Number of set bits in `bits`.
    pub(super) count: u64,
}

impl Missing {
    /// Whether `page` of `block` is missing.
    pub(super) fn get(&self, block: usize, page: u64) -> bool {
        self.bits.get(block).is_some_and(|m| m.get(page))
    }

    /// `page` of `block` is not here (any more); whether it was here until now.
    fn lose(&mut self, block: usize, page: u64) -> bool {
        match self.bits.get_mut(block) {
            Some(m) if !m.get(page) => {
                m.set(page);
                self.count += 1;
                true
            }
            _ => false,
        }
    }

    /// `page` of `block` is here now.
    pub(super) fn received(&mut self, block: usize, page: u64) {
        if let Some(m) = self.bits.get_mut(block) {
            if m.get(page) {
                m.unset(page);
                self.count -= 1;
            }
        }
    }
}

/// The shared received set.
pub(super) type SharedMissing = Arc<Mutex<Missing>>;

pub(super) fn lock_missing(m: &Mutex<Missing>) -> std::sync::MutexGuard<'_, Missing> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Places every page of a batch received after RUN, on whichever channel: under the received
/// set's lock each page is checked missing, placed and marked received, so no page is ever
/// placed twice (decision 73: a page already here fails the migration).
pub(super) fn place_pages(
    missing: &Mutex<Missing>,
    sink: &mut dyn PostcopySink,
    batch: &RamBatch<'_>,
) -> Result<(), DestError> {
    for p in batch.pages() {
        let (block, page) = (usize::from(p.block), u64::from(p.page));
        let mut m = lock_missing(missing);
        if !m.get(block, page) {
            return Err(DestError::Protocol(format!(
                "page {page} of block {block} sent in post-copy but already present"
            )));
        }
        let placed = match p.data {
            PageData::Zero => sink.place_zero(block, page),
            PageData::Normal(d) => sink.place(block, page, d),
        }
        .map_err(|source| DestError::Machine {
            op: format!("placing RAM block {block} page {page}"),
            source,
        })?;
        if !placed {
            return Err(DestError::Protocol(format!(
                "page {page} of block {block} sent in post-copy but already present"
            )));
        }
        m.received(block, page);
    }
    Ok(())
}

/// The destination's post-copy bookkeeping.
pub(super) struct PostcopyRx {
    stage: Stage,
    /// The received set, shared with the preempt channel's reader.
    missing: SharedMissing,
    /// Per block: pages the guest asked for (shared with the requester): at a recovery every
    /// page requested and still missing is asked for again (§13.6).
    requested: Arc<Mutex<Vec<DirtyBitmap>>>,
    /// Per block: pages the early discard dropped and nothing wrote since (⊆ missing):
    /// `POSTCOPY_LISTEN` does not drop them a second time. Only the main reader touches it
    /// (before `POSTCOPY_LISTEN` there is no other).
    dropped: Vec<DirtyBitmap>,
    /// The switch as this side sees it (`x-tern-postcopy-switch`).
    clock: SwitchClock,
}

/// Instants of the switch on this side.
#[derive(Default)]
struct SwitchClock {
    /// `SWITCHOVER_START` read.
    start: Option<Instant>,
    /// The first `RAM_DISCARD` read.
    first_discard: Option<Instant>,
    /// `POSTCOPY_LISTEN` handled.
    listened: Option<Instant>,
    times: PostcopySwitch,
}

impl PostcopyRx {
    /// A page loaded in pre-copy (written whole: a page dropped early is held again).
    pub(super) fn received(&mut self, block: usize, page: u64) {
        lock_missing(&self.missing).received(block, page);
        if let Some(d) = self.dropped.get_mut(block) {
            d.unset(page);
        }
    }

    /// The received set (for the preempt channel's reader).
    pub(super) fn shared_missing(&self) -> SharedMissing {
        self.missing.clone()
    }

    /// Per block, the received bitmap (the complement of `missing`), as `RECV_BITMAP` bytes.
    pub(super) fn received_bytes(&self, block: usize, pages: u64) -> Vec<u8> {
        let mut out = vec![0u8; pages.div_ceil(8) as usize];
        let missing = lock_missing(&self.missing);
        if let Some(m) = missing.bits.get(block) {
            for p in 0..pages {
                if !m.get(p) {
                    out[(p / 8) as usize] |= 1 << (p % 8);
                }
            }
        }
        out
    }

    /// Pages still missing.
    pub(super) fn missing_count(&self) -> u64 {
        lock_missing(&self.missing).count
    }

    /// Every page requested and still missing, as ranges of at most 1024 pages (the
    /// requests a broken channel may have lost).
    pub(super) fn pending_requests(&self) -> Vec<PageRange> {
        let requested = self.requested.lock().unwrap_or_else(|p| p.into_inner());
        let missing = lock_missing(&self.missing);
        let mut out: Vec<PageRange> = Vec::new();
        for (b, (req, miss)) in requested.iter().zip(&missing.bits).enumerate() {
            let Ok(block) = u16::try_from(b) else { break };
            for p in 0..req.pages() {
                if !(req.get(p) && miss.get(p)) {
                    continue;
                }
                let Ok(page) = u32::try_from(p) else { break };
                match out.last_mut() {
                    Some(r)
                        if r.block == block
                            && r.first + r.count == page
                            && r.count < crate::wire::RP_MAX_REQ_PAGES =>
                    {
                        r.count += 1
                    }
                    _ => out.push(PageRange {
                        block,
                        first: page,
                        count: 1,
                    }),
                }
            }
        }
        out
    }

    fn mark_missing(&mut self, block: usize, page: u64) {
        lock_missing(&self.missing).lose(block, page);
    }
}

/// The engine's [`PageRequester`]: one `REQ_PAGES` per range, a batch in one write. Every
/// range is also noted in `requested`; while the channel is down (post-copy paused) nothing is
/// written and the request is kept there, to be sent again by the recovery (§13.6), so the
/// fault thread never fails because the link did.
struct RpRequester {
    rp: RpWriter,
    stats: MigrationStats,
    requested: Arc<Mutex<Vec<DirtyBitmap>>>,
}

impl PageRequester for RpRequester {
    fn request(&self, ranges: &[PageRange]) -> Result<(), MachineError> {
        {
            let mut req = self.requested.lock().unwrap_or_else(|p| p.into_inner());
            for r in ranges {
                if let Some(m) = req.get_mut(usize::from(r.block)) {
                    for p in u64::from(r.first)..u64::from(r.first) + u64::from(r.count) {
                        m.set(p);
                    }
                }
            }
        }
        let mut buf = Vec::with_capacity(ranges.len() * 18);
        for r in ranges {
            buf.extend_from_slice(
                &RpMessage::ReqPages {
                    block: r.block,
                    first_page: r.first,
                    count: r.count,
                }
                .encode(),
            );
        }
        {
            let mut g = self.rp.lock().unwrap_or_else(|p| p.into_inner());
            let Some(s) = g.as_mut() else {
                tracing::debug!("return path down: the request waits for a recovery");
                return Ok(());
            };
            if let Err(e) = s.write_all(&buf).and_then(|()| s.flush()) {
                // The channel broke: the reader sees it too and pauses; the request is kept.
                tracing::warn!(error = %e, "writing REQ_PAGES failed; kept for a recovery");
                *g = None;
                return Ok(());
            }
        }
        let n = ranges.len() as u64;
        self.stats.update(|r, _| r.postcopy_requests += n);
        Ok(())
    }
}

impl Receiver {
    fn pc_protocol(what: &str) -> DestError {
        DestError::Protocol(format!(
            "post-copy record {what} received, but post-copy was not negotiated"
        ))
    }

    /// `CAPABILITIES`: `postcopy-ram` must be set on both sides, and this machine must be able
    /// to page on demand.
    pub(super) fn postcopy_capability(&mut self, source_on: bool) -> Result<(), DestError> {
        if source_on != self.opts.postcopy_ram {
            let side = |on: bool| if on { "on" } else { "off" };
            return Err(DestError::Protocol(format!(
                "capability 'postcopy-ram' is {} at the source but {} at the destination: it must be set on both sides",
                side(source_on),
                side(self.opts.postcopy_ram)
            )));
        }
        if !source_on {
            return Ok(());
        }
        if self.m.postcopy.is_none() {
            return Err(DestError::Protocol(
                "capability 'postcopy-ram': this destination machine cannot page on demand".into(),
            ));
        }
        let ps = self.m.ram.page_size();
        let mut missing: Vec<DirtyBitmap> = self
            .m
            .ram
            .blocks()
            .iter()
            .map(|b| DirtyBitmap::new(b.pages(ps)))
            .collect();
        for m in &mut missing {
            m.set_all();
        }
        let missing_count = missing.iter().map(DirtyBitmap::count).sum();
        let requested = missing
            .iter()
            .map(|m| DirtyBitmap::new(m.pages()))
            .collect();
        let dropped = missing
            .iter()
            .map(|m| DirtyBitmap::new(m.pages()))
            .collect();
        self.pc = Some(PostcopyRx {
            stage: Stage::Negotiated,
            missing: Arc::new(Mutex::new(Missing {
                bits: missing,
                count: missing_count,
            })),
            requested: Arc::new(Mutex::new(requested)),
            dropped,
            clock: SwitchClock::default(),
        });
        Ok(())
    }

    /// `POSTCOPY_ADVISE`: can this machine page on demand?
    pub(super) fn advise(&mut self) -> Result<(), DestError> {
        if self.pc.is_none() {
            return Err(Self::pc_protocol("POSTCOPY_ADVISE"));
        }
        let sink = self
            .m
            .postcopy
            .as_mut()
            .ok_or_else(|| Self::pc_protocol("POSTCOPY_ADVISE"))?;
        sink.probe().map_err(|source| DestError::Machine {
            op: "post-copy is not possible on this destination".into(),
            source,
        })
    }

    /// RAM_DISCARD: the pages are stale here; they will be fetched. Before `SWITCHOVER_START`
    /// (the reader admits that only in a version-7 stream after ADVISE) it is the early
    /// discard: [`Self::discard_early`].
    pub(super) fn discard(&mut self, d: &RamDiscard) -> Result<(), DestError> {
        let pc = self
            .pc
            .as_mut()
            .ok_or_else(|| Self::pc_protocol("RAM_DISCARD"))?;
        if pc.clock.start.is_none() {
            return self.discard_early(d);
        }
        pc.clock.first_discard.get_or_insert_with(Instant::now);
        let block = usize::from(d.block);
        let before = pc.missing_count();
        for &(first, n) in &d.ranges {
            for p in u64::from(first)..u64::from(first) + u64::from(n) {
                pc.mark_missing(block, p);
            }
        }
        pc.clock.times.discard_pages += pc.missing_count() - before;
        Ok(())
    }

    /// The early discard (decision 200): the source's guest still runs; every named page held
    /// here is dropped now and marked missing, so that `POSTCOPY_LISTEN`, in the blackout, need
    /// not drop it. Done before the next record is read: a `PING` after it is answered only
    /// once the pages are gone (the source's drain waits for that `PONG`).
    fn discard_early(&mut self, d: &RamDiscard) -> Result<(), DestError> {
        let t0 = Instant::now();
        let (Some(pc), Some(sink)) = (self.pc.as_mut(), self.m.postcopy.as_mut()) else {
            return Err(Self::pc_protocol("RAM_DISCARD"));
        };
        let block = usize::from(d.block);
        let mut runs: Vec<(u64, u64)> = Vec::new();
        {
            let mut missing = lock_missing(&pc.missing);
            for &(first, n) in &d.ranges {
                for p in u64::from(first)..u64::from(first) + u64::from(n) {
                    // Not held (never received, or dropped already): nothing to drop.
                    if !missing.lose(block, p) {
                        continue;
                    }
                    if let Some(dr) = pc.dropped.get_mut(block) {
                        dr.set(p);
                    }
                    match runs.last_mut() {
                        Some((f, c)) if *f + *c == p => *c += 1,
                        _ => runs.push((p, 1)),
                    }
                }
            }
        }
        if !runs.is_empty() {
            sink.drop_pages(block, &runs)
                .map_err(|source| DestError::Machine {
                    op: format!("dropping re-dirtied pages of RAM block {block} (early discard)"),
                    source,
                })?;
        }
        let t = &mut pc.clock.times;
        t.early_discard_pages += runs.iter().map(|r| r.1).sum::<u64>();
        t.early_discard += t0.elapsed();
        Ok(())
    }

    /// `SWITCHOVER_START` in post-copy: the switch's clock starts.
    pub(super) fn switch_started(&mut self) {
        if let Some(pc) = &mut self.pc {
            pc.clock.start = Some(Instant::now());
        }
    }

    /// `POSTCOPY_LISTEN`: start paging; from here pages are requested.
    pub(super) fn listen(&mut self) -> Result<(), DestError> {
        let read_at = Instant::now();
        let missing = self
            .pc
            .as_ref()
            .map(PostcopyRx::shared_missing)
            .ok_or_else(|| Self::pc_protocol("POSTCOPY_LISTEN"))?;
        self.preempt_listen(missing)?;
        let pc = self
            .pc
            .as_mut()
            .ok_or_else(|| Self::pc_protocol("POSTCOPY_LISTEN"))?;
        let c = &mut pc.clock;
        let start = c.start.unwrap_or(read_at);
        let first = c.first_discard.unwrap_or(read_at);
        c.times.wait_discard = first.saturating_duration_since(start);
        c.times.discard = read_at.saturating_duration_since(first);
        let sink = self
            .m
            .postcopy
            .as_mut()
            .ok_or_else(|| Self::pc_protocol("POSTCOPY_LISTEN"))?;
        let requester = Arc::new(RpRequester {
            rp: self.rp.clone(),
            stats: self.stats.clone(),
            requested: pc.requested.clone(),
        });
        let missing = lock_missing(&pc.missing);
        tracing::info!(missing = missing.count, "post-copy: demand paging starts");
        sink.start(&missing.bits, &pc.dropped, requester)
            .map_err(|source| DestError::Machine {
                op: "starting demand paging (post-copy)".into(),
                source,
            })?;
        drop(missing);
        let now = Instant::now();
        pc.clock.times.listen = now.saturating_duration_since(read_at);
        pc.clock.listened = Some(now);
        pc.stage = Stage::Listening;
        self.set_status(MigrationStatus::PostcopyActive);
        Ok(())
    }

    /// `POSTCOPY_RUN` (its package's checksum checked): restore the package, run the guest;
    /// the switch's phases go to `query-migrate`.
    pub(super) fn postcopy_run(&mut self, finals: Vec<ComponentState>) -> Result<(), DestError> {
        let run_at = Instant::now();
        self.restore_and_run(finals)?;
        let done = Instant::now();
        if let Some(pc) = &mut self.pc {
            pc.stage = Stage::Running;
            let c = &mut pc.clock;
            let listened = c.listened.unwrap_or(run_at);
            c.times.package = run_at.saturating_duration_since(listened);
            c.times.restore = done.saturating_duration_since(run_at);
            c.times.total = done.saturating_duration_since(c.start.unwrap_or(run_at));
            let t = c.times;
            tracing::info!(switch = ?t, "post-copy: the guest runs here");
            self.stats.set_postcopy_switch(t);
        }
        Ok(())
    }

    /// Pages are placed, not written: the guest runs.
    pub(super) fn postcopy_running(&self) -> bool {
        self.pc
            .as_ref()
            .is_some_and(|pc| pc.stage == Stage::Running)
    }

    /// A RAM record after RUN: every page must be one this side lacks (decision 73).
    pub(super) fn place_batch(&mut self, batch: &RamBatch<'_>) -> Result<(), DestError> {
        let (Some(pc), Some(sink)) = (self.pc.as_mut(), self.m.postcopy.as_mut()) else {
            return Err(Self::pc_protocol("RAM"));
        };
        place_pages(&pc.missing, sink.as_mut(), batch)?;
        let st = sink.stats();
        self.publish(&st);
        Ok(())
    }

    pub(super) fn publish(&self, st: &PostcopyPagingStats) {
        if let Some(pc) = &self.pc {
            self.stats.set_postcopy_missing_pages(pc.missing_count());
        }
        let bytes = st.bytes_placed;
        self.stats.update(|r, _| r.postcopy_bytes = bytes);
        if self.opts.postcopy_blocktime {
            self.stats.set_postcopy_blocktime(PostcopyBlocktime {
                all_vcpus: st.blocktime,
                per_vcpu: st.vcpu_blocktime.clone(),
                latency: st.latency,
            });
        }
    }

    /// END after RUN: every page must be here; paging stops, `SHUT{0}`.
    pub(super) fn postcopy_end(&mut self) -> Result<(), DestError> {
        // The preempt channel's END came before this one: its pages are all placed once its
        // reader has read it (decision 156).
        self.join_preempt()?;
        let missing = self.pc.as_ref().map_or(0, |pc| pc.missing_count());
        if missing > 0 {
            return Err(DestError::Protocol(format!(
                "END with {missing} pages never sent in post-copy"
            )));
        }
        if let Some(sink) = self.m.postcopy.as_mut() {
            let st = sink.stats();
            sink.finish().map_err(|source| DestError::Machine {
                op: "stopping demand paging".into(),
                source,
            })?;
            self.publish(&st);
        }
        tracing::info!("post-copy: every page is here");
        if let Err(e) = send_rp(&self.rp, &RpMessage::Shut { error: false }) {
            tracing::warn!(error = %e, "cannot send SHUT");
        }
        Ok(())
    }

    /// An error after RUN names the pages that never came.
    pub(super) fn postcopy_failure(&mut self, e: DestError) -> DestError {
        match &self.pc {
            Some(pc) if pc.stage == Stage::Running && pc.missing_count() > 0 => {
                DestError::PostcopyLost {
                    pages: pc.missing_count(),
                    source: Box::new(e),
                }
            }
            _ => e,
        }
    }
}
