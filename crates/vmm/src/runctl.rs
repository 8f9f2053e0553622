//! Run control: the pause/resume/stop protocol between the VMM and the vCPU threads.
//!
//! One mutex guards the request (`Run`, `Pause`, `Stop`) and the parked count. The requester sets
//! the request and, still under the lock, every vCPU's `kvm_run.immediate_exit = 1`, then sends
//! the kick signal to every vCPU thread. A vCPU inside `KVM_RUN` leaves with `EINTR`; one about to
//! enter returns at once because of `immediate_exit`; one handling an exit sees the request at the
//! top of its loop. A vCPU clears `immediate_exit` only under the same lock after it has seen
//! `Run`, so a kick can never be lost. An idle-waiting vCPU waits on the condvar that the
//! requester notifies.
//!
//! A throttle kick (`throttle.rs`) uses the same path without changing the request: it marks
//! the vCPU's throttle flag, sets `immediate_exit` and signals, under the lock; the vCPU sees the
//! flag after `KVM_RUN` returns, sleeps outside it (a wait on the same condvar, so a pause or a
//! stop ends the sleep) and clears `immediate_exit` again through `enter_run`.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuFd;
use libc::{c_int, c_void, siginfo_t};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::error::{Error, Result};

/// The request the vCPUs follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Request {
    /// Run the guest.
    Run = 0,
    /// Park outside `KVM_RUN`.
    Pause = 1,
    /// Leave the thread.
    Stop = 2,
}

/// The kick signal: the first real-time signal.
pub fn kick_signal() -> c_int {
    SIGRTMIN()
}

extern "C" fn handle_kick(_: c_int, _: *mut siginfo_t, _: *mut c_void) {
    // Nothing to do: delivering the signal is what makes KVM_RUN return EINTR.
}

/// Registers the kick handler once per process.
pub fn register_kick_handler() -> Result<()> {
    static RESULT: OnceLock<i32> = OnceLock::new();
    let r = *RESULT.get_or_init(
        || match register_signal_handler(kick_signal(), handle_kick) {
            Ok(()) => 0,
            Err(e) => e.errno(),
        },
    );
    if r != 0 {
        return Err(Error::io(
            "registering the vCPU kick signal handler",
            std::io::Error::from_raw_os_error(r),
        ));
    }
    Ok(())
}

/// A thread that can be signalled.
#[derive(Clone, Copy, Debug)]
struct Thread(libc::pthread_t);

// SAFETY: the handle comes from a `JoinHandle` that the `Vm` keeps (unjoined) for as long as this
// control block may send signals; `Vm::shutdown` clears the kick list before joining.
unsafe impl Killable for Thread {
    fn pthread_handle(&self) -> libc::pthread_t {
        self.0
    }
}

/// How to kick one vCPU.
#[derive(Debug)]
struct Kick {
    /// Address of `kvm_run.immediate_exit` of the vCPU (the mapping lives as long as the vCPU fd,
    /// which the `Vm` owns for its whole life).
    immediate_exit: *mut u8,
    thread: Option<Thread>,
}

// SAFETY: the pointer targets the vCPU's `kvm_run` mapping, which outlives the control block's
// users, and it is only written under the control mutex.
unsafe impl Send for Kick {}

#[derive(Debug)]
struct Inner {
    request: Request,
    /// vCPUs parked (or dead) outside `KVM_RUN`.
    parked: usize,
    kicks: Vec<Kick>,
}

/// The shared control block.
#[derive(Debug)]
pub struct RunControl {
    inner: Mutex<Inner>,
    request: AtomicU8,
    /// vCPUs wait here for a new request (and idle-wait here).
    vcpu_cv: Condvar,
    /// The VMM waits here for the parked count.
    vmm_cv: Condvar,
    vcpus: usize,
    /// Per vCPU: a throttle kick is pending (see the module documentation).
    throttle_due: Vec<AtomicBool>,
}

