//! vCPU threads: the `KVM_RUN` loop, exit dispatch, parking.

use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::devices::control::ControlAction;
use crate::devices::PioBus;
use crate::error::{Error, Result};
use crate::runctl::{Request, RunControl};
use crate::stall::StallMeter;

/// Why a vCPU stopped for good.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VcpuFailure {
    /// vCPU index.
    pub vcpu: u32,
    /// Exit reason or error, with registers.
    pub reason: String,
}

/// Machine-wide state shared with the vCPU threads.
#[derive(Debug)]
pub struct Shared {
    /// Pause/resume/stop.
    pub ctl: RunControl,
    /// Port devices.
    pub bus: PioBus,
    /// The first vCPU failure.
    pub failure: Mutex<Option<VcpuFailure>>,
    /// The longest time a vCPU that wanted to run was kept out of `KVM_RUN`.
    pub stalls: StallMeter,
    /// Guest reset requests.
    pub resets: ResetRequests,
    /// `auto-converge` time slicing.
    pub throttle: crate::throttle::CpuThrottle,
    /// Kernel thread id of each vCPU thread, once it started.
    pub thread_ids: VcpuThreadIds,
}

/// Kernel thread ids of the vCPU threads (to attribute userfaultfd faults to vCPUs: the
/// post-copy pager's per-vCPU blocktime).
#[derive(Debug, Default)]
pub struct VcpuThreadIds(Mutex<Vec<Option<i32>>>);

impl VcpuThreadIds {
    fn set(&self, index: u32, tid: i32) {
        let mut v = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let i = index as usize;
        if v.len() <= i {
            v.resize(i + 1, None);
        }
        v[i] = Some(tid);
    }

    /// The ids by vCPU index (`None`: that thread has not started yet).
    pub fn get(&self) -> Vec<Option<i32>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Guest reset requests (i8042) and who is told.
#[derive(Default)]
pub struct ResetRequests {
    /// Requests seen.
    pub requested: std::sync::atomic::AtomicU64,
    /// Resets done.
    pub completed: std::sync::atomic::AtomicU64,
    /// A request was passed to the callback and not yet served: further requests are only
    /// counted (a guest writing 0xfe in a loop must not start a reset per write).
    pub pending: std::sync::atomic::AtomicBool,
    /// Called on the vCPU thread for each request.
    #[allow(clippy::type_complexity)]
    pub callback: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
}

impl std::fmt::Debug for ResetRequests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResetRequests")
            .field("requested", &self.requested)
            .field("completed", &self.completed)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// The first failure, if any.
    pub fn failure(&self) -> Option<VcpuFailure> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Forgets the failure (after a reset); true if there was one.
    pub fn clear_failure(&self) -> bool {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .is_some()
    }

    fn fail(&self, vcpu: u32, reason: String) {
        tracing::error!(vcpu, "vcpu {vcpu} stopped: {reason}");
        let mut f = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            *f = Some(VcpuFailure { vcpu, reason });
        }
        drop(f);
        self.ctl.request_pause_nowait();
    }
}

/// A vCPU fd shared between its thread (while running) and the VMM (while parked).
pub type SharedVcpu = Arc<Mutex<VcpuFd>>;

/// Locks a vCPU fd (tolerating a poisoned lock: the fd itself has no Rust-side invariants).
pub fn lock_vcpu(fd: &SharedVcpu) -> MutexGuard<'_, VcpuFd> {
    fd.lock().unwrap_or_else(|p| p.into_inner())
}

/// Spawns the thread `vcpu-N`.
pub fn spawn(index: u32, fd: SharedVcpu, shared: Arc<Shared>) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("vcpu-{index}"))
        .spawn(move || {
            // SAFETY: gettid(2) has no preconditions and cannot fail.
            shared.thread_ids.set(index, unsafe { libc::gettid() });
            crate::stall::prefer_wakeup(index);
            let run = std::panic::AssertUnwindSafe(|| run_loop(index, &fd, &shared));
            if std::panic::catch_unwind(run).is_err() {
                // Keep the machine observable: record the failure and stay parked until stop.
                shared.fail(index, "the vCPU thread panicked".into());
                while shared.ctl.park(true) != Request::Stop {}
            }
        })
        .map_err(|e| Error::io(format!("spawning vcpu-{index}"), e))
}

