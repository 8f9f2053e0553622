//! The device model: state bytes, the mutator thread, pause/resume, digest, statistics.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tern_migration::machine::DirtyBitmap;

use crate::config::StateDevConfig;
use crate::dest::StateDevLoader;
use crate::error::StateDevError;
use crate::source::StateDevHandler;

/// Mutator pacing period (pacing, not synchronisation).
const TICK: Duration = Duration::from_millis(10);
/// Bytes one mutation rewrites (one page inside one chunk).
pub(crate) const MUTATION_BYTES: u64 = 4096;

/// Counters of one device (both roles; a field stays at its default when it does not apply).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DevStats {
    /// Mutations done so far (the state's generation).
    pub mutations: u64,
    /// Source: bytes of the initial pass sent.
    pub initial_bytes_sent: u64,
    /// Source: whether `INIT_DONE` was sent.
    pub init_done_sent: bool,
    /// Source: dirty chunks re-sent (pre-copy and final).
    pub resent_chunks: u64,
    /// Source: bytes of dirty chunks carried by the final state (VM stopped).
    pub final_dirty_bytes: u64,
    /// Source: digest of the state at the switchover (`save_complete`).
    pub switch_digest: Option<u64>,
    /// Destination: `META` accepted, preparation started.
    pub prep_started: bool,
    /// Destination: the `statedev-prep` thread is alive.
    pub prep_thread_running: bool,
    /// Destination: preparation finished (device memory ready, received data in place).
    pub prep_finished: bool,
    /// Destination: wall time of the preparation, ms (allocation, population, verification,
    /// `setup-ms`, copy of the staged data).
    pub prep_ms: Option<u64>,
    /// Destination: bytes of `DATA` received.
    pub bytes_received: u64,
    /// Destination: bytes that arrived before the preparation finished (staged, then copied).
    pub bytes_staged: u64,
    /// Destination: `INIT_DONE` received (all initial data loaded).
    pub init_done_received: bool,
    /// Destination: the loader approved the switchover.
    pub approved: bool,
    /// Destination: how long `load_complete` (VM stopped) waited for the preparation, ms:
    /// the downtime cost switchover-ack avoids.
    pub prep_wait_in_downtime_ms: Option<u64>,
    /// Destination: whether the preparation had already finished when the final state
    /// arrived (VM stopped): `Some(true)` is what switchover-ack guarantees.
    pub prep_ready_at_switchover: Option<bool>,
    /// Destination: digest of the loaded state, verified against the source's.
    pub loaded_digest: Option<u64>,
}

/// Dirty tracking during an outgoing migration.
#[derive(Debug)]
pub(crate) struct Tracking {
    /// Chunks the initial pass has entered: writes below are tracked, above they are not (the
    /// pass will read them anyway).
    pub(crate) entered: u64,
    /// Dirty chunks.
    pub(crate) dirty: DirtyBitmap,
}

#[derive(Debug)]
pub(crate) struct DevState {
    /// The state; `None` on an incoming device until a migration loaded it.
    pub(crate) mem: Option<Vec<u8>>,
    pub(crate) vm_paused: bool,
    /// Frozen by the migration handler from `save_complete` to `save_cleanup`.
    pub(crate) frozen: bool,
    shutdown: bool,
    rng: SplitMix,
    pub(crate) tracking: Option<Tracking>,
    pub(crate) stats: DevStats,
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) cfg: StateDevConfig,
    st: Mutex<DevState>,
    cv: Condvar,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, DevState> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Updates the state and wakes every waiter (mutator, `wait_stats`).
    pub(crate) fn update<R>(&self, f: impl FnOnce(&mut DevState) -> R) -> R {
        let r = f(&mut self.lock());
        self.cv.notify_all();
        r
    }

    fn mutator(&self) {
        let mut g = self.lock();
        let mut credit = 0.0f64;
        let mut last = Instant::now();
        loop {
            if g.shutdown {
                return;
            }
            if !g.mutating(self.cfg.dirty_rate) {
                g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
                last = Instant::now();
                credit = 0.0;
                continue;
            }
            g = self
                .cv
                .wait_timeout(g, TICK)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
            if g.shutdown || !g.mutating(self.cfg.dirty_rate) {
                continue;
            }
            let now = Instant::now();
            let rate = self.cfg.dirty_rate as f64;
            credit = (credit + rate * now.duration_since(last).as_secs_f64()).min(rate.max(1.0));
            last = now;
            if credit >= 1.0 {
                while credit >= 1.0 {
                    credit -= 1.0;
                    g.mutate_one(&self.cfg);
                }
                // Wakes `wait_stats` callers (the mutator itself only waits with a timeout).
                self.cv.notify_all();
            }
        }
    }
}

impl DevState {
    fn mutating(&self, rate: u64) -> bool {
        !self.vm_paused && !self.frozen && self.mem.is_some() && rate > 0
    }

