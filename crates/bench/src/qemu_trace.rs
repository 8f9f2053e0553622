//! QEMU's page-request latency, from its own trace events (QEMU 10.0 reports none in
//! `query-migrate`; 10.1's `postcopy-latency` is an average only).
//!
//! The destination QEMU runs with `-msg timestamp=on -trace postcopy_ram_fault_thread_request
//! -trace postcopy_place_page` (Debian builds QEMU with the `log` trace backend: one line per event
//! on stderr, `TID@SECONDS.MICROS:event args`, host `CLOCK_REALTIME`). For every page QEMU's fault
//! thread requested, the latency is from its first request to the page's placement
//! (`UFFDIO_COPY`). That starts a little *after* the fault (the fault thread has read it), while
//! Tern's `x-tern-postcopy-latency` starts at the fault, so the comparison favours QEMU slightly.
//! Tracing costs QEMU one formatted log line per placed page, so the bench keeps it on rows of
//! their own and reports the untraced rows' gaps and times separately.

use std::collections::HashMap;

/// Event names as QEMU spells them.
pub const REQUEST_EVENT: &str = "postcopy_ram_fault_thread_request";
pub const PLACE_EVENT: &str = "postcopy_place_page";

/// The arguments that turn tracing on for the destination.
pub fn trace_args() -> Vec<String> {
    vec![
        "-msg".into(),
        "timestamp=on".into(),
        "-trace".into(),
        REQUEST_EVENT.into(),
        "-trace".into(),
        PLACE_EVENT.into(),
    ]
}

/// Latencies of the requested pages.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Latency {
    /// Requested pages that were then placed.
    pub pages: u64,
    pub median_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    /// The average, for Tern's `postcopy-latency` (also an average).
    pub mean_us: u64,
    /// Median and 99th percentile rounded up to a power of two, as Tern's
    /// `x-tern-postcopy-latency` buckets report them, for a like-for-like column.
    pub median_bucket_us: u64,
    pub p99_bucket_us: u64,
}

/// One parsed trace line: (timestamp µs, event, page address).
fn parse_line(line: &str, page_size: u64) -> Option<(u64, &str, u64)> {
    let (_, rest) = line.split_once('@')?;
    let (stamp, rest) = rest.split_once(':')?;
    let (secs, micros) = stamp.split_once('.')?;
    let at = secs.parse::<u64>().ok()? * 1_000_000 + micros.parse::<u64>().ok()?;
    let (event, args) = rest.split_once(' ').unwrap_or((rest, ""));
    let key = match event {
        REQUEST_EVENT => "HVA=0x",
        PLACE_EVENT => "host=0x",
        _ => return None,
    };
    let hex = args.split_once(key)?.1;
    let end = hex
        .find(|c: char| !c.is_ascii_hexdigit())
        .unwrap_or(hex.len());
    let addr = u64::from_str_radix(&hex[..end], 16).ok()?;
    Some((at, event, addr & !(page_size - 1)))
}

/// Reads the destination's log and pairs every page's first request with its placement.
/// `None` when the log holds no requested page that was placed.
pub fn request_latency(log: &str, page_size: u64) -> Option<Latency> {
    let mut requested: HashMap<u64, u64> = HashMap::new();
    let mut samples = Vec::new();
    for line in log.lines() {
        let Some((at, event, page)) = parse_line(line, page_size) else {
            continue;
        };
        if event == REQUEST_EVENT {
            requested.entry(page).or_insert(at);
        } else if let Some(since) = requested.remove(&page) {
            samples.push(at.saturating_sub(since));
        }
    }
    if samples.is_empty() {
        return None;
    }
    samples.sort_unstable();
    // Nearest rank: the smallest sample with at least the share `q` of samples at or below it.
    let n = samples.len();
    let pick = |q: f64| samples[((q * n as f64).ceil() as usize).clamp(1, n) - 1];
    let (median_us, p99_us) = (pick(0.5), pick(0.99));
    Some(Latency {
        pages: samples.len() as u64,
        median_us,
        p99_us,
        max_us: samples[samples.len() - 1],
        mean_us: samples.iter().sum::<u64>() / n as u64,
        median_bucket_us: median_us.max(1).next_power_of_two(),
        p99_bucket_us: p99_us.max(1).next_power_of_two(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: u64 = 4096;

    #[test]
    fn pairs_each_pages_first_request_with_its_placement() {
        let log = "\
12@100.000010:postcopy_ram_fault_thread_request Request for HVA=0x7f0000001234 rb=pc.ram offset=0x1000 pid=13
12@100.000020:postcopy_ram_fault_thread_request Request for HVA=0x7f0000001000 rb=pc.ram offset=0x1000 pid=13
14@100.000500:postcopy_place_page host=0x7f0000005000
14@100.000810:postcopy_place_page host=0x7f0000001000
12@100.001000:postcopy_ram_fault_thread_request Request for HVA=0x7f0000009000 rb=pc.ram offset=0x9000 pid=13
qemu-system-x86_64: some unrelated line
14@100.004000:postcopy_place_page host=0x7f0000009000
";
        let l = request_latency(log, PAGE).expect("two requested pages were placed");
        assert_eq!(l.pages, 2, "the pushed page 0x5000 was never requested");
        // Page 0x1000: first request at .000010, placed at .000810.
        assert_eq!(l.median_us, 800);
        assert_eq!(l.max_us, 3000);
        assert_eq!(l.p99_us, 3000);
        assert_eq!(l.median_bucket_us, 1024);
        assert_eq!(l.p99_bucket_us, 4096);
        assert_eq!(l.mean_us, 1900);
    }

    #[test]
    fn a_log_without_requests_has_no_latency() {
        assert_eq!(
            request_latency("1@1.000001:postcopy_place_page host=0x1000\n", PAGE),
            None
        );
        assert_eq!(request_latency("garbage\n@\n1@x.y:z\n", PAGE), None);
    }
}
