//! Post-copy between the fakes, shared by `postcopy.rs` and `postcopy_early_discard.rs`: the
//! options of both sides, a migration of a dirtying guest that pre-copy cannot converge
//! (stopped at pass 2, where a test switches, cancels or watches it fail), and a hand-written
//! post-copy source for streams a correct source never sends.

use tern_migration::dest::{DestOptions, DestOutcome};
use tern_migration::fakes::FakePager;
use tern_migration::machine::{MachineState, RamSink};
use tern_migration::source::SourceOutcome;
use tern_migration::wire::{Command, Limits, StreamWriter};

use super::*;

/// The source's options with `postcopy-ram`.
pub fn pc_src_opts(tuning: Tuning) -> SourceOptions {
    SourceOptions {
        postcopy_ram: true,
        ..src_opts(tuning, false)
    }
}

/// The destination's options with `postcopy-ram` and `postcopy-blocktime`.
pub fn pc_dst_opts() -> DestOptions {
    DestOptions {
        postcopy_ram: true,
        postcopy_blocktime: true,
        ..dst_opts(false)
    }
}

/// A post-copy-capable migration under way between the fakes over a socket pair, its guest
/// dirtying pages, through pre-copy pass 2 (it never converges: `non_converge`).
pub struct PostcopyMigration {
    pub src: SrcSide,
    pub dst: DstSide,
    /// The destination's pager.
    pub pager: FakePager,
    pub source: SourceHandle,
    pub dest: DestHandle,
    guest: Dirtier,
}

/// Both ends of a [`PostcopyMigration`], joined (the guest stopped).
pub struct PostcopyEnded {
    pub src: SrcSide,
    pub dst: DstSide,
    pub pager: FakePager,
    pub so: SourceOutcome,
    pub dout: DestOutcome,
}

impl PostcopyMigration {
    /// Starts it with `setup` on both sides (`pager_setup` first prepares the destination's
    /// pager, e.g. to refuse) and returns once the source began pass 2.
    pub fn to_pass_2(setup: &Setup, pager_setup: impl FnOnce(&FakePager)) -> Self {
        let (src, sm) = source_side(setup);
        let (dst, dm) = dest_side(setup, FakeMachine::new(2, UUID));
        let (pager, dm) = with_pager(&dst, dm);
        pager_setup(&pager);
        let guest = dirtying(&src, std::time::Duration::from_secs(30));
        let (a, b) = socketpair();
        let dest = start_dest(&dst, dm, Incoming::Stream(b), pc_dst_opts());
        let source = start_source(&src, sm, Target::Stream(a), pc_src_opts(non_converge()));
        wait_pass(&src.events, 2);
        Self {
            src,
            dst,
            pager,
            source,
            dest,
            guest,
        }
    }

    /// `migrate-start-postcopy`, then both ends joined.
    pub fn switch_and_join(self) -> PostcopyEnded {
        self.source
            .start_postcopy()
            .expect("migrate-start-postcopy");
        self.join()
    }

    /// Joins both ends, then stops the guest.
    pub fn join(self) -> PostcopyEnded {
        let so = self.source.join().unwrap();
        let dout = self.dest.join().unwrap();
        self.guest.stop();
        PostcopyEnded {
            src: self.src,
            dst: self.dst,
            pager: self.pager,
            so,
            dout,
        }
    }
}

/// A hand-written post-copy source of stream `version` on `a` (the fakes' CONFIG), past
/// `CAPABILITIES` (postcopy-ram) and `POSTCOPY_ADVISE`; with the page size.
pub fn postcopy_writer(a: Stream, version: u32) -> (StreamWriter<UnixStream>, u32) {
    let Stream::Unix(sock) = a else {
        panic!("socketpair gives unix streams")
    };
    let ram = FakeRam::small();
    let ps = ram.page_size();
    let cfg = FakeMachine::new(2, UUID)
        .describe()
        .stream_config(ps, ram.blocks());
    let mut w = StreamWriter::with_version(sock, &cfg, &Limits::default(), version).unwrap();
    w.write_command(Command::Capabilities {
        switchover_ack: false,
        validate_uuid: false,
        ram_digest: false,
        postcopy_ram: true,
        postcopy_preempt: false,
        multifd: false,
    })
    .unwrap();
    w.write_command(Command::PostcopyAdvise { page_size: ps })
        .unwrap();
    (w, ps)
}
