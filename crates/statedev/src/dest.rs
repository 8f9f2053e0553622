//! Destination side: [`StateDevLoader`], the device's `StateLoader`, and the preparation
//! thread (`statedev-prep`).
//!
//! On `META` the loader checks the stream against this device and starts the preparation:
//! allocate `size` bytes, populate every page, verify them, then `setup-ms` of hardware setup
//! (or forever with `hang=on`). Data that arrives meanwhile is staged (a lazily allocated
//! buffer of `size` bytes plus a bitmap of the grains written); when its work is done the
//! preparation copies the staged grains into the device memory, in rounds, until nothing new
//! was staged, and only then marks the memory ready (later data goes straight in). The
//! switchover is approved by whichever comes last: `INIT_DONE` (mig-dst thread) or the end of
//! the preparation (prep thread).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tern_migration::machine::{DirtyBitmap, MachineError, StateLoader, SwitchoverApproval};

use crate::device::Shared;
use crate::error::StateDevError;
use crate::format::{Record, RecordReader, DATA_INITIAL, FORMAT_VERSION, GRAIN};
use crate::{digest_bytes, DEVICE_ID, STATE_VERSION};

/// Value written to every byte of the device memory by the population step.
const POPULATE: u8 = 0xa5;
/// Granularity of the preparation work between two cancellation checks.
const STEP: usize = 1 << 20;
/// How long `load_cleanup` waits for the preparation thread to notice the cancellation.
const CLEANUP_WAIT: Duration = Duration::from_secs(5);

/// Data that arrived before the device memory was ready.
#[derive(Debug)]
struct Staging {
    buf: Vec<u8>,
    valid: DirtyBitmap,
}

impl Staging {
    fn new(size: u64) -> Self {
        Self {
            // Zeroed allocation: pages are only touched when data lands in them.
            buf: vec![0; size as usize],
            valid: DirtyBitmap::new(size / GRAIN),
        }
    }

    /// `offset` and `bytes.len()` are checked grain multiples inside the state.
    fn write(&mut self, offset: u64, bytes: &[u8]) {
        let o = offset as usize;
        self.buf[o..o + bytes.len()].copy_from_slice(bytes);
        for g in offset / GRAIN..(offset + bytes.len() as u64) / GRAIN {
            self.valid.set(g);
        }
    }

    /// Copies the written grains into `mem`, coalescing runs; returns the bytes copied.
    fn copy_into(&mut self, mem: &mut [u8]) -> u64 {
        let mut copied = 0;
        let mut from = 0;
        while let Some(first) = self.valid.take_next(from) {
            let mut last = first;
            while self.valid.get(last + 1) {
                last += 1;
            }
            let (a, b) = ((first * GRAIN) as usize, ((last + 1) * GRAIN) as usize);
            mem[a..b].copy_from_slice(&self.buf[a..b]);
            copied += (b - a) as u64;
            from = last + 1;
        }
        copied
    }
}

#[derive(Debug, Default)]
struct PrepState {
    cancel: bool,
    staging: Option<Staging>,
    /// The device memory, once ready.
    mem: Option<Vec<u8>>,
    ready: bool,
    init_done: bool,
    ack_wanted: bool,
    approved: bool,
    approval: Option<SwitchoverApproval>,
    error: Option<String>,
    exited: bool,
}

impl PrepState {
    /// Marks the approval as taken when both conditions hold; returns the handle to call.
    fn take_approval(&mut self) -> Option<SwitchoverApproval> {
        if self.ready && self.init_done && self.ack_wanted && !self.approved {
            self.approved = true;
            self.approval.clone()
        } else {
            None
        }
    }
}

#[derive(Debug, Default)]
struct Prep {
    m: Mutex<PrepState>,
    cv: Condvar,
}

impl Prep {
    fn lock(&self) -> MutexGuard<'_, PrepState> {
        self.m.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cancelled(&self) -> bool {
        self.lock().cancel
    }
}

/// Approves the switchover and records it (or the failure).
fn approve(a: &SwitchoverApproval, prep: &Prep, dev: &Shared) {
    // Recorded before the call: the ACK leaves inside it, so whoever sees the source switch
    // over must already see `approved`.
    dev.update(|s| s.stats.approved = true);
    match a.approve() {
        Ok(()) => tracing::debug!("statedev: switchover approved"),
        Err(e) => {
            dev.update(|s| s.stats.approved = false);
            tracing::warn!(error = %e, "statedev: approving the switchover");
            prep.lock()
                .error
                .get_or_insert(format!("approving the switchover: {e}"));
        }
    }
}

