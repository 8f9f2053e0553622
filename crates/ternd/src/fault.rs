//! Fault-injection points for the end-to-end tests: with `TERND_X_TEST_STALL=NAME` in its
//! environment the daemon stops at point NAME for ever (the test then kills it), after saying
//! so on stderr. Points: `prepare` (destination, the incoming VMM started),
//! `finish-before-cont` (destination, the incoming migration completed, not resumed yet),
//! `perform-done` (source, the stream completed, Finish not called yet), `prepare-done`
//! (source, the destination prepared, Perform not started).

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
