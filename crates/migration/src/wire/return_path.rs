//! Return-path messages (destination → source), §8 of `docs/stream-format.md`.

use std::io::{Read, Write};

use super::config::StreamConfig;
use super::error::WireError;
use super::format::Limits;

/// Largest payload of any return-path message (ERROR text of 4096 bytes).
pub const RP_MAX_LEN: usize = 4096;
/// Most bitmap bytes one RECV_BITMAP carries (4096 − the 8-byte head).
pub const RP_MAX_BITMAP_BYTES: usize = RP_MAX_LEN - 8;
/// Most pages one REQ_PAGES may ask for.
pub const RP_MAX_REQ_PAGES: u32 = 1024;

/// Return-path message type numbers.
pub mod rp_type {
    /// `u32 error`.
    pub const SHUT: u16 = 1;
    /// `u32 seq`.
    pub const PONG: u16 = 2;
    /// Empty.
    pub const SWITCHOVER_ACK: u16 = 3;
    /// UTF-8 text.
    pub const ERROR: u16 = 4;
    /// Empty.
    pub const RESUMED: u16 = 5;
    /// `u16 block, u16 reserved, u32 first_page, u32 count` (post-copy, reserved).
    pub const REQ_PAGES: u16 = 6;
    /// `u16 block, u16 reserved, u32 first_page`, bitmap bytes (post-copy recovery, version 4).
    pub const RECV_BITMAP: u16 = 7;
    /// Empty (post-copy recovery, version 4).
    pub const RESUME_ACK: u16 = 8;
    /// Empty (post-copy preempt channel, version 6): the preempt channel was accepted.
    pub const PREEMPT_ACK: u16 = 9;
}

/// A message from the destination to the source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RpMessage {
    /// The destination sends nothing more; `error` tells whether it failed.
    Shut {
        /// True when the destination failed.
        error: bool,
    },
    /// Reply to `PING{seq}`.
    Pong {
        /// The ping's sequence number.
        seq: u32,
    },
    /// The destination approves switchover (switchover-ack).
    SwitchoverAck,
    /// The destination's error text (for the source's `error-desc`).
    Error {
        /// The text, at most [`RP_MAX_LEN`] bytes (longer text is cut at a char boundary).
        message: String,
    },
    /// The destination VM is running.
    Resumed,
    /// Post-copy page request (reserved).
    ReqPages {
        /// Block index.
        block: u16,
        /// First page.
        first_page: u32,
        /// Number of pages.
        count: u32,
    },
    /// Part of the destination's received bitmap of one block (post-copy recovery, §13.6).
    RecvBitmap {
        /// Block index.
        block: u16,
        /// Page of bit 0 of `bits[0]` (a multiple of 8).
        first_page: u32,
        /// 1 ..= [`RP_MAX_BITMAP_BYTES`] bytes; bit i of byte j = page `first_page + 8j + i`.
        bits: Vec<u8>,
    },
    /// Answer to `POSTCOPY_RESUME`: the destination is `postcopy-active` again.
    ResumeAck,
    /// The destination accepted the preempt channel (§13.8).
    PreemptAck,
}

impl RpMessage {
    /// Message name (for logs).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Shut { .. } => "SHUT",
            Self::Pong { .. } => "PONG",
            Self::SwitchoverAck => "SWITCHOVER_ACK",
            Self::Error { .. } => "ERROR",
            Self::Resumed => "RESUMED",
            Self::ReqPages { .. } => "REQ_PAGES",
            Self::RecvBitmap { .. } => "RECV_BITMAP",
            Self::ResumeAck => "RESUME_ACK",
            Self::PreemptAck => "PREEMPT_ACK",
        }
    }

    /// Encodes the message (type, length, payload).
    pub fn encode(&self) -> Vec<u8> {
        let (ty, payload): (u16, Vec<u8>) = match self {
            Self::Shut { error } => (rp_type::SHUT, u32::from(*error).to_le_bytes().to_vec()),
            Self::Pong { seq } => (rp_type::PONG, seq.to_le_bytes().to_vec()),
            Self::SwitchoverAck => (rp_type::SWITCHOVER_ACK, Vec::new()),
            Self::Error { message } => {
                let mut end = message.len().min(RP_MAX_LEN);
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                let text = if end == 0 { "error" } else { &message[..end] };
                (rp_type::ERROR, text.as_bytes().to_vec())
            }
            Self::Resumed => (rp_type::RESUMED, Vec::new()),
            Self::ReqPages {
                block,
                first_page,
                count,
            } => {
                let mut p = Vec::with_capacity(12);
                p.extend_from_slice(&block.to_le_bytes());
                p.extend_from_slice(&0u16.to_le_bytes());
                p.extend_from_slice(&first_page.to_le_bytes());
                p.extend_from_slice(&count.to_le_bytes());
                (rp_type::REQ_PAGES, p)
            }
            Self::RecvBitmap {
                block,
                first_page,
                bits,
            } => {
                // The writer's own bound: a longer bitmap is cut (never sent by this code).
                let bits = &bits[..bits.len().min(RP_MAX_BITMAP_BYTES)];
                let mut p = Vec::with_capacity(8 + bits.len());
                p.extend_from_slice(&block.to_le_bytes());
                p.extend_from_slice(&0u16.to_le_bytes());
                p.extend_from_slice(&first_page.to_le_bytes());
                p.extend_from_slice(bits);
                (rp_type::RECV_BITMAP, p)
            }
            Self::ResumeAck => (rp_type::RESUME_ACK, Vec::new()),
            Self::PreemptAck => (rp_type::PREEMPT_ACK, Vec::new()),
        };
        let mut out = Vec::with_capacity(4 + payload.len());
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u16).to_le_bytes());
        out.extend_from_slice(&payload);
        out
    }

    /// Encodes and writes the message, then flushes.
    pub fn write_to<W: Write>(&self, w: &mut W) -> std::io::Result<()> {
        w.write_all(&self.encode())?;
        w.flush()
    }
}

