//! The `Domain` custom resource (`vfplug.io/v1alpha1`, namespaced, one per VM pod; DESIGN.md §5):
//! its Rust types, the CRD generated from them ([`crd_yaml`], checked in as
//! `deploy/crds/domains.vfplug.io.yaml`; a test fails when the two drift), and its status
//! projected from vfplugd's per-VM records ([`DomainStatus::from_records`]), which are themselves
//! projections of the ledger (`vfplug_core::records`).
//!
//! Start at [`DomainSpec`] (what the user wants on the running VM) and [`DomainStatus`] (the VM's
//! `nets` and `hostdevs`, as libvirt keeps them). No I/O here: the controller that creates
//! Domains and applies their status (issue 10) is an adapter on top.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use vfplug_core::records::{self, VmRecords};

/// What the user wants on the running VM: its VF networks. The controller attaches what is
/// added and detaches what is removed, through vfplugd's executor.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "vfplug.io",
    version = "v1alpha1",
    kind = "Domain",
    namespaced,
    status = "DomainStatus",
    shortname = "dom",
    category = "vfplug",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase","description":"The least settled phase of the VM's VFs"}"#,
    printcolumn = r#"{"name":"Nets","type":"integer","jsonPath":".status.netCount"}"#,
    printcolumn = r#"{"name":"Hostdevs","type":"integer","jsonPath":".status.hostdevCount"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct DomainSpec {
    /// The VF networks wanted on the VM, by interface name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<NetSpec>,
}

/// One VF network wanted on the VM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetSpec {
    /// Interface name in the pod's view (`net1`); it names the attachment and the QEMU device
    /// (`vfplug-<name>`).
    pub name: String,
    /// The NetworkAttachmentDefinition of a vfplug network (`[namespace/]name`; the Domain's
    /// namespace when none is given).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub network: String,
    /// An inline vfplug network config (JSON, as a NetworkAttachmentDefinition's
    /// `spec.config`), instead of `network`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
}

/// Where a VM's VF is. DESIGN.md §5 spells the unplug phase `unplugPending`; the node API and
/// vfplugctl say `unplug-pending` for the same phase.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum Phase {
    /// Recorded for the VM; the device is not being added yet (QEMU not running yet, or the ADD
    /// under way).
    Pending,
    /// `device_add` sent, not verified yet.
    Attaching,
    /// In the guest, verified.
    Attached,
    /// `device_del` sent; the guest has not acknowledged yet.
    UnplugPending,
    /// The guest refused the unplug; the device stays in.
    GuestError,
    /// Out of the guest; the VF's settings being restored (the net stays until it is Free).
    Releasing,
}

impl From<records::Phase> for Phase {
    fn from(p: records::Phase) -> Self {
        match p {
            records::Phase::Pending => Self::Pending,
            records::Phase::Attaching => Self::Attaching,
            records::Phase::Attached => Self::Attached,
            records::Phase::UnplugPending => Self::UnplugPending,
            records::Phase::GuestError => Self::GuestError,
            records::Phase::Releasing => Self::Releasing,
        }
    }
}

/// The device behind a net: always a hostdev (the VF), by PCI address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ActualDevice {
    /// `hostdev`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The VF on the host.
    pub pci_address: String,
}

/// One VF network of the VM (libvirt's `<interface type='hostdev'>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetStatus {
    /// Interface name.
    pub name: String,
    /// The CNI network.
    pub network: String,
    /// The VF's pool (device-plugin resource), if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Administrative MAC set through the PF.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// VLAN set through the PF.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<u16>,
    /// The VF behind it.
    pub actual: ActualDevice,
    /// Its phase.
    pub phase: Phase,
}

/// One VF in (or on its way into or out of) the guest (libvirt's `<hostdev>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostdevStatus {
    /// QEMU device id, once the attach began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    /// The VF.
    pub pci_address: String,
    /// The net it belongs to.
    pub parent_net: String,
    /// Where the guest sees it (not known to vfplugd yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_address: Option<String>,
    /// Its phase.
    pub phase: Phase,
    /// Why the guest refused the unplug, or why an owed hot-plug failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The VM's VFs as vfplugd's ledger has them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DomainStatus {
    /// The VF networks.
    #[serde(default)]
    pub nets: Vec<NetStatus>,
    /// The VFs in, or on their way into or out of, the guest.
    #[serde(default)]
    pub hostdevs: Vec<HostdevStatus>,
    /// `nets.len()`, for `kubectl get` (printer columns cannot count).
    #[serde(default)]
    pub net_count: u32,
    /// `hostdevs.len()`, for `kubectl get`.
    #[serde(default)]
    pub hostdev_count: u32,
    /// The least settled phase of the VM's VFs (none: no VF).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Standard conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The spec generation this status reflects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl Phase {
    /// How far from settled (larger: needs a look first), for the summary phase.
    fn unsettled(self) -> u8 {
        match self {
            Self::Attached => 0,
            Self::Releasing => 1,
            Self::Pending => 2,
            Self::Attaching => 3,
            Self::UnplugPending => 4,
            Self::GuestError => 5,
        }
    }
}

impl DomainStatus {
    /// The status of the VM whose records vfplugd holds (`None`: it has no VF), conditions and
    /// observed generation left to the controller. One VF, one lease: each net's hostdev names
    /// it, so the two lists cannot disagree.
    pub fn from_records(r: Option<&VmRecords>) -> Self {
        let Some(r) = r else {
            return Self::default();
        };
        let nets: Vec<NetStatus> = r
            .nets
            .iter()
            .map(|n| NetStatus {
                name: n.name.clone(),
                network: n.network.clone(),
                pool: n.pool.clone(),
                mac: n.mac.map(|m| m.to_string()),
                vlan: n.vlan,
                actual: ActualDevice {
                    kind: "hostdev".into(),
                    pci_address: n.actual.pci_address.to_string(),
                },
                phase: n.phase.into(),
            })
            .collect();
        let hostdevs: Vec<HostdevStatus> = r
            .hostdevs
            .iter()
            .map(|h| HostdevStatus {
                alias: h.alias.clone(),
                pci_address: h.pci_address.to_string(),
                parent_net: h.parent_net.clone(),
                guest_address: None,
                phase: h.phase.into(),
                reason: h.reason.clone(),
            })
            .collect();
        let phase = nets
            .iter()
            .map(|n| n.phase)
            .chain(hostdevs.iter().map(|h| h.phase))
            .max_by_key(|p| p.unsettled());
        Self {
            net_count: u32::try_from(nets.len()).unwrap_or(u32::MAX),
            hostdev_count: u32::try_from(hostdevs.len()).unwrap_or(u32::MAX),
            nets,
            hostdevs,
            phase,
            conditions: Vec::new(),
            observed_generation: None,
        }
    }
}

/// The CRD of [`Domain`] as YAML, as checked in under `deploy/crds/domains.vfplug.io.yaml`.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt as _;
    let crd = Domain::crd();
    let mut out = String::from(
        "# Generated from crates/vfplug-crd (the Domain types); do not edit.\n\
         # Regenerate: VFPLUG_BLESS=1 cargo test -p vfplug-crd --test crd\n",
    );
    out.push_str(&serde_yaml::to_string(&crd)?);
    Ok(out)
}

/// The printer columns, by name, as `kubectl get domains` shows them (for docs and tests).
pub fn printer_columns() -> BTreeMap<String, String> {
    use kube::CustomResourceExt as _;
    Domain::crd()
        .spec
        .versions
        .iter()
        .flat_map(|v| v.additional_printer_columns.iter().flatten())
        .map(|c| (c.name.clone(), c.json_path.clone()))
        .collect()
}
