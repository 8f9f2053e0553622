//! Multifd together with the RAM digest (`x-tern-ram-digest`; decision 252,
//! `docs/migration-engine.md` §2.5): fakes over real TCP sockets, 2 channels. A busy guest
//! (pages re-sent across passes, on whichever channel) arrives with its digest verified; a
//! destination whose channel receivers write one page wrong (a fault no checksum of the stream
//! sees) fails the migration and the source's guest runs on; the same fault without the digest
//! goes unnoticed (the control). Synchronisation by joins only; nothing asserts on timing.

mod common;

use std::sync::Arc;

use common::multifd::listen;
use common::*;
use tern_migration::dest::{DestMachine, DestOptions, Incoming};
use tern_migration::fakes::{FakeMachine, FakeRam};
use tern_migration::liveness::LivenessTimeout;
use tern_migration::machine::{MachineError, PagePlacer, RamBlockInfo, RamSink};
use tern_migration::source::Target;
use tern_migration::status::MigrationStatus as S;

const CHANNELS: u16 = 2;

fn dst_opts_digest(digest: bool) -> DestOptions {
    DestOptions {
        multifd_channels: Some(CHANNELS),
        ram_digest: digest,
        liveness: LivenessTimeout::from_millis(2000),
        ..DestOptions::default()
    }
}

/// Destination RAM whose multifd writer flips one byte of every write of page `at`: the page
/// the guest would read after the load is not the one the source sent.
struct CorruptingRam {
    ram: FakeRam,
    at: (usize, u64),
}

struct CorruptingPlacer {
    inner: Arc<dyn PagePlacer>,
    at: (usize, u64),
}

impl PagePlacer for CorruptingPlacer {
    fn write_page(&self, block: usize, page: u64, data: &[u8]) -> Result<(), MachineError> {
        if (block, page) == self.at {
            let mut copy = data.to_vec();
            copy[17] ^= 0x5a;
            return self.inner.write_page(block, page, &copy);
        }
        self.inner.write_page(block, page, data)
    }

    fn zero_page(&self, block: usize, page: u64) -> Result<(), MachineError> {
        self.inner.zero_page(block, page)
    }

    fn prepare_pages(&self, block: usize, first: u64, count: u64) {
        self.inner.prepare_pages(block, first, count);
    }

    fn read_page(&self, block: usize, page: u64, buf: &mut [u8]) -> Result<(), MachineError> {
        self.inner.read_page(block, page, buf)
    }
}

impl RamSink for CorruptingRam {
    fn page_size(&self) -> u32 {
        RamSink::page_size(&self.ram)
    }

    fn blocks(&self) -> Vec<RamBlockInfo> {
        RamSink::blocks(&self.ram)
    }

    fn write_page(&mut self, block: usize, page: u64, data: &[u8]) -> Result<(), MachineError> {
        RamSink::write_page(&mut self.ram, block, page, data)
    }

    fn zero_page(&mut self, block: usize, page: u64) -> Result<(), MachineError> {
        RamSink::zero_page(&mut self.ram, block, page)
    }

    fn prepare_pages(&mut self, block: usize, first: u64, count: u64) {
        RamSink::prepare_pages(&mut self.ram, block, first, count);
    }

    fn read_page(&mut self, block: usize, page: u64, buf: &mut [u8]) -> Result<(), MachineError> {
        RamSink::read_page(&mut self.ram, block, page, buf)
    }

    fn placer(&mut self) -> Result<Arc<dyn PagePlacer>, MachineError> {
        Ok(Arc::new(CorruptingPlacer {
            inner: self.ram.placer()?,
            at: self.at,
        }))
    }
}

/// The first page the source holds with data (it goes over a channel as a normal page).
fn first_data_page(src: &SrcSide) -> (usize, u64) {
    let mem = src.ram.contents();
    mem.iter()
        .enumerate()
        .find_map(|(b, bytes)| {
            bytes
                .chunks(4096)
                .position(|p| p.iter().any(|&x| x != 0))
                .map(|p| (b, p as u64))
        })
        .expect("a page with data")
}

