//! The userfaultfd itself: open (kernel-mode faults included), register, place, wake, and read
//! fault events. All unsafety of the pager is here or at the two call sites of
//! [`UserFd::copy`] / [`UserFd::zeropage`].

use std::os::fd::AsRawFd;

use userfaultfd::{Event, EventBuffer, FeatureFlags, IoctlFlags, Uffd, UffdBuilder};

use crate::memory::{RamRegionInfo, PAGE_SIZE};

use super::error::PagerError;

/// One fault event: the faulting host address and thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Faulting host virtual address (not page aligned).
    pub addr: u64,
    /// Kernel thread id of the faulting thread (`UFFD_FEATURE_THREAD_ID`).
    pub tid: i32,
}

/// Whether a placement installed the page or found one there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// The page was missing and is now installed (and its waiters woken).
    Placed,
    /// The page was already there (`EEXIST`): nothing was written.
    AlreadyPresent,
}

/// A non-blocking userfaultfd that also receives faults from kernel-mode accesses (KVM's).
#[derive(Debug)]
pub struct UserFd {
    uffd: Uffd,
}

/// How often a placement retries on `EAGAIN` (the kernel's "address space changing") before
/// giving up with the error.
const EAGAIN_RETRIES: u32 = 1000;

fn errno_of(e: &userfaultfd::Error) -> Option<i32> {
    match e {
        userfaultfd::Error::CopyFailed(n) | userfaultfd::Error::ZeropageFailed(n) => {
            Some(*n as i32)
        }
        userfaultfd::Error::SystemError(n) => Some(*n as i32),
        userfaultfd::Error::PartiallyCopied(0) => Some(libc::EAGAIN),
        _ => None,
    }
}

impl UserFd {
    /// Opens userfaultfd without `UFFD_USER_MODE_ONLY` (the crate's default would set it, and
    /// then a guest access made by KVM inside `KVM_RUN` never reaches the fault thread),
    /// non-blocking, close-on-exec, with the faulting thread's id in each event.
    pub fn open() -> Result<Self, PagerError> {
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .require_features(FeatureFlags::THREAD_ID)
            .create()
            .map_err(PagerError::Open)?;
        Ok(UserFd { uffd })
    }

