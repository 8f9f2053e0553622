//! The COMMAND record's decoder (§6, §13, §13.6); split out of `reader.rs`.

use super::compress::Compression;
use super::error::WireError;
use super::format::{
    cmd, Cursor, MAX_MULTIFD_CHANNELS, VERSION_COMPRESSION, VERSION_MULTIFD,
    VERSION_MULTIFD_POSTCOPY, VERSION_POSTCOPY, VERSION_PREEMPT, VERSION_RAM_DIGEST,
    VERSION_RECOVERY,
};
use super::record::Command;

/// Decodes a COMMAND body for a stream of `version` (a command newer than the version is
/// refused as the reader of that version would).
pub(crate) fn parse_command(body: &[u8], body_at: u64, version: u32) -> Result<Command, WireError> {
    let mut c = Cursor::new(body, body_at, "command");
    let n = c.u16("command")?;
    let command = match n {
        cmd::ITERATION_END => Command::IterationEnd {
            pass: c.u64("pass")?,
        },
        cmd::OPEN_RETURN_PATH => Command::OpenReturnPath,
        cmd::PING => Command::Ping { seq: c.u32("seq")? },
        cmd::SWITCHOVER_START => Command::SwitchoverStart,
        cmd::RUN_STATE => match c.u8("run state")? {
            0 => Command::RunState { running: false },
            1 => Command::RunState { running: true },
            v => {
                return Err(WireError::Invalid {
                    field: "run state",
                    offset: body_at,
                    reason: format!("{v} is neither 0 (paused) nor 1 (running)"),
                })
            }
        },
        cmd::CAPABILITIES => {
            let flags = c.u32("capability flags")?;
            let mut known = if version >= VERSION_MULTIFD {
                cmd::CAP_KNOWN
            } else if version >= VERSION_POSTCOPY {
                cmd::CAP_KNOWN & !cmd::CAP_MULTIFD
            } else if version >= VERSION_RAM_DIGEST {
                cmd::CAP_KNOWN & !cmd::CAP_POSTCOPY_RAM & !cmd::CAP_MULTIFD
            } else {
                cmd::CAP_KNOWN & !cmd::CAP_RAM_DIGEST & !cmd::CAP_POSTCOPY_RAM & !cmd::CAP_MULTIFD
            };
            if version < VERSION_PREEMPT {
                known &= !cmd::CAP_POSTCOPY_PREEMPT;
            }
            if flags & !known != 0 {
                return Err(WireError::Invalid {
                    field: "capability flags",
                    offset: body_at,
                    reason: format!(
                        "reserved bits set: {:#x} (a capability of the source this reader does not know)",
                        flags & !known
                    ),
                });
            }
            let both = cmd::CAP_RAM_DIGEST | cmd::CAP_POSTCOPY_RAM;
            if flags & both == both {
                return Err(WireError::Invalid {
                    field: "capability flags",
                    offset: body_at,
                    reason: "x-tern-ram-digest and postcopy-ram together (decision 71)".into(),
                });
            }
            if flags & cmd::CAP_POSTCOPY_PREEMPT != 0 && flags & cmd::CAP_POSTCOPY_RAM == 0 {
                return Err(WireError::Invalid {
                    field: "capability flags",
                    offset: body_at,
                    reason: "postcopy-preempt without postcopy-ram (Postcopy preempt requires \
                             postcopy-ram)"
                        .into(),
                });
            }
            // Bit 6 with bit 3 (multifd with x-tern-ram-digest) is legal in every version that
            // has bit 6, with no version bump (§5.2, decision 252).
            if flags & cmd::CAP_MULTIFD != 0
                && flags & cmd::CAP_POSTCOPY_RAM != 0
                && version < VERSION_MULTIFD_POSTCOPY
            {
                return Err(WireError::Invalid {
                    field: "capability flags",
                    offset: body_at,
                    reason: format!(
                        "multifd together with postcopy-ram needs stream version \
                         {VERSION_MULTIFD_POSTCOPY}, this stream is version {version} (§5.4)"
                    ),
                });
            }
            Command::Capabilities {
                switchover_ack: flags & cmd::CAP_SWITCHOVER_ACK != 0,
                validate_uuid: flags & cmd::CAP_VALIDATE_UUID != 0,
                ram_digest: flags & cmd::CAP_RAM_DIGEST != 0,
                postcopy_ram: flags & cmd::CAP_POSTCOPY_RAM != 0,
                postcopy_preempt: flags & cmd::CAP_POSTCOPY_PREEMPT != 0,
                multifd: flags & cmd::CAP_MULTIFD != 0,
            }
        }
        cmd::MULTIFD_CHANNELS if version >= VERSION_MULTIFD => {
            let channels = c.u16("multifd channels")?;
            if channels == 0 || channels > MAX_MULTIFD_CHANNELS {
                return Err(WireError::Invalid {
                    field: "multifd channels",
                    offset: body_at + 2,
                    reason: format!("{channels} not in 1..={MAX_MULTIFD_CHANNELS}"),
                });
            }
            let method = c.u8("multifd compression")?;
            let compression = Compression::from_wire(method).ok_or_else(|| WireError::Invalid {
                field: "multifd compression",
                offset: body_at + 4,
                reason: format!(
                    "unknown multifd compression {method} (0 none, 1 zlib, 2 zstd; §5.3)"
                ),
            })?;
            if compression != Compression::None && version < VERSION_COMPRESSION {
                return Err(WireError::Invalid {
                    field: "multifd compression",
                    offset: body_at + 4,
                    reason: format!(
                        "{method}: compressed multifd batches need stream version \
                         {VERSION_COMPRESSION}, this stream is version {version} (§5.3)"
                    ),
                });
            }
            if c.u8("multifd reserved")? != 0 {
                return Err(WireError::Invalid {
                    field: "multifd reserved",
                    offset: body_at + 5,
                    reason: "must be 0".into(),
                });
            }
            let id = c.bytes16("migration id")?;
            if id == [0u8; 16] {
                return Err(WireError::Invalid {
                    field: "migration id",
                    offset: body_at + 6,
                    reason: "all zero (the source draws a random id per migration)".into(),
                });
            }
            Command::MultifdChannels {
                channels,
                compression,
                id,
            }
        }
        cmd::MULTIFD_END if version >= VERSION_MULTIFD_POSTCOPY => Command::MultifdEnd,
        cmd::POSTCOPY_ADVISE if version >= VERSION_POSTCOPY => {
            let page_size = c.u32("post-copy page size")?;
            if c.u32("post-copy reserved")? != 0 {
                return Err(WireError::Invalid {
                    field: "post-copy reserved",
                    offset: body_at + 6,
                    reason: "must be 0".into(),
                });
            }
            Command::PostcopyAdvise { page_size }
        }
        cmd::POSTCOPY_LISTEN if version >= VERSION_POSTCOPY => Command::PostcopyListen,
        cmd::POSTCOPY_RUN if version >= VERSION_POSTCOPY => Command::PostcopyRun {
            crc32: c.u32("crc32")?,
            total_bytes: c.u64("total_bytes")?,
        },
        cmd::RECV_BITMAP if version >= VERSION_RECOVERY => {
            let block = c.u16("recv-bitmap block")?;
            if c.u16("recv-bitmap reserved")? != 0 {
                return Err(WireError::Invalid {
                    field: "recv-bitmap reserved",
                    offset: body_at + 4,
                    reason: "must be 0".into(),
                });
            }
            Command::RecvBitmap { block }
        }
        cmd::POSTCOPY_RESUME if version >= VERSION_RECOVERY => Command::PostcopyResume,
        cmd::POSTCOPY_PREEMPT if version >= VERSION_PREEMPT => Command::PostcopyPreempt {
            token: c.bytes16("preempt token")?,
        },
        cmd::POSTCOPY_FIRST..=cmd::POSTCOPY_LAST => {
            return Err(WireError::UnsupportedCommand {
                cmd: n,
                offset: body_at,
            })
        }
        _ => {
            return Err(WireError::UnknownCommand {
                cmd: n,
                offset: body_at,
            })
        }
    };
    c.finish()?;
    Ok(command)
}
