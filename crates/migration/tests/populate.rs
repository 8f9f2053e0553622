//! The destination announces every run of pages a verified batch writes with data before it
//! writes them (`RamSink::prepare_pages` / `PagePlacer::prepare_pages`, decision 233), on the
//! main stream and on multifd channels, with a busy guest: no page is written with data
//! unannounced, and every page still arrives. Synchronisation by joins only.

mod common;

use common::*;
use tern_migration::dest::{DestOptions, Incoming};
use tern_migration::fakes::FakeMachine;
use tern_migration::liveness::LivenessTimeout;
use tern_migration::source::Target;
use tern_migration::transport::{Listener, MigrationUri};

fn check_prepared(dst: &DstSide) {
    let (calls, pages, unprepared) = dst.ram.prepare_counts();
    assert!(calls > 0 && pages >= calls, "{calls} calls, {pages} pages");
    assert_eq!(unprepared, 0, "pages written without prepare_pages first");
}

#[test]
fn the_main_stream_prepares_every_page_it_writes() {
    let (src, sm, dst, guest, a, d) = dirty_pair(20_000, false);
    let s = start_source(&src, sm, Target::Stream(a), src_opts(converge(), false));
    assert_completes(s, d, guest, &src, &dst);
    check_prepared(&dst);
}

#[test]
fn multifd_channels_prepare_every_page_they_write() {
    let setup = Setup::default();
    let (src, sm) = source_side(&setup);
    let (dst, dm) = dest_side(&setup, FakeMachine::new(2, UUID));
    let guest = dirty(&src, 20_000);
    let l = Listener::bind(&MigrationUri::Tcp {
        host: "127.0.0.1".into(),
        port: 0,
    })
    .expect("bind");
    let uri = l.local_uri();
    let dopts = DestOptions {
        multifd_channels: Some(2),
        liveness: LivenessTimeout::from_millis(2000),
        ..DestOptions::default()
    };
    let d = start_dest(&dst, dm, Incoming::Listener(l), dopts);
    let mut opts = src_opts(converge(), false);
    opts.multifd_channels = Some(2);
    let s = start_source(&src, sm, Target::Uri(uri), opts);
    assert_completes(s, d, guest, &src, &dst);
    check_prepared(&dst);
}
