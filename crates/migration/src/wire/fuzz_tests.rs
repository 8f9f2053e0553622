//! Mutation fuzzing of the main stream (versions 3, 5, 6, 7 and 8: multifd, compression,
//! post-copy, early discard, multifd + post-copy, RAM_DIGEST), the post-copy recovery and
//! preempt channels, `analyze`, and the return path, in every `cargo test`
//! (`docs/stream-format.md` §11a; engine in `fuzz_support.rs`). Every seed is written by the
//! real writers; reproduce a run with `TERN_FUZZ_SEED=<printed seed>`, scale it with
//! `TERN_FUZZ_ITERS=<inputs per test>`.

use rand::rngs::StdRng;
use rand::Rng;

use super::fuzz_support::{
    fix_main, mutate_bytes, mutate_units, split_messages, split_records, Fuzz, MESSAGE_LEN,
    RECORD_LEN,
};
use super::hostile_tests::raw;
use super::tests::{page, sample_config, sample_stream, sample_stream_v, PS};
use super::*;
use crate::digest::{chunk_count, RamDigest};

const ID: [u8; 16] = [7; 16];
const TOKEN: [u8; 16] = *b"0123456789abcdef";

/// Which reader a stream is for.
#[derive(Clone, Copy, Debug)]
enum Mode {
    Main,
    Recovery,
    Preempt,
}

fn caps(postcopy_ram: bool, postcopy_preempt: bool, multifd: bool, ram_digest: bool) -> Command {
    Command::Capabilities {
        switchover_ack: false,
        validate_uuid: false,
        ram_digest,
        postcopy_ram,
        postcopy_preempt,
        multifd,
    }
}

fn writer(version: u32) -> StreamWriter<Vec<u8>> {
    StreamWriter::with_version(Vec::new(), &sample_config(), &Limits::default(), version)
        .expect("writer")
}

fn sections(w: &mut StreamWriter<Vec<u8>>) {
    w.write_section("vcpu", 0, 1, b"regs-0").expect("section");
    w.write_section("vcpu", 1, 1, b"regs-1").expect("section");
    w.write_section("serial", 0, 2, &[]).expect("section");
}

/// Multifd (version 6, or 7 with `compression`): the main stream of a pre-copy migration.
fn multifd_main(version: u32, compression: Compression) -> Vec<u8> {
    let mut w = writer(version);
    w.write_command(Command::OpenReturnPath).expect("rp");
    w.write_command(caps(false, false, true, false))
        .expect("caps");
    w.write_command(Command::MultifdChannels {
        channels: 2,
        compression,
        id: ID,
    })
    .expect("channels");
    w.write_command(Command::Ping { seq: 1 }).expect("ping");
    w.write_device_chunk("state-dev", 0, 1, b"initial")
        .expect("chunk");
    w.write_command(Command::IterationEnd { pass: 1 })
        .expect("sync");
    w.write_command(Command::SwitchoverStart).expect("switch");
    w.write_command(Command::RunState { running: true })
        .expect("run state");
    sections(&mut w);
    w.finish().expect("end")
}

/// Post-copy with the preempt channel and the early discard (version 7), switched.
fn postcopy_v7() -> Vec<u8> {
    let (a, b) = (page(1), page(2));
    let mut w = writer(VERSION_EARLY_DISCARD);
    w.write_command(Command::OpenReturnPath).expect("rp");
    w.write_command(caps(true, true, false, false))
        .expect("caps");
    w.write_command(Command::PostcopyAdvise {
        page_size: PS as u32,
    })
    .expect("advise");
    w.write_command(Command::Ping { seq: 1 }).expect("ping");
    w.write_ram_batch(&[RamPage::normal(0, 1, &a), RamPage::zero(1, 3)])
        .expect("ram");
    w.write_command(Command::IterationEnd { pass: 1 })
        .expect("sync");
    w.write_command(Command::PostcopyPreempt { token: TOKEN })
        .expect("preempt");
    w.write_ram_discard(0, &[(1, 1), (5, 3)])
        .expect("early discard");
    w.write_command(Command::Ping { seq: 2 }).expect("ping");
    w.write_command(Command::SwitchoverStart).expect("switch");
    w.write_command(Command::RunState { running: true })
        .expect("run state");
    w.write_ram_discard(1, &[(3, 1)]).expect("discard");
    w.write_command(Command::PostcopyListen).expect("listen");
    sections(&mut w);
    w.write_postcopy_run().expect("run");
    w.write_ram_batch(&[RamPage::normal(0, 1, &b)])
        .expect("ram");
    w.write_command(Command::Ping { seq: 3 }).expect("ping");
    w.write_ram_batch(&[RamPage::zero(1, 3), RamPage::normal(0, 6, &a)])
        .expect("ram");
    w.finish().expect("end")
}

