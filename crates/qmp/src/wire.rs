//! Framing of the QMP byte stream, and how replies are written.
//!
//! QMP input is a stream of JSON texts with no delimiter between them (QEMU's JSON streamer).
//! [`Framer`] cuts the stream into complete top-level values by tracking strings and bracket
//! depth, without parsing; each value is then parsed on its own. It enforces the limits that
//! keep a hostile client from costing memory or stack: nesting depth and message size.
//!
//! Errors, and how the stream recovers (the QMP spec's contract):
//! - a value too deep or too large gets one error, and the rest of that value is skipped by
//!   following the brackets until it closes; QEMU instead answers every remaining token with
//!   an error of its own (millions of replies for one bad message);
//! - a lexical error (an ASCII control character other than tab, CR and LF, or a byte that
//!   cannot start a token) resets the framer, so a client can always get back to a known
//!   state by sending such a byte (the spec suggests 0x04);
//! - a stray closing bracket at top level is an error of its own.

use serde::Serialize;
use serde_json::ser::{Formatter, PrettyFormatter};
use serde_json::Value;
use std::io;

/// Deepest nesting accepted, as in QEMU.
pub const MAX_DEPTH: usize = 1024;

/// Largest message accepted, in bytes (QEMU's token size limit).
pub const MAX_MESSAGE: usize = 64 << 20;

/// What the framer cut out of the stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// One complete top-level JSON text, not yet parsed.
    Message(Vec<u8>),
    /// The stream was malformed here; the text is the error description.
    Error(String),
}

#[derive(Debug, Default)]
enum Mode {
    /// Between values.
    #[default]
    Idle,
    /// Inside an object or array (or a top-level string).
    Value,
    /// Inside a top-level scalar (number or keyword), ended by a delimiter.
    Scalar,
    /// Inside a value that already got an error: follow it to its end, keep nothing.
    Skip,
}

/// Cuts a QMP byte stream into top-level JSON texts. See the module docs.
#[derive(Debug)]
pub struct Framer {
    mode: Mode,
    buf: Vec<u8>,
    depth: usize,
    in_string: bool,
    escaped: bool,
    max_depth: usize,
    max_len: usize,
}

impl Default for Framer {
    fn default() -> Self {
        Self::new(MAX_DEPTH, MAX_MESSAGE)
    }
}

fn is_lexical_error(b: u8) -> bool {
    (b < 0x20 && !matches!(b, b'\t' | b'\r' | b'\n')) || b >= 0x80 || b == 0x7f
}

impl Framer {
    /// A framer with the given limits.
    pub fn new(max_depth: usize, max_len: usize) -> Self {
        Self {
            mode: Mode::Idle,
            buf: Vec::new(),
            depth: 0,
            in_string: false,
            escaped: false,
            max_depth,
            max_len,
        }
    }

    /// True when no partial value is pending.
    pub fn is_idle(&self) -> bool {
        matches!(self.mode, Mode::Idle)
    }

    fn reset(&mut self) {
        self.mode = Mode::Idle;
        self.buf = Vec::new();
        self.depth = 0;
        self.in_string = false;
        self.escaped = false;
    }

    fn emit(&mut self, out: &mut Vec<Frame>) {
        let msg = std::mem::take(&mut self.buf);
        let skipped = matches!(self.mode, Mode::Skip);
        self.reset();
        if !skipped {
            out.push(Frame::Message(msg));
        }
    }

    fn fail(&mut self, desc: String, out: &mut Vec<Frame>) {
        out.push(Frame::Error(desc));
        self.buf = Vec::new();
        self.mode = Mode::Skip;
    }