    /// Whether this host can page guest RAM on demand (the destination's check at
    /// `POSTCOPY_ADVISE`, QEMU's `postcopy_ram_supported_by_host`): opens a userfaultfd as
    /// [`UserFd::open`] does and registers one scratch page of anonymous memory, which must
    /// offer copy, zeropage and wake.
    pub fn probe() -> Result<(), PagerError> {
        let uffd = Self::open()?;
        let len = PAGE_SIZE as usize;
        // SAFETY: a fresh private anonymous mapping of one page; no existing memory is
        // affected, and it is unmapped below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(PagerError::Os {
                context: "mmap of the probe page",
                source: std::io::Error::last_os_error(),
            });
        }
        let scratch = RamRegionInfo {
            id: 0,
            gpa: 0,
            size: PAGE_SIZE,
            host_addr: addr as u64,
        };
        let r = uffd
            .register(&scratch)
            .and_then(|()| uffd.unregister(&scratch));
        // SAFETY: `addr` is the one-page mapping made above, used by nothing else.
        unsafe { libc::munmap(addr, len) };
        r
    }

    /// The fd, for `poll`.
    pub fn raw_fd(&self) -> i32 {
        self.uffd.as_raw_fd()
    }

    /// Registers region `r` in MISSING mode; fails if the kernel cannot copy, zero and wake
    /// on it.
    pub fn register(&self, r: &RamRegionInfo) -> Result<(), PagerError> {
        let ioctls = self
            .uffd
            .register(r.host_addr as *mut libc::c_void, r.size as usize)
            .map_err(|source| PagerError::Register {
                op: "UFFDIO_REGISTER",
                gpa: r.gpa,
                size: r.size,
                source,
            })?;
        let need = IoctlFlags::COPY | IoctlFlags::ZEROPAGE | IoctlFlags::WAKE;
        if !ioctls.contains(need) {
            return Err(PagerError::MissingIoctls {
                gpa: r.gpa,
                size: r.size,
                missing: format!("{:?}", need.difference(ioctls)),
            });
        }
        Ok(())
    }

    /// Unregisters region `r`: threads blocked on its missing pages are woken and then see
    /// ordinary anonymous memory (zero pages). Only for a completed or abandoned guest.
    pub fn unregister(&self, r: &RamRegionInfo) -> Result<(), PagerError> {
        self.uffd
            .unregister(r.host_addr as *mut libc::c_void, r.size as usize)
            .map_err(|source| PagerError::Register {
                op: "UFFDIO_UNREGISTER",
                gpa: r.gpa,
                size: r.size,
                source,
            })
    }

    /// `UFFDIO_COPY` of one page (waking the threads that fault on it).
    ///
    /// # Safety
    /// `dst` must be the page-aligned start of one page inside a mapping registered with this
    /// userfaultfd that stays mapped for the call, and `src` exactly [`PAGE_SIZE`] readable
    /// bytes.
    pub unsafe fn copy(&self, dst: u64, src: &[u8], gpa: u64) -> Result<Placement, PagerError> {
        let mut tries = 0;
        loop {
            // SAFETY: the caller guarantees `dst` is one registered, mapped page and `src` is
            // PAGE_SIZE readable bytes; the kernel copies only into `dst` and only if the page
            // is missing (else EEXIST), so no live Rust reference is written behind its back.
            let r = unsafe {
                self.uffd.copy(
                    src.as_ptr() as *const libc::c_void,
                    dst as *mut libc::c_void,
                    PAGE_SIZE as usize,
                    true,
                )
            };
            match r {
                Ok(_) => return Ok(Placement::Placed),
                Err(e) => match errno_of(&e) {
                    Some(libc::EEXIST) => return Ok(Placement::AlreadyPresent),
                    Some(libc::EAGAIN) if tries < EAGAIN_RETRIES => tries += 1,
                    _ => {
                        return Err(PagerError::Place {
                            op: "UFFDIO_COPY",
                            gpa,
                            source: e,
                        })
                    }
                },
            }
        }
    }

    /// `UFFDIO_ZEROPAGE` of one page (waking the threads that fault on it).
    ///
    /// # Safety
    /// As [`UserFd::copy`] for `dst`.
    pub unsafe fn zeropage(&self, dst: u64, gpa: u64) -> Result<Placement, PagerError> {
        let mut tries = 0;
        loop {
            // SAFETY: the caller guarantees `dst` is one registered, mapped page; the kernel
            // maps the zero page there only if the page is missing (else EEXIST).
            let r = unsafe {
                self.uffd
                    .zeropage(dst as *mut libc::c_void, PAGE_SIZE as usize, true)
            };
            match r {
                Ok(_) => return Ok(Placement::Placed),
                Err(e) => match errno_of(&e) {
                    Some(libc::EEXIST) => return Ok(Placement::AlreadyPresent),
                    Some(libc::EAGAIN) if tries < EAGAIN_RETRIES => tries += 1,
                    _ => {
                        return Err(PagerError::Place {
                            op: "UFFDIO_ZEROPAGE",
                            gpa,
                            source: e,
                        })
                    }
                },
            }
        }
    }

    /// `UFFDIO_WAKE` of one page: wakes threads blocked on it (no memory is touched).
    pub fn wake(&self, dst: u64, gpa: u64) -> Result<(), PagerError> {
        self.uffd
            .wake(dst as *mut libc::c_void, PAGE_SIZE as usize)
            .map_err(|source| PagerError::Place {
                op: "UFFDIO_WAKE",
                gpa,
                source,
            })
    }

    /// Reads the events pending now (without blocking) into `out`; returns how many were read
    /// (0: nothing pending). Events other than page faults are not enabled and are skipped.
    pub fn read_pending(
        &self,
        buf: &mut EventBuffer,
        out: &mut Vec<Fault>,
    ) -> Result<usize, PagerError> {
        let mut n = 0;
        for ev in self.uffd.read_events(buf).map_err(PagerError::Read)? {
            n += 1;
            match ev.map_err(PagerError::Read)? {
                Event::Pagefault {
                    addr, thread_id, ..
                } => out.push(Fault {
                    addr: addr as u64,
                    tid: thread_id.as_raw(),
                }),
                other => tracing::debug!("userfaultfd: ignoring event {other:?}"),
            }
        }
        Ok(n)
    }
}
