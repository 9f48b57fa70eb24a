//! Where the lab's prerequisites live, and the gate that decides whether a tier runs, skips loudly,
//! or fails (under `VMLAB_REQUIRE=1`, as CI runs it).

use std::path::{Path, PathBuf};

use crate::LabError;

/// The test tiers. Selected with `VMLAB_TIER=qemu|sriov|sriov-full|all` (comma-separated lists work).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// Host QEMU with a tiny guest: hotplug/unplug through vfplug-qmp.
    Qemu,
    /// L1 guest with an igb PF: VFs, vfio-pci binding, nested QEMU in prelaunch.
    Sriov,
    /// As `Sriov`, plus an L2 Linux guest that acknowledges the unplug.
    SriovFull,
}

impl Tier {
    /// The name used in `VMLAB_TIER`.
    pub fn name(self) -> &'static str {
        match self {
            Tier::Qemu => "qemu",
            Tier::Sriov => "sriov",
            Tier::SriovFull => "sriov-full",
        }
    }

    /// Whether the `VMLAB_TIER` value selects this tier.
    pub fn selected_by(self, env_value: &str) -> bool {
        env_value
            .split(',')
            .map(str::trim)
            .any(|t| t == "all" || t == self.name())
    }
}

/// Paths to everything a tier needs; all overridable by environment variables so nothing is tied
/// to this checkout or machine.
#[derive(Debug, Clone)]
pub struct Lab {
    /// `qemu-system-x86_64` (env `VMLAB_QEMU`, else `$PATH`).
    pub qemu: PathBuf,
    /// The cache written by setup.sh (env `VMLAB_CACHE`, else `tests/vmlab/.cache`).
    pub cache: PathBuf,
    /// Guest kernel (bzImage).
    pub kernel: PathBuf,
    /// Uncompressed modules and their insmod order.
    pub modules_dir: PathBuf,
    /// Static busybox for the guests' userland.
    pub busybox: PathBuf,
}

impl Lab {
    /// Default cache location: next to this crate's manifest.
    pub fn default_cache() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache")
    }

    /// Finds the lab's prerequisites, or says exactly what is missing and how to get it.
    pub fn discover() -> Result<Lab, LabError> {
        let cache = std::env::var_os("VMLAB_CACHE").map_or_else(Self::default_cache, PathBuf::from);
        let qemu = match std::env::var_os("VMLAB_QEMU") {
            Some(p) => PathBuf::from(p),
            None => find_in_path("qemu-system-x86_64").ok_or_else(|| LabError::Missing {
                what: "qemu-system-x86_64 not found in PATH".into(),
            })?,
        };
        let lab = Lab {
            qemu,
            kernel: cache.join("kernel/vmlinuz"),
            modules_dir: cache.join("kernel/modules"),
            busybox: cache.join("busybox"),
            cache,
        };
        for (p, what) in [
            (&lab.qemu, "qemu-system-x86_64"),
            (&lab.kernel, "guest kernel"),
            (&lab.busybox, "static busybox"),
        ] {
            if !p.is_file() {
                return Err(LabError::Missing {
                    what: format!("{what} ({}) missing", p.display()),
                });
            }
        }
        Ok(lab)
    }

    /// Module names in load order (dependencies first), as setup.sh resolved them.
    pub fn module_order(&self) -> Result<Vec<String>, LabError> {
        let p = self.cache.join("kernel/modules.order");
        let text = std::fs::read_to_string(&p).map_err(|e| LabError::io(&p, e))?;
        Ok(text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect())
    }
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// What a test should do, decided once at its start.
#[derive(Debug)]
pub enum Gate {
    /// Run with these paths.
    Run(Lab),
    /// Not selected or not possible here; the reason has already been printed.
    Skip,
}

/// Decides whether `tier` runs. Prints `VMLAB SKIP: <why>` to stderr when it does not; panics when a
/// prerequisite is missing and `VMLAB_REQUIRE=1` (CI must not pass by skipping).
pub fn gate(tier: Tier) -> Gate {
    let selection = std::env::var("VMLAB_TIER").unwrap_or_default();
    let require = std::env::var("VMLAB_REQUIRE").is_ok_and(|v| v == "1");
    decide(tier, &selection, require, Lab::discover)
}

