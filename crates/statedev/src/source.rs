//! Source side: [`StateDevHandler`], the device's `StateHandler`.
//!
//! Pre-copy sends, in order and within each call's budget: `META`, the initial pass (the whole
//! state in `DATA` pieces that never cross a chunk boundary), `INIT_DONE`, then the chunks the
//! device dirtied meanwhile. `save_complete` freezes the device and sends what is still dirty
//! plus `FINAL` (the digest of the state at the switchover).
//!
//! Dirty tracking: when the initial pass enters chunk `k`, writes to chunks `< k + 1` start
//! being tracked; writes to chunks it has not reached need no tracking (the pass reads them
//! later). A chunk's dirty bit is cleared before its bytes are read, and the mutator sets it
//! under the same lock, so a write during or after a read is always sent again.

use std::sync::Arc;

use tern_migration::machine::{DirtyBitmap, MachineError, StateHandler};

use crate::device::{Shared, Tracking};
use crate::error::StateDevError;
use crate::format::{
    put_data, put_final, put_init_done, put_meta, DATA_HEADER_LEN, DATA_INITIAL, FINAL_LEN, GRAIN,
    INIT_DONE_LEN, META_LEN,
};
use crate::{digest_bytes, DEVICE_ID, STATE_VERSION};

/// Largest final state (`SECTION`) the handler produces: well under the engine's default
/// 64 MiB section limit. More dirty data at the switchover means the device was not paused
/// with the vCPUs (the engine drains pre-copy data with the VM stopped before `save_complete`).
pub const FINAL_MAX: u64 = 32 << 20;

/// The source-side migration handler of a [`crate::StateDevice`].
#[derive(Debug)]
pub struct StateDevHandler {
    shared: Arc<Shared>,
    meta_sent: bool,
    init_off: u64,
    init_done_sent: bool,
    /// Re-send in progress: (next offset, end of the chunk).
    resend: Option<(u64, u64)>,
    /// Where the next dirty-chunk search starts (round-robin, no starvation of high chunks).
    next_dirty: u64,
}

impl StateDevHandler {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            meta_sent: false,
            init_off: 0,
            init_done_sent: false,
            resend: None,
            next_dirty: 0,
        }
    }

    fn pending(&self) -> u64 {
        let st = self.shared.lock();
        let cfg = &self.shared.cfg;
        let mut p = cfg.size - self.init_off;
        if !self.meta_sent {
            p += META_LEN as u64;
        }
        if !self.init_done_sent {
            p += INIT_DONE_LEN as u64;
        }
        if let Some((off, end)) = self.resend {
            p += end - off;
        }
        if let Some(t) = &st.tracking {
            p += t.dirty.count() * cfg.chunk_size;
        }
        p
    }

    /// Appends records to `out` while they fit in `budget` bytes.
    fn emit(&mut self, budget: usize, out: &mut Vec<u8>) -> Result<(), StateDevError> {
        let cfg = self.shared.cfg.clone();
        let (size, cs) = (cfg.size, cfg.chunk_size);
        let mut g = self.shared.lock();
        let st = &mut *g;
        let mem = st.mem.as_deref().ok_or(StateDevError::NoState)?;
        let tracking = st
            .tracking
            .as_mut()
            .ok_or_else(|| StateDevError::Stream("save_iterate before save_setup".into()))?;
        let start = out.len();
        let room = |out: &Vec<u8>| budget.saturating_sub(out.len() - start);
        // Bytes of a piece that fit in `r` bytes of room, whole grains only.
        let fit = |r: usize| ((r.saturating_sub(DATA_HEADER_LEN)) as u64 / GRAIN) * GRAIN;
        if !self.meta_sent {
            if room(out) < META_LEN {
                return Ok(());
            }
            put_meta(out, size, cs as u32, cfg.seed);
            self.meta_sent = true;
        }
        while self.init_off < size {
            let n = fit(room(out));
            if n == 0 {
                return Ok(());
            }
            let chunk = self.init_off / cs;
            if self.init_off.is_multiple_of(cs) {
                tracking.entered = chunk + 1;
            }
            let chunk_end = ((chunk + 1) * cs).min(size);
            let n = n.min(chunk_end - self.init_off);
            let off = self.init_off as usize;
            put_data(
                out,
                DATA_INITIAL,
                self.init_off,
                &mem[off..off + n as usize],
            );
            self.init_off += n;
            st.stats.initial_bytes_sent += n;
        }
        if !self.init_done_sent {
            if room(out) < INIT_DONE_LEN {
                return Ok(());
            }
            put_init_done(out, size);
            self.init_done_sent = true;
            st.stats.init_done_sent = true;
        }
        loop {
            let n = fit(room(out));
            if n == 0 {
                break;
            }
            let (off, end) = match self.resend {
                Some(r) => r,
                None => {
                    let next = tracking
                        .dirty
                        .take_next(self.next_dirty)
                        .or_else(|| tracking.dirty.take_next(0));
                    let Some(k) = next else {
                        break;
                    };
                    self.next_dirty = k + 1;
                    st.stats.resent_chunks += 1;
                    (k * cs, ((k + 1) * cs).min(size))
                }
            };
            let n = n.min(end - off);
            put_data(out, 0, off, &mem[off as usize..(off + n) as usize]);
            self.resend = (off + n < end).then_some((off + n, end));
        }
        drop(g);
        self.shared.update(|_| ());
        Ok(())
    }
}

