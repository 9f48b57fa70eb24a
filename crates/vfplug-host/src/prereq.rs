//! One convention for tests that need something this machine may lack (root, `ip`, QEMU,
//! the CNI plugins): with `VFPLUG_REQUIRE=1` (CI, `scripts/test-all.sh` as root) a missing
//! prerequisite fails the test, naming it; without it the test prints `SKIP <test>: <why>` on
//! stderr and returns. A skipped test must never pass silently where it is meant to run.
//!
//! Enabled by the cargo feature `fixture`, like the sysfs builder, so every crate's tests use
//! this one copy. The VM lab keeps its own `VMLAB_REQUIRE` (it also selects tiers).
//!
//! ```
//! # use vfplug_host::prereq;
//! fn my_test() {
//!     let Some(ip) = prereq::need("my_test", prereq::root().and_then(|()| prereq::program("ip")))
//!     else {
//!         return;
//!     };
//!     // ... uses `ip` ...
//! #   let _ = ip;
//! }
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};

/// The environment variable that turns a missing prerequisite into a failure.
pub const REQUIRE_ENV: &str = "VFPLUG_REQUIRE";

/// Whether missing prerequisites fail tests (`VFPLUG_REQUIRE` set, and not `0` or empty).
pub fn required() -> bool {
    std::env::var_os(REQUIRE_ENV).is_some_and(|v| !v.is_empty() && v != "0")
}

/// A prerequisite of `test` is missing: panics naming it when [`required`], else prints
/// `SKIP <test>: <why>` on stderr, past libtest's output capture (nextest still shows a passing
/// test's output only with `--no-capture` or `--success-output`). The caller returns right
/// after.
#[track_caller]
#[allow(clippy::panic)] // A test helper: failing the test is its job.
pub fn skip(test: &str, why: &str) {
    if required() {
        panic!("{test}: missing prerequisite: {why} ({REQUIRE_ENV}=1 makes this a failure)");
    }
    // Straight to the stderr handle, not `eprintln!`: the test harness captures the macros'
    // output of passing tests, and a skip must be seen.
    let _ = writeln!(std::io::stderr(), "SKIP {test}: {why}");
}

/// A part of `test` cannot run on this *kind* of machine at all — not a missing install that
/// CI could fix (e.g. a capability the sandbox never grants) — so it is not a failure even when
/// [`required`]. Always prints `SKIP <test> (not possible here): <why>`; use it only after the
/// test has checked what it can (such as the refusal path).
pub fn unavailable_here(test: &str, why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIP {test} (not possible here): {why}");
}

/// `Ok(v)`: `Some(v)`. `Err(why)`: [`skip`] and `None`.
#[track_caller]
pub fn need<T>(test: &str, prerequisite: Result<T, String>) -> Option<T> {
    match prerequisite {
        Ok(v) => Some(v),
        Err(why) => {
            skip(test, &why);
            None
        }
    }
}

/// The process runs as root.
pub fn root() -> Result<(), String> {
    if rustix::process::geteuid().is_root() {
        Ok(())
    } else {
        Err("needs root".into())
    }
}

/// `name` found in `PATH` (its path).
pub fn program(name: &str) -> Result<PathBuf, String> {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
        .ok_or_else(|| format!("no `{name}` in PATH"))
}

/// The file at `path` exists; `hint` says how to get it.
pub fn file(path: &Path, hint: &str) -> Result<PathBuf, String> {
    if path.exists() {
        Ok(path.to_owned())
    } else {
        Err(format!("{} is missing ({hint})", path.display()))
    }
}

/// `CAP_SYS_RESOURCE` (capability bit 24): raising another process's hard rlimit, as
/// `vmpod::PrlimitMemlock` does for QEMU. Root in a container often lacks it (Docker drops it).
pub const CAP_SYS_RESOURCE: u32 = 24;

/// The process has capability `bit` (see `capabilities(7)`) in its effective set, read from
/// `/proc/self/status`; `name` is for the message.
pub fn capability(bit: u32, name: &str) -> Result<(), String> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("reading /proc/self/status for {name}: {e}"))?;
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .ok_or_else(|| format!("no CapEff in /proc/self/status (checking {name})"))?;
    if bit < 64 && eff & (1 << bit) != 0 {
        Ok(())
    } else {
        Err(format!("needs {name} (effective capabilities {eff:#x})"))
    }
}