/// Multifd together with post-copy (version 8): MULTIFD_END, then the switch.
fn multifd_postcopy_v8() -> Vec<u8> {
    let p = page(9);
    let mut w = writer(VERSION_MULTIFD_POSTCOPY);
    w.write_command(Command::OpenReturnPath).expect("rp");
    w.write_command(caps(true, false, true, false))
        .expect("caps");
    w.write_command(Command::MultifdChannels {
        channels: 2,
        compression: Compression::Zlib,
        id: ID,
    })
    .expect("channels");
    w.write_command(Command::PostcopyAdvise {
        page_size: PS as u32,
    })
    .expect("advise");
    w.write_command(Command::Ping { seq: 1 }).expect("ping");
    w.write_command(Command::MultifdEnd).expect("multifd end");
    w.write_command(Command::IterationEnd { pass: 2 })
        .expect("sync");
    w.write_ram_discard(0, &[(1, 2)]).expect("early discard");
    w.write_command(Command::SwitchoverStart).expect("switch");
    w.write_command(Command::RunState { running: true })
        .expect("run state");
    w.write_ram_discard(0, &[(1, 2)]).expect("discard");
    w.write_command(Command::PostcopyListen).expect("listen");
    sections(&mut w);
    w.write_postcopy_run().expect("run");
    w.write_ram_batch(&[RamPage::normal(0, 1, &p), RamPage::zero(0, 2)])
        .expect("post-copy page on the main stream");
    w.finish().expect("end")
}

/// Version 5 with `x-tern-ram-digest`: RAM, the switch, sections, RAM_DIGEST.
fn digest_v5() -> Vec<u8> {
    let cfg = sample_config();
    let p = page(4);
    let mut w = writer(VERSION_BATCH_INTEGRITY);
    w.write_command(caps(false, false, false, true))
        .expect("caps");
    w.write_ram_batch(&[RamPage::normal(1, 2, &p)])
        .expect("ram");
    w.write_command(Command::SwitchoverStart).expect("switch");
    sections(&mut w);
    let shift = 14;
    let digest = RamDigest {
        chunk_shift: shift,
        blocks: cfg
            .ram_blocks
            .iter()
            .map(|b| (0..chunk_count(b.size, shift)).collect())
            .collect(),
    };
    w.write_ram_digest(&digest).expect("digest");
    w.finish().expect("end")
}

/// A recovery channel (version 7): the handshake, pages, a ping.
fn recovery_v7() -> Vec<u8> {
    let p = page(5);
    let mut w = writer(VERSION_EARLY_DISCARD);
    w.write_command(Command::OpenReturnPath).expect("rp");
    w.write_command(Command::Ping { seq: 7 }).expect("ping");
    w.write_command(Command::RecvBitmap { block: 0 })
        .expect("bitmap");
    w.write_command(Command::RecvBitmap { block: 1 })
        .expect("bitmap");
    w.write_command(Command::PostcopyResume).expect("resume");
    w.write_ram_batch(&[RamPage::normal(0, 5, &p), RamPage::zero(1, 15)])
        .expect("ram");
    w.write_command(Command::Ping { seq: 8 }).expect("ping");
    w.write_ram_batch(&[RamPage::zero(0, 6)]).expect("ram");
    w.finish().expect("end")
}

