//! Return path, switchover-ack and pause-before-switchover on real KVM guests in real `tern`
//! processes (QEMU's `precopy/tcp/plain/switchover-ack` and more: a device that needs the ACK,
//! a destination that never gives it, capability mismatches).

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tern::harness::{incoming_port, num, status, TernProcess};

const T: Duration = Duration::from_secs(60);

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_tern"))
}

fn machine(extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "--memory",
        "256M",
        "--vcpus",
        "1",
        "--workload",
        "pattern",
        "--work-mem",
        "32",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn spawn(dir: &Path, name: &str, args: &[String]) -> TernProcess {
    TernProcess::spawn(name, exe(), &dir.join(format!("{name}.qmp")), args, None)
        .unwrap_or_else(|e| panic!("spawning {name}: {e:#}"))
}

/// Source (running, first heartbeat seen) and destination (`--incoming defer`, listening on
/// TCP), both with `caps`. Returns the migration URI.
fn pair(
    dir: &Path,
    src_extra: &[&str],
    dst_extra: &[&str],
    src_caps: &[(&str, bool)],
    dst_caps: &[(&str, bool)],
) -> (TernProcess, TernProcess, String) {
    let mut src = spawn(dir, "src", &machine(src_extra));
    src.wait_workload_running(T).expect("source workload runs");
    let mut dargs = machine(dst_extra);
    dargs.extend(["--incoming".to_string(), "defer".to_string()]);
    let mut dst = spawn(dir, "dst", &dargs);
    src.set_caps(src_caps).expect("source caps");
    dst.set_caps(dst_caps).expect("destination caps");
    src.cmd(
        "migrate-set-parameters",
        json!({"max-bandwidth": 4u64 << 30}),
    )
    .expect("parameters");
    // These tests inspect destinations whose migration failed: keep them up.
    dst.cmd(
        "migrate-incoming",
        json!({"uri": "tcp:127.0.0.1:0", "exit-on-error": false}),
    )
    .expect("migrate-incoming");
    let port = incoming_port(&dst.query_migrate().expect("query")).expect("port");
    (src, dst, format!("tcp:127.0.0.1:{port}"))
}

/// Waits for a `MIGRATION` event with one of `want` (the `events` capability is on).
fn wait_status(p: &mut TernProcess, want: &[&str]) -> String {
    let deadline = Instant::now() + T;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no MIGRATION {want:?}; log:\n{}", p.log());
        let ev = p
            .qmp
            .wait_event("MIGRATION", left)
            .expect("MIGRATION event");
        let st = ev["data"]["status"].as_str().unwrap_or("").to_string();
        if want.contains(&st.as_str()) {
            return st;
        }
    }
}

const ACK_CAPS: &[(&str, bool)] = &[
    ("events", true),
    ("return-path", true),
    ("switchover-ack", true),
];

fn check_pattern(dst: &mut TernProcess, dir: &Path) {
    dst.cmd("stop", json!({})).expect("stop");
    let dump = dir.join("dst.dump");
    dst.cmd(
        "pmemsave",
        json!({"val": 0, "size": 256u64 << 20, "filename": dump.display().to_string()}),
    )
    .expect("pmemsave");
    let mem = std::fs::read(&dump).expect("dump");
    let r =
        tern_guest::pattern::check_dump(&mem, 0).unwrap_or_else(|e| panic!("pattern dump: {e}"));
    assert!(r.is_ok(), "destination memory inconsistent: {r:?}");
}

#[test]
fn switchover_ack_without_a_device_completes() {
    let dir = tempfile::tempdir().unwrap();
    let (mut src, mut dst, uri) = pair(dir.path(), &[], &[], ACK_CAPS, ACK_CAPS);
    src.cmd("migrate", json!({ "uri": uri })).expect("migrate");
    assert_eq!(wait_status(&mut src, &["completed", "failed"]), "completed");
    let q = src.query_migrate().unwrap();
    // Nobody on the destination needs the ACK: it is sent as soon as the return path opens.
    assert_eq!(q["x-tern-switchover-ack"]["acked"], json!(true), "{q}");
    let (last, _) = src.last_heartbeat().unwrap();
    dst.wait_heartbeat_after(last, T)
        .expect("guest runs on the destination");
    check_pattern(&mut dst, dir.path());
}

