//! The sender's steps (see the state diagram in `mod.rs`).

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use super::confirm::Confirmation;
use super::*;
use crate::convergence::rule::drain_wait;
use crate::digest::RamDigestJob;
use crate::wire;

/// `error-desc` of a cancelled migration (QEMU gives none; a reason is more useful).
pub(crate) const CANCELLED_DESC: &str = "migration cancelled by the user (migrate_cancel)";

/// Which phase the sender is in: the explicit state of the state machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Setup,
    Active,
    Switchover,
    Postcopy,
    Done,
}

impl Sender {
    pub(super) fn run(mut self, target: Target) -> SourceOutcome {
        let mut phase = Phase::Setup;
        let mut target = Some(target);
        let result = loop {
            let step = match phase {
                Phase::Setup => self.setup(target.take()).map(|live| {
                    if live {
                        Phase::Active
                    } else {
                        Phase::Switchover
                    }
                }),
                Phase::Active => self.precopy().map(|postcopy| {
                    if postcopy {
                        Phase::Postcopy
                    } else {
                        Phase::Switchover
                    }
                }),
                Phase::Switchover => self.switchover().map(|()| Phase::Done),
                Phase::Postcopy => self.postcopy().map(|()| Phase::Done),
                Phase::Done => break Ok(()),
            };
            match step {
                Ok(next) => phase = next,
                Err(e) => break Err(e),
            }
        };
        // Before anything else on every path: a failed migration resumes an unthrottled guest.
        self.remove_throttle();
        let (status, error) = match result {
            Ok(()) => {
                self.cleanup();
                self.complete_stats();
                let snap = self.stats.snapshot();
                tracing::info!(
                    total_ms = snap.total_time_ms,
                    downtime_ms = snap.downtime_ms,
                    goal_ms = self.shared.lock().tuning.downtime_limit_ms,
                    passes = snap.ram.dirty_sync_count,
                    timeline = ?self.timeline,
                    "outgoing migration completed"
                );
                (MigrationStatus::Completed, None)
            }
            Err(e) => self.fail(e),
        };
        self.set_status(status);
        SourceOutcome {
            status,
            error,
            machine: self.m,
        }
    }

    pub(super) fn set_status(&self, status: MigrationStatus) {
        self.shared.lock().status = status;
        self.stats.set_status(status);
        self.events.migration_status(status);
        tracing::info!(status = status.as_str(), "outgoing migration");
    }

    pub(super) fn writer(&mut self) -> Result<&mut Writer, SourceError> {
        self.writer
            .as_mut()
            .ok_or(SourceError::Wire(WireError::Finished("not open")))
    }

