//! Suite `switchover-ack`: Tern's state device (`statedev,size=300M,setup-ms=1480`) whose
//! destination-side setup takes 1.48 s. Without switchover-ack that setup lands inside the
//! downtime; with it the source waits for the destination's ACK before stopping the guest.
//! Reproduces the seed's table: 1900 ms → 420 ms (4.5x).

use serde_json::json;

use crate::link::{Link, Netns};
use crate::migrate::MigParams;
use crate::precopy::{migrate_pair, result_cell, DOWNTIME_LIMIT_MS};
use crate::report::{mib, ms, ratio, secs, Table};
use crate::vm::{Guest, Kind};
use crate::Ctx;

pub const DEVICE: &str = "statedev,size=300M,setup-ms=1480";

struct Variant {
    name: &'static str,
    device: bool,
    caps: &'static [&'static str],
}

const VARIANTS: &[Variant] = &[
    Variant {
        name: "guest only",
        device: false,
        caps: &["events"],
    },
    Variant {
        name: "statedev, switchover-ack off",
        device: true,
        caps: &["events", "return-path"],
    },
    Variant {
        name: "statedev, switchover-ack on",
        device: true,
        caps: &["events", "return-path", "switchover-ack"],
    },
];

pub fn run(ctx: &Ctx) -> anyhow::Result<()> {
    let mem = if ctx.quick { 64 } else { 256 };
    let guest = Guest::new("idle", mem, 0);
    let mut report = ctx.report(
        "switchover-ack",
        json!({
            "device": DEVICE, "guest": guest, "vcpus": 1, "downtime-limit-ms": DOWNTIME_LIMIT_MS,
            "timeout-s": ctx.timeout_s, "reference": "seed table: 1900 ms off -> 420 ms on (4.5x)",
        }),
    );
    report.notes.extend([
        "Tern only: QEMU has no device with a slow destination-side setup like Tern's statedev."
            .into(),
        "`off` keeps `return-path` on so that only switchover-ack changes between the two rows; \
         capabilities are set on both sides."
            .into(),
        "downtime: query-migrate `downtime` on the source; heartbeat gap: host CLOCK_REALTIME, \
         destination's first beat after the source's last."
            .into(),
    ]);
    report.tables.push(Table::new(
        "Runs",
        &[
            "link",
            "variant",
            "total time",
            "downtime (VMM)",
            "heartbeat gap (host)",
            "bytes sent",
            "result",
        ],
    ));
    report.tables.push(Table::new(
        "Switchover-ack effect (ratio off ÷ on)",
        &[
            "link",
            "downtime off",
            "downtime on",
            "ratio",
            "gap off",
            "gap on",
            "gap ratio",
            "reference",
        ],
    ));
    if ctx.bins.tern.is_none() {
        return report.write(&ctx.out);
    }
    let has_device = ctx.bins.tern.as_ref().is_some_and(|t| {
        std::process::Command::new(t)
            .args(["run", "--help"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("--device"))
            .unwrap_or(false)
    });
    if !has_device {
        report
            .notes
            .push("This tern binary has no `run --device`: state-device rows skipped.".into());
    }
    let links = [Link::measured_loopback(1.0), Link::shaped(1000)];
    for link in &links {
        let _ns = match link.src_ns {
            Some(_) => Some(Netns::up(&ctx.repo, "1gbit")?),
            None => None,
        };
        let mut results = Vec::new();
        for v in VARIANTS {
            if !ctx.selected(&format!("{} {}", link.name, v.name)) || (v.device && !has_device) {
                results.push(None);
                continue;
            }
            tracing::info!("switchover-ack: {}, {}", link.name, v.name);
            let p = MigParams {
                caps: v.caps.iter().map(|c| c.to_string()).collect(),
                downtime_limit_ms: DOWNTIME_LIMIT_MS,
                max_bandwidth: link.max_bandwidth,
                timeout_s: ctx.timeout_s,
                multifd_channels: None,
            };
            let device = v.device.then(|| DEVICE.to_string());
            let out = migrate_pair(ctx, link, &guest, Kind::Tern, 1, device, &p, "swack");
            let row = vec![
                link.name.clone(),
                v.name.into(),
                secs(out.total_ms.map(|t| t / 1e3)),
                ms(out.downtime_ms),
                ms(out.hb_gap_ms),
                mib(out.transferred),
                result_cell(&out),
            ];
            tracing::info!("  -> {}", row.join(" | "));
            report.tables[0].rows.push(row);
            report.runs.push(json!({
                "link": link, "variant": v.name, "params": p, "outcome": out,
            }));
            results.push(Some(out));
            report.write(&ctx.out)?;
        }
        let get = |i: usize, f: fn(&crate::migrate::Outcome) -> Option<f64>| {
            results.get(i).and_then(|o| o.as_ref()).and_then(f)
        };
        let (d_off, d_on) = (get(1, |o| o.downtime_ms), get(2, |o| o.downtime_ms));
        let (g_off, g_on) = (get(1, |o| o.hb_gap_ms), get(2, |o| o.hb_gap_ms));
        let div =
            |a: Option<f64>, b: Option<f64>| a.zip(b).filter(|(_, b)| *b > 0.0).map(|(a, b)| a / b);
        report.tables[1].rows.push(vec![
            link.name.clone(),
            ms(d_off),
            ms(d_on),
            ratio(div(d_off, d_on)),
            ms(g_off),
            ms(g_on),
            ratio(div(g_off, g_on)),
            "4.5x (1900 → 420 ms)".into(),
        ]);
    }
    report.write(&ctx.out)
}
