//! `x-tern-liveness-timeout` with real `tern run` processes (issue 8 §3): a peer that is
//! SIGSTOPped, or a link between two network namespaces that goes down, fails the migration by
//! itself within a bounded time; the source runs on, the destination gives up and never runs.
//! A healthy migration with long idle waits (a slow device's switchover ACK, a long
//! pre-switchover window) still completes with the same short limit.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tern::harness::{incoming_port, status};

/// The short limit of these tests, ms (default: 10000).
const LIMIT_MS: u64 = 1500;
/// Bound on noticing a dead peer: the limit, plus the time to fill the socket buffers (16 MiB
/// each way) at the stuck migration's 3 MB/s, with a wide margin for a busy machine.
const NOTICE: Duration = Duration::from_secs(90);
const CAPS: &[(&str, bool)] = &[("events", true), ("return-path", true)];

fn set_limit(vm: &mut Vm) {
    vm.params(json!({ "x-tern-liveness-timeout": LIMIT_MS }));
    let p = vm.c("query-migrate-parameters", json!({}));
    assert_eq!(p["x-tern-liveness-timeout"], json!(LIMIT_MS), "{p}");
}

/// `kill -SIG PID`.
fn signal(vm: &Vm, sig: &str) {
    let st = Command::new("kill")
        .args([sig, &vm.pid().to_string()])
        .status()
        .expect("running kill");
    assert!(st.success(), "kill {sig} {}: {st}", vm.pid());
}

/// Whether `desc` is one of the liveness texts (the limit expired, or the kernel's
/// `TCP_USER_TIMEOUT` ended the connection), not some other I/O error.
fn is_inactivity(desc: &str) -> bool {
    desc.contains("or the link is gone")
        && (desc.contains(&format!("for {LIMIT_MS} ms")) || desc.contains("timed out"))
}

/// Waits until the source has sent `bytes` (paced by its heartbeats, no sleeping).
fn wait_transferred(src: &mut Vm, bytes: u64) {
    let deadline = Instant::now() + T;
    let mut seq = src.last_seq();
    loop {
        let q = src.qm();
        if ram_num(&q, "transferred") >= bytes {
            return;
        }
        assert_eq!(status(&q), "active", "{q}");
        assert!(Instant::now() < deadline, "no pre-copy progress: {q}");
        seq = src.hb_after(seq + 10, T);
    }
}

/// Waits until the destination gave up on its incoming migration by itself: `failed` with the
/// process still up, or the process ended (`exit-on-error`). Returns the reason: `error-desc`,
/// or the process log (the error is on stderr). Woken by `MIGRATION` events, not by sleeping.
fn wait_gave_up(dst: &mut Vm, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        if dst.try_exited().is_some() {
            return dst.log();
        }
        match dst.cmd("query-migrate", json!({})) {
            Ok(q) if status(&q) == "failed" => return error_desc(&q),
            Ok(q) => assert_ne!(status(&q), "completed", "{q}"),
            // The connection closed: the process is exiting.
            Err(_) => return dst.log(),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "{}: did not give up within {within:?}; log:\n{}",
            dst.name,
            dst.log()
        );
        let _ = dst.qmp.wait_event("MIGRATION", left);
    }
}

/// A destination that gave up never ran the guest (if it is still up, it is not running).
fn assert_never_ran(dst: &mut Vm) {
    if dst.try_exited().is_none() {
        if let Ok(st) = dst.cmd("query-status", json!({})) {
            assert_ne!(st["status"], "running", "{}: {st}", dst.name);
        }
    }
}

/// Source (dirty guest, running) and destination with the short limit, a TCP migration that
/// cannot converge (pre-copy goes on at 3 MB/s), both `active` and some data sent.
fn stuck_migration(dir: &std::path::Path) -> (Vm, Vm) {
    let m = Machine::dirty(1, 32, 32);
    let mut src = boot(dir, "src", &m);
    src.wait_workload_running(T);
    let mut dst = dest(dir, "dst", &m);
    set_limit(&mut src);
    set_limit(&mut dst);
    start_tcp_migration(&mut src, &mut dst, CAPS, true);
    src.wait_mig(&["active"], T);
    dst.wait_mig(&["active"], T);
    wait_transferred(&mut src, 8 << 20);
    (src, dst)
}