#[test]
fn device_initial_data_is_acked_and_state_arrives_identical() {
    let dir = tempfile::tempdir().unwrap();
    let dev = ["--device", "statedev,size=16M,setup-ms=300"];
    let (mut src, mut dst, uri) = pair(dir.path(), &dev, &dev, ACK_CAPS, ACK_CAPS);
    src.cmd("migrate", json!({ "uri": uri })).expect("migrate");
    assert_eq!(wait_status(&mut src, &["completed", "failed"]), "completed");
    let q = src.query_migrate().unwrap();
    assert_eq!(q["x-tern-switchover-ack"]["acked"], json!(true), "{q}");
    let s = src.cmd("x-tern-statedev", json!({})).unwrap();
    let d = dst.cmd("x-tern-statedev", json!({})).unwrap();
    let (s, d) = (&s["devices"][0], &d["devices"][0]);
    assert_eq!(s["init-done-sent"], json!(true), "{s}");
    assert_eq!(d["prep-finished"], json!(true), "{d}");
    assert!(s["switch-digest"].is_u64(), "{s}");
    assert_eq!(
        s["switch-digest"], d["digest"],
        "device state differs: source at the switch {s}, destination {d}"
    );
    let (last, _) = src.last_heartbeat().unwrap();
    dst.wait_heartbeat_after(last, T)
        .expect("guest runs on the destination");
}

#[test]
fn destination_that_never_acks_keeps_the_source_iterating_until_cancel() {
    let dir = tempfile::tempdir().unwrap();
    let dev = ["--device", "statedev,size=8M"];
    let hang = ["--device", "statedev,size=8M,hang=on"];
    let (mut src, mut dst, uri) = pair(dir.path(), &dev, &hang, ACK_CAPS, ACK_CAPS);
    src.cmd("migrate", json!({ "uri": uri })).expect("migrate");
    // Everything fits long before the ACK, which never comes: the source keeps iterating.
    let mut passes = 0;
    while passes < 5 {
        let ev = src
            .qmp
            .wait_event("MIGRATION_PASS", T)
            .expect("passes go on");
        passes = num(&ev["data"], "pass");
    }
    let q = src.query_migrate().unwrap();
    assert_eq!(status(&q), "active", "{q}");
    assert_eq!(q["x-tern-switchover-ack"]["acked"], json!(false), "{q}");
    let st = src.cmd("query-status", json!({})).unwrap();
    assert_eq!(st["status"], "running");
    let (last, _) = src.last_heartbeat().unwrap();
    src.wait_heartbeat_after(last, T)
        .expect("the guest keeps running");

    src.cmd("migrate_cancel", json!({})).unwrap();
    assert_eq!(wait_status(&mut src, &["cancelled", "failed"]), "cancelled");
    let (last, _) = src.last_heartbeat().unwrap();
    src.wait_heartbeat_after(last, T)
        .expect("runs after the cancel");
    let deadline = Instant::now() + T;
    while status(&dst.query_migrate().unwrap()) != "failed" {
        assert!(Instant::now() < deadline, "destination did not fail");
        let _ = dst.qmp.wait_event("MIGRATION", Duration::from_millis(200));
    }
    drop(dst);

    // A later migration of the same source, to a destination that acks, succeeds.
    let mut dargs = machine(&dev);
    dargs.extend(["--incoming".to_string(), "defer".to_string()]);
    let mut dst2 = spawn(dir.path(), "dst2", &dargs);
    dst2.set_caps(ACK_CAPS).unwrap();
    dst2.cmd("migrate-incoming", json!({"uri": "tcp:127.0.0.1:0"}))
        .unwrap();
    let port = incoming_port(&dst2.query_migrate().unwrap()).unwrap();
    src.cmd("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}))
        .unwrap();
    assert_eq!(wait_status(&mut src, &["completed", "failed"]), "completed");
    let (last, _) = src.last_heartbeat().unwrap();
    dst2.wait_heartbeat_after(last, T)
        .expect("runs on the new destination");
}

#[test]
fn switchover_ack_requires_return_path() {
    let dir = tempfile::tempdir().unwrap();
    let mut src = spawn(dir.path(), "src", &machine(&[]));
    let e = src
        .cmd_err(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "switchover-ack", "state": true}]}),
        )
        .unwrap();
    assert!(e.contains("requires capability 'return-path'"), "{e}");
    let caps = src.cmd("query-migrate-capabilities", json!({})).unwrap();
    let on = caps
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["capability"] == "switchover-ack" && c["state"] == json!(true));
    assert!(!on, "refused capability was set anyway: {caps}");
}