    /// Connects, sends header + CONFIG, opens the return path, starts the dirty log.
    /// Returns whether the migration is live (socket) or a non-live `file:` save.
    fn setup(&mut self, target: Option<Target>) -> Result<bool, SourceError> {
        let channel_uri = match &target {
            Some(Target::Uri(uri)) => Some(uri.clone()),
            _ => None,
        };
        self.check_multifd_setup(channel_uri.as_ref())?;
        let stream = match target {
            Some(Target::Uri(uri)) => {
                // The preempt channel connects here too (postcopy-preempt, `preempt.rs`).
                self.preempt.uri = Some(uri.clone());
                transport::connect(&uri, &self.shared.io)?
            }
            Some(Target::Stream(s)) => {
                if s.has_return_path() {
                    self.shared
                        .io
                        .register(s.as_fd())
                        .map_err(|e| SourceError::ReturnPath(format!("register socket: {e}")))?;
                }
                s
            }
            None => return Err(SourceError::Cancelled),
        };
        self.check_abort()?;
        let liveness = self.opts.liveness;
        let stream = match &self.opts.tls {
            Some(tls) => {
                let s = transport::tls_stream::client(stream, tls, liveness.limit());
                self.check_abort()?;
                s?
            }
            None => stream,
        };
        // The return-path reader checks every keepalive period whether a PING is overdue.
        crate::liveness::arm(&stream, liveness, Some(liveness.keepalive_period())).map_err(
            |source| TransportError::Io {
                op: "set the liveness options on",
                target: "the migration socket".into(),
                source,
            },
        )?;
        let live = stream.has_return_path();
        if !live {
            self.keepalive.disable();
        }
        let rp_stream = if (self.opts.return_path || self.opts.postcopy_ram) && live {
            stream
                .try_clone_for_return_path()
                .map_err(|e| SourceError::ReturnPath(format!("cannot clone the socket: {e}")))?
        } else {
            None
        };
        let d = self.m.state.describe();
        let config = d.stream_config(self.m.ram.page_size(), self.m.ram.blocks());
        let stream = Watched::new(stream, self.shared.clone(), liveness);
        if self.opts.postcopy_ram {
            self.check_postcopy_setup(rp_stream.is_some())?;
            self.check_preempt_setup()?;
        }
        // The lowest stream version with every record this migration writes (spec §10): every
        // migration sends self-checking RAM batches (version 5, §5.1), which is newer than
        // RAM_DIGEST (2) and post-copy (3), so that is 5 (decision 133); 6 with the post-copy
        // preempt channel (decision 150) or multifd (§5.2, decision 160); 7 and 8: see
        // `stream_version`.
        let version = self.stream_version();
        let mut w = StreamWriter::with_version(
            BufWriter::with_capacity(WRITE_BUFFER, stream),
            &config,
            &wire::Limits::default(),
            version,
        )?;
        let capabilities = Command::Capabilities {
            switchover_ack: self.opts.switchover_ack && rp_stream.is_some(),
            validate_uuid: self.opts.validate_uuid,
            ram_digest: self.opts.ram_digest,
            postcopy_ram: self.opts.postcopy_ram,
            postcopy_preempt: self.opts.postcopy_preempt,
            multifd: self.opts.multifd_channels.is_some(),
        };
        let mut multifd_id = None;
        let advise = Command::PostcopyAdvise {
            page_size: config.page_size,
        };
        if rp_stream.is_none() {
            w.write_command(capabilities)?;
            multifd_id = multifd::announce(
                &mut w,
                self.opts.multifd_channels,
                self.opts.multifd_compression.0,
            )?;
        }
        if let Some(rp) = rp_stream {
            w.write_command(Command::OpenReturnPath)?;
            // After OPEN_RETURN_PATH, so that a destination refusing them can say why; before
            // PING 1, whose PONG thus says CONFIG and CAPABILITIES were accepted.
            w.write_command(capabilities)?;
            multifd_id = multifd::announce(
                &mut w,
                self.opts.multifd_channels,
                self.opts.multifd_compression.0,
            )?;
            if self.opts.postcopy_ram {
                // Right after CAPABILITIES (§13.1): the destination checks that it can page on
                // demand before it answers PING 1.
                w.write_command(advise)?;
            }
            w.write_command(Command::Ping { seq: 1 })?;
            self.spawn_return_path(rp, &config, liveness)?;
            self.shared.lock().return_path = true;
        }
        w.flush()?;
        self.writer = Some(w);
        self.multifd_connect(channel_uri.as_ref(), multifd_id, &config)?;
        self.config = Some(config);
        for dev in &mut self.m.devices {
            dev.save_setup().map_err(|source| SourceError::Device {
                id: dev.id().to_owned(),
                instance: dev.instance(),
                op: "save_setup",
                source,
            })?;
        }
        let now = Instant::now();
        if live {
            self.m
                .ram
                .start_dirty_log()
                .map_err(|source| SourceError::Machine {
                    op: "starting the dirty log",
                    source,
                })?;
            self.dirty_log_on = true;
        } else {
            self.stop_vm(now)?;
        }
        let mut ram = RamSender::new(self.m.ram.as_ref(), now, self.opts.detect_zero_pages);
        let known_zero = ram.probe_known_zero(self.m.ram.as_mut())?;
        tracing::debug!(
            known_zero,
            "pages known to be zero (not read in the first pass)"
        );
        let total = ram.total_bytes();
        let page_size = ram.page_size() as u64;
        self.ram = Some(ram);
        self.events.migration_pass(1);
        self.stats.update(|r, _| {
            r.total = total;
            r.page_size = page_size;
            r.remaining = total;
            r.dirty_sync_count = 1;
        });
        let written = self.writer()?.bytes_written();
        if live {
            self.setup_auto_converge(now)?;
        }
        self.estimator = Some(BandwidthEstimator::new(now, written, 0));
        self.limiter = RateLimiter::new(self.shared.lock().tuning.max_bandwidth, now);
        self.stats.setup_done(now);
        self.check_abort()?;
        self.set_status(MigrationStatus::Active);
        Ok(live)
    }

