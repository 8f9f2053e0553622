//! Multifd (`docs/migration-engine.md` §2.5, `docs/stream-format.md` §5.2) with real `tern
//! run` processes and real sockets: 1, 2 and 4 channels with a guest that dirties memory
//! during pre-copy (the `pattern` check on the destination), a one-sided capability and a
//! different channel count refused at once with the source running on, and a channel killed
//! mid-pass by a proxy (the migration fails, the source runs on, a second migration succeeds).
//! Over TLS: `tls.rs` `multifd_over_tls_2_channels`.

mod common;

use common::multifd::*;
use common::*;
use serde_json::json;

/// Migrates `src` to a fresh destination with `channels` multifd channels; both sides
/// `completed`, handover, `multifd-bytes` carried the pages, the pattern checks.
fn migrate_multifd(dir: &std::path::Path, channels: u8) {
    let m = pattern_guest();
    let params = json!({ "multifd-channels": channels });
    let (mut src, mut dst) = pair(dir, &m, &MULTIFD_CAPS, &MULTIFD_CAPS, params);
    let q = migrate_to_completion(&mut src, &mut dst);
    let multifd = ram_num(&q, "multifd-bytes");
    let transferred = ram_num(&q, "transferred");
    let passes = ram_num(&q, "dirty-sync-count");
    eprintln!(
        "multifd {channels} channel(s): multifd-bytes {multifd}, transferred {transferred}, \
         passes {passes}"
    );
    // The pages went over the channels: the main stream carried only commands and state.
    assert!(multifd > 8 << 20, "{q}");
    // Every channel's bytes count: at least the data of every normal page.
    assert!(multifd >= ram_num(&q, "normal-bytes"), "{q}");
    assert!(
        transferred > multifd,
        "transferred includes multifd-bytes: {q}"
    );
    assert!(
        transferred - multifd < 1 << 20,
        "RAM on the main stream? {q}"
    );
    assert!(passes >= 2, "the guest dirtied memory during pre-copy: {q}");
    assert_handover_and_pattern(src, dst, &m, dir, &format!("multifd-{channels}"));
}

#[test]
fn multifd_1_channel_pattern_guest_completes() {
    migrate_multifd(tmpdir().path(), 1);
}

#[test]
fn multifd_2_channels_pattern_guest_completes() {
    migrate_multifd(tmpdir().path(), 2);
}

#[test]
fn multifd_4_channels_pattern_guest_completes() {
    migrate_multifd(tmpdir().path(), 4);
}

#[test]
fn multifd_on_one_side_or_a_different_channel_count_is_refused_at_once_and_the_source_runs_on() {
    let dir = tmpdir();
    let m = Machine::pattern(1, 16).memory(128);
    let mut src = boot(dir.path(), "src", &m);
    src.wait_workload_running(T);
    // (source caps, destination caps, source channels, destination channels, expected text)
    let cases: [(bool, bool, u8, u8, &str); 3] = [
        (
            true,
            false,
            2,
            2,
            "capability 'multifd' is on at the source but off at the destination",
        ),
        (
            false,
            true,
            2,
            2,
            "capability 'multifd' is off at the source but on at the destination",
        ),
        (
            true,
            true,
            4,
            2,
            "multifd-channels: source 4, destination 2",
        ),
    ];
    for (i, (s_on, d_on, s_n, d_n, text)) in cases.into_iter().enumerate() {
        let mut dst = dest(dir.path(), &format!("dst{i}"), &m);
        src.caps(&[("events", true), ("return-path", true), ("multifd", s_on)]);
        dst.caps(&[("events", true), ("return-path", true), ("multifd", d_on)]);
        src.params(json!({ "multifd-channels": s_n }));
        dst.params(json!({ "multifd-channels": d_n }));
        assert_refused_at_once(&mut src, dst, text);
    }
    src.quit_ok();
}

#[test]
fn multifd_channel_killed_mid_pass_fails_the_source_runs_on_and_a_retry_succeeds() {
    let dir = tmpdir();
    let m = pattern_guest();
    let params = json!({ "multifd-channels": 2 });
    let (mut src, mut dst) = pair(dir.path(), &m, &MULTIFD_CAPS, &MULTIFD_CAPS, params);
    let (desc, st, log) = cut_a_channel_mid_pass(&mut src, &mut dst);
    assert!(
        log.contains("incoming migration failed") && log.contains("multifd channel"),
        "destination stderr:\n{log}"
    );
    eprintln!("channel 2 cut: source: {desc}; destination exited ({st})");
    assert_source_runs_on(&mut src);

    // A second migration, directly, succeeds.
    retry_completes(dir.path(), src, &m, "multifd-retry");
}
