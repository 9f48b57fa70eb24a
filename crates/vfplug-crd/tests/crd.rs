//! The Domain CRD: the checked-in YAML is what the types generate (regenerate with
//! `VFPLUG_BLESS=1 cargo test -p vfplug-crd --test crd`), `kubectl get domains` has its
//! columns, and the status is the VM's records, spelled as Kubernetes spells things.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use kube::CustomResourceExt as _;
use vfplug_core::records::{ActualDevice, ActualType};
use vfplug_core::{HostdevRecord, NetRecord, Phase, PodRef, VmRecords, VmRef};
use vfplug_crd::{Domain, DomainStatus, crd_yaml, printer_columns};

/// Where the CRD is checked in: for `kubectl apply`, and in the Helm chart's `crds/`.
fn checked_in() -> [PathBuf; 2] {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    [
        repo.join("deploy/crds/domains.vfplug.io.yaml"),
        repo.join("deploy/helm/vfplug/crds/domains.vfplug.io.yaml"),
    ]
}

#[test]
fn the_checked_in_crd_is_what_the_types_generate() {
    let generated = crd_yaml().unwrap();
    for path in checked_in() {
        if std::env::var_os("VFPLUG_BLESS").is_some() {
            std::fs::write(&path, &generated).unwrap();
        }
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            on_disk == generated,
            "{} differs from the Domain types; regenerate it with \
             `VFPLUG_BLESS=1 cargo test -p vfplug-crd --test crd` and commit it",
            path.display()
        );
    }
}

#[test]
fn the_crd_is_namespaced_with_a_status_subresource_and_kubectl_columns() {
    let crd = Domain::crd();
    assert_eq!(crd.metadata.name.as_deref(), Some("domains.vfplug.io"));
    assert_eq!(crd.spec.group, "vfplug.io");
    assert_eq!(crd.spec.scope, "Namespaced");
    assert_eq!(crd.spec.names.kind, "Domain");
    assert_eq!(crd.spec.names.short_names, Some(vec!["dom".to_string()]));
    let v = &crd.spec.versions[0];
    assert_eq!(
        (v.name.as_str(), v.served, v.storage),
        ("v1alpha1", true, true)
    );
    assert!(v.subresources.as_ref().unwrap().status.is_some());
    let cols = printer_columns();
    assert_eq!(cols["Phase"], ".status.phase");
    assert_eq!(cols["Nets"], ".status.netCount");
    assert_eq!(cols["Hostdevs"], ".status.hostdevCount");
    assert_eq!(cols["Age"], ".metadata.creationTimestamp");
}

fn records() -> VmRecords {
    let pci = |f: u8| vfplug_core::PciAddress::new(0, 0xaf, 2, f).unwrap();
    let net = |name: &str, f: u8, phase: Phase| NetRecord {
        name: name.into(),
        network: "vmnet".into(),
        pool: Some("intel.com/vm".into()),
        mac: Some("02:00:00:00:00:42".parse().unwrap()),
        vlan: Some(100),
        actual: ActualDevice {
            kind: ActualType::Hostdev,
            pci_address: pci(f),
        },
        phase,
    };
    VmRecords {
        vm: VmRef {
            pod: PodRef::new("ns", "vm-a", "uid-a"),
            qmp_socket: "/k/pods/uid-a/volumes/kubernetes.io~empty-dir/qmp/qmp.sock".into(),
            qmp_spec: "qmp/qmp.sock".into(),
        },
        nets: vec![
            net("net1", 1, Phase::Attached),
            net("net2", 2, Phase::UnplugPending),
        ],
        hostdevs: vec![
            HostdevRecord {
                alias: Some("vfplug-net1".into()),
                pci_address: pci(1),
                parent_net: "net1".into(),
                phase: Phase::Attached,
                reason: None,
            },
            HostdevRecord {
                alias: Some("vfplug-net2".into()),
                pci_address: pci(2),
                parent_net: "net2".into(),
                phase: Phase::UnplugPending,
                reason: None,
            },
        ],
    }
}

#[test]
fn the_status_is_the_vms_records_in_kubernetes_spelling() {
    let st = DomainStatus::from_records(Some(&records()));
    assert_eq!((st.net_count, st.hostdev_count), (2, 2));
    // The least settled phase sums the VM up.
    assert_eq!(st.phase, Some(vfplug_crd::Phase::UnplugPending));
    let json = serde_json::to_value(&st).unwrap();
    assert_eq!(json["phase"], "unplugPending");
    assert_eq!(json["netCount"], 2);
    assert_eq!(json["nets"][0]["actual"]["type"], "hostdev");
    assert_eq!(json["nets"][0]["actual"]["pciAddress"], "0000:af:02.1");
    assert_eq!(json["nets"][1]["phase"], "unplugPending");
    assert_eq!(json["hostdevs"][1]["parentNet"], "net2");
    assert_eq!(json["hostdevs"][0]["alias"], "vfplug-net1");
    // Each hostdev names a net of the same VM.
    for h in &st.hostdevs {
        assert!(st.nets.iter().any(|n| n.name == h.parent_net));
    }
    // A VM with no VF: empty lists, no phase.
    let none = DomainStatus::from_records(None);
    assert_eq!(
        (none.net_count, none.hostdev_count, none.phase),
        (0, 0, None)
    );
    let back: DomainStatus = serde_json::from_value(json).unwrap();
    assert_eq!(back, st);
}
