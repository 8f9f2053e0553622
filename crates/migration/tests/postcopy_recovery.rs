//! Post-copy recovery through the engine with fakes (`docs/postcopy.md` §4, stream format
//! §13.6): a channel cut by `migrate-pause` (a real socket shutdown) pauses both sides; a
//! recovery channel over a real unix socket brings the missing pages; a failed attempt (the
//! source cannot connect; a hostile channel at the destination) goes back to
//! `postcopy-paused` and can be recovered again. Waits poll a condition with a deadline.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tern_migration::dest::{DestHandle, Incoming};
use tern_migration::events::Event;
use tern_migration::fakes::{FakeMachine, FakePager};
use tern_migration::machine::VcpuControl;
use tern_migration::source::{Handover, SourceHandle, SourceOptions, Target, Tuning};
use tern_migration::status::MigrationStatus as S;
use tern_migration::transport::{Listener, MigrationUri};

const DEADLINE: Duration = Duration::from_secs(60);

fn unix_uri(dir: &std::path::Path, name: &str) -> MigrationUri {
    MigrationUri::Unix {
        path: dir.join(name),
    }
}

/// Source and destination in `postcopy-active` after RUN, the push slowed to one page a
/// second so that pages are missing when the channel breaks.
fn running_postcopy() -> (
    SrcSide,
    DstSide,
    FakePager,
    SourceHandle,
    DestHandle,
    tern_migration::fakes::Dirtier,
) {
    let setup = Setup::default();
    let (src, sm) = source_side(&setup);
    let (dst, dm) = dest_side(&setup, FakeMachine::new(2, UUID));
    let (pager, dm) = with_pager(&dst, dm);
    let (a, b) = socketpair();
    let dopts = tern_migration::dest::DestOptions {
        postcopy_ram: true,
        ..dst_opts(false)
    };
    let d = start_dest(&dst, dm, Incoming::Stream(b), dopts);
    let tuning = Tuning {
        max_postcopy_bandwidth: 4096,
        ..non_converge()
    };
    let sopts = SourceOptions {
        postcopy_ram: true,
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
    (src, dst, pager, s, d, guest)
}

/// Lets the push run at full speed and recovers over `uri`.
fn recover(s: &SourceHandle, d: &DestHandle, uri: &MigrationUri) {
    s.set_tuning(non_converge());
    d.recover(Listener::bind(uri).expect("bind the recovery listener"))
        .expect("migrate-recover");
    s.resume(uri.clone()).expect("migrate resume");
}

#[test]
fn migrate_pause_then_recover_completes_with_every_page() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst, pager, s, d, guest) = running_postcopy();
    // Not paused yet: recovery and resume are refused with QEMU's texts.
    assert!(d
        .recover(Listener::bind(&unix_uri(dir.path(), "x")).unwrap())
        .is_err());
    assert_eq!(
        s.resume(unix_uri(dir.path(), "x")).unwrap_err(),
        "Cannot resume if there is no paused migration"
    );
    s.pause().expect("migrate-pause in postcopy-active");
    wait_entered(&src.events, S::PostcopyPaused, 1, DEADLINE);
    wait_entered(&dst.events, S::PostcopyPaused, 1, DEADLINE);
    assert!(s.pause().is_err(), "migrate-pause while paused is refused");
    assert!(d.pause().is_err(), "migrate-pause while paused is refused");
    let q = dst.stats.to_query_migrate_json();
    let missing = q["x-tern-postcopy-missing-pages"].as_u64().unwrap_or(0);
    assert!(missing > 0, "{q}");
    let e = q["error-desc"].as_str().unwrap_or_default().to_owned();
    // The destination cannot tell a pause on the other side from a cut link.
    assert!(
        e.contains("connection to the source was lost")
            && e.contains("pages have not been received"),
        "{e}"
    );
    let e = src.stats.to_query_migrate_json()["error-desc"].to_string();
    assert!(e.contains("migrate-pause cut the connection"), "{e}");
    // The guest faults while the link is down: the request is kept and sent at recovery.
    let late = (0..src.ram.total_pages() as u32)
        .find(|p| pager.fault(1, *p, 1).unwrap() > 0)
        .expect("a page still missing");
    let served_before = src.stats.snapshot().ram.postcopy_requests;
    recover(&s, &d, &unix_uri(dir.path(), "r1"));
    wait_entered(&src.events, S::Completed, 1, DEADLINE);
    wait_entered(&dst.events, S::Completed, 1, DEADLINE);
    assert_eq!(s.handover(), Handover::DestinationRuns);
    let so = s.join().unwrap();
    let dout = d.join().unwrap();
    assert_eq!(so.status, S::Completed, "{:?}", so.error);
    assert_eq!(dout.status, S::Completed, "{:?}", dout.error);
    guest.stop();
    assert_ram_equal(&src, &dst);
    assert!(pager.finished());
    assert!(!src.vcpus.is_running());
    assert!(dst.vcpus.is_running());
    // The request made while paused reached the source over the recovery channel.
    let served = src.stats.snapshot().ram.postcopy_requests;
    assert!(
        served > served_before,
        "page {late}: {served_before} -> {served}"
    );
    assert_eq!(
        src.events.statuses(),
        [
            S::Setup,
            S::Active,
            S::PostcopyActive,
            S::PostcopyPaused,
            S::PostcopyRecoverSetup,
            S::PostcopyRecover,
            S::PostcopyActive,
            S::Completed
        ]
    );
    assert_eq!(
        dst.events.statuses(),
        [
            S::Setup,
            S::Active,
            S::PostcopyActive,
            S::PostcopyPaused,
            S::PostcopyRecover,
            S::PostcopyActive,
            S::Completed
        ]
    );
    assert!(src.stats.snapshot().error_desc.is_none());
}