    /// Error out when something ended the migration early.
    pub(super) fn check_abort(&self) -> Result<(), SourceError> {
        self.multifd_check()?;
        let f = self.shared.lock();
        if f.cancel {
            return Err(SourceError::Cancelled);
        }
        if let Some(d) = &f.dest_error {
            return Err(SourceError::Destination(d.clone()));
        }
        if let Some(r) = &f.rp_fault {
            return Err(SourceError::ReturnPath(r.clone()));
        }
        if f.rp_closed || f.shut_at.is_some() {
            return Err(SourceError::ReturnPath(
                "the destination closed the return path".into(),
            ));
        }
        Ok(())
    }

    pub(super) fn ram(&mut self) -> Result<&mut RamSender, SourceError> {
        self.ram
            .as_mut()
            .ok_or(SourceError::Wire(WireError::Finished("not set up")))
    }

    /// Pre-copy: iterate until the switchover rule says go (`convergence::rule`), or until
    /// `migrate-start-postcopy` was issued and the non-postcopiable state fits (returns true).
    fn precopy(&mut self) -> Result<bool, SourceError> {
        let ack_gate = self.opts.switchover_ack && self.rp_thread.is_some();
        loop {
            self.check_abort()?;
            let now = Instant::now();
            let tuning = self.shared.lock().tuning;
            self.limiter.set_limit(tuning.max_bandwidth);
            let bw = switchover_bandwidth(
                self.estimator.as_ref().and_then(|e| e.bytes_per_ms()),
                tuning.avail_switchover_bandwidth,
            );
            let threshold =
                threshold_bytes(bw, tuning.downtime_limit_ms).saturating_sub(self.queue_reserve());
            let remaining = self.ram()?.remaining_bytes();
            let estimate = remaining + self.devices_pending(false)?;
            let at = now.saturating_duration_since(self.started);
            let acked = self.shared.lock().acked;
            if self.postcopy_due(
                threshold,
                can_switchover(ack_gate, self.m.vcpus.is_running(), acked),
            )? {
                return Ok(true);
            }
            let mut decided = None;
            if self.rule.should_sync(estimate, threshold, remaining, at)
                || self.periodic_sync_due(now)
            {
                let dirtied = self.sync_pass(now)?;
                let pending = self.ram()?.remaining_bytes() + self.devices_pending(true)?;
                let running = self.m.vcpus.is_running();
                let ram = self.ram()?;
                let dirty_rate = ram.dirty_pages_rate as f64 * ram.page_size() as f64 / 1000.0;
                let transferred = self.writer()?.bytes_written() + self.multifd_bytes();
                let d = self.rule.at_sync(&SyncSample {
                    pending,
                    threshold,
                    bandwidth: bw,
                    dirty_rate,
                    gate_open: can_switchover(ack_gate, running, acked),
                    vm_running: running,
                    transferred,
                    at,
                    downtime_limit_ms: tuning.downtime_limit_ms,
                });
                tracing::debug!(
                    pending,
                    threshold,
                    bw,
                    dirty_rate,
                    rule = d.rule.as_str(),
                    switch = d.switch,
                    reason = %d.reason,
                    "switchover decision"
                );
                self.stats.set_switchover_decision(d.clone());
                let auto_switch = self.opts.postcopy_auto
                    && self.opts.postcopy_ram
                    && self.judge_postcopy_auto(pending, threshold, d.switch)?;
                if !d.switch && !self.rule.armed() && !auto_switch {
                    self.throttle_after_sync(now, dirtied)?;
                }
                decided = Some((d, pending));
            }
            self.update_counters(now, bw);
            let awaiting_ack = decided
                .as_ref()
                .is_some_and(|(d, _)| d.rule == RuleName::AwaitAck);
            self.note_ack(awaiting_ack, now);
            if let Some((_, pending)) = decided.filter(|(d, _)| d.switch) {
                if self.rp_thread.is_some() {
                    // Never stop the guest before the destination accepted CONFIG and
                    // CAPABILITIES: it answers the setup PING (seq 1) only after checking them,
                    // so a CPU, TSC, UUID or capability mismatch fails the migration while the
                    // guest still runs. Normally that PONG came long ago; bounded by liveness.
                    self.wait_alive(None, |f| f.last_pong >= 1)?;
                    self.check_abort()?;
                }
                if self.m.vcpus.is_running() && self.rp_thread.is_some() {
                    let wait = drain_wait(
                        pending,
                        threshold,
                        self.rule.recent_max_dirty_rate(),
                        bw,
                        tuning.downtime_limit_ms,
                    );
                    self.drain_destination(wait)?;
                }
                return Ok(false);
            }
            let sent = self.iterate_round()?;
            if sent == 0 || (awaiting_ack && self.devices_pending(false)? == 0) {
                // Nothing to send now (or everything that fits is sent and the ACK is missing):
                // the ACK, an abort, `migrate-start-postcopy` or the next window wakes us,
                // never a busy loop.
                let pc = self.shared.lock().start_postcopy;
                self.wait_alive(Some(BUFFER_DELAY), move |f| {
                    (f.acked && !acked) || (f.start_postcopy && !pc)
                })?;
                continue;
            }
            let delay = self.limiter.delay(Instant::now());
            if !delay.is_zero() {
                self.wait_alive(Some(delay), |_| false)?;
            }
        }
    }

