//! Multifd end to end with fakes over real TCP sockets (`docs/migration-engine.md` §2.5): a busy
//! guest over 3 channels copies every page; and a destination facing hostile channels (another
//! migration's id, a batch on the wrong connection, a channel that never connects) fails
//! naming what was wrong. Synchronisation by joins only; nothing asserts on timing.

mod common;

use std::net::TcpStream;

use common::multifd::listen;
use common::*;
use tern_migration::dest::{DestOptions, Incoming};
use tern_migration::fakes::FakeMachine;
use tern_migration::liveness::LivenessTimeout;
use tern_migration::machine::{MachineState, RamSink, VcpuControl};
use tern_migration::source::Target;
use tern_migration::status::MigrationStatus as S;
use tern_migration::transport::{Listener, MigrationUri};
use tern_migration::wire::{
    ChannelWriter, Command, Compression, RamPage, StreamConfig, VERSION_MULTIFD,
};

fn dst_multifd(channels: u16) -> DestOptions {
    DestOptions {
        multifd_channels: Some(channels),
        liveness: LivenessTimeout::from_millis(2000),
        ..DestOptions::default()
    }
}

#[test]
fn a_busy_guest_over_three_channels_copies_every_page() {
    let setup = Setup::default();
    let (src, sm) = source_side(&setup);
    let (dst, dm) = dest_side(&setup, FakeMachine::new(2, UUID));
    let guest = dirty(&src, 20_000);
    let (l, uri) = listen();
    let d = start_dest(&dst, dm, Incoming::Listener(l), dst_multifd(3));
    let mut opts = src_opts(converge(), false);
    opts.multifd_channels = Some(3);
    let s = start_source(&src, sm, Target::Uri(uri), opts);
    assert_completes(s, d, guest, &src, &dst);
    let q = src.stats.to_query_migrate_json();
    let mfd = q["ram"]["multifd-bytes"].as_u64().unwrap_or(0);
    let transferred = q["ram"]["transferred"].as_u64().unwrap_or(0);
    let normal_bytes = q["ram"]["normal-bytes"].as_u64().unwrap_or(0);
    // Every channel's bytes count: at least the data of every normal page went over them.
    assert!(mfd >= normal_bytes && normal_bytes > 0, "{q}");
    assert!(transferred > mfd, "{q}");
    assert!(
        q["ram"]["dirty-sync-count"].as_u64().unwrap_or(0) >= 2,
        "{q}"
    );
}

/// A hand-written source: the main stream up to `PING 1` announcing `channels` with `id`.
fn main_stream(uri: &MigrationUri, cfg: &StreamConfig, channels: u16, id: [u8; 16]) -> TcpStream {
    let (mut w, s) =
        common::multifd::main_stream_to_channels(uri, cfg, VERSION_MULTIFD, false, channels, id);
    w.write_command(Command::Ping { seq: 1 }).expect("ping");
    w.flush().expect("flush");
    // The writer is dropped, the socket stays open through the clone.
    s
}

/// Connects to `uri` as multifd channel `channel` of `channels` of migration `id` (its
/// handshake sent, nothing else).
fn channel(uri: &MigrationUri, channel: u16, channels: u16, id: [u8; 16]) -> TcpStream {
    common::multifd::channel(uri, VERSION_MULTIFD, channel, channels, id)
}

/// Runs a destination expecting `channels` channels against `hostile`, which gets the URI,
/// the source's config and the migration id; returns the destination's `error-desc`.
fn hostile_dest(
    channels: u16,
    hostile: impl FnOnce(&MigrationUri, &StreamConfig, [u8; 16]) -> Vec<TcpStream>,
) -> String {
    let setup = Setup::default();
    let (dst, dm) = dest_side(&setup, FakeMachine::new(2, UUID));
    let machine = FakeMachine::new(2, UUID);
    let ram = dst.ram.clone();
    let cfg = machine
        .describe()
        .stream_config(RamSink::page_size(&ram), RamSink::blocks(&ram));
    let (l, uri) = listen();
    let d = start_dest(&dst, dm, Incoming::Listener(l), dst_multifd(channels));
    let id = [0x42; 16];
    let keep = hostile(&uri, &cfg, id);
    let out = d.join().expect("destination joins");
    drop(keep);
    assert_eq!(out.status, S::Failed);
    // The destination's guest never ran.
    assert!(!dst.vcpus.is_running());
    out.error.unwrap_or_default()
}

