//! Suite `digest`: what `x-tern-ram-digest` (the destination checks a digest of the source's
//! memory before it runs, docs/stream-format.md §7a) costs in downtime and total time, over one
//! stream and over multifd's 2 channels (decision 252). Tern only: QEMU has no such check. Same
//! guest, same link, capability off and on, alternating, several runs each (the hashing is memory-bound: the numbers move with the host's memory bandwidth
//! and with whatever else runs on its two cores).

use serde_json::{json, Value};

use crate::link::Link;
use crate::migrate::{MigParams, Outcome};
use crate::precopy::{migrate_pair, result_cell, DOWNTIME_LIMIT_MS};
use crate::report::{mib, ms, secs, Table};
use crate::vm::{Guest, Kind};
use crate::Ctx;

const CAPS: &[&str] = &["events", "return-path"];
/// Multifd's channel count in the multifd rows (QEMU's default).
const CHANNELS: u8 = 2;

/// The capabilities of one row: `events`, `return-path`, then `multifd` and the digest.
fn caps(multifd: bool, digest: bool) -> Vec<String> {
    let mut c: Vec<String> = CAPS.iter().map(|c| c.to_string()).collect();
    if multifd {
        c.push("multifd".into());
    }
    if digest {
        c.push("x-tern-ram-digest".into());
    }
    c
}

fn digest_ms(q: &Value, key: &str) -> Option<f64> {
    q.get("x-tern-ram-digest")
        .and_then(|d| d.get(key))
        .and_then(Value::as_f64)
        .map(|us| us / 1e3)
}

fn wait_ms(q: &Value) -> Option<f64> {
    q.get("x-tern-downtime-breakdown")
        .and_then(|d| d.get("digest-wait-us"))
        .and_then(Value::as_f64)
        .map(|us| us / 1e3)
}

pub fn run(ctx: &Ctx) -> anyhow::Result<()> {
    // (working set filled by the guest, guest RAM) in MiB: 1 GiB, and 4 GiB whose top GiB
    // (above the PCI hole) the guest never touches.
    let sizes: &[(u64, u64)] = if ctx.quick {
        &[(256, 320)]
    } else {
        &[(1024, 1088), (3000, 4096)]
    };
    let runs = if ctx.quick { 1 } else { 3 };
    let mut report = ctx.report(
        "digest",
        json!({
            "guest": "idle, working set filled", "work-and-ram-mib": sizes, "runs": runs, "vcpus": 1,
            "downtime-limit-ms": DOWNTIME_LIMIT_MS, "chunk": "2 MiB, XXH3-64, 2 threads per side",
            "multifd-channels": CHANNELS,
        }),
    );
    report.notes.extend([
        "Tern only: QEMU has no memory check. Off and on alternate, same guest and link.".into(),
        "source hash: the source hashing its stopped guest's RAM, overlapped with sending the \
         final pages and device state; digest wait: the part of it the switchover waited for \
         (in the downtime). destination hash: reading back and hashing every page as it was \
         loaded (mostly during pre-copy), in brackets the check at END (combining the page \
         digests per chunk and comparing), which is in the downtime. With multifd every channel \
         receiver hashes what it loads, so the destination hash is CPU time summed over the \
         receivers."
            .into(),
    ]);
    report.tables.push(Table::new(
        "Runs (loopback)",
        &[
            "guest",
            "channels",
            "x-tern-ram-digest",
            "total time",
            "downtime (VMM)",
            "heartbeat gap (host)",
            "source hash",
            "digest wait",
            "destination hash (check at END)",
            "bytes sent",
            "result",
        ],
    ));
    if ctx.bins.tern.is_none() {
        return report.write(&ctx.out);
    }
    let link = Link::measured_loopback(1.0);
    for &(work, ram) in sizes {
        let guest = Guest {
            ram_mib: Some(ram),
            ..Guest::new("idle", work, 0)
        };
        let size = ram;
        for run in 0..runs {
            for (multifd, on) in [(false, false), (false, true), (true, false), (true, true)] {
                let stream = if multifd { "multifd" } else { "one stream" };
                let label = format!(
                    "{size} MiB {stream} digest {}",
                    if on { "on" } else { "off" }
                );
                if !ctx.selected(&label) {
                    continue;
                }
                tracing::info!("digest: {label}, run {}", run + 1);
                let p = MigParams {
                    caps: caps(multifd, on),
                    downtime_limit_ms: DOWNTIME_LIMIT_MS,
                    max_bandwidth: link.max_bandwidth,
                    timeout_s: ctx.timeout_s,
                    multifd_channels: multifd.then_some(CHANNELS),
                };
                let out: Outcome =
                    migrate_pair(ctx, &link, &guest, Kind::Tern, 1, None, &p, "digest");
                let row = vec![
                    format!("idle {work} MiB of {ram} MiB"),
                    if multifd {
                        format!("multifd {CHANNELS}")
                    } else {
                        "one stream".into()
                    },
                    if on { "on" } else { "off" }.into(),
                    secs(out.total_ms.map(|t| t / 1e3)),
                    ms(out.downtime_ms),
                    ms(out.hb_gap_ms),
                    ms(digest_ms(&out.src_final, "hash-us")),
                    ms(wait_ms(&out.src_final)),
                    format!(
                        "{} ({})",
                        ms(digest_ms(&out.dst_final, "hash-us")),
                        ms(digest_ms(&out.dst_final, "verify-us"))
                    ),
                    mib(out.transferred),
                    result_cell(&out),
                ];
                tracing::info!("  -> {}", row.join(" | "));
                report.tables[0].rows.push(row);
                report.runs.push(json!({
                    "size-mib": size, "multifd": multifd, "digest": on, "run": run + 1, "params": p, "outcome": out,
                }));
                report.write(&ctx.out)?;
            }
        }
    }
    report.write(&ctx.out)
}
