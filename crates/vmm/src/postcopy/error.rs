//! Errors of the demand pager; each says which page or region and which operation failed.

use std::io;

/// Errors of [`super::Pager`].
#[derive(Debug, thiserror::Error)]
pub enum PagerError {
    /// userfaultfd could not be opened (no `/dev/userfaultfd` access and no `CAP_SYS_PTRACE`
    /// for kernel-mode faults, or a kernel without the API).
    #[error("opening userfaultfd (kernel-mode faults included)")]
    Open(#[source] userfaultfd::Error),
    /// The kernel lacks an ioctl the pager needs on a registered region.
    #[error("userfaultfd on RAM {gpa:#x}+{size:#x} lacks {missing}")]
    MissingIoctls {
        /// Region start.
        gpa: u64,
        /// Region size.
        size: u64,
        /// The ioctls missing, by name.
        missing: String,
    },
    /// `UFFDIO_REGISTER` / `UFFDIO_UNREGISTER` of a region failed.
    #[error("{op} of guest RAM {gpa:#x}+{size:#x}")]
    Register {
        /// `UFFDIO_REGISTER` or `UFFDIO_UNREGISTER`.
        op: &'static str,
        /// Region start.
        gpa: u64,
        /// Region size.
        size: u64,
        /// The error.
        #[source]
        source: userfaultfd::Error,
    },
    /// The bitmap of pages to fetch does not fit the RAM layout.
    #[error("missing-page bitmap: {0}")]
    Bitmap(String),
    /// `madvise(MADV_DONTNEED)` of pages to fetch failed.
    #[error("discarding guest RAM {gpa:#x}+{len:#x} (MADV_DONTNEED)")]
    Discard {
        /// Range start.
        gpa: u64,
        /// Range length.
        len: u64,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A page to place is not one page of guest RAM.
    #[error("placing {len:#x} bytes at {gpa:#x}: not one page-aligned page of guest RAM")]
    NotAPage {
        /// Address given.
        gpa: u64,
        /// Length given.
        len: u64,
    },
    /// `UFFDIO_COPY`, `UFFDIO_ZEROPAGE` or `UFFDIO_WAKE` on a page failed.
    #[error("{op} of page {gpa:#x}")]
    Place {
        /// The ioctl.
        op: &'static str,
        /// The page.
        gpa: u64,
        /// The error.
        #[source]
        source: userfaultfd::Error,
    },
    /// Reading fault events from userfaultfd failed: the fault thread stops.
    #[error("reading userfaultfd events")]
    Read(#[source] userfaultfd::Error),
    /// A system call around the userfaultfd failed (poll, eventfd, the probe's mmap).
    #[error("{context}")]
    Os {
        /// What failed.
        context: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A fault at a host address that is no guest RAM of this pager (cannot happen with only
    /// guest RAM registered: reported rather than ignored, since the faulter would hang).
    #[error("userfaultfd fault at host address {addr:#x}, outside guest RAM")]
    UnknownFault {
        /// The faulting host address.
        addr: u64,
    },
    /// The page requester refused a batch: the fault thread stops, faulting vCPUs stay
    /// blocked (a guest must never read a page it did not receive).
    #[error("requesting {ranges} page ranges ({pages} pages): {reason}")]
    Request {
        /// Ranges in the refused batch.
        ranges: usize,
        /// Pages in the refused batch.
        pages: u64,
        /// The requester's reason.
        reason: String,
    },
    /// A thread of the pager could not be started or panicked.
    #[error("fault thread: {0}")]
    Thread(String),
}