/// A preempt channel (version 7): its identification, requested pages.
fn preempt_v7() -> Vec<u8> {
    let p = page(6);
    let mut w = writer(VERSION_EARLY_DISCARD);
    w.write_command(Command::PostcopyPreempt { token: TOKEN })
        .expect("preempt");
    w.write_ram_batch(&[RamPage::normal(0, 5, &p), RamPage::zero(1, 2)])
        .expect("ram");
    w.write_ram_batch(&[RamPage::normal(1, 15, &p)])
        .expect("ram");
    w.finish().expect("end")
}

/// Every seed: a valid stream of each kind, and the reader it is for.
fn seeds() -> Vec<(Mode, Vec<u8>)> {
    let p = page(3);
    vec![
        (Mode::Main, sample_stream()),
        (Mode::Main, sample_stream_v(VERSION_POSTCOPY)),
        (Mode::Main, {
            let mut w = StreamWriter::new(Vec::new(), &sample_config()).expect("writer");
            w.write_ram_batch(&[RamPage::zero(1, 2), RamPage::normal(0, 63, &p)])
                .expect("ram");
            w.finish().expect("end")
        }),
        (Mode::Main, multifd_main(VERSION_MULTIFD, Compression::None)),
        (
            Mode::Main,
            multifd_main(VERSION_COMPRESSION, Compression::Zstd),
        ),
        (Mode::Main, postcopy_v7()),
        (Mode::Main, multifd_postcopy_v8()),
        (Mode::Main, digest_v5()),
        (Mode::Main, {
            let chunk = |id: &str, data: &[u8]| {
                let mut b = vec![id.len() as u8];
                b.extend_from_slice(id.as_bytes());
                b.extend_from_slice(&0u32.to_le_bytes());
                b.extend_from_slice(&1u32.to_le_bytes());
                b.extend_from_slice(data);
                b
            };
            raw(&[
                (
                    RecordKind::DeviceChunk as u8,
                    chunk("state-dev", b"pre-copy"),
                ),
                (
                    RecordKind::Command as u8,
                    format::cmd::SWITCHOVER_START.to_le_bytes().to_vec(),
                ),
                (RecordKind::Section as u8, chunk("vcpu", b"regs")),
            ])
        }),
        (Mode::Recovery, recovery_v7()),
        (Mode::Preempt, preempt_v7()),
    ]
}

const MAX_PS: u64 = 2 << 20;

