//! The early post-copy discard (stream format §13.3, version 7; `docs/postcopy.md` §2a,
//! decisions 200–204) through the engine with fakes: the destination drops re-dirtied pages
//! while the source's guest still runs, `POSTCOPY_LISTEN` does not drop them again, a page
//! sent after its early discard is held again, and each side when the other fails at that
//! moment. Synchronisation is by joins and events only; nothing asserts on timing.

mod common;

use common::postcopy::{pc_dst_opts, postcopy_writer, PostcopyMigration};
use common::*;
use tern_migration::dest::Incoming;
use tern_migration::events::Event;
use tern_migration::fakes::FakeMachine;
use tern_migration::machine::VcpuControl;
use tern_migration::status::MigrationStatus as S;
use tern_migration::wire::{Command, RamPage, VERSION_EARLY_DISCARD};

fn page_of(dst: &DstSide, block: usize, page: u64, ps: u32) -> Vec<u8> {
    let ps = ps as usize;
    let at = page as usize * ps;
    dst.ram.contents()[block][at..at + ps].to_vec()
}

/// Pre-copy pages 3, 4, 5; early discard of 3, 4 and 20 (never sent); page 4 sent again;
/// the final discard names 3 (dropped already) and 5. Page 4 is held at LISTEN (never
/// requested), page 3 is dropped exactly once, page 5 is the only page LISTEN drops of those
/// the destination held, and the guest gets every page's newest contents.
#[test]
fn an_early_discard_drops_held_pages_once_and_a_page_sent_after_it_is_held_again() {
    let setup = Setup::default();
    let (dst, dm) = dest_side(&setup, FakeMachine::new(2, UUID));
    let (pager, dm) = with_pager(&dst, dm);
    let (a, b) = socketpair();
    let d = start_dest(&dst, dm, Incoming::Stream(b), pc_dst_opts());
    let (mut w, ps) = postcopy_writer(a, VERSION_EARLY_DISCARD);
    let (old, new, late) = (
        vec![0x11u8; ps as usize],
        vec![0x22u8; ps as usize],
        vec![0x33u8; ps as usize],
    );
    w.write_ram_batch(&[
        RamPage::normal(0, 3, &old),
        RamPage::normal(0, 4, &old),
        RamPage::normal(0, 5, &old),
    ])
    .unwrap();
    w.write_ram_discard(0, &[(3, 2), (20, 1)]).unwrap();
    w.write_ram_batch(&[RamPage::normal(0, 4, &new)]).unwrap();
    w.write_command(Command::SwitchoverStart).unwrap();
    w.write_command(Command::RunState { running: true })
        .unwrap();
    w.write_ram_discard(0, &[(3, 1), (5, 1)]).unwrap();
    w.write_command(Command::PostcopyListen).unwrap();
    w.flush().unwrap();
    pager.wait_started();
    let total = dst.ram.total_pages();
    // Early: pages 3 and 4 (20 was never here). At LISTEN: every missing page but page 3.
    assert_eq!(pager.dropped(), (2, total - 2));
    assert_eq!(pager.fault(0, 4, 1).unwrap(), 0, "page 4 is held again");
    assert_eq!(pager.fault(0, 3, 1).unwrap(), 1, "page 3 is missing");
    assert_eq!(pager.fault(0, 5, 1).unwrap(), 1, "page 5 is missing");
    w.write_postcopy_run().unwrap();
    // Every missing page: 3 and 5 with data, the rest zero.
    w.write_ram_batch(&[RamPage::normal(0, 3, &late), RamPage::normal(0, 5, &late)])
        .unwrap();
    let blocks = dst.ram.contents();
    let mut rest = Vec::new();
    for (bi, mem) in blocks.iter().enumerate() {
        for p in 0..(mem.len() / ps as usize) as u32 {
            if bi != 0 || ![3, 4, 5].contains(&p) {
                rest.push(RamPage::zero(bi as u16, p));
            }
        }
    }
    for chunk in rest.chunks(256) {
        w.write_ram_batch(chunk).unwrap();
    }
    let _sock = w.finish().unwrap();
    let dout = d.join().unwrap();
    assert_eq!(dout.status, S::Completed, "{:?}", dout.error);
    assert_eq!(page_of(&dst, 0, 4, ps), new, "sent after its early discard");
    assert_eq!(page_of(&dst, 0, 3, ps), late);
    assert_eq!(page_of(&dst, 0, 5, ps), late);
    let q = dst.stats.to_query_migrate_json();
    let sw = &q["x-tern-postcopy-switch"];
    assert_eq!(sw["early-discard-pages"], 2, "{sw}");
    assert!(sw["early-discard-us"].is_u64(), "{sw}");
    // The final discard made only page 5 missing (page 3 was missing already).
    assert_eq!(sw["discard-pages"], 1, "{sw}");
}