#[test]
fn sigstopped_destination_fails_the_source_which_runs_on() {
    let dir = tmpdir();
    let (mut src, mut dst) = stuck_migration(dir.path());
    signal(&dst, "-STOP");
    let stopped = Instant::now();
    let q = src.wait_mig(&["failed"], NOTICE);
    let desc = error_desc(&q);
    eprintln!(
        "source failed {:?} after the SIGSTOP: {desc}",
        stopped.elapsed()
    );
    assert!(is_inactivity(&desc), "source error-desc: {desc}");
    assert!(desc.contains("destination"), "{desc}");
    assert_source_runs_on(&mut src);
    // The destination wakes up to a source that is gone: it fails and never runs.
    signal(&dst, "-CONT");
    let why = wait_gave_up(&mut dst, NOTICE);
    eprintln!("destination after SIGCONT: {why}");
    assert!(!why.is_empty());
    assert_never_ran(&mut dst);
    src.quit_ok();
}

#[test]
fn sigstopped_source_makes_the_destination_give_up() {
    let dir = tmpdir();
    let (mut src, mut dst) = stuck_migration(dir.path());
    signal(&src, "-STOP");
    let stopped = Instant::now();
    let why = wait_gave_up(&mut dst, NOTICE);
    eprintln!(
        "destination gave up {:?} after the SIGSTOP",
        stopped.elapsed()
    );
    assert!(
        why.contains("no data from the source for 1500 ms: the source or the link is gone"),
        "destination: {why}"
    );
    assert_never_ran(&mut dst);
    // The source, woken, finds its destination gone: it fails and runs on.
    signal(&src, "-CONT");
    let q = src.wait_mig(&["failed"], NOTICE);
    eprintln!("source after SIGCONT: {}", error_desc(&q));
    assert!(!error_desc(&q).is_empty(), "{q}");
    assert_source_runs_on(&mut src);
    src.quit_ok();
}

/// Two network namespaces joined by a veth pair (as `scripts/netns.sh`, with names of this
/// test's own so that parallel tests and benchmarks do not collide); removed when dropped,
/// also when the test fails.
struct Netns {
    src: String,
    dst: String,
    src_if: String,
}

const SRC_ADDR: &str = "10.78.0.1";
const DST_ADDR: &str = "10.78.0.2";

fn ip(args: &[&str]) -> Result<(), String> {
    let o = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}: {}",
            args.join(" "),
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ))
    }
}

impl Netns {
    /// `None` (after saying why) when this host cannot create namespaces.
    fn up() -> Option<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        let tag = format!("{}{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst));
        let net = Self {
            src: format!("tern-lv{tag}-s"),
            dst: format!("tern-lv{tag}-d"),
            src_if: format!("lv{tag}s"),
        };
        if let Err(e) = ip(&["netns", "add", &net.src]) {
            eprintln!("skipping: network namespaces are not available here ({e})");
            return None;
        }
        let dst_if = format!("lv{tag}d");
        let steps: Vec<Vec<&str>> = vec![
            vec!["netns", "add", &net.dst],
            vec![
                "link",
                "add",
                &net.src_if,
                "netns",
                &net.src,
                "type",
                "veth",
                "peer",
                "name",
                &dst_if,
                "netns",
                &net.dst,
            ],
            vec![
                "-n",
                &net.src,
                "addr",
                "add",
                "10.78.0.1/24",
                "dev",
                &net.src_if,
            ],
            vec![
                "-n",
                &net.dst,
                "addr",
                "add",
                "10.78.0.2/24",
                "dev",
                &dst_if,
            ],
            vec!["-n", &net.src, "link", "set", "lo", "up"],
            vec!["-n", &net.dst, "link", "set", "lo", "up"],
            vec!["-n", &net.src, "link", "set", &net.src_if, "up"],
            vec!["-n", &net.dst, "link", "set", &dst_if, "up"],
        ];
        for step in steps {
            if let Err(e) = ip(&step) {
                panic!("setting up the namespaces: {e}");
            }
        }
        Some(net)
    }