    /// Bytes that may still wait unsent in the source's sockets at the stop and go out inside
    /// the downtime ahead of the final copy: [`crate::transport::NOTSENT_LOWAT_BYTES`] per
    /// connection (main stream and multifd channels). QEMU's threshold less this is what the
    /// final copy may take (decision 242).
    fn queue_reserve(&self) -> u64 {
        let connections = 1 + u64::from(self.opts.multifd_channels.unwrap_or(0));
        connections.saturating_mul(crate::transport::NOTSENT_LOWAT_BYTES as u64)
    }

    /// Before stopping the VM, lets the destination load what is still queued in the socket
    /// buffers (otherwise it loads that backlog inside the downtime): `PING`, then wait for its
    /// `PONG`, at most `limit` ([`drain_wait`]: only while waiting shrinks the final copy). No
    /// pass follows: what the guest dirtied meanwhile is part of the final copy.
    fn drain_destination(&mut self, limit: Duration) -> Result<(), SourceError> {
        if limit < Duration::from_millis(1) {
            return Ok(());
        }
        let seq = self.send_ping()?;
        let start = Instant::now();
        self.wait_alive(Some(limit), move |f| f.last_pong >= seq)?;
        self.check_abort()?;
        tracing::debug!(
            waited_us = start.elapsed().as_micros() as u64,
            limit_us = limit.as_micros() as u64,
            "drained the destination before the switchover"
        );
        Ok(())
    }

    fn note_ack(&mut self, awaiting: bool, now: Instant) {
        if !self.opts.switchover_ack {
            return;
        }
        if awaiting {
            self.ack_wait_since.get_or_insert(now);
        } else if let Some(since) = self.ack_wait_since.take() {
            self.ack_waited += now.saturating_duration_since(since);
        }
        let acked = self.shared.lock().acked;
        self.stats.set_switchover_ack(SwitchoverAckStats {
            enabled: true,
            acked,
            waited: self.ack_waited,
        });
    }

    /// Dirty-log sync: ends the current pass, starts the next. Returns the bytes the guest
    /// dirtied since the previous sync.
    pub(super) fn sync_pass(&mut self, now: Instant) -> Result<u64, SourceError> {
        let pass = self.ram()?.dirty_sync_count;
        self.write_sync_point(Command::IterationEnd { pass })?;
        let ram = self.ram.as_mut().ok_or(SourceError::Cancelled)?;
        let newly = ram.sync(self.m.ram.as_mut(), now)?;
        let dirtied = newly.saturating_mul(ram.page_size() as u64);
        let (pass, remaining, rate) = (
            ram.dirty_sync_count,
            ram.remaining_bytes(),
            ram.dirty_pages_rate,
        );
        // Publish before the event, so a listener reading query-migrate sees this pass.
        self.stats.update(|r, _| {
            r.dirty_sync_count = pass;
            r.remaining = remaining;
            r.dirty_pages_rate = rate;
        });
        self.events.migration_pass(pass);
        Ok(dirtied)
    }

