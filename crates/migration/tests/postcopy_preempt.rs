//! The post-copy preempt channel's destination against a hostile peer (`docs/postcopy.md` §5,
//! stream format §13.8): the engine with fakes behind a real unix listener, the source played
//! by hand with the wire writer. Each refusal names what was wrong, on the destination and in
//! the `ERROR` its return path carries to the source.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;

use common::*;
use tern_migration::dest::{DestOptions, Incoming};
use tern_migration::fakes::{FakeMachine, FakePager, FakeRam};
use tern_migration::machine::{MachineState, RamSink};
use tern_migration::status::MigrationStatus as S;
use tern_migration::transport::{Listener, MigrationUri};
use tern_migration::wire::{
    Command, Limits, RamPage, ReturnPathReader, RpMessage, StreamConfig, StreamWriter,
    VERSION_PREEMPT,
};

const TOKEN: [u8; 16] = *b"this-migration!!";

fn config() -> StreamConfig {
    let ram = FakeRam::small();
    FakeMachine::new(2, UUID)
        .describe()
        .stream_config(ram.page_size(), ram.blocks())
}

/// What the hand-played source's second connection sends.
enum Second {
    /// A preempt channel with this token.
    Token([u8; 16]),
    /// Bytes that are not a stream.
    Garbage,
    /// A correct preempt channel that sends a page before the switch.
    PageBeforeListen,
}

/// A destination with `postcopy-preempt` on a unix listener; the source announces a preempt
/// channel with [`TOKEN`] on its main channel and then connects `second`. Returns the
/// destination's `error-desc` and the `ERROR` texts its return path carried.
fn refused(second: Second) -> (String, Vec<String>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let uri = MigrationUri::Unix {
        path: dir.path().join("mig.sock"),
    };
    let listener = Listener::bind(&uri).expect("bind");
    let setup = Setup::default();
    let (dst, dm) = dest_side(&setup, FakeMachine::new(2, UUID));
    let (pager, dm) = with_pager(&dst, dm);
    let opts = DestOptions {
        postcopy_ram: true,
        postcopy_preempt: true,
        ..dst_opts(false)
    };
    let d = start_dest(&dst, dm, Incoming::Listener(listener), opts);
    let MigrationUri::Unix { path } = &uri else {
        unreachable!()
    };
    let cfg = config();
    let main = UnixStream::connect(path).expect("connect main");
    let rp = main.try_clone().expect("clone");
    let mut w =
        StreamWriter::with_version(main, &cfg, &Limits::default(), VERSION_PREEMPT).unwrap();
    w.write_command(Command::OpenReturnPath).unwrap();
    w.write_command(Command::Capabilities {
        switchover_ack: false,
        validate_uuid: false,
        ram_digest: false,
        postcopy_ram: true,
        multifd: false,
        postcopy_preempt: true,
    })
    .unwrap();
    w.write_command(Command::PostcopyAdvise {
        page_size: FakeRam::small().page_size(),
    })
    .unwrap();
    w.write_command(Command::PostcopyPreempt { token: TOKEN })
        .unwrap();
    w.flush().unwrap();
    let mut second_conn = UnixStream::connect(path).expect("connect preempt");
    match second {
        Second::Token(t) => {
            let mut p =
                StreamWriter::with_version(second_conn, &cfg, &Limits::default(), VERSION_PREEMPT)
                    .unwrap();
            p.write_command(Command::PostcopyPreempt { token: t })
                .unwrap();
            p.flush().unwrap();
            let _open_until_the_end = p;
            return finish(d, rp, w, pager);
        }
        Second::Garbage => {
            second_conn
                .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
        }
        Second::PageBeforeListen => {
            let mut p = StreamWriter::with_version(
                second_conn.try_clone().unwrap(),
                &cfg,
                &Limits::default(),
                VERSION_PREEMPT,
            )
            .unwrap();
            p.write_command(Command::PostcopyPreempt { token: TOKEN })
                .unwrap();
            let page = vec![0x5au8; FakeRam::small().page_size() as usize];
            p.write_ram_batch(&[RamPage::normal(0, 1, &page)]).unwrap();
            p.flush().unwrap();
        }
    }
    finish(d, rp, w, pager)
}

fn finish(
    d: tern_migration::dest::DestHandle,
    rp: UnixStream,
    w: StreamWriter<UnixStream>,
    pager: FakePager,
) -> (String, Vec<String>) {
    // The return path until the destination's SHUT (it answers ERROR + SHUT{1}), then the
    // source closes (the destination lingers until it does).
    let mut errors = Vec::new();
    {
        let mut r = ReturnPathReader::with_config(rp, &config(), &Limits::default());
        while let Ok(Some(m)) = r.read_message() {
            match m {
                RpMessage::Error { message } => errors.push(message),
                RpMessage::Shut { .. } => break,
                _ => {}
            }
        }
    }
    drop(w);
    let out = d.join().expect("join");
    assert_eq!(out.status, S::Failed);
    assert_eq!(pager.paging_stats().pages_placed, 0, "nothing placed");
    (out.error.unwrap_or_default(), errors)
}

#[test]
fn a_preempt_channel_of_another_migration_is_refused_naming_both_tokens() {
    let (e, errors) = refused(Second::Token(*b"another-migratio"));
    assert!(e.contains("post-copy preempt channel"), "{e}");
    assert!(
        e.contains("a preempt channel for an unknown migration"),
        "{e}"
    );
    assert!(e.contains(&hex(b"another-migratio")), "{e}");
    assert!(e.contains(&hex(&TOKEN)), "{e}");
    assert!(
        errors.iter().any(|m| m.contains("unknown migration")),
        "the source is told: {errors:?}"
    );
}