#[test]
fn a_channel_of_another_migration_is_refused() {
    let e = hostile_dest(2, |uri, cfg, id| {
        let m = main_stream(uri, cfg, 2, id);
        let c = channel(uri, 1, 2, [0x13; 16]);
        vec![m, c]
    });
    assert!(e.contains("multifd connection 1"), "{e}");
    assert!(e.contains("belongs to another migration"), "{e}");
}

#[test]
fn a_repeated_channel_index_is_refused() {
    let e = hostile_dest(2, |uri, cfg, id| {
        let m = main_stream(uri, cfg, 2, id);
        let a = channel(uri, 1, 2, id);
        let b = channel(uri, 1, 2, id);
        vec![m, a, b]
    });
    assert!(e.contains("channel 1 connected twice"), "{e}");
}

#[test]
fn a_batch_on_the_wrong_connection_is_refused() {
    let e = hostile_dest(1, |uri, cfg, id| {
        let m = main_stream(uri, cfg, 1, id);
        let c = channel(uri, 1, 1, id);
        // A batch that says it belongs to channel 2, on channel 1's connection.
        let mut w = ChannelWriter::new(c.try_clone().expect("clone"), 2, cfg).expect("writer");
        w.write_batch(&[RamPage::zero(0, 1)]).expect("batch");
        vec![m, c]
    });
    assert!(e.contains("multifd channel 1"), "{e}");
    assert!(e.contains("wrong connection"), "{e}");
}

#[test]
fn a_channel_that_never_connects_fails_the_destination_within_the_handshake_timeout() {
    let e = hostile_dest(2, |uri, cfg, id| {
        let m = main_stream(uri, cfg, 2, id);
        let c = channel(uri, 2, 2, id);
        vec![m, c]
    });
    assert!(
        e.contains("multifd channel(s) 1 of 1..=2 did not connect within 2000 ms"),
        "{e}"
    );
}

/// Idle channels stay alive: the source sits in `pre-switchover` for 4 liveness limits
/// (nothing to send), its senders send `KEEPALIVE` batches, the destination's channels do not
/// time out, and the migration completes (decision 165).
#[test]
fn idle_channels_are_kept_alive_by_keepalive_batches() {
    const LIMIT_MS: u64 = 500;
    let setup = Setup::default();
    let (src, sm) = source_side(&setup);
    let (dst, dm) = dest_side(&setup, FakeMachine::new(2, UUID));
    let (l, uri) = listen();
    let mut dopts = dst_multifd(2);
    dopts.liveness = LivenessTimeout::from_millis(LIMIT_MS);
    let d = start_dest(&dst, dm, Incoming::Listener(l), dopts);
    let mut opts = src_opts(converge(), false);
    opts.multifd_channels = Some(2);
    opts.liveness = LivenessTimeout::from_millis(LIMIT_MS);
    opts.pause_before_switchover = true;
    let s = start_source(&src, sm, Target::Uri(uri), opts);
    wait_status(&src.events, S::PreSwitchover);
    // The scenario is a long pre-switchover window (no migrate-continue yet): 4 limits.
    std::thread::sleep(std::time::Duration::from_millis(4 * LIMIT_MS));
    assert_eq!(
        d.status(),
        S::Active,
        "{}",
        dst.stats.to_query_migrate_json()
    );
    s.continue_switchover().expect("continue");
    let so = s.join().expect("source joins");
    assert_eq!(so.status, S::Completed, "{:?}", so.error);
    assert_eq!(d.join().expect("destination joins").status, S::Completed);
    assert_ram_equal(&src, &dst);
}

/// Without a return path (`CAPABILITIES` and `MULTIFD_CHANNELS` right after CONFIG).
#[test]
fn multifd_without_a_return_path_copies_every_page() {
    let setup = Setup::default();
    let (src, sm) = source_side(&setup);
    let (dst, dm) = dest_side(&setup, FakeMachine::new(2, UUID));
    let guest = dirty(&src, 20_000);
    let (l, uri) = listen();
    let d = start_dest(&dst, dm, Incoming::Listener(l), dst_multifd(2));
    let mut opts = src_opts(converge(), false);
    opts.return_path = false;
    opts.multifd_channels = Some(2);
    let s = start_source(&src, sm, Target::Uri(uri), opts);
    assert_completes(s, d, guest, &src, &dst);
}

