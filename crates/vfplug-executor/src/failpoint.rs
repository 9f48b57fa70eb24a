//! Failpoints, **for crash-injection tests only**: a fixed list of named points, one right after
//! each step of the attach and detach sagas that is persisted in the ledger (or acted on the
//! host). When the point armed with [`arm`] is reached, one line naming it goes to stderr and the
//! process SIGKILLs itself: no destructors, no flush, no orderly shutdown — a real crash.
//!
//! vfplugd arms one with `--failpoint <name>` or `VFPLUG_FAILPOINT=<name>`; an unknown name is
//! refused at start with the list of valid ones (a typo must not silently test nothing).
//! Unarmed, [`hit`] costs one atomic load.
//!
//! The list is [`POINTS`] (docs/vm-pods.md, "Crash safety", says what recovery does at each).

use std::io::Write;
use std::sync::OnceLock;

/// The environment variable vfplugd reads the failpoint from (its `--failpoint` flag wins).
pub const ENV: &str = "VFPLUG_FAILPOINT";

/// The line written to stderr just before the SIGKILL: `<PREFIX> <name>`.
pub const PREFIX: &str = "vfplug failpoint: SIGKILL at";

/// Every failpoint, in saga order, with where it sits.
pub const POINTS: &[(&str, &str)] = &[
    (
        "add-reserved",
        "ADD: Reserved is durable; nothing on the host changed yet",
    ),
    (
        "add-configured",
        "ADD: Configured (attachment incomplete, saved settings) is durable; settings not applied",
    ),
    (
        "add-vfio-bound",
        "ADD: settings applied through the PF and vfio-pci bound; the attachment not yet complete",
    ),
    (
        "add-complete",
        "ADD: the attachment is complete (Configured); a VM pod's attach not started",
    ),
    (
        "attach-owed",
        "ADD: QEMU not running yet; the hot-plug is recorded as owed; the ADD not answered",
    ),
    (
        "attach-attaching",
        "attach: Attaching{alias, vm} is durable; device_add not sent",
    ),
    (
        "attach-device-added",
        "attach: QEMU answered device_add; presence not verified, Attached not persisted",
    ),
    (
        "attach-attached",
        "attach: Attached is durable; the CNI ADD not answered",
    ),
    (
        "detach-detaching",
        "detach: Detaching is durable; device_del not sent",
    ),
    (
        "detach-unplug-pending",
        "detach: device_del sent, DEVICE_DELETED not seen within the wait",
    ),
    (
        "detach-proved",
        "detach: the removal is proved (event, QEMU gone, qom-list); Detached not persisted",
    ),
    (
        "detach-detached",
        "detach: Detached (Releasing) is durable; nothing restored yet",
    ),
    (
        "finalize-begin",
        "finalize: Releasing is durable for a Configured VF (a failed or half-done ADD)",
    ),
    (
        "finalize-restored",
        "finalize: saved VF settings restored through the PF; no reset yet",
    ),
    (
        "finalize-reset",
        "finalize: function reset (vfio mode); driver not rebound",
    ),
    (
        "finalize-rebound",
        "finalize: the driver rebound; Free not persisted",
    ),
    (
        "finalize-freed",
        "finalize: Free is durable; the lease's leftovers (device-info file) not yet removed",
    ),
];

/// A failpoint name that is not in [`POINTS`], or a second arming.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FailpointError {
    /// Not a known failpoint.
    #[error("unknown failpoint {name:?} (from --failpoint or {ENV}); valid names: {valid}")]
    Unknown {
        /// What was given.
        name: String,
        /// Every valid name, comma-separated.
        valid: String,
    },
    /// [`arm`] was called before (a process has at most one failpoint).
    #[error("a failpoint is already armed ({armed:?})")]
    AlreadyArmed {
        /// What is armed.
        armed: Option<&'static str>,
    },
}

static ARMED: OnceLock<Option<&'static str>> = OnceLock::new();