#[test]
fn a_preempt_channel_with_a_wrong_magic_is_refused_naming_it() {
    let (e, errors) = refused(Second::Garbage);
    assert!(e.contains("post-copy preempt channel"), "{e}");
    assert!(e.contains("magic"), "{e}");
    assert!(errors.iter().any(|m| m.contains("magic")), "{errors:?}");
}

#[test]
fn a_page_on_the_preempt_channel_before_the_switch_is_refused() {
    let (e, errors) = refused(Second::PageBeforeListen);
    assert!(
        e.contains("RAM on the preempt channel before POSTCOPY_LISTEN"),
        "{e}"
    );
    assert!(
        errors.iter().any(|m| m.contains("before POSTCOPY_LISTEN")),
        "{errors:?}"
    );
}

fn hex(t: &[u8; 16]) -> String {
    t.iter().map(|b| format!("{b:02x}")).collect()
}

/// Decision 153: both channels place through one received set. Page 10 (discarded, so
/// missing) comes on the main channel after RUN and is placed; the same page then comes on
/// the preempt channel: refused by name, never placed a second time (the running guest may
/// have written it), and the migration fails as decision 73 says.
#[test]
fn a_page_placed_from_the_main_channel_is_refused_on_the_preempt_channel() {
    let dir = tempfile::tempdir().expect("tempdir");
    let uri = MigrationUri::Unix {
        path: dir.path().join("mig.sock"),
    };
    let listener = Listener::bind(&uri).expect("bind");
    let setup = Setup::default();
    let (dst, dm) = dest_side(&setup, FakeMachine::new(2, UUID));
    let (pager, dm) = with_pager(&dst, dm);
    let opts = DestOptions {
        postcopy_ram: true,
        postcopy_preempt: true,
        ..dst_opts(false)
    };
    let d = start_dest(&dst, dm, Incoming::Listener(listener), opts);
    let MigrationUri::Unix { path } = &uri else {
        unreachable!()
    };
    let cfg = config();
    let ps = FakeRam::small().page_size();
    let page = vec![0x5au8; ps as usize];
    let main = UnixStream::connect(path).expect("connect main");
    let mut rp =
        ReturnPathReader::with_config(main.try_clone().expect("clone"), &cfg, &Limits::default());
    let mut until = |want: &dyn Fn(&RpMessage) -> bool| -> Vec<RpMessage> {
        let mut seen = Vec::new();
        while let Ok(Some(m)) = rp.read_message() {
            let done = want(&m);
            seen.push(m);
            if done {
                break;
            }
        }
        seen
    };
    let mut w =
        StreamWriter::with_version(main, &cfg, &Limits::default(), VERSION_PREEMPT).unwrap();
    w.write_command(Command::OpenReturnPath).unwrap();
    w.write_command(Command::Capabilities {
        switchover_ack: false,
        validate_uuid: false,
        ram_digest: false,
        postcopy_ram: true,
        multifd: false,
        postcopy_preempt: true,
    })
    .unwrap();
    w.write_command(Command::PostcopyAdvise { page_size: ps })
        .unwrap();
    w.write_command(Command::PostcopyPreempt { token: TOKEN })
        .unwrap();
    w.flush().unwrap();
    let second = UnixStream::connect(path).expect("connect preempt");
    let mut p =
        StreamWriter::with_version(second, &cfg, &Limits::default(), VERSION_PREEMPT).unwrap();
    p.write_command(Command::PostcopyPreempt { token: TOKEN })
        .unwrap();
    p.flush().unwrap();
    let seen = until(&|m| *m == RpMessage::PreemptAck);
    assert_eq!(seen.last(), Some(&RpMessage::PreemptAck), "{seen:?}");
    // The switch: page 3 came in pre-copy, pages 10 and 11 are discarded (missing).
    w.write_ram_batch(&[RamPage::normal(0, 3, &page)]).unwrap();
    w.write_command(Command::SwitchoverStart).unwrap();
    w.write_command(Command::RunState { running: true })
        .unwrap();
    w.write_ram_discard(0, &[(10, 2)]).unwrap();
    w.write_command(Command::PostcopyListen).unwrap();
    w.write_postcopy_run().unwrap();
    // Page 10 on the main channel; its PONG says it was placed.
    w.write_ram_batch(&[RamPage::normal(0, 10, &page)]).unwrap();
    w.write_command(Command::Ping { seq: 7 }).unwrap();
    w.flush().unwrap();
    let seen = until(&|m| *m == RpMessage::Pong { seq: 7 });
    assert!(seen.contains(&RpMessage::Resumed), "{seen:?}");
    assert_eq!(pager.paging_stats().pages_placed, 1);
    // The same page on the preempt channel.
    p.write_ram_batch(&[RamPage::normal(0, 10, &page)]).unwrap();
    p.flush().unwrap();
    let seen = until(&|m| matches!(m, RpMessage::Shut { .. }));
    drop(rp);
    drop(w);
    let out = d.join().expect("join");
    assert_eq!(out.status, S::Failed);
    let e = out.error.unwrap_or_default();
    assert!(e.contains("post-copy preempt channel"), "{e}");
    assert!(
        e.contains("page 10 of block 0 sent in post-copy but already present"),
        "{e}"
    );
    assert!(e.contains("pages never received"), "{e}");
    assert!(
        seen.iter().any(
            |m| matches!(m, RpMessage::Error { message } if message.contains("already present"))
        ),
        "the source is told: {seen:?}"
    );
    assert_eq!(pager.paging_stats().pages_placed, 1, "placed once");
    assert!(!pager.finished());
    drop(p);
}
