//! `release-ram` through the engine with fakes (`docs/postcopy.md` §6, decision 180): the
//! source frees each page once the destination confirmed it, so at the end every page is
//! freed; a freed page of the fake reads as `RELEASED_BYTE`s, so one sent after it was freed
//! (a recovery re-sending it) would make the destination's memory differ from the source's.

mod common;

use std::time::Duration;

use common::*;
use tern_migration::dest::{DestHandle, DestOptions, Incoming};
use tern_migration::events::Event;
use tern_migration::fakes::{Dirtier, FakeMachine};
use tern_migration::source::{SourceHandle, SourceOptions, Target, Tuning};
use tern_migration::status::MigrationStatus as S;
use tern_migration::transport::{Listener, MigrationUri};

const DEADLINE: Duration = Duration::from_secs(60);

/// Both sides in `postcopy-active` after RUN with `release-ram`, the push at `push` bytes/s.
fn running(push: u64) -> (SrcSide, DstSide, SourceHandle, DestHandle, Dirtier) {
    running_with(push, |_| {})
}

/// [`running`], with `prepare` called on the source side before the migration starts.
fn running_with(
    push: u64,
    prepare: impl FnOnce(&SrcSide),
) -> (SrcSide, DstSide, SourceHandle, DestHandle, Dirtier) {
    let setup = Setup::default();
    let (src, sm) = source_side(&setup);
    prepare(&src);
    let (dst, dm) = dest_side(&setup, FakeMachine::new(2, UUID));
    let (pager, dm) = with_pager(&dst, dm);
    let (a, b) = socketpair();
    let dopts = DestOptions {
        postcopy_ram: true,
        ..dst_opts(false)
    };
    let d = start_dest(&dst, dm, Incoming::Stream(b), dopts);
    let tuning = Tuning {
        max_postcopy_bandwidth: push,
        ..non_converge()
    };
    let sopts = SourceOptions {
        postcopy_ram: true,
        release_ram: true,
        ..src_opts(tuning, false)
    };
    let guest = dirtying(&src, DEADLINE);
    let s = start_source(&src, sm, Target::Stream(a), sopts);
    wait_pass(&src.events, 2);
    s.start_postcopy().expect("migrate-start-postcopy");
    pager.wait_started();
    wait_event(&dst.events, "RESUME on the destination", |e| {
        *e == Event::Resume
    });
    (src, dst, s, d, guest)
}

fn released_json(src: &SrcSide) -> u64 {
    let q = src.stats.to_query_migrate_json();
    q["x-tern-release-ram"]["released-pages"]
        .as_u64()
        .unwrap_or_else(|| panic!("no x-tern-release-ram in {q}"))
}

#[test]
fn release_ram_frees_every_page_and_the_destination_gets_every_one_intact() {
    let (src, dst, s, d, guest) = running(0);
    wait_entered(&src.events, S::Completed, 1, DEADLINE);
    let so = s.join().unwrap();
    let dout = d.join().unwrap();
    guest.stop();
    assert_eq!(so.status, S::Completed, "{:?}", so.error);
    assert_eq!(dout.status, S::Completed, "{:?}", dout.error);
    assert_ram_equal(&src, &dst);
    let total = src.ram.total_pages();
    assert_eq!(
        src.ram.released_pages(),
        total,
        "every page freed at the end"
    );
    assert_eq!(released_json(&src), total);
}

/// A channel cut while pages are written and not yet confirmed: the recovery's bitmap decides
/// what is freed and what is sent again, and nothing freed is ever sent.
#[test]
fn release_ram_with_a_recovery_never_sends_a_freed_page() {
    let dir = tempfile::tempdir().unwrap();
    // A slow push: pages are in flight and missing when the channel is cut.
    let (src, dst, s, d, guest) = running(64 << 10);
    s.pause().expect("migrate-pause");
    wait_entered(&src.events, S::PostcopyPaused, 1, DEADLINE);
    wait_entered(&dst.events, S::PostcopyPaused, 1, DEADLINE);
    // Whatever was freed so far was confirmed; the rest waits for the bitmap.
    assert!(src.ram.released_pages() < src.ram.total_pages());
    s.set_tuning(non_converge());
    let uri = MigrationUri::Unix {
        path: dir.path().join("r"),
    };
    d.recover(Listener::bind(&uri).expect("bind"))
        .expect("migrate-recover");
    s.resume(uri).expect("migrate resume");
    wait_entered(&src.events, S::Completed, 1, DEADLINE);
    let so = s.join().unwrap();
    let dout = d.join().unwrap();
    guest.stop();
    assert_eq!(so.status, S::Completed, "{:?}", so.error);
    assert_eq!(dout.status, S::Completed, "{:?}", dout.error);
    assert_ram_equal(&src, &dst);
    assert_eq!(src.ram.released_pages(), src.ram.total_pages());
    let q = src.stats.to_query_migrate_json();
    let r = &q["x-tern-postcopy-recovery"];
    assert_eq!(r["recoveries"], 1, "{q}");
    assert_eq!(r["failed-attempts"], 0, "{q}");
    assert_eq!(r["list"].as_array().map(Vec::len), Some(1), "{q}");
    assert!(
        r["list"][0]["missing-pages"].as_u64().unwrap_or(0) > 0,
        "{q}"
    );
}

/// A machine that cannot free memory: releasing stops, says why in `x-tern-release-ram`, and
/// the migration completes with every page.
#[test]
fn a_machine_that_cannot_release_completes_the_migration_and_says_why() {
    let (src, dst, s, d, guest) = running_with(0, |src| src.ram.refuse_discards());
    wait_entered(&src.events, S::Completed, 1, DEADLINE);
    let so = s.join().unwrap();
    let dout = d.join().unwrap();
    guest.stop();
    assert_eq!(so.status, S::Completed, "{:?}", so.error);
    assert_eq!(dout.status, S::Completed, "{:?}", dout.error);
    assert_ram_equal(&src, &dst);
    assert_eq!(src.ram.released_pages(), 0);
    let q = src.stats.to_query_migrate_json();
    let r = &q["x-tern-release-ram"];
    assert_eq!(r["released-pages"], 0, "{q}");
    let e = r["error"].as_str().unwrap_or_default();
    assert!(
        e.contains("nothing more is released") && e.contains("cannot free memory"),
        "{q}"
    );
}
