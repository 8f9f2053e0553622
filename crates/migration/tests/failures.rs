//! Failure semantics: cancel in every reachable state, destination errors, broken streams.
//! Every failure before the switchover must leave the source exactly as it was (running,
//! dirty log off) with a useful `error-desc`.

mod common;

use common::*;
use tern_migration::dest::Incoming;
use tern_migration::events::Event;
use tern_migration::fakes::{FakeMachine, Signal};
use tern_migration::machine::VcpuControl;
use tern_migration::source::Target;
use tern_migration::status::MigrationStatus as S;
use tern_migration::transport::{Listener, MigrationUri};

#[test]
fn cancel_in_setup() {
    let setup = Setup::default();
    let (mut src, mut sm) = source_side(&setup);
    // Hold the sender inside setup (start_dirty_log) until the cancel was issued.
    let gate = Signal::new();
    src.ram.hooks.setup_gate = Some(gate.clone());
    sm.ram = Box::new(src.ram.clone());
    let (dst, dm) = dest_side(&setup, FakeMachine::new(2, UUID));
    let (a, b) = socketpair();
    let d = start_dest(&dst, dm, Incoming::Stream(b), dst_opts(false));
    let s = start_source(&src, sm, Target::Stream(a), src_opts(converge(), false));
    src.ram.hooks.entered_setup.wait();
    assert_eq!(s.status(), S::Setup);
    s.cancel();
    gate.set();
    let so = s.join().unwrap();
    assert_eq!(so.status, S::Cancelled);
    // QEMU shows no error-desc for a cancel; Tern says who cancelled.
    assert_eq!(
        so.error.as_deref(),
        Some("migration cancelled by the user (migrate_cancel)")
    );
    assert_eq!(
        src.events.statuses(),
        [S::Setup, S::Cancelling, S::Cancelled]
    );
    assert_eq!(d.join().unwrap().status, S::Failed);
    assert_source_restored(&src, true);
    assert_eq!(src.vcpus.counts(), (0, 0));
}

#[test]
fn cancel_while_active() {
    let (src, sm, dst, guest, a, d) = dirty_pair(u64::MAX, false);
    let s = start_source(&src, sm, Target::Stream(a), src_opts(non_converge(), false));
    wait_pass(&src.events, 3);
    s.cancel();
    let so = s.join().unwrap();
    let dout = d.join().unwrap();
    guest.stop();
    assert_eq!(so.status, S::Cancelled);
    assert_eq!(dout.status, S::Failed);
    assert!(dout.error.is_some());
    assert_source_restored(&src, true);
    assert_eq!(src.vcpus.counts(), (0, 0));
    assert!(!dst.vcpus.is_running(), "a failed destination never runs");
    assert_eq!(src.stats.to_query_migrate_json()["status"], "cancelled");
}

#[test]
fn cancel_in_pre_switchover_resumes_the_source() {
    let (src, sm, _dst, guest, a, d) = dirty_pair(2_000, false);
    let mut opts = src_opts(converge(), false);
    opts.pause_before_switchover = true;
    let s = start_source(&src, sm, Target::Stream(a), opts);
    wait_status(&src.events, S::PreSwitchover);
    assert!(!src.vcpus.is_running());
    s.cancel();
    let so = s.join().unwrap();
    guest.stop();
    assert_eq!(so.status, S::Cancelled);
    assert_eq!(d.join().unwrap().status, S::Failed);
    assert_source_restored(&src, true);
    assert_eq!(src.vcpus.counts(), (1, 1), "paused once, resumed once");
    let ev = src.events.events();
    assert!(ev.contains(&Event::Stop) && ev.contains(&Event::Resume));
    // Downtime is not reported for a cancelled switchover.
    assert_eq!(src.stats.snapshot().downtime_ms, None);
}

#[test]
fn cancel_after_completion_is_a_no_op() {
    let setup = Setup::default();
    let (src, sm) = source_side(&setup);
    let (dst, dm) = dest_side(&setup, FakeMachine::new(2, UUID));
    let (a, b) = socketpair();
    let d = start_dest(&dst, dm, Incoming::Stream(b), dst_opts(false));
    let s = start_source(&src, sm, Target::Stream(a), src_opts(converge(), false));
    wait_status(&src.events, S::Completed);
    s.cancel();
    assert_eq!(s.status(), S::Completed);
    assert_eq!(s.join().unwrap().status, S::Completed);
    d.cancel();
    assert_eq!(d.join().unwrap().status, S::Completed);
    assert!(!src.vcpus.is_running());
    assert!(dst.vcpus.is_running());
}