/// QEMU's double failure: a recovery attempt that fails goes back to `postcopy-paused`, on
/// each side, and a later one succeeds. The source's first attempt finds nobody listening;
/// the destination's first recovery channel is hostile (a fresh version-3 stream, not a
/// recovery channel) and is refused.
#[test]
fn a_failed_recovery_pauses_again_and_a_second_one_completes() {
    use tern_migration::fakes::FakeRam;
    use tern_migration::machine::{MachineState, RamSink};
    use tern_migration::wire::{Command, Limits, StreamWriter, VERSION_POSTCOPY};

    let dir = tempfile::tempdir().unwrap();
    let (src, dst, pager, s, d, guest) = running_postcopy();
    s.pause().expect("migrate-pause");
    wait_entered(&src.events, S::PostcopyPaused, 1, DEADLINE);
    wait_entered(&dst.events, S::PostcopyPaused, 1, DEADLINE);
    // Source: nobody listens there.
    s.resume(unix_uri(dir.path(), "nobody"))
        .expect("resume accepted");
    wait_entered(&src.events, S::PostcopyPaused, 2, DEADLINE);
    let q = src.stats.to_query_migrate_json();
    let e = q["error-desc"].to_string();
    assert!(e.contains("post-copy paused"), "{e}");
    assert!(e.contains("while connecting the recovery channel"), "{e}");
    assert_eq!(q["x-tern-postcopy-recovery"]["failed-attempts"], 1, "{q}");
    // Destination: a stream that is not a recovery channel.
    let bad = unix_uri(dir.path(), "hostile");
    d.recover(Listener::bind(&bad).unwrap())
        .expect("migrate-recover");
    let MigrationUri::Unix { path } = &bad else {
        unreachable!()
    };
    let sock = std::os::unix::net::UnixStream::connect(path).expect("connect");
    let ram = FakeRam::small();
    let cfg = FakeMachine::new(2, UUID)
        .describe()
        .stream_config(ram.page_size(), ram.blocks());
    let mut w = StreamWriter::with_version(sock, &cfg, &Limits::default(), VERSION_POSTCOPY)
        .expect("header");
    // The destination may refuse the header and close before these reach it (EPIPE here):
    // what it says about the stream is what is checked.
    let _ = w.write_command(Command::OpenReturnPath);
    let _ = w.flush();
    wait_entered(&dst.events, S::PostcopyPaused, 2, DEADLINE);
    let e = dst.stats.to_query_migrate_json()["error-desc"].to_string();
    assert!(e.contains("recovery channel needs stream version 4"), "{e}");
    drop(w);
    assert!(!pager.finished(), "paging kept through both failures");
    recover(&s, &d, &unix_uri(dir.path(), "good"));
    wait_entered(&src.events, S::Completed, 1, DEADLINE);
    wait_entered(&dst.events, S::Completed, 1, DEADLINE);
    let so = s.join().unwrap();
    let dout = d.join().unwrap();
    assert_eq!(so.status, S::Completed, "{:?}", so.error);
    assert_eq!(dout.status, S::Completed, "{:?}", dout.error);
    guest.stop();
    assert_ram_equal(&src, &dst);
}