/// Reads a stream with the reader of `mode` to its END, checking every record handed out
/// (pages inside the CONFIG's RAM, a page's data exactly one page) and that the record buffer
/// never outgrows the limits. Every record accepted is written again by a `StreamWriter` of
/// the same version: a stream accepted to its END must be exactly the bytes the writer
/// produces for the records read (a reader that accepts a byte the writer would never write
/// misreads it). Returns the number of records before END.
fn drain(
    bytes: &[u8],
    mode: Mode,
    limits: &Limits,
    expect: Expectations,
) -> Result<usize, WireError> {
    let bound = 2 * u64::from(limits.max_section_size)
        .max(u64::from(limits.max_config_size))
        .max(limits.max_ram_body(MAX_PS as u32).unwrap_or(0))
        .max(u64::from(limits.max_digest_size)) as usize
        + 64;
    let mut r = match mode {
        Mode::Main => StreamReader::new(bytes, limits.clone(), expect),
        Mode::Recovery => StreamReader::recovery(bytes, limits.clone(), expect),
        Mode::Preempt => StreamReader::preempt(bytes, limits.clone(), expect),
    }?;
    let cfg = r.config().clone();
    let version = r.header().version;
    let mut w = StreamWriter::with_version(Vec::new(), &cfg, limits, version)
        .unwrap_or_else(|e| panic!("the CONFIG read cannot be written: {e}"));
    let blocks: Vec<u64> = cfg
        .ram_blocks
        .iter()
        .map(|b| b.pages(cfg.page_size))
        .collect();
    let mut n = 0;
    loop {
        let res = r.next_record().map(|rec| {
            let name = rec.name();
            let written = match &rec {
                Record::End(_) => return true,
                Record::Ram(batch) => {
                    for p in batch.pages() {
                        let pages = blocks.get(usize::from(p.block)).copied().unwrap_or(0);
                        assert!(u64::from(p.page) < pages, "page {p:?} outside the CONFIG");
                        if let PageData::Normal(d) = p.data {
                            assert_eq!(d.len(), cfg.page_size as usize, "a page's data");
                        }
                    }
                    let pages: Vec<RamPage<'_>> = batch.pages().collect();
                    w.write_ram_batch(&pages)
                }
                Record::RamDiscard(d) => {
                    let pages = blocks.get(usize::from(d.block)).copied().unwrap_or(0);
                    for (first, count) in &d.ranges {
                        assert!(u64::from(*first) + u64::from(*count) <= pages, "{d:?}");
                    }
                    w.write_ram_discard(d.block, &d.ranges)
                }
                Record::Command(Command::PostcopyRun { .. }) => w.write_postcopy_run(),
                Record::Command(c) => w.write_command(*c),
                Record::Section(c) => w.write_section(c.id, c.instance, c.version, c.data),
                Record::DeviceChunk(c) => w.write_device_chunk(c.id, c.instance, c.version, c.data),
                Record::RamDigest(d) => w.write_ram_digest(d),
            };
            if let Err(e) = written {
                panic!("accepted {name} record {n} cannot be written again: {e}");
            }
            false
        });
        assert!(
            r.buffer_capacity() <= bound,
            "buffer grew to {} (> {bound})",
            r.buffer_capacity()
        );
        if res? {
            let end = r.position() as usize;
            assert!(end <= bytes.len());
            let again = w.finish().unwrap_or_else(|e| panic!("END: {e}"));
            if again != bytes[..end] {
                let at = again.iter().zip(bytes).take_while(|(a, b)| a == b).count();
                panic!(
                    "accepted a stream of {end} bytes that the writer writes differently \
                     ({} bytes), from byte {at}",
                    again.len()
                );
            }
            return Ok(n);
        }
        n += 1;
    }
}

/// A mutated main / recovery / preempt stream: structure-aware (records dropped, repeated,
/// swapped, taken from another seed, bodies and lengths changed, then CRCs, RUN, END and
/// batch numbers re-fixed) or byte-level (then re-fixed half the time).
fn mutate_stream(rng: &mut StdRng, seed: &[u8], donor: &[u8]) -> Vec<u8> {
    if rng.random_bool(0.6) {
        let mut u = split_records(seed, HEADER_LEN as usize);
        let d = split_records(donor, HEADER_LEN as usize);
        for _ in 0..rng.random_range(1..=3) {
            mutate_units(rng, &mut u, &d, RECORD_LEN);
        }
        let mut b = u.join();
        if rng.random_bool(0.9) {
            fix_main(&mut b, rng.random_bool(0.5));
        }
        b
    } else {
        let mut b = seed.to_vec();
        mutate_bytes(rng, &mut b, donor);
        if rng.random_bool(0.5) {
            fix_main(&mut b, false);
        }
        b
    }
}

fn small_limits() -> Limits {
    Limits {
        max_section_size: 1 << 20,
        max_config_size: 64 << 10,
        max_pages_per_batch: 64,
        max_discard_ranges: 4,
        max_sections: 8,
        max_section_bytes_total: 4096,
        max_error_len: 64,
        ..Limits::default()
    }
}

#[test]
fn fuzz_seeds_are_valid_streams() {
    let expect = || Expectations::from_config(&sample_config(), true);
    for (i, (mode, s)) in seeds().iter().enumerate() {
        drain(s, *mode, &Limits::default(), expect())
            .unwrap_or_else(|e| panic!("seed {i} ({mode:?}): {e}"));
        drain(s, *mode, &small_limits(), expect())
            .unwrap_or_else(|e| panic!("seed {i} ({mode:?}), small limits: {e}"));
        // And the re-fixing changes nothing in a valid stream.
        let mut fixed = s.clone();
        fix_main(&mut fixed, true);
        assert_eq!(&fixed, s, "seed {i}");
    }
}

