//! Multifd together with post-copy (QEMU 10.1's semantics, `docs/stream-format.md` §5.4,
//! decisions 245–246): pre-copy's pages go over 2 multifd channels, the channels end before the
//! early discard, post-copy runs on the main stream (and the preempt channel); also with
//! `multifd-compression` zstd / zlib, and over TLS. Real `tern run` processes, a 2-vCPU
//! `pattern` guest checked page by page on the destination.

mod common;

use std::path::Path;

use common::multi_proxy::MultiProxy;
use common::postcopy::{postcopy_running, start_recovery, PC_CAPS};
use common::tls::{client_dir, new_ca, server_dir, x509};
use common::*;
use serde_json::{json, Value};

/// Boots both sides with post-copy, `multifd` (2 channels) and `extra`, migrates through a
/// [`MultiProxy`] (connection 0 the main stream, 1 and 2 the channels, then the preempt
/// channel), and returns once the first pre-copy pass ended (pre-copy cannot converge:
/// downtime-limit 1 ms).
fn start(dir: &Path, m: &Machine, extra: &[(&str, bool)]) -> (Vm, Vm, MultiProxy) {
    start_with(dir, m, extra, |_, _| {})
}

/// [`start`], with `setup(vm, is_source)` run on each side before the migration (a
/// compression method, TLS credentials).
fn start_with(
    dir: &Path,
    m: &Machine,
    extra: &[(&str, bool)],
    setup: impl Fn(&mut Vm, bool),
) -> (Vm, Vm, MultiProxy) {
    let mut src = boot(dir, "src", m);
    src.wait_workload_running(T);
    let mut dst = dest(dir, "dst", m);
    for (vm, is_source) in [(&mut src, true), (&mut dst, false)] {
        vm.caps(&PC_CAPS);
        vm.caps(&[("multifd", true)]);
        vm.caps(extra);
        vm.params(json!({"multifd-channels": 2}));
        setup(vm, is_source);
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
/// Returns the source's final `query-migrate`.
fn complete(dir: &Path, m: &Machine, mut src: Vm, mut dst: Vm) -> Value {
    src.params(json!({"max-postcopy-bandwidth": 0}));
    let q = src.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    dst.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    assert!(ram_num(&q, "multifd-bytes") > 0, "{q}");
    assert!(ram_num(&q, "postcopy-bytes") > 0, "{q}");
    assert!(ram_num(&q, "postcopy-requests") > 0, "{q}");
    // The channels carried their last byte before the stop (they end before the early
    // discard): `downtime-bytes` and `postcopy-bytes` count none of them (decision 247).
    let after_stop = ram_num(&q, "downtime-bytes") + ram_num(&q, "postcopy-bytes");
    assert!(
        after_stop + ram_num(&q, "multifd-bytes") <= ram_num(&q, "transferred"),
        "{q}"
    );
    assert_handover(&mut src, &mut dst);
    let p0 = dst.pages_written();
    dst.wait_pages_advance(&p0, T);
    assert_pattern_ok(&mut dst, m, dir, "dst");
    src.quit_ok();
    dst.quit_ok();
    q
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

/// With `multifd-compression` `method` on both sides: pre-copy's batches go over the channels
/// compressed, the channels end before the early discard, post-copy's pages go on the main
/// stream. Returns once the pattern checked.
fn compressed_postcopy(method: &str) {
    let dir = tmpdir();
    let m = Machine::pattern(2, 32);
    let params = json!({ "multifd-compression": method });
    let (mut src, mut dst, _proxy) = start_with(dir.path(), &m, &[], |vm, _| {
        vm.params(params.clone());
    });
    let p = src.c("query-migrate-parameters", json!({}));
    assert_eq!(p["multifd-compression"], method, "{p}");
    postcopy_running(&mut src, &mut dst);
    let q = complete(dir.path(), &m, src, dst);
    // Everything but what went after the stop (the downtime and post-copy, on the main
    // stream, uncompressed) was pre-copy's, over the channels: the pattern's pages are one
    // repeated byte, so compressed they are far fewer bytes than their data.
    let normal = ram_num(&q, "normal-bytes");
    let after_stop = ram_num(&q, "downtime-bytes") + ram_num(&q, "postcopy-bytes");
    let channel_data = normal.saturating_sub(after_stop);
    let multifd = ram_num(&q, "multifd-bytes");
    eprintln!(
        "multifd {method} + post-copy: multifd-bytes {multifd}, normal-bytes {normal}, \
         downtime+postcopy-bytes {after_stop}, postcopy-requests {}",
        ram_num(&q, "postcopy-requests")
    );
    assert!(channel_data > 8 << 20, "{q}");
    assert!(multifd * 4 < channel_data, "{q}");
}

#[test]
fn multifd_zstd_postcopy_after_pass_1_pattern_2vcpu() {
    compressed_postcopy("zstd");
}

#[test]
fn multifd_zlib_postcopy_after_pass_1_pattern_2vcpu() {
    compressed_postcopy("zlib");
}

/// Multifd over TLS with post-copy: the main stream, both channels and the return path (page
/// requests) are TLS sessions (rcgen certificates, `docs/tls.md`); the proxy forwards the
/// sessions' bytes as they are, and the source checks the certificate against the URI's
/// host (127.0.0.1, the proxy's).
#[test]
fn multifd_over_tls_postcopy_after_pass_1_pattern_2vcpu() {
    let dir = tmpdir();
    let root = dir.path();
    let ca = new_ca("Tern test CA");
    let sdir = server_dir(root, "dst-creds", &ca, &["127.0.0.1", "localhost"]);
    let cdir = client_dir(root, "src-creds", &ca, Some(&ca), "hosta.example.com");
    let m = Machine::pattern(2, 32);
    let (mut src, mut dst, _proxy) = start_with(root, &m, &[], |vm, is_source| {
        let (d, endpoint) = if is_source {
            (&cdir, "client")
        } else {
            (&sdir, "server")
        };
        vm.c("object-add", x509("tls0", d, endpoint));
        vm.params(json!({"tls-creds": "tls0"}));
    });
    postcopy_running(&mut src, &mut dst);
    let q = complete(root, &m, src, dst);
    assert!(ram_num(&q, "multifd-bytes") > 4 << 20, "{q}");
}
