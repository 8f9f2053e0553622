//! `zero-copy-send` (`docs/migration-engine.md` §2.5, decisions 220–226) with real `tern run`
//! processes over real sockets: multifd with 2 channels sending with `MSG_ZEROCOPY` on
//! loopback (the `pattern` check on the destination; the kernel copies on local delivery, so
//! `dirty-sync-missed-zero-copy` counts), QEMU's refusals (without multifd, with TLS, with a
//! compression) and Tern's (a unix: URI) naming the reason, and a channel killed mid-pass
//! (the migration fails, the source runs on, a retry with zero-copy completes).

mod common;

use common::multifd::{
    assert_handover_and_pattern, cut_a_channel_mid_pass, migrate_to_completion, pattern_guest,
    retry_completes, MULTIFD_CAPS,
};
use common::*;
use serde_json::json;

// The guest of `multifd.rs` ([`pattern_guest`]): pages are dirtied (and re-sent) while
// zero-copy sends are in flight.

/// `zero-copy-send` is the source's capability (QEMU's: the destination does not read it).
const SRC_CAPS: [(&str, bool); 4] = [
    ("events", true),
    ("return-path", true),
    ("multifd", true),
    ("zero-copy-send", true),
];
const DST_CAPS: [(&str, bool); 3] = MULTIFD_CAPS;

const QEMU_REFUSAL: &str = "Zero copy only available for non-compressed non-TLS multifd migration";

fn pair(dir: &std::path::Path, m: &Machine) -> (Vm, Vm) {
    let params = json!({ "multifd-channels": 2 });
    common::multifd::pair(dir, m, &SRC_CAPS, &DST_CAPS, params)
}

#[test]
fn multifd_2_channels_zero_copy_send_pattern_guest_completes_and_counts_the_kernels_copies() {
    let dir = tmpdir();
    let m = pattern_guest();
    let (mut src, mut dst) = pair(dir.path(), &m);
    let q = migrate_to_completion(&mut src, &mut dst);
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
    assert_handover_and_pattern(src, dst, &m, dir.path(), "zero-copy-2");
}

#[test]
fn zero_copy_send_refusals_name_the_reason_and_a_unix_uri_fails_with_the_source_running_on() {
    let dir = tmpdir();
    let m = pattern_guest();
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
    let m = pattern_guest();
    let (mut src, mut dst) = pair(dir.path(), &m);
    let (desc, st, _log) = cut_a_channel_mid_pass(&mut src, &mut dst);
    eprintln!("zero-copy channel 2 cut: source: {desc}; destination exited ({st})");
    assert_source_runs_on(&mut src);

    // The same source, zero-copy still on, to a fresh destination: completes.
    retry_completes(dir.path(), src, &m, "zero-copy-retry");
}
