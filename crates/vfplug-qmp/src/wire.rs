//! The QMP wire format, as pure functions: line framing ([`LineFramer`]), server-message parsing
//! ([`parse_server_line`]) and request encoding ([`encode_request`]).
//!
//! Nothing here does I/O, so the fuzz target (`fuzz/fuzz_targets/qmp_reader.rs`) and the
//! proptests call exactly the code the client's reader task runs.
//!
//! Framing: QEMU ends every message with CRLF and escapes control characters inside JSON strings,
//! so a raw `\n` only ever ends a message; we split on `\n` and drop one trailing `\r`
//! (cni-hotplug.md §2.1). Lines longer than the bound are reported once as
//! [`FrameError::TooLong`] and skipped up to the next `\n`, so one bad message never
//! desynchronizes the stream.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::event::Event;

/// Default bound on one server line (1 MiB). A `query-pci` of a big VM is a few tens of KiB.
pub const DEFAULT_MAX_LINE: usize = 1 << 20;

/// A framing error. The framer has already resynchronized when it returns one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A line exceeded the bound; its bytes were discarded up to the next newline.
    #[error("line longer than {max} bytes discarded")]
    TooLong {
        /// The bound.
        max: usize,
    },
}

/// Splits a byte stream into lines, with a bound on line length.
#[derive(Debug)]
pub struct LineFramer {
    buf: Vec<u8>,
    /// Bytes of `buf` already searched for `\n` (avoids quadratic rescans of long lines).
    scanned: usize,
    max: usize,
    /// Inside an over-long line: drop bytes until the next `\n`.
    discarding: bool,
}

impl LineFramer {
    /// A framer that rejects lines longer than `max` bytes (terminator excluded).
    pub fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            scanned: 0,
            max,
            discarding: false,
        }
    }

    /// Appends bytes read from the stream. Call [`Self::next_line`] until it returns `None`
    /// after each push; the buffer then never holds more than `max` + one push.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Bytes buffered but not yet returned (for tests of the memory bound).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete line without its terminator, a framing error, or `None` if more input
    /// is needed.
    pub fn next_line(&mut self) -> Option<Result<Vec<u8>, FrameError>> {
        loop {
            let newline = self.buf[self.scanned..]
                .iter()
                .position(|&b| b == b'\n')
                .map(|i| i + self.scanned);
            if self.discarding {
                match newline {
                    Some(i) => {
                        self.buf.drain(..=i);
                        self.scanned = 0;
                        self.discarding = false;
                        continue;
                    }
                    None => {
                        self.buf.clear();
                        self.scanned = 0;
                        return None;
                    }
                }
            }
            return match newline {
                Some(i) => {
                    let mut line: Vec<u8> = self.buf.drain(..=i).collect();
                    self.scanned = 0;
                    line.pop(); // '\n'
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    if line.len() > self.max {
                        Some(Err(FrameError::TooLong { max: self.max }))
                    } else {
                        Some(Ok(line))
                    }
                }
                None if self.buf.len() > self.max => {
                    self.buf.clear();
                    self.scanned = 0;
                    self.discarding = true;
                    Some(Err(FrameError::TooLong { max: self.max }))
                }
                None => {
                    self.scanned = self.buf.len();
                    None
                }
            };
        }
    }
}

/// QEMU's version triple, as in the greeting and `query-version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuVersion {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Micro version.
    pub micro: u32,
}

/// `query-version`'s result and the greeting's `version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// The version triple.
    pub qemu: QemuVersion,
    /// Distribution package string, e.g. `Debian 1:10.0.2+ds-2+deb13u1~bpo12+1`.
    #[serde(default)]
    pub package: String,
}

/// The server's greeting: `{"QMP": {"version": ..., "capabilities": [...]}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Greeting {
    /// QEMU's version.
    pub version: VersionInfo,
    /// Offered capabilities, e.g. `["oob"]`. We do not enable any.
    #[serde(default)]
    pub capabilities: Vec<String>,
}

/// The body of a QMP error reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Error class, e.g. `GenericError`.
    pub class: String,
    /// Human-readable text.
    #[serde(default)]
    pub desc: String,
}

