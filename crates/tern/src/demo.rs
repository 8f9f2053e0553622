//! `tern demo`, the main job: boot the test guest in one `tern run` process, live-migrate it to a
//! second one over TCP on this machine, and print what happened: total time, downtime, the gap
//! in the guest's heartbeats as the host saw it, bytes sent, dirty passes, and the `pattern`
//! check of the destination's memory.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use crate::harness::{incoming_port, num, status, TernProcess};
use crate::size::parse_size;

/// `tern demo` options.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Guest RAM.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub memory: u64,
    /// vCPUs (each runs its share of the workload).
    #[arg(long, default_value_t = 2)]
    pub vcpus: u32,
    /// Workload: pattern (checked after the migration), dirty or idle.
    #[arg(long, default_value = "pattern")]
    pub workload: String,
    /// Working set in MiB.
    #[arg(long, default_value_t = 256)]
    pub work_mem: u64,
    /// Dirty rate in MiB/s (dirty workload; 0 = as fast as possible).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Transport: tcp (127.0.0.1) or unix.
    #[arg(long, default_value = "tcp")]
    pub transport: String,
    /// downtime-limit in ms (QEMU's default: 300).
    #[arg(long, default_value_t = 300)]
    pub downtime_limit: u64,
    /// max-bandwidth in MiB/s for pre-copy (QEMU's default is 128; loopback can do far more).
    #[arg(long, default_value_t = 4096)]
    pub max_bandwidth: u64,
    /// Directory for sockets, serial logs and the memory dump (default: a fresh temp dir).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
}

