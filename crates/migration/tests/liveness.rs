//! `x-tern-liveness-timeout` in the engine (fakes, one process, unix socket pairs): a peer that
//! goes silent or stops reading fails the migration within the limit, with a text that says so;
//! a healthy peer that is only busy, or a source idle in a legitimate wait, does not.

mod common;

use std::time::Duration;

use common::*;
use tern_migration::dest::Incoming;
use tern_migration::fakes::FakeMachine;
use tern_migration::liveness::LivenessTimeout;
use tern_migration::machine::{
    MachineError, MachineState, RamSource, StateLoader, SwitchoverApproval, VcpuControl,
};
use tern_migration::source::Target;
use tern_migration::status::MigrationStatus as S;
use tern_migration::transport::Stream;
use tern_migration::wire::{StreamConfig, StreamWriter};

/// The short limit of these tests, ms.
const LIMIT_MS: u64 = 500;

fn limit() -> LivenessTimeout {
    LivenessTimeout::from_millis(LIMIT_MS)
}

/// A destination device whose first `load_iterate` works for `busy` (a device allocating
/// its resources: the long legitimate gap under test), then accepts everything.
struct BusyLoader {
    busy: Duration,
    calls: u32,
}

impl StateLoader for BusyLoader {
    fn id(&self) -> &str {
        "state-dev"
    }
    fn instance(&self) -> u32 {
        0
    }
    fn min_version(&self) -> u32 {
        1
    }
    fn max_version(&self) -> u32 {
        1
    }
    fn switchover_ack_needed(&self) -> bool {
        false
    }
    fn load_setup(&mut self, _approval: SwitchoverApproval) -> Result<(), MachineError> {
        Ok(())
    }
    fn load_iterate(&mut self, _version: u32, _data: &[u8]) -> Result<(), MachineError> {
        self.calls += 1;
        if self.calls == 1 {
            // Simulated device work (not synchronisation): the destination's receiver thread
            // reads nothing for 4 limits while the source has more to send.
            std::thread::sleep(self.busy);
        }
        Ok(())
    }
    fn load_complete(&mut self, _version: u32, _data: &[u8]) -> Result<(), MachineError> {
        Ok(())
    }
    fn load_cleanup(&mut self) {}
}

/// A connected TCP pair on loopback with small socket buffers (so that a destination that
/// stops reading closes its receive window quickly): (source end, destination end).
fn small_buffer_tcp_pair() -> (Stream, Stream) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let src = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (dst, _) = l.accept().unwrap();
    for s in [&src, &dst] {
        let sock = socket2::SockRef::from(s);
        sock.set_send_buffer_size(64 << 10).unwrap();
        sock.set_recv_buffer_size(64 << 10).unwrap();
    }
    (Stream::Tcp(src), Stream::Tcp(dst))
}

/// The destination's receiver is busy for 4 limits while the source has more to send: the
/// source blocks in write (its peer's window closed) for longer than the limit, and the
/// destination's keepalive (its latest PONG, repeated) shows it alive. Completes.
fn busy_destination_completes(a: Stream, b: Stream) {
    let setup = Setup {
        loader: LoaderKind::NoAckNeeded,
        ..Setup::default()
    };
    let (src, sm) = source_side(&setup);
    let (dst, mut dm) = dest_side(&Setup::default(), FakeMachine::new(2, UUID));
    dm.loaders.push(Box::new(BusyLoader {
        busy: Duration::from_millis(4 * LIMIT_MS),
        calls: 0,
    }));
    let mut dopts = dst_opts(false);
    dopts.liveness = limit();
    let d = start_dest(&dst, dm, Incoming::Stream(b), dopts);
    let mut opts = src_opts(converge(), false);
    opts.liveness = limit();
    let s = start_source(&src, sm, Target::Stream(a), opts);
    let so = s.join().unwrap();
    assert_eq!(so.status, S::Completed, "{:?}", so.error);
    let dout = d.join().unwrap();
    assert_eq!(dout.status, S::Completed, "{:?}", dout.error);
    assert_ram_equal(&src, &dst);
}

#[test]
fn busy_destination_does_not_time_the_source_out() {
    let (a, b) = socketpair();
    busy_destination_completes(a, b);
}

#[test]
fn busy_destination_over_tcp_does_not_time_the_source_out() {
    // Over TCP the kernel's TCP_USER_TIMEOUT also counts a closed window (Linux >= 5.11).
    let (a, b) = small_buffer_tcp_pair();
    busy_destination_completes(a, b);
}

