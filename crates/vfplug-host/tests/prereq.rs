//! The prerequisite convention itself: the same test binary, run again for one probe test that
//! lacks a program, skips loudly without `VFPLUG_REQUIRE` and fails naming it with it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use vfplug_host::prereq;

const PROBE: &str = "probe_needs_a_program_that_is_not_there";
const MISSING: &str = "vfplug-no-such-program";

/// Only does something when the test below runs it (`VFPLUG_PREREQ_PROBE=1`).
#[test]
fn probe_needs_a_program_that_is_not_there() {
    if std::env::var_os("VFPLUG_PREREQ_PROBE").is_none() {
        return;
    }
    let Some(p) = prereq::need(PROBE, prereq::program(MISSING)) else {
        return;
    };
    panic!("{MISSING} exists at {}", p.display());
}

fn run_probe(require: Option<&str>) -> (bool, String) {
    let mut c = Command::new(std::env::current_exe().unwrap());
    // Without --nocapture: the SKIP line must get past libtest's capture on its own.
    c.args(["--exact", PROBE, "--test-threads", "1"])
        .env("VFPLUG_PREREQ_PROBE", "1")
        .env_remove(prereq::REQUIRE_ENV);
    if let Some(v) = require {
        c.env(prereq::REQUIRE_ENV, v);
    }
    let out = c.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn a_missing_prerequisite_skips_loudly_or_fails_when_required() {
    let why = format!("no `{MISSING}` in PATH");
    let (ok, text) = run_probe(None);
    assert!(ok, "{text}");
    assert!(text.contains(&format!("SKIP {PROBE}: {why}")), "{text}");

    let (ok, text) = run_probe(Some("0"));
    assert!(ok, "VFPLUG_REQUIRE=0 is not a requirement: {text}");

    let (ok, text) = run_probe(Some("1"));
    assert!(!ok, "passed although required: {text}");
    assert!(
        text.contains(&format!("{PROBE}: missing prerequisite: {why}")),
        "{text}"
    );
    assert!(!text.contains(&format!("SKIP {PROBE}")), "{text}");
}
