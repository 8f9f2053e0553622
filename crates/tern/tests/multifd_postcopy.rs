//! Multifd together with post-copy (QEMU 10.1's semantics, `docs/stream-format.md` §5.4,
//! decisions 245–246): pre-copy's pages go over 2 multifd channels, the channels end before the
//! early discard, post-copy runs on the main stream (and the preempt channel). Real `tern run`
//! processes, a 2-vCPU `pattern` guest checked page by page on the destination.

mod common;

use common::multi_proxy::MultiProxy;
use common::postcopy::{postcopy_running, start_recovery, PC_CAPS};
use common::*;
use serde_json::json;

/// Boots both sides with post-copy, `multifd` (2 channels) and `extra`, migrates through a
/// [`MultiProxy`] (connection 0 the main stream, 1 and 2 the channels, then the preempt
/// channel), and returns once the first pre-copy pass ended (pre-copy cannot converge:
/// downtime-limit 1 ms).
fn start(dir: &std::path::Path, m: &Machine, extra: &[(&str, bool)]) -> (Vm, Vm, MultiProxy) {
    let mut src = boot(dir, "src", m);
    src.wait_workload_running(T);
    let mut dst = dest(dir, "dst", m);
    for vm in [&mut src, &mut dst] {
        vm.caps(&PC_CAPS);
        vm.caps(&[("multifd", true)]);
        vm.caps(extra);
        vm.params(json!({"multifd-channels": 2}));
    }
    src.params(json!({"max-bandwidth": 32_000_000, "downtime-limit": 1}));
    let proxy = MultiProxy::start(&dst.listen_tcp());
    src.c("migrate", json!({ "uri": proxy.uri }));
    src.wait_mig(&["active"], T);
    src.wait_pass(2, MIGRATION_TIMEOUT);
    (src, dst, proxy)
}

/// Lets the push run at full speed, waits for `completed` on both sides, checks that pre-copy
/// went over the channels and post-copy served requests, the handover, and the pattern.
fn complete(dir: &std::path::Path, m: &Machine, mut src: Vm, mut dst: Vm) {
    src.params(json!({"max-postcopy-bandwidth": 0}));
    let q = src.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    dst.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    assert!(ram_num(&q, "multifd-bytes") > 0, "{q}");
    assert!(ram_num(&q, "postcopy-bytes") > 0, "{q}");
    assert!(ram_num(&q, "postcopy-requests") > 0, "{q}");
    assert_handover(&mut src, &mut dst);
    let p0 = dst.pages_written();
    dst.wait_pages_advance(&p0, T);
    assert_pattern_ok(&mut dst, m, dir, "dst");
    src.quit_ok();
    dst.quit_ok();
}

#[test]
fn multifd_postcopy_after_pass_1_pattern_2vcpu() {
    let dir = tmpdir();
    let m = Machine::pattern(2, 32);
    let (mut src, mut dst, _proxy) = start(dir.path(), &m, &[]);
    postcopy_running(&mut src, &mut dst);
    complete(dir.path(), &m, src, dst);
}

/// With `postcopy-preempt` too; once the guest runs on the destination both multifd channels'
/// connections are cut (they ended at the switch): post-copy is not disturbed.
#[test]
fn multifd_postcopy_preempt_channels_cut_after_the_switch_pattern_2vcpu() {
    let dir = tmpdir();
    let m = Machine::pattern(2, 32);
    let (mut src, mut dst, proxy) = start(dir.path(), &m, &[("postcopy-preempt", true)]);
    postcopy_running(&mut src, &mut dst);
    for channel in [1, 2] {
        proxy.cut_after(channel, 0, T);
    }
    assert_eq!(src.mig_status(), "postcopy-active");
    assert_eq!(dst.mig_status(), "postcopy-active");
    complete(dir.path(), &m, src, dst);
}

/// `migrate-pause` in post-copy with multifd on: both sides pause, a recovery (main stream
/// only, no channel is reopened) completes the migration with the guest intact.
#[test]
fn multifd_postcopy_pause_then_recovery_completes() {
    let dir = tmpdir();
    let m = Machine::pattern(2, 32);
    let (mut src, mut dst, _proxy) = start(dir.path(), &m, &[]);
    postcopy_running(&mut src, &mut dst);
    src.c("migrate-pause", json!({}));
    src.wait_mig(&["postcopy-paused"], MIGRATION_TIMEOUT);
    dst.wait_mig(&["postcopy-paused"], MIGRATION_TIMEOUT);
    let _direct = start_recovery(&mut src, &mut dst, None);
    src.wait_mig(&["postcopy-active"], MIGRATION_TIMEOUT);
    dst.wait_mig(&["postcopy-active"], MIGRATION_TIMEOUT);
    complete(dir.path(), &m, src, dst);
}

/// The main stream's link cut in post-copy with multifd on (the channels ended at the switch):
/// both sides pause, a recovery completes the migration with the guest intact.
#[test]
fn multifd_postcopy_link_cut_then_recovery_completes() {
    let dir = tmpdir();
    let m = Machine::pattern(2, 32);
    let (mut src, mut dst, proxy) = start(dir.path(), &m, &[]);
    postcopy_running(&mut src, &mut dst);
    proxy.cut_after(0, 0, T);
    let q = src.wait_mig(&["postcopy-paused"], MIGRATION_TIMEOUT);
    assert!(error_desc(&q).contains("post-copy paused"), "{q}");
    dst.wait_mig(&["postcopy-paused"], MIGRATION_TIMEOUT);
    let _direct = start_recovery(&mut src, &mut dst, None);
    src.wait_mig(&["postcopy-active"], MIGRATION_TIMEOUT);
    dst.wait_mig(&["postcopy-active"], MIGRATION_TIMEOUT);
    complete(dir.path(), &m, src, dst);
}
