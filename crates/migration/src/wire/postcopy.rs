//! The post-copy records' order rules and the RAM_DISCARD decoder (`docs/stream-format.md`
//! §13, version 3). Kept apart from the reader so that each rule is in one place.

use super::error::WireError;
use super::format::{Cursor, RecordKind};
use super::record::{Command, RamDiscard};

/// What the post-copy order rules of §13.1 need to remember.
#[derive(Debug, Default)]
pub(crate) struct PostcopyOrder {
    /// `CAPABILITIES` had `postcopy-ram`: the next record must be `POSTCOPY_ADVISE`.
    advise_pending: bool,
    /// `POSTCOPY_ADVISE` came.
    advised: bool,
    /// `RUN_STATE` came after `SWITCHOVER_START`.
    run_state_seen: bool,
    /// A RAM, SECTION, DEVICE_CHUNK or RAM_DIGEST came after `SWITCHOVER_START` before any
    /// `POSTCOPY_LISTEN`: the migration ends in pre-copy.
    precopy_tail: bool,
    /// `POSTCOPY_LISTEN` came: the device package is being read.
    listening: bool,
    /// `POSTCOPY_RUN` came: the destination runs; only RAM, `PING` and END may follow.
    running: bool,
    /// A recovery channel (§13.6): its handshake's progress.
    recovery: Option<RecoveryOrder>,
    /// `CAPABILITIES` had `postcopy-preempt` (§13.8).
    preempt_negotiated: bool,
    /// This channel announced its preempt channel (`POSTCOPY_PREEMPT`).
    preempt_announced: bool,
    /// This is a preempt channel (§13.8): `Some(identified)`, `identified` once its first
    /// record, `POSTCOPY_PREEMPT`, came.
    preempt_channel: Option<bool>,
    /// The stream's version allows the early discard (version 7, §13.3).
    early_discard_allowed: bool,
    /// An early RAM_DISCARD came: the migration must switch (no pre-copy tail, no END before
    /// `POSTCOPY_LISTEN`).
    early_discarded: bool,
}

const AFTER_EARLY: &str =
    "the migration ends in pre-copy after an early RAM_DISCARD (the destination dropped pages it held; it must switch to post-copy)";

/// The handshake of a recovery channel (§13.6).
#[derive(Debug, Default)]
struct RecoveryOrder {
    /// `OPEN_RETURN_PATH` came.
    rp_opened: bool,
    /// The block the next `RECV_BITMAP` must name.
    next_block: u32,
    /// The CONFIG's block count.
    blocks: u32,
    /// `POSTCOPY_RESUME` came: the rules after `POSTCOPY_RUN` hold.
    resumed: bool,
}

const PREEMPT_FIRST: &str = "a preempt channel starts with POSTCOPY_PREEMPT";
const PREEMPT_ONLY: &str = "only RAM and END follow POSTCOPY_PREEMPT on a preempt channel";

const RECOVERY_PREFIX: &str =
    "before POSTCOPY_RESUME a recovery channel carries only OPEN_RETURN_PATH, RECV_BITMAP and PING";

fn out_of_order(record: &'static str, offset: u64, reason: &str) -> WireError {
    WireError::OutOfOrder {
        record,
        offset,
        reason: reason.into(),
    }
}

impl PostcopyOrder {
    /// The order state of a first channel of stream `version`.
    pub(crate) fn first_channel(version: u32) -> Self {
        Self {
            early_discard_allowed: version >= super::format::VERSION_EARLY_DISCARD,
            ..Self::default()
        }
    }

    /// The order state of a recovery channel (§13.6) for a CONFIG with `blocks` RAM blocks.
    pub(crate) fn recovery(blocks: usize) -> Self {
        Self {
            advised: true,
            run_state_seen: true,
            recovery: Some(RecoveryOrder {
                blocks: u32::try_from(blocks).unwrap_or(u32::MAX),
                ..RecoveryOrder::default()
            }),
            ..Self::default()
        }
    }

    /// The order state of a preempt channel (§13.8): `POSTCOPY_PREEMPT`, then RAM and END.
    pub(crate) fn preempt() -> Self {
        Self {
            advised: true,
            run_state_seen: true,
            preempt_channel: Some(false),
            ..Self::default()
        }
    }

