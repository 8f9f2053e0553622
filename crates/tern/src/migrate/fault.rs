//! Fault-injection points for the end-to-end tests (TEST ONLY, as `ternd`'s
//! `TERND_X_TEST_STALL`): with `TERN_X_TEST_HOLD=NAME` in its environment, `tern run` holds
//! its migration at point NAME and says so on stderr (`x-test: holding at NAME`), so that a
//! test can kill, stop or cut a peer at exactly that moment. Only the first migration the
//! process starts holds (a later one, e.g. the retry to a fresh destination, runs through).
//! Points:
//! `postcopy-before-stop` (source, post-copy decided: the destination applied the early
//! discard and answered the drain's `PING`, the guest not stopped yet; held until the
//! migration fails or is cancelled, `docs/postcopy.md` §2a).

use std::sync::atomic::{AtomicBool, Ordering};

/// The environment variable naming the point to hold at.
pub const HOLD_ENV: &str = "TERN_X_TEST_HOLD";

/// Set once a migration was told to hold.
static HOLD_TAKEN: AtomicBool = AtomicBool::new(false);

/// Whether the tests asked this process to hold at point `name`, for the migration being
/// started (true once per process at most).
pub fn hold_at(name: &str) -> bool {
    std::env::var(HOLD_ENV).ok().as_deref() == Some(name)
        && !HOLD_TAKEN.swap(true, Ordering::SeqCst)
}