#[test]
fn cancel_keeps_a_user_paused_source_paused() {
    let setup = Setup {
        src_running: false,
        ..Setup::default()
    };
    let (src, sm) = source_side(&setup);
    let (dst, dm) = dest_side(&setup, FakeMachine::new(2, UUID));
    let (a, b) = socketpair();
    let d = start_dest(&dst, dm, Incoming::Stream(b), dst_opts(false));
    let mut opts = src_opts(converge(), false);
    opts.pause_before_switchover = true;
    let s = start_source(&src, sm, Target::Stream(a), opts);
    wait_status(&src.events, S::PreSwitchover);
    s.cancel();
    assert_eq!(s.join().unwrap().status, S::Cancelled);
    assert_eq!(d.join().unwrap().status, S::Failed);
    assert_source_restored(&src, false);
    assert_eq!(src.vcpus.counts(), (0, 0), "never touched a stopped VM");
}

#[test]
fn cancel_waiting_for_a_source_fails_the_destination() {
    let setup = Setup::default();
    let (dst, dm) = dest_side(&setup, FakeMachine::new(2, UUID));
    let l = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let d = start_dest(&dst, dm, Incoming::Listener(l), dst_opts(false));
    wait_status(&dst.events, S::Setup);
    d.cancel();
    let out = d.join().unwrap();
    assert_eq!(out.status, S::Failed);
    assert_eq!(out.error.as_deref(), Some("incoming migration cancelled"));
}

#[test]
fn destination_error_text_reaches_the_source() {
    let setup = Setup::default();
    let (src, sm) = source_side(&setup);
    let mut bad = FakeMachine::new(2, UUID);
    bad.reject = Some("checksum of the serial FIFO is wrong (test)".into());
    let (dst, dm) = dest_side(&setup, bad);
    let guest = dirty(&src, 5_000);
    let (a, b) = socketpair();
    let d = start_dest(&dst, dm, Incoming::Stream(b), dst_opts(false));
    let s = start_source(&src, sm, Target::Stream(a), src_opts(converge(), false));
    let so = s.join().unwrap();
    let dout = d.join().unwrap();
    guest.stop();
    assert_eq!(dout.status, S::Failed);
    assert_eq!(so.status, S::Failed);
    let desc = so.error.unwrap();
    assert!(
        desc.contains("checksum of the serial FIFO is wrong (test)"),
        "{desc}"
    );
    assert!(desc.starts_with("destination failed: "), "{desc}");
    // The destination said it failed, so the source safely runs again.
    assert_source_restored(&src, true);
    assert_eq!(src.vcpus.counts(), (1, 1));
    assert!(!dst.vcpus.is_running());
    let q = src.stats.to_query_migrate_json();
    assert_eq!(q["status"], "failed");
    assert_eq!(q["error-desc"], desc.as_str());
}

#[test]
fn config_mismatch_names_the_field_on_both_sides() {
    let setup = Setup::default();
    let (src, sm) = source_side(&setup);
    let (dst, dm) = dest_side(&setup, FakeMachine::new(4, UUID));
    let (a, b) = socketpair();
    let d = start_dest(&dst, dm, Incoming::Stream(b), dst_opts(false));
    let s = start_source(&src, sm, Target::Stream(a), src_opts(converge(), false));
    let dout = d.join().unwrap();
    let so = s.join().unwrap();
    assert_eq!(dout.status, S::Failed);
    let derr = dout.error.unwrap();
    assert!(
        derr.contains("vCPU count: source 2, destination 4"),
        "{derr}"
    );
    assert_eq!(so.status, S::Failed);
    let serr = so.error.unwrap();
    assert!(serr.contains("vCPU count"), "{serr}");
    assert_source_restored(&src, true);
}

#[test]
fn validate_uuid_rejects_another_vm() {
    let setup = Setup::default();
    let (src, sm) = source_side(&setup);
    let (dst, dm) = dest_side(&setup, FakeMachine::new(2, uuid::Uuid::from_u128(9)));
    let (a, b) = socketpair();
    let mut dopts = dst_opts(false);
    dopts.validate_uuid = true;
    let d = start_dest(&dst, dm, Incoming::Stream(b), dopts);
    let s = start_source(&src, sm, Target::Stream(a), src_opts(converge(), false));
    let dout = d.join().unwrap();
    assert_eq!(s.join().unwrap().status, S::Failed);
    assert!(dout.error.unwrap().contains("VM UUID"));
    assert_source_restored(&src, true);
}

#[test]
fn connect_refused_fails_with_the_address() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let uri: MigrationUri = format!("tcp:127.0.0.1:{port}").parse().unwrap();
    let (src, sm) = source_side(&Setup::default());
    let s = start_source(&src, sm, Target::Uri(uri), src_opts(converge(), false));
    let so = s.join().unwrap();
    assert_eq!(so.status, S::Failed);
    let e = so.error.unwrap();
    assert!(e.contains(&format!("tcp:127.0.0.1:{port}")), "{e}");
    assert_source_restored(&src, true);
    assert_eq!(
        src.stats.to_query_migrate_json(),
        serde_json::json!({"status": "failed", "error-desc": e})
    );
}

