//! Post-copy records (`docs/stream-format.md` §13): round trip through the writer, and the
//! hostile-input rules (order, exact lengths, ranges, limits, checksum of the package).

use super::format::cmd;
use super::hostile_tests::{drain, err_of, expect, raw, raw_v, switchover_start};
use super::tests::{page, sample_config, PS};
use super::*;

pub(super) fn command(n: u16, payload: &[u8]) -> (u8, Vec<u8>) {
    let mut b = n.to_le_bytes().to_vec();
    b.extend_from_slice(payload);
    (RecordKind::Command as u8, b)
}

pub(super) fn caps(flags: u32) -> (u8, Vec<u8>) {
    command(cmd::CAPABILITIES, &flags.to_le_bytes())
}

pub(super) fn advise(page_size: u32) -> (u8, Vec<u8>) {
    let mut p = page_size.to_le_bytes().to_vec();
    p.extend_from_slice(&0u32.to_le_bytes());
    command(cmd::POSTCOPY_ADVISE, &p)
}

pub(super) fn run_state() -> (u8, Vec<u8>) {
    command(cmd::RUN_STATE, &[1])
}

pub(super) fn listen() -> (u8, Vec<u8>) {
    command(cmd::POSTCOPY_LISTEN, &[])
}

pub(super) fn discard(block: u16, ranges: &[(u32, u32)]) -> (u8, Vec<u8>) {
    let mut b = block.to_le_bytes().to_vec();
    b.extend_from_slice(&0u16.to_le_bytes());
    b.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
    for (f, n) in ranges {
        b.extend_from_slice(&f.to_le_bytes());
        b.extend_from_slice(&n.to_le_bytes());
    }
    (RecordKind::RamDiscard as u8, b)
}

/// The records of a post-copy stream up to (not including) the package, valid.
pub(super) fn prefix() -> Vec<(u8, Vec<u8>)> {
    vec![
        caps(cmd::CAP_POSTCOPY_RAM),
        advise(PS as u32),
        switchover_start(),
        run_state(),
        discard(0, &[(1, 2), (10, 1)]),
        listen(),
    ]
}

/// A writer of stream `version` over the sample config, past `CAPABILITIES` with
/// `postcopy-ram` and `POSTCOPY_ADVISE`.
pub(super) fn postcopy_writer(limits: &Limits, version: u32) -> StreamWriter<Vec<u8>> {
    let mut w = StreamWriter::with_version(Vec::new(), &sample_config(), limits, version).unwrap();
    w.write_command(Command::Capabilities {
        switchover_ack: false,
        validate_uuid: false,
        ram_digest: false,
        postcopy_ram: true,
        postcopy_preempt: false,
        multifd: false,
    })
    .unwrap();
    w.write_command(Command::PostcopyAdvise {
        page_size: PS as u32,
    })
    .unwrap();
    w
}

/// A valid post-copy stream written by the writer: setup, a pre-copy page, the switch, the
/// discard, the package, post-copy pages, END.
fn written_stream() -> Vec<u8> {
    let mut w = postcopy_writer(&Limits::default(), VERSION_POSTCOPY);
    let p = page(3);
    w.write_ram_batch(&[RamPage::normal(0, 1, &p)]).unwrap();
    w.write_command(Command::SwitchoverStart).unwrap();
    w.write_command(Command::RunState { running: true })
        .unwrap();
    w.write_ram_discard(0, &[(1, 1)]).unwrap();
    w.write_command(Command::PostcopyListen).unwrap();
    w.write_section("vcpu", 0, 1, b"state").unwrap();
    w.write_postcopy_run().unwrap();
    w.write_ram_batch(&[RamPage::normal(0, 1, &p), RamPage::zero(1, 3)])
        .unwrap();
    w.finish().unwrap()
}

#[test]
fn written_post_copy_stream_round_trips() {
    let bytes = written_stream();
    let mut r = StreamReader::new(&bytes[..], Limits::default(), expect()).unwrap();
    assert_eq!(r.header().version, VERSION_POSTCOPY);
    let mut seen = Vec::new();
    loop {
        let rec = r.next_record().unwrap();
        match &rec {
            Record::RamDiscard(d) => {
                assert_eq!((d.block, d.ranges.clone()), (0, vec![(1, 1)]));
            }
            Record::Command(Command::Capabilities { postcopy_ram, .. }) => assert!(postcopy_ram),
            Record::Command(Command::PostcopyAdvise { page_size }) => {
                assert_eq!(*page_size, PS as u32)
            }
            _ => {}
        }
        let name = match &rec {
            Record::Command(c) => c.name(),
            other => other.name(),
        };
        seen.push(name);
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
            "switchover-start",
            "run-state",
            "ram-discard",
            "postcopy-listen",
            "section",
            "postcopy-run",
            "ram",
            "end"
        ]
    );
    let json = analyze(&bytes[..], &Limits::default());
    assert!(json.to_string().contains("ram-discard"), "{json}");
}

