//! Multifd helpers shared by `multifd.rs`, `zerocopy.rs` and `multifd_compression.rs`: the
//! guest they migrate, the two processes set up with multifd, one migration to `completed`,
//! a channel cut mid-pass through a [`MultiProxy`], the retry that then completes, and a
//! mismatch refused at once.

use std::path::Path;
use std::process::ExitStatus;

use serde_json::{json, Value};

use super::multi_proxy::MultiProxy;
use super::*;

/// libvirt's capabilities plus `multifd`, the same on both sides.
pub const MULTIFD_CAPS: [(&str, bool); 3] =
    [("events", true), ("return-path", true), ("multifd", true)];

/// Two vCPUs writing the `pattern` over 64 MiB at 64 MiB/s in a 256 MiB guest: memory is
/// dirtied during every pass, and the link (loopback, multifd) is faster, so it converges.
/// Its pages are one repeated byte, very compressible.
pub fn pattern_guest() -> Machine {
    let mut m = Machine::pattern(2, 64).memory(256);
    m.rate = 64;
    m
}

/// [`boot_pair`], and both sides get the `params` (`multifd-channels`, …).
pub fn pair(
    dir: &Path,
    m: &Machine,
    src_caps: &[(&str, bool)],
    dst_caps: &[(&str, bool)],
    params: Value,
) -> (Vm, Vm) {
    let (mut src, mut dst) = boot_pair(dir, m, src_caps, dst_caps);
    for vm in [&mut src, &mut dst] {
        vm.params(params.clone());
    }
    (src, dst)
}

/// QEMU's converge limits on `src`, `dst` listening on TCP, `migrate`; both sides reach
/// `completed`. Returns the source's final `query-migrate`.
pub fn migrate_to_completion(src: &mut Vm, dst: &mut Vm) -> Value {
    converge(src);
    let uri = dst.listen_tcp();
    src.c("migrate", json!({ "uri": uri }));
    let q = src.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    assert_eq!(q["status"], "completed", "{q}");
    dst.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    q
}

/// The handover checked, the `pattern` checked on the destination's memory (`tag` names the
/// dump), both processes quit cleanly.
pub fn assert_handover_and_pattern(mut src: Vm, mut dst: Vm, m: &Machine, dir: &Path, tag: &str) {
    assert_handover(&mut src, &mut dst);
    assert_pattern_ok(&mut dst, m, dir, tag);
    dst.quit_ok();
    src.quit_ok();
}

/// Migrates `src` (multifd set up) to `dst` (QEMU's default `exit-on-error`) through a proxy
/// that cuts the second channel (connection 2) after 8 MiB, with `src` slow enough that the
/// first pass is far from done then. The source's migration fails naming the channel and
/// the destination exits unsuccessfully; returns the source's error-desc, the destination's
/// exit status and its stderr.
pub fn cut_a_channel_mid_pass(src: &mut Vm, dst: &mut Vm) -> (String, ExitStatus, String) {
    // Slow enough that the first pass (256 MiB) is far from done when the channel dies.
    src.params(json!({ "max-bandwidth": 32 << 20 }));
    // QEMU's default `exit-on-error`: the failed destination discards everything and exits.
    let proxy = MultiProxy::start(&dst.listen_tcp_with(None));
    src.c("migrate", json!({ "uri": proxy.uri }));
    // Connection 0 is the main stream; 2 is the second channel. Cut it after 8 MiB.
    proxy.cut_after(2, 8 << 20, T);
    let q = src.wait_mig(&["failed"], T);
    let desc = error_desc(&q);
    assert!(
        desc.contains("multifd channel"),
        "source error-desc: {desc}"
    );
    let (st, log) = dst.wait_gone(T);
    assert!(!st.success(), "destination exit status {st}");
    (desc, st, log)
}

/// After a failed migration: the same source (its capabilities and parameters as they are)
/// to a fresh destination `dst2` with [`MULTIFD_CAPS`] and 2 channels completes, hands
/// over, and the pattern checks (`tag`).
pub fn retry_completes(dir: &Path, mut src: Vm, m: &Machine, tag: &str) {
    let mut dst2 = dest(dir, "dst2", m);
    dst2.caps(&MULTIFD_CAPS);
    dst2.params(json!({ "multifd-channels": 2 }));
    src.drain_events();
    migrate_to_completion(&mut src, &mut dst2);
    assert_handover_and_pattern(src, dst2, m, dir, tag);
}

/// `migrate` from `src` to `dst` (both set up by the caller) is refused at once: both sides
/// `failed` with an error-desc containing `text`, the destination alive and not running, the
/// source running on; `dst` quits. Returns the source's `query-migrate`.
pub fn assert_refused_at_once(src: &mut Vm, mut dst: Vm, text: &str) -> Value {
    src.drain_events();
    let uri = dst.listen_tcp();
    src.c("migrate", json!({ "uri": uri }));
    let q = src.wait_mig(&["failed"], T);
    let desc = error_desc(&q);
    assert!(
        desc.contains(text),
        "source error-desc {desc:?} lacks {text:?}"
    );
    let qd = dst.wait_mig(&["failed"], T);
    assert!(error_desc(&qd).contains(text), "{qd}");
    dst.assert_alive();
    assert_ne!(dst.run_status(), "running");
    assert_source_runs_on(src);
    dst.quit_ok();
    q
}
