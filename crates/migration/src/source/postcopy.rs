//! Post-copy on the source (`postcopy-ram`, `docs/migration-engine.md` §9; QEMU's
//! `postcopy_start` and `ram_save_queue_pages`).
//!
//! ```text
//!  active ──migrate-start-postcopy, devices fit──> [preempt channel] ──> [multifd: final
//!  SYNC on every channel, channels closed, MULTIFD_END] ──> sync, early RAM_DISCARD (guest
//!  running), drain PING/PONG ──> pause ──> SWITCHOVER_START, RUN_STATE,
//!  final sync, RAM_DISCARD (every page still to send), POSTCOPY_LISTEN, device SECTIONs,
//!  POSTCOPY_RUN ──> postcopy-active: requested pages first, then the push ──> END ──SHUT{0}──> completed
//! ```
//!
//! Once `POSTCOPY_RUN` is written the destination may run the guest: from then on every
//! failure leaves this source paused and `failed` (decision 74), never resumed.

use std::time::{Duration, Instant};

use super::*;
use crate::convergence::postcopy_auto::AutoSample;
use crate::convergence::RateLimiter;

/// Pages of background push per round (then requests are looked at again): 16 (64 KiB,
/// 0.5 ms at 1 Gbit/s) rather than 64, so a request waits behind at most that much of the
/// push before it is served (decision 207).
const PUSH_PAGES: u64 = 16;

/// Push bytes that may be on their way (written, not yet confirmed read by the destination
/// through a `PONG`) after `POSTCOPY_RUN` (decision 141): a requested page waits behind at
/// most about this much push, in the socket buffers of both sides (~4 ms at 1 Gbit/s).
const PUSH_WINDOW: u64 = 512 << 10;

/// How long the guest may run on while pre-copy's queue drains before the switch.
const SWITCH_DRAIN_LIMIT: Duration = Duration::from_secs(2);

impl Sender {
    /// Refuses what post-copy cannot work with, before anything is sent.
    pub(super) fn check_postcopy_setup(&self, return_path: bool) -> Result<(), SourceError> {
        if !return_path {
            return Err(SourceError::Machine {
                op: "postcopy-ram",
                source: MachineError::rejected(
                    "postcopy-ram",
                    "post-copy needs a live migration over a socket (page requests travel on its \
                     return path); a file cannot carry them",
                ),
            });
        }
        if self.opts.ram_digest {
            return Err(SourceError::Machine {
                op: "postcopy-ram",
                source: MachineError::rejected(
                    "postcopy-ram",
                    "'x-tern-ram-digest' cannot be used with post-copy (decision 71)",
                ),
            });
        }
        Ok(())
    }

    /// QEMU's rule for the switch: `migrate-start-postcopy` was issued, the state that
    /// cannot be post-copied (the devices' pending data) fits the threshold and the
    /// switchover gate is open. Waits for the destination's `PONG 1` (it accepted CONFIG,
    /// CAPABILITIES and ADVISE) before saying yes.
    pub(super) fn postcopy_due(
        &mut self,
        threshold: u64,
        gate_open: bool,
    ) -> Result<bool, SourceError> {
        if !self.opts.postcopy_ram || !self.shared.lock().start_postcopy || !gate_open {
            return Ok(false);
        }
        if self.devices_pending(false)? > threshold {
            return Ok(false);
        }
        self.wait_alive(None, |f| f.last_pong >= 1)?;
        self.check_abort()?;
        Ok(true)
    }

    /// `x-tern-postcopy-auto`, at a pre-copy sync: asks the policy
    /// (`convergence::postcopy_auto`) and, when pre-copy is predicted not to meet
    /// `downtime-limit`, switches as `migrate-start-postcopy` would (the next round of the
    /// loop, through [`Self::postcopy_due`]). The decision is in `query-migrate`. Returns
    /// whether post-copy is to start (then auto-converge raises no throttle at this sync).
    pub(super) fn judge_postcopy_auto(
        &mut self,
        pending: u64,
        threshold: u64,
        precopy_switches: bool,
    ) -> Result<bool, SourceError> {
        let syncs = self.ram()?.dirty_sync_count;
        let sample = AutoSample {
            pending,
            threshold,
            bandwidth: self.estimator.as_ref().and_then(|e| e.bytes_per_ms()),
            dirty_rate: self.rule.recent_max_dirty_rate(),
            syncs,
            rule_armed: precopy_switches || self.rule.armed(),
        };
        let d = self.postcopy_auto.at_sync(&sample);
        let switching = d.switch && !precopy_switches;
        if switching {
            let mut f = self.shared.lock();
            if !f.start_postcopy {
                tracing::info!(
                    rule = d.rule.as_str(),
                    reason = %d.reason,
                    "x-tern-postcopy-auto: switching to post-copy"
                );
                f.start_postcopy = true;
            }
        }
        self.stats.set_postcopy_auto(d);
        Ok(switching)
    }

