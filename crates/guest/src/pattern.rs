//! Checker for the `pattern` workload, with QEMU's migration-test rule
//! (`check_guests_ram`): walking a range page by page, every page's first byte equals the
//! previous page's, except at most ONE edge where `page[i] + 1 == page[i-1]` (mod 256), the
//! point the incrementer had reached. Any other difference is "bad" (a lost or stale page).
//!
//! As in QEMU, the comparison is always with the previous page's actual byte, so one stale page
//! in the middle of a range shows up as two bad transitions (into it and out of it).

use serde::{Deserialize, Serialize};

use crate::layout::PAGE_SIZE;
use crate::{Error, Result, StatsBlock, Workload};

/// How many bad transitions per range are listed in [`RangeReport::bad_pages`].
pub const MAX_BAD_LISTED: usize = 8;

/// One bad transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadPage {
    /// GPA of the page whose first byte is wrong.
    pub gpa: u64,
    /// The previous page's first byte.
    pub previous: u8,
    /// This page's first byte.
    pub found: u8,
}

/// Result for one range (one vCPU's share).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeReport {
    pub gpa: u64,
    pub len: u64,
    /// Pages in the range.
    pub pages: u64,
    /// Allowed edges found (0 or 1).
    pub edges: u64,
    /// GPA of the first page after the edge (the next page the incrementer would write).
    pub edge_gpa: Option<u64>,
    /// Bad transitions.
    pub bad: u64,
    /// The first [`MAX_BAD_LISTED`] bad transitions.
    pub bad_pages: Vec<BadPage>,
    /// First byte of the range's first page.
    pub first_value: Option<u8>,
}

/// Result of [`check`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatternReport {
    /// Pages checked over all ranges.
    pub pages_checked: u64,
    pub ranges: Vec<RangeReport>,
}

impl PatternReport {
    /// Bad transitions over all ranges.
    pub fn bad(&self) -> u64 {
        self.ranges.iter().map(|r| r.bad).sum()
    }

    /// True when no range has a bad transition.
    pub fn is_ok(&self) -> bool {
        self.bad() == 0
    }
}

fn check_range(dump: &[u8], dump_gpa: u64, gpa: u64, len: u64) -> Result<RangeReport> {
    if gpa & (PAGE_SIZE - 1) != 0 || len & (PAGE_SIZE - 1) != 0 {
        return Err(Error::Unaligned { gpa, len });
    }
    let outside = || Error::OutsideDump {
        gpa,
        len,
        dump_gpa,
        dump_len: dump.len() as u64,
    };
    let start = gpa.checked_sub(dump_gpa).ok_or_else(outside)?;
    let end = start.checked_add(len).ok_or_else(outside)?;
    if end > dump.len() as u64 {
        return Err(outside());
    }
    let bytes = &dump[start as usize..end as usize];
    let mut r = RangeReport {
        gpa,
        len,
        pages: len / PAGE_SIZE,
        edges: 0,
        edge_gpa: None,
        bad: 0,
        bad_pages: Vec::new(),
        first_value: bytes.first().copied(),
    };
    let mut pages = bytes.chunks_exact(PAGE_SIZE as usize).map(|p| p[0]);
    let Some(mut last) = pages.next() else {
        return Ok(r);
    };
    for (i, b) in pages.enumerate() {
        if b != last {
            let page_gpa = gpa + (i as u64 + 1) * PAGE_SIZE;
            if b.wrapping_add(1) == last && r.edges == 0 {
                r.edges = 1;
                r.edge_gpa = Some(page_gpa);
            } else {
                r.bad += 1;
                if r.bad_pages.len() < MAX_BAD_LISTED {
                    r.bad_pages.push(BadPage {
                        gpa: page_gpa,
                        previous: last,
                        found: b,
                    });
                }
            }
        }
        last = b;
    }
    Ok(r)
}

