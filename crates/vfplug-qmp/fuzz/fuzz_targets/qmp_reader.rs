//! Fuzzes the QMP read path: arbitrary server bytes, split at a fuzzer-chosen point, through the
//! line framer and the message parser. Must never panic, and the framer must stay bounded.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vfplug_qmp::wire::{LineFramer, parse_server_line, parse_stream};

const MAX: usize = 4096;

fuzz_target!(|data: &[u8]| {
    // Whole input at once.
    let _ = parse_stream(data, MAX);
    // Same bytes in two chunks, cut where the first byte says.
    let cut = data
        .first()
        .map_or(0, |b| usize::from(*b) * data.len() / 256);
    let mut framer = LineFramer::new(MAX);
    for chunk in [&data[..cut], &data[cut..]] {
        framer.push(chunk);
        while let Some(line) = framer.next_line() {
            if let Ok(line) = line {
                assert!(line.len() <= MAX);
                let _ = parse_server_line(&line);
            }
        }
        assert!(framer.buffered() <= MAX + chunk.len());
    }
});