/// The canonical name of `name` (surrounding spaces ignored), or why it is not one.
pub fn parse(name: &str) -> Result<&'static str, FailpointError> {
    let name = name.trim();
    POINTS
        .iter()
        .map(|(n, _)| *n)
        .find(|n| *n == name)
        .ok_or_else(|| FailpointError::Unknown {
            name: name.to_owned(),
            valid: POINTS
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// Arms `name` (`None` or empty: none) for the life of the process. Call once, at start, before
/// any saga runs.
pub fn arm(name: Option<&str>) -> Result<Option<&'static str>, FailpointError> {
    let point = match name.map(str::trim) {
        None | Some("") => None,
        Some(n) => Some(parse(n)?),
    };
    ARMED.set(point).map_err(|_| FailpointError::AlreadyArmed {
        armed: ARMED.get().copied().flatten(),
    })?;
    Ok(point)
}

/// The armed failpoint, if any.
pub fn armed() -> Option<&'static str> {
    ARMED.get().copied().flatten()
}

/// Crashes the process here if `name` is the armed failpoint.
#[inline]
pub fn hit(name: &'static str) {
    if let Some(Some(armed)) = ARMED.get()
        && *armed == name
    {
        crash(name);
    }
}

#[cold]
fn crash(name: &str) -> ! {
    // One unbuffered line, then the kill: nothing else of the process runs.
    let _ = writeln!(std::io::stderr(), "{PREFIX} {name}");
    let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
    // SIGKILL of oneself cannot fail; should it, abort (still no destructors).
    std::process::abort()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_accepts_every_listed_name_and_trims() {
        for (n, _) in POINTS {
            assert_eq!(parse(n), Ok(*n));
            assert_eq!(parse(&format!(" {n}\n")), Ok(*n));
        }
    }

    #[test]
    fn parse_refuses_a_typo_and_lists_the_valid_names() {
        let e = parse("attach-atached").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("\"attach-atached\""), "{msg}");
        for (n, _) in POINTS {
            assert!(msg.contains(n), "{n} missing from {msg}");
        }
        assert!(parse("").is_err());
        assert!(parse("ADD-RESERVED").is_err(), "names are exact");
    }

    #[test]
    fn names_are_unique() {
        let mut names: Vec<_> = POINTS.iter().map(|(n, _)| *n).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), POINTS.len());
    }

    /// Every listed point is hit exactly once in the sagas' sources, and every hit is listed: a
    /// point that is never reached would make a crash test silently test nothing.
    #[test]
    fn every_point_is_placed_exactly_once_in_the_sagas() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut hits: Vec<String> = Vec::new();
        for f in ["cni.rs", "vm.rs", "finalize.rs", "lib.rs"] {
            let text = std::fs::read_to_string(src.join(f)).unwrap();
            let mut rest = text.as_str();
            while let Some(i) = rest.find("failpoint::hit(\"") {
                rest = &rest[i + "failpoint::hit(\"".len()..];
                let end = rest.find('"').unwrap();
                hits.push(rest[..end].to_owned());
            }
        }
        for (n, _) in POINTS {
            let count = hits.iter().filter(|h| h == n).count();
            assert_eq!(count, 1, "failpoint {n} is placed {count} times");
        }
        for h in &hits {
            assert!(parse(h).is_ok(), "hit of an unlisted failpoint {h:?}");
        }
    }

    #[test]
    fn arming_refuses_unknown_names_and_arms_once() {
        assert!(matches!(
            arm(Some("no-such-point")),
            Err(FailpointError::Unknown { .. })
        ));
        // Arming "none" is still arming: a second call is refused, and nothing is armed.
        assert_eq!(arm(None), Ok(None));
        assert_eq!(
            arm(Some("add-reserved")),
            Err(FailpointError::AlreadyArmed { armed: None })
        );
        assert_eq!(armed(), None);
    }

    #[test]
    fn unarmed_hit_does_nothing() {
        // This test binary never arms a failpoint (arming is once per process).
        assert_eq!(armed(), None);
        for (n, _) in POINTS {
            hit(n);
        }
    }
}