#[test]
fn switchover_ack_on_one_side_only_fails_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let without: &[(&str, bool)] = &[("events", true), ("return-path", true)];
    for (src_caps, dst_caps) in [(ACK_CAPS, without), (without, ACK_CAPS)] {
        let sub = dir.path().join(format!("{}", src_caps.len()));
        std::fs::create_dir_all(&sub).unwrap();
        let (mut src, mut dst, uri) = pair(&sub, &[], &[], src_caps, dst_caps);
        src.cmd("migrate", json!({ "uri": uri })).expect("migrate");
        assert_eq!(wait_status(&mut src, &["completed", "failed"]), "failed");
        let q = src.query_migrate().unwrap();
        let e = q["error-desc"].as_str().unwrap_or("");
        assert!(
            e.contains("switchover-ack") && e.contains("both sides"),
            "source error-desc does not say why: {q}"
        );
        // The destination reports `failed` once the source, having read its ERROR, closed.
        assert_eq!(wait_status(&mut dst, &["failed"]), "failed");
        let (last, _) = src.last_heartbeat().unwrap();
        src.wait_heartbeat_after(last, T)
            .expect("source keeps running");
        assert_eq!(
            src.cmd("query-status", json!({})).unwrap()["status"],
            "running"
        );
    }
}

fn pause_before_switchover_pair(dir: &Path) -> (TernProcess, TernProcess, String) {
    let caps = [
        ("events", true),
        ("return-path", true),
        ("pause-before-switchover", true),
    ];
    let dcaps = [("events", true), ("return-path", true)];
    pair(dir, &[], &[], &caps, &dcaps)
}

#[test]
fn pause_before_switchover_waits_for_migrate_continue() {
    let dir = tempfile::tempdir().unwrap();
    let (mut src, mut dst, uri) = pause_before_switchover_pair(dir.path());
    let e = src
        .cmd_err("migrate-continue", json!({"state": "pre-switchover"}))
        .unwrap();
    assert!(e.contains("not in expected state"), "{e}");
    src.cmd("migrate", json!({ "uri": uri })).unwrap();
    assert_eq!(wait_status(&mut src, &["pre-switchover"]), "pre-switchover");
    assert_eq!(status(&src.query_migrate().unwrap()), "pre-switchover");
    let st = src.cmd("query-status", json!({})).unwrap();
    assert_eq!(
        st["running"],
        json!(false),
        "vCPUs stop before pre-switchover: {st}"
    );
    src.cmd("migrate-continue", json!({"state": "pre-switchover"}))
        .unwrap();
    assert_eq!(wait_status(&mut src, &["device"]), "device");
    assert_eq!(wait_status(&mut src, &["completed", "failed"]), "completed");
    let (last, _) = src.last_heartbeat().unwrap();
    dst.wait_heartbeat_after(last, T)
        .expect("runs on the destination");
    check_pattern(&mut dst, dir.path());
}

#[test]
fn cancel_in_pre_switchover_leaves_the_source_running() {
    let dir = tempfile::tempdir().unwrap();
    let (mut src, mut dst, uri) = pause_before_switchover_pair(dir.path());
    src.cmd("migrate", json!({ "uri": uri })).unwrap();
    assert_eq!(wait_status(&mut src, &["pre-switchover"]), "pre-switchover");
    src.cmd("migrate_cancel", json!({})).unwrap();
    assert_eq!(wait_status(&mut src, &["cancelled"]), "cancelled");
    let st: Value = src.cmd("query-status", json!({})).unwrap();
    assert_eq!(st["status"], "running", "{st}");
    let (last, _) = src.last_heartbeat().unwrap();
    src.wait_heartbeat_after(last, T)
        .expect("source runs after the cancel");
    let deadline = Instant::now() + T;
    while status(&dst.query_migrate().unwrap()) != "failed" {
        assert!(Instant::now() < deadline, "destination did not fail");
        let _ = dst.qmp.wait_event("MIGRATION", Duration::from_millis(200));
    }
}
