//! Which pages of guest RAM have been requested and which received, and the decisions the
//! fault thread takes from that: request a page at most once, never request a page that is
//! already here, and batch the requests of one drain into contiguous ranges.

use crate::memory::{RamRegionInfo, PAGE_SIZE};

use super::bitmap::PageBitmap;

/// A page-aligned range of guest physical memory inside one RAM region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GpaRange {
    /// First byte (page aligned).
    pub gpa: u64,
    /// Length in bytes (a non-zero multiple of [`PAGE_SIZE`]).
    pub len: u64,
}

impl GpaRange {
    /// Pages in the range.
    pub fn pages(&self) -> u64 {
        self.len / PAGE_SIZE
    }

    /// Whether `gpa` lies inside the range.
    pub fn contains(&self, gpa: u64) -> bool {
        gpa >= self.gpa && gpa - self.gpa < self.len
    }
}

/// A page: its region's index in [`PageTracker`] and its index inside the region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageRef {
    /// Region index (position in the region list, = memslot id for `GuestRam`).
    pub region: usize,
    /// Page index inside the region.
    pub page: u64,
}

/// What the fault thread does about one faulting page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultVerdict {
    /// First fault on a page neither requested nor received: request it.
    Request,
    /// Already requested and not yet here: the arriving `UFFDIO_COPY` wakes the faulter.
    InFlight,
    /// Already received (or never missing): the faulter only needs waking (a race with the
    /// placement, or a never-populated page the source had as zero).
    Present,
}

#[derive(Debug)]
struct Region {
    info: RamRegionInfo,
    requested: PageBitmap,
    received: PageBitmap,
}

/// Requested and received bitmaps of every RAM region, with address lookups.
#[derive(Debug)]
pub struct PageTracker {
    regions: Vec<Region>,
}

impl PageTracker {
    /// Clear bitmaps for `regions` (everything missing, nothing requested).
    pub fn new(regions: &[RamRegionInfo]) -> Self {
        PageTracker {
            regions: regions
                .iter()
                .map(|&info| Region {
                    info,
                    requested: PageBitmap::new(info.pages()),
                    received: PageBitmap::new(info.pages()),
                })
                .collect(),
        }
    }

    /// The regions tracked.
    pub fn regions(&self) -> impl Iterator<Item = &RamRegionInfo> {
        self.regions.iter().map(|r| &r.info)
    }

    /// The page holding host virtual address `addr`, if it is guest RAM.
    pub fn locate_host(&self, addr: u64) -> Option<PageRef> {
        self.regions.iter().enumerate().find_map(|(i, r)| {
            let off = addr.checked_sub(r.info.host_addr)?;
            (off < r.info.size).then_some(PageRef {
                region: i,
                page: off / PAGE_SIZE,
            })
        })
    }

    /// The page at guest physical address `gpa` (page aligned), if it is guest RAM.
    pub fn locate_gpa(&self, gpa: u64) -> Option<PageRef> {
        if !gpa.is_multiple_of(PAGE_SIZE) {
            return None;
        }
        self.regions.iter().enumerate().find_map(|(i, r)| {
            let off = gpa.checked_sub(r.info.gpa)?;
            (off < r.info.size).then_some(PageRef {
                region: i,
                page: off / PAGE_SIZE,
            })
        })
    }

    /// Guest physical address of `p`.
    pub fn gpa(&self, p: PageRef) -> Option<u64> {
        let r = self.regions.get(p.region)?;
        (p.page < r.info.pages()).then(|| r.info.gpa + p.page * PAGE_SIZE)
    }

    /// Host virtual address of `p`.
    pub fn host(&self, p: PageRef) -> Option<u64> {
        let r = self.regions.get(p.region)?;
        (p.page < r.info.pages()).then(|| r.info.host_addr + p.page * PAGE_SIZE)
    }

    /// Decides what a fault on `p` needs, claiming the request if it is the first: of any
    /// number of concurrent callers for one page, exactly one gets [`FaultVerdict::Request`],
    /// and never for a page already received.
    pub fn on_fault(&self, p: PageRef) -> FaultVerdict {
        let Some(r) = self.regions.get(p.region) else {
            return FaultVerdict::Present;
        };
        if r.received.get(p.page) {
            return FaultVerdict::Present;
        }
        match r.requested.set(p.page) {
            Some(false) => {
                // Placed between the two loads: do not request what is here.
                if r.received.get(p.page) {
                    FaultVerdict::Present
                } else {
                    FaultVerdict::Request
                }
            }
            Some(true) => FaultVerdict::InFlight,
            None => FaultVerdict::Present,
        }
    }

    /// Marks `p` received; returns true the first time.
    pub fn mark_received(&self, p: PageRef) -> bool {
        self.regions
            .get(p.region)
            .and_then(|r| r.received.set(p.page))
            == Some(false)
    }

    /// Marks received, in bulk, the pages of region `region` whose bits are set in `words`
    /// (bit i = page i).
    pub fn mark_received_words(&self, region: usize, words: impl IntoIterator<Item = u64>) {
        if let Some(r) = self.regions.get(region) {
            r.received.or_words(words);
        }
    }

    /// Whether `p` is received (or was never missing).
    pub fn is_received(&self, p: PageRef) -> bool {
        self.regions
            .get(p.region)
            .is_some_and(|r| r.received.get(p.page))
    }

    /// Whether `p` was requested.
    pub fn is_requested(&self, p: PageRef) -> bool {
        self.regions
            .get(p.region)
            .is_some_and(|r| r.requested.get(p.page))
    }

    /// The received bitmap of every region (bit i = page i): QEMU's received bitmap, the
    /// input of a post-copy recovery.
    pub fn received_bitmaps(&self) -> Vec<Vec<u64>> {
        self.regions.iter().map(|r| r.received.to_words()).collect()
    }