    /// Sets the source end of the link up or down (a down end takes the pair's carrier down).
    fn set_link(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        if let Err(e) = ip(&["-n", &self.src, "link", "set", &self.src_if, state]) {
            panic!("{e}");
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in [&self.src, &self.dst] {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

#[test]
fn link_down_between_namespaces_fails_both_sides() {
    // Declared first, dropped last: the processes inside are killed before the namespaces go.
    let Some(net) = Netns::up() else {
        return;
    };
    let dir = tmpdir();
    let m = Machine::dirty(1, 32, 32);
    let mut src = spawn_in(dir.path(), "src", &m.args(), Some(&net.src));
    src.hb_after(0, T);
    src.wait_workload_running(T);
    let dargs = dest_args(m.memory_mib, m.vcpus, &[]);
    let mut dst = spawn_in(dir.path(), "dst", &dargs, Some(&net.dst));
    set_limit(&mut src);
    set_limit(&mut dst);
    src.caps(CAPS);
    dst.caps(CAPS);
    non_converge(&mut src);
    dst.c(
        "migrate-incoming",
        json!({ "uri": format!("tcp:{DST_ADDR}:0") }),
    );
    let q = dst.qm();
    let port = incoming_port(&q).unwrap_or_else(|| panic!("no port in {q}"));
    src.c(
        "migrate",
        json!({ "uri": format!("tcp:{DST_ADDR}:{port}") }),
    );
    src.wait_mig(&["active"], T);
    dst.wait_mig(&["active"], T);
    wait_transferred(&mut src, 1 << 20);

    net.set_link(false);
    let down = Instant::now();
    let q = src.wait_mig(&["failed"], NOTICE);
    let desc = error_desc(&q);
    eprintln!(
        "source {SRC_ADDR} failed {:?} after the link went down: {desc}",
        down.elapsed()
    );
    assert!(!desc.is_empty(), "{q}");
    assert_source_runs_on(&mut src);
    // The destination gives up while the link is still down.
    let why = wait_gave_up(&mut dst, NOTICE);
    eprintln!(
        "destination {DST_ADDR} gave up {:?} after the link went down",
        down.elapsed()
    );
    assert!(
        why.contains("no data from the source for 1500 ms: the source or the link is gone"),
        "destination: {why}"
    );
    net.set_link(true);
    assert_never_ran(&mut dst);
    src.quit_ok();
}

#[test]
fn pre_switchover_window_longer_than_the_limit_completes() {
    let dir = tmpdir();
    let m = Machine::idle(8);
    let mut src = boot(dir.path(), "src", &m);
    let mut dst = dest(dir.path(), "dst", &m);
    set_limit(&mut src);
    set_limit(&mut dst);
    src.caps(&[("pause-before-switchover", true)]);
    converge(&mut src);
    start_tcp_migration(&mut src, &mut dst, CAPS, false);
    src.wait_mig(&["pre-switchover"], MIGRATION_TIMEOUT);
    // The thing under test is a pre-switchover window longer than 3 limits (the operator has
    // not sent migrate-continue yet): hold it open. Nothing but the source's keepalive PINGs
    // and the destination's PONGs cross the link meanwhile.
    std::thread::sleep(Duration::from_millis(4 * LIMIT_MS));
    assert_eq!(dst.mig_status(), "active", "destination during the window");
    assert_eq!(
        src.mig_status(),
        "pre-switchover",
        "source during the window"
    );
    src.c("migrate-continue", json!({"state": "pre-switchover"}));
    src.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    dst.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    assert_handover(&mut src, &mut dst);
    dst.quit_ok();
    src.quit_ok();
}

#[test]
fn switchover_ack_from_a_slow_device_completes() {
    let dir = tmpdir();
    // The destination's device takes 3 limits to prepare: the source has the ACK to wait for.
    let m = Machine::idle(8).arg("--device").arg("statedev,size=8M");
    let mut src = boot(dir.path(), "src", &m);
    let mut dst = dest_with(
        dir.path(),
        "dst",
        m.memory_mib,
        m.vcpus,
        &["--device", "statedev,size=8M,setup-ms=4500"],
    );
    set_limit(&mut src);
    set_limit(&mut dst);
    converge(&mut src);
    let caps = [CAPS, &[("switchover-ack", true)]].concat();
    start_tcp_migration(&mut src, &mut dst, &caps, false);
    let q = src.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    assert_eq!(q["x-tern-switchover-ack"]["acked"], json!(true), "{q}");
    dst.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    assert_handover(&mut src, &mut dst);
    dst.quit_ok();
    src.quit_ok();
}