#[test]
fn the_writer_refuses_post_copy_in_an_older_version_and_bad_discards() {
    let cfg = sample_config();
    let mut w = StreamWriter::with_version(Vec::new(), &cfg, &Limits::default(), 2).unwrap();
    assert!(w.write_command(Command::PostcopyListen).is_err());
    assert!(w.write_ram_discard(0, &[(0, 1)]).is_err());
    let mut w = StreamWriter::with_version(Vec::new(), &cfg, &Limits::default(), 3).unwrap();
    for bad in [&[(0u32, 0u32)][..], &[(63, 2)], &[(5, 2), (6, 1)]] {
        assert!(w.write_ram_discard(0, bad).is_err(), "{bad:?}");
    }
    assert!(w.write_ram_discard(2, &[(0, 1)]).is_err());
    // Long lists are split at the limit.
    let limits = Limits {
        max_discard_ranges: 2,
        ..Limits::default()
    };
    let mut w = postcopy_writer(&limits, 3);
    w.write_command(Command::SwitchoverStart).unwrap();
    w.write_command(Command::RunState { running: true })
        .unwrap();
    w.write_ram_discard(0, &[(0, 1), (2, 1), (4, 1)]).unwrap();
    w.write_command(Command::PostcopyListen).unwrap();
    w.write_postcopy_run().unwrap();
    let bytes = w.finish().unwrap();
    let json = analyze(&bytes[..], &Limits::default()).to_string();
    assert_eq!(json.matches("ram-discard").count(), 2, "{json}");
}

#[test]
fn a_valid_raw_post_copy_stream_is_accepted() {
    let mut recs = prefix();
    // The package's checksum is computed over the raw stream: build it in two steps.
    let head = raw(&recs);
    let end_at = head.len() - 17;
    let covered = &head[HEADER_LEN as usize..end_at];
    let mut run = crc32fast::hash(covered).to_le_bytes().to_vec();
    run.extend_from_slice(&(covered.len() as u64).to_le_bytes());
    recs.push(command(cmd::POSTCOPY_RUN, &run));
    assert_eq!(drain(&raw(&recs), &Limits::default(), expect()).unwrap(), 7);
}

/// The raw stream `recs` + `POSTCOPY_RUN` with a correct checksum (over every record but the
/// RAM batches, §5.1) + `tail`.
pub(super) fn with_run(recs: &[(u8, Vec<u8>)], tail: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let head = raw(recs);
    let covered = &head[HEADER_LEN as usize..head.len() - 17];
    let mut crc = crc32fast::Hasher::new();
    let mut at = 0;
    while at < covered.len() {
        let len = u32::from_le_bytes(covered[at + 1..at + 5].try_into().unwrap()) as usize;
        let rec = &covered[at..at + 5 + len];
        if rec[0] != RecordKind::Ram as u8 {
            crc.update(rec);
        }
        at += 5 + len;
    }
    let mut run = crc.finalize().to_le_bytes().to_vec();
    run.extend_from_slice(&(covered.len() as u64).to_le_bytes());
    let mut all = recs.to_vec();
    all.push(command(cmd::POSTCOPY_RUN, &run));
    all.extend_from_slice(tail);
    raw(&all)
}

#[test]
fn post_copy_records_are_refused_in_older_streams() {
    let e = err_of(&raw_v(2, &[discard(0, &[(0, 1)])]));
    assert!(e.to_string().contains("unknown record kind 0x08"), "{e}");
    for n in [
        cmd::POSTCOPY_ADVISE,
        cmd::POSTCOPY_LISTEN,
        cmd::POSTCOPY_RUN,
    ] {
        let e = err_of(&raw_v(2, &[command(n, &[])]));
        assert!(matches!(e, WireError::UnsupportedCommand { .. }), "{e}");
    }
    let e = err_of(&raw_v(2, &[caps(cmd::CAP_POSTCOPY_RAM)]));
    assert!(e.to_string().contains("reserved bits set: 0x10"), "{e}");
}

