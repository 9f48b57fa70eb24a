//! The VM lab: real QEMU (TCG), emulated SR-IOV (`igb`) and VFIO, where vfplug-qmp and
//! vfplug-host's driver binder and rtnetlink, and the real vfplugd and `vfplug` CNI binary, meet a
//! real kernel.
//!
//! Start with docs/vm-lab.md, then the tier tests in `tests/` (`qemu_tier.rs`, `sriov_tier.rs`).
//! This library is their toolkit:
//! * [`lab`]: where QEMU, the kernel and busybox are ([`lab::Lab`], written by `setup.sh`), and the
//!   [`lab::gate`] that runs, skips loudly, or fails a tier (`VMLAB_TIER`, `VMLAB_REQUIRE`);
//! * [`cpio`] and [`guest`]: the guests' initramfs images, built at run time;
//! * [`vm`]: starting QEMU ([`vm::VmConfig`], [`vm::Vm`]) and waiting for serial-console lines;
//! * [`l1`]: booting the sriov tiers' L1 guest with the guest agent and collecting its report;
//! * [`qmp`]: connecting vfplug-qmp to a just-started QEMU (retries until the socket answers);
//! * [`plugd`]: the agent's `vfplugd` phase (vfplugd and the CNI plugin on the real VFs);
//! * [`vmpod`]: the agent's `vmpod` phases (vfplugd hot-plugs a VF into L2 as a VM pod);
//! * [`sriov`]: the lab's own sysfs steps in L1 (finding the PF, creating VFs, IOMMU groups);
//! * [`timing`]: the figures the tiers measure and print.
//!
//! The binary `vmlab-guest-agent` runs *inside* the L1 guest of the sriov tiers: it creates VFs,
//! binds one to vfio-pci with vfplug-host's `SysfsDriverBinder` and hotplugs it into a nested
//! QEMU through vfplug-qmp.

pub mod agent;
pub mod cpio;
pub mod guest;
pub mod l1;
pub mod lab;
pub mod plugd;
pub mod qmp;
pub mod sriov;
pub mod timing;
pub mod vm;
pub mod vmpod;

use std::path::Path;
use std::time::Duration;

/// Everything that can go wrong while running the lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A prerequisite is not installed; `setup.sh` fixes it.
    #[error("{what}")]
    Missing {
        /// What is missing.
        what: String,
    },
    /// File or process I/O.
    #[error("{path}: {source}")]
    Io {
        /// The file or program involved.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Something the test waited for did not happen in time.
    #[error("timed out after {after:?} waiting for {what}\n{tail}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The bound.
        after: Duration,
        /// Serial console and QEMU stderr, for diagnosis.
        tail: String,
    },
    /// A QMP command failed (vfplug-qmp's classification kept).
    #[error("QMP: {0}")]
    Qmp(#[from] vfplug_qmp::QmpError),
    /// QEMU exited while the test waited.
    #[error("QEMU exited ({status}) while waiting for {what}\n{tail}")]
    Exited {
        /// What was awaited.
        what: String,
        /// Exit status.
        status: String,
        /// Serial console and QEMU stderr, for diagnosis.
        tail: String,
    },
}

impl LabError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        LabError::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
}