/// The source goes away for good: the destination cannot tell it from a cut link, so it
/// pauses, names the missing pages, keeps its vCPUs blocked, and only abandoning it (the
/// glue's `quit`) ends it, `failed` with the pages named.
#[test]
fn the_source_lost_after_run_pauses_the_destination_naming_the_missing_pages() {
    let (src, dst, pager, s, d, guest) = running_postcopy();
    s.cancel();
    wait_status(&src.events, S::Failed);
    let so = s.join().unwrap();
    assert_eq!(so.status, S::Failed);
    assert!(so.error.unwrap_or_default().contains("source stays paused"));
    assert!(!src.vcpus.is_running());
    wait_entered(&dst.events, S::PostcopyPaused, 1, DEADLINE);
    let q = dst.stats.to_query_migrate_json();
    assert!(
        q["x-tern-postcopy-missing-pages"].as_u64().unwrap_or(0) > 0,
        "{q}"
    );
    let e = q["error-desc"].as_str().unwrap_or_default().to_owned();
    assert!(e.contains("connection to the source was lost"), "{e}");
    assert!(!pager.finished());
    assert!(
        !d.cancel(),
        "migrate_cancel cannot undo a post-copy migration"
    );
    d.abandon();
    let dout = d.join().unwrap();
    assert_eq!(dout.status, S::Failed);
    let e = dout.error.unwrap_or_default();
    assert!(e.contains("pages never received"), "{e}");
    assert!(!pager.finished(), "paging kept: the vCPUs stay blocked");
    guest.stop();
}

/// QEMU's `qmp_migrate_recover` releases the listener an earlier call left waiting: a
/// recovery whose source never connected (its management daemon or the link was lost before
/// it did) does not keep a later one from being accepted.
#[test]
fn a_second_migrate_recover_replaces_a_listener_nobody_connected_to() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst, _pager, s, d, guest) = running_postcopy();
    s.pause().expect("migrate-pause");
    wait_entered(&src.events, S::PostcopyPaused, 1, DEADLINE);
    wait_entered(&dst.events, S::PostcopyPaused, 1, DEADLINE);
    d.recover(Listener::bind(&unix_uri(dir.path(), "nobody")).unwrap())
        .expect("first migrate-recover");
    // Refused only until the receiver took the first listener (then it waits in accept).
    let second = unix_uri(dir.path(), "second");
    let end = Instant::now() + DEADLINE;
    loop {
        match d.recover(Listener::bind(&second).expect("bind the second listener")) {
            Ok(()) => break,
            Err(e) => {
                assert!(e.contains("triggered already"), "{e}");
                assert!(Instant::now() < end, "the first listener was never taken");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
    s.set_tuning(non_converge());
    s.resume(second).expect("migrate resume");
    wait_entered(&src.events, S::Completed, 1, DEADLINE);
    wait_entered(&dst.events, S::Completed, 1, DEADLINE);
    let so = s.join().unwrap();
    let dout = d.join().unwrap();
    assert_eq!(so.status, S::Completed, "{:?}", so.error);
    assert_eq!(dout.status, S::Completed, "{:?}", dout.error);
    // Replacing the listener did not pause the destination a second time.
    let paused = dst
        .events
        .statuses()
        .iter()
        .filter(|st| **st == S::PostcopyPaused)
        .count();
    assert_eq!(paused, 1, "{:?}", dst.events.statuses());
    guest.stop();
    assert_ram_equal(&src, &dst);
}
