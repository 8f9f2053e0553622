//! Double failures with real `tern run` processes (`docs/postcopy.md` §4, stream format
//! §13.7): a post-copy migration whose link is cut, then a recovery channel that breaks
//! *during its handshake* (cut after a few bytes of the stream; cut in the middle of the
//! destination's received bitmaps) sends both sides back to `postcopy-paused`, and a later
//! recovery completes with the `pattern` check; a source killed during the handshake leaves
//! the destination paused, naming the pages it lacks. Proxies cut at byte counts; every wait
//! is on an event or a proxy condition.

mod common;

use common::postcopy::*;
use common::proxy::Fault;
use common::*;
use serde_json::json;

/// Both sides `postcopy-paused` after the first channel was cut in `postcopy-active`.
fn paused_after_a_cut(dir: &std::path::Path, m: &Machine) -> (Vm, Vm) {
    let (mut src, mut dst, proxy) = start_through_proxy(dir, m, &[]);
    postcopy_running(&mut src, &mut dst);
    proxy.cut();
    let q = src.wait_mig(&["postcopy-paused"], MIGRATION_TIMEOUT);
    assert!(error_desc(&q).contains("post-copy paused"), "{q}");
    assert_destination_paused_missing_pages(&mut dst);
    (src, dst)
}

/// One recovery attempt through a proxy with `fault`: both sides go through
/// `postcopy-recover` and back to `postcopy-paused`, each naming the broken connection.
fn failed_attempt(src: &mut Vm, dst: &mut Vm, fault: Fault) {
    let proxy = start_recovery(src, dst, Some(fault)).expect("a proxy");
    src.wait_mig(&["postcopy-recover"], MIGRATION_TIMEOUT);
    dst.wait_mig(&["postcopy-recover"], MIGRATION_TIMEOUT);
    proxy.wait("the cut", MIGRATION_TIMEOUT, |p| p.cut);
    let q = src.wait_mig(&["postcopy-paused"], MIGRATION_TIMEOUT);
    let e = error_desc(&q);
    assert!(
        e.contains("post-copy paused")
            && e.contains("connection to the destination was lost during the recovery handshake"),
        "{fault:?}: {e}"
    );
    assert_destination_paused_missing_pages(dst);
    let de = error_desc(&dst.qm());
    assert!(
        de.contains("recovery channel failed during its handshake"),
        "{fault:?}: {de}"
    );
    // Decision 111: the destination's guest runs on (on the pages it has).
    assert_eq!(dst.run_status(), "running", "{fault:?}");
    let q = src.qm();
    assert!(
        q["x-tern-postcopy-recovery"]["failed-attempts"].as_u64() >= Some(1),
        "{q}"
    );
    eprintln!("{fault:?}: source: {e}\n{fault:?}: destination: {de}");
    let e = src.err("cont", json!({}));
    assert!(e.contains("postcopy-paused"), "{fault:?}: {e}");
}

#[test]
fn a_recovery_broken_during_its_handshake_pauses_both_and_a_later_one_completes() {
    let dir = tmpdir();
    let m = Machine::pattern(2, 32);
    let (mut src, mut dst) = paused_after_a_cut(dir.path(), &m);
    // 1: the recovery channel breaks inside the source's header + CONFIG.
    failed_attempt(&mut src, &mut dst, Fault::CutAfter(40));
    // 2: it breaks in the middle of the destination's first RECV_BITMAP (256 MiB = 8 KiB of
    // bitmap in chunks of 4 KiB): the source holds part of a bitmap, the destination has
    // sent all of it and waits for POSTCOPY_RESUME.
    failed_attempt(&mut src, &mut dst, Fault::CutReturnPathAfter(3000));
    // 3: straight to the destination: completes.
    let _direct = start_recovery(&mut src, &mut dst, None);
    src.wait_mig(&["postcopy-active"], MIGRATION_TIMEOUT);
    dst.wait_mig(&["postcopy-active"], MIGRATION_TIMEOUT);
    src.params(json!({"max-postcopy-bandwidth": 0}));
    let q = src.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    dst.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    let r = &q["x-tern-postcopy-recovery"];
    assert_eq!(r["recoveries"], 1, "{q}");
    assert_eq!(r["failed-attempts"], 2, "{q}");
    assert_eq!(r["list"].as_array().map(Vec::len), Some(1), "{q}");
    assert!(
        r["list"][0]["missing-pages"].as_u64().unwrap_or(0) > 0,
        "{q}"
    );
    assert!(r["list"][0]["total-us"].as_u64().unwrap_or(0) > 0, "{q}");
    assert_query_migrate_matches_schema(&mut src, &q);
    assert_handover(&mut src, &mut dst);
    assert_cont_refused(&mut src);
    let p0 = dst.pages_written();
    dst.wait_pages_advance(&p0, T);
    assert_pattern_ok(&mut dst, &m, dir.path(), "dst");
    src.quit_ok();
    dst.quit_ok();
}

/// The source dies while it waits for the destination's bitmaps (the proxy drops them): the
/// destination cannot tell that from a cut link, goes back to `postcopy-paused` naming the
/// pages it lacks (as many as before: nothing was placed), never runs a page it did not
/// receive (`cont`, `stop`, `system_reset` refused), and can still be asked to recover.
#[test]
fn a_source_killed_during_the_recovery_handshake_leaves_the_destination_paused() {
    let dir = tmpdir();
    let m = Machine::pattern(2, 32);
    let (mut src, mut dst) = paused_after_a_cut(dir.path(), &m);
    let missing = dst.qm()["x-tern-postcopy-missing-pages"]
        .as_u64()
        .unwrap_or(0);
    let _proxy = start_recovery(&mut src, &mut dst, Some(Fault::MuteReturnPath));
    src.wait_mig(&["postcopy-recover"], MIGRATION_TIMEOUT);
    dst.wait_mig(&["postcopy-recover"], MIGRATION_TIMEOUT);
    src.signal(libc::SIGKILL);
    let again = assert_destination_paused_missing_pages(&mut dst);
    assert_eq!(again, missing, "no page placed during the failed handshake");
    let e = error_desc(&dst.qm());
    assert!(
        e.contains("recovery channel failed during its handshake"),
        "{e}"
    );
    assert_eq!(
        dst.run_status(),
        "running",
        "decision 111: the guest runs on what it has"
    );
    dst.c("migrate-recover", json!({"uri": "tcp:127.0.0.1:0"}));
    dst.quit_ok();
}
