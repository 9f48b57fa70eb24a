//! Builders shared by the controller's tests: a VM's records as the node's ledger projects them
//! (`vfplug_core::records`), and the node's view of a pod.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};

use vfplug_controller::plan::NodeView;
use vfplug_core::records::{ActualDevice, ActualType};
use vfplug_core::{HostdevRecord, NetRecord, Phase, PodRef, VmRecords, VmRef};

pub const NS: &str = "ns";
pub const NAME: &str = "vm";
pub const UID: &str = "uid-1";
pub const QMP: &str = "qmp/vm.sock";

/// One VF of a VM: interface name, PCI address, phase.
pub type Vf<'a> = (&'a str, &'a str, Phase);

/// The records of the VM pod `uid` with these VFs (a `releasing` VF has no hostdev, as in the
/// ledger's projection).
pub fn records(uid: &str, vfs: &[Vf<'_>]) -> VmRecords {
    VmRecords {
        vm: VmRef {
            pod: PodRef::new(NS, NAME, uid),
            qmp_socket: format!("/var/lib/kubelet/pods/{uid}/volumes/{QMP}"),
            qmp_spec: QMP.into(),
        },
        nets: vfs
            .iter()
            .map(|(name, pci, phase)| NetRecord {
                name: (*name).into(),
                network: format!("{NS}/sriov-{name}"),
                pool: Some("vfplug.io/vf-a".into()),
                mac: None,
                vlan: Some(100),
                actual: ActualDevice {
                    kind: ActualType::Hostdev,
                    pci_address: pci.parse().unwrap(),
                },
                phase: *phase,
            })
            .collect(),
        hostdevs: vfs
            .iter()
            .filter(|(_, _, phase)| phase.has_hostdev())
            .map(|(name, pci, phase)| HostdevRecord {
                alias: (*phase != Phase::Pending).then(|| format!("vfplug-{name}")),
                pci_address: pci.parse().unwrap(),
                parent_net: (*name).into(),
                phase: *phase,
                reason: (*phase == Phase::GuestError).then(|| "the guest said no".into()),
            })
            .collect(),
    }
}

/// The node's view of a pod: its records (none when `vfs` is empty), its managed nets (by
/// name, network) and its CNI nets.
pub fn view(uid: &str, vfs: &[Vf<'_>], managed: &[&str], cni: &[&str]) -> NodeView {
    NodeView {
        records: (!vfs.is_empty()).then(|| records(uid, vfs)),
        managed: managed
            .iter()
            .map(|n| ((*n).to_owned(), format!("{NS}/sriov-{n}")))
            .collect::<BTreeMap<_, _>>(),
        cni: cni.iter().map(|n| (*n).to_owned()).collect::<BTreeSet<_>>(),
    }
}
