//! The moment between the early post-copy discard and the stop (`docs/postcopy.md` §2a) with
//! real `tern run` processes: the source is held there by its test-only hook
//! (`TERN_X_TEST_HOLD=postcopy-before-stop`: the destination has applied the early discard
//! and answered the drain's `PING`, the source's guest still runs), then the destination is
//! SIGKILLed, or SIGSTOPped for longer than `x-tern-liveness-timeout`. Either way the
//! source's migration fails by itself, naming the destination, its guest never stopped and
//! runs on, and (after the kill) a second post-copy migration to a fresh destination
//! completes with every page right (`pattern`).

mod common;

use common::*;
use serde_json::json;

const CAPS: [(&str, bool); 2] = [("events", true), ("postcopy-ram", true)];
/// The hold (`crates/tern/src/migrate/fault.rs`): the first post-copy migration of the
/// source waits before its stop until it fails.
const HOLD: (&str, &str) = ("TERN_X_TEST_HOLD", "postcopy-before-stop");
const HELD: &str = "x-test: holding at postcopy-before-stop";
/// The short liveness limit of the stall test, ms.
const LIMIT_MS: u64 = 1500;

/// A source of `m` (with the hold) migrating to a destination, post-copy decided: returns once
/// the source says it holds before its stop. Neither side has switched.
fn held_before_the_stop(dir: &std::path::Path, m: &Machine, params: serde_json::Value) -> (Vm, Vm) {
    let mut src = spawn_with_env(dir, "src", &m.args(), None, &[HOLD]);
    src.hb_after(0, T);
    src.wait_workload_running(T);
    let mut dst = dest(dir, "dst", m);
    for vm in [&mut src, &mut dst] {
        vm.caps(&CAPS);
        vm.params(params.clone());
    }
    src.params(json!({"max-bandwidth": 32_000_000, "downtime-limit": 1}));
    let uri = dst.listen_tcp();
    src.c("migrate", json!({ "uri": uri }));
    src.wait_mig(&["active"], T);
    src.wait_pass(2, MIGRATION_TIMEOUT);
    src.c("migrate-start-postcopy", json!({}));
    if let Err(e) = src.wait_log(HELD, MIGRATION_TIMEOUT) {
        panic!("{e:#}");
    }
    assert_eq!(src.mig_status(), "active");
    assert_eq!(src.run_status(), "running");
    assert_eq!(dst.mig_status(), "active");
    (src, dst)
}

/// The source failed before its stop: `failed` naming the destination (`what`), no `STOP`
/// event ever (the guest was never paused), and the guest runs on.
fn assert_failed_before_the_stop(src: &mut Vm, what: &[&str]) {
    let q = src.wait_mig(&["failed"], MIGRATION_TIMEOUT);
    let desc = error_desc(&q);
    eprintln!("source: {desc}");
    assert!(
        what.iter().any(|w| desc.contains(w)),
        "source error-desc {desc:?} names none of {what:?}"
    );
    let stops: Vec<_> = src
        .qmp
        .take_events()
        .into_iter()
        .filter(|e| e["event"] == "STOP")
        .collect();
    assert!(
        stops.is_empty(),
        "the source's guest was stopped: {stops:?}"
    );
    assert_source_runs_on(src);
}

#[test]
fn a_destination_killed_after_the_early_discard_fails_the_source_which_runs_on_and_migrates_again()
{
    let dir = tmpdir();
    let m = Machine::pattern(2, 32);
    let (mut src, mut dst) = held_before_the_stop(dir.path(), &m, json!({}));
    dst.kill();
    assert_failed_before_the_stop(
        &mut src,
        &["the destination closed the return path", "return path:"],
    );
    // A fresh destination: post-copy again (the hold is taken once), every page right.
    let mut dst2 = dest(dir.path(), "dst2", &m);
    dst2.caps(&CAPS);
    src.drain_events();
    let uri = dst2.listen_tcp();
    src.c("migrate", json!({ "uri": uri }));
    src.wait_mig(&["active"], T);
    src.wait_pass(2, MIGRATION_TIMEOUT);
    src.params(json!({"max-postcopy-bandwidth": 64_000_000}));
    src.c("migrate-start-postcopy", json!({}));
    src.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    let dq = dst2.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    assert!(dq["x-tern-postcopy-switch"].is_object(), "{dq}");
    assert_handover(&mut src, &mut dst2);
    assert_pattern_ok(&mut dst2, &m, dir.path(), "dst2");
    src.quit_ok();
    dst2.quit_ok();
}

#[test]
fn a_destination_stalled_after_the_early_discard_fails_the_source_by_its_liveness_limit() {
    let dir = tmpdir();
    let m = Machine::pattern(2, 32);
    let params = json!({ "x-tern-liveness-timeout": LIMIT_MS });
    let (mut src, mut dst) = held_before_the_stop(dir.path(), &m, params);
    dst.stop_frozen(T);
    assert_failed_before_the_stop(
        &mut src,
        &[
            &format!("no data from the destination for {LIMIT_MS} ms"),
            "the connection to the destination timed out",
        ],
    );
    // The destination wakes up to a source that is gone: it fails and never runs the guest.
    dst.signal(libc::SIGCONT);
    let dq = dst.wait_mig(&["failed"], MIGRATION_TIMEOUT);
    eprintln!("destination: {}", error_desc(&dq));
    assert_ne!(dst.run_status(), "running");
    src.quit_ok();
    dst.quit_ok();
}
