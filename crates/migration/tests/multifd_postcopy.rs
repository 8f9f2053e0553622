//! Multifd together with post-copy against a hostile source (`docs/stream-format.md` §5.4):
//! data a channel sends after its final `SYNC` is never placed once `MULTIFD_END` was read
//! (it would land in a page the destination then discards or registers for userfaultfd).
//! Fakes over real TCP sockets; synchronisation by the return path's `PONG`, no sleeps.

mod common;

use common::multifd::{channel, main_stream_to_channels};
use common::postcopy::pc_dst_opts;
use common::*;
use tern_migration::dest::{DestOptions, Incoming};
use tern_migration::fakes::FakeMachine;
use tern_migration::liveness::LivenessTimeout;
use tern_migration::machine::{MachineState, RamSink, VcpuControl};
use tern_migration::status::MigrationStatus as S;
use tern_migration::transport::{Listener, MigrationUri};
use tern_migration::wire::{
    ChannelWriter, Command, RamPage, ReturnPathReader, RpMessage, VERSION_MULTIFD_POSTCOPY,
};

const ID: [u8; 16] = [0x42; 16];

#[test]
fn channel_data_after_its_final_sync_is_never_placed() {
    let setup = Setup::default();
    let (dst, dm) = dest_side(&setup, FakeMachine::new(2, UUID));
    let (_pager, dm) = with_pager(&dst, dm);
    let ram = dst.ram.clone();
    let cfg = FakeMachine::new(2, UUID)
        .describe()
        .stream_config(RamSink::page_size(&ram), RamSink::blocks(&ram));
    let ps = cfg.page_size as usize;
    let l = Listener::bind(&MigrationUri::Tcp {
        host: "127.0.0.1".into(),
        port: 0,
    })
    .expect("bind");
    let uri = l.local_uri();
    let opts = DestOptions {
        multifd_channels: Some(1),
        liveness: LivenessTimeout::from_millis(5000),
        ..pc_dst_opts()
    };
    let d = start_dest(&dst, dm, Incoming::Listener(l), opts);

    // The main stream up to PING 1, announcing one channel with post-copy (version 8).
    let (mut w, main) = main_stream_to_channels(&uri, &cfg, VERSION_MULTIFD_POSTCOPY, true, 1, ID);
    w.write_command(Command::PostcopyAdvise {
        page_size: cfg.page_size,
    })
    .expect("advise");
    w.write_command(Command::Ping { seq: 1 }).expect("ping");
    w.flush().expect("flush");

    // Channel 1: page 5 = A, its final SYNC, then page 5 = B (a hostile write after the end).
    let ch = channel(&uri, VERSION_MULTIFD_POSTCOPY, 1, 1, ID);
    let mut cw = ChannelWriter::new(ch.try_clone().expect("clone"), 1, &cfg).expect("writer");
    let (a, b) = (vec![0x11u8; ps], vec![0x22u8; ps]);
    cw.write_batch(&[RamPage::normal(0, 5, &a)]).expect("A");
    cw.write_sync().expect("final sync");
    cw.write_batch(&[RamPage::normal(0, 5, &b)])
        .expect("B after the end");
    cw.flush().expect("flush");

    // MULTIFD_END, then PING 2: its PONG says the destination is past MULTIFD_END.
    w.write_command(Command::MultifdEnd).expect("multifd end");
    w.write_command(Command::Ping { seq: 2 }).expect("ping");
    w.flush().expect("flush");
    let mut rp = ReturnPathReader::new(main.try_clone().expect("clone"));
    loop {
        match rp.read_message() {
            Ok(Some(RpMessage::Pong { seq: 2 })) => break,
            Ok(Some(RpMessage::Pong { .. })) => {}
            other => panic!("expected PONG 2, got {other:?}"),
        }
    }
    let page5 = &ram.contents()[0][5 * ps..6 * ps];
    assert!(
        page5.iter().all(|&x| x == 0x11),
        "page 5 must hold the data sent before the final SYNC"
    );
    // The hostile source vanishes; the destination (whose guest never ran) fails.
    drop((w, cw, ch, main, rp));
    let out = d.join().expect("destination joins");
    assert_eq!(out.status, S::Failed);
    assert!(!dst.vcpus.is_running());
    assert!(ram.contents()[0][5 * ps..6 * ps].iter().all(|&x| x == 0x11));
}