impl RunControl {
    /// A control block for `vcpus` vCPUs, initially paused.
    pub fn new(vcpus: usize) -> Self {
        RunControl {
            inner: Mutex::new(Inner {
                request: Request::Pause,
                parked: 0,
                kicks: Vec::with_capacity(vcpus),
            }),
            request: AtomicU8::new(Request::Pause as u8),
            vcpu_cv: Condvar::new(),
            vmm_cv: Condvar::new(),
            vcpus,
            throttle_due: (0..vcpus).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panicking vCPU thread must not take the whole VMM down: the state is a few counters
        // that stay consistent (no multi-step update is interrupted by a panic).
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers the next vCPU (before its thread starts). The `Vm` keeps `vcpu` alive for as
    /// long as this control block is used, which is what makes the stored pointer valid.
    pub fn add_vcpu(&self, vcpu: &mut VcpuFd) {
        let mut g = self.lock();
        let immediate_exit = &mut vcpu.get_kvm_run().immediate_exit;
        // The machine starts paused: a vCPU must not enter the guest before the first resume.
        *immediate_exit = u8::from(g.request != Request::Run);
        g.kicks.push(Kick {
            immediate_exit: immediate_exit as *mut u8,
            thread: None,
        });
    }

    /// Records the thread of vCPU `index` once spawned.
    pub fn set_thread(&self, index: usize, thread: libc::pthread_t) {
        let mut g = self.lock();
        if let Some(k) = g.kicks.get_mut(index) {
            k.thread = Some(Thread(thread));
        }
    }

    /// Fast check for the vCPU loop.
    pub fn requested(&self) -> Request {
        match self.request.load(Ordering::Acquire) {
            0 => Request::Run,
            1 => Request::Pause,
            _ => Request::Stop,
        }
    }

    fn set_request(&self, g: &mut Inner, request: Request) {
        g.request = request;
        self.request.store(request as u8, Ordering::Release);
        if request != Request::Run {
            for k in &g.kicks {
                // SAFETY: see `Kick::immediate_exit`; written under the control mutex.
                unsafe { k.immediate_exit.write_volatile(1) };
                if let Some(t) = k.thread {
                    // ESRCH for a thread that already left is fine.
                    let _ = t.kill(kick_signal());
                }
            }
        }
        self.vcpu_cv.notify_all();
    }

    /// Asks every vCPU to park and waits until all are parked. Returns how long it took.
    pub fn pause(&self, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        let mut g = self.lock();
        if g.request == Request::Stop {
            return Err(Error::State("the machine is shut down".into()));
        }
        // Already paused: the kick went out with the original request; only wait.
        if g.request != Request::Pause {
            self.set_request(&mut g, Request::Pause);
        }
        while g.parked < self.vcpus {
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(Error::PauseTimeout {
                    parked: g.parked,
                    total: self.vcpus,
                    waited_ms: start.elapsed().as_millis() as u64,
                });
            }
            g = self
                .vmm_cv
                .wait_timeout(g, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(start.elapsed())
    }

    /// Lets the vCPUs run.
    pub fn resume(&self) -> Result<()> {
        let mut g = self.lock();
        if g.request == Request::Stop {
            return Err(Error::State("the machine is shut down".into()));
        }
        self.set_request(&mut g, Request::Run);
        Ok(())
    }

    /// Asks every vCPU thread to leave.
    pub fn stop(&self) {
        let mut g = self.lock();
        self.set_request(&mut g, Request::Stop);
    }

    /// Forgets the thread handles (before joining them).
    pub fn clear_threads(&self) {
        let mut g = self.lock();
        for k in &mut g.kicks {
            k.thread = None;
        }
    }

    /// Whether every vCPU is parked.
    pub fn all_parked(&self) -> bool {
        self.lock().parked == self.vcpus
    }

    /// Called by a vCPU thread that is about to park: returns once `immediate_exit` is
    /// guaranteed to be 1 (the requester sets it under the lock).
    pub fn sync_request(&self) -> Request {
        self.lock().request
    }

    /// Parks the calling vCPU until the request is no longer `Pause` (`dead` vCPUs wait for
    /// `Stop`). Returns the new request.
    pub fn park(&self, dead: bool) -> Request {
        let mut g = self.lock();
        g.parked += 1;
        self.vmm_cv.notify_all();
        while g.request == Request::Pause || (dead && g.request == Request::Run) {
            g = self.vcpu_cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        g.parked -= 1;
        g.request
    }

    /// Called by vCPU `index` before a stretch of `KVM_RUN`s: if the request is `Run`, clears its
    /// `immediate_exit` (under the lock, so a concurrent pause cannot be lost) and returns true.
    pub fn enter_run(&self, index: usize) -> bool {
        let g = self.lock();
        if g.request != Request::Run {
            return false;
        }
        if let Some(k) = g.kicks.get(index) {
            // SAFETY: see `Kick::immediate_exit`; written under the control mutex.
            unsafe { k.immediate_exit.write_volatile(0) };
        }
        true
    }

    /// Idle-waits up to `dur`, returning early when the request changes from `Run`.
    pub fn idle_wait(&self, dur: Duration) {
        let g = self.lock();
        let _ = self
            .vcpu_cv
            .wait_timeout_while(g, dur, |g| g.request == Request::Run)
            .unwrap_or_else(|p| p.into_inner());
    }

    /// Throttle: kicks every running vCPU out of `KVM_RUN` and marks it due for a throttle
    /// sleep. Does nothing unless the request is `Run` (a parked vCPU is not throttled).
    pub fn throttle_kick(&self) {
        let g = self.lock();
        if g.request != Request::Run {
            return;
        }
        for (k, due) in g.kicks.iter().zip(&self.throttle_due) {
            due.store(true, Ordering::Release);
            // SAFETY: see `Kick::immediate_exit`; written under the control mutex.
            unsafe { k.immediate_exit.write_volatile(1) };
            if let Some(t) = k.thread {
                // ESRCH for a thread that already left is fine.
                let _ = t.kill(kick_signal());
            }
        }
    }

    /// Called by vCPU `index` after each `KVM_RUN`: whether a throttle kick is pending (and
    /// takes it).
    pub fn take_throttle_due(&self, index: usize) -> bool {
        self.throttle_due
            .get(index)
            .is_some_and(|d| d.load(Ordering::Acquire) && d.swap(false, Ordering::AcqRel))
    }

    /// A throttle sleep of up to `dur`; returns true when a pause, stop or shutdown ended it
    /// early.
    pub fn throttle_wait(&self, dur: Duration) -> bool {
        let g = self.lock();
        let (g, r) = self
            .vcpu_cv
            .wait_timeout_while(g, dur, |g| g.request == Request::Run)
            .unwrap_or_else(|p| p.into_inner());
        !r.timed_out() || g.request != Request::Run
    }

    /// Puts the machine into `Pause` from a vCPU thread (fatal exit) without waiting.
    pub fn request_pause_nowait(&self) {
        let mut g = self.lock();
        if g.request == Request::Run {
            self.set_request(&mut g, Request::Pause);
        }
    }
}
