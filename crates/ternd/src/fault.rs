//! Fault-injection points for the end-to-end tests: with `TERND_X_TEST_STALL=NAME` in its
//! environment the daemon stops at point NAME for ever (the test then kills it), after saying
//! so on stderr. Points: `prepare` (destination, the incoming VMM started),
//! `finish-before-cont` (destination, the incoming migration completed, not resumed yet),
//! `perform-done` (source, the stream completed, Finish not called yet),
//! `postcopy-before-finish` (source, its VMM switched to post-copy, Finish not called yet),
//! `prepare-done`
//! (source, the destination prepared, Perform not started), `prepare-resume-done` (source of
//! a `--postcopy-resume`, the destination's VMM listens, `migrate resume` not sent yet).
//! With `TERND_X_TEST_HOLD=NAME` the daemon instead holds at point NAME until a condition the
//! caller gives (e.g. an abort was requested) or 60 s: `begin` (source, the cookie built).

/// The environment variable naming the point to stall at.
pub const STALL_ENV: &str = "TERND_X_TEST_STALL";

/// Stalls the calling thread for ever when `name` is the configured point.
pub fn point(name: &str) {
    if std::env::var(STALL_ENV).ok().as_deref() == Some(name) {
        tracing::warn!("x-test: stalling at {name}");
        eprintln!("ternd: x-test: stalling at {name}");
        loop {
            std::thread::park();
        }
    }
}

/// The environment variable naming the point to hold at.
pub const HOLD_ENV: &str = "TERND_X_TEST_HOLD";

/// Holds at point `name` (when configured) until `released` returns true (it is called
/// whenever the domain changes: `wait` is the domain's condition wait).
pub fn hold(name: &str, wait: impl FnOnce()) {
    if std::env::var(HOLD_ENV).ok().as_deref() == Some(name) {
        tracing::warn!("x-test: holding at {name}");
        eprintln!("ternd: x-test: holding at {name}");
        wait();
    }
}