    /// The early discard (decision 200, stream format §13.3), the guest still running: a
    /// dirty-log sync, then RAM_DISCARD for every page of the to-send set (the pages the
    /// destination may hold a stale copy of; it drops them at once and skips the rest). The
    /// drain's `PONG` that follows confirms they are dropped. Nothing else is sent between
    /// here and the stop, so these pages are still dropped there when the final RAM_DISCARD
    /// names them again (the destination does not pay for them twice, decision 201).
    fn early_discard(&mut self) -> Result<(), SourceError> {
        let t0 = Instant::now();
        self.sync_pass(t0)?;
        let runs = self.ram()?.dirty_runs();
        let mut pages = 0u64;
        for (block, ranges) in &runs {
            pages += ranges.iter().map(|r| u64::from(r.1)).sum::<u64>();
            self.writer()?.write_ram_discard(*block, ranges)?;
        }
        tracing::info!(
            pages,
            us = t0.elapsed().as_micros() as u64,
            "post-copy: early discard sent, the guest still runs"
        );
        Ok(())
    }

    /// Before the stop (decision 140): a `PING` goes out behind what pre-copy queued (up to the 8 MiB socket buffers on each
    /// side: ~130 ms at 1 Gbit/s, ~10 ms of the destination's loading on loopback); its `PONG`
    /// says the destination has read all of it. Meanwhile the guest runs on (pages it dirties
    /// are discarded and fetched like any other), so the switch records do not wait behind
    /// that queue while it is stopped. Bounded by [`SWITCH_DRAIN_LIMIT`].
    fn drain_before_switch(&mut self) -> Result<(), SourceError> {
        let t0 = Instant::now();
        let seq = self.send_ping()?;
        self.wait_alive(Some(SWITCH_DRAIN_LIMIT), |f| f.last_pong >= seq)?;
        self.check_abort()?;
        tracing::debug!(
            waited_us = t0.elapsed().as_micros() as u64,
            "post-copy: pre-copy's queue drained before the stop"
        );
        Ok(())
    }

    /// TEST ONLY ([`SourceOptions::x_test_hold_before_postcopy_stop`]): the moment between the
    /// destination's early discard and the stop, held until the migration fails or is
    /// cancelled (keepalives go on, so only a vanished or silent destination ends it).
    fn x_test_hold_before_stop(&mut self) -> Result<(), SourceError> {
        if !self.opts.x_test_hold_before_postcopy_stop {
            return Ok(());
        }
        tracing::warn!("x-test: holding at postcopy-before-stop (the early discard is applied)");
        self.wait_alive(None, |_| false)?;
        self.check_abort()
    }

    /// The switch and the post-copy phase, up to `completed`.
    pub(super) fn postcopy(&mut self) -> Result<(), SourceError> {
        if self.opts.postcopy_preempt {
            // With the guest still running: a preempt channel that cannot be set up fails the
            // migration here, and the guest runs on (decision 152).
            self.open_preempt()?;
        }
        // Multifd's channels end before anything drops pages on the destination (§5.4).
        self.multifd_end_for_postcopy()?;
        self.early_discard()?;
        self.drain_before_switch()?;
        self.x_test_hold_before_stop()?;
        // `bytes_at_stop` counts the preempt channel (its handshake went before the stop) and
        // the multifd channels (ended above) as `ram.transferred` does.
        self.stop_vm(Instant::now())?;
        if self.opts.pause_before_switchover {
            self.set_status(MigrationStatus::PreSwitchover);
            self.wait_alive(None, |f| f.cont)?;
            self.check_abort()?;
            self.timeline.pre_switchover = self.lap();
        }
        self.set_status(MigrationStatus::PostcopyActive);
        self.writer()?.write_command(Command::SwitchoverStart)?;
        let running = self.paused_by_us || self.opts.stopped_by_earlier_migration;
        self.writer()?
            .write_command(Command::RunState { running })?;
        // Final sync: the to-send set is now every page never sent or dirtied since it was.
        self.sync_pass(Instant::now())?;
        // QEMU's discard: every page still to send is dropped on the destination (a stale
        // pre-copy copy must never be read there; a never-sent page is missing anyway).
        let runs = self.ram()?.dirty_runs();
        for (block, ranges) in &runs {
            self.writer()?.write_ram_discard(*block, ranges)?;
        }
        self.release_at_switch()?;
        self.writer()?.write_command(Command::PostcopyListen)?;
        self.timeline.final_ram = self.lap();
        self.check_abort()?;
        // The package: every device and component state, complete before the guest runs.
        self.save_devices()?;
        let comps = self
            .m
            .state
            .save_components()
            .map_err(|source| SourceError::Machine {
                op: "saving the machine state",
                source,
            })?;
        for c in &comps {
            self.writer()?
                .write_section(&c.id, c.instance, c.version, &c.data)?;
        }
        self.timeline.device_state = self.lap();
        self.check_abort()?;
        self.writer()?.write_postcopy_run()?;
        // From the first byte of RUN on, the destination may act on it: never resume here.
        self.shared.lock().postcopy_run_sent = true;
        self.writer()?.flush()?;
        // Every channel, multifd's included, as `bytes_at_stop` and `ram.transferred`.
        self.bytes_at_run = Some(self.transferred_bytes());
        self.timeline.end_flush = self.lap();
        let pages = self.ram()?.remaining_pages();
        tracing::info!(
            pages,
            "post-copy: the destination runs, pages follow on demand"
        );
        // A broken channel pauses (QEMU's `postcopy_pause`) until a recovery channel is up;
        // then the push goes on from what the destination lacks (`recovery.rs`).
        loop {
            match self.push().and_then(|()| self.end_postcopy()) {
                Ok(()) => return Ok(()),
                Err(e) if self.pauses_postcopy(&e) => self.postcopy_paused(e)?,
                Err(e) => return Err(e),
            }
        }
    }

