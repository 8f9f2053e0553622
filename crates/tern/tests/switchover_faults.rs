//! The switchover decision under faults, with real `tern run` processes: the stream cut at the
//! very end, the return path closed or silent after END, a destination killed after END, a
//! destination started paused (`-S`), and a migration without a return path. For each, after
//! the documented resolution (`docs/migration-engine.md` §5), exactly one side runs the guest,
//! never both, and the pattern check passes on that side.

mod common;

use std::time::{Duration, Instant};

use common::proxy::{Fault, FaultProxy};
use common::*;
use serde_json::json;

/// libvirt's capabilities: the source hears the destination.
const CAPS: [(&str, bool); 2] = [("events", true), ("return-path", true)];

/// A running `pattern` source with `CAPS` and QEMU's "converge" limits.
fn source(dir: &std::path::Path, name: &str, m: &Machine) -> Vm {
    let mut s = boot(dir, name, m);
    s.wait_workload_running(T);
    s.caps(&CAPS);
    converge(&mut s);
    s
}

/// A fresh destination listening on TCP with QEMU's default `exit-on-error` (a failed
/// destination exits); returns it and its URI.
fn destination(dir: &std::path::Path, name: &str, m: &Machine, extra: &[&str]) -> (Vm, String) {
    let mut d = dest_with(dir, name, m.memory_mib, m.vcpus, extra);
    d.caps(&CAPS);
    let uri = d.listen_tcp_with(None);
    (d, uri)
}

/// Waits for `x-tern-unconfirmed` on `src` and checks where it stands: paused in
/// `postmigrate`, no heartbeat, an `error-desc` naming `why` and saying what to do.
fn assert_unconfirmed(src: &mut Vm, why: &str) -> String {
    let q = src.wait_mig(&["x-tern-unconfirmed"], MIGRATION_TIMEOUT);
    let e = error_desc(&q);
    assert!(e.contains(why), "error-desc does not say '{why}': {q}");
    assert!(
        e.contains("`cont` here resumes the guest")
            && e.contains("`migrate` to another destination"),
        "error-desc does not say what to do: {e}"
    );
    assert_eq!(src.run_status(), "postmigrate", "{q}");
    let last = src.last_seq();
    src.assert_no_hb_after(last, Duration::from_millis(200));
    e
}

/// What a destination whose stream was cut says (a clean end of input, or a reset when the
/// proxy's socket closed with data unread).
const CUT: &[&str] = &["truncated", "reset"];

/// `d` exited by itself with a failure status (`exit-on-error`), its stderr giving the error
/// (one of `words`).
fn assert_exited_with(d: &mut Vm, words: &[&str]) {
    let (st, log) = d.wait_gone(T);
    assert!(!st.success(), "{}: exit status {st}", d.name);
    assert!(
        log.contains("incoming migration failed") && words.iter().any(|w| log.contains(w)),
        "{}: stderr does not give the error ({words:?}):\n{log}",
        d.name
    );
}

/// Exactly one copy runs: `running` runs the guest (query-status, heartbeats advance),
/// `other` is gone or does not run (no heartbeat).
fn assert_runs_only_on(running: &mut Vm, other: &mut Vm) {
    assert_eq!(running.run_status(), "running", "{}", running.name);
    running.assert_running_guest(10);
    if other.try_exited().is_none() {
        assert_ne!(other.run_status(), "running", "{} runs too", other.name);
        let last = other.last_seq();
        other.assert_no_hb_after(last, Duration::from_millis(200));
    }
}

/// A source whose migration to a first destination ended `x-tern-unconfirmed`: the stream was
/// cut 17 bytes before its end, so that destination failed and exited, and the source is
/// paused in `postmigrate` with its guest undecided.
fn undecided_source(dir: &std::path::Path, m: &Machine) -> Vm {
    let mut src = source(dir, "src", m);
    let (mut dst1, uri) = destination(dir, "dst1", m, &[]);
    let proxy = FaultProxy::start(&uri, Fault::CutBeforeEnd(17));
    src.c("migrate", json!({"uri": proxy.uri()}));
    assert_unconfirmed(&mut src, "return path");
    assert_exited_with(&mut dst1, CUT);
    src
}