/// Runs the demo.
pub fn demo(a: &DemoArgs) -> Result<()> {
    let dir = match &a.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => std::env::temp_dir().join(format!("tern-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir)?;
    let exe = std::env::current_exe().context("locating the tern binary")?;
    let machine = vec![
        "--memory".to_string(),
        format!("{}M", a.memory >> 20),
        "--vcpus".into(),
        a.vcpus.to_string(),
        "--workload".into(),
        a.workload.clone(),
        "--work-mem".into(),
        a.work_mem.to_string(),
        "--rate".into(),
        a.rate.to_string(),
    ];
    let mut src_args = machine.clone();
    src_args.extend([
        "--serial".into(),
        format!("file:{}", dir.join("src.serial").display()),
    ]);
    let mut dst_args = machine;
    dst_args.extend([
        "--serial".into(),
        format!("file:{}", dir.join("dst.serial").display()),
        "--incoming".into(),
        "defer".into(),
    ]);

    println!(
        "tern demo: {} MiB guest, {} vCPU(s), workload {} over {} MiB, migrating over {}",
        a.memory >> 20,
        a.vcpus,
        a.workload,
        a.work_mem,
        a.transport
    );
    let t_boot = Instant::now();
    let mut src = TernProcess::spawn("source", &exe, &dir.join("src.qmp"), &src_args, None)?;
    let (seq0, _) = src.wait_heartbeat_after(0, Duration::from_secs(20))?;
    println!(
        "source: guest running (first heartbeat #{seq0} after {:.0} ms)",
        t_boot.elapsed().as_secs_f64() * 1e3
    );
    src.wait_workload_running(Duration::from_secs(60))?;
    let mut dst = TernProcess::spawn("destination", &exe, &dir.join("dst.qmp"), &dst_args, None)?;

    let caps = [("events", true), ("return-path", true)];
    src.set_caps(&caps)?;
    dst.set_caps(&caps)?;
    src.cmd(
        "migrate-set-parameters",
        json!({"downtime-limit": a.downtime_limit, "max-bandwidth": a.max_bandwidth << 20}),
    )?;
    let uri = match a.transport.as_str() {
        "tcp" => {
            dst.cmd("migrate-incoming", json!({"uri": "tcp:127.0.0.1:0"}))?;
            let q = dst.query_migrate()?;
            let port = incoming_port(&q).context("destination reported no port")?;
            format!("tcp:127.0.0.1:{port}")
        }
        "unix" => {
            let p = dir.join("migration.sock");
            let _ = std::fs::remove_file(&p);
            let uri = format!("unix:{}", p.display());
            dst.cmd("migrate-incoming", json!({ "uri": uri }))?;
            uri
        }
        other => bail!("--transport {other}: expected tcp or unix"),
    };

    // Let the workload run a moment so the migration sees a live, dirtying guest.
    src.wait_heartbeat_after(seq0 + 200, Duration::from_secs(10))?;
    src.cmd("migrate", json!({ "uri": uri }))?;
    let pb = ProgressBar::new(a.memory);
    pb.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {bytes}/{total_bytes} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let t0 = Instant::now();
    let q = loop {
        let q = src.query_migrate()?;
        let ram = q.get("ram").cloned().unwrap_or(Value::Null);
        pb.set_length(num(&ram, "total").max(1));
        pb.set_position(num(&ram, "transferred").min(num(&ram, "total")));
        pb.set_message(format!(
            "{} pass {} {:.0} Mbit/s",
            status(&q),
            num(&ram, "dirty-sync-count"),
            ram.get("mbps").and_then(Value::as_f64).unwrap_or(0.0)
        ));
        match status(&q) {
            "completed" | "failed" | "cancelled" | "x-tern-unconfirmed" => break q,
            _ => {}
        }
        if t0.elapsed() > Duration::from_secs(a.timeout) {
            src.cmd("migrate_cancel", json!({}))?;
            pb.finish_and_clear();
            bail!(
                "migration did not complete within {} s; cancelled",
                a.timeout
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    pb.finish_and_clear();
    if status(&q) != "completed" {
        bail!(
            "migration {}: {}",
            status(&q),
            q.get("error-desc").and_then(Value::as_str).unwrap_or("?")
        );
    }

    let (last_src_seq, last_src_ns) = src.last_heartbeat()?;
    let (first_dst_seq, first_dst_ns) =
        dst.wait_heartbeat_after(last_src_seq, Duration::from_secs(10))?;
    let gap_ms = first_dst_ns.saturating_sub(last_src_ns) as f64 / 1e6;
    if std::env::var_os("TERN_DEMO_DEBUG").is_some() {
        let tail = src.heartbeats_since(last_src_seq.saturating_sub(8))?;
        let head = dst.heartbeats_since(last_src_seq)?;
        let t0 = last_src_ns;
        let fmt = |v: &[(u64, u64)]| {
            v.iter()
                .take(8)
                .map(|(s, n)| format!("#{s}@{:+.2}ms", (*n as f64 - t0 as f64) / 1e6))
                .collect::<Vec<_>>()
                .join(" ")
        };
        println!("  source beats:      {}", fmt(&tail));
        println!("  destination beats: {}", fmt(&head));
    }
    let ram = q.get("ram").cloned().unwrap_or(Value::Null);
    let src_state = src.cmd("query-status", json!({}))?;
    let dst_state = dst.cmd("query-status", json!({}))?;

    println!("migration completed");
    println!("  total time          {} ms", num(&q, "total-time"));
    println!(
        "  downtime            {} ms (source pause -> destination resume)",
        num(&q, "downtime")
    );
    println!(
        "  heartbeat gap       {gap_ms:.1} ms (host clock: last beat #{last_src_seq} on the source, next #{first_dst_seq} on the destination)"
    );
    println!(
        "  bytes sent          {} ({} normal pages, {} zero pages)",
        num(&ram, "transferred"),
        num(&ram, "normal"),
        num(&ram, "duplicate")
    );
    println!("  dirty passes        {}", num(&ram, "dirty-sync-count"));
    if let Some(b) = q.get("x-tern-downtime-breakdown") {
        println!(
            "  downtime breakdown  pause {} us, final RAM {} us ({} bytes), device state {} us, flush {} us, destination load+resume {} us",
            num(b, "pause-us"),
            num(b, "final-ram-us"),
            num(b, "final-ram-bytes"),
            num(b, "device-state-us"),
            num(b, "end-flush-us"),
            num(b, "destination-us")
        );
    }
    println!(
        "  throughput          {:.0} Mbit/s",
        ram.get("mbps").and_then(Value::as_f64).unwrap_or(0.0)
    );
    println!(
        "  source / destination  {} / {}",
        status_str(&src_state),
        status_str(&dst_state)
    );
    if first_dst_seq != last_src_seq + 1 {
        println!(
            "  note: heartbeat sequence jumped from #{last_src_seq} to #{first_dst_seq} (missed beats while the guest was stopped)"
        );
    }

    let mut ok = true;
    if a.workload == "pattern" {
        dst.cmd("stop", json!({}))?;
        let dump = dir.join("dst-memory.dump");
        dst.cmd(
            "pmemsave",
            json!({"val": 0, "size": a.memory, "filename": dump.display().to_string()}),
        )?;
        let mem = std::fs::read(&dump)?;
        let report = tern_guest::pattern::check_dump(&mem, 0)?;
        println!(
            "  {}",
            crate::tools::describe_report(&report).replace('\n', "\n  ")
        );
        ok = report.is_ok();
        let _ = std::fs::remove_file(&dump);
    }
    src.quit()?;
    dst.quit()?;
    if !ok {
        bail!("the destination's memory failed the pattern check");
    }
    if a.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

fn status_str(v: &Value) -> &str {
    v.get("status").and_then(Value::as_str).unwrap_or("?")
}
