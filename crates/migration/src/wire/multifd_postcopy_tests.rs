//! Multifd together with post-copy (`docs/stream-format.md` §5.4, version 8): the version the
//! combination needs, `MULTIFD_END`'s order rules against a hostile main stream, and RAM on
//! the main stream after it.

use super::channel_test_support::{read_main, write_multifd_channels};
use super::tests::{page, sample_config, PS};
use super::*;

const ID: [u8; 16] = [7; 16];

fn caps(postcopy_ram: bool) -> Command {
    Command::Capabilities {
        switchover_ack: false,
        validate_uuid: false,
        ram_digest: false,
        postcopy_ram,
        postcopy_preempt: false,
        multifd: true,
    }
}

/// A version-`version` main stream: CAPABILITIES (multifd, and post-copy when `postcopy`),
/// MULTIFD_CHANNELS, POSTCOPY_ADVISE when `postcopy`, then `next`, ended.
fn stream(version: u32, postcopy: bool, next: impl FnOnce(&mut StreamWriter<Vec<u8>>)) -> Vec<u8> {
    let mut w =
        StreamWriter::with_version(Vec::new(), &sample_config(), &Limits::default(), version)
            .expect("writer");
    w.write_command(caps(postcopy)).expect("caps");
    write_multifd_channels(&mut w, 2, Compression::None, ID);
    if postcopy {
        w.write_command(Command::PostcopyAdvise {
            page_size: PS as u32,
        })
        .expect("advise");
    }
    next(&mut w);
    w.finish().expect("end")
}

fn out_of_order(r: Result<Vec<String>, WireError>, text: &str) {
    match r {
        Err(e @ WireError::OutOfOrder { .. }) => assert!(e.to_string().contains(text), "{e}"),
        other => panic!("expected OutOfOrder ({text}), got {other:?}"),
    }
}

/// The switch as the source writes it: MULTIFD_END, the early discard's sync and discard,
/// SWITCHOVER_START, RUN_STATE, the final discard, LISTEN, RUN, a page on the main stream.
fn switch(w: &mut StreamWriter<Vec<u8>>) {
    w.write_command(Command::MultifdEnd).expect("multifd end");
    w.write_command(Command::IterationEnd { pass: 2 })
        .expect("sync");
    w.write_ram_discard(0, &[(1, 2)]).expect("early discard");
    w.write_command(Command::SwitchoverStart).expect("switch");
    w.write_command(Command::RunState { running: true })
        .expect("run state");
    w.write_ram_discard(0, &[(1, 2)]).expect("discard");
    w.write_command(Command::PostcopyListen).expect("listen");
    w.write_postcopy_run().expect("run");
    let p = page(9);
    w.write_ram_batch(&[RamPage::normal(0, 1, &p)])
        .expect("post-copy page on the main stream");
}

#[test]
fn the_combination_is_version_8_and_an_older_stream_refuses_it() {
    let v7_writer = || {
        StreamWriter::with_version(
            Vec::new(),
            &sample_config(),
            &Limits::default(),
            VERSION_EARLY_DISCARD,
        )
        .expect("writer")
    };
    // The writer of version 7 refuses to announce it.
    let mut w = v7_writer();
    let e = w.write_command(caps(true)).unwrap_err();
    assert!(e.to_string().contains("needs stream version 8"), "{e}");
    // A version-8 stream whose header says 7 (the header is not checksummed): refused at
    // CAPABILITIES, naming the version it needs.
    let mut b = stream(VERSION_MULTIFD_POSTCOPY, true, switch);
    b[8..12].copy_from_slice(&VERSION_EARLY_DISCARD.to_le_bytes());
    let e = read_main(&b).unwrap_err();
    assert!(matches!(e, WireError::Invalid { .. }), "{e:?}");
    assert!(e.to_string().contains("needs stream version 8"), "{e}");
    // MULTIFD_END is unknown before version 8.
    let mut w = v7_writer();
    assert!(w.write_command(Command::MultifdEnd).is_err());
}

#[test]
fn a_version_8_switch_reads_with_ram_on_the_main_stream_after_multifd_end() {
    let names = read_main(&stream(VERSION_MULTIFD_POSTCOPY, true, switch)).expect("valid");
    let at = |n: &str| names.iter().position(|x| x == n).unwrap_or(usize::MAX);
    assert!(at("multifd-end") < at("ram-discard"), "{names:?}");
    assert_eq!(names.last().map(String::as_str), Some("ram"), "{names:?}");
    // Both capabilities and no switch: the channels end at END, no MULTIFD_END.
    read_main(&stream(VERSION_MULTIFD_POSTCOPY, true, |w| {
        w.write_command(Command::SwitchoverStart).expect("switch");
        w.write_command(Command::RunState { running: true })
            .expect("run state");
    }))
    .expect("a pre-copy completion");
}

#[test]
fn hostile_multifd_end_orders_are_refused() {
    let v8 = VERSION_MULTIFD_POSTCOPY;
    // The destination would drop pages a channel may still write: RAM_DISCARD first.
    out_of_order(
        read_main(&stream(v8, true, |w| {
            w.write_ram_discard(0, &[(1, 2)]).expect("discard");
        })),
        "MULTIFD_END",
    );
    // POSTCOPY_LISTEN (userfaultfd registered) before the channels ended.
    out_of_order(
        read_main(&stream(v8, true, |w| {
            w.write_command(Command::SwitchoverStart).expect("switch");
            w.write_command(Command::RunState { running: true })
                .expect("run state");
            w.write_command(Command::PostcopyListen).expect("listen");
        })),
        "MULTIFD_END",
    );
    // Twice.
    out_of_order(
        read_main(&stream(v8, true, |w| {
            w.write_command(Command::MultifdEnd).expect("1");
            w.write_command(Command::MultifdEnd).expect("2");
        })),
        "a second MULTIFD_END",
    );
    // Without post-copy negotiated (multifd alone ends its channels at END).
    out_of_order(
        read_main(&stream(v8, false, |w| {
            w.write_command(Command::MultifdEnd).expect("end");
        })),
        "without multifd and postcopy-ram",
    );
    // RAM on the main stream before MULTIFD_END is still refused.
    let e = read_main(&stream(v8, true, |w| {
        let p = page(3);
        w.write_ram_batch(&[RamPage::normal(0, 1, &p)])
            .expect("batch");
    }))
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("on the main stream of a multifd migration"),
        "{e}"
    );
}