/// One message from the server.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerMessage {
    /// The greeting (first line after connect).
    Greeting(Greeting),
    /// A success reply. `id` is `None` when absent or not one of our numeric ids.
    Return {
        /// Our request id.
        id: Option<u64>,
        /// The command's result.
        value: Value,
    },
    /// An error reply. QEMU sends parse errors without `id`.
    Error {
        /// Our request id.
        id: Option<u64>,
        /// Class and text.
        error: ErrorBody,
    },
    /// An asynchronous event.
    Event(Event),
}

/// Why a line is not a QMP server message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Not JSON, or not a JSON object.
    #[error("not a JSON object: {0}")]
    NotJson(String),
    /// A JSON object with none of `QMP`, `return`, `error`, `event`, or one of them malformed.
    #[error("not a QMP message: {0}")]
    NotQmp(String),
}

/// Parses one line (terminator already removed) into a [`ServerMessage`]. Unknown extra keys are
/// ignored, as QMP's compatibility rules require. Never panics, whatever the bytes.
pub fn parse_server_line(line: &[u8]) -> Result<ServerMessage, WireError> {
    let obj: Map<String, Value> =
        serde_json::from_slice(line).map_err(|e| WireError::NotJson(e.to_string()))?;
    let id = obj.get("id").and_then(Value::as_u64);
    if let Some(value) = obj.get("return") {
        return Ok(ServerMessage::Return {
            id,
            value: value.clone(),
        });
    }
    if let Some(error) = obj.get("error") {
        let error = ErrorBody::deserialize(error)
            .map_err(|e| WireError::NotQmp(format!("bad error body: {e}")))?;
        return Ok(ServerMessage::Error { id, error });
    }
    if let Some(name) = obj.get("event") {
        let name = name
            .as_str()
            .ok_or_else(|| WireError::NotQmp("event name is not a string".into()))?;
        return Ok(ServerMessage::Event(Event::from_parts(
            name,
            obj.get("data"),
        )));
    }
    if let Some(greeting) = obj.get("QMP") {
        let greeting = Greeting::deserialize(greeting)
            .map_err(|e| WireError::NotQmp(format!("bad greeting: {e}")))?;
        return Ok(ServerMessage::Greeting(greeting));
    }
    Err(WireError::NotQmp(
        "no QMP, return, error or event key".into(),
    ))
}

/// A client request on the wire: `{"execute": ..., "arguments": ..., "id": ...}`.
#[derive(Debug, Serialize)]
pub struct Request<'a, A: Serialize> {
    /// Command name.
    pub execute: &'a str,
    /// Arguments; omitted when `None` (QEMU rejects `"arguments": null`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arguments: Option<&'a A>,
    /// Our monotonic id.
    pub id: u64,
}

/// Encodes a request as one `\n`-terminated line. serde_json escapes control characters, so the
/// only raw newline is the terminator.
pub fn encode_request<A: Serialize>(
    execute: &str,
    arguments: Option<&A>,
    id: u64,
) -> Result<Vec<u8>, serde_json::Error> {
    let mut line = serde_json::to_vec(&Request {
        execute,
        arguments,
        id,
    })?;
    line.push(b'\n');
    Ok(line)
}