/// The preparation: real work proportional to the size, then the setup latency, then the
/// staged data into place. Returns early when cancelled.
fn prepare(prep: &Prep, dev: &Shared) -> Result<(), String> {
    let t0 = Instant::now();
    let size = dev.cfg.size as usize;
    let mut mem: Vec<u8> = Vec::new();
    mem.try_reserve_exact(size)
        .map_err(|e| format!("cannot allocate {size} bytes of device memory: {e}"))?;
    while mem.len() < size {
        if prep.cancelled() {
            return Ok(());
        }
        let n = STEP.min(size - mem.len());
        mem.resize(mem.len() + n, POPULATE);
    }
    for (i, step) in mem.chunks(STEP).enumerate() {
        if prep.cancelled() {
            return Ok(());
        }
        if let Some(p) = step.iter().position(|b| *b != POPULATE) {
            return Err(format!(
                "device memory verification failed at byte {}",
                i * STEP + p
            ));
        }
    }
    let deadline = t0 + Duration::from_millis(dev.cfg.setup_ms);
    {
        let mut g = prep.lock();
        loop {
            if g.cancel {
                return Ok(());
            }
            let now = Instant::now();
            if dev.cfg.hang {
                g = prep.cv.wait(g).unwrap_or_else(|p| p.into_inner());
            } else if now < deadline {
                g = prep
                    .cv
                    .wait_timeout(g, deadline - now)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            } else {
                break;
            }
        }
    }
    let mut copied = 0;
    loop {
        let mut g = prep.lock();
        if g.cancel {
            return Ok(());
        }
        match g.staging.take() {
            Some(mut staged) => {
                drop(g);
                copied += staged.copy_into(&mut mem);
            }
            None => {
                g.mem = Some(std::mem::take(&mut mem));
                g.ready = true;
                let approval = g.take_approval();
                drop(g);
                prep.cv.notify_all();
                let ms = t0.elapsed().as_millis() as u64;
                tracing::debug!(ms, copied, "statedev: preparation finished");
                dev.update(|s| {
                    s.stats.prep_finished = true;
                    s.stats.prep_ms = Some(ms);
                });
                if let Some(a) = approval {
                    approve(&a, prep, dev);
                }
                return Ok(());
            }
        }
    }
}

/// The destination-side migration loader of a [`crate::StateDevice`].
#[derive(Debug)]
pub struct StateDevLoader {
    dev: Arc<Shared>,
    prep: Arc<Prep>,
    thread: Option<JoinHandle<()>>,
    ack_asked: AtomicBool,
    meta: bool,
    init_cursor: u64,
    init_done: bool,
    completed: bool,
}

impl StateDevLoader {
    pub(crate) fn new(dev: Arc<Shared>) -> Self {
        Self {
            dev,
            prep: Arc::new(Prep::default()),
            thread: None,
            ack_asked: AtomicBool::new(false),
            meta: false,
            init_cursor: 0,
            init_done: false,
            completed: false,
        }
    }

    fn check_version(version: u32) -> Result<(), StateDevError> {
        if version == STATE_VERSION {
            Ok(())
        } else {
            Err(StateDevError::Mismatch {
                field: "state version",
                stream: version.to_string(),
                local: STATE_VERSION.to_string(),
            })
        }
    }

    fn check_prep_error(&self) -> Result<(), StateDevError> {
        match &self.prep.lock().error {
            Some(e) => Err(StateDevError::Preparation(e.clone())),
            None => Ok(()),
        }
    }

    fn on_meta(&mut self, format: u32, size: u64, chunk_size: u32) -> Result<(), StateDevError> {
        let cfg = &self.dev.cfg;
        if self.meta {
            return Err(StateDevError::Stream("second META record".into()));
        }
        if format != FORMAT_VERSION {
            return Err(StateDevError::Mismatch {
                field: "record format",
                stream: format.to_string(),
                local: FORMAT_VERSION.to_string(),
            });
        }
        if size != cfg.size {
            return Err(StateDevError::Mismatch {
                field: "device size",
                stream: format!("{size} bytes"),
                local: format!("{} bytes (size={}M)", cfg.size, cfg.size >> 20),
            });
        }
        let cs = u64::from(chunk_size);
        if cs == 0 || !cs.is_multiple_of(4096) || cs > size {
            return Err(StateDevError::Stream(format!(
                "META chunk size {chunk_size} is not a multiple of 4 KiB within the device"
            )));
        }
        self.meta = true;
        self.dev.update(|s| {
            s.stats.prep_started = true;
            s.stats.prep_thread_running = true;
        });
        let (prep, dev) = (self.prep.clone(), self.dev.clone());
        let t = std::thread::Builder::new()
            .name("statedev-prep".into())
            .spawn(move || {
                if let Err(e) = prepare(&prep, &dev) {
                    tracing::warn!(error = %e, "statedev: preparation failed");
                    prep.lock().error.get_or_insert(e);
                }
                prep.lock().exited = true;
                prep.cv.notify_all();
                dev.update(|s| s.stats.prep_thread_running = false);
            })
            .map_err(|source| {
                self.dev.update(|s| s.stats.prep_thread_running = false);
                StateDevError::Spawn {
                    name: "statedev-prep",
                    source,
                }
            })?;
        self.thread = Some(t);
        tracing::debug!(size, "statedev: metadata received, preparation started");
        Ok(())
    }

