//! `zero-copy-send` (`docs/migration-engine.md` §2.5, decisions 220–226) with real `tern run`
//! processes over real sockets: multifd with 2 channels sending with `MSG_ZEROCOPY` on
//! loopback (the `pattern` check on the destination; the kernel copies on local delivery, so
//! `dirty-sync-missed-zero-copy` counts), QEMU's refusals (without multifd, with TLS, with a
//! compression) and Tern's (a unix: URI) naming the reason, and a channel killed mid-pass
//! (the migration fails, the source runs on, a retry with zero-copy completes).

mod common;

use common::multi_proxy::MultiProxy;
use common::*;
use serde_json::json;

/// The guest of `multifd.rs`: two vCPUs writing the `pattern` over 64 MiB at 64 MiB/s in a
/// 256 MiB guest, so pages are dirtied (and re-sent) while zero-copy sends are in flight.
fn guest() -> Machine {
    let mut m = Machine::pattern(2, 64).memory(256);
    m.rate = 64;
    m
}

/// `zero-copy-send` is the source's capability (QEMU's: the destination does not read it).
const SRC_CAPS: [(&str, bool); 4] = [
    ("events", true),
    ("return-path", true),
    ("multifd", true),
    ("zero-copy-send", true),
];
const DST_CAPS: [(&str, bool); 3] = [("events", true), ("return-path", true), ("multifd", true)];

const QEMU_REFUSAL: &str = "Zero copy only available for non-compressed non-TLS multifd migration";

fn pair(dir: &std::path::Path, m: &Machine) -> (Vm, Vm) {
    let mut src = boot(dir, "src", m);
    src.wait_workload_running(T);
    let mut dst = dest(dir, "dst", m);
    src.caps(&SRC_CAPS);
    dst.caps(&DST_CAPS);
    for vm in [&mut src, &mut dst] {
        vm.params(json!({ "multifd-channels": 2 }));
    }
    (src, dst)
}

#[test]
fn multifd_2_channels_zero_copy_send_pattern_guest_completes_and_counts_the_kernels_copies() {
    let dir = tmpdir();
    let m = guest();
    let (mut src, mut dst) = pair(dir.path(), &m);
    converge(&mut src);
    let uri = dst.listen_tcp();
    src.c("migrate", json!({ "uri": uri }));
    let q = src.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    assert_eq!(q["status"], "completed", "{q}");
    dst.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    let multifd = ram_num(&q, "multifd-bytes");
    let passes = ram_num(&q, "dirty-sync-count");
    let missed = ram_num(&q, "dirty-sync-missed-zero-copy");
    eprintln!("zero-copy 2 channels: multifd-bytes {multifd}, passes {passes}, missed {missed}");
    assert!(multifd >= ram_num(&q, "normal-bytes"), "{q}");
    assert!(passes >= 2, "the guest dirtied memory during pre-copy: {q}");
    // Loopback delivers to a local socket, where the kernel copies the pinned pages
    // (`skb_orphan_frags_rx`) and says so: every sync with sends is a missed zero copy. At
    // most one per channel per sync point (every pass's, the switchover's, the final one).
    assert!(missed >= 1, "loopback copies: {q}");
    assert!(missed <= 2 * (passes + 2), "{q}");
    assert_handover(&mut src, &mut dst);
    assert_pattern_ok(&mut dst, &m, dir.path(), "zero-copy-2");
    dst.quit_ok();
    src.quit_ok();
}

#[test]
fn zero_copy_send_refusals_name_the_reason_and_a_unix_uri_fails_with_the_source_running_on() {
    let dir = tmpdir();
    let m = guest();
    let mut src = boot(dir.path(), "src", &m);
    src.wait_workload_running(T);
    // Without multifd.
    let e = src.err(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "zero-copy-send", "state": true}]}),
    );
    assert!(e.contains(QEMU_REFUSAL), "{e}");
    src.caps(&SRC_CAPS);
    // With a compression, then with TLS, each after the capability.
    let e = src.err(
        "migrate-set-parameters",
        json!({"multifd-compression": "zstd"}),
    );
    assert!(e.contains(QEMU_REFUSAL), "{e}");
    let e = src.err("migrate-set-parameters", json!({"tls-creds": "tls0"}));
    assert!(e.contains(QEMU_REFUSAL), "{e}");
    let q = src.c("query-migrate-capabilities", json!({}));
    assert!(
        q.as_array().is_some_and(|a| a
            .iter()
            .any(|c| c["capability"] == "zero-copy-send" && c["state"] == true)),
        "the refusals changed nothing: {q}"
    );
    // A unix: URI: MSG_ZEROCOPY is for TCP; the migration fails at setup, naming it.
    let mut dst = dest(dir.path(), "dst", &m);
    dst.caps(&DST_CAPS);
    let uri = dst.listen_unix(&dir.path().join("mig.sock"));
    src.c("migrate", json!({ "uri": uri }));
    let q = src.wait_mig(&["failed"], T);
    let desc = error_desc(&q);
    assert!(
        desc.contains("zero-copy-send needs a tcp: URI"),
        "source error-desc: {desc}"
    );
    assert_source_runs_on(&mut src);
    src.quit_ok();
}

#[test]
fn zero_copy_channel_killed_mid_pass_fails_the_source_runs_on_and_a_retry_succeeds() {
    let dir = tmpdir();
    let m = guest();
    let (mut src, mut dst) = pair(dir.path(), &m);
    // Slow enough that the first pass (256 MiB) is far from done when the channel dies.
    src.params(json!({ "max-bandwidth": 32 << 20 }));
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
    let (st, _log) = dst.wait_gone(T);
    assert!(!st.success(), "destination exit status {st}");
    eprintln!("zero-copy channel 2 cut: source: {desc}; destination exited ({st})");
    assert_source_runs_on(&mut src);

    // The same source, zero-copy still on, to a fresh destination: completes.
    let mut dst2 = dest(dir.path(), "dst2", &m);
    dst2.caps(&DST_CAPS);
    dst2.params(json!({ "multifd-channels": 2 }));
    converge(&mut src);
    src.drain_events();
    let uri = dst2.listen_tcp();
    src.c("migrate", json!({ "uri": uri }));
    src.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    dst2.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    assert_handover(&mut src, &mut dst2);
    assert_pattern_ok(&mut dst2, &m, dir.path(), "zero-copy-retry");
    dst2.quit_ok();
    src.quit_ok();
}