/// The decision logic of [`gate`], with its inputs injected so it can be tested.
pub fn decide(
    tier: Tier,
    selection: &str,
    require: bool,
    discover: impl FnOnce() -> Result<Lab, LabError>,
) -> Gate {
    if !tier.selected_by(selection) {
        eprintln!(
            "VMLAB SKIP: tier {} not selected (VMLAB_TIER={selection:?}); run `make vm-test TIER={}`",
            tier.name(),
            tier.name()
        );
        return Gate::Skip;
    }
    match discover() {
        Ok(lab) => Gate::Run(lab),
        Err(e) if require => {
            panic!(
                "VMLAB FAIL: tier {} required (VMLAB_REQUIRE=1) but: {e}",
                tier.name()
            )
        }
        Err(e) => {
            eprintln!(
                "VMLAB SKIP: tier {}: {e}; run tests/vmlab/setup.sh",
                tier.name()
            );
            Gate::Skip
        }
    }
}

/// `vfplugd` and `vfplug`, built by `cargo` (a no-op when they are fresh, so a stale binary is
/// never tested) into the target dir and profile of `sibling`, a binary of this package
/// (`CARGO_BIN_EXE_*` exists only for a package's own bins). Returns (vfplugd, vfplug).
pub fn host_binaries(cargo: &Path, sibling: &Path) -> Result<(PathBuf, PathBuf), LabError> {
    let missing = |what: &str| LabError::Missing {
        what: format!("{what} of {}", sibling.display()),
    };
    let profile_dir = sibling.parent().ok_or_else(|| missing("profile dir"))?;
    let target_dir = profile_dir.parent().ok_or_else(|| missing("target dir"))?;
    let mut cmd = std::process::Command::new(cargo);
    cmd.args(["build", "-p", "vfplugd", "--bin", "vfplugd"])
        .args(["-p", "vfplug-cni", "--bin", "vfplug", "--target-dir"])
        .arg(target_dir);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let st = cmd.status().map_err(|e| LabError::io(cargo, e))?;
    if !st.success() {
        return Err(LabError::Missing {
            what: format!("building vfplugd and vfplug failed ({st})"),
        });
    }
    Ok((profile_dir.join("vfplugd"), profile_dir.join("vfplug")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_lab() -> Result<Lab, LabError> {
        Ok(Lab {
            qemu: "/q".into(),
            cache: "/c".into(),
            kernel: "/k".into(),
            modules_dir: "/m".into(),
            busybox: "/b".into(),
        })
    }

    fn missing() -> Result<Lab, LabError> {
        Err(LabError::Missing {
            what: "qemu-system-x86_64 not found in PATH".into(),
        })
    }

    #[test]
    fn tier_selection() {
        assert!(Tier::Qemu.selected_by("all"));
        assert!(Tier::Qemu.selected_by("qemu"));
        assert!(Tier::Sriov.selected_by("qemu, sriov"));
        assert!(!Tier::Sriov.selected_by("sriov-full"));
        assert!(!Tier::SriovFull.selected_by("sriov"));
        assert!(!Tier::Qemu.selected_by(""));
    }

    #[test]
    fn unselected_tier_skips_even_when_required_and_never_probes() {
        let g = decide(Tier::Qemu, "sriov", true, || panic!("must not discover"));
        assert!(matches!(g, Gate::Skip));
    }

    #[test]
    fn selected_tier_runs_when_prerequisites_exist() {
        assert!(matches!(
            decide(Tier::Qemu, "qemu", false, fake_lab),
            Gate::Run(_)
        ));
    }

    #[test]
    fn missing_prerequisite_skips_without_require() {
        assert!(matches!(
            decide(Tier::Sriov, "all", false, missing),
            Gate::Skip
        ));
    }

    #[test]
    #[should_panic(expected = "VMLAB FAIL")]
    fn missing_prerequisite_fails_under_require() {
        let _ = decide(Tier::Sriov, "all", true, missing);
    }
}
