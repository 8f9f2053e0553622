//! `multifd-compression` zlib and zstd (`docs/stream-format.md` §5.3, `docs/migration-engine.md`
//! §2.5) with real `tern run` processes and real sockets: 2 channels with a guest that
//! dirties memory during pre-copy, the `pattern` check on the destination, and the channels
//! carrying fewer bytes than the pages' data; a one-sided setting refused at once with the
//! source running on.

mod common;

use common::multifd::*;
use common::*;
use serde_json::json;

/// [`pattern_guest`] (as `multifd.rs`): its pages are one repeated byte, very compressible.
fn migrate_compressed(method: &str, level_param: &str, level: u8) {
    let dir = tmpdir();
    let dir = dir.path();
    let m = pattern_guest();
    let params = json!({ "multifd-channels": 2, "multifd-compression": method });
    let (mut src, mut dst) = pair(dir, &m, &MULTIFD_CAPS, &MULTIFD_CAPS, params);
    src.params(json!({ level_param: level }));
    let p = src.c("query-migrate-parameters", json!({}));
    assert_eq!(p["multifd-compression"], method, "{p}");
    assert_eq!(p[level_param], level, "{p}");
    let q = migrate_to_completion(&mut src, &mut dst);
    let multifd = ram_num(&q, "multifd-bytes");
    let normal = ram_num(&q, "normal-bytes");
    let transferred = ram_num(&q, "transferred");
    eprintln!(
        "multifd {method} level {level}: multifd-bytes {multifd}, normal-bytes {normal}, \
         transferred {transferred}, passes {}",
        ram_num(&q, "dirty-sync-count")
    );
    // The pages' data went over the channels compressed: far fewer bytes than the data.
    assert!(normal > 8 << 20, "{q}");
    assert!(multifd > 0 && multifd * 4 < normal, "{q}");
    assert!(transferred > multifd, "{q}");
    assert_handover_and_pattern(src, dst, &m, dir, &format!("multifd-{method}"));
}

#[test]
fn multifd_zlib_2_channels_pattern_guest_completes() {
    migrate_compressed("zlib", "multifd-zlib-level", 1);
}

#[test]
fn multifd_zstd_2_channels_pattern_guest_completes() {
    migrate_compressed("zstd", "multifd-zstd-level", 3);
}

#[test]
fn a_one_sided_or_different_compression_is_refused_at_once_and_the_source_runs_on() {
    let dir = tmpdir();
    let m = Machine::pattern(1, 16).memory(128);
    let mut src = boot(dir.path(), "src", &m);
    src.wait_workload_running(T);
    for (i, (at_src, at_dst)) in [("zstd", "none"), ("none", "zlib"), ("zlib", "zstd")]
        .into_iter()
        .enumerate()
    {
        let mut dst = dest(dir.path(), &format!("dst{i}"), &m);
        for (vm, method) in [(&mut src, at_src), (&mut dst, at_dst)] {
            vm.caps(&MULTIFD_CAPS);
            vm.params(json!({ "multifd-channels": 2, "multifd-compression": method }));
        }
        let text = format!("multifd-compression: source {at_src}, destination {at_dst}");
        let q = assert_refused_at_once(&mut src, dst, &text);
        assert_eq!(ram_num(&q, "multifd-bytes"), 0, "{q}");
    }
    src.quit_ok();
}
