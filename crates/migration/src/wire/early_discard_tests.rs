//! The early post-copy discard (`docs/stream-format.md` §13.3, version 7): RAM_DISCARD during
//! pre-copy after `POSTCOPY_ADVISE`, and the hostile-input rules around it.

use super::format::cmd;
use super::hostile_tests::{drain, err_of, expect, raw, raw_v, switchover_start};
use super::postcopy_tests::{
    advise, caps, command, discard, listen, postcopy_writer, run_state, with_run,
};
use super::tests::{page, PS};
use super::*;

fn ping(seq: u32) -> (u8, Vec<u8>) {
    command(cmd::PING, &seq.to_le_bytes())
}

/// A RAM record (version-1 layout; `raw` frames it as a batch) with one NORMAL page.
fn ram_page(block: u16, page_no: u32) -> (u8, Vec<u8>) {
    let mut b = 1u32.to_le_bytes().to_vec();
    b.extend_from_slice(&page_no.to_le_bytes());
    b.extend_from_slice(&block.to_le_bytes());
    b.extend_from_slice(&[page_kind::NORMAL, 0]);
    b.extend_from_slice(&page(7));
    (RecordKind::Ram as u8, b)
}

/// Setup, a pre-copy page, the early discard and the drain `PING`, valid in version 7.
fn early_prefix() -> Vec<(u8, Vec<u8>)> {
    vec![
        caps(cmd::CAP_POSTCOPY_RAM),
        advise(PS as u32),
        ram_page(0, 1),
        discard(0, &[(0, 4), (10, 2)]),
        ping(2),
    ]
}

/// [`early_prefix`] + the switch up to `POSTCOPY_LISTEN`.
fn early_switch() -> Vec<(u8, Vec<u8>)> {
    let mut r = early_prefix();
    r.extend([
        switchover_start(),
        run_state(),
        discard(0, &[(20, 1)]),
        listen(),
    ]);
    r
}

#[test]
fn a_written_stream_with_an_early_discard_round_trips() {
    let mut w = postcopy_writer(&Limits::default(), VERSION_EARLY_DISCARD);
    let p = page(3);
    w.write_ram_batch(&[RamPage::normal(0, 1, &p), RamPage::normal(0, 2, &p)])
        .unwrap();
    w.write_ram_discard(0, &[(1, 2)]).unwrap();
    // A page sent after its early discard: present again (the engine's rule, the reader accepts it).
    w.write_ram_batch(&[RamPage::normal(0, 2, &p)]).unwrap();
    w.write_command(Command::Ping { seq: 2 }).unwrap();
    w.write_command(Command::SwitchoverStart).unwrap();
    w.write_command(Command::RunState { running: true })
        .unwrap();
    w.write_ram_discard(0, &[(1, 1)]).unwrap();
    w.write_command(Command::PostcopyListen).unwrap();
    w.write_section("vcpu", 0, 1, b"state").unwrap();
    w.write_postcopy_run().unwrap();
    w.write_ram_batch(&[RamPage::normal(0, 1, &p)]).unwrap();
    let bytes = w.finish().unwrap();
    let mut r = StreamReader::new(&bytes[..], Limits::default(), expect()).unwrap();
    assert_eq!(r.header().version, VERSION_EARLY_DISCARD);
    let mut seen = Vec::new();
    loop {
        let rec = r.next_record().unwrap();
        if let Record::RamDiscard(d) = &rec {
            seen.push(format!("ram-discard {:?}", d.ranges));
        } else {
            seen.push(
                match &rec {
                    Record::Command(c) => c.name(),
                    other => other.name(),
                }
                .to_string(),
            );
        }
        if matches!(rec, Record::End(_)) {
            break;
        }
    }
    assert_eq!(
        seen,
        [
            "capabilities",
            "postcopy-advise",
            "ram",
            "ram-discard [(1, 2)]",
            "ram",
            "ping",
            "switchover-start",
            "run-state",
            "ram-discard [(1, 1)]",
            "postcopy-listen",
            "section",
            "postcopy-run",
            "ram",
            "end"
        ]
    );
}

#[test]
fn a_raw_stream_with_early_discards_and_pages_after_them_is_accepted() {
    let mut r = early_switch();
    // Pages again after the discard, a second early discard, then the switch.
    r.insert(5, ram_page(0, 2));
    r.insert(6, discard(1, &[(0, 16)]));
    let n = drain(&with_run(&r, &[]), &Limits::default(), expect()).unwrap();
    assert_eq!(n, r.len() + 1, "every record and POSTCOPY_RUN");
}