#[test]
fn ram_digest_over_two_multifd_channels_with_a_busy_guest_is_verified() {
    let setup = Setup::default();
    let (src, sm) = source_side(&setup);
    let (dst, dm) = dest_side(&setup, FakeMachine::new(2, UUID));
    let guest = dirty(&src, 20_000);
    let (l, uri) = listen();
    let d = start_dest(&dst, dm, Incoming::Listener(l), dst_opts_digest(true));
    let mut opts = src_opts(converge(), false);
    opts.multifd_channels = Some(CHANNELS);
    opts.ram_digest = true;
    let s = start_source(&src, sm, Target::Uri(uri), opts);
    assert_completes(s, d, guest, &src, &dst);
    let q = src.stats.to_query_migrate_json();
    let dq = dst.stats.to_query_migrate_json();
    // Pages went over the channels in more than one pass (a page re-sent in a later pass, on
    // either channel, must end with the digest of its last write).
    assert!(q["ram"]["multifd-bytes"].as_u64().unwrap_or(0) > 0, "{q}");
    assert!(
        q["ram"]["dirty-sync-count"].as_u64().unwrap_or(0) >= 2,
        "{q}"
    );
    // 3 MiB + 1 MiB in 2 MiB chunks: 3 chunks, hashed on both sides, matched.
    let d = &dq["x-tern-ram-digest"];
    assert_eq!(d["verified"], true, "destination: {dq}");
    assert_eq!(d["chunks"], 3, "destination: {dq}");
    assert!(d["hash-us"].as_u64().is_some(), "destination: {dq}");
    assert!(d["verify-us"].as_u64().is_some(), "destination: {dq}");
    assert_eq!(q["x-tern-ram-digest"]["verified"], true, "source: {q}");
    assert_eq!(q["x-tern-ram-digest"]["chunks"], 3, "source: {q}");
}

/// A side's final status and `error-desc`.
type Outcome = (S, Option<String>);

/// Runs a 2-channel migration (digest `digest` on both sides) to a destination whose channel
/// receivers write the source's first page with data wrong; returns both outcomes' status and
/// error, after the source's guest stopped dirtying.
fn corrupted_run(digest: bool) -> (SrcSide, DstSide, Outcome, Outcome) {
    let setup = Setup::default();
    let (src, sm) = source_side(&setup);
    let (dst, dm) = dest_side(&setup, FakeMachine::new(2, UUID));
    let at = first_data_page(&src);
    let dm = DestMachine {
        ram: Box::new(CorruptingRam {
            ram: dst.ram.clone(),
            at,
        }),
        ..dm
    };
    let (l, uri) = listen();
    let d = start_dest(&dst, dm, Incoming::Listener(l), dst_opts_digest(digest));
    let mut opts = src_opts(converge(), false);
    opts.multifd_channels = Some(CHANNELS);
    opts.ram_digest = digest;
    let s = start_source(&src, sm, Target::Uri(uri), opts);
    let so = s.join().expect("source joins");
    let dout = d.join().expect("destination joins");
    (src, dst, (so.status, so.error), (dout.status, dout.error))
}

#[test]
fn ram_digest_catches_a_page_a_multifd_channel_wrote_wrong() {
    let (src, dst, (ss, se), (ds, de)) = corrupted_run(true);
    assert_eq!(ss, S::Failed, "source: {se:?}");
    let se = se.unwrap_or_default();
    assert!(
        se.contains("RAM digest mismatch"),
        "source error-desc: {se}"
    );
    assert!(se.contains("1 of 2 chunk(s)"), "source error-desc: {se}");
    assert!(se.contains("'ram0'"), "names the block: {se}");
    assert_eq!(ds, S::Failed);
    assert!(
        de.unwrap_or_default().contains("RAM digest mismatch"),
        "destination"
    );
    // The destination never ran the damaged guest; the source resumed its own.
    assert!(!tern_migration::machine::VcpuControl::is_running(
        &dst.vcpus
    ));
    assert_source_restored(&src, true);
}

/// The control: the same fault without the digest completes, and only a comparison of the two
/// memories sees it.
#[test]
fn without_the_ram_digest_the_same_multifd_fault_goes_unnoticed() {
    let (src, dst, (ss, se), (ds, de)) = corrupted_run(false);
    assert_eq!(ss, S::Completed, "source: {se:?}");
    assert_eq!(ds, S::Completed, "destination: {de:?}");
    assert_eq!(
        src.ram.first_difference(&dst.ram),
        Some(first_data_page(&src))
    );
}

/// A hand-written source writes page 5 twice: A on channel 1 in generation 1, B on channel 2
/// in generation 2, and channel 2's bytes (B included) reach the destination before channel
/// 1's (A); page 7 likewise, C then a ZERO entry (a zero page updates the digest too). The sync barrier holds channel 2 after its `SYNC` of generation 1 until channel 1
/// delivered its own, so A is placed first and B last: memory and page digest end with B. A
/// digest taken from B is verified (and the migration completes); one taken from A is a
/// mismatch, so the check really compares the page's last write.
#[test]
fn ram_digest_follows_the_last_write_of_a_page_sent_on_two_channels_in_two_generations() {
    for (digest_of_b, want) in [(true, S::Completed), (false, S::Failed)] {
        let (status, error, page5) = two_generations(digest_of_b, false);
        assert_eq!(status, want, "digest of B: {digest_of_b}: {error:?}");
        assert!(page5.iter().all(|&x| x == 0xbb), "page 5 must hold B");
        if !digest_of_b {
            let e = error.unwrap_or_default();
            assert!(e.contains("RAM digest mismatch"), "{e}");
        }
    }
}

