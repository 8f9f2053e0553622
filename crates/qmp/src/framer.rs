//! Streaming JSON framer: splits a byte stream into complete JSON texts.
//!
//! Like QEMU's JSON lexer/streamer, messages need not be newline-terminated and several may
//! share a line. The framer only tracks what is needed to find message boundaries (strings,
//! escapes, bracket depth) and detects lexical errors; the complete text is then parsed by
//! `serde_json`. QEMU's single-quoted strings (`'execute'`) are rewritten to double quotes on
//! the fly. Memory is bounded by the size limit: a message is buffered only until it exceeds
//! `max_size` bytes.

/// Something the framer found in the stream.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum FrameEvent {
    /// A complete JSON text (object, array or top-level scalar), ready for `serde_json`.
    Message(Vec<u8>),
    /// A lexical error; the partial message was discarded and the framer resynchronises.
    Error(String),
    /// The current message exceeded the size limit. The caller should close the connection.
    TooLarge,
    /// The current message exceeded the nesting limit; the rest of it is skipped.
    TooDeep,
}

/// Result of feeding one byte.
pub(crate) struct Step {
    /// False when the byte must be fed again (it ended a top-level token and starts another).
    pub consumed: bool,
    pub event: Option<FrameEvent>,
}

impl Step {
    fn eat(event: Option<FrameEvent>) -> Step {
        Step {
            consumed: true,
            event,
        }
    }
}

pub(crate) struct Framer {
    buf: Vec<u8>,
    /// Bytes of the current message seen so far (including skipped ones).
    len: usize,
    depth: usize,
    /// Quote character of the string being scanned.
    in_string: Option<u8>,
    escape: bool,
    /// Inside a top-level number or keyword.
    top_token: bool,
    /// Skipping after a lexical error until a resynchronisation point.
    recovering: bool,
    /// Skipping the rest of a too-deeply nested value (bytes are not stored).
    discarding: bool,
    max_size: usize,
    max_depth: usize,
}

fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'+' | b'.')
}

/// Bytes that QEMU treats as forced resynchronisation points: ASCII control characters other
/// than tab, and the impossible UTF-8 bytes 0xFE / 0xFF.
fn is_reset_byte(b: u8) -> bool {
    (b < 0x20 && b != b'\t') || b >= 0xfe
}

fn show_byte(b: u8) -> String {
    if (0x20..0x7f).contains(&b) {
        (b as char).to_string()
    } else {
        format!("\\x{b:02x}")
    }
}

impl Framer {
    pub(crate) fn new(max_size: usize, max_depth: usize) -> Framer {
        Framer {
            buf: Vec::new(),
            len: 0,
            depth: 0,
            in_string: None,
            escape: false,
            top_token: false,
            recovering: false,
            discarding: false,
            max_size,
            max_depth,
        }
    }

    fn in_message(&self) -> bool {
        self.depth > 0 || self.in_string.is_some() || self.top_token
    }

    fn reset(&mut self) {
        self.buf = Vec::new();
        self.len = 0;
        self.depth = 0;
        self.in_string = None;
        self.escape = false;
        self.top_token = false;
        self.discarding = false;
    }

    fn push(&mut self, b: u8) {
        if !self.discarding {
            self.buf.push(b);
        }
    }

    fn finish(&mut self) -> Option<FrameEvent> {
        let discarded = self.discarding;
        let msg = std::mem::take(&mut self.buf);
        self.reset();
        if discarded {
            None
        } else {
            Some(FrameEvent::Message(msg))
        }
    }

    fn lex_error(&mut self, b: u8) -> Step {
        self.reset();
        // A reset byte is itself the resynchronisation point; anything else starts recovery.
        self.recovering = !is_reset_byte(b);
        Step::eat(Some(FrameEvent::Error(format!(
            "JSON parse error, stray '{}'",
            show_byte(b)
        ))))
    }

