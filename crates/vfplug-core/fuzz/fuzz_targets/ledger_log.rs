//! Fuzz ledger replay with arbitrary (possibly corrupt) logs: one JSON `Record` per line.
//! `apply` must refuse bad records without panicking, and whatever it accepts must keep the
//! ledger's invariants (one VF per owner, tokens unique and not above the counter).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vfplug_core::{Ledger, Record};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut ledger = Ledger::new();
    for line in text.lines() {
        if let Ok(record) = serde_json::from_str::<Record>(line) {
            let _ = ledger.apply(&record);
            assert!(ledger.check_invariants().is_ok());
        }
    }
});
