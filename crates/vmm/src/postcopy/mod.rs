//! Post-copy on the destination: the demand pager over userfaultfd (`docs/postcopy.md`).
//!
//! [`Pager::start`] discards the pages the destination must fetch, registers all guest RAM
//! with userfaultfd in MISSING mode (kernel-mode faults included, so KVM's own accesses from
//! inside `KVM_RUN` fault too) and starts the `uffd-fault` thread, which turns faults into
//! deduplicated, batched page requests through a [`PageRequester`]. Arriving pages go in with
//! [`Pager::place`] / [`Pager::place_zero`], which wake the faulting threads. The pager knows
//! nothing of the migration stream: the engine implements [`PageRequester`].
//!
//! Modules: `bitmap` (atomic page bitmap), `blocktime` (waits, QEMU's blocktimes), `tracker` (requested/received decisions, range
//! coalescing), `uffd` (the userfaultfd calls), `fault` (the fault thread), `stats`, `pager`.

mod bitmap;
mod blocktime;
mod error;
mod fault;
mod pager;
mod stats;
mod tracker;
mod uffd;

#[cfg(test)]
mod tests;

pub use bitmap::PageBitmap;
pub use blocktime::Blocktime;
pub use error::PagerError;
pub use fault::MAX_RANGE_PAGES;
pub use pager::{discard_now, error_chain, PageRequester, Pager};
pub use stats::{PagerStats, WAIT_BUCKETS};
pub use tracker::GpaRange;
pub use uffd::Placement;

/// Whether this host can page guest RAM on demand: userfaultfd with kernel-mode faults, and
/// MISSING-mode registration of anonymous memory with copy, zeropage and wake (the
/// destination's check when the source announces post-copy). The error says what is missing.
pub fn probe() -> Result<(), PagerError> {
    uffd::UserFd::probe()
}