    /// Rewrites one page of one pseudo-random chunk and marks the chunk dirty (when tracked).
    pub(crate) fn mutate_one(&mut self, cfg: &StateDevConfig) {
        let Some(mem) = self.mem.as_mut() else {
            return;
        };
        let chunk = self.rng.next() % cfg.chunks();
        let start = chunk * cfg.chunk_size;
        let len = cfg.chunk_size.min(cfg.size - start);
        let page = self.rng.next() % (len / MUTATION_BYTES).max(1);
        let off = (start + page * MUTATION_BYTES) as usize;
        let end = (off + MUTATION_BYTES as usize).min(mem.len());
        self.stats.mutations += 1;
        let mut r = SplitMix(self.rng.next() ^ self.stats.mutations);
        for w in mem[off..end].chunks_mut(8) {
            let v = r.next().to_le_bytes();
            w.copy_from_slice(&v[..w.len()]);
        }
        if let Some(t) = &mut self.tracking {
            if chunk < t.entered {
                t.dirty.set(chunk);
            }
        }
    }
}

/// Stops and joins the mutator when the last [`StateDevice`] clone goes.
#[derive(Debug)]
struct Owner {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.shared.update(|s| s.shutdown = true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A state device (see the crate docs). Cheap to clone: clones share the device; the mutator
/// thread stops when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct StateDevice {
    shared: Arc<Shared>,
    _owner: Arc<Owner>,
}

impl StateDevice {
    /// A device with its initial content generated from `cfg.seed` (the source's device, or a
    /// freshly booted VM's). It starts paused: call [`StateDevice::resume`] when the vCPUs run.
    pub fn new(cfg: StateDevConfig) -> Result<Self, StateDevError> {
        cfg.validate()?;
        let mut mem = vec![0u8; cfg.size as usize];
        fill(&mut mem, cfg.seed);
        Self::build(cfg, Some(mem))
    }

    /// A device without state, waiting for an incoming migration (`-incoming`): only its
    /// [`StateDevice::loader`] can give it one.
    pub fn new_incoming(cfg: StateDevConfig) -> Result<Self, StateDevError> {
        cfg.validate()?;
        Self::build(cfg, None)
    }

