//! The post-copy preempt channel (`docs/stream-format.md` §13.8, version 6): its handshake and
//! record rules in the reader, the announcement's rules on the main and recovery channels,
//! return-path `PREEMPT_ACK`, with hostile input.

use super::format::{cmd, page_kind};
use super::hostile_tests::{err_of, expect, raw, raw_v, switchover_start};
use super::tests::{page, sample_config};
use super::*;

const TOKEN: [u8; 16] = *b"0123456789abcdef";

fn command(n: u16, payload: &[u8]) -> (u8, Vec<u8>) {
    let mut b = n.to_le_bytes().to_vec();
    b.extend_from_slice(payload);
    (RecordKind::Command as u8, b)
}

fn preempt(token: &[u8; 16]) -> (u8, Vec<u8>) {
    command(cmd::POSTCOPY_PREEMPT, token)
}

fn caps(flags: u32) -> (u8, Vec<u8>) {
    command(cmd::CAPABILITIES, &flags.to_le_bytes())
}

fn advise() -> (u8, Vec<u8>) {
    let mut p = 4096u32.to_le_bytes().to_vec();
    p.extend_from_slice(&0u32.to_le_bytes());
    command(cmd::POSTCOPY_ADVISE, &p)
}

/// A version-1-layout RAM body of one zero page (`raw` frames it as a batch).
fn zero_page(block: u16, page: u32) -> (u8, Vec<u8>) {
    let mut b = 1u32.to_le_bytes().to_vec();
    b.extend_from_slice(&page.to_le_bytes());
    b.extend_from_slice(&block.to_le_bytes());
    b.extend_from_slice(&[page_kind::ZERO, 0]);
    (RecordKind::Ram as u8, b)
}

/// Reads a preempt channel to its END: the records before it, by name.
fn drain_preempt(bytes: &[u8]) -> Result<Vec<&'static str>, WireError> {
    let mut r = StreamReader::preempt(bytes, Limits::default(), expect())?;
    let mut names = Vec::new();
    loop {
        match r.next_record()? {
            Record::End(_) => return Ok(names),
            rec => names.push(rec.name()),
        }
    }
}

fn preempt_err(bytes: &[u8]) -> WireError {
    drain_preempt(bytes).expect_err("hostile preempt channel accepted")
}

#[test]
fn a_written_preempt_channel_round_trips_with_its_token() {
    let cfg = sample_config();
    let mut w =
        StreamWriter::with_version(Vec::new(), &cfg, &Limits::default(), VERSION_PREEMPT).unwrap();
    w.write_command(Command::PostcopyPreempt { token: TOKEN })
        .unwrap();
    let p = page(9);
    w.write_ram_batch(&[RamPage::normal(0, 5, &p), RamPage::zero(1, 2)])
        .unwrap();
    w.write_ram_batch(&[RamPage::zero(0, 6)]).unwrap();
    let bytes = w.finish().unwrap();
    let mut r = StreamReader::preempt(&bytes[..], Limits::default(), expect()).unwrap();
    assert_eq!(
        r.next_record().unwrap(),
        Record::Command(Command::PostcopyPreempt { token: TOKEN })
    );
    let mut seqs = Vec::new();
    loop {
        match r.next_record().unwrap() {
            Record::Ram(b) => seqs.push(b.header().map(|h| (h.channel, h.generation, h.seq))),
            Record::End(_) => break,
            other => panic!("unexpected {}", other.name()),
        }
    }
    assert_eq!(seqs, [Some((0, 1, 0)), Some((0, 1, 1))]);
    // A version-5 writer cannot announce or open one.
    let mut w5 = StreamWriter::with_version(Vec::new(), &cfg, &Limits::default(), 5).unwrap();
    assert!(w5
        .write_command(Command::PostcopyPreempt { token: TOKEN })
        .is_err());
    assert!(w5
        .write_command(Command::Capabilities {
            switchover_ack: false,
            validate_uuid: false,
            ram_digest: false,
            postcopy_ram: true,
            multifd: false,
            postcopy_preempt: true,
        })
        .is_err());
}

#[test]
fn a_hostile_preempt_channel_is_refused_naming_what_was_wrong() {
    // Wrong magic (e.g. garbage, or a stream of another program).
    let mut b = raw(&[preempt(&TOKEN)]);
    b[0] = b'X';
    assert!(matches!(preempt_err(&b), WireError::BadMagic { .. }));
    // An older stream version.
    let e = preempt_err(&raw_v(5, &[]));
    assert!(
        e.to_string()
            .contains("a post-copy preempt channel needs stream version 6"),
        "{e}"
    );
    // Not identified first: RAM, a PING, a main stream's first records.
    for first in [
        zero_page(0, 1),
        command(cmd::PING, &7u32.to_le_bytes()),
        command(cmd::OPEN_RETURN_PATH, &[]),
    ] {
        let e = preempt_err(&raw(&[first]));
        assert!(
            e.to_string()
                .contains("a preempt channel starts with POSTCOPY_PREEMPT"),
            "{e}"
        );
    }
    let e = preempt_err(&raw(&[]));
    assert!(
        e.to_string().contains("starts with POSTCOPY_PREEMPT"),
        "{e}"
    );
    // After the identification: only RAM and END (a second preempt channel, a command, state).
    for rec in [
        preempt(&TOKEN),
        command(cmd::PING, &1u32.to_le_bytes()),
        switchover_start(),
        command(cmd::POSTCOPY_LISTEN, &[]),
    ] {
        let e = preempt_err(&raw(&[preempt(&TOKEN), rec]));
        assert!(
            e.to_string()
                .contains("only RAM and END follow POSTCOPY_PREEMPT"),
            "{e}"
        );
    }
    // A page outside RAM (block 1 has 16 pages in the sample CONFIG; block 7 does not exist).
    for bad in [zero_page(1, 16), zero_page(7, 0)] {
        let e = preempt_err(&raw(&[preempt(&TOKEN), bad]));
        assert!(matches!(e, WireError::PageOutOfRange { .. }), "{e}");
    }
    // A corrupted batch is refused by its checksum before any page is handed out.
    let good = raw(&[preempt(&TOKEN), zero_page(0, 1)]);
    assert_eq!(drain_preempt(&good).unwrap(), ["command", "ram"]);
    let at = good.len() - 17 - 10;
    let mut bad = good.clone();
    bad[at] ^= 0x40;
    let e = preempt_err(&bad);
    assert!(
        matches!(e, WireError::BatchChecksumMismatch { .. }),
        "{e} at {at}"
    );
    // A truncated channel (the link broke) is `Truncated`, not accepted.
    let e = preempt_err(&good[..good.len() - 5]);
    assert!(matches!(e, WireError::Truncated { .. }), "{e}");
}

