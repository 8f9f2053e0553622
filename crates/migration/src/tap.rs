//! [`EndTracker`]: follows the record framing of a migration stream seen in pieces (a test
//! proxy between source and destination) and says where `SWITCHOVER_START` and the END record
//! end, so a fault injector can cut the stream exactly K bytes before its end, or act right
//! after END passed, or find the N-th RAM record to corrupt a byte of it. It only reads the
//! 16-byte header, the 5-byte frames and the command numbers (`docs/stream-format.md` §1, §2,
//! §6); other bodies are skipped unread.

use crate::wire::{cmd, RecordKind, HEADER_LEN};

/// Bytes of a record frame: `u8 kind` + `u32 len`.
const FRAME: usize = 5;

/// Where a stream passing by stands.
#[derive(Debug, Clone, Default)]
pub struct EndTracker {
    pos: u64,
    frame: [u8; FRAME],
    frame_got: usize,
    body_left: u64,
    /// First two body bytes of a COMMAND record (its number).
    command: Vec<u8>,
    switchover: Option<u64>,
    /// The stream offset just past the latest `PING` command.
    last_ping: Option<u64>,
    end: Option<u64>,
    /// RAM records whose frame was seen.
    ram_records: u64,
    /// The RAM record to locate (0 = the first) and, once its frame was seen, its body's
    /// stream offset and length.
    watched_ram: Option<(u64, Option<(u64, u64)>)>,
}

impl EndTracker {
    /// At the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// At the start of a stream, locating the `n`-th RAM record (0 = the first): see
    /// [`EndTracker::watched_ram_record`].
    pub fn watching_ram_record(n: u64) -> Self {
        Self {
            watched_ram: Some((n, None)),
            ..Self::default()
        }
    }

    /// The stream offset and length of the watched RAM record's body, once its frame was seen
    /// (its body may not have passed yet).
    pub fn watched_ram_record(&self) -> Option<(u64, u64)> {
        self.watched_ram.and_then(|(_, found)| found)
    }

    /// Bytes of the stream seen so far (not counting anything after END).
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The stream offset just past END, once END is complete.
    pub fn end(&self) -> Option<u64> {
        self.end
    }

    /// The stream offset just past the `SWITCHOVER_START` command, once seen: from there on
    /// the stream carries only the final state (the source's vCPUs are stopped; no `PING`
    /// waits for an answer any more).
    pub fn switchover(&self) -> Option<u64> {
        self.switchover
    }

    /// The stream offset just past the latest complete `PING` command, once one was seen.
    pub fn last_ping(&self) -> Option<u64> {
        self.last_ping
    }

    /// Follows the next `bytes` of the stream; returns [`EndTracker::end`]. Bytes after END
    /// are not part of the stream and are ignored.
    pub fn feed(&mut self, bytes: &[u8]) -> Option<u64> {
        let mut i = 0usize;
        while i < bytes.len() && self.end.is_none() {
            let rest = bytes.len() - i;
            if self.pos < HEADER_LEN {
                let n = rest.min((HEADER_LEN - self.pos) as usize);
                i += n;
                self.pos += n as u64;
                continue;
            }
            if self.frame_got < FRAME {
                self.frame[self.frame_got] = bytes[i];
                self.frame_got += 1;
                i += 1;
                self.pos += 1;
                if self.frame_got == FRAME {
                    let len = [self.frame[1], self.frame[2], self.frame[3], self.frame[4]];
                    self.body_left = u64::from(u32::from_le_bytes(len));
                    if self.frame[0] == RecordKind::Ram as u8 {
                        if let Some((n, found @ None)) = &mut self.watched_ram {
                            if *n == self.ram_records {
                                *found = Some((self.pos, self.body_left));
                            }
                        }
                        self.ram_records += 1;
                    }
                    self.record_done_if_empty();
                }
                continue;
            }
            let n = rest.min(usize::try_from(self.body_left).unwrap_or(usize::MAX));
            if self.frame[0] == RecordKind::Command as u8 && self.command.len() < 2 {
                let take = n.min(2 - self.command.len());
                self.command.extend_from_slice(&bytes[i..i + take]);
            }
            i += n;
            self.pos += n as u64;
            self.body_left -= n as u64;
            self.record_done_if_empty();
        }
        self.end
    }

    fn record_done_if_empty(&mut self) {
        if self.frame_got == FRAME && self.body_left == 0 {
            if self.frame[0] == RecordKind::End as u8 {
                self.end = Some(self.pos);
            }
            if self.frame[0] == RecordKind::Command as u8
                && self.command == cmd::SWITCHOVER_START.to_le_bytes()
            {
                self.switchover.get_or_insert(self.pos);
            }
            if self.frame[0] == RecordKind::Command as u8 && self.command == cmd::PING.to_le_bytes()
            {
                self.last_ping = Some(self.pos);
            }
            self.command.clear();
            self.frame_got = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![kind];
        v.extend((body.len() as u32).to_le_bytes());
        v.extend(body);
        v
    }

    #[test]
    fn finds_the_end_whatever_the_pieces() {
        let mut s = vec![0u8; 16];
        s.extend(record(0x01, &[1; 40]));
        s.extend(record(0x05, &[3, 0, 1, 0, 0, 0]));
        s.extend(record(0x04, &[9; 5000]));
        s.extend(record(0x05, &[3, 0, 9, 0, 0, 0]));
        let ping = s.len() as u64;
        s.extend(record(0x05, &[4, 0]));
        let switchover = s.len() as u64;
        s.extend(record(0x02, &[7; 3000]));
        s.extend(record(0x06, &[0; 12]));
        let end = s.len() as u64;
        s.extend([0xee; 10]); // not part of the stream
        for piece in [1, 2, 5, 7, 16, 17, 4096, s.len()] {
            let mut t = EndTracker::new();
            let mut found = None;
            let mut fed = 0u64;
            for c in s.chunks(piece) {
                found = t.feed(c);
                fed += c.len() as u64;
                assert_eq!(
                    found.is_some(),
                    fed >= end,
                    "piece {piece}, {fed} bytes fed"
                );
            }
            assert_eq!(found, Some(end), "piece {piece}");
            assert_eq!(t.position(), end);
            assert_eq!(t.switchover(), Some(switchover), "piece {piece}");
            assert_eq!(t.last_ping(), Some(ping), "piece {piece}");
        }
    }

    #[test]
    fn locates_the_nth_ram_record() {
        let mut s = vec![0u8; 16];
        s.extend(record(0x01, &[1; 40]));
        let first = s.len() as u64 + 5;
        s.extend(record(0x04, &[9; 100]));
        s.extend(record(0x05, &[1, 0, 1, 0, 0, 0, 0, 0, 0, 0]));
        let second = s.len() as u64 + 5;
        s.extend(record(0x04, &[8; 300]));
        s.extend(record(0x06, &[0; 12]));
        for (n, want) in [(0, Some((first, 100))), (1, Some((second, 300))), (2, None)] {
            for piece in [1, 3, 64, s.len()] {
                let mut t = EndTracker::watching_ram_record(n);
                for c in s.chunks(piece) {
                    t.feed(c);
                }
                assert_eq!(t.watched_ram_record(), want, "record {n}, piece {piece}");
            }
        }
    }
}