#[test]
fn silent_source_fails_the_destination() {
    let setup = Setup::default();
    let (src, _sm) = source_side(&setup);
    let (dst, dm) = dest_side(&setup, FakeMachine::new(2, UUID));
    let (a, b) = socketpair();
    let mut dopts = dst_opts(false);
    dopts.liveness = limit();
    let d = start_dest(&dst, dm, Incoming::Stream(b), dopts);
    // A source that sends a valid header and CONFIG, then nothing (hung, or its host gone).
    let desc = src.machine.describe();
    let config = StreamConfig {
        page_size: src.ram.page_size(),
        vcpu_count: desc.vcpu_count,
        tsc_khz: desc.tsc_khz,
        vm_uuid: desc.uuid,
        ram_blocks: src.ram.blocks(),
        cpuid: desc.cpuid,
        machine_blob: desc.machine_blob,
    };
    let mut w = StreamWriter::new(a, &config).unwrap();
    w.flush().unwrap();
    let dout = d.join().unwrap();
    assert_eq!(dout.status, S::Failed);
    assert_eq!(
        dout.error.as_deref(),
        Some("no data from the source for 500 ms: the source or the link is gone")
    );
    assert!(!dst.vcpus.is_running(), "a failed destination never runs");
    drop(w);
}

#[test]
fn destination_that_stops_reading_fails_the_source_which_runs_on() {
    let setup = Setup::default();
    let (src, sm) = source_side(&setup);
    // A destination that accepted and then neither reads nor writes (SIGSTOPped).
    let (a, _frozen) = socketpair();
    let mut opts = src_opts(converge(), false);
    opts.liveness = limit();
    let s = start_source(&src, sm, Target::Stream(a), opts);
    let so = s.join().unwrap();
    assert_eq!(so.status, S::Failed);
    assert_eq!(
        so.error.as_deref(),
        Some("the destination stopped reading for 500 ms: the destination or the link is gone")
    );
    assert_source_restored(&src, true);
    assert_eq!(
        src.stats.to_query_migrate_json()["error-desc"],
        so.error.unwrap()
    );
}

#[test]
fn destination_that_never_answers_a_ping_fails_the_source() {
    let setup = Setup::default();
    let (src, sm) = source_side(&setup);
    // A destination whose reader swallows the stream but never answers on the return path.
    let (a, b) = socketpair();
    let Stream::Unix(mut sink) = b else {
        unreachable!()
    };
    let reader = std::thread::Builder::new()
        .name("swallow".into())
        .spawn(move || std::io::copy(&mut sink, &mut std::io::sink()))
        .unwrap();
    let mut opts = src_opts(converge(), false);
    opts.liveness = limit();
    let s = start_source(&src, sm, Target::Stream(a), opts);
    let so = s.join().unwrap();
    assert_eq!(so.status, S::Failed);
    assert_eq!(
        so.error.as_deref(),
        Some("no data from the destination for 500 ms: the destination or the link is gone")
    );
    assert_source_restored(&src, true);
    let _ = reader.join();
}

#[test]
fn pre_switchover_wait_longer_than_the_limit_keeps_both_sides_alive() {
    let setup = Setup::default();
    let (src, sm) = source_side(&setup);
    let (dst, dm) = dest_side(&setup, FakeMachine::new(2, UUID));
    let (a, b) = socketpair();
    let mut dopts = dst_opts(false);
    dopts.liveness = limit();
    let d = start_dest(&dst, dm, Incoming::Stream(b), dopts);
    let mut opts = src_opts(converge(), false);
    opts.liveness = limit();
    opts.pause_before_switchover = true;
    let s = start_source(&src, sm, Target::Stream(a), opts);
    wait_status(&src.events, S::PreSwitchover);
    // The thing under test is a long pre-switchover window (the operator has not sent
    // migrate-continue yet): hold it open for 4 limits. The source sends nothing but its
    // keepalive PINGs meanwhile.
    std::thread::sleep(Duration::from_millis(4 * LIMIT_MS));
    assert_eq!(
        d.status(),
        S::Active,
        "{}",
        dst.stats.to_query_migrate_json()
    );
    assert_eq!(s.status(), S::PreSwitchover);
    s.continue_switchover().unwrap();
    let so = s.join().unwrap();
    assert_eq!(so.status, S::Completed, "{:?}", so.error);
    assert_eq!(d.join().unwrap().status, S::Completed);
    assert_ram_equal(&src, &dst);
}