    /// The rules of a preempt channel; `Ok(true)` when this is one (the record was checked).
    fn check_preempt_channel(
        &mut self,
        record: &'static str,
        command: Option<&Command>,
        frame_at: u64,
    ) -> Result<bool, WireError> {
        let Some(identified) = self.preempt_channel.as_mut() else {
            return Ok(false);
        };
        match (*identified, command) {
            (false, Some(Command::PostcopyPreempt { .. })) => *identified = true,
            (false, _) => return Err(out_of_order(record, frame_at, PREEMPT_FIRST)),
            (true, Some(_)) => return Err(out_of_order(record, frame_at, PREEMPT_ONLY)),
            (true, None) if matches!(record, "ram" | "end") => {}
            (true, None) => return Err(out_of_order(record, frame_at, PREEMPT_ONLY)),
        }
        Ok(true)
    }

    /// `POSTCOPY_PREEMPT` on a main or recovery channel: at most once, and on a first
    /// channel only with `postcopy-preempt` negotiated and before `SWITCHOVER_START`.
    fn check_preempt_announce(
        &mut self,
        switchover_started: bool,
        frame_at: u64,
    ) -> Result<(), WireError> {
        let reason = if self.preempt_announced {
            "a second preempt channel (POSTCOPY_PREEMPT twice on one channel)"
        } else if self.recovery.is_some() {
            ""
        } else if !self.preempt_negotiated {
            "a preempt channel without postcopy-preempt (CAPABILITIES bit 5)"
        } else if switchover_started {
            "POSTCOPY_PREEMPT after SWITCHOVER_START (the preempt channel is opened before the switch)"
        } else {
            ""
        };
        if !reason.is_empty() {
            return Err(out_of_order("command", frame_at, reason));
        }
        self.preempt_announced = true;
        Ok(())
    }

    /// The handshake rules of a recovery channel; `Ok(true)` when they decided (the command
    /// is part of the handshake), `Ok(false)` when the ordinary rules apply.
    fn check_recovery(&mut self, command: &Command, frame_at: u64) -> Result<bool, WireError> {
        let Some(r) = self.recovery.as_mut().filter(|r| !r.resumed) else {
            if matches!(
                command,
                Command::RecvBitmap { .. } | Command::PostcopyResume
            ) && self.recovery.is_none()
            {
                return Err(out_of_order(
                    "command",
                    frame_at,
                    "RECV_BITMAP and POSTCOPY_RESUME are only for a post-copy recovery channel",
                ));
            }
            return Ok(false);
        };
        match *command {
            Command::Ping { .. } => {}
            Command::OpenReturnPath if !r.rp_opened => r.rp_opened = true,
            Command::PostcopyPreempt { .. } if r.rp_opened => {
                self.check_preempt_announce(true, frame_at)?;
            }
            Command::RecvBitmap { block } if r.rp_opened => {
                if u32::from(block) >= r.blocks {
                    return Err(WireError::Invalid {
                        field: "recv-bitmap block",
                        offset: frame_at + 7,
                        reason: format!("block {block}, the CONFIG has {}", r.blocks),
                    });
                }
                if u32::from(block) != r.next_block {
                    return Err(out_of_order(
                        "command",
                        frame_at,
                        &format!(
                            "RECV_BITMAP for block {block}, expected block {} (blocks in order, each once)",
                            r.next_block
                        ),
                    ));
                }
                r.next_block += 1;
            }
            Command::PostcopyResume if r.rp_opened && r.next_block == r.blocks => {
                r.resumed = true;
                self.listening = true;
                self.running = true;
            }
            Command::PostcopyResume => {
                return Err(out_of_order(
                    "command",
                    frame_at,
                    "POSTCOPY_RESUME before OPEN_RETURN_PATH and a RECV_BITMAP for every block",
                ))
            }
            _ => {
                return Err(out_of_order(
                    "command",
                    frame_at,
                    &format!("{RECOVERY_PREFIX}, first OPEN_RETURN_PATH"),
                ))
            }
        }
        Ok(true)
    }