/// Checks the pattern in `ranges` (`(gpa, len)`, page aligned) of a dump of guest RAM whose
/// first byte is at GPA `dump_gpa`. Errors only for bad arguments; a corrupted pattern is
/// reported in the returned report (see [`PatternReport::is_ok`]).
pub fn check(dump: &[u8], dump_gpa: u64, ranges: &[(u64, u64)]) -> Result<PatternReport> {
    let mut report = PatternReport {
        pages_checked: 0,
        ranges: Vec::with_capacity(ranges.len()),
    };
    for &(gpa, len) in ranges {
        let r = check_range(dump, dump_gpa, gpa, len)?;
        report.pages_checked += r.pages;
        report.ranges.push(r);
    }
    Ok(report)
}

/// The per-vCPU work ranges `(gpa, len)` found in the stats blocks of a dump of guest RAM
/// starting at GPA `dump_gpa` (normally 0). Every vCPU must run the pattern workload.
pub fn ranges_from_stats(dump: &[u8], dump_gpa: u64) -> Result<Vec<(u64, u64)>> {
    let blocks = StatsBlock::all_from_dump(dump, dump_gpa)?;
    blocks
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if b.workload() != Some(Workload::Pattern) {
                return Err(Error::NotPattern {
                    vcpu: i as u32,
                    workload: b.workload_id,
                });
            }
            if !b.is_running() {
                return Err(Error::BadStats(format!(
                    "vCPU {i} is {:?}, not running",
                    b.state
                )));
            }
            Ok((b.work_base, b.work_len))
        })
        .collect()
}

