//! The fault thread (`uffd-fault`): waits for fault events, drains every pending one, decides
//! per page (request, already in flight, already here), then sends the whole drain as one
//! batch of coalesced ranges to the [`PageRequester`](super::PageRequester).

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use userfaultfd::EventBuffer;
use vmm_sys_util::eventfd::EventFd;

use super::error::PagerError;
use super::pager::Shared;
use super::stats::Counters;
use super::tracker::{coalesce, FaultVerdict, PageRef};
use super::uffd::Fault;

/// Largest range in one request: the `REQ_PAGES` limit of the stream format (§13.5).
pub const MAX_RANGE_PAGES: u64 = 1024;

/// Events read per `read(2)`.
const EVENTS_PER_READ: usize = 64;

/// What a wait ended with.
#[derive(Debug, PartialEq, Eq)]
pub enum Wait {
    /// Faults were appended.
    Faults,
    /// The pager is shutting down.
    Stop,
}

/// Where fault events come from: userfaultfd, or a test's script.
pub trait FaultSource: Send {
    /// Blocks until there is at least one fault or a stop; appends every fault pending now.
    fn wait(&mut self, out: &mut Vec<Fault>) -> Result<Wait, PagerError>;
}

/// Faults from the pager's userfaultfd, with an eventfd to stop.
pub struct UffdSource {
    shared: Arc<Shared>,
    stop: EventFd,
    buf: EventBuffer,
}

impl UffdSource {
    pub fn new(shared: Arc<Shared>, stop: EventFd) -> Self {
        UffdSource {
            shared,
            stop,
            buf: EventBuffer::new(EVENTS_PER_READ),
        }
    }
}

impl FaultSource for UffdSource {
    fn wait(&mut self, out: &mut Vec<Fault>) -> Result<Wait, PagerError> {
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.shared.uffd.raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.stop.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a live array of two pollfd structs and the count says two; both
            // fds stay open for the call (owned by `self`).
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(PagerError::Os {
                    context: "poll(userfaultfd, stop)",
                    source: e,
                });
            }
            if fds[1].revents != 0 {
                return Ok(Wait::Stop);
            }
            if fds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
                return Err(PagerError::Os {
                    context: "userfaultfd reported an error condition",
                    source: std::io::Error::other(format!("revents {:#x}", fds[0].revents)),
                });
            }
            // Drain: every event pending now goes into this batch.
            while self.shared.uffd.read_pending(&mut self.buf, out)? > 0 {}
            if !out.is_empty() {
                return Ok(Wait::Faults);
            }
        }
    }
}

/// The fault loop; returns on stop, or with the error that ended it.
pub fn run(shared: &Shared, source: &mut dyn FaultSource) -> Result<(), PagerError> {
    let mut faults = Vec::new();
    let mut want: Vec<PageRef> = Vec::new();
    loop {
        faults.clear();
        if source.wait(&mut faults)? == Wait::Stop {
            return Ok(());
        }
        let now = Instant::now();
        want.clear();
        Counters::add(&shared.counters.faults, faults.len() as u64);
        for f in &faults {
            shared.note_thread(f.tid);
            let p = shared
                .tracker
                .locate_host(f.addr)
                .ok_or(PagerError::UnknownFault { addr: f.addr })?;
            match shared.tracker.on_fault(p) {
                FaultVerdict::Request => {
                    shared.start_wait(p, f.tid, now);
                    want.push(p);
                }
                FaultVerdict::InFlight => shared.start_wait(p, f.tid, now),
                FaultVerdict::Present => shared.resolve_present(p)?,
            }
        }
        if want.is_empty() {
            continue;
        }
        let pages = want.len() as u64;
        let ranges = coalesce(&shared.tracker, &mut want, MAX_RANGE_PAGES);
        Counters::add(&shared.counters.batches, 1);
        Counters::add(&shared.counters.requests, ranges.len() as u64);
        Counters::add(&shared.counters.pages_requested, pages);
        shared
            .requester
            .request(&ranges)
            .map_err(|reason| PagerError::Request {
                ranges: ranges.len(),
                pages,
                reason,
            })?;
    }
}