/// Mutated main streams of every version and kind, recovery and preempt channels: never a
/// panic, never a buffer beyond the limits, never a slow input; most mutations refused; the
/// structure-aware ones reach the checks behind the CRCs (order rules, page ranges, batch
/// numbering, lengths).
#[test]
fn fuzz_main_recovery_and_preempt_streams() {
    let mut fz = Fuzz::start("fuzz_main_recovery_and_preempt_streams", 60_000);
    let seeds = seeds();
    // The destination's machine and, every other time, its components' versions.
    let expect_cfg = Expectations::from_config(&sample_config(), true);
    let mut expect_components = expect_cfg.clone();
    expect_components.components = Some(
        [("vcpu", 2), ("serial", 2), ("state-dev", 3)]
            .iter()
            .map(|(id, max)| ComponentVersion {
                id: (*id).into(),
                min_version: 1,
                max_version: *max,
            })
            .collect(),
    );
    for i in 0..fz.iters {
        let (mode, s) = &seeds[i % seeds.len()];
        let donor = &seeds[fz.rng.random_range(0..seeds.len())].1;
        let b = mutate_stream(&mut fz.rng, s, donor);
        let limits = if i % 2 == 0 {
            Limits::default()
        } else {
            small_limits()
        };
        let expect = if i % 6 == 0 {
            expect_cfg.clone()
        } else if i % 6 == 3 {
            expect_components.clone()
        } else {
            Expectations::default()
        };
        let _ = fz.case(i, &b, |b| drain(b, *mode, &limits, expect));
        if i % 8 == 0 {
            fz.guard(i, &b, |b| {
                let _ = analyze(b, &limits);
            });
        }
    }
    fz.report(&[
        "ok",
        "Truncated",
        "TooLarge",
        "LengthMismatch",
        "OutOfOrder",
        "Invalid",
        "PageOutOfRange",
        "BatchOutOfOrder",
        "BatchChecksumMismatch",
        "ChecksumMismatch",
        "UnknownRecordKind",
        "UnknownCommand",
        "ShortBody",
        "ConfigMismatch",
        "UnknownComponent",
        "DuplicateSection",
    ]);
    assert!(fz.rejected() > fz.iters / 2, "{:?}", fz.outcomes);
}

/// The return-path messages a destination sends, every type.
fn rp_seed() -> Vec<u8> {
    let msgs = [
        RpMessage::Pong { seq: 1 },
        RpMessage::SwitchoverAck,
        RpMessage::ReqPages {
            block: 0,
            first_page: 3,
            count: 2,
        },
        RpMessage::RecvBitmap {
            block: 0,
            first_page: 0,
            bits: vec![0xff; 8],
        },
        RpMessage::RecvBitmap {
            block: 1,
            first_page: 8,
            bits: vec![0x0f],
        },
        RpMessage::ResumeAck,
        RpMessage::PreemptAck,
        RpMessage::Resumed,
        RpMessage::Error {
            message: "the destination's error".into(),
        },
        RpMessage::Shut { error: true },
    ];
    msgs.iter().flat_map(RpMessage::encode).collect()
}