    /// Feeds bytes; complete values and errors are appended to `out` in stream order.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<Frame>) {
        for &b in bytes {
            self.byte(b, out);
        }
    }

    /// Ends the stream: a pending top-level scalar is complete; anything else is truncated.
    pub fn finish(&mut self, out: &mut Vec<Frame>) {
        match self.mode {
            Mode::Scalar => self.emit(out),
            Mode::Idle => {}
            Mode::Value | Mode::Skip => {
                self.reset();
            }
        }
    }

    fn keep(&mut self, b: u8, out: &mut Vec<Frame>) {
        if matches!(self.mode, Mode::Skip) {
            return;
        }
        if self.buf.len() >= self.max_len {
            let max = self.max_len;
            self.fail(
                format!("JSON message exceeds the limit of {max} bytes"),
                out,
            );
            return;
        }
        self.buf.push(b);
    }

    fn byte(&mut self, b: u8, out: &mut Vec<Frame>) {
        if self.in_string {
            self.string_byte(b, out);
            return;
        }
        if is_lexical_error(b) {
            self.reset();
            out.push(Frame::Error(format!(
                "JSON parse error, invalid byte 0x{b:02x} outside a string"
            )));
            return;
        }
        if matches!(self.mode, Mode::Scalar) {
            if b.is_ascii_whitespace() || matches!(b, b'{' | b'[' | b'"' | b'}' | b']') {
                self.emit(out);
            } else {
                self.keep(b, out);
                return;
            }
        }
        match b {
            b'"' => {
                if self.is_idle() {
                    self.mode = Mode::Value;
                }
                self.in_string = true;
                self.keep(b, out);
            }
            b'{' | b'[' => {
                if self.is_idle() {
                    self.mode = Mode::Value;
                }
                self.depth += 1;
                if self.depth > self.max_depth && !matches!(self.mode, Mode::Skip) {
                    self.fail("JSON nesting depth limit exceeded".to_owned(), out);
                }
                self.keep(b, out);
            }
            b'}' | b']' => {
                if self.depth == 0 {
                    out.push(Frame::Error(format!(
                        "JSON parse error, unexpected '{}'",
                        b as char
                    )));
                    return;
                }
                self.depth -= 1;
                self.keep(b, out);
                if self.depth == 0 {
                    self.emit(out);
                }
            }
            _ if b.is_ascii_whitespace() => {
                if !self.is_idle() {
                    self.keep(b, out);
                }
            }
            _ => {
                if self.is_idle() {
                    self.mode = Mode::Scalar;
                }
                self.keep(b, out);
            }
        }
    }

    fn string_byte(&mut self, b: u8, out: &mut Vec<Frame>) {
        if b < 0x20 {
            self.reset();
            out.push(Frame::Error(format!(
                "JSON parse error, control character 0x{b:02x} in a string"
            )));
            return;
        }
        self.keep(b, out);
        if self.escaped {
            self.escaped = false;
        } else if b == b'\\' {
            self.escaped = true;
        } else if b == b'"' {
            self.in_string = false;
            if self.depth == 0 {
                self.emit(out);
            }
        }
    }
}

/// Parses one framed message. Depth is already bounded by the framer, so serde_json's own
/// recursion limit (128, below QEMU's 1024) is lifted.
pub fn parse(msg: &[u8]) -> Result<Value, String> {
    let mut de = serde_json::Deserializer::from_slice(msg);
    de.disable_recursion_limit();
    let value: serde_json::Result<Value> = serde::Deserialize::deserialize(&mut de);
    value
        .and_then(|v| de.end().map(|()| v))
        .map_err(|e| format!("JSON parse error, {}", strip_position(&e.to_string())))
}

fn strip_position(msg: &str) -> &str {
    msg.find(" at line ").map_or(msg, |i| &msg[..i])
}

/// QEMU's compact style: `{"return": {}, "id": 1}`.
#[derive(Debug, Default)]
struct QemuCompact;

fn separator<W: ?Sized + io::Write>(w: &mut W, first: bool) -> io::Result<()> {
    if first {
        Ok(())
    } else {
        w.write_all(b", ")
    }
}

impl Formatter for QemuCompact {
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        separator(w, first)
    }
    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        separator(w, first)
    }
    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }
}

