//! The order rules multifd adds to the main stream (`docs/stream-format.md` §5.2, and §5.4
//! with post-copy); split out of `channel.rs`, which reads and writes the channels themselves.

use super::error::WireError;
use super::format::RecordKind;
use super::record::Command;

/// The order rules multifd adds to the main stream (§5.2): `MULTIFD_CHANNELS` right after
/// `CAPABILITIES` bit 6 and only then, and no RAM on the main stream of a multifd migration.
#[derive(Debug, Default)]
pub(crate) struct MultifdOrder {
    /// `CAPABILITIES` had bit 6.
    on: bool,
    /// `MULTIFD_CHANNELS` must be the next record.
    pending: bool,
    /// `MULTIFD_CHANNELS` came.
    announced: bool,
    /// `CAPABILITIES` had bit 4 too (version 8, §5.4): `MULTIFD_END` must come before any
    /// `RAM_DISCARD` or `POSTCOPY_LISTEN`.
    postcopy: bool,
    /// `MULTIFD_END` came: the channels are over; post-copy's RAM goes on the main stream.
    ended: bool,
}

const END_FIRST: &str =
    "the multifd channels must end (MULTIFD_END) before the destination drops pages or listens";

impl MultifdOrder {
    /// A record other than a COMMAND: nothing may come between bit 6 and `MULTIFD_CHANNELS`;
    /// RAM never on the main stream of a multifd migration.
    pub(crate) fn check_frame(&self, kind: RecordKind, frame_at: u64) -> Result<(), WireError> {
        if self.pending {
            return Err(WireError::OutOfOrder {
                record: kind.name(),
                offset: frame_at,
                reason: "CAPABILITIES announced multifd: MULTIFD_CHANNELS must follow it at once"
                    .into(),
            });
        }
        if self.postcopy && !self.ended && kind == RecordKind::RamDiscard {
            return Err(WireError::OutOfOrder {
                record: kind.name(),
                offset: frame_at,
                reason: END_FIRST.into(),
            });
        }
        if self.on && !self.ended && kind == RecordKind::Ram {
            return Err(WireError::Invalid {
                field: "ram",
                offset: frame_at,
                reason: "a RAM batch on the main stream of a multifd migration (pages go on \
                         the multifd channels)"
                    .into(),
            });
        }
        Ok(())
    }

    /// A COMMAND.
    pub(crate) fn check_command(
        &mut self,
        command: &Command,
        frame_at: u64,
    ) -> Result<(), WireError> {
        let is_channels = matches!(command, Command::MultifdChannels { .. });
        if self.pending {
            if !is_channels {
                return Err(WireError::OutOfOrder {
                    record: "command",
                    offset: frame_at,
                    reason: format!(
                        "{} after CAPABILITIES with multifd: MULTIFD_CHANNELS must follow it at \
                         once",
                        command.name()
                    ),
                });
            }
            self.pending = false;
            self.announced = true;
            return Ok(());
        }
        if is_channels {
            let why = if self.announced {
                "a second MULTIFD_CHANNELS"
            } else {
                "MULTIFD_CHANNELS without CAPABILITIES bit 6 (multifd) right before it"
            };
            return Err(WireError::OutOfOrder {
                record: "command",
                offset: frame_at,
                reason: why.into(),
            });
        }
        let out_of_order = |reason: &str| WireError::OutOfOrder {
            record: "command",
            offset: frame_at,
            reason: reason.into(),
        };
        match command {
            Command::Capabilities {
                multifd: true,
                postcopy_ram,
                ..
            } => {
                self.on = true;
                self.pending = true;
                self.postcopy = *postcopy_ram;
            }
            Command::MultifdEnd if !self.postcopy || !self.announced => {
                return Err(out_of_order(
                    "MULTIFD_END without multifd and postcopy-ram negotiated (CAPABILITIES bits 6 and 4)",
                ))
            }
            Command::MultifdEnd if self.ended => return Err(out_of_order("a second MULTIFD_END")),
            Command::MultifdEnd => self.ended = true,
            Command::PostcopyListen if self.postcopy && !self.ended => {
                return Err(out_of_order(END_FIRST))
            }
            _ => {}
        }
        Ok(())
    }
}