impl StateHandler for StateDevHandler {
    fn id(&self) -> &str {
        DEVICE_ID
    }

    fn instance(&self) -> u32 {
        self.shared.cfg.instance
    }

    fn version(&self) -> u32 {
        STATE_VERSION
    }

    fn is_iterative(&self) -> bool {
        true
    }

    fn switchover_ack_needed(&self) -> bool {
        true
    }

    fn save_setup(&mut self) -> Result<(), MachineError> {
        let chunks = self.shared.cfg.chunks();
        self.shared.update(|st| {
            if st.mem.is_none() {
                return Err(StateDevError::NoState);
            }
            st.tracking = Some(Tracking {
                entered: 0,
                dirty: DirtyBitmap::new(chunks),
            });
            st.frozen = false;
            let mutations = st.stats.mutations;
            st.stats = crate::DevStats {
                mutations,
                ..Default::default()
            };
            Ok(())
        })?;
        *self = Self::new(self.shared.clone());
        tracing::debug!(size = self.shared.cfg.size, "statedev: save setup");
        Ok(())
    }

    fn pending_estimate(&mut self) -> u64 {
        self.pending()
    }

    fn pending_exact(&mut self) -> Result<u64, MachineError> {
        Ok(self.pending())
    }

    fn save_iterate(&mut self, budget: usize, out: &mut Vec<u8>) -> Result<(), MachineError> {
        Ok(self.emit(budget, out)?)
    }

    fn save_complete(&mut self) -> Result<Vec<u8>, MachineError> {
        // Freeze first: from here on the state is the state at the switchover, whether or not
        // the glue paused the device with the vCPUs.
        self.shared.update(|st| st.frozen = true);
        let pending = self.pending();
        if pending > FINAL_MAX {
            return Err(StateDevError::Stream(format!(
                "{pending} bytes of device state still to send with the VM stopped (more than \
                 {FINAL_MAX}): pause the device with the vCPUs"
            ))
            .into());
        }
        let mut out = Vec::with_capacity(pending as usize + 4096 + FINAL_LEN);
        self.emit(usize::MAX, &mut out)?;
        let final_dirty = out.len() as u64;
        let (digest, generation) = {
            let st = self.shared.lock();
            let mem = st.mem.as_deref().ok_or(StateDevError::NoState)?;
            (digest_bytes(mem), st.stats.mutations)
        };
        put_final(&mut out, digest, generation);
        self.shared.update(|st| {
            st.stats.final_dirty_bytes = final_dirty;
            st.stats.switch_digest = Some(digest);
        });
        tracing::debug!(digest, generation, final_dirty, "statedev: final state");
        Ok(out)
    }

    fn save_cleanup(&mut self) {
        self.shared.update(|st| {
            st.tracking = None;
            st.frozen = false;
        });
    }
}