/// `unix:`: the channels connect to the main stream's socket path.
#[test]
fn multifd_over_a_unix_socket_copies_every_page() {
    let setup = Setup::default();
    let (src, sm) = source_side(&setup);
    let (dst, dm) = dest_side(&setup, FakeMachine::new(2, UUID));
    let guest = dirty(&src, 20_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let uri = MigrationUri::Unix {
        path: dir.path().join("mig.sock"),
    };
    let l = Listener::bind(&uri).expect("bind");
    let d = start_dest(&dst, dm, Incoming::Listener(l), dst_multifd(2));
    let mut opts = src_opts(converge(), false);
    opts.multifd_channels = Some(2);
    let s = start_source(&src, sm, Target::Uri(uri), opts);
    assert_completes(s, d, guest, &src, &dst);
}

/// A fake guest whose every page is non-zero and compressible (one 8-byte value per page).
fn compressible_source() -> (SrcSide, tern_migration::source::SourceMachine) {
    let setup = Setup {
        fill_percent: 0,
        ..Setup::default()
    };
    let (src, sm) = source_side(&setup);
    for n in 0..src.ram.total_pages() {
        src.ram.guest_write(n, 64, n + 1);
    }
    (src, sm)
}

/// `multifd-compression` zlib and zstd (`docs/stream-format.md` §5.3) over 2 channels: every
/// page arrives, and the channels carried far fewer bytes than the pages' data.
#[test]
fn zlib_and_zstd_over_two_channels_copy_every_page_in_fewer_bytes() {
    for method in [Compression::Zlib, Compression::Zstd] {
        let (src, sm) = compressible_source();
        let (dst, dm) = dest_side(&Setup::default(), FakeMachine::new(2, UUID));
        let guest = dirty(&src, 20_000);
        let (l, uri) = listen();
        let mut dopts = dst_multifd(2);
        dopts.multifd_compression = method;
        let d = start_dest(&dst, dm, Incoming::Listener(l), dopts);
        let mut opts = src_opts(converge(), false);
        opts.multifd_channels = Some(2);
        opts.multifd_compression = (method, 1);
        let s = start_source(&src, sm, Target::Uri(uri), opts);
        let so = s.join().expect("source joins");
        let dout = d.join().expect("destination joins");
        guest.stop();
        assert_eq!(so.status, S::Completed, "{method}: {:?}", so.error);
        assert_eq!(dout.status, S::Completed, "{method}: {:?}", dout.error);
        assert_ram_equal(&src, &dst);
        let q = src.stats.to_query_migrate_json();
        let mfd = q["ram"]["multifd-bytes"].as_u64().unwrap_or(0);
        let normal_bytes = q["ram"]["normal-bytes"].as_u64().unwrap_or(0);
        assert!(
            normal_bytes >= src.ram.total_pages() * 4096 && mfd * 4 < normal_bytes,
            "{method}: {q}"
        );
    }
}

/// A different `multifd-compression` on the two sides fails at once naming both, and the
/// source's guest runs on.
#[test]
fn a_one_sided_compression_fails_at_once_naming_both_sides_and_the_source_runs_on() {
    for (at_src, at_dst) in [
        (Compression::Zstd, Compression::None),
        (Compression::None, Compression::Zlib),
        (Compression::Zlib, Compression::Zstd),
    ] {
        let (src, sm) = compressible_source();
        let (dst, dm) = dest_side(&Setup::default(), FakeMachine::new(2, UUID));
        let (l, uri) = listen();
        let mut dopts = dst_multifd(2);
        dopts.multifd_compression = at_dst;
        let d = start_dest(&dst, dm, Incoming::Listener(l), dopts);
        let mut opts = src_opts(converge(), false);
        opts.multifd_channels = Some(2);
        opts.multifd_compression = (at_src, 1);
        let s = start_source(&src, sm, Target::Uri(uri), opts);
        let so = s.join().expect("source joins");
        let dout = d.join().expect("destination joins");
        let want = format!("multifd-compression: source {at_src}, destination {at_dst}");
        assert_eq!(dout.status, S::Failed);
        assert!(
            dout.error.clone().unwrap_or_default().contains(&want),
            "{:?}",
            dout.error
        );
        assert_eq!(so.status, S::Failed);
        assert!(
            so.error.clone().unwrap_or_default().contains(&want),
            "{:?}",
            so.error
        );
        assert!(src.vcpus.is_running(), "the source's guest runs on");
        assert!(!dst.vcpus.is_running());
        // Nothing of RAM went over a channel: the refusal came before any channel.
        let q = src.stats.to_query_migrate_json();
        assert_eq!(q["ram"]["multifd-bytes"].as_u64().unwrap_or(0), 0, "{q}");
    }
}
