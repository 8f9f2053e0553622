//! The guest comes first: the sender thread (`mig-src`, the one that copies pages as fast as the
//! link takes them) runs as `SCHED_BATCH`. The scheduler then treats it as the CPU-bound
//! background work it is: it keeps its CPU share (same weight, same nice value), but its
//! wake-ups never preempt another thread, so a vCPU thread that the sender's wake-up would have
//! pushed off a core keeps running. `TERN_X_MIG_POLICY=none` keeps `SCHED_OTHER` (for
//! measurements; docs/machine.md "Guest stalls during migration").

/// Makes the calling thread `SCHED_BATCH` (its nice value is kept). Failure is logged, not an
/// error: the migration works without it.
pub(crate) fn background_thread() {
    if std::env::var("TERN_X_MIG_POLICY").as_deref() == Ok("none") {
        return;
    }
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain syscall on the calling thread (pid 0) with a valid parameter block.
    let r = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
    if r != 0 {
        tracing::debug!(
            "sched_setscheduler(SCHED_BATCH) for {:?}: {}",
            std::thread::current().name(),
            std::io::Error::last_os_error()
        );
    }
}