#[test]
fn capabilities_and_advise_rules() {
    // postcopy-ram with x-tern-ram-digest.
    let e = err_of(&raw(&[caps(cmd::CAP_POSTCOPY_RAM | cmd::CAP_RAM_DIGEST)]));
    assert!(e.to_string().contains("postcopy-ram together"), "{e}");
    // Bit 5 (postcopy-preempt) is reserved before version 6 and needs bit 4 (§13.8).
    let e = err_of(&raw_v(5, &[caps(0x20)]));
    assert!(e.to_string().contains("reserved bits set: 0x20"), "{e}");
    let e = err_of(&raw(&[caps(0x20)]));
    assert!(
        e.to_string()
            .contains("postcopy-preempt without postcopy-ram"),
        "{e}"
    );
    // ADVISE missing after the bit, ADVISE without the bit, ADVISE twice.
    let e = err_of(&raw(&[caps(cmd::CAP_POSTCOPY_RAM), switchover_start()]));
    assert!(e.to_string().contains("followed by POSTCOPY_ADVISE"), "{e}");
    let e = err_of(&raw(&[caps(cmd::CAP_POSTCOPY_RAM)]));
    assert!(e.to_string().contains("followed by POSTCOPY_ADVISE"), "{e}");
    let e = err_of(&raw(&[caps(0), advise(PS as u32)]));
    assert!(e.to_string().contains("without CAPABILITIES"), "{e}");
    let e = err_of(&raw(&[
        caps(cmd::CAP_POSTCOPY_RAM),
        advise(PS as u32),
        advise(PS as u32),
    ]));
    assert!(e.to_string().contains("without CAPABILITIES"), "{e}");
    // Wrong page size, reserved field, wrong length.
    let e = err_of(&raw(&[caps(cmd::CAP_POSTCOPY_RAM), advise(8192)]));
    assert!(e.to_string().contains("CONFIG's page size is 4096"), "{e}");
    let mut p = (PS as u32).to_le_bytes().to_vec();
    p.extend_from_slice(&1u32.to_le_bytes());
    let e = err_of(&raw(&[
        caps(cmd::CAP_POSTCOPY_RAM),
        command(cmd::POSTCOPY_ADVISE, &p),
    ]));
    assert!(e.to_string().contains("post-copy reserved"), "{e}");
    let e = err_of(&raw(&[
        caps(cmd::CAP_POSTCOPY_RAM),
        command(cmd::POSTCOPY_ADVISE, &p[..4]),
    ]));
    assert!(e.to_string().contains("missing post-copy reserved"), "{e}");
}

#[test]
fn discard_body_is_checked_exactly() {
    let at = |d: (u8, Vec<u8>)| {
        let mut r = prefix();
        r[4] = d;
        err_of(&raw(&r)).to_string()
    };
    assert!(at(discard(2, &[(0, 1)])).contains("block 2"));
    assert!(at(discard(0, &[(0, 0)])).contains("an empty range"));
    assert!(at(discard(0, &[(60, 5)])).contains("the block has 64"));
    assert!(at(discard(0, &[(u32::MAX, 2)])).contains("the block has 64"));
    assert!(at(discard(0, &[(5, 3), (6, 1)])).contains("before the previous range's end"));
    assert!(at(discard(0, &[])).contains("discard range count"));
    let mut d = discard(0, &[(0, 1)]);
    d.1[2] = 1;
    assert!(at(d).contains("discard reserved"));
    // A count that disagrees with the length.
    let mut d = discard(0, &[(0, 1), (3, 1)]);
    d.1[4] = 1;
    assert!(at(d).contains("ram-discard body"));
    let mut d = discard(0, &[(0, 1)]);
    d.1.push(0);
    assert!(at(d).contains("ram-discard body"));
}

#[test]
fn an_oversized_discard_is_refused_at_its_frame() {
    let limits = Limits {
        max_discard_ranges: 4,
        ..Limits::default()
    };
    let ranges: Vec<(u32, u32)> = (0..5).map(|i| (i * 2, 1)).collect();
    let mut r = prefix();
    r[4] = discard(0, &ranges);
    let e = drain(&raw(&r), &limits, expect()).unwrap_err();
    assert!(matches!(e, WireError::TooLarge { .. }), "{e}");
    // A lying frame length on a short stream: refused before anything is read.
    let mut b = raw(&prefix()[..4]);
    let end = b.len() - 17;
    b.truncate(end);
    b.push(RecordKind::RamDiscard as u8);
    b.extend_from_slice(&u32::MAX.to_le_bytes());
    let e = drain(&b, &Limits::default(), expect()).unwrap_err();
    assert!(matches!(e, WireError::TooLarge { .. }), "{e}");
}