    /// One fair round: RAM and every iterative device with data get one bounded chunk each;
    /// the first participant rotates from round to round.
    fn iterate_round(&mut self) -> Result<u64, SourceError> {
        let iterative: Vec<usize> = (0..self.m.devices.len())
            .filter(|&i| self.m.devices[i].is_iterative())
            .collect();
        let n = iterative.len() + 1;
        let first = self.round % n;
        self.round = self.round.wrapping_add(1);
        let page = self.ram()?.page_size() as u64;
        let start = self.sent_bytes()?;
        for k in 0..n {
            let who = (first + k) % n;
            let left = (n - k) as u64;
            let share = (self.limiter.remaining_budget() / left).max(page);
            let before = self.sent_bytes()?;
            if who == 0 && self.multifd.is_some() {
                self.multifd_send(share)?;
            } else if who == 0 {
                let cap = share.min(BATCH_PAGES as u64 * page);
                let (ram, w) = (self.ram.as_mut(), self.writer.as_mut());
                if let (Some(ram), Some(w)) = (ram, w) {
                    ram.send(self.m.ram.as_mut(), w, cap)?;
                }
            } else {
                let dev = &mut self.m.devices[iterative[who - 1]];
                let budget = usize::try_from(share)
                    .unwrap_or(usize::MAX)
                    .min(DEVICE_CHUNK);
                self.chunk.clear();
                dev.save_iterate(budget, &mut self.chunk)
                    .map_err(|source| SourceError::Device {
                        id: dev.id().to_owned(),
                        instance: dev.instance(),
                        op: "save_iterate",
                        source,
                    })?;
                if !self.chunk.is_empty() {
                    let (id, inst, ver) = (dev.id().to_owned(), dev.instance(), dev.version());
                    let chunk = std::mem::take(&mut self.chunk);
                    let r = self.writer()?.write_device_chunk(&id, inst, ver, &chunk);
                    self.chunk = chunk;
                    r?;
                }
            }
            let after = self.sent_bytes()?;
            self.limiter.record(after - before);
        }
        self.writer()?.flush()?;
        Ok(self.sent_bytes()? - start)
    }

    /// Every byte written on every connection of this migration (`ram.transferred`): the
    /// main stream (and those of earlier post-copy recovery channels), the preempt channel
    /// and the multifd channels. The one measure `bytes_at_stop` and `bytes_at_run` take, so
    /// `downtime-bytes` and `postcopy-bytes` are differences of like with like (decision 247).
    pub(super) fn transferred_bytes(&self) -> u64 {
        self.bytes_of_earlier_channels
            + self.writer.as_ref().map_or(0, |w| w.bytes_written())
            + self.preempt.bytes()
            + self.multifd_bytes()
    }

    /// Publishes the counters (and closes a bandwidth window every 100 ms).
    pub(super) fn update_counters(&mut self, now: Instant, bw: f64) {
        let (Some(ram), Some(_)) = (self.ram.as_ref(), self.writer.as_ref()) else {
            return;
        };
        let multifd_bytes = self.multifd_bytes();
        let missed_zero_copy = self.multifd_missed_zero_copy();
        let written = self.transferred_bytes();
        let pages = ram.zero_pages + ram.normal_pages;
        let sample = self
            .estimator
            .as_mut()
            .and_then(|e| e.update(now, written, pages));
        let remaining = ram.remaining_bytes();
        let (zero, normal, ps) = (ram.zero_pages, ram.normal_pages, ram.page_size() as u64);
        let (syncs, rate) = (ram.dirty_sync_count, ram.dirty_pages_rate);
        let stopped = self.bytes_at_stop;
        let run = self.bytes_at_run;
        self.stats.update(|r, expected| {
            r.transferred = written;
            r.multifd_bytes = multifd_bytes;
            r.dirty_sync_missed_zero_copy = missed_zero_copy;
            r.remaining = remaining;
            r.duplicate = zero;
            r.normal = normal;
            r.normal_bytes = normal * ps;
            r.dirty_sync_count = syncs;
            r.dirty_pages_rate = rate;
            match (stopped, run) {
                (None, _) => r.precopy_bytes = written,
                (Some(at), None) => r.downtime_bytes = written.saturating_sub(at),
                (Some(at), Some(run)) => {
                    r.downtime_bytes = run.saturating_sub(at);
                    r.postcopy_bytes = written.saturating_sub(run);
                }
            }
            if let Some(s) = sample {
                r.mbps = s.mbps();
                r.pages_per_second = s.pages_per_second();
            }
            if let Some(d) = expected_downtime_ms(remaining, bw) {
                *expected = d;
            }
        });
    }

    /// Pauses the vCPUs if they run (remembering that we did) and starts the downtime clock.
    pub(super) fn stop_vm(&mut self, now: Instant) -> Result<(), SourceError> {
        self.mark = now;
        if self.m.vcpus.is_running() {
            self.m
                .vcpus
                .pause()
                .map_err(|source| SourceError::Machine {
                    op: "pausing the vCPUs",
                    source,
                })?;
            self.paused_by_us = true;
            self.events.vm_stopped();
        }
        self.stats.downtime_start(now);
        self.timeline.pause = self.lap();
        if self.writer.is_some() {
            self.bytes_at_stop = Some(self.transferred_bytes());
        }
        Ok(())
    }