/// [`ranges_from_stats`] then [`check`] on the same dump.
pub fn check_dump(dump: &[u8], dump_gpa: u64) -> Result<PatternReport> {
    let ranges = ranges_from_stats(dump, dump_gpa)?;
    check(dump, dump_gpa, &ranges)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{self, stats_off as off};

    const P: usize = PAGE_SIZE as usize;

    /// A dump at GPA `base` of `pages` pages whose first bytes are `values`.
    fn dump(values: &[u8]) -> Vec<u8> {
        let mut d = vec![0u8; values.len() * P];
        for (i, v) in values.iter().enumerate() {
            d[i * P] = *v;
            d[i * P + 1] = 0xaa; // other bytes do not matter
        }
        d
    }

    fn one(values: &[u8]) -> RangeReport {
        let d = dump(values);
        let r = check(&d, 0x100_0000, &[(0x100_0000, d.len() as u64)]).unwrap();
        assert_eq!(r.pages_checked, values.len() as u64);
        r.ranges.into_iter().next().unwrap()
    }

    #[test]
    fn good_pattern_passes() {
        let r = one(&[7; 64]);
        assert_eq!((r.edges, r.bad), (0, 0));
        assert_eq!(r.first_value, Some(7));
    }

    #[test]
    fn one_edge_passes() {
        let mut v = [5u8; 64];
        v[..20].fill(6);
        let r = one(&v);
        assert_eq!((r.edges, r.bad), (1, 0));
        assert_eq!(r.edge_gpa, Some(0x100_0000 + 20 * PAGE_SIZE));
    }

    #[test]
    fn wrapped_values_pass() {
        let mut v = [255u8; 32];
        v[..10].fill(0);
        let r = one(&v);
        assert_eq!((r.edges, r.bad), (1, 0));
    }

    #[test]
    fn stale_page_fails() {
        let mut v = [9u8; 64];
        v[..40].fill(10);
        v[13] = 9; // not re-sent after being dirtied
        let r = one(&v);
        // Into the stale page looks like the edge, out of it is bad, and so is the real edge.
        assert_eq!((r.edges, r.bad), (1, 2), "{r:?}");
        assert_eq!(r.bad_pages[0].gpa, 0x100_0000 + 14 * PAGE_SIZE);
        assert_eq!(r.bad_pages[1].gpa, 0x100_0000 + 40 * PAGE_SIZE);
        // A stale page in the un-incremented part: a step up and a step down, both bad.
        let mut v = [9u8; 64];
        v[50] = 8;
        v[..10].fill(10);
        let r = one(&v);
        assert_eq!((r.edges, r.bad), (1, 2), "{r:?}");
    }

    #[test]
    fn two_edges_fail() {
        let mut v = [3u8; 64];
        v[..10].fill(5);
        v[10..20].fill(4);
        let r = one(&v);
        assert_eq!((r.edges, r.bad), (1, 1));
    }

    #[test]
    fn corrupted_dump_fails() {
        let mut d = dump(&[1; 128]);
        for (i, b) in d.iter_mut().enumerate().skip(37 * P).take(10 * P) {
            *b = (i * 31 % 251) as u8;
        }
        let r = check(&d, 0, &[(0, d.len() as u64)]).unwrap();
        assert!(!r.is_ok());
        assert!(
            r.bad() >= 2 && r.ranges[0].bad_pages.len() <= MAX_BAD_LISTED,
            "{r:?}"
        );
    }

    #[test]
    fn ranges_are_independent() {
        // Range A ends higher than range B starts: fine, each range has its own edge.
        let mut v = vec![4u8; 16];
        v.extend_from_slice(&[2u8; 16]);
        v[16..20].fill(3);
        let d = dump(&v);
        let half = 16 * PAGE_SIZE;
        let r = check(&d, 0, &[(0, half), (half, half)]).unwrap();
        assert!(r.is_ok());
        assert_eq!(r.ranges[1].edges, 1);
        // As one range it has two edges.
        assert!(!check(&d, 0, &[(0, 2 * half)]).unwrap().is_ok());
    }

    #[test]
    fn bad_arguments() {
        let d = dump(&[0; 4]);
        assert!(matches!(
            check(&d, 0, &[(1, 4096)]),
            Err(Error::Unaligned { .. })
        ));
        assert!(matches!(
            check(&d, 0, &[(0, 5 * 4096)]),
            Err(Error::OutsideDump { .. })
        ));
        assert!(matches!(
            check(&d, 4096, &[(0, 4096)]),
            Err(Error::OutsideDump { .. })
        ));
        assert!(matches!(
            check(&d, 0, &[(u64::MAX - 4095, 8192)]),
            Err(Error::Unaligned { .. }) | Err(Error::OutsideDump { .. })
        ));
        assert_eq!(check(&d, 0, &[(0, 0)]).unwrap().pages_checked, 0);
    }

    #[test]
    fn from_stats() {
        let vcpus = 2u32;
        let total = 8 * PAGE_SIZE;
        let size = (layout::WORK_BASE + total) as usize;
        let mut d = vec![0u8; size];
        for i in 0..vcpus {
            let (gpa, len) = layout::work_share(i, vcpus, total);
            let s = layout::stats_addr(i) as usize;
            let mut put = |o: u64, v: u64| {
                d[s + o as usize..s + o as usize + 8].copy_from_slice(&v.to_le_bytes())
            };
            put(off::STATE, layout::STATE_RUNNING);
            put(off::WORKLOAD, layout::WORKLOAD_PATTERN);
            put(off::VCPU, i as u64);
            put(off::VCPUS, vcpus as u64);
            put(off::WORK_BASE, gpa);
            put(off::WORK_LEN, len);
            put(off::MAGIC, layout::STATS_MAGIC);
        }
        let ranges = ranges_from_stats(&d, 0).unwrap();
        assert_eq!(
            ranges,
            vec![
                (layout::WORK_BASE, total / 2),
                (layout::WORK_BASE + total / 2, total / 2)
            ]
        );
        d[layout::WORK_BASE as usize] = 1; // vCPU 0 incremented its first page: an edge
        assert!(check_dump(&d, 0).unwrap().is_ok());
        d[(layout::WORK_BASE + 2 * PAGE_SIZE) as usize] = 1; // [1, 0, 1, 0]: two bad steps
        assert_eq!(check_dump(&d, 0).unwrap().bad(), 2);
        // Not the pattern workload.
        let s = layout::stats_addr(1) as usize + off::WORKLOAD as usize;
        d[s] = layout::WORKLOAD_DIRTY as u8;
        assert!(matches!(
            ranges_from_stats(&d, 0),
            Err(Error::NotPattern { vcpu: 1, .. })
        ));
        // No stats at all.
        assert!(matches!(
            ranges_from_stats(&vec![0; size], 0),
            Err(Error::BadStatsMagic { .. })
        ));
    }
}
