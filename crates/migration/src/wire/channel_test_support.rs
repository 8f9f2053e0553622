//! Builders shared by the multifd channel tests (`channel_tests.rs`, `compress_tests.rs`,
//! `fuzz_channel_tests.rs`): a main stream that announces multifd, its MULTIFD_CHANNELS
//! command, the records of a channel found and rewritten the way a hostile writer would, and
//! incompressible noise.

use super::format::FRAME_LEN;
use super::*;

/// A main stream of `version` with CAPABILITIES (only `multifd`) and then `next`, ended.
pub(super) fn multifd_main_stream(
    cfg: &StreamConfig,
    version: u32,
    next: impl FnOnce(&mut StreamWriter<Vec<u8>>),
) -> Vec<u8> {
    let mut w =
        StreamWriter::with_version(Vec::new(), cfg, &Limits::default(), version).expect("writer");
    w.write_command(Command::Capabilities {
        switchover_ack: false,
        validate_uuid: false,
        ram_digest: false,
        postcopy_ram: false,
        postcopy_preempt: false,
        multifd: true,
    })
    .expect("caps");
    next(&mut w);
    w.finish().expect("end")
}

/// Writes MULTIFD_CHANNELS.
pub(super) fn write_multifd_channels(
    w: &mut StreamWriter<Vec<u8>>,
    channels: u16,
    compression: Compression,
    id: [u8; 16],
) {
    w.write_command(Command::MultifdChannels {
        channels,
        compression,
        id,
    })
    .expect("channels");
}

/// Offsets (after the handshake) and lengths of the records of a channel.
pub(super) fn channel_records(s: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < s.len() {
        let len = u32::from_le_bytes([s[at + 1], s[at + 2], s[at + 3], s[at + 4]]) as usize;
        out.push((at, FRAME_LEN + len));
        at += FRAME_LEN + len;
    }
    out
}

/// Record `i` of a channel with `edit` applied to its body, its length and CRC made
/// consistent (a hostile writer, not corruption in transit).
pub(super) fn rewrite_channel_record(
    s: &[u8],
    i: usize,
    edit: impl FnOnce(&mut Vec<u8>),
) -> Vec<u8> {
    let (at, len) = channel_records(s)[i];
    let mut body = s[at + FRAME_LEN..at + len - 4].to_vec();
    edit(&mut body);
    let mut rec = vec![RecordKind::Ram as u8];
    rec.extend_from_slice(&((body.len() + 4) as u32).to_le_bytes());
    rec.extend_from_slice(&body);
    let mut crc = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi);
    crc.update(&rec);
    rec.extend_from_slice(&(crc.finalize() as u32).to_le_bytes());
    let mut out = s[..at].to_vec();
    out.extend_from_slice(&rec);
    out.extend_from_slice(&s[at + len..]);
    out
}

/// Reads a main stream of [`tests::sample_config`](super::tests::sample_config) to END;
/// returns the names of its records (commands by their own name).
pub(super) fn read_main(bytes: &[u8]) -> Result<Vec<String>, WireError> {
    let cfg = super::tests::sample_config();
    let mut r = StreamReader::new(
        bytes,
        Limits::default(),
        Expectations::from_config(&cfg, false),
    )?;
    let mut out = Vec::new();
    loop {
        match r.next_record()? {
            Record::End(_) => return Ok(out),
            Record::Command(c) => out.push(c.name().to_owned()),
            other => out.push(other.name().to_owned()),
        }
    }
}

/// `len` bytes of xorshift64 noise from seed `x` (incompressible: a batch of it goes plain).
pub(super) fn noise(len: usize, mut x: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