    fn on_data(&mut self, flags: u8, offset: u64, bytes: &[u8]) -> Result<(), StateDevError> {
        let size = self.dev.cfg.size;
        if !self.meta {
            return Err(StateDevError::Stream("DATA before META".into()));
        }
        if flags & !DATA_INITIAL != 0 {
            return Err(StateDevError::Stream(format!(
                "unknown DATA flags {flags:#x}"
            )));
        }
        let len = bytes.len() as u64;
        let end = offset.checked_add(len).filter(|e| *e <= size);
        if len == 0 || !offset.is_multiple_of(GRAIN) || !len.is_multiple_of(GRAIN) || end.is_none()
        {
            return Err(StateDevError::Stream(format!(
                "DATA at offset {offset} length {len} is empty, not {GRAIN}-byte aligned, or \
                 outside the {size}-byte device"
            )));
        }
        if flags & DATA_INITIAL != 0 {
            if self.init_done {
                return Err(StateDevError::Stream(
                    "initial-pass DATA after INIT_DONE".into(),
                ));
            }
            if offset != self.init_cursor {
                return Err(StateDevError::Stream(format!(
                    "initial pass out of order: piece at {offset}, expected {}",
                    self.init_cursor
                )));
            }
            self.init_cursor += len;
        }
        let mut g = self.prep.lock();
        let staged = if g.ready {
            let mem = g
                .mem
                .as_mut()
                .ok_or_else(|| StateDevError::Preparation("device memory gone".into()))?;
            mem[offset as usize..(offset + len) as usize].copy_from_slice(bytes);
            0
        } else {
            g.staging
                .get_or_insert_with(|| Staging::new(size))
                .write(offset, bytes);
            len
        };
        drop(g);
        self.dev.update(|s| {
            s.stats.bytes_received += len;
            s.stats.bytes_staged += staged;
        });
        Ok(())
    }

    fn on_init_done(&mut self, initial_bytes: u64) -> Result<(), StateDevError> {
        let size = self.dev.cfg.size;
        if !self.meta || self.init_done {
            return Err(StateDevError::Stream(
                "INIT_DONE before META or twice".into(),
            ));
        }
        if initial_bytes != size || self.init_cursor != size {
            return Err(StateDevError::Stream(format!(
                "INIT_DONE claims {initial_bytes} bytes; the initial pass delivered {} of {size}",
                self.init_cursor
            )));
        }
        self.init_done = true;
        let approval = {
            let mut g = self.prep.lock();
            g.init_done = true;
            g.take_approval()
        };
        self.dev.update(|s| s.stats.init_done_received = true);
        tracing::debug!("statedev: initial data loaded");
        if let Some(a) = approval {
            approve(&a, &self.prep, &self.dev);
        }
        Ok(())
    }

    /// Applies every record of a payload; returns the `FINAL` record's values when `last`
    /// allows one (it must then be the last record).
    fn apply(&mut self, data: &[u8], fin: bool) -> Result<Option<(u64, u64)>, StateDevError> {
        let mut r = RecordReader::new(data);
        let mut final_rec = None;
        while let Some(rec) = r.next_record()? {
            if final_rec.is_some() {
                return Err(StateDevError::Stream("records after FINAL".into()));
            }
            match rec {
                Record::Meta {
                    format,
                    size,
                    chunk_size,
                    ..
                } => self.on_meta(format, size, chunk_size)?,
                Record::Data {
                    flags,
                    offset,
                    bytes,
                } => self.on_data(flags, offset, bytes)?,
                Record::InitDone { initial_bytes } => self.on_init_done(initial_bytes)?,
                Record::Final { digest, generation } if fin => {
                    final_rec = Some((digest, generation));
                }
                Record::Final { .. } => {
                    return Err(StateDevError::Stream("FINAL in pre-copy data".into()))
                }
            }
        }
        Ok(final_rec)
    }