    /// Feeds one byte.
    pub(crate) fn step(&mut self, b: u8) -> Step {
        if self.recovering {
            if matches!(b, b'{' | b'}' | b'[' | b']' | b':' | b',') {
                self.recovering = false;
                return Step {
                    consumed: false,
                    event: None,
                };
            }
            if is_reset_byte(b) {
                self.recovering = false;
            }
            return Step::eat(None);
        }
        let starts = !self.in_message()
            && !matches!(b, b' ' | b'\t' | b'\r' | b'\n' | b'}' | b']' | b':' | b',');
        if self.in_message() || starts {
            self.len += 1;
            if self.len > self.max_size {
                self.reset();
                return Step::eat(Some(FrameEvent::TooLarge));
            }
        }
        if let Some(quote) = self.in_string {
            return self.step_string(quote, b);
        }
        if self.top_token {
            if is_token_char(b) {
                self.push(b);
                return Step::eat(None);
            }
            let ev = self.finish();
            return Step {
                consumed: false,
                event: ev,
            };
        }
        match b {
            b' ' | b'\t' | b'\r' | b'\n' => {
                if self.depth > 0 {
                    self.push(b' ');
                }
                Step::eat(None)
            }
            b'{' | b'[' => {
                self.depth += 1;
                if self.depth > self.max_depth && !self.discarding {
                    self.buf = Vec::new();
                    self.discarding = true;
                    return Step::eat(Some(FrameEvent::TooDeep));
                }
                self.push(b);
                Step::eat(None)
            }
            b'}' | b']' | b':' | b',' if self.depth == 0 => Step::eat(Some(FrameEvent::Error(
                "JSON parse error, expecting value".to_string(),
            ))),
            b'}' | b']' => {
                self.push(b);
                self.depth -= 1;
                if self.depth == 0 {
                    Step::eat(self.finish())
                } else {
                    Step::eat(None)
                }
            }
            b':' | b',' => {
                self.push(b);
                Step::eat(None)
            }
            b'"' | b'\'' => {
                self.in_string = Some(b);
                self.push(b'"');
                Step::eat(None)
            }
            _ if is_token_char(b) => {
                if self.depth == 0 {
                    self.top_token = true;
                }
                self.push(b);
                Step::eat(None)
            }
            _ => self.lex_error(b),
        }
    }

    fn step_string(&mut self, quote: u8, b: u8) -> Step {
        if !(0x20..0xfe).contains(&b) {
            return self.lex_error(b);
        }
        if self.escape {
            self.escape = false;
            match b {
                b'\'' => self.push(b'\''),
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' | b'u' => {
                    self.push(b'\\');
                    self.push(b);
                }
                _ => return self.lex_error(b),
            }
            return Step::eat(None);
        }
        if b == b'\\' {
            self.escape = true;
            return Step::eat(None);
        }
        if b == quote {
            self.in_string = None;
            self.push(b'"');
            if self.depth == 0 {
                return Step::eat(self.finish());
            }
            return Step::eat(None);
        }
        if b == b'"' {
            // Only reachable inside a single-quoted string.
            self.push(b'\\');
        }
        self.push(b);
        Step::eat(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(input: &[u8]) -> Vec<FrameEvent> {
        let mut f = Framer::new(1024, 8);
        let mut out = Vec::new();
        for &b in input {
            loop {
                let s = f.step(b);
                out.extend(s.event);
                if s.consumed {
                    break;
                }
            }
        }
        out
    }

    fn msg(s: &str) -> FrameEvent {
        FrameEvent::Message(s.as_bytes().to_vec())
    }

    #[test]
    fn several_objects_one_line_and_split() {
        let ev = run(b"{\"a\": \"}{\"}{\"b\":[1,2]}\n  {\"c\"\n:1}");
        assert_eq!(
            ev,
            vec![
                msg("{\"a\": \"}{\"}"),
                msg("{\"b\":[1,2]}"),
                msg("{\"c\" :1}")
            ]
        );
    }

    #[test]
    fn escapes_and_single_quotes() {
        let ev = run(br#"{'a':'x"y\'z', "b":"q\"}"}"#);
        assert_eq!(ev, vec![msg(r#"{"a":"x\"y'z", "b":"q\"}"}"#)]);
    }

    #[test]
    fn top_level_scalars() {
        let ev = run(b"123 true\"s\"{}");
        assert_eq!(ev, vec![msg("123"), msg("true"), msg("\"s\""), msg("{}")]);
    }

    #[test]
    fn lexical_error_recovers_at_structural_char() {
        let ev = run(b"{\"a\": @garbage garbage{\"b\":1}");
        assert_eq!(
            ev,
            vec![
                FrameEvent::Error("JSON parse error, stray '@'".into()),
                msg("{\"b\":1}")
            ]
        );
    }

    #[test]
    fn newline_in_string_resyncs() {
        let ev = run(b"{\"a\": \"unterminated\n{\"b\":1}");
        assert_eq!(
            ev,
            vec![
                FrameEvent::Error("JSON parse error, stray '\\x0a'".into()),
                msg("{\"b\":1}")
            ]
        );
    }

    #[test]
    fn too_large_and_too_deep() {
        let mut big = b"{\"a\":\"".to_vec();
        big.extend(std::iter::repeat_n(b'x', 2000));
        let ev = run(&big);
        assert_eq!(ev, vec![FrameEvent::TooLarge]);
        let ev = run(b"[[[[[[[[[[[[1]]]]]]]]]]]] {}");
        assert_eq!(ev, vec![FrameEvent::TooDeep, msg("{}")]);
    }
}