/// The source vanishes right after its early discard, before `SWITCHOVER_START`: the
/// destination fails with the broken stream, paging never started, nothing ran.
#[test]
fn the_source_vanishing_after_an_early_discard_fails_the_destination_before_the_switch() {
    let setup = Setup::default();
    let (dst, dm) = dest_side(&setup, FakeMachine::new(2, UUID));
    let (pager, dm) = with_pager(&dst, dm);
    let (a, b) = socketpair();
    let d = start_dest(&dst, dm, Incoming::Stream(b), pc_dst_opts());
    let (mut w, ps) = postcopy_writer(a, VERSION_EARLY_DISCARD);
    let page = vec![0x5au8; ps as usize];
    w.write_ram_batch(&[RamPage::normal(0, 7, &page)]).unwrap();
    w.write_ram_discard(0, &[(7, 1)]).unwrap();
    w.flush().unwrap();
    drop(w);
    let dout = d.join().unwrap();
    assert_eq!(dout.status, S::Failed);
    let e = dout.error.unwrap_or_default();
    assert!(!e.is_empty(), "the destination names why it failed");
    assert_eq!(pager.dropped(), (1, 0), "dropped early, never started");
    assert!(!pager.started());
    assert!(!dst.events.statuses().contains(&S::PostcopyActive));
    assert!(!dst.vcpus.is_running(), "the destination's guest never ran");
}

/// The destination fails while applying the early discard (the moment between the source's
/// decision to switch and its stop): the source's migration fails with the destination's
/// reason, its guest was never stopped and runs on.
#[test]
fn a_destination_failing_its_early_discard_fails_the_migration_and_the_source_runs_on() {
    let m = PostcopyMigration::to_pass_2(&Setup::default(), |p| {
        p.refuse_drop("madvise refused by the test")
    });
    let end = m.switch_and_join();
    assert_eq!(end.so.status, S::Failed);
    assert_eq!(end.dout.status, S::Failed);
    let e = end.so.error.unwrap_or_default();
    assert!(e.contains("madvise refused by the test"), "{e}");
    assert!(e.contains("early discard"), "{e}");
    assert_source_restored(&end.src, true);
    assert!(
        !end.src.events.events().contains(&Event::Stop),
        "never paused"
    );
    assert!(!end.pager.started());
}

/// A whole post-copy migration with a guest that keeps dirtying: the early discard dropped
/// pages before the stop, and every page arrived.
#[test]
fn postcopy_with_a_dirtying_guest_discards_early_and_completes_with_every_page() {
    let setup = Setup {
        loader: LoaderKind::NoAckNeeded,
        ..Setup::default()
    };
    let end = PostcopyMigration::to_pass_2(&setup, |_| {}).switch_and_join();
    assert_eq!(end.so.status, S::Completed, "{:?}", end.so.error);
    assert_eq!(end.dout.status, S::Completed, "{:?}", end.dout.error);
    assert_ram_equal(&end.src, &end.dst);
    let (early, _) = end.pager.dropped();
    assert!(early > 0, "the dirtying guest left pages to discard early");
    let q = end.dst.stats.to_query_migrate_json();
    assert_eq!(
        q["x-tern-postcopy-switch"]["early-discard-pages"], early,
        "{q}"
    );
}