#[test]
fn truncated_stream_fails_both_sides_cleanly() {
    let setup = Setup::default();
    let (src, sm) = source_side(&setup);
    let (dst, dm) = dest_side(&setup, FakeMachine::new(2, UUID));
    let guest = dirty(&src, 5_000);
    let (a, b) = proxy(Some(300_000), None);
    let d = start_dest(&dst, dm, Incoming::Stream(b), dst_opts(false));
    let s = start_source(&src, sm, Target::Stream(a), src_opts(converge(), false));
    let dout = d.join().unwrap();
    let so = s.join().unwrap();
    guest.stop();
    assert_eq!(dout.status, S::Failed);
    assert!(dout.error.unwrap().contains("truncated"));
    assert_eq!(so.status, S::Failed);
    assert!(so.error.is_some());
    assert_source_restored(&src, true);
    assert!(!dst.vcpus.is_running());
    assert_eq!(*dst.machine.restored.lock().unwrap(), None);
}

/// A flipped byte inside page data is caught by its RAM batch's own checksum (stream version
/// 5) when that batch arrives, in the first pass: the destination fails naming the batch and
/// never places a page of it, and the source, told so, fails without ever having paused its
/// guest. (Up to version 4 only END's checksum saw it, after the source had paused and sent
/// everything.) The tuning never converges, so the source can only stop because of the
/// destination's error.
#[test]
fn corrupted_page_is_refused_with_its_batch_and_the_source_never_pauses() {
    const FLIP_AT: u64 = 500_000;
    let setup = Setup {
        fill_percent: 100,
        ..Setup::default()
    };
    let (src, sm) = source_side(&setup);
    let (dst, dm) = dest_side(&setup, FakeMachine::new(2, UUID));
    let guest = dirty(&src, 5_000);
    let (a, b) = proxy(None, Some(FLIP_AT));
    let d = start_dest(&dst, dm, Incoming::Stream(b), dst_opts(false));
    let s = start_source(&src, sm, Target::Stream(a), src_opts(non_converge(), false));
    let dout = d.join().unwrap();
    let so = s.join().unwrap();
    guest.stop();
    assert_eq!(dout.status, S::Failed);
    let derr = dout.error.unwrap();
    assert!(
        derr.contains("RAM batch") && derr.contains("checksum mismatch"),
        "{derr}"
    );
    // The batch named is the one holding the flipped byte (a batch is at most 1 MiB + 29).
    let at: u64 = derr
        .split("at byte ")
        .nth(1)
        .and_then(|r| r.split(':').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no batch offset in {derr}"));
    assert!(
        at <= FLIP_AT && FLIP_AT - at < (1 << 20) + 29,
        "batch at {at}: {derr}"
    );
    assert_eq!(so.status, S::Failed);
    let serr = so.error.unwrap_or_default();
    assert!(serr.contains("checksum mismatch"), "{serr}");
    assert_source_restored(&src, true);
    assert_eq!(
        src.vcpus.counts(),
        (0, 0),
        "the source never paused its guest"
    );
    assert!(!dst.vcpus.is_running());
    assert_eq!(*dst.machine.restored.lock().unwrap(), None);
}

#[test]
fn destination_vanishing_mid_stream_leaves_the_source_running() {
    let setup = Setup::default();
    let (src, sm) = source_side(&setup);
    let guest = dirty(&src, u64::MAX);
    let (a, b) = socketpair();
    let s = start_source(&src, sm, Target::Stream(a), src_opts(non_converge(), false));
    wait_status(&src.events, S::Active);
    drop(b); // the destination process dies (nobody read anything)
    let so = s.join().unwrap();
    guest.stop();
    assert_eq!(so.status, S::Failed);
    assert!(so.error.is_some());
    assert_source_restored(&src, true);
}

/// Same as above over TCP, where the destination closing with unread data sends a reset: the
/// source must still read the destination's ERROR before the reset.
#[test]
fn destination_error_text_survives_a_tcp_reset() {
    let setup = Setup {
        fill_percent: 100,
        ..Setup::default()
    };
    let (src, sm) = source_side(&setup);
    let (dst, dm) = dest_side(&setup, FakeMachine::new(3, UUID));
    let guest = dirty(&src, 5_000);
    let l = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let uri = l.local_uri();
    let d = start_dest(&dst, dm, Incoming::Listener(l), dst_opts(false));
    let s = start_source(&src, sm, Target::Uri(uri), src_opts(non_converge(), false));
    let dout = d.join().unwrap();
    let so = s.join().unwrap();
    guest.stop();
    assert_eq!(dout.status, S::Failed);
    assert_eq!(so.status, S::Failed);
    let e = so.error.unwrap();
    assert!(e.contains("vCPU count: source 2, destination 3"), "{e}");
    assert_source_restored(&src, true);
}