#[test]
fn the_main_channel_announces_one_preempt_channel_before_the_switch() {
    let pc = cmd::CAP_POSTCOPY_RAM | cmd::CAP_POSTCOPY_PREEMPT;
    // Accepted: negotiated, announced once, before SWITCHOVER_START.
    let ok = raw(&[caps(pc), advise(), preempt(&TOKEN), switchover_start()]);
    super::hostile_tests::drain(&ok, &Limits::default(), expect()).unwrap();
    let cases = [
        (
            vec![caps(cmd::CAP_POSTCOPY_RAM), advise(), preempt(&TOKEN)],
            "without postcopy-preempt",
        ),
        (vec![preempt(&TOKEN)], "without postcopy-preempt"),
        (
            vec![caps(pc), advise(), preempt(&TOKEN), preempt(&TOKEN)],
            "a second preempt channel",
        ),
        (
            vec![caps(pc), advise(), switchover_start(), preempt(&TOKEN)],
            "after SWITCHOVER_START",
        ),
    ];
    for (recs, what) in cases {
        let e = err_of(&raw(&recs));
        assert!(e.to_string().contains(what), "{what}: {e}");
    }
    // The capability bit alone, in a version-5 stream, or without postcopy-ram.
    let e = err_of(&raw_v(5, &[caps(pc)]));
    assert!(e.to_string().contains("reserved bits set: 0x20"), "{e}");
    let e = err_of(&raw(&[caps(cmd::CAP_POSTCOPY_PREEMPT)]));
    assert!(e.to_string().contains("without postcopy-ram"), "{e}");
    // Command 0x15 before version 6 is an unsupported post-copy command.
    let e = err_of(&raw_v(5, &[preempt(&TOKEN)]));
    assert!(
        matches!(e, WireError::UnsupportedCommand { cmd: 0x15, .. }),
        "{e}"
    );
    // A short token is a length error.
    let e = err_of(&raw(&[command(cmd::POSTCOPY_PREEMPT, &TOKEN[..8])]));
    assert!(matches!(e, WireError::ShortBody { .. }), "{e}");
}

#[test]
fn a_recovery_channel_announces_its_preempt_channel_before_resume() {
    let rp = command(cmd::OPEN_RETURN_PATH, &[]);
    let bitmap = |b: u16| {
        let mut p = b.to_le_bytes().to_vec();
        p.extend_from_slice(&0u16.to_le_bytes());
        command(cmd::RECV_BITMAP, &p)
    };
    let resume = command(cmd::POSTCOPY_RESUME, &[]);
    let drain = |recs: &[(u8, Vec<u8>)]| -> Result<usize, WireError> {
        let bytes = raw(recs);
        let mut r = StreamReader::recovery(&bytes[..], Limits::default(), expect())?;
        let mut n = 0;
        while !matches!(r.next_record()?, Record::End(_)) {
            n += 1;
        }
        Ok(n)
    };
    let ok = [
        rp.clone(),
        bitmap(0),
        bitmap(1),
        preempt(&TOKEN),
        resume.clone(),
        zero_page(0, 3),
    ];
    assert_eq!(drain(&ok).unwrap(), 6);
    let e = drain(&[preempt(&TOKEN), rp.clone()]).unwrap_err();
    assert!(e.to_string().contains("first OPEN_RETURN_PATH"), "{e}");
    let e = drain(&[rp.clone(), preempt(&TOKEN), preempt(&TOKEN)]).unwrap_err();
    assert!(e.to_string().contains("a second preempt channel"), "{e}");
    let e = drain(&[rp, bitmap(0), bitmap(1), resume, preempt(&TOKEN)]).unwrap_err();
    assert!(e.to_string().contains("other than PING"), "{e}");
}

#[test]
fn preempt_ack_round_trips_and_carries_nothing() {
    let bytes = RpMessage::PreemptAck.encode();
    assert_eq!(bytes, [9, 0, 0, 0]);
    let mut r = ReturnPathReader::with_config(&bytes[..], &sample_config(), &Limits::default());
    assert_eq!(r.read_message().unwrap(), Some(RpMessage::PreemptAck));
    assert_eq!(r.read_message().unwrap(), None);
    let hostile = [9u8, 0, 1, 0, 0];
    let mut r = ReturnPathReader::with_config(&hostile[..], &sample_config(), &Limits::default());
    assert!(matches!(
        r.read_message().unwrap_err(),
        WireError::LengthMismatch { .. }
    ));
}
