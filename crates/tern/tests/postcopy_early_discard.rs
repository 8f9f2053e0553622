//! The early post-copy discard (stream format §13.3, version 7; `docs/postcopy.md` §2a) with
//! real `tern run` processes: a 2-vCPU `pattern` guest that keeps re-dirtying its working set,
//! one pre-copy pass, `migrate-start-postcopy`; the destination dropped re-dirtied pages
//! before the source stopped (`early-discard-pages` in its `x-tern-postcopy-switch`), and the
//! `pattern` check passes over every page (a stale page left by a wrong discard would show
//! as bad transitions).

mod common;

use common::*;
use serde_json::json;

const CAPS: [(&str, bool); 2] = [("events", true), ("postcopy-ram", true)];

#[test]
fn postcopy_discards_redirtied_pages_before_the_stop_and_every_page_arrives() {
    let dir = tmpdir();
    let m = Machine::pattern(2, 32);
    let mut src = boot(dir.path(), "src", &m);
    src.wait_workload_running(T);
    let mut dst = dest(dir.path(), "dst", &m);
    src.caps(&CAPS);
    dst.caps(&CAPS);
    src.params(json!({"max-bandwidth": 32_000_000, "downtime-limit": 1}));
    let uri = dst.listen_tcp();
    src.c("migrate", json!({ "uri": uri }));
    src.wait_mig(&["active"], T);
    src.wait_pass(2, MIGRATION_TIMEOUT);
    src.params(json!({"max-postcopy-bandwidth": 64_000_000}));
    src.c("migrate-start-postcopy", json!({}));
    let q = src.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    let dq = dst.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    eprintln!("source: {q}\ndestination: {dq}");
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