/// Reads return-path messages with the same care as the main stream.
#[derive(Debug)]
pub struct ReturnPathReader<R: Read> {
    inner: R,
    pos: u64,
    max_error_len: usize,
    /// Pages per block, when known (checks REQ_PAGES ranges).
    block_pages: Option<Vec<u64>>,
}

impl<R: Read> ReturnPathReader<R> {
    /// A reader with default limits and no RAM configuration.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            pos: 0,
            max_error_len: Limits::default().max_error_len.min(RP_MAX_LEN),
            block_pages: None,
        }
    }

    /// A reader that also checks REQ_PAGES against the RAM blocks of `config`.
    pub fn with_config(inner: R, config: &StreamConfig, limits: &Limits) -> Self {
        Self {
            inner,
            pos: 0,
            max_error_len: limits.max_error_len.min(RP_MAX_LEN),
            block_pages: Some(
                config
                    .ram_blocks
                    .iter()
                    .map(|b| b.pages(config.page_size))
                    .collect(),
            ),
        }
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Gives back the underlying reader.
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// Reads one message. `Ok(None)` on a clean close (EOF exactly between messages);
    /// EOF inside a message is [`WireError::Truncated`].
    pub fn read_message(&mut self) -> Result<Option<RpMessage>, WireError> {
        let at = self.pos;
        let mut head = [0u8; 4];
        let mut got = 0;
        while got < head.len() {
            match self.inner.read(&mut head[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => {
                    return Err(WireError::Truncated {
                        offset: at + got as u64,
                        what: "return-path message header",
                    })
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(WireError::read(at + got as u64, "return-path header", e)),
            }
        }
        self.pos += 4;
        let ty = u16::from_le_bytes([head[0], head[1]]);
        let len = usize::from(u16::from_le_bytes([head[2], head[3]]));
        let fixed = |n: usize| -> Result<(), WireError> {
            if len == n {
                Ok(())
            } else {
                Err(WireError::LengthMismatch {
                    what: "return-path message",
                    offset: at + 2,
                    len: len as u64,
                    expected: n as u64,
                })
            }
        };
        match ty {
            rp_type::SHUT | rp_type::PONG => fixed(4)?,
            rp_type::SWITCHOVER_ACK
            | rp_type::RESUMED
            | rp_type::RESUME_ACK
            | rp_type::PREEMPT_ACK => fixed(0)?,
            rp_type::RECV_BITMAP => {
                if len <= 8 {
                    return Err(WireError::LengthMismatch {
                        what: "RECV_BITMAP message",
                        offset: at + 2,
                        len: len as u64,
                        expected: 9,
                    });
                }
                if len > RP_MAX_LEN {
                    return Err(WireError::TooLarge {
                        what: "RECV_BITMAP message length",
                        len: len as u64,
                        limit: RP_MAX_LEN as u64,
                        offset: at + 2,
                    });
                }
            }
            rp_type::REQ_PAGES => fixed(12)?,
            rp_type::ERROR => {
                if len == 0 || len > self.max_error_len {
                    return Err(WireError::TooLarge {
                        what: "return-path error text length",
                        len: len as u64,
                        limit: self.max_error_len as u64,
                        offset: at + 2,
                    });
                }
            }
            _ => return Err(WireError::UnknownMessage { ty, offset: at }),
        }
        // `len` ≤ RP_MAX_LEN (checked above), so this buffer is bounded.
        let mut payload = [0u8; RP_MAX_LEN];
        let Some(body) = payload.get_mut(..len) else {
            return Err(WireError::TooLarge {
                what: "return-path message length",
                len: len as u64,
                limit: RP_MAX_LEN as u64,
                offset: at + 2,
            });
        };
        let mut done = 0;
        while done < body.len() {
            match self.inner.read(&mut body[done..]) {
                Ok(0) => {
                    return Err(WireError::Truncated {
                        offset: self.pos + done as u64,
                        what: "return-path message payload",
                    })
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(WireError::read(
                        self.pos + done as u64,
                        "return-path payload",
                        e,
                    ))
                }
            }
        }
        let body_at = self.pos;
        self.pos += len as u64;
        let body: &[u8] = body;
        let u32_at = |i: usize| -> u32 {
            body.get(i..i + 4)
                .and_then(|s| s.try_into().ok())
                .map(u32::from_le_bytes)
                .unwrap_or(0)
        };
        let msg = match ty {
            rp_type::SHUT => match u32_at(0) {
                0 => RpMessage::Shut { error: false },
                1 => RpMessage::Shut { error: true },
                v => {
                    return Err(WireError::Invalid {
                        field: "SHUT error flag",
                        offset: body_at,
                        reason: format!("{v}, expected 0 or 1"),
                    })
                }
            },
            rp_type::PONG => RpMessage::Pong { seq: u32_at(0) },
            rp_type::SWITCHOVER_ACK => RpMessage::SwitchoverAck,
            rp_type::RESUMED => RpMessage::Resumed,
            rp_type::RESUME_ACK => RpMessage::ResumeAck,
            rp_type::PREEMPT_ACK => RpMessage::PreemptAck,
            rp_type::RECV_BITMAP => self.recv_bitmap(body, body_at)?,
            rp_type::ERROR => {
                let text = std::str::from_utf8(body).map_err(|e| WireError::Invalid {
                    field: "return-path error text",
                    offset: body_at,
                    reason: format!("invalid UTF-8: {e}"),
                })?;
                RpMessage::Error {
                    message: text.to_owned(),
                }
            }
            _ => self.req_pages(body, body_at)?,
        };
        Ok(Some(msg))
    }

    fn recv_bitmap(&self, body: &[u8], at: u64) -> Result<RpMessage, WireError> {
        let (head, bits) = body.split_at(8.min(body.len()));
        let mut b = [0u8; 8];
        b[..head.len()].copy_from_slice(head);
        let block = u16::from_le_bytes([b[0], b[1]]);
        let reserved = u16::from_le_bytes([b[2], b[3]]);
        let first_page = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        if reserved != 0 {
            return Err(WireError::Invalid {
                field: "RECV_BITMAP reserved",
                offset: at + 2,
                reason: format!("{reserved:#x}, must be 0"),
            });
        }
        if first_page % 8 != 0 {
            return Err(WireError::Invalid {
                field: "RECV_BITMAP first page",
                offset: at + 4,
                reason: format!("{first_page} is not a multiple of 8"),
            });
        }
        if let Some(npages) = self.pages_of_block(block, first_page, at)? {
            // No byte may start past the block's last page.
            let last_byte = bits.len().saturating_sub(1) as u64;
            if u64::from(first_page) + 8 * last_byte >= npages {
                return Err(WireError::PageOutOfRange {
                    block: u32::from(block),
                    page: u64::from(first_page),
                    reason: format!(
                        "a received bitmap of {} bytes from page {first_page}; the block has {npages} pages",
                        bits.len()
                    ),
                    offset: at + 4,
                });
            }
        }
        Ok(RpMessage::RecvBitmap {
            block,
            first_page,
            bits: bits.to_vec(),
        })
    }

    /// The page count of `block` when the reader knows the blocks (`with_config`), `None`
    /// when it does not; a block that does not exist is an error naming `first_page`.
    fn pages_of_block(
        &self,
        block: u16,
        first_page: u32,
        at: u64,
    ) -> Result<Option<u64>, WireError> {
        let Some(blocks) = &self.block_pages else {
            return Ok(None);
        };
        match blocks.get(usize::from(block)) {
            Some(&npages) => Ok(Some(npages)),
            None => Err(WireError::PageOutOfRange {
                block: u32::from(block),
                page: u64::from(first_page),
                reason: format!("there are {} RAM blocks", blocks.len()),
                offset: at,
            }),
        }
    }

    fn req_pages(&self, body: &[u8], at: u64) -> Result<RpMessage, WireError> {
        let mut b = [0u8; 12];
        if body.len() == 12 {
            b.copy_from_slice(body);
        }
        let block = u16::from_le_bytes([b[0], b[1]]);
        let reserved = u16::from_le_bytes([b[2], b[3]]);
        let first_page = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let count = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        if reserved != 0 {
            return Err(WireError::Invalid {
                field: "REQ_PAGES reserved",
                offset: at + 2,
                reason: format!("{reserved:#x}, must be 0"),
            });
        }
        if count == 0 || count > RP_MAX_REQ_PAGES {
            return Err(WireError::Invalid {
                field: "REQ_PAGES count",
                offset: at + 8,
                reason: format!("{count} not in 1..={RP_MAX_REQ_PAGES}"),
            });
        }
        if let Some(npages) = self.pages_of_block(block, first_page, at)? {
            if u64::from(first_page) + u64::from(count) > npages {
                return Err(WireError::PageOutOfRange {
                    block: u32::from(block),
                    page: u64::from(first_page),
                    reason: format!("{count} pages requested, block has {npages} pages"),
                    offset: at + 4,
                });
            }
        }
        Ok(RpMessage::ReqPages {
            block,
            first_page,
            count,
        })
    }
}