/// `cont` on an undecided source: accepted, the guest continues at the next heartbeat.
fn cont_source(src: &mut Vm) {
    let last = src.last_seq();
    src.c("cont", json!({}));
    assert_eq!(
        src.hb_after(last, T),
        last + 1,
        "the guest continues on the source"
    );
}

/// The stream cut 1, 17 (the whole END record) and 1000 bytes before its end: the
/// destination never gets a complete stream and exits; the source hears nothing after END and
/// ends `x-tern-unconfirmed`, paused. Resolution: the destination is gone, so `cont` on the
/// source. A cut before the switchover, by contrast, resumes the source by itself (`failed`).
#[test]
fn stream_cut_at_the_very_end_then_cont_on_the_source() {
    let dir = tmpdir();
    let m = Machine::pattern(1, 32);
    let mut src = source(dir.path(), "src", &m);
    for k in [1u64, 17, 1000] {
        let (mut dst, uri) = destination(dir.path(), &format!("dst{k}"), &m, &[]);
        let proxy = FaultProxy::start(&uri, Fault::CutBeforeEnd(k));
        src.drain_events();
        src.c("migrate", json!({"uri": proxy.uri()}));
        assert_unconfirmed(&mut src, "return path");
        let p = proxy.wait("cut", T, |p| p.cut);
        let end = p.end.expect("END was read from the source");
        assert_eq!(
            end - p.forwarded,
            k,
            "the destination got all but {k} bytes"
        );
        assert_exited_with(&mut dst, CUT);
        cont_source(&mut src);
        assert_runs_only_on(&mut src, &mut dst);
    }
    let (mut dst, uri) = destination(dir.path(), "dst-mid", &m, &[]);
    let proxy = FaultProxy::start(&uri, Fault::CutAfter(4 << 20));
    src.drain_events();
    src.c("migrate", json!({"uri": proxy.uri()}));
    let q = src.wait_mig(&["failed"], MIGRATION_TIMEOUT);
    assert!(!error_desc(&q).is_empty(), "{q}");
    assert_exited_with(&mut dst, CUT);
    assert_runs_only_on(&mut src, &mut dst);
    assert_pattern_ok(&mut src, &m, dir.path(), "src");
    src.quit_ok();
}

/// The reproduction without a proxy: the destination is `kill -9`ed once the source
/// has flushed END (`query-migrate` in `device` shows `x-tern-downtime-breakdown`). It is
/// frozen (SIGSTOP) before the switchover so that it cannot have loaded END by then: the
/// state the race produces when the kill lands just after `device`.
#[test]
fn destination_killed_after_end_then_cont_on_the_source() {
    let dir = tmpdir();
    let m = Machine::pattern(1, 4);
    let mut src = source(dir.path(), "src", &m);
    src.caps(&[("pause-before-switchover", true)]);
    let (mut dst, uri) = destination(dir.path(), "dst", &m, &[]);
    src.c("migrate", json!({ "uri": uri }));
    src.wait_mig(&["pre-switchover"], MIGRATION_TIMEOUT);
    // Frozen for certain before END can reach it: kill(2) returns before the stop takes
    // effect, and a destination still running could load END and resume first.
    dst.stop_frozen(T);
    src.c("migrate-continue", json!({"state": "pre-switchover"}));
    src.wait_mig(&["device"], T);
    let deadline = Instant::now() + T;
    loop {
        let q = src.qm();
        assert_eq!(q["status"], "device", "{q}");
        if q.get("x-tern-downtime-breakdown").is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "END not flushed within {T:?}: {q}"
        );
    }
    dst.kill();
    assert_unconfirmed(&mut src, "return path");
    cont_source(&mut src);
    assert_runs_only_on(&mut src, &mut dst);
    assert_pattern_ok(&mut src, &m, dir.path(), "src");
    src.quit_ok();
}