/// Serialises `value` as one QMP output line (with QEMU's CRLF), compact or pretty.
pub fn to_line(value: &impl Serialize, pretty: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    let written = if pretty {
        let mut ser =
            serde_json::Serializer::with_formatter(&mut out, PrettyFormatter::with_indent(b"    "));
        value.serialize(&mut ser)
    } else {
        let mut ser = serde_json::Serializer::with_formatter(&mut out, QemuCompact);
        value.serialize(&mut ser)
    };
    if written.is_err() {
        // Serialising a serde_json::Value into memory cannot fail; keep the line well-formed
        // even so.
        out =
            br#"{"error": {"class": "GenericError", "desc": "internal: reply not serialisable"}}"#
                .to_vec();
    }
    out.extend_from_slice(b"\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(input: &[u8]) -> Vec<Frame> {
        let mut f = Framer::new(8, 64);
        let mut out = Vec::new();
        f.push(input, &mut out);
        f.finish(&mut out);
        out
    }

    fn msg(s: &str) -> Frame {
        Frame::Message(s.as_bytes().to_vec())
    }

    #[test]
    fn splits_values_without_delimiters() {
        assert_eq!(
            frames(br#"{"a":1}{"b":"}{"} [1] "s" 12 true"#),
            vec![
                msg(r#"{"a":1}"#),
                msg(r#"{"b":"}{"}"#),
                msg("[1]"),
                msg(r#""s""#),
                msg("12"),
                msg("true")
            ]
        );
    }

    #[test]
    fn byte_at_a_time_gives_the_same_frames() {
        let input = br#" {"x": ["a\"]", {"y": null}]}  7{"z":1}"#;
        let mut f = Framer::new(8, 64);
        let mut out = Vec::new();
        for b in input {
            f.push(&[*b], &mut out);
        }
        assert_eq!(out, frames(input));
    }

    #[test]
    fn too_deep_gives_one_error_then_recovers() {
        let out = frames(b"[[[[[[[[[[[]]]]]]]]]]]{\"ok\":1}");
        assert_eq!(
            out,
            vec![
                Frame::Error("JSON nesting depth limit exceeded".into()),
                msg(r#"{"ok":1}"#)
            ]
        );
    }

    #[test]
    fn too_long_gives_one_error_then_recovers() {
        let long = format!("{{\"a\":\"{}\"}}{{\"ok\":1}}", "x".repeat(100));
        let out = frames(long.as_bytes());
        assert!(matches!(&out[0], Frame::Error(e) if e.contains("exceeds")));
        assert_eq!(out[1..], [msg(r#"{"ok":1}"#)]);
    }

    #[test]
    fn control_byte_resets() {
        let out = frames(b"{\"execute\": \x04 {\"ok\":1}");
        assert!(matches!(&out[0], Frame::Error(_)));
        assert_eq!(out[1..], [msg(r#"{"ok":1}"#)]);
    }

    #[test]
    fn stray_close_is_an_error() {
        let out = frames(b"]{}");
        assert!(matches!(&out[0], Frame::Error(_)));
        assert_eq!(out[1..], [msg("{}")]);
    }

    #[test]
    fn compact_output_matches_qemu() {
        let v: Value = serde_json::from_str(r#"{"return": {}, "id": [1, 2]}"#).expect("json");
        assert_eq!(to_line(&v, false), b"{\"return\": {}, \"id\": [1, 2]}\r\n");
    }

    #[test]
    fn parse_reports_errors_without_positions() {
        assert!(parse(b"{\"a\" 1}")
            .expect_err("bad")
            .starts_with("JSON parse error, "));
        assert!(!parse(b"{\"a\" 1}").expect_err("bad").contains("line"));
        let deep = format!("{}{}", "[".repeat(1000), "]".repeat(1000));
        assert!(parse(deep.as_bytes()).is_ok());
    }
}