    /// Pages not received yet, over all regions.
    pub fn missing_pages(&self) -> u64 {
        self.regions
            .iter()
            .map(|r| r.info.pages() - r.received.count())
            .sum()
    }
}

/// Turns the pages of one drain into requests: sorted, duplicates removed, neighbours in one
/// region merged into one range, at most `max_pages` pages per range (a range never spans two
/// regions, so the engine maps each to one block).
pub fn coalesce(tracker: &PageTracker, pages: &mut Vec<PageRef>, max_pages: u64) -> Vec<GpaRange> {
    pages.sort_unstable();
    pages.dedup();
    let max_pages = max_pages.max(1);
    let mut out: Vec<GpaRange> = Vec::new();
    let mut last: Option<PageRef> = None;
    for &p in pages.iter() {
        let Some(gpa) = tracker.gpa(p) else { continue };
        let joins = last.is_some_and(|l| l.region == p.region && l.page + 1 == p.page);
        match out.last_mut() {
            Some(r) if joins && r.pages() < max_pages => r.len += PAGE_SIZE,
            _ => out.push(GpaRange {
                gpa,
                len: PAGE_SIZE,
            }),
        }
        last = Some(p);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker() -> PageTracker {
        PageTracker::new(&[
            RamRegionInfo {
                id: 0,
                gpa: 0,
                size: 16 * PAGE_SIZE,
                host_addr: 0x7000_0000_0000,
            },
            RamRegionInfo {
                id: 1,
                gpa: 16 * PAGE_SIZE,
                size: 8 * PAGE_SIZE,
                host_addr: 0x7100_0000_0000,
            },
        ])
    }

    fn p(region: usize, page: u64) -> PageRef {
        PageRef { region, page }
    }

    #[test]
    fn lookups_by_host_and_guest_address() {
        let t = tracker();
        assert_eq!(
            t.locate_host(0x7000_0000_0000 + 5 * 4096 + 17),
            Some(p(0, 5))
        );
        assert_eq!(t.locate_host(0x7100_0000_0000 + 7 * 4096), Some(p(1, 7)));
        assert_eq!(t.locate_host(0x7100_0000_0000 + 8 * 4096), None);
        assert_eq!(t.locate_host(0x6fff_ffff_ffff), None);
        assert_eq!(t.locate_gpa(17 * 4096), Some(p(1, 1)));
        assert_eq!(t.locate_gpa(17 * 4096 + 1), None, "unaligned");
        assert_eq!(t.locate_gpa(24 * 4096), None);
        assert_eq!(t.gpa(p(1, 1)), Some(17 * 4096));
        assert_eq!(t.gpa(p(1, 8)), None);
        assert_eq!(t.gpa(p(2, 0)), None);
        assert_eq!(t.host(p(0, 1)), Some(0x7000_0000_1000));
    }

    #[test]
    fn a_page_is_requested_once_and_never_after_it_arrived() {
        let t = tracker();
        assert_eq!(t.on_fault(p(0, 3)), FaultVerdict::Request);
        assert_eq!(t.on_fault(p(0, 3)), FaultVerdict::InFlight);
        assert!(t.mark_received(p(0, 3)));
        assert!(!t.mark_received(p(0, 3)), "second arrival is not a first");
        assert_eq!(t.on_fault(p(0, 3)), FaultVerdict::Present);
        // Placed before any fault: never requested.
        assert!(t.mark_received(p(1, 2)));
        assert_eq!(t.on_fault(p(1, 2)), FaultVerdict::Present);
        assert!(!t.is_requested(p(1, 2)));
        assert_eq!(t.missing_pages(), 24 - 2);
        assert_eq!(t.received_bitmaps(), vec![vec![1 << 3], vec![1 << 2]]);
        // Outside the regions: nothing to request.
        assert_eq!(t.on_fault(p(1, 8)), FaultVerdict::Present);
        assert_eq!(t.on_fault(p(5, 0)), FaultVerdict::Present);
    }

    #[test]
    fn concurrent_faults_on_one_page_request_it_once() {
        let t = tracker();
        let requests = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|_| {
                    let t = &t;
                    s.spawn(move || {
                        (0..16)
                            .filter(|&pg| t.on_fault(p(0, pg)) == FaultVerdict::Request)
                            .count()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum::<usize>()
        });
        assert_eq!(requests, 16);
    }

    #[test]
    fn coalesce_merges_neighbours_within_a_region_only() {
        let t = tracker();
        let mut pages = vec![
            p(0, 15),
            p(0, 2),
            p(0, 3),
            p(1, 0),
            p(0, 3),
            p(0, 4),
            p(1, 1),
            p(1, 9),
        ];
        let ranges = coalesce(&t, &mut pages, 1024);
        assert_eq!(
            ranges,
            vec![
                GpaRange {
                    gpa: 2 * 4096,
                    len: 3 * 4096
                },
                // Page 15 of region 0 and page 0 of region 1 are adjacent in guest physical
                // memory but in two regions: two ranges.
                GpaRange {
                    gpa: 15 * 4096,
                    len: 4096
                },
                GpaRange {
                    gpa: 16 * 4096,
                    len: 2 * 4096
                },
            ],
            "page 9 of region 1 is outside it and dropped"
        );
        let mut run: Vec<_> = (0..10).map(|pg| p(0, pg)).collect();
        let ranges = coalesce(&t, &mut run, 4);
        assert_eq!(
            ranges.iter().map(|r| r.pages()).collect::<Vec<_>>(),
            vec![4, 4, 2]
        );
        assert!(ranges[0].contains(3 * 4096) && !ranges[0].contains(4 * 4096));
        assert!(coalesce(&t, &mut Vec::new(), 4).is_empty());
    }
}