/// How long a vCPU thread waits after a `KVM_EXIT_HLT` before it runs the vCPU again.
const HLT_WAIT: std::time::Duration = std::time::Duration::from_millis(1);

enum Outcome {
    Continue,
    Fatal(String),
}

fn run_loop(index: u32, fd: &SharedVcpu, shared: &Shared) {
    let mut dead = false;
    loop {
        let request = shared.ctl.requested();
        if request == Request::Stop {
            return;
        }
        if request == Request::Pause || dead {
            if !dead {
                // The requester set immediate_exit under the control lock; taking it once makes
                // sure the store is visible before the completing KVM_RUN below.
                if shared.ctl.sync_request() != Request::Run {
                    complete_pending_io(index, &mut lock_vcpu(fd));
                }
            }
            if shared.ctl.park(dead) == Request::Stop {
                return;
            }
            continue;
        }
        let mut vcpu = lock_vcpu(fd);
        if !shared.ctl.enter_run(index as usize) {
            continue;
        }
        // When the vCPU last wanted to run (None after a park: a VMM pause is not a stall).
        let mut due: Option<Instant> = None;
        let mut exited = Instant::now();
        let mut woke: Option<Instant> = None;
        let mut throttled = false;
        while shared.ctl.requested() == Request::Run {
            if let Some(d) = due {
                let now = Instant::now();
                shared.stalls.record(index, d, now);
                if now.saturating_duration_since(d) >= crate::stall::LOG_STALL {
                    tracing::debug!(
                        vcpu = index,
                        since_exit_us = now.saturating_duration_since(exited).as_micros() as u64,
                        woke_late_us =
                            woke.map(|w| w.saturating_duration_since(d).as_micros() as u64),
                        since_woke_us =
                            woke.map(|w| now.saturating_duration_since(w).as_micros() as u64),
                        "stall detail"
                    );
                }
            }
            let result = vcpu.run();
            exited = Instant::now();
            due = Some(exited);
            woke = None;
            let outcome = match result {
                Ok(exit) => handle_exit(index, exit, shared, &mut due, &mut woke),
                Err(e) if e.errno() == libc::EINTR => {
                    shared
                        .bus
                        .counters
                        .kicks
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    // A kick whose pause was withdrawn before this vCPU saw it (a pause that
                    // timed out — e.g. on a vCPU blocked on a post-copy page — then a resume)
                    // left `immediate_exit` set: clear it again (under the lock, only if the
                    // request is still Run), or every KVM_RUN would return EINTR at once.
                    shared.ctl.enter_run(index as usize);
                    Outcome::Continue
                }
                Err(e) if e.errno() == libc::EAGAIN => Outcome::Continue,
                Err(e) => Outcome::Fatal(format!("KVM_RUN failed: {e}")),
            };
            if let Outcome::Fatal(reason) = outcome {
                let regs = describe_regs(&vcpu);
                shared.fail(index, format!("{reason}; {regs}"));
                dead = true;
                break;
            }
            if shared.ctl.take_throttle_due(index as usize) {
                throttled = true;
                break;
            }
        }
        drop(vcpu);
        if throttled {
            // Outside KVM_RUN, then back through `enter_run` (clears `immediate_exit`). Not a
            // stall: `due` starts afresh.
            shared.throttle.sleep(|d| shared.ctl.throttle_wait(d));
        }
    }
}

/// Runs `KVM_RUN` once with `immediate_exit = 1` so KVM completes a pending PIO/MMIO (an `in`
/// writes RAX, the instruction retires) before the state is read.
fn complete_pending_io(index: u32, vcpu: &mut VcpuFd) {
    match vcpu.run() {
        Err(e) if e.errno() == libc::EINTR => {}
        Err(e) => tracing::warn!(vcpu = index, "completing pending I/O: KVM_RUN: {e}"),
        Ok(exit) => tracing::warn!(
            vcpu = index,
            "completing pending I/O: unexpected exit {exit:?} with immediate_exit set"
        ),
    }
}