/// A hostile (or broken) source sends page 5 on both channels in generation 1: the order of
/// the two loads is undefined, so the digest could name one copy while memory holds the
/// other; with the digest on, the destination refuses the second load (§5.1's rule).
#[test]
fn ram_digest_refuses_a_page_sent_twice_in_one_generation_over_two_channels() {
    let (status, error, _) = two_generations(true, true);
    assert_eq!(status, S::Failed);
    let e = error.unwrap_or_default();
    assert!(
        e.contains("RAM block 0 page 5 was loaded twice in generation 1"),
        "{e}"
    );
    assert!(e.contains("multifd channel"), "names the channel: {e}");
}

/// The hand-written migration of the two tests above; `twice` moves channel 2's B into
/// generation 1 (the same generation as channel 1's A).
fn two_generations(digest_of_b: bool, twice: bool) -> (S, Option<String>, Vec<u8>) {
    use common::multifd::{channel, main_stream_with};
    use tern_migration::digest::{RamDigest, DEFAULT_CHUNK_SHIFT};
    use tern_migration::machine::{MachineState, RamSource};
    use tern_migration::wire::{ChannelWriter, Command, RamPage, VERSION_MULTIFD};
    const ID: [u8; 16] = [0x42; 16];
    let setup = Setup::default();
    let machine = FakeMachine::new(2, UUID);
    let (dst, dm) = dest_side(&setup, machine.clone());
    let ram = dst.ram.clone();
    let cfg = machine
        .describe()
        .stream_config(RamSink::page_size(&ram), RamSink::blocks(&ram));
    let ps = cfg.page_size as usize;
    let (a, b, c) = (vec![0xaau8; ps], vec![0xbbu8; ps], vec![0xccu8; ps]);
    // The source's memory as it digests it: page 5 = B (or A), every other page zero (page 7
    // too: its last load is a ZERO entry, whose digest must replace C's).
    let mem = FakeRam::small();
    let last = if digest_of_b { &b } else { &a };
    RamSink::write_page(&mut mem.clone(), 0, 5, last).expect("page");
    let blocks = RamSink::blocks(&mem);
    let digest = RamDigest::compute(
        &RamSource::view(&mem),
        &blocks,
        4096,
        DEFAULT_CHUNK_SHIFT,
        1,
    )
    .expect("digest");

    let (l, uri) = listen();
    let d = start_dest(&dst, dm, Incoming::Listener(l), dst_opts_digest(true));
    let (mut w, main) = main_stream_with(&uri, &cfg, VERSION_MULTIFD, false, true, 2, ID);
    w.write_command(Command::Ping { seq: 1 }).expect("ping");
    w.flush().expect("flush");

    // Channel 2 first, all of it: nothing in generation 1, B in generation 2, the final SYNC.
    let c2 = channel(&uri, VERSION_MULTIFD, 2, 2, ID);
    let mut w2 = ChannelWriter::new(c2.try_clone().expect("clone"), 2, &cfg).expect("writer");
    if !twice {
        w2.write_sync().expect("sync 1");
    }
    w2.write_batch(&[RamPage::normal(0, 5, &b), RamPage::zero(0, 7)])
        .expect("B, and page 7 zero");
    if twice {
        w2.write_sync().expect("sync 1");
    }
    w2.write_sync().expect("sync 2");
    w2.write_sync().expect("final sync");
    // Then channel 1: A in generation 1, nothing after.
    let c1 = channel(&uri, VERSION_MULTIFD, 1, 2, ID);
    let mut w1 = ChannelWriter::new(c1.try_clone().expect("clone"), 1, &cfg).expect("writer");
    w1.write_batch(&[RamPage::normal(0, 5, &a), RamPage::normal(0, 7, &c)])
        .expect("A, and page 7 = C");
    for _ in 0..3 {
        w1.write_sync().expect("sync");
    }
    // The main stream: the two sync points, the final state, the digest, END.
    w.write_command(Command::IterationEnd { pass: 1 })
        .expect("pass");
    w.write_command(Command::SwitchoverStart).expect("switch");
    for c in &machine.components {
        w.write_section(&c.id, c.instance, c.version, &c.data)
            .expect("section");
    }
    w.write_ram_digest(&digest).expect("digest");
    w.finish().expect("end");
    let out = d.join().expect("destination joins");
    drop((main, c1, c2));
    let mem = ram.contents();
    // (With `twice` the refused load may come before or after page 7's.)
    if !twice {
        assert!(
            mem[0][7 * ps..8 * ps].iter().all(|&x| x == 0),
            "page 7 zeroed"
        );
    }
    (out.status, out.error, mem[0][5 * ps..6 * ps].to_vec())
}