#[test]
fn switch_records_only_at_the_switch_point() {
    let p = prefix();
    // Discard before SWITCHOVER_START in a version-6 stream (version 7 allows it: the early
    // discard, early_discard_tests.rs), before RUN_STATE, without ADVISE.
    let e = err_of(&raw_v(6, &[p[0].clone(), p[1].clone(), p[4].clone()]));
    assert!(
        e.to_string()
            .contains("before SWITCHOVER_START and RUN_STATE"),
        "{e}"
    );
    let e = err_of(&raw(&[
        p[0].clone(),
        p[1].clone(),
        p[2].clone(),
        p[4].clone(),
    ]));
    assert!(
        e.to_string()
            .contains("before SWITCHOVER_START and RUN_STATE"),
        "{e}"
    );
    let e = err_of(&raw(&[switchover_start(), run_state(), listen()]));
    assert!(e.to_string().contains("without POSTCOPY_ADVISE"), "{e}");
    // After the pre-copy tail began (a SECTION after SWITCHOVER_START), no switch any more.
    let sec = (
        RecordKind::Section as u8,
        [
            &[4u8][..],
            b"vcpu",
            &0u32.to_le_bytes(),
            &1u32.to_le_bytes(),
        ]
        .concat(),
    );
    let e = err_of(&raw(&[
        p[0].clone(),
        p[1].clone(),
        p[2].clone(),
        p[3].clone(),
        sec.clone(),
        listen(),
    ]));
    assert!(e.to_string().contains("pre-copy tail began"), "{e}");
    // Discard after LISTEN, LISTEN twice.
    let mut r = p.clone();
    r.push(discard(0, &[(20, 1)]));
    assert!(err_of(&raw(&r))
        .to_string()
        .contains("after POSTCOPY_LISTEN"));
    let mut r = p.clone();
    r.push(listen());
    assert!(err_of(&raw(&r))
        .to_string()
        .contains("may be inside the post-copy device package"));
    // RAM inside the package; a command other than PING inside it; END without RUN.
    let mut r = p.clone();
    r.push((RecordKind::Ram as u8, {
        let mut b = 1u32.to_le_bytes().to_vec();
        b.extend_from_slice(&[5, 0, 0, 0, 0, 0, 1, 0]);
        b
    }));
    assert!(err_of(&raw(&r))
        .to_string()
        .contains("inside the post-copy device package"));
    let mut r = p.clone();
    r.push(command(cmd::ITERATION_END, &9u64.to_le_bytes()));
    assert!(err_of(&raw(&r))
        .to_string()
        .contains("may be inside the post-copy device package"));
    let mut r = p.clone();
    r.push(sec.clone());
    assert!(err_of(&raw(&r))
        .to_string()
        .contains("without POSTCOPY_RUN"));
    // PING inside the package is fine.
    let mut r = p.clone();
    r.push(command(cmd::PING, &7u32.to_le_bytes()));
    r.push(sec.clone());
    assert!(drain(&with_run(&r, &[]), &Limits::default(), expect()).is_ok());
    // After RUN: no SECTION, no command but PING, no second RUN.
    let e = err_of(&with_run(&p, &[sec]));
    assert!(e.to_string().contains("after POSTCOPY_RUN"), "{e}");
    let e = err_of(&with_run(
        &p,
        &[command(cmd::ITERATION_END, &9u64.to_le_bytes())],
    ));
    assert!(
        e.to_string().contains("other than PING after POSTCOPY_RUN"),
        "{e}"
    );
    assert!(drain(
        &with_run(&p, &[command(cmd::PING, &8u32.to_le_bytes())]),
        &Limits::default(),
        expect()
    )
    .is_ok());
    // RUN without LISTEN.
    let e = err_of(&with_run(&p[..4], &[]));
    assert!(e.to_string().contains("without POSTCOPY_LISTEN"), "{e}");
}

#[test]
fn the_package_checksum_is_checked() {
    let p = prefix();
    let good = with_run(&p, &[]);
    // Flip the RUN's crc and its total_bytes (END is recomputed by `raw`).
    let mut recs = p.clone();
    let head = raw(&p);
    let covered = &head[HEADER_LEN as usize..head.len() - 17];
    let mut run = (crc32fast::hash(covered) ^ 1).to_le_bytes().to_vec();
    run.extend_from_slice(&(covered.len() as u64).to_le_bytes());
    recs.push(command(cmd::POSTCOPY_RUN, &run));
    assert!(matches!(
        err_of(&raw(&recs)),
        WireError::ChecksumMismatch { .. }
    ));
    let mut recs = p.clone();
    let mut run = crc32fast::hash(covered).to_le_bytes().to_vec();
    run.extend_from_slice(&(covered.len() as u64 + 1).to_le_bytes());
    recs.push(command(cmd::POSTCOPY_RUN, &run));
    assert!(matches!(
        err_of(&raw(&recs)),
        WireError::LengthMismatch { .. }
    ));
    assert!(drain(&good, &Limits::default(), expect()).is_ok());
}