    fn build(cfg: StateDevConfig, mem: Option<Vec<u8>>) -> Result<Self, StateDevError> {
        let seed = cfg.seed;
        let shared = Arc::new(Shared {
            cfg,
            st: Mutex::new(DevState {
                mem,
                vm_paused: true,
                frozen: false,
                shutdown: false,
                rng: SplitMix(seed ^ 0x6d75_7461_746f_7221),
                tracking: None,
                stats: DevStats::default(),
            }),
            cv: Condvar::new(),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("statedev-mut".into())
            .spawn(move || s.mutator())
            .map_err(|source| StateDevError::Spawn {
                name: "statedev-mut",
                source,
            })?;
        Ok(Self {
            shared: shared.clone(),
            _owner: Arc::new(Owner {
                shared,
                thread: Some(thread),
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &StateDevConfig {
        &self.shared.cfg
    }

    /// Freezes the device with the VM (call it from the vCPU pause path). Once it returns the
    /// state no longer changes.
    pub fn pause(&self) {
        self.shared.update(|s| s.vm_paused = true);
    }

    /// Lets the device run with the VM (call it from the vCPU resume path).
    pub fn resume(&self) {
        self.shared.update(|s| s.vm_paused = false);
    }

    /// Whether the mutator may change the state now.
    pub fn is_running(&self) -> bool {
        self.shared.lock().mutating(self.shared.cfg.dirty_rate)
    }

    /// Whether the device has state (false for an incoming device not yet loaded).
    pub fn has_state(&self) -> bool {
        self.shared.lock().mem.is_some()
    }

    /// [`digest_bytes`] of the whole state now (`None` without state), for tests and QMP.
    /// Hashes `size` bytes under the device lock.
    pub fn digest(&self) -> Option<u64> {
        self.shared.lock().mem.as_deref().map(digest_bytes)
    }

    /// Does `n` mutations now, whatever the run state (test and QMP hook).
    pub fn mutate(&self, n: u64) -> Result<(), StateDevError> {
        self.shared.update(|s| {
            if s.mem.is_none() {
                return Err(StateDevError::NoState);
            }
            for _ in 0..n {
                s.mutate_one(&self.shared.cfg);
            }
            Ok(())
        })
    }

    /// A copy of the counters.
    pub fn stats(&self) -> DevStats {
        self.shared.lock().stats.clone()
    }

    /// Blocks until the counters satisfy `pred` (tests and glue; no polling).
    pub fn wait_stats(&self, pred: impl Fn(&DevStats) -> bool) -> DevStats {
        let mut g = self.shared.lock();
        while !pred(&g.stats) {
            g = self.shared.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        g.stats.clone()
    }

    /// The source-side migration handler of this device (one per outgoing migration).
    pub fn handler(&self) -> StateDevHandler {
        StateDevHandler::new(self.shared.clone())
    }

    /// The destination-side loader of this device (one per incoming migration).
    pub fn loader(&self) -> StateDevLoader {
        StateDevLoader::new(self.shared.clone())
    }
}

/// SplitMix64: a small deterministic generator for the content and the mutations.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix(pub(crate) u64);

impl SplitMix {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// The initial content: pseudo-random bytes from `seed`.
fn fill(mem: &mut [u8], seed: u64) {
    let mut r = SplitMix(seed);
    for w in mem.chunks_mut(8) {
        let v = r.next().to_le_bytes();
        w.copy_from_slice(&v[..w.len()]);
    }
}

fn word(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a[..b.len().min(8)].copy_from_slice(&b[..b.len().min(8)]);
    u64::from_le_bytes(a)
}

/// The device digest: a 64-bit, position-sensitive hash of `bytes` (four multiply-rotate lanes
/// over 32-byte blocks, then an avalanche). Not cryptographic: it detects a wrong or misplaced
/// byte, not an adversary.
pub fn digest_bytes(bytes: &[u8]) -> u64 {
    const P1: u64 = 0x9e37_79b1_85eb_ca87;
    const P2: u64 = 0xc2b2_ae3d_27d4_eb4f;
    let len = bytes.len() as u64;
    let mut acc = [P1 ^ len, P2, !P1, !P2];
    let mut blocks = bytes.chunks_exact(32);
    for b in &mut blocks {
        for (i, a) in acc.iter_mut().enumerate() {
            let w = word(&b[i * 8..i * 8 + 8]);
            *a = (*a ^ w.wrapping_mul(P2)).rotate_left(31).wrapping_mul(P1);
        }
    }
    for (i, w) in blocks.remainder().chunks(8).enumerate() {
        acc[i] = (acc[i] ^ word(w).wrapping_mul(P1) ^ 0xff)
            .rotate_left(27)
            .wrapping_mul(P2);
    }
    let mut h = len;
    for a in acc {
        h = (h ^ a).rotate_left(23).wrapping_mul(P1).wrapping_add(P2);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_sees_every_byte_and_its_place() {
        let mut v: Vec<u8> = (0..4133u32).map(|i| (i * 31 % 251) as u8).collect();
        let d = digest_bytes(&v);
        for i in [0, 7, 31, 32, 4095, 4100, 4132] {
            v[i] ^= 1;
            assert_ne!(digest_bytes(&v), d, "byte {i}");
            v[i] ^= 1;
        }
        assert_eq!(digest_bytes(&v), d);
        v.swap(0, 32);
        assert_ne!(digest_bytes(&v), d, "swapped blocks");
        assert_ne!(digest_bytes(&[]), digest_bytes(&[0]));
        assert_ne!(digest_bytes(&[0; 64]), digest_bytes(&[0; 65]));
    }

    #[test]
    fn content_is_deterministic_nonzero_and_mutations_follow_the_run_state() {
        let cfg = StateDevConfig::parse("size=64K,chunk=16K,dirty-rate=0,seed=5").unwrap();
        let a = StateDevice::new(cfg.clone()).unwrap();
        let b = StateDevice::new(cfg).unwrap();
        assert_eq!(a.digest(), b.digest());
        assert!(a
            .shared
            .lock()
            .mem
            .as_ref()
            .unwrap()
            .iter()
            .any(|x| *x != 0));
        assert!(!a.is_running(), "starts paused");
        a.resume();
        assert!(!a.is_running(), "dirty-rate=0 never mutates");
        a.mutate(3).unwrap();
        assert_ne!(a.digest(), b.digest());
        b.mutate(3).unwrap();
        assert_eq!(a.digest(), b.digest(), "mutations are deterministic");
        assert_eq!(a.stats().mutations, 3);
        let inc = StateDevice::new_incoming(a.config().clone()).unwrap();
        assert_eq!(inc.digest(), None);
        assert!(matches!(inc.mutate(1), Err(StateDevError::NoState)));
    }

    #[test]
    fn the_mutator_runs_only_while_resumed() {
        let cfg = StateDevConfig::parse("size=64K,chunk=16K,dirty-rate=100000").unwrap();
        let d = StateDevice::new(cfg).unwrap();
        d.resume();
        assert!(d.is_running());
        d.wait_stats(|s| s.mutations >= 5);
        d.pause();
        let (m, dg) = (d.stats().mutations, d.digest());
        // After pause() returned the state is frozen: nothing may change any more.
        for _ in 0..3 {
            std::thread::yield_now();
            assert_eq!((d.stats().mutations, d.digest()), (m, dg));
        }
    }
}