/// From `x-tern-unconfirmed`, without `cont`: `migrate` to another destination. The guest
/// (running before the first attempt) runs there, continuing the heartbeat sequence, and the
/// source now refuses `cont`.
#[test]
fn unconfirmed_then_migrate_to_another_destination() {
    let dir = tmpdir();
    let m = Machine::pattern(1, 32);
    let mut src = undecided_source(dir.path(), &m);
    // A retry that fails before END (nobody listens there) decides nothing: the guest stays
    // undecided and still travels as running to the next destination.
    src.drain_events();
    src.c("migrate", json!({"uri": "tcp:127.0.0.1:1"}));
    src.wait_mig(&["failed"], MIGRATION_TIMEOUT);
    assert_eq!(src.run_status(), "postmigrate");
    let (mut dst2, uri) = destination(dir.path(), "dst2", &m, &[]);
    src.drain_events();
    src.c("migrate", json!({ "uri": uri }));
    src.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    dst2.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    assert_handover(&mut src, &mut dst2);
    assert_cont_refused(&mut src);
    assert_runs_only_on(&mut dst2, &mut src);
    assert_pattern_ok(&mut dst2, &m, dir.path(), "dst2");
    src.quit_ok();
    dst2.quit_ok();
}

/// While a new migration carries a guest that an undecided one stopped, the source's run
/// state stays `postmigrate`, yet `cont` is refused until that migration ends: after END went
/// out, a `cont` there would run the guest beside the destination that resumes it. A
/// `migrate_cancel` after END cannot undo the switchover either: it ends `x-tern-unconfirmed`.
#[test]
fn cont_is_refused_while_a_new_migration_carries_an_undecided_guest() {
    let dir = tmpdir();
    let m = Machine::pattern(1, 32);
    let mut src = undecided_source(dir.path(), &m);
    src.params(json!({"x-tern-resume-timeout": 3_600_000}));
    let (mut dst2, uri) = destination(dir.path(), "dst2", &m, &[]);
    let proxy = FaultProxy::start(&uri, Fault::StallReturnPathAtEnd);
    src.drain_events();
    src.c("migrate", json!({"uri": proxy.uri()}));
    proxy.wait_end(MIGRATION_TIMEOUT);
    let e = src.err("cont", json!({}));
    assert!(
        e.contains("migration is in progress"),
        "cont after END: {e}"
    );
    dst2.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    src.c("migrate_cancel", json!({}));
    assert_unconfirmed(&mut src, "cancel");
    assert_runs_only_on(&mut dst2, &mut src);
    src.quit_ok();
    assert_pattern_ok(&mut dst2, &m, dir.path(), "dst2");
    dst2.quit_ok();
}

/// The destination loads everything and runs, but its answer is lost: the return path is
/// closed right after END (a → b), or stays silent until `x-tern-resume-timeout` (b → c). The
/// source ends `x-tern-unconfirmed`; the operator finds the destination running and leaves
/// the source paused (then quits it).
#[test]
fn answer_lost_after_end_destination_runs_source_stays_paused() {
    let dir = tmpdir();
    let m = Machine::pattern(1, 32);
    let mut a = source(dir.path(), "a", &m);
    let (mut b, uri) = destination(dir.path(), "b", &m, &[]);
    let proxy = FaultProxy::start(&uri, Fault::CloseReturnPathAtEnd);
    a.c("migrate", json!({"uri": proxy.uri()}));
    assert_unconfirmed(&mut a, "return path closed");
    b.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    assert_handover(&mut a, &mut b);
    assert_runs_only_on(&mut b, &mut a);
    a.quit_ok();

    b.caps(&CAPS);
    converge(&mut b);
    b.params(json!({"x-tern-resume-timeout": 500}));
    let (mut c, uri) = destination(dir.path(), "c", &m, &[]);
    let proxy = FaultProxy::start(&uri, Fault::StallReturnPathAtEnd);
    b.drain_events();
    b.c("migrate", json!({"uri": proxy.uri()}));
    assert_unconfirmed(&mut b, "no RESUMED within 500 ms, x-tern-resume-timeout");
    c.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    assert_handover(&mut b, &mut c);
    assert_runs_only_on(&mut c, &mut b);
    b.quit_ok();
    assert_pattern_ok(&mut c, &m, dir.path(), "c");
    c.quit_ok();
}

