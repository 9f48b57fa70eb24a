//! Property tests of the read path (`wire::LineFramer` + `wire::parse_server_line`), the same
//! code the cargo-fuzz target `qmp_reader` drives. CI has no nightly for cargo-fuzz; this is
//! what covers the reader there.

use proptest::prelude::*;
use serde_json::json;
use vfplug_qmp::Event;
use vfplug_qmp::wire::{ErrorBody, LineFramer, ServerMessage, parse_server_line, parse_stream};

/// A server message and its wire encoding.
#[derive(Debug, Clone)]
enum Msg {
    Return(u64, String),
    Error(u64, String),
    Deleted(String),
}

impl Msg {
    fn encode(&self) -> Vec<u8> {
        let v = match self {
            Msg::Return(id, s) => json!({"return": {"s": s}, "id": id}),
            Msg::Error(id, desc) => {
                json!({"error": {"class": "GenericError", "desc": desc}, "id": id})
            }
            Msg::Deleted(dev) => json!({"event": "DEVICE_DELETED",
                "data": {"device": dev, "path": format!("/machine/peripheral/{dev}")},
                "timestamp": {"seconds": 1, "microseconds": 2}}),
        };
        serde_json::to_vec(&v).expect("a json! value always serializes")
    }

    fn expected(&self) -> ServerMessage {
        match self {
            Msg::Return(id, s) => ServerMessage::Return {
                id: Some(*id),
                value: json!({"s": s}),
            },
            Msg::Error(id, desc) => ServerMessage::Error {
                id: Some(*id),
                error: ErrorBody {
                    class: "GenericError".into(),
                    desc: desc.clone(),
                },
            },
            Msg::Deleted(dev) => ServerMessage::Event(Event::DeviceDeleted {
                device: Some(dev.clone()),
                path: format!("/machine/peripheral/{dev}"),
            }),
        }
    }
}

fn msg() -> impl Strategy<Value = Msg> {
    prop_oneof![
        (any::<u64>(), any::<String>()).prop_map(|(i, s)| Msg::Return(i, s)),
        (any::<u64>(), any::<String>()).prop_map(|(i, s)| Msg::Error(i, s)),
        "[a-z][a-z0-9_-]{0,15}".prop_map(Msg::Deleted),
    ]
}

/// A line that is not QMP: starts with `#` (never valid JSON) and has no newline.
fn garbage() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        any::<u8>().prop_filter("no newline", |b| *b != b'\n'),
        0..64,
    )
    .prop_map(|mut v| {
        v.insert(0, b'#');
        v
    })
}

#[derive(Debug, Clone)]
enum Line {
    Good(Msg, bool),
    Garbage(Vec<u8>),
    TooLong(usize),
}

fn line() -> impl Strategy<Value = Line> {
    prop_oneof![
        6 => (msg(), any::<bool>()).prop_map(|(m, crlf)| Line::Good(m, crlf)),
        2 => garbage().prop_map(Line::Garbage),
        1 => (1usize..3000).prop_map(Line::TooLong),
    ]
}

const MAX: usize = 1024;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever the bytes: no panic, and the framer never holds more than the bound plus the
    /// last chunk.
    #[test]
    fn arbitrary_bytes_never_panic_and_stay_bounded(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..512), 0..16)
    ) {
        let mut framer = LineFramer::new(64);
        for chunk in &chunks {
            framer.push(chunk);
            while let Some(line) = framer.next_line() {
                if let Ok(line) = line {
                    prop_assert!(line.len() <= 64);
                    let _ = parse_server_line(&line);
                }
            }
            prop_assert!(framer.buffered() <= 64 + chunk.len().max(1));
        }
        let all: Vec<u8> = chunks.concat();
        let _ = parse_stream(&all, 64);
    }

    /// Valid messages survive any chunking and any garbage or over-long lines between them,
    /// in order; each bad line is reported exactly once.
    #[test]
    fn messages_survive_chunking_and_garbage(
        lines in proptest::collection::vec(line(), 0..24),
        cuts in proptest::collection::vec(1usize..700, 0..40),
    ) {
        let mut stream = Vec::new();
        let mut expected = Vec::new();
        let mut bad = 0usize;
        for l in &lines {
            match l {
                Line::Good(m, crlf) => {
                    stream.extend(m.encode());
                    stream.extend_from_slice(if *crlf { b"\r\n" } else { b"\n" });
                    expected.push(m.expected());
                }
                Line::Garbage(g) => {
                    stream.extend_from_slice(g);
                    stream.extend_from_slice(b"\r\n");
                    bad += 1;
                }
                Line::TooLong(extra) => {
                    stream.extend(std::iter::repeat_n(b'{', MAX + extra));
                    stream.push(b'\n');
                    bad += 1;
                }
            }
        }
        let mut framer = LineFramer::new(MAX);
        let mut got = Vec::new();
        let mut errors = 0usize;
        let mut rest = &stream[..];
        let mut cuts = cuts.into_iter();
        while !rest.is_empty() {
            let n = cuts.next().unwrap_or(rest.len()).min(rest.len());
            framer.push(&rest[..n]);
            rest = &rest[n..];
            while let Some(line) = framer.next_line() {
                match line.map(|l| parse_server_line(&l)) {
                    Ok(Ok(m)) => got.push(m),
                    _ => errors += 1,
                }
            }
        }
        prop_assert_eq!(got, expected);
        prop_assert_eq!(errors, bad);
        prop_assert_eq!(framer.buffered(), 0);
    }
}
