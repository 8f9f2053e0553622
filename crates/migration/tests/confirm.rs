//! The switchover decision after END: the destination decides, and a source that does not
//! hear the decision (return path closed or cut at the very end, silent destination, cancel)
//! ends `x-tern-unconfirmed`, paused, memory kept, never resumed by itself. A destination that
//! confirms it runs makes the source refuse to run; one that stays paused (no autostart) does
//! not.

mod common;

use std::time::Duration;

use common::*;
use tern_migration::dest::Incoming;
use tern_migration::fakes::FakeMachine;
use tern_migration::machine::VcpuControl;
use tern_migration::source::{Handover, SourceOutcome, Target};
use tern_migration::status::MigrationStatus as S;

/// Asserts the outcome is `x-tern-unconfirmed` with a reason containing `why`, and that the
/// source kept its guest stopped (paused once, never resumed) with dirty logging off.
fn assert_unconfirmed(src: &SrcSide, so: &SourceOutcome, why: &str) {
    assert_eq!(so.status, S::Unconfirmed, "{:?}", so.error);
    let e = so.error.clone().unwrap_or_default();
    assert!(e.contains(why), "error-desc does not say '{why}': {e}");
    assert!(e.contains("`cont` here resumes the guest"), "{e}");
    assert_eq!(src.events.statuses().last(), Some(&S::Unconfirmed));
    assert!(
        !src.vcpus.is_running(),
        "an unconfirmed source must stay paused"
    );
    assert_eq!(src.vcpus.counts(), (1, 0), "paused once, never resumed");
    assert!(!src.ram.logging(), "dirty log still on");
    let q = src.stats.to_query_migrate_json();
    assert_eq!(q["status"], "x-tern-unconfirmed", "{q}");
    assert_eq!(q["error-desc"], serde_json::json!(e), "{q}");
    assert!(q.get("downtime").is_none(), "{q}");
}

#[test]
fn return_path_closed_after_end_is_unconfirmed() {
    let setup = Setup::default();
    let (src, sm) = source_side(&setup);
    let (dst, dm) = dest_side(&setup, FakeMachine::new(2, UUID));
    let guest = dirty(&src, 2_000);
    let (a, b, _) = end_proxy(AfterEnd::CloseReturnPath);
    let d = start_dest(&dst, dm, Incoming::Stream(b), dst_opts(false));
    let s = start_source(&src, sm, Target::Stream(a), src_opts(converge(), false));
    let dout = d.join().unwrap();
    wait_status(&src.events, S::Unconfirmed);
    assert_eq!(s.handover(), Handover::Unconfirmed);
    let so = s.join().unwrap();
    guest.stop();
    // The destination got everything and runs: a source that resumed now would be a second
    // copy. That is why it stays paused.
    assert_eq!(dout.status, S::Completed);
    assert!(dst.vcpus.is_running());
    assert_unconfirmed(&src, &so, "return path closed");
    assert_ram_equal(&src, &dst);
}

#[test]
fn stream_cut_at_the_very_end_is_unconfirmed_and_the_destination_never_runs() {
    for k in [1usize, 17, 1000] {
        let setup = Setup::default();
        let (src, sm) = source_side(&setup);
        let (dst, dm) = dest_side(&setup, FakeMachine::new(2, UUID));
        let guest = dirty(&src, 2_000);
        let (a, b, _) = end_proxy(AfterEnd::CutLast(k));
        let d = start_dest(&dst, dm, Incoming::Stream(b), dst_opts(false));
        let s = start_source(&src, sm, Target::Stream(a), src_opts(converge(), false));
        let dout = d.join().unwrap();
        let so = s.join().unwrap();
        guest.stop();
        assert_eq!(dout.status, S::Failed, "cut {k}");
        let derr = dout.error.clone().unwrap_or_default();
        assert!(
            derr.contains("truncated") || derr.contains("reset"),
            "cut {k}: {derr}"
        );
        assert!(!dst.vcpus.is_running(), "cut {k}");
        assert_eq!(*dst.machine.restored.lock().unwrap(), None, "cut {k}");
        assert_unconfirmed(&src, &so, "return path");
    }
}

#[test]
fn silent_destination_times_out_unconfirmed() {
    let setup = Setup::default();
    let (src, sm) = source_side(&setup);
    let (dst, dm) = dest_side(&setup, FakeMachine::new(2, UUID));
    let (a, b, _) = end_proxy(AfterEnd::StallReturnPath);
    let d = start_dest(&dst, dm, Incoming::Stream(b), dst_opts(false));
    let mut opts = src_opts(converge(), false);
    opts.tuning.resume_timeout_ms = 300;
    let s = start_source(&src, sm, Target::Stream(a), opts);
    let so = s.join().unwrap();
    assert_unconfirmed(&src, &so, "no RESUMED within 300 ms, x-tern-resume-timeout");
    assert_eq!(d.join().unwrap().status, S::Completed);
}