    /// Every page sent: END, then the destination's `SHUT{0}`.
    fn end_postcopy(&mut self) -> Result<(), SourceError> {
        self.finish_preempt()?;
        let w = self.writer.take().ok_or(SourceError::Cancelled)?;
        self.bytes_of_earlier_channels += w.bytes_written() + 17;
        let _stream = w.finish()?;
        self.stats.update(|r, _| {
            r.transferred += 17;
            r.postcopy_bytes += 17;
        });
        self.await_postcopy_end(Instant::now())?;
        self.release_all();
        Ok(())
    }

    /// After RUN: requested pages first (each range clipped to the pages not sent yet), then
    /// the background push from just after the last requested page, limited by
    /// `max-postcopy-bandwidth`, until every page is sent.
    fn push(&mut self) -> Result<(), SourceError> {
        let mut limiter = RateLimiter::new(
            self.shared.lock().tuning.max_postcopy_bandwidth,
            Instant::now(),
        );
        let mut downtime_ended = false;
        let mut window = PushWindow::new(self.writer()?.bytes_written());
        loop {
            self.check_abort()?;
            let (queued, resumed_at, limit, pong) = {
                let mut f = self.shared.lock();
                let q: Vec<_> = f.requests.drain(..).collect();
                (
                    q,
                    f.resumed_at,
                    f.tuning.max_postcopy_bandwidth,
                    f.last_pong,
                )
            };
            window.ponged(pong);
            self.release_confirmed(pong, resumed_at.is_some());
            if let (false, Some(at)) = (downtime_ended, resumed_at) {
                downtime_ended = true;
                self.stats.downtime_end(at);
                self.timeline.destination = at.saturating_duration_since(self.mark);
                self.stats.set_switchover_timeline(self.timeline);
            }
            limiter.set_limit(limit);
            let mut flush = false;
            if !queued.is_empty() {
                let n = queued.len() as u64;
                let mut pages = Vec::new();
                let ram = self.ram()?;
                for r in &queued {
                    let block = usize::from(r.block);
                    for p in u64::from(r.first)..u64::from(r.first) + u64::from(r.count) {
                        if ram.take_page(block, p) {
                            pages.push((block, p));
                        }
                    }
                }
                if let Some(&(b, p)) = pages.last() {
                    ram.set_cursor(b, p + 1);
                    // On the preempt channel when there is one (flushed there), else here.
                    flush = !self.preempt.is_open();
                    self.send_requested(&pages)?;
                }
                // Counted across recovery channels (QEMU's `postcopy-requests`).
                self.stats.update(|r, _| r.postcopy_requests += n);
            }
            let left = self.ram()?.remaining_pages();
            let room = window.room(self.writer()?.bytes_written());
            if left > 0 && room && limiter.delay(Instant::now()).is_zero() {
                let page = self.ram()?.page_size() as u64;
                let (ram, w) = (self.ram.as_mut(), self.writer.as_mut());
                if let (Some(ram), Some(w)) = (ram, w) {
                    let sent = ram.send(self.m.ram.as_mut(), w, PUSH_PAGES * page)?;
                    limiter.record(sent.bytes);
                }
                flush = true;
            }
            if flush {
                self.writer()?.flush()?;
            }
            if window.wants_ping(self.writer()?.bytes_written()) {
                let seq = self.send_ping()?;
                window.pinged(seq, self.writer()?.bytes_written());
            }
            self.update_counters(Instant::now(), 0.0);
            if self.ram()?.remaining_pages() == 0 {
                return Ok(());
            }
            let delay = limiter.delay(Instant::now());
            if !window.room(self.writer()?.bytes_written()) {
                // Wait for a request or the PONG that opens the window.
                let seq = window.awaited();
                let timeout = (!delay.is_zero()).then_some(delay);
                self.wait_alive(timeout, move |f| {
                    !f.requests.is_empty() || seq.is_some_and(|s| f.last_pong >= s)
                })?;
            } else if !delay.is_zero() {
                self.wait_alive(Some(delay), |f| !f.requests.is_empty())?;
            }
        }
    }

