//! Fake vCPUs (run control and an `auto-converge` throttle) and the background "guest" that
//! dirties a [`FakeRam`] while they run, slowed by the throttle as time slicing would.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::{lock, FakeRam, XorShift};
use crate::machine::{MachineError, VcpuControl};

#[derive(Debug, Default)]
struct VcpuState {
    running: bool,
    pauses: u32,
    resumes: u32,
    /// The throttle in force, percent.
    throttle: u8,
    /// Every `set_throttle` call, in order.
    throttle_log: Vec<u8>,
    /// Behave as a machine that cannot throttle.
    no_throttle: bool,
}

/// vCPU run control. While paused, [`FakeVcpus::run_guest`] does not run the guest closure, and
/// `pause` returns only once no guest code runs (like kicking vCPUs out of `KVM_RUN`).
#[derive(Debug, Clone, Default)]
pub struct FakeVcpus {
    inner: Arc<(Mutex<VcpuState>, Condvar)>,
}

impl FakeVcpus {
    /// vCPUs in the given run state.
    pub fn new(running: bool) -> Self {
        let v = Self::default();
        lock(&v.inner.0).running = running;
        v
    }

    /// Runs `f` as guest code if the vCPUs are running (holding the run lock, so a pause waits
    /// for it); returns whether it ran.
    pub fn run_guest(&self, f: impl FnOnce()) -> bool {
        let g = lock(&self.inner.0);
        if g.running {
            f();
            true
        } else {
            false
        }
    }

    /// Blocks until the vCPUs run or `timeout` passes (for the guest thread while paused).
    pub fn wait_running(&self, timeout: Duration) {
        let g = lock(&self.inner.0);
        if !g.running {
            let _ = self.inner.1.wait_timeout(g, timeout);
        }
    }

    /// (pause calls, resume calls).
    pub fn counts(&self) -> (u32, u32) {
        let g = lock(&self.inner.0);
        (g.pauses, g.resumes)
    }

    /// The `auto-converge` throttle in force, percent (0 = none).
    pub fn throttle(&self) -> u8 {
        lock(&self.inner.0).throttle
    }

    /// Every throttle the engine set, in order (0 = removed).
    pub fn throttle_log(&self) -> Vec<u8> {
        lock(&self.inner.0).throttle_log.clone()
    }

    /// From now on, behave as a machine that cannot throttle its vCPUs (the trait's default).
    pub fn refuse_throttle(&self) {
        lock(&self.inner.0).no_throttle = true;
    }

    /// Pauses as the user would (QMP `stop`), not counted as an engine pause.
    pub fn user_set_running(&self, running: bool) {
        lock(&self.inner.0).running = running;
        self.inner.1.notify_all();
    }
}

impl VcpuControl for FakeVcpus {
    fn pause(&mut self) -> Result<(), MachineError> {
        let mut g = lock(&self.inner.0);
        g.running = false;
        g.pauses += 1;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), MachineError> {
        let mut g = lock(&self.inner.0);
        g.running = true;
        g.resumes += 1;
        drop(g);
        self.inner.1.notify_all();
        Ok(())
    }

    fn is_running(&self) -> bool {
        lock(&self.inner.0).running
    }

    fn set_throttle(&mut self, pct: u8) -> Result<(), MachineError> {
        let mut g = lock(&self.inner.0);
        if g.no_throttle && pct > 0 {
            return Err(MachineError::rejected(
                "auto-converge",
                "this machine cannot throttle its vCPUs",
            ));
        }
        g.throttle = pct;
        g.throttle_log.push(pct);
        Ok(())
    }

    fn can_throttle(&self) -> bool {
        !lock(&self.inner.0).no_throttle
    }
}

/// A background "guest" that writes pages of a [`FakeRam`] while the [`FakeVcpus`] run.
#[derive(Debug)]
pub struct Dirtier {
    stop: Arc<AtomicBool>,
    rate: Arc<AtomicU64>,
    writes: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Dirtier {
    /// Starts writing `pages_per_sec` pages per second (in 1 ms batches; `u64::MAX` = as fast
    /// as possible), walking the pages in order from `seed`'s position with a running counter.
    pub fn spawn(ram: FakeRam, vcpus: FakeVcpus, pages_per_sec: u64, seed: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let rate = Arc::new(AtomicU64::new(pages_per_sec));
        let writes = Arc::new(AtomicU64::new(0));
        let (s, r, w) = (stop.clone(), rate.clone(), writes.clone());
        let thread = std::thread::Builder::new()
            .name("fake-guest".into())
            .spawn(move || {
                let total = ram.total_pages().max(1);
                let mut rng = XorShift::new(seed);
                let mut next = rng.next_u64() % total;
                let mut counter = 1u64;
                while !s.load(Ordering::SeqCst) {
                    let per_ms = r.load(Ordering::SeqCst);
                    let batch = if per_ms == u64::MAX {
                        256
                    } else {
                        (per_ms / 1000).max(u64::from(per_ms > 0))
                    };
                    let ran = vcpus.run_guest(|| {
                        for _ in 0..batch {
                            ram.guest_write(next, (counter as usize) * 8, counter);
                            counter += 1;
                            next = (next + 1) % total;
                        }
                    });
                    if ran {
                        w.fetch_add(batch, Ordering::SeqCst);
                        // Time slicing, with the guest's work counted in 1 ms slices: asleep
                        // pct / (1 - pct) ms per batch.
                        let pct = u64::from(vcpus.throttle().min(99));
                        if pct > 0 {
                            std::thread::sleep(Duration::from_micros(1000 * pct / (100 - pct)));
                        }
                        if per_ms != u64::MAX {
                            // Pacing of the workload, not synchronisation.
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    } else {
                        vcpus.wait_running(Duration::from_millis(5));
                    }
                }
            })
            .ok();
        Self {
            stop,
            rate,
            writes,
            thread,
        }
    }

    /// Changes the rate.
    pub fn set_rate(&self, pages_per_sec: u64) {
        self.rate.store(pages_per_sec, Ordering::SeqCst);
    }

    /// Pages written so far.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }

    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Dirtier {
    fn drop(&mut self) {
        self.halt();
    }
}
