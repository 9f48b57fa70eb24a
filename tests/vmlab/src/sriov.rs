//! The SR-IOV steps the guest agent performs inside L1, on a sysfs tree whose root is injectable (the
//! real `/sys` in L1; a fixture directory in unit tests). These follow what vm-lab.md established on
//! the emulated igb: turn VF autoprobe off before creating VFs (5x faster: no igbvf probe waits).
//! VF creation is the lab's own (vfplug does not create VFs); binding to vfio-pci is not: the
//! agent calls vfplug-host's `SysfsDriverBinder` (`driver_override` + `drivers_probe`; plain
//! `bind` is refused with autoprobe off).

use std::path::{Path, PathBuf};

use vfplug_core::pci::PciAddress;

/// Errors of the sysfs steps, each naming the file involved.
#[derive(Debug, thiserror::Error)]
pub enum SriovError {
    /// A sysfs read or write failed.
    #[error("{path}: {source}")]
    Io {
        /// The sysfs file.
        path: PathBuf,
        /// The kernel's answer.
        #[source]
        source: std::io::Error,
    },
    /// No SR-IOV capable PF with the wanted IDs.
    #[error("no SR-IOV PF {vendor}:{device} under {root}")]
    NoPf {
        /// Vendor ID searched for.
        vendor: String,
        /// Device ID searched for.
        device: String,
        /// The sysfs root.
        root: PathBuf,
    },
    /// A link or value did not have the expected form.
    #[error("{path}: unexpected content {content:?}")]
    Unexpected {
        /// The sysfs file or link.
        path: PathBuf,
        /// What was found.
        content: String,
    },
}