/// Splits `data` into lines and parses each: the whole read path minus the socket. This is what
/// the fuzz target and the proptest drive, with the same bound the client uses.
pub fn parse_stream(data: &[u8], max_line: usize) -> Vec<Result<ServerMessage, String>> {
    let mut framer = LineFramer::new(max_line);
    framer.push(data);
    let mut out = Vec::new();
    while let Some(line) = framer.next_line() {
        match line {
            Ok(line) if line.iter().all(u8::is_ascii_whitespace) => {}
            Ok(line) => out.push(parse_server_line(&line).map_err(|e| e.to_string())),
            Err(e) => out.push(Err(e.to_string())),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framer_splits_crlf_and_lf_across_pushes() {
        let mut f = LineFramer::new(64);
        f.push(b"{\"a\":1}\r");
        assert_eq!(f.next_line(), None);
        f.push(b"\n{\"b\"");
        assert_eq!(f.next_line(), Some(Ok(b"{\"a\":1}".to_vec())));
        assert_eq!(f.next_line(), None);
        f.push(b":2}\n");
        assert_eq!(f.next_line(), Some(Ok(b"{\"b\":2}".to_vec())));
        assert_eq!(f.next_line(), None);
        assert_eq!(f.buffered(), 0);
    }

    #[test]
    fn framer_skips_over_long_line_and_resyncs() {
        let mut f = LineFramer::new(8);
        f.push(b"0123456789abcdef");
        assert_eq!(f.next_line(), Some(Err(FrameError::TooLong { max: 8 })));
        assert_eq!(f.next_line(), None);
        assert_eq!(f.buffered(), 0, "discarded bytes are not kept");
        f.push(b"more garbage\nok\r\n");
        assert_eq!(f.next_line(), Some(Ok(b"ok".to_vec())));
        // A long line that arrives complete in one push is also rejected, once.
        f.push(b"0123456789\nfine\n");
        assert_eq!(f.next_line(), Some(Err(FrameError::TooLong { max: 8 })));
        assert_eq!(f.next_line(), Some(Ok(b"fine".to_vec())));
        assert_eq!(f.next_line(), None);
    }

    #[test]
    fn framer_accepts_line_of_exactly_max() {
        let mut f = LineFramer::new(4);
        f.push(b"abcd\r\n");
        assert_eq!(f.next_line(), Some(Ok(b"abcd".to_vec())));
    }

    #[test]
    fn parses_real_greeting() {
        let line = br#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "capabilities": ["oob"]}}"#;
        match parse_server_line(line) {
            Ok(ServerMessage::Greeting(g)) => {
                assert_eq!(
                    g.version.qemu,
                    QemuVersion {
                        major: 10,
                        minor: 0,
                        micro: 2
                    }
                );
                assert_eq!(g.capabilities, vec!["oob".to_string()]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parses_replies_errors_and_events() {
        assert_eq!(
            parse_server_line(br#"{"return": {}, "id": 7}"#),
            Ok(ServerMessage::Return {
                id: Some(7),
                value: serde_json::json!({})
            })
        );
        assert_eq!(
            parse_server_line(br#"{"return": [], "id": "not-ours"}"#),
            Ok(ServerMessage::Return {
                id: None,
                value: serde_json::json!([])
            })
        );
        assert_eq!(
            parse_server_line(
                br#"{"error": {"class": "GenericError", "desc": "JSON parse error, invalid keyword 'x'"}}"#
            ),
            Ok(ServerMessage::Error {
                id: None,
                error: ErrorBody {
                    class: "GenericError".into(),
                    desc: "JSON parse error, invalid keyword 'x'".into()
                }
            })
        );
        let ev = parse_server_line(
            br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "DEVICE_DELETED", "data": {"device": "hostdev0", "path": "/machine/peripheral/hostdev0"}}"#,
        );
        assert_eq!(
            ev,
            Ok(ServerMessage::Event(Event::DeviceDeleted {
                device: Some("hostdev0".into()),
                path: "/machine/peripheral/hostdev0".into()
            }))
        );
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(
            parse_server_line(b"hello"),
            Err(WireError::NotJson(_))
        ));
        assert!(matches!(
            parse_server_line(b"[1,2]"),
            Err(WireError::NotJson(_))
        ));
        assert!(matches!(
            parse_server_line(br#"{"foo": 1}"#),
            Err(WireError::NotQmp(_))
        ));
        assert!(matches!(
            parse_server_line(br#"{"error": 3}"#),
            Err(WireError::NotQmp(_))
        ));
        assert!(matches!(
            parse_server_line(br#"{"event": 3}"#),
            Err(WireError::NotQmp(_))
        ));
    }

    #[test]
    fn request_encoding_omits_absent_arguments() {
        let line = encode_request::<()>("query-status", None, 3).unwrap();
        assert_eq!(line, b"{\"execute\":\"query-status\",\"id\":3}\n".to_vec());
        let line =
            encode_request("device_del", Some(&serde_json::json!({"id": "a\nb"})), 4).unwrap();
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
    }
}