/// Dispatches one exit. An idle-wait moves `due` to the end of the wait the guest asked for.
fn handle_exit(
    index: u32,
    exit: VcpuExit<'_>,
    shared: &Shared,
    due: &mut Option<Instant>,
    woke: &mut Option<Instant>,
) -> Outcome {
    match exit {
        VcpuExit::IoIn(port, data) => {
            shared.bus.pio_in(port, data);
            Outcome::Continue
        }
        VcpuExit::IoOut(port, data) => {
            let t = Instant::now();
            let action = shared.bus.pio_out(index, port, data);
            let took = t.elapsed();
            if took >= crate::stall::LOG_STALL {
                tracing::debug!(
                    vcpu = index,
                    port,
                    took_us = took.as_micros() as u64,
                    "slow port write"
                );
            }
            if let ControlAction::Reset = action {
                shared
                    .resets
                    .requested
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let first = !shared
                    .resets
                    .pending
                    .swap(true, std::sync::atomic::Ordering::AcqRel);
                if first {
                    tracing::info!(vcpu = index, "the guest asked for a system reset");
                    let callback = shared
                        .resets
                        .callback
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    if let Some(f) = callback.as_ref() {
                        f();
                    }
                }
            }
            if let ControlAction::IdleWait(d) = action {
                let start = Instant::now();
                shared.ctl.idle_wait(d);
                // Woken early (a pause): due now; otherwise due when the wait should have ended.
                let now = Instant::now();
                *due = Some(now.min(start + d));
                *woke = Some(now);
                if now.saturating_duration_since(start + d) >= crate::stall::LOG_STALL {
                    tracing::debug!(
                        vcpu = index,
                        late_us = now.saturating_duration_since(start + d).as_micros() as u64,
                        "idle-wait ended late"
                    );
                }
            }
            Outcome::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            count_mmio(shared, addr, true);
            data.fill(0xff);
            Outcome::Continue
        }
        VcpuExit::MmioWrite(addr, _) => {
            count_mmio(shared, addr, false);
            Outcome::Continue
        }
        VcpuExit::Intr | VcpuExit::IrqWindowOpen => Outcome::Continue,
        // With the in-kernel irqchip KVM keeps a halted vCPU inside KVM_RUN until an interrupt
        // (a kick still gets it out: pause works, and the halted MP state is saved). This exit
        // only comes without an in-kernel LAPIC: wait briefly (interruptible by a pause) and
        // run again, never spin.
        VcpuExit::Hlt => {
            shared.ctl.idle_wait(HLT_WAIT);
            *due = None;
            Outcome::Continue
        }
        VcpuExit::Shutdown => Outcome::Fatal("SHUTDOWN (triple fault)".into()),
        VcpuExit::FailEntry(reason, cpu) => Outcome::Fatal(format!(
            "FAIL_ENTRY (hardware entry failure reason {reason:#x}, cpu {cpu})"
        )),
        VcpuExit::InternalError => Outcome::Fatal("INTERNAL_ERROR".into()),
        VcpuExit::SystemEvent(kind, data) => {
            Outcome::Fatal(format!("SYSTEM_EVENT type {kind} data {data:x?}"))
        }
        other => Outcome::Fatal(format!("unhandled exit {other:?}")),
    }
}

fn count_mmio(shared: &Shared, addr: u64, read: bool) {
    let n = shared
        .bus
        .counters
        .mmio
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if n < 16 {
        tracing::debug!(
            "ignored MMIO {} at {addr:#x}",
            if read { "read" } else { "write" }
        );
    }
}

/// A one-line register dump for failure reports.
pub fn describe_regs(vcpu: &VcpuFd) -> String {
    let mut s = String::new();
    if let Ok(r) = vcpu.get_regs() {
        s.push_str(&format!(
            "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} r8={:#x}",
            r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.r8
        ));
    }
    if let Ok(sr) = vcpu.get_sregs() {
        s.push_str(&format!(
            " cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}/dpl{}/l{}",
            sr.cr0, sr.cr2, sr.cr3, sr.cr4, sr.efer, sr.cs.selector, sr.cs.dpl, sr.cs.l
        ));
    }
    if let Ok(ev) = vcpu.get_vcpu_events() {
        s.push_str(&format!(
            " exception(injected={} nr={} error={:#x})",
            ev.exception.injected, ev.exception.nr, ev.exception.error_code
        ));
    }
    s
}
