//! The early post-copy discard (stream format §13.3, version 7; `docs/postcopy.md` §2a) with
//! real `tern run` processes and a 2-vCPU `pattern` guest that keeps re-dirtying its working
//! set, one pre-copy pass, then `migrate-start-postcopy`:
//!
//! * the destination dropped re-dirtied pages before the source stopped
//!   (`early-discard-pages` in its `x-tern-postcopy-switch`), and the `pattern` check passes
//!   over every page (a stale page left by a wrong discard would show as bad transitions);
//! * the moment between the early discard and the stop, held by the source's test-only hook
//!   (`TERN_X_TEST_HOLD=postcopy-before-stop`: the destination has applied the early discard
//!   and answered the drain's `PING`, the source's guest still runs): the destination
//!   SIGKILLed there, or SIGSTOPped for longer than `x-tern-liveness-timeout`. The source's
//!   migration fails by itself, naming the destination, its guest never stopped and runs on,
//!   and (after the kill) a second post-copy migration to a fresh destination completes with
//!   every page right.

mod common;

use common::*;
use serde_json::{json, Value};

const CAPS: [(&str, bool); 2] = [("events", true), ("postcopy-ram", true)];
/// The hold (`crates/tern/src/migrate/fault.rs`): the first migration of the source waits
/// before its post-copy stop until it fails.
const HOLD: (&str, &str) = ("TERN_X_TEST_HOLD", "postcopy-before-stop");
const HELD: &str = "x-test: holding at postcopy-before-stop";
/// The short liveness limit of the stall test, ms.
const LIMIT_MS: u64 = 1500;

/// [`CAPS`] on both sides, a pre-copy from `src` to `dst` that cannot converge, through pass 2.
fn precopy_to_pass_2(src: &mut Vm, dst: &mut Vm) {
    src.caps(&CAPS);
    dst.caps(&CAPS);
    src.params(json!({"max-bandwidth": 32_000_000, "downtime-limit": 1}));
    let uri = dst.listen_tcp();
    src.c("migrate", json!({ "uri": uri }));
    src.wait_mig(&["active"], T);
    src.wait_pass(2, MIGRATION_TIMEOUT);
}

/// `migrate-start-postcopy` (push at 64 MB/s) until both sides completed; returns the
/// destination's `query-migrate`.
fn postcopy_to_completion(src: &mut Vm, dst: &mut Vm) -> Value {
    src.params(json!({"max-postcopy-bandwidth": 64_000_000}));
    src.c("migrate-start-postcopy", json!({}));
    let q = src.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    let dq = dst.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    eprintln!("source: {q}\ndestination: {dq}");
    dq
}

#[test]
fn postcopy_discards_redirtied_pages_before_the_stop_and_every_page_arrives() {
    let dir = tmpdir();
    let m = Machine::pattern(2, 32);
    let mut src = boot(dir.path(), "src", &m);
    src.wait_workload_running(T);
    let mut dst = dest(dir.path(), "dst", &m);
    precopy_to_pass_2(&mut src, &mut dst);
    let dq = postcopy_to_completion(&mut src, &mut dst);
    let sw = &dq["x-tern-postcopy-switch"];
    let n = |k: &str| {
        sw[k]
            .as_u64()
            .unwrap_or_else(|| panic!("{k} missing in {sw}"))
    };
    // The guest re-dirtied pages the destination held after pass 1: they went early.
    assert!(n("early-discard-pages") > 0, "{sw}");
    // The blackout's phases still add up (the early discard is outside them).
    let parts = [
        "wait-discard-us",
        "discard-us",
        "listen-us",
        "package-us",
        "restore-us",
    ];
    let sum: u64 = parts.iter().map(|k| n(k)).sum();
    let total = n("total-us");
    assert!(sum <= total && total - sum <= parts.len() as u64, "{sw}");
    assert_handover(&mut src, &mut dst);
    let p0 = dst.pages_written();
    dst.wait_pages_advance(&p0, T);
    assert_pattern_ok(&mut dst, &m, dir.path(), "dst");
    src.quit_ok();
    dst.quit_ok();
}

/// A source of `m` (with the hold) migrating to a destination (both with `params`), post-copy
/// decided: returns once the source says it holds before its stop. Neither side switched.
fn held_before_the_stop(dir: &std::path::Path, m: &Machine, params: Value) -> (Vm, Vm) {
    let mut src = spawn_with_env(dir, "src", &m.args(), None, &[HOLD]);
    src.hb_after(0, T);
    src.wait_workload_running(T);
    let mut dst = dest(dir, "dst", m);
    src.params(params.clone());
    dst.params(params);
    precopy_to_pass_2(&mut src, &mut dst);
    src.c("migrate-start-postcopy", json!({}));
    if let Err(e) = src.wait_log(HELD, MIGRATION_TIMEOUT) {
        panic!("{e:#}");
    }
    assert_eq!(src.mig_status(), "active");
    assert_eq!(src.run_status(), "running");
    assert_eq!(dst.mig_status(), "active");
    (src, dst)
}

/// The source failed before its stop: `failed` with an `error-desc` containing one of
/// `what`, no `STOP` event ever (the guest was never paused), and the guest runs on.
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
    src.drain_events();
    precopy_to_pass_2(&mut src, &mut dst2);
    let dq = postcopy_to_completion(&mut src, &mut dst2);
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