#[test]
fn an_early_discard_is_refused_without_advise_in_an_older_stream_or_after_listen() {
    let early = discard(0, &[(0, 1)]);
    // No post-copy negotiated at all, or CAPABILITIES without postcopy-ram.
    let e = err_of(&raw(std::slice::from_ref(&early)));
    assert!(
        matches!(
            &e,
            WireError::OutOfOrder {
                record: "ram-discard",
                ..
            }
        ) && e.to_string().contains("without POSTCOPY_ADVISE"),
        "{e}"
    );
    let e = err_of(&raw(&[caps(0), early.clone()]));
    assert!(e.to_string().contains("without POSTCOPY_ADVISE"), "{e}");
    // Version 6: the same stream a version-7 reader accepts is refused, naming the version.
    let e = err_of(&raw_v(6, &early_prefix()));
    assert!(
        e.to_string()
            .contains("an early discard needs stream version 7"),
        "{e}"
    );
    // Between SWITCHOVER_START and RUN_STATE, in every version.
    let mut r = early_prefix();
    r.extend([switchover_start(), early.clone()]);
    let e = err_of(&raw(&r));
    assert!(
        e.to_string()
            .contains("before SWITCHOVER_START and RUN_STATE"),
        "{e}"
    );
    // After POSTCOPY_LISTEN, and after RUN.
    let mut r = early_switch();
    r.push(early.clone());
    let e = err_of(&raw(&r));
    assert!(e.to_string().contains("after POSTCOPY_LISTEN"), "{e}");
    let e = err_of(&with_run(&early_switch(), &[early]));
    assert!(e.to_string().contains("after POSTCOPY_LISTEN"), "{e}");
}

#[test]
fn an_early_discard_out_of_range_is_refused_naming_the_range() {
    let at = |d: (u8, Vec<u8>)| {
        let mut r = early_prefix();
        r[3] = d;
        err_of(&raw(&r)).to_string()
    };
    assert!(at(discard(2, &[(0, 1)])).contains("block 2, the CONFIG has 2"));
    assert!(at(discard(1, &[(10, 7)])).contains("range 0: ends at page 17, the block has 16"));
    assert!(at(discard(0, &[(0, 4), (3, 1)])).contains("range 1: starts at page 3"));
    assert!(at(discard(0, &[(0, 0)])).contains("an empty range"));
}

#[test]
fn after_an_early_discard_the_migration_must_switch() {
    // A pre-copy tail (RAM or SECTION after SWITCHOVER_START, before LISTEN).
    let mut r = early_prefix();
    r.extend([switchover_start(), run_state(), ram_page(0, 3)]);
    let e = err_of(&raw(&r));
    assert!(e.to_string().contains("after an early RAM_DISCARD"), "{e}");
    // END before POSTCOPY_LISTEN (`raw` appends END): at once, or after SWITCHOVER_START.
    let e = err_of(&raw(&early_prefix()));
    assert!(
        matches!(&e, WireError::OutOfOrder { record: "end", .. })
            && e.to_string().contains("after an early RAM_DISCARD"),
        "{e}"
    );
    let mut r = early_prefix();
    r.extend([switchover_start(), run_state()]);
    let e = err_of(&raw(&r));
    assert!(e.to_string().contains("after an early RAM_DISCARD"), "{e}");
    // Without an early discard a post-copy-capable stream may still end in pre-copy.
    let r = vec![
        caps(cmd::CAP_POSTCOPY_RAM),
        advise(PS as u32),
        ram_page(0, 1),
        switchover_start(),
        run_state(),
        ram_page(0, 3),
    ];
    assert!(drain(&raw(&r), &Limits::default(), expect()).is_ok());
}

#[test]
fn the_writer_refuses_an_early_discard_below_version_7() {
    for version in VERSION_POSTCOPY..VERSION_EARLY_DISCARD {
        let mut w = postcopy_writer(&Limits::default(), version);
        let p = page(3);
        w.write_ram_batch(&[RamPage::normal(0, 1, &p)]).unwrap();
        let before = w.bytes_written();
        let e = w.write_ram_discard(0, &[(1, 1)]).unwrap_err();
        assert!(
            matches!(
                e,
                WireError::EarlyDiscardNeedsVersion { version: v, needs: VERSION_EARLY_DISCARD }
                    if v == version
            ),
            "version {version}: {e:?}"
        );
        let text = e.to_string();
        assert!(
            text.contains("RAM_DISCARD before SWITCHOVER_START")
                && text.contains("needs stream version 7")
                && text.contains(&format!("this stream is version {version}")),
            "{text}"
        );
        assert_eq!(
            w.bytes_written(),
            before,
            "nothing of it reached the stream"
        );
        // The refusal does not break the writer: what it wrote is a stream its reader
        // accepts (a post-copy-capable migration that ends in pre-copy).
        w.write_command(Command::Ping { seq: 2 }).unwrap();
        let bytes = w.finish().unwrap();
        let n = drain(&bytes, &Limits::default(), expect()).unwrap();
        assert_eq!(n, 4, "version {version}: CAPABILITIES, ADVISE, RAM, PING");
    }
    // Version 7 writes the same early discard.
    let mut w = postcopy_writer(&Limits::default(), VERSION_EARLY_DISCARD);
    w.write_ram_discard(0, &[(1, 1)]).unwrap();
}
