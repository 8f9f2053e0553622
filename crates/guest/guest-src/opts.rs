//! Command-line parsing inside the guest. Never fatal: bad or unknown options are reported once
//! on COM1 (when `report` is set) and ignored.

use crate::console::Console;
use crate::layout;

/// Parsed options (see docs/guest.md).
#[derive(Clone, Copy)]
pub struct Opts {
    pub workload: u64,
    pub mem_mib: u64,
    pub rate_mib_s: u64,
    pub random: bool,
    pub hb_ms: u64,
    pub status_ms: u64,
    /// 0 = not given.
    pub tsc_khz: u64,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            workload: layout::WORKLOAD_IDLE,
            mem_mib: 0,
            rate_mib_s: 0,
            random: false,
            hb_ms: 1,
            status_ms: 1000,
            tsc_khz: 0,
        }
    }
}

fn number(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 {
        return None;
    }
    let mut n: u64 = 0;
    for &c in v {
        if !c.is_ascii_digit() {
            return None;
        }
        n = n * 10 + (c - b'0') as u64;
    }
    Some(n)
}

fn report(enabled: bool, what: &str, token: &[u8]) {
    if enabled {
        Console
            .str("#")
            .str(what)
            .str(": ")
            .sanitized(token, 64)
            .str("\n");
    }
}

/// Reads the NUL-terminated command line at `gpa` (0 = none) as a byte slice.
fn cmdline_bytes(gpa: u64) -> &'static [u8] {
    if gpa == 0 {
        return &[];
    }
    let p = gpa as *const u8;
    let mut len = 0usize;
    // SAFETY: the VMM (direct entry) or the PVH loader put a NUL-terminated command line at
    // `gpa` in identity-mapped RAM; we never read more than CMDLINE_MAX bytes.
    unsafe {
        while (len as u64) < layout::CMDLINE_MAX - 1 && core::ptr::read_volatile(p.add(len)) != 0 {
            len += 1;
        }
        core::slice::from_raw_parts(p, len)
    }
}

/// Parses the command line at `gpa`.
pub fn parse(gpa: u64, report_errors: bool) -> Opts {
    let mut o = Opts::default();
    let line = cmdline_bytes(gpa);
    for tok in line
        .split(|c| c.is_ascii_whitespace())
        .filter(|t| !t.is_empty())
    {
        let Some(eq) = tok.iter().position(|&c| c == b'=') else {
            report(report_errors, "unknown option", tok);
            continue;
        };
        let (key, val) = (&tok[..eq], &tok[eq + 1..]);
        let ok = match key {
            b"workload" => match val {
                b"idle" => Some(layout::WORKLOAD_IDLE),
                b"dirty" => Some(layout::WORKLOAD_DIRTY),
                b"pattern" => Some(layout::WORKLOAD_PATTERN),
                _ => None,
            }
            .map(|w| o.workload = w),
            b"mem" => number(val)
                .filter(|&m| m <= layout::MAX_MEM_MIB)
                .map(|m| o.mem_mib = m),
            b"rate" => number(val).map(|r| o.rate_mib_s = r),
            b"order" => match val {
                b"seq" => Some(false),
                b"random" => Some(true),
                _ => None,
            }
            .map(|r| o.random = r),
            b"hb" => number(val).map(|v| o.hb_ms = v),
            b"status" => number(val).map(|v| o.status_ms = v),
            b"tsc_khz" => number(val).filter(|&v| v > 0).map(|v| o.tsc_khz = v),
            _ => {
                report(report_errors, "unknown option", tok);
                Some(())
            }
        };
        if ok.is_none() {
            report(report_errors, "bad option", tok);
        }
    }
    o
}
