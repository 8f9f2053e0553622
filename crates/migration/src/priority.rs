//! The guest comes first: the sender thread (`mig-src`, the one that copies pages as fast as the
//! link takes them) runs as `SCHED_BATCH`. The scheduler then treats it as the CPU-bound
//! background work it is: it keeps its CPU share, but it never preempts another thread when it
//! wakes up, and a waking vCPU thread is preferred over it. Measured: docs/machine.md "Guest
//! stalls during migration".

/// Makes the calling thread `SCHED_BATCH` (its nice value is kept). Failure is logged, not an
/// error: the migration works without it.
pub(crate) fn background_thread() {
    let policy = match std::env::var("TERN_X_MIG_POLICY").as_deref() {
        Ok("none") => return,
        Ok("idle") => libc::SCHED_IDLE,
        _ => libc::SCHED_BATCH,
    };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain syscall on the calling thread (pid 0) with a valid parameter block.
    let r = unsafe { libc::sched_setscheduler(0, policy, &param) };
    if r != 0 {
        tracing::debug!(
            "sched_setscheduler(SCHED_BATCH) for {:?}: {}",
            std::thread::current().name(),
            std::io::Error::last_os_error()
        );
    }
    if let Ok(n) = std::env::var("TERN_X_MIG_NICE").map(|v| v.parse::<i32>().unwrap_or(0)) {
        // SAFETY: setpriority on the calling thread (who = 0 is the calling thread on Linux).
        unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, n) };
    }
}
