//! `release-ram` with real `tern run` processes (`docs/postcopy.md` §6, decision 180): the
//! source frees each page of guest RAM once the destination confirmed it, so its resident
//! memory falls; the guest on the destination passes the `pattern` check, also across a cut
//! link and a recovery (a freed page is never sent again). RSS is read from
//! `/proc/PID/smaps` once the migration completed, never against a clock.

mod common;

use common::postcopy::*;
use common::*;
use serde_json::json;

/// A 2-vCPU `pattern` guest over 64 MiB of its 256: the whole area is resident on the source.
fn machine() -> Machine {
    Machine::pattern(2, 64)
}

const RELEASE: [(&str, bool); 1] = [("release-ram", true)];

/// The source's guest RAM is resident (the pattern's work area at least): returns its KiB.
fn rss_before(src: &mut Vm, m: &Machine) -> u64 {
    let kib = guest_ram_rss_kib(src.pid(), m.memory_mib);
    assert!(
        kib >= (m.work_mem << 10) / 2,
        "the source's guest RAM should be resident before the switch: {kib} KiB"
    );
    kib
}

/// After `completed`: every page was released, and the guest RAM's RSS fell below half.
fn assert_released(src: &mut Vm, m: &Machine, before: u64) {
    let q = src.qm();
    let pages = (m.memory_mib << 20) / 4096;
    assert_eq!(
        q["x-tern-release-ram"]["released-pages"].as_u64(),
        Some(pages),
        "{q}"
    );
    assert_query_migrate_matches_schema(src, &q);
    let after = guest_ram_rss_kib(src.pid(), m.memory_mib);
    eprintln!("source guest RAM resident: {before} KiB before the switch, {after} KiB after");
    assert!(
        after < before / 2,
        "release-ram: RSS {after} KiB after, {before} KiB before"
    );
}

fn finish(dir: &tempfile::TempDir, m: &Machine, mut src: Vm, mut dst: Vm, before: u64) {
    src.params(json!({"max-postcopy-bandwidth": 0}));
    src.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    dst.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    assert_released(&mut src, m, before);
    assert_handover(&mut src, &mut dst);
    assert_cont_refused(&mut src);
    let p0 = dst.pages_written();
    dst.wait_pages_advance(&p0, T);
    assert_pattern_ok(&mut dst, m, dir.path(), "dst");
    src.quit_ok();
    dst.quit_ok();
}

#[test]
fn postcopy_release_ram_frees_the_source_and_the_guest_is_intact() {
    let dir = tmpdir();
    let m = machine();
    let (mut src, mut dst, _proxy) = start_through_proxy(dir.path(), &m, &RELEASE);
    let before = rss_before(&mut src, &m);
    postcopy_running(&mut src, &mut dst);
    finish(&dir, &m, src, dst, before);
}

/// QEMU's kind of capability error (`migrate_caps_check`: "Postcopy preempt requires
/// postcopy-ram"): refused alone, accepted with `postcopy-ram`, and `postcopy-ram` cannot be
/// turned off under it.
#[test]
fn release_ram_without_postcopy_ram_is_refused() {
    let dir = tmpdir();
    let mut vm = dest(dir.path(), "vm", &Machine::idle(1));
    let set = |on: &[(&str, bool)]| json!({"capabilities": on.iter().map(|(c, s)| json!({"capability": c, "state": s})).collect::<Vec<_>>()});
    let e = vm.err("migrate-set-capabilities", set(&RELEASE));
    assert!(
        e.contains("Capability 'release-ram' requires capability 'postcopy-ram'"),
        "{e}"
    );
    vm.c(
        "migrate-set-capabilities",
        set(&[("postcopy-ram", true), ("release-ram", true)]),
    );
    let e = vm.err("migrate-set-capabilities", set(&[("postcopy-ram", false)]));
    assert!(e.contains("requires capability 'postcopy-ram'"), "{e}");
    let caps = vm.c("query-migrate-capabilities", json!({}));
    let on = |name: &str| {
        caps.as_array()
            .and_then(|a| a.iter().find(|c| c["capability"] == name))
            .map(|c| c["state"] == true)
    };
    assert_eq!(on("release-ram"), Some(true), "{caps}");
    assert_eq!(on("postcopy-ram"), Some(true), "{caps}");
    vm.quit_ok();
}

/// The link stalls (the proxy holds what the source writes after a `PING`: pages, and the
/// `PING`s that would confirm them) and is then cut: those pages are lost with it. Freed when sent (QEMU's
/// rule), they would be re-sent as zeros and the `pattern` check would see them; here they
/// are not freed until confirmed, the recovery's received bitmap sends them again from intact
/// memory (`resent-pages` > 0), and the guest is intact.
#[test]
fn postcopy_release_ram_cut_link_recovery_completes_with_the_guest_intact() {
    let dir = tmpdir();
    let m = machine();
    let (mut src, mut dst, proxy) = start_through_proxy(dir.path(), &m, &RELEASE);
    let before = rss_before(&mut src, &m);
    postcopy_running(&mut src, &mut dst);
    // From just after a PING on: its PONG opens the push's 512 KiB window (decision 141), the
    // source writes a 256 KiB push batch, a window PING, the next batch, all held: pages that
    // a PING followed are lost too.
    proxy.hold_after_next_ping();
    proxy.wait("300 KiB held", MIGRATION_TIMEOUT, |p| p.held >= 300 << 10);
    proxy.cut();
    let q = src.wait_mig(&["postcopy-paused"], MIGRATION_TIMEOUT);
    assert!(error_desc(&q).contains("post-copy paused"), "{q}");
    assert_destination_paused_missing_pages(&mut dst);
    let _direct = start_recovery(&mut src, &mut dst, None);
    src.wait_mig(&["postcopy-active"], MIGRATION_TIMEOUT);
    dst.wait_mig(&["postcopy-active"], MIGRATION_TIMEOUT);
    let q = src.qm();
    let r = &q["x-tern-postcopy-recovery"];
    assert_eq!(r["recoveries"], 1, "{q}");
    assert!(r["resent-pages"].as_u64().unwrap_or(0) >= 64, "{q}");
    finish(&dir, &m, src, dst, before);
}