/// Reads return-path messages to a clean close. Every message handed out must be exactly the
/// bytes it was read from (re-encoded), inside its bounds and, with the CONFIG known, inside
/// its RAM: a decoder that reads a length it should refuse (a RECV_BITMAP of 5000 bytes read
/// as an empty bitmap, commit 37276de) fails here.
fn drain_rp(bytes: &[u8], with_config: bool, limits: &Limits) -> Result<usize, WireError> {
    let cfg = sample_config();
    let mut rp = if with_config {
        ReturnPathReader::with_config(bytes, &cfg, limits)
    } else {
        ReturnPathReader::new(bytes)
    };
    let mut n = 0;
    loop {
        let before = rp.position() as usize;
        let Some(msg) = rp.read_message()? else {
            assert_eq!(
                rp.position() as usize,
                bytes.len(),
                "clean close before the end"
            );
            return Ok(n);
        };
        let after = rp.position() as usize;
        let read = bytes.get(before..after);
        assert!(
            read.is_some(),
            "{msg:?}: position {after} past the {} bytes",
            bytes.len()
        );
        assert_eq!(
            Some(&msg.encode()[..]),
            read,
            "{msg:?} is not the {} bytes it was read from",
            after.saturating_sub(before)
        );
        match &msg {
            RpMessage::RecvBitmap {
                block,
                first_page,
                bits,
            } => {
                assert!((1..=RP_MAX_BITMAP_BYTES).contains(&bits.len()), "{msg:?}");
                assert_eq!(first_page % 8, 0);
                if with_config {
                    let pages = cfg.ram_blocks[usize::from(*block)].pages(cfg.page_size);
                    let last = u64::from(*first_page) + 8 * (bits.len() as u64 - 1);
                    assert!(last < pages, "{msg:?}");
                }
            }
            RpMessage::ReqPages {
                block,
                first_page,
                count,
            } => {
                assert!((1..=RP_MAX_REQ_PAGES).contains(count), "{msg:?}");
                if with_config {
                    let pages = cfg.ram_blocks[usize::from(*block)].pages(cfg.page_size);
                    assert!(
                        u64::from(*first_page) + u64::from(*count) <= pages,
                        "{msg:?}"
                    );
                }
            }
            RpMessage::Error { message } => {
                // `ReturnPathReader::new` has the default limit.
                let max = if with_config {
                    limits.max_error_len
                } else {
                    RP_MAX_LEN
                };
                assert!(!message.is_empty() && message.len() <= max, "{msg:?}");
            }
            _ => {}
        }
        n += 1;
    }
}

/// Mutated return paths (structure-aware: messages dropped, repeated, lengths set to the
/// edges of RP_MAX_LEN with a payload of that length behind them): never a panic, and every
/// message accepted is exactly its bytes (the decode → encode round trip).
#[test]
fn fuzz_return_path() {
    let mut fz = Fuzz::start("fuzz_return_path", 60_000);
    let seed = rp_seed();
    let seed_units = split_messages(&seed);
    assert_eq!(drain_rp(&seed, true, &Limits::default()).expect("seed"), 10);
    let mut long_bitmaps = 0;
    for i in 0..fz.iters {
        let b = if fz.rng.random_bool(0.6) {
            let mut u = split_messages(&seed);
            for _ in 0..fz.rng.random_range(1..=3) {
                mutate_units(&mut fz.rng, &mut u, &seed_units, MESSAGE_LEN);
            }
            // A RECV_BITMAP longer than a message may be, with all of its bytes behind it.
            long_bitmaps += u
                .units
                .iter()
                .filter(|m| {
                    m.len() > 4 + RP_MAX_LEN && m[..2] == rp_type::RECV_BITMAP.to_le_bytes()
                })
                .count();
            u.join()
        } else {
            let mut b = seed.clone();
            mutate_bytes(&mut fz.rng, &mut b, &seed);
            b
        };
        let limits = if i % 2 == 0 {
            Limits::default()
        } else {
            small_limits()
        };
        let _ = fz.case(i, &b, |b| drain_rp(b, i % 3 != 0, &limits));
    }
    fz.report(&[
        "ok",
        "Truncated",
        "TooLarge",
        "LengthMismatch",
        "Invalid",
        "PageOutOfRange",
        "UnknownMessage",
    ]);
    eprintln!("fuzz_return_path: {long_bitmaps} RECV_BITMAP(s) of more than {RP_MAX_LEN} bytes");
    assert!(
        long_bitmaps > 0 || fz.iters < 5000,
        "no RECV_BITMAP above the limit"
    );
    assert!(fz.rejected() > fz.iters / 2, "{:?}", fz.outcomes);
}