    /// The rules a non-COMMAND record's frame decides, checked before its body is read.
    pub(crate) fn check_frame(
        &mut self,
        kind: RecordKind,
        switchover_started: bool,
        frame_at: u64,
    ) -> Result<(), WireError> {
        let name = kind.name();
        if self.check_preempt_channel(name, None, frame_at)? {
            return Ok(());
        }
        if self.recovery.as_ref().is_some_and(|r| !r.resumed) {
            return Err(out_of_order(name, frame_at, RECOVERY_PREFIX));
        }
        if self.advise_pending {
            return Err(out_of_order(
                name,
                frame_at,
                "CAPABILITIES with postcopy-ram must be followed by POSTCOPY_ADVISE",
            ));
        }
        match kind {
            RecordKind::RamDiscard if !switchover_started => self.check_early_discard(frame_at),
            RecordKind::RamDiscard => self.check_switch_point(name, switchover_started, frame_at),
            RecordKind::End if self.early_discarded && !self.listening => {
                Err(out_of_order(name, frame_at, AFTER_EARLY))
            }
            RecordKind::Ram if self.listening && !self.running => Err(out_of_order(
                name,
                frame_at,
                "RAM inside the post-copy device package (between POSTCOPY_LISTEN and POSTCOPY_RUN)",
            )),
            RecordKind::Section | RecordKind::DeviceChunk if self.running => Err(out_of_order(
                name,
                frame_at,
                "component state after POSTCOPY_RUN (the destination's devices are final)",
            )),
            RecordKind::RamDigest if self.listening => Err(out_of_order(
                name,
                frame_at,
                "a RAM_DIGEST in a post-copy migration",
            )),
            RecordKind::End if self.listening && !self.running => Err(out_of_order(
                name,
                frame_at,
                "END after POSTCOPY_LISTEN without POSTCOPY_RUN (the device package never completed)",
            )),
            _ => {
                if switchover_started && !self.listening {
                    if self.early_discarded {
                        return Err(out_of_order(name, frame_at, AFTER_EARLY));
                    }
                    self.precopy_tail = true;
                }
                Ok(())
            }
        }
    }

    /// RAM_DISCARD before `SWITCHOVER_START` (the early discard, version 7): only after ADVISE.
    fn check_early_discard(&mut self, frame_at: u64) -> Result<(), WireError> {
        let reason = if !self.advised {
            "a post-copy record without POSTCOPY_ADVISE (postcopy-ram was not negotiated)"
        } else if !self.early_discard_allowed {
            "a RAM_DISCARD before SWITCHOVER_START and RUN_STATE (an early discard needs stream version 7)"
        } else {
            self.early_discarded = true;
            return Ok(());
        };
        Err(out_of_order("ram-discard", frame_at, reason))
    }

    /// RAM_DISCARD and `POSTCOPY_LISTEN` belong between `RUN_STATE` and the first record of
    /// either tail.
    fn check_switch_point(
        &self,
        name: &'static str,
        switchover_started: bool,
        frame_at: u64,
    ) -> Result<(), WireError> {
        let reason = if !self.advised {
            "a post-copy record without POSTCOPY_ADVISE (postcopy-ram was not negotiated)"
        } else if !switchover_started || !self.run_state_seen {
            "a post-copy switch record before SWITCHOVER_START and RUN_STATE"
        } else if self.precopy_tail {
            "a post-copy switch record after the pre-copy tail began (RAM or state after SWITCHOVER_START)"
        } else if self.listening {
            "a post-copy switch record after POSTCOPY_LISTEN"
        } else {
            return Ok(());
        };
        Err(out_of_order(name, frame_at, reason))
    }