    /// After END: the destination answers `SHUT{0}` once every page is placed.
    fn await_postcopy_end(&mut self, flushed_at: Instant) -> Result<(), SourceError> {
        let mut f = self.shared.lock();
        loop {
            if let Some((_, false)) = f.shut_at {
                if let (Some(at), None) = (f.resumed_at, self.stats.snapshot().downtime_ms) {
                    drop(f);
                    self.stats.downtime_end(at);
                }
                return Ok(());
            }
            if let Some(d) = &f.dest_error {
                return Err(SourceError::Destination(d.clone()));
            }
            if f.cancel {
                return Err(SourceError::Cancelled);
            }
            if let Some(r) = &f.rp_fault {
                return Err(SourceError::ReturnPath(r.clone()));
            }
            if f.rp_closed {
                return Err(SourceError::ReturnPath(
                    "the destination closed the return path before it had every page".into(),
                ));
            }
            let ms = f.tuning.resume_timeout_ms;
            let deadline = flushed_at + Duration::from_millis(ms);
            let now = Instant::now();
            if now >= deadline {
                return Err(SourceError::ReturnPath(format!(
                    "the destination did not confirm every page within {ms} ms (x-tern-resume-timeout)"
                )));
            }
            f = self
                .shared
                .cv
                .wait_timeout(f, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }
}

/// The push's window (decision 141): at most [`PUSH_WINDOW`] bytes written and not yet
/// confirmed read by the destination. A `PING` goes out once half the window is unconfirmed;
/// its `PONG` (the destination answers in stream order) confirms every byte before it.
struct PushWindow {
    /// Stream bytes the destination has read (up to the last `PING` answered).
    confirmed: u64,
    /// The `PING` in flight: its sequence number and the stream bytes written before it.
    in_flight: Option<(u32, u64)>,
}

impl PushWindow {
    fn new(written: u64) -> Self {
        Self {
            confirmed: written,
            in_flight: None,
        }
    }

    /// The last `PONG` seen carries `pong`.
    fn ponged(&mut self, pong: u32) {
        if let Some((seq, at)) = self.in_flight {
            if pong >= seq {
                self.confirmed = at;
                self.in_flight = None;
            }
        }
    }

    /// Whether more push may be written.
    fn room(&self, written: u64) -> bool {
        written.saturating_sub(self.confirmed) < PUSH_WINDOW
    }

    /// Whether a `PING` should go out now.
    fn wants_ping(&self, written: u64) -> bool {
        self.in_flight.is_none() && written.saturating_sub(self.confirmed) >= PUSH_WINDOW / 2
    }

    fn pinged(&mut self, seq: u32, written: u64) {
        self.in_flight = Some((seq, written));
    }

    /// The `PING` whose answer opens the window.
    fn awaited(&self) -> Option<u32> {
        self.in_flight.map(|(seq, _)| seq)
    }
}

#[cfg(test)]
mod tests {
    use super::{PushWindow, PUSH_WINDOW};

    #[test]
    fn the_push_window_closes_at_its_size_and_opens_on_the_pong_of_its_ping() {
        let mut w = PushWindow::new(1000);
        assert!(w.room(1000) && !w.wants_ping(1000));
        let half = 1000 + PUSH_WINDOW / 2;
        assert!(w.room(half) && w.wants_ping(half));
        w.pinged(7, half);
        assert!(!w.wants_ping(half + 10), "one PING in flight at a time");
        assert_eq!(w.awaited(), Some(7));
        let full = 1000 + PUSH_WINDOW;
        assert!(!w.room(full));
        w.ponged(6);
        assert!(!w.room(full), "an older PONG confirms nothing");
        w.ponged(9);
        assert!(
            w.room(full),
            "a later PONG confirms everything before PING 7"
        );
        assert_eq!(w.awaited(), None);
        assert!(w.wants_ping(full), "half the window unconfirmed again");
    }
}