    fn complete(&mut self, version: u32, data: &[u8]) -> Result<(), StateDevError> {
        Self::check_version(version)?;
        if self.completed {
            return Err(StateDevError::Stream("second final state".into()));
        }
        let (digest, generation) = self
            .apply(data, true)?
            .ok_or_else(|| StateDevError::Stream("final state without FINAL".into()))?;
        if !self.init_done {
            return Err(StateDevError::Stream(format!(
                "final state before the initial data was complete ({} of {} bytes)",
                self.init_cursor, self.dev.cfg.size
            )));
        }
        // Without switchover-ack the source did not wait: finish the preparation now, inside
        // the downtime.
        let t = Instant::now();
        let mut g = self.prep.lock();
        let ready_at_switchover = g.ready;
        while !g.ready {
            if let Some(e) = &g.error {
                return Err(StateDevError::Preparation(e.clone()));
            }
            if self.dev.cfg.hang {
                return Err(StateDevError::Preparation(
                    "never finishes (hang=on); the source switched over without waiting for \
                     the switchover ACK"
                        .into(),
                ));
            }
            if g.exited {
                return Err(StateDevError::Preparation(
                    "the preparation thread ended without finishing".into(),
                ));
            }
            g = self.prep.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        let waited = t.elapsed().as_millis() as u64;
        let mem = g
            .mem
            .take()
            .ok_or_else(|| StateDevError::Preparation("device memory gone".into()))?;
        drop(g);
        let loaded = digest_bytes(&mem);
        if loaded != digest {
            self.prep.lock().mem = Some(mem);
            return Err(StateDevError::DigestMismatch {
                source_digest: digest,
                loaded,
            });
        }
        self.dev.update(|s| {
            s.mem = Some(mem);
            s.stats.mutations = generation;
            s.stats.prep_wait_in_downtime_ms = Some(waited);
            s.stats.prep_ready_at_switchover = Some(ready_at_switchover);
            s.stats.loaded_digest = Some(loaded);
        });
        self.completed = true;
        tracing::debug!(waited_ms = waited, digest, "statedev: state loaded");
        Ok(())
    }
}

impl StateLoader for StateDevLoader {
    fn id(&self) -> &str {
        DEVICE_ID
    }

    fn instance(&self) -> u32 {
        self.dev.cfg.instance
    }

    fn min_version(&self) -> u32 {
        STATE_VERSION
    }

    fn max_version(&self) -> u32 {
        STATE_VERSION
    }

    /// The engine asks only when the `switchover-ack` capability is on, so being asked is
    /// what tells the loader to approve (approving with the capability off is an error).
    fn switchover_ack_needed(&self) -> bool {
        self.ack_asked.store(true, Ordering::SeqCst);
        true
    }

    fn load_setup(&mut self, approval: SwitchoverApproval) -> Result<(), MachineError> {
        if self.thread.is_some() || self.meta {
            return Err(StateDevError::Stream("load_setup twice".into()).into());
        }
        let mut g = self.prep.lock();
        g.approval = Some(approval);
        g.ack_wanted = self.ack_asked.load(Ordering::SeqCst);
        drop(g);
        self.dev.update(|s| {
            let mutations = s.stats.mutations;
            s.stats = crate::DevStats {
                mutations,
                ..Default::default()
            };
        });
        Ok(())
    }

    fn load_iterate(&mut self, version: u32, data: &[u8]) -> Result<(), MachineError> {
        Self::check_version(version)?;
        self.check_prep_error()?;
        if self.completed {
            return Err(StateDevError::Stream("pre-copy data after the final state".into()).into());
        }
        self.apply(data, false)?;
        Ok(())
    }

    fn load_complete(&mut self, version: u32, data: &[u8]) -> Result<(), MachineError> {
        Ok(self.complete(version, data)?)
    }

    fn load_cleanup(&mut self) {
        self.prep.lock().cancel = true;
        self.prep.cv.notify_all();
        if let Some(t) = self.thread.take() {
            let deadline = Instant::now() + CLEANUP_WAIT;
            let mut g = self.prep.lock();
            while !g.exited && Instant::now() < deadline {
                g = self
                    .prep
                    .cv
                    .wait_timeout(g, deadline.saturating_duration_since(Instant::now()))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
            let exited = g.exited;
            drop(g);
            if exited {
                let _ = t.join();
            } else {
                tracing::warn!("statedev: preparation thread still busy; left to finish alone");
            }
        }
        if !self.completed {
            tracing::debug!("statedev: discarding a partial load");
        }
        // A fresh state for the next incoming migration; dropping the old one frees the
        // staging buffer and any prepared memory.
        let dev = self.dev.clone();
        *self = Self::new(dev);
    }
}