    /// The rules for a parsed COMMAND. `crc_before`/`bytes_before` are the stream's checksum
    /// and length up to this record's frame (checked by `POSTCOPY_RUN`).
    pub(crate) fn check_command(
        &mut self,
        command: &Command,
        switchover_started: bool,
        page_size: u32,
        crc_before: u32,
        bytes_before: u64,
        frame_at: u64,
    ) -> Result<(), WireError> {
        let body_at = frame_at + 5;
        if self.check_preempt_channel("command", Some(command), frame_at)? {
            return Ok(());
        }
        if self.check_recovery(command, frame_at)? {
            return Ok(());
        }
        // With multifd too (version 8, §5.4) `MULTIFD_CHANNELS` comes first (its own rule
        // keeps it right after CAPABILITIES), then ADVISE.
        if self.advise_pending
            && !matches!(
                command,
                Command::PostcopyAdvise { .. } | Command::MultifdChannels { .. }
            )
        {
            return Err(out_of_order(
                "command",
                frame_at,
                "CAPABILITIES with postcopy-ram must be followed by POSTCOPY_ADVISE",
            ));
        }
        if self.listening && !self.running {
            if !matches!(command, Command::Ping { .. } | Command::PostcopyRun { .. }) {
                return Err(out_of_order(
                    "command",
                    frame_at,
                    "only SECTION, DEVICE_CHUNK and PING may be inside the post-copy device package",
                ));
            }
        } else if self.running && !matches!(command, Command::Ping { .. }) {
            return Err(out_of_order(
                "command",
                frame_at,
                "a command other than PING after POSTCOPY_RUN",
            ));
        }
        match *command {
            Command::Capabilities {
                postcopy_ram,
                postcopy_preempt,
                ..
            } => {
                self.advise_pending = postcopy_ram;
                self.preempt_negotiated = postcopy_preempt;
            }
            Command::PostcopyPreempt { .. } => {
                self.check_preempt_announce(switchover_started, frame_at)?;
            }
            Command::PostcopyAdvise { page_size: p } => {
                if !self.advise_pending {
                    return Err(out_of_order(
                        "command",
                        frame_at,
                        "POSTCOPY_ADVISE without CAPABILITIES postcopy-ram right before it",
                    ));
                }
                if p != page_size {
                    return Err(WireError::Invalid {
                        field: "post-copy page size",
                        offset: body_at + 2,
                        reason: format!("{p}, but the CONFIG's page size is {page_size}"),
                    });
                }
                self.advise_pending = false;
                self.advised = true;
            }
            Command::RunState { .. } if switchover_started => self.run_state_seen = true,
            Command::PostcopyListen => {
                self.check_switch_point("command", switchover_started, frame_at)?;
                self.listening = true;
            }
            Command::PostcopyRun { crc32, total_bytes } => {
                if !self.listening || self.running {
                    return Err(out_of_order(
                        "command",
                        frame_at,
                        "POSTCOPY_RUN without POSTCOPY_LISTEN before it, or a second one",
                    ));
                }
                if total_bytes != bytes_before {
                    return Err(WireError::LengthMismatch {
                        what: "postcopy-run total_bytes",
                        offset: body_at + 6,
                        len: total_bytes,
                        expected: bytes_before,
                    });
                }
                if crc32 != crc_before {
                    return Err(WireError::ChecksumMismatch {
                        expected: crc32,
                        actual: crc_before,
                        bytes: bytes_before,
                        offset: frame_at,
                    });
                }
                self.running = true;
            }
            _ => {}
        }
        Ok(())
    }
}

/// Largest RAM_DISCARD body for `max_ranges`.
pub(crate) fn max_discard_body(max_ranges: u32) -> u64 {
    8 + 8 * u64::from(max_ranges)
}

/// Decodes and checks a RAM_DISCARD body (§13.3) against the CONFIG's blocks.
pub(crate) fn parse_discard(
    body: &[u8],
    body_at: u64,
    block_pages: &[u64],
    max_ranges: u32,
) -> Result<RamDiscard, WireError> {
    let mut c = Cursor::new(body, body_at, "ram-discard");
    let block_at = c.offset();
    let block = c.u16("discard block")?;
    let Some(&pages) = block_pages.get(usize::from(block)) else {
        return Err(WireError::Invalid {
            field: "discard block",
            offset: block_at,
            reason: format!("block {block}, the CONFIG has {}", block_pages.len()),
        });
    };
    let reserved_at = c.offset();
    if c.u16("discard reserved")? != 0 {
        return Err(WireError::Invalid {
            field: "discard reserved",
            offset: reserved_at,
            reason: "must be 0".into(),
        });
    }
    let count_at = c.offset();
    let count = c.u32("discard range count")?;
    if count == 0 || count > max_ranges {
        return Err(WireError::Invalid {
            field: "discard range count",
            offset: count_at,
            reason: format!("{count}, must be 1..={max_ranges}"),
        });
    }
    let expected = 8 + 8 * u64::from(count);
    if body.len() as u64 != expected {
        return Err(WireError::LengthMismatch {
            what: "ram-discard body",
            offset: body_at,
            len: body.len() as u64,
            expected,
        });
    }
    let mut ranges = Vec::with_capacity(count as usize);
    let mut end = 0u64;
    for i in 0..count {
        let at = c.offset();
        let first = c.u32("discard first page")?;
        let n = c.u32("discard pages")?;
        let stop = u64::from(first) + u64::from(n);
        let reason = if n == 0 {
            Some("an empty range".to_string())
        } else if u64::from(first) < end {
            Some(format!(
                "starts at page {first}, before the previous range's end {end}"
            ))
        } else if stop > pages {
            Some(format!("ends at page {stop}, the block has {pages}"))
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(WireError::Invalid {
                field: "discard range",
                offset: at,
                reason: format!("range {i}: {reason}"),
            });
        }
        end = stop;
        ranges.push((first, n));
    }
    c.finish()?;
    Ok(RamDiscard { block, ranges })
}