/// A sysfs tree (`root` is `/sys` on a real system).
#[derive(Debug, Clone)]
pub struct Sysfs {
    root: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SriovError + '_ {
    move |source| SriovError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Sysfs {
    /// A tree rooted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// `bus/pci/devices/<addr>`.
    pub fn device(&self, addr: &PciAddress) -> PathBuf {
        self.root.join("bus/pci/devices").join(addr.to_string())
    }

    fn read(&self, path: &Path) -> Result<String, SriovError> {
        Ok(std::fs::read_to_string(path)
            .map_err(io(path))?
            .trim()
            .to_string())
    }

    fn write(&self, path: &Path, value: &str) -> Result<(), SriovError> {
        tracing::debug!(path = %path.display(), value, "sysfs write");
        std::fs::write(path, value).map_err(io(path))
    }

    fn link_name(&self, path: &Path) -> Result<Option<String>, SriovError> {
        match std::fs::read_link(path) {
            Ok(t) => Ok(t.file_name().map(|n| n.to_string_lossy().into_owned())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(SriovError::Io {
                path: path.to_path_buf(),
                source: e,
            }),
        }
    }

    /// The first PCI function with `vendor`/`device` (e.g. `0x8086`/`0x10c9`, igb 82576) that has an
    /// SR-IOV capability (`sriov_totalvfs`).
    pub fn find_pf(&self, vendor: &str, device: &str) -> Result<PciAddress, SriovError> {
        let dir = self.root.join("bus/pci/devices");
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .map_err(io(&dir))?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect();
        names.sort();
        for n in names {
            let d = dir.join(&n);
            let matches = self.read(&d.join("vendor")).is_ok_and(|v| v == vendor)
                && self.read(&d.join("device")).is_ok_and(|v| v == device)
                && d.join("sriov_totalvfs").exists();
            if matches {
                return n.parse().map_err(|_| SriovError::Unexpected {
                    path: d,
                    content: n,
                });
            }
        }
        Err(SriovError::NoPf {
            vendor: vendor.into(),
            device: device.into(),
            root: self.root.clone(),
        })
    }

    /// Creates `n` VFs on `pf` and returns their addresses (virtfn order). With `autoprobe` off
    /// they stay without a driver (for vfio-pci); on, igbvf takes them, as on a default node.
    pub fn create_vfs(
        &self,
        pf: &PciAddress,
        n: u32,
        autoprobe: bool,
    ) -> Result<Vec<PciAddress>, SriovError> {
        let d = self.device(pf);
        self.write(
            &d.join("sriov_drivers_autoprobe"),
            if autoprobe { "1" } else { "0" },
        )?;
        // numvfs can only change from 0; make the step idempotent for reruns.
        if self.read(&d.join("sriov_numvfs"))? != "0" {
            self.write(&d.join("sriov_numvfs"), "0")?;
        }
        self.write(&d.join("sriov_numvfs"), &n.to_string())?;
        self.vfs(pf)
    }

    /// The VFs of `pf`, from its `virtfnN` links.
    pub fn vfs(&self, pf: &PciAddress) -> Result<Vec<PciAddress>, SriovError> {
        let d = self.device(pf);
        let mut out = Vec::new();
        for i in 0.. {
            let link = d.join(format!("virtfn{i}"));
            match self.link_name(&link)? {
                Some(name) => out.push(name.parse().map_err(|_| SriovError::Unexpected {
                    path: link,
                    content: name,
                })?),
                None => break,
            }
        }
        Ok(out)
    }

    /// The driver currently bound to `addr`, if any.
    pub fn driver(&self, addr: &PciAddress) -> Result<Option<String>, SriovError> {
        self.link_name(&self.device(addr).join("driver"))
    }

    /// The IOMMU group number of `addr`.
    pub fn iommu_group(&self, addr: &PciAddress) -> Result<u32, SriovError> {
        let link = self.device(addr).join("iommu_group");
        let name = self.link_name(&link)?.unwrap_or_default();
        name.parse().map_err(|_| SriovError::Unexpected {
            path: link,
            content: name,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A fixture: one igb PF with two VFs (links already present, as after the kernel made them).
    fn fixture() -> (tempfile::TempDir, Sysfs, PciAddress) {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let devs = root.join("bus/pci/devices");
        std::fs::create_dir_all(&devs).unwrap();
        std::fs::create_dir_all(root.join("bus/pci/drivers/igb")).unwrap();
        std::fs::create_dir_all(root.join("bus/pci/drivers/vfio-pci")).unwrap();
        std::fs::write(root.join("bus/pci/drivers_probe"), "").unwrap();
        let mk = |name: &str, vendor: &str, device: &str| {
            let d = devs.join(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("vendor"), format!("{vendor}\n")).unwrap();
            std::fs::write(d.join("device"), format!("{device}\n")).unwrap();
            d
        };
        mk("0000:00:01.0", "0x1b36", "0x000c");
        let pf = mk("0000:01:00.0", "0x8086", "0x10c9");
        for (f, v) in [
            ("sriov_totalvfs", "7"),
            ("sriov_numvfs", "2"),
            ("sriov_drivers_autoprobe", "1"),
        ] {
            std::fs::write(pf.join(f), v).unwrap();
        }
        for (i, vf) in ["0000:01:10.0", "0000:01:10.2"].iter().enumerate() {
            let d = mk(vf, "0x8086", "0x10ca");
            std::fs::write(d.join("driver_override"), "(null)").unwrap();
            symlink(format!("../{vf}"), pf.join(format!("virtfn{i}"))).unwrap();
        }
        // VF 1 is bound to a host driver.
        symlink("../../drivers/igb", devs.join("0000:01:10.2/driver")).unwrap();
        std::fs::create_dir_all(root.join("bus/pci/drivers/igb")).unwrap();
        std::fs::write(root.join("bus/pci/drivers/igb/unbind"), "").unwrap();
        std::fs::create_dir_all(root.join("kernel/iommu_groups/8")).unwrap();
        symlink(
            "../../../../kernel/iommu_groups/8",
            devs.join("0000:01:10.0/iommu_group"),
        )
        .unwrap();
        let s = Sysfs::new(root);
        (t, s, "0000:01:00.0".parse().unwrap())
    }

    #[test]
    fn finds_the_pf_by_ids_and_sriov_capability() {
        let (_t, s, pf) = fixture();
        assert_eq!(s.find_pf("0x8086", "0x10c9").unwrap(), pf);
        // VFs have the vendor but no sriov_totalvfs, and other IDs are not PFs.
        assert!(matches!(
            s.find_pf("0x8086", "0x10ca"),
            Err(SriovError::NoPf { .. })
        ));
    }

    #[test]
    fn create_vfs_turns_autoprobe_off_resets_numvfs_and_lists_vfs() {
        let (_t, s, pf) = fixture();
        let vfs = s.create_vfs(&pf, 2, false).unwrap();
        let d = s.device(&pf);
        assert_eq!(
            std::fs::read_to_string(d.join("sriov_drivers_autoprobe")).unwrap(),
            "0"
        );
        assert_eq!(
            std::fs::read_to_string(d.join("sriov_numvfs")).unwrap(),
            "2"
        );
        let names: Vec<String> = vfs.iter().map(ToString::to_string).collect();
        assert_eq!(names, ["0000:01:10.0", "0000:01:10.2"]);
    }

    #[test]
    fn iommu_group_is_read_from_the_link() {
        let (_t, s, _) = fixture();
        let vf: PciAddress = "0000:01:10.0".parse().unwrap();
        assert_eq!(s.iommu_group(&vf).unwrap(), 8);
        assert!(s.iommu_group(&"0000:01:10.2".parse().unwrap()).is_err());
    }
}