    /// Stop-and-copy: everything that is left, then wait for the destination to run.
    fn switchover(&mut self) -> Result<(), SourceError> {
        if self.bytes_at_stop.is_none() {
            self.stop_vm(Instant::now())?;
        }
        if self.opts.pause_before_switchover {
            self.set_status(MigrationStatus::PreSwitchover);
            self.wait_alive(None, |f| f.cont)?;
            self.check_abort()?;
            self.timeline.pre_switchover = self.lap();
        }
        self.set_status(MigrationStatus::Device);
        // The vCPUs are stopped: memory is final. Hash it while the last pages and the device
        // state go out (docs/stream-format.md §7a).
        let digest = self
            .opts
            .ram_digest
            .then(|| RamDigestJob::start(self.m.ram.as_ref()));
        let before_ram = self.writer()?.bytes_written() + self.multifd_bytes();
        self.write_sync_point(Command::SwitchoverStart)?;
        // QEMU's global state: a guest that was paused before the migration stays paused. A
        // guest an earlier, undecided migration stopped counts as running.
        let running = self.paused_by_us || self.opts.stopped_by_earlier_migration;
        self.writer()?
            .write_command(Command::RunState { running })?;
        if self.dirty_log_on {
            self.sync_pass(Instant::now())?;
        }
        // The last pages: no rate limit in the stop-and-copy.
        while self.multifd.is_some() && self.multifd_send(u64::MAX)? > 0 {}
        self.multifd_finish()?;
        loop {
            let (ram, w) = (self.ram.as_mut(), self.writer.as_mut());
            let (Some(ram), Some(w)) = (ram, w) else {
                break;
            };
            if ram.send(self.m.ram.as_mut(), w, u64::MAX)?.pages == 0 {
                break;
            }
        }
        self.timeline.final_ram_bytes =
            self.writer()?.bytes_written() + self.multifd_bytes() - before_ram;
        self.timeline.final_ram = self.lap();
        self.check_abort()?;
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
        if let Some(job) = digest {
            let (digest, stats) = job.wait().map_err(|source| SourceError::Machine {
                op: "hashing guest RAM (x-tern-ram-digest)",
                source,
            })?;
            self.writer()?.write_ram_digest(&digest)?;
            self.stats.set_ram_digest(stats);
            self.timeline.digest_wait = self.lap();
        }
        // Dirty logging stays on until the cleanup, after the downtime: turning it off
        // re-registers every memslot, which costs milliseconds per GiB (QEMU and Cloud
        // Hypervisor moved the same step out of the downtime). A stopped VM dirties nothing.
        self.update_counters(Instant::now(), 0.0);
        let w = self.writer.take().ok_or(SourceError::Cancelled)?;
        let _stream = w.finish()?;
        let flushed_at = Instant::now();
        self.timeline.end_flush = self.lap();
        // `finish` wrote the END record (5-byte frame + 12-byte body).
        self.stats.update(|r, _| {
            r.transferred += 17;
            r.downtime_bytes += 17;
        });
        // Published now, so `query-migrate` shows that END is out (the destination may run
        // from here on) while the source still waits in `device`.
        self.stats.set_switchover_timeline(self.timeline);
        if self.rp_thread.is_none() {
            self.stats.downtime_end(flushed_at);
            return Ok(());
        }
        // From here the destination decides (see `confirm.rs`).
        let at = match self.await_destination(flushed_at) {
            Confirmation::Resumed(at) | Confirmation::LoadedPaused(at) => at,
            Confirmation::Failed(d) => return Err(SourceError::Destination(d)),
            Confirmation::Unknown(reason) => return Err(SourceError::Unconfirmed { reason }),
        };
        self.stats.downtime_end(at);
        self.stats.ram_digest_verified();
        self.timeline.destination = at.saturating_duration_since(self.mark);
        self.stats.set_switchover_timeline(self.timeline);
        Ok(())
    }

    /// Time since the previous mark of the switchover timeline; moves the mark.
    pub(super) fn lap(&mut self) -> Duration {
        let now = Instant::now();
        let d = now.saturating_duration_since(self.mark);
        self.mark = now;
        d
    }

    pub(super) fn stop_dirty_log(&mut self) {
        if self.dirty_log_on {
            self.dirty_log_on = false;
            if let Err(e) = self.m.ram.stop_dirty_log() {
                tracing::warn!(error = %error_chain(&e), "stopping the dirty log");
            }
        }
    }
}