/// A destination started paused (`-S` / `--paused`) loads the guest and stays paused: the
/// source completes without `RESUMED`, nothing runs, and `cont` on exactly one side decides
/// (both choices; libvirt's Confirm resumes the source this way when Finish fails).
#[test]
fn paused_destination_then_cont_on_exactly_one_side() {
    let dir = tmpdir();
    let m = Machine::pattern(1, 32);
    for (choice, flag) in [("destination", "-S"), ("source", "--paused")] {
        let mut src = source(dir.path(), &format!("src-{choice}"), &m);
        let (mut dst, uri) = destination(dir.path(), &format!("dst-{choice}"), &m, &[flag]);
        src.c("migrate", json!({ "uri": uri }));
        src.wait_mig(&["completed"], MIGRATION_TIMEOUT);
        dst.wait_mig(&["completed"], MIGRATION_TIMEOUT);
        assert_eq!(src.run_status(), "postmigrate");
        assert_eq!(dst.run_status(), "paused");
        let last = src.last_seq();
        src.assert_no_hb_after(last, Duration::from_millis(200));
        dst.assert_no_hb_after(last, Duration::from_millis(200));
        if choice == "destination" {
            dst.c("cont", json!({}));
            assert_eq!(dst.hb_after(last, T), last + 1);
            assert_runs_only_on(&mut dst, &mut src);
            assert_pattern_ok(&mut dst, &m, dir.path(), "dst");
        } else {
            cont_source(&mut src);
            assert_runs_only_on(&mut src, &mut dst);
            assert_pattern_ok(&mut src, &m, dir.path(), "src");
        }
        src.quit_ok();
        dst.quit_ok();
    }
}

/// QEMU's autostart is live during `inmigrate`: `cont` on a destination started with `-S`,
/// after `migrate-incoming`, makes it run the guest once loaded (and say so: the source then
/// refuses `cont`); `stop` on one started without `-S` keeps it paused.
#[test]
fn autostart_changes_during_inmigrate_take_effect() {
    let dir = tmpdir();
    let m = Machine::pattern(1, 32);
    for (flag, cmd) in [("-S", "cont"), ("", "stop")] {
        let name = if flag.is_empty() { "plain" } else { "paused" };
        let mut src = source(dir.path(), &format!("src-{name}"), &m);
        let extra: Vec<&str> = [flag].into_iter().filter(|f| !f.is_empty()).collect();
        let (mut dst, uri) = destination(dir.path(), &format!("dst-{name}"), &m, &extra);
        assert_eq!(dst.run_status(), "inmigrate");
        dst.c(cmd, json!({}));
        src.c("migrate", json!({ "uri": uri }));
        src.wait_mig(&["completed"], MIGRATION_TIMEOUT);
        dst.wait_mig(&["completed"], MIGRATION_TIMEOUT);
        if cmd == "cont" {
            assert_handover(&mut src, &mut dst);
            assert_cont_refused(&mut src);
            assert_runs_only_on(&mut dst, &mut src);
        } else {
            assert_eq!(dst.run_status(), "paused", "stop during inmigrate");
            let last = src.last_seq();
            dst.assert_no_hb_after(last, Duration::from_millis(200));
            cont_source(&mut src);
            assert_runs_only_on(&mut src, &mut dst);
        }
        src.quit_ok();
        dst.quit_ok();
    }
}

/// Without a return path the source completes at the END flush (QEMU) and cannot know what
/// the destination did, so `cont` is allowed in `postmigrate`: libvirt's Confirm phase resumes
/// the source with it after destroying a destination whose Finish failed.
#[test]
fn without_return_path_cont_in_postmigrate_after_the_destination_is_destroyed() {
    let dir = tmpdir();
    let m = Machine::pattern(1, 32);
    let mut src = boot(dir.path(), "src", &m);
    src.wait_workload_running(T);
    src.caps(&[("events", true)]);
    converge(&mut src);
    let mut dst = dest(dir.path(), "dst", &m);
    dst.caps(&[("events", true)]);
    let uri = dst.listen_tcp_with(None);
    src.c("migrate", json!({ "uri": uri }));
    src.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    dst.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    assert_eq!(src.run_status(), "postmigrate");
    // "Finish failed": the destination is destroyed, then the source resumes.
    dst.kill();
    cont_source(&mut src);
    assert_runs_only_on(&mut src, &mut dst);
    assert_pattern_ok(&mut src, &m, dir.path(), "src");
    src.quit_ok();
}