#[test]
fn cancel_after_end_is_unconfirmed_not_cancelled() {
    let setup = Setup::default();
    let (src, sm) = source_side(&setup);
    let (dst, dm) = dest_side(&setup, FakeMachine::new(2, UUID));
    let (a, b, end_seen) = end_proxy(AfterEnd::StallReturnPath);
    let d = start_dest(&dst, dm, Incoming::Stream(b), dst_opts(false));
    let mut opts = src_opts(converge(), false);
    opts.tuning.resume_timeout_ms = 3_600_000;
    let s = start_source(&src, sm, Target::Stream(a), opts);
    end_seen.wait();
    s.cancel();
    let so = s.join().unwrap();
    assert_unconfirmed(&src, &so, "migrate_cancel");
    assert!(!src.events.statuses().contains(&S::Cancelling));
    assert_eq!(d.join().unwrap().status, S::Completed);
}

#[test]
fn paused_destination_completes_without_confirming_it_runs() {
    for autostart in [false, true] {
        let setup = Setup::default();
        let (src, sm) = source_side(&setup);
        let (dst, dm) = dest_side(&setup, FakeMachine::new(2, UUID));
        let (a, b) = socketpair();
        let mut dopts = dst_opts(false);
        dopts.autostart = autostart;
        let d = start_dest(&dst, dm, Incoming::Stream(b), dopts);
        let s = start_source(&src, sm, Target::Stream(a), src_opts(converge(), false));
        wait_status(&src.events, S::Completed);
        let want = if autostart {
            Handover::DestinationRuns
        } else {
            Handover::DestinationPaused
        };
        assert_eq!(s.handover(), want);
        assert_eq!(dst.vcpus.is_running(), autostart);
        assert_eq!(s.join().unwrap().status, S::Completed);
        assert_eq!(d.join().unwrap().status, S::Completed);
        assert_eq!(dst.vcpus.is_running(), autostart);
        assert!(!src.vcpus.is_running());
    }
}

/// A guest stopped by an earlier, undecided migration travels as running: the next
/// destination resumes it; the source, which this migration did not pause, stays paused.
#[test]
fn guest_stopped_by_an_earlier_migration_runs_on_the_next_destination() {
    let setup = Setup {
        src_running: false,
        ..Setup::default()
    };
    let (src, sm) = source_side(&setup);
    let (dst, dm) = dest_side(&setup, FakeMachine::new(2, UUID));
    let (a, b) = socketpair();
    let d = start_dest(&dst, dm, Incoming::Stream(b), dst_opts(false));
    let mut opts = src_opts(converge(), false);
    opts.stopped_by_earlier_migration = true;
    let s = start_source(&src, sm, Target::Stream(a), opts);
    assert_eq!(s.join().unwrap().status, S::Completed);
    assert_eq!(d.join().unwrap().status, S::Completed);
    dst.vcpus.wait_running(Duration::from_secs(10));
    assert!(dst.vcpus.is_running());
    assert_eq!(src.vcpus.counts(), (0, 0));
}

#[test]
fn without_a_return_path_the_source_completes_at_the_flush_knowing_nothing() {
    let setup = Setup::default();
    let (src, sm) = source_side(&setup);
    let (dst, dm) = dest_side(&setup, FakeMachine::new(2, UUID));
    let (a, b) = socketpair();
    let d = start_dest(&dst, dm, Incoming::Stream(b), dst_opts(false));
    let mut opts = src_opts(converge(), false);
    opts.return_path = false;
    let s = start_source(&src, sm, Target::Stream(a), opts);
    wait_status(&src.events, S::Completed);
    assert_eq!(s.handover(), Handover::NoReturnPath);
    assert_eq!(s.join().unwrap().status, S::Completed);
    assert_eq!(d.join().unwrap().status, S::Completed);
}

/// `migrate-set-parameters` during the wait: a shorter `x-tern-resume-timeout` ends it.
#[test]
fn resume_timeout_can_be_shortened_while_waiting() {
    let setup = Setup::default();
    let (src, sm) = source_side(&setup);
    let (dst, dm) = dest_side(&setup, FakeMachine::new(2, UUID));
    let (a, b, end_seen) = end_proxy(AfterEnd::StallReturnPath);
    let d = start_dest(&dst, dm, Incoming::Stream(b), dst_opts(false));
    let mut opts = src_opts(converge(), false);
    opts.tuning.resume_timeout_ms = 3_600_000;
    let s = start_source(&src, sm, Target::Stream(a), opts.clone());
    end_seen.wait();
    opts.tuning.resume_timeout_ms = 50;
    s.set_tuning(opts.tuning);
    let so = s.join().unwrap();
    assert_unconfirmed(&src, &so, "no RESUMED within 50 ms");
    assert_eq!(d.join().unwrap().status, S::Completed);
}
