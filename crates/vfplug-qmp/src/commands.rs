//! One type per QMP command: the struct is the arguments, [`Command::NAME`] the wire name and
//! [`Command::Output`] the decoded `return`. [`crate::Qmp::call`] sends any of them.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use crate::wire::{QemuVersion, VersionInfo};

/// A QMP command.
pub trait Command: Serialize {
    /// Wire name, e.g. `device_del`.
    const NAME: &'static str;
    /// False for commands without arguments (QEMU wants no `arguments` key rather than `{}`
    /// for some commands; omitting it is always accepted).
    const HAS_ARGS: bool = true;
    /// Decoded `return` value.
    type Output: DeserializeOwned;
}

/// The empty `{}` many commands return.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}

/// `qmp_capabilities`: leaves negotiation mode. We enable no capability (no OOB).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QmpCapabilities {}
impl Command for QmpCapabilities {
    const NAME: &'static str = "qmp_capabilities";
    const HAS_ARGS: bool = false;
    type Output = Empty;
}

/// A scalar `device_add` property value (free-form driver properties are all scalars).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum PropValue {
    /// A string property.
    Str(String),
    /// An integer property.
    Int(i64),
    /// A boolean property.
    Bool(bool),
}

impl From<&str> for PropValue {
    fn from(v: &str) -> Self {
        Self::Str(v.to_owned())
    }
}
impl From<String> for PropValue {
    fn from(v: String) -> Self {
        Self::Str(v)
    }
}
impl From<i64> for PropValue {
    fn from(v: i64) -> Self {
        Self::Int(v)
    }
}
impl From<bool> for PropValue {
    fn from(v: bool) -> Self {
        Self::Bool(v)
    }
}

/// `device_add`. Build with [`DeviceAdd::vfio_pci`] or [`DeviceAdd::new`] and the builder methods.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceAdd {
    /// Driver, e.g. `vfio-pci`.
    pub driver: String,
    /// qdev id; also the name under `/machine/peripheral` and in `DEVICE_DELETED`.
    pub id: String,
    /// Parent bus, e.g. a `pcie-root-port` id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bus: Option<String>,
    /// Slot/function on the bus, e.g. `0x0`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
    /// vfio-pci: host PCI address, e.g. `0000:01:10.0`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Other driver properties.
    #[serde(flatten)]
    pub props: BTreeMap<String, PropValue>,
}

impl DeviceAdd {
    /// A device of `driver` with qdev id `id`.
    pub fn new(driver: impl Into<String>, id: impl Into<String>) -> Self {
        Self {
            driver: driver.into(),
            id: id.into(),
            bus: None,
            addr: None,
            host: None,
            props: BTreeMap::new(),
        }
    }

    /// A vfio-pci passthrough of host device `host` (anything that prints as a PCI address, such
    /// as `vfplug_core::PciAddress` or `"0000:01:10.0"`) as `id` on `bus`, at `addr` if given.
    pub fn vfio_pci(
        host: impl fmt::Display,
        id: impl Into<String>,
        bus: impl Into<String>,
        addr: Option<&str>,
    ) -> Self {
        let mut dev = Self::new("vfio-pci", id).bus(bus);
        dev.host = Some(host.to_string());
        dev.addr = addr.map(str::to_owned);
        dev
    }

    /// Sets the parent bus.
    #[must_use]
    pub fn bus(mut self, bus: impl Into<String>) -> Self {
        self.bus = Some(bus.into());
        self
    }

    /// Sets the address on the bus.
    #[must_use]
    pub fn addr(mut self, addr: impl Into<String>) -> Self {
        self.addr = Some(addr.into());
        self
    }

    /// Adds a driver property (e.g. `netdev`, `mac`, `rombar`). Properties named like a field
    /// above are ignored by QEMU's parser only if duplicated, so do not use those names here.
    #[must_use]
    pub fn prop(mut self, name: impl Into<String>, value: impl Into<PropValue>) -> Self {
        self.props.insert(name.into(), value.into());
        self
    }
}

impl Command for DeviceAdd {
    const NAME: &'static str = "device_add";
    type Output = Empty;
}

/// `device_del`: asks the guest to release the device; completion is `DEVICE_DELETED`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceDel {
    /// qdev id or QOM path.
    pub id: String,
}
impl Command for DeviceDel {
    const NAME: &'static str = "device_del";
    type Output = Empty;
}

/// `qom-list`: the properties (and children) of a QOM object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QomList {
    /// QOM path, e.g. `/machine/peripheral`.
    pub path: String,
}
impl Command for QomList {
    const NAME: &'static str = "qom-list";
    type Output = Vec<ObjectProperty>;
}

/// One entry of `qom-list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectProperty {
    /// Property name; for children, the child's name (the qdev id under `/machine/peripheral`).
    pub name: String,
    /// Type, e.g. `child<vfio-pci>`, `link<...>`, `string`.
    #[serde(rename = "type")]
    pub ty: String,
    /// Description, if QEMU has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

impl ObjectProperty {
    /// True for `child<...>` entries (sub-objects, i.e. devices under `/machine/peripheral`).
    pub fn is_child(&self) -> bool {
        self.ty.starts_with("child<") && self.ty.ends_with('>')
    }
}

/// `query-memory-size-summary`: the guest's RAM (what a first VFIO device pins).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryMemorySizeSummary {}
impl Command for QueryMemorySizeSummary {
    const NAME: &'static str = "query-memory-size-summary";
    const HAS_ARGS: bool = false;
    type Output = MemorySizeSummary;
}

/// `query-memory-size-summary`'s result, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemorySizeSummary {
    /// Boot RAM.
    #[serde(rename = "base-memory")]
    pub base_memory: u64,
    /// Hot-plugged DIMMs (absent when the machine has none).
    #[serde(rename = "plugged-memory", default)]
    pub plugged_memory: Option<u64>,
}

impl MemorySizeSummary {
    /// All guest RAM.
    pub fn total(&self) -> u64 {
        self.base_memory
            .saturating_add(self.plugged_memory.unwrap_or(0))
    }
}

/// `query-status`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryStatus {}
impl Command for QueryStatus {
    const NAME: &'static str = "query-status";
    const HAS_ARGS: bool = false;
    type Output = StatusInfo;
}

/// `query-status`'s result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    /// True if the vCPUs run.
    pub running: bool,
    /// Run state.
    pub status: RunState,
}

/// QEMU's run state (`RunState` in qapi/run-state.json). Unknown states are kept verbatim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum RunState {
    /// `prelaunch`: started with `-S`, firmware has not run.
    Prelaunch,
    /// `running`.
    Running,
    /// `paused`.
    Paused,
    /// `shutdown`.
    Shutdown,
    /// `inmigrate`.
    InMigrate,
    /// `postmigrate`.
    PostMigrate,
    /// `internal-error`.
    InternalError,
    /// `guest-panicked`.
    GuestPanicked,
    /// Anything else.
    Other(String),
}

impl From<String> for RunState {
    fn from(s: String) -> Self {
        match s.as_str() {
            "prelaunch" => Self::Prelaunch,
            "running" => Self::Running,
            "paused" => Self::Paused,
            "shutdown" => Self::Shutdown,
            "inmigrate" => Self::InMigrate,
            "postmigrate" => Self::PostMigrate,
            "internal-error" => Self::InternalError,
            "guest-panicked" => Self::GuestPanicked,
            _ => Self::Other(s),
        }
    }
}

impl From<RunState> for String {
    fn from(s: RunState) -> Self {
        match s {
            RunState::Prelaunch => "prelaunch".into(),
            RunState::Running => "running".into(),
            RunState::Paused => "paused".into(),
            RunState::Shutdown => "shutdown".into(),
            RunState::InMigrate => "inmigrate".into(),
            RunState::PostMigrate => "postmigrate".into(),
            RunState::InternalError => "internal-error".into(),
            RunState::GuestPanicked => "guest-panicked".into(),
            RunState::Other(s) => s,
        }
    }
}

/// `system_reset`. Completes all pending unplugs.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct SystemReset {}
impl Command for SystemReset {
    const NAME: &'static str = "system_reset";
    const HAS_ARGS: bool = false;
    type Output = Empty;
}

/// `query-version`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryVersion {}
impl Command for QueryVersion {
    const NAME: &'static str = "query-version";
    const HAS_ARGS: bool = false;
    type Output = VersionInfo;
}

/// `query-pci`. Its raw result is a tree; [`crate::Qmp::query_pci`] flattens it.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryPci {}
impl Command for QueryPci {
    const NAME: &'static str = "query-pci";
    const HAS_ARGS: bool = false;
    type Output = Vec<PciInfoWire>;
}

/// `query-pci` wire: one root bus.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PciInfoWire {
    /// Root bus number.
    pub bus: i64,
    /// Devices on it.
    #[serde(default)]
    pub devices: Vec<PciDeviceInfoWire>,
}

/// `query-pci` wire: one device, possibly a bridge with devices behind it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PciDeviceInfoWire {
    /// Bus number.
    pub bus: i64,
    /// Slot.
    pub slot: i64,
    /// Function.
    pub function: i64,
    /// Class.
    pub class_info: PciClassWire,
    /// Vendor/device ids.
    pub id: PciIdsWire,
    /// qdev id, empty when the device has none.
    #[serde(default)]
    pub qdev_id: String,
    /// Bridge information, for bridges and root ports.
    #[serde(default)]
    pub pci_bridge: Option<PciBridgeWire>,
}

/// `query-pci` wire: class.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PciClassWire {
    /// Class code, e.g. 0x200 for Ethernet.
    pub class: i64,
    /// Description, e.g. `Ethernet controller`.
    #[serde(default)]
    pub desc: Option<String>,
}

/// `query-pci` wire: ids.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PciIdsWire {
    /// Vendor id.
    pub vendor: i64,
    /// Device id.
    pub device: i64,
}

/// `query-pci` wire: bridge.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PciBridgeWire {
    /// Bus numbers behind the bridge.
    pub bus: PciBridgeBusWire,
    /// Devices behind the bridge.
    #[serde(default)]
    pub devices: Vec<PciDeviceInfoWire>,
}

/// `query-pci` wire: bridge bus numbers (0 before firmware assigned them).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PciBridgeBusWire {
    /// Bus of the bridge itself.
    pub number: i64,
    /// First bus behind it.
    pub secondary: i64,
    /// Last bus behind it.
    pub subordinate: i64,
}

/// One PCI device from `query-pci`, with bridges walked and flattened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciDeviceInfo {
    /// Guest bus number.
    pub bus: i64,
    /// Slot.
    pub slot: i64,
    /// Function.
    pub function: i64,
    /// PCI class code.
    pub class: i64,
    /// Class description, if QEMU gave one.
    pub class_desc: Option<String>,
    /// Vendor id.
    pub vendor: i64,
    /// Device id.
    pub device: i64,
    /// qdev id (`None` when empty).
    pub qdev_id: Option<String>,
    /// For bridges: the secondary bus number behind it.
    pub secondary_bus: Option<i64>,
    /// qdev id of the bridge this device sits behind (`None` on a root bus or if the bridge has
    /// no id).
    pub parent_bridge: Option<String>,
}

/// Flattens `query-pci`'s tree (root buses, bridges, devices behind bridges) into a list in
/// depth-first order. Devices behind root ports only appear after firmware assigned bus
/// numbers; use `qom-list` ([`crate::Qmp::peripheral_ids`]) for presence checks.
pub fn flatten_pci(buses: &[PciInfoWire]) -> Vec<PciDeviceInfo> {
    fn walk(devs: &[PciDeviceInfoWire], parent: Option<&str>, out: &mut Vec<PciDeviceInfo>) {
        for d in devs {
            let qdev_id = (!d.qdev_id.is_empty()).then(|| d.qdev_id.clone());
            out.push(PciDeviceInfo {
                bus: d.bus,
                slot: d.slot,
                function: d.function,
                class: d.class_info.class,
                class_desc: d.class_info.desc.clone(),
                vendor: d.id.vendor,
                device: d.id.device,
                qdev_id: qdev_id.clone(),
                secondary_bus: d.pci_bridge.as_ref().map(|b| b.bus.secondary),
                parent_bridge: parent.map(str::to_owned),
            });
            if let Some(bridge) = &d.pci_bridge {
                walk(&bridge.devices, qdev_id.as_deref(), out);
            }
        }
    }
    let mut out = Vec::new();
    for bus in buses {
        walk(&bus.devices, None, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn vfio_pci_serializes_like_qemu_expects() {
        let dev = DeviceAdd::vfio_pci("0000:01:10.0", "hostdev0", "rp1", Some("0x0"));
        assert_eq!(
            serde_json::to_value(&dev).unwrap(),
            json!({"driver": "vfio-pci", "id": "hostdev0", "bus": "rp1", "addr": "0x0",
                   "host": "0000:01:10.0"})
        );
        let dev = DeviceAdd::new("virtio-net-pci", "n1")
            .bus("rp2")
            .prop("netdev", "nd1")
            .prop("rombar", 0)
            .prop("failover", true);
        assert_eq!(
            serde_json::to_value(&dev).unwrap(),
            json!({"driver": "virtio-net-pci", "id": "n1", "bus": "rp2", "netdev": "nd1",
                   "rombar": 0, "failover": true})
        );
    }

    #[test]
    fn run_state_round_trips_and_keeps_unknown() {
        let s: StatusInfo =
            serde_json::from_value(json!({"running": false, "status": "prelaunch"})).unwrap();
        assert_eq!(s.status, RunState::Prelaunch);
        let s: StatusInfo = serde_json::from_value(
            json!({"running": false, "status": "colo", "singlestep": false}),
        )
        .unwrap();
        assert_eq!(s.status, RunState::Other("colo".into()));
        assert_eq!(
            serde_json::to_value(RunState::InternalError).unwrap(),
            json!("internal-error")
        );
    }

    #[test]
    fn flattens_pci_tree_through_bridges() {
        let raw = json!([{"bus": 0, "devices": [
            {"bus": 0, "slot": 0, "function": 0, "class_info": {"class": 1536, "desc": "Host bridge"},
             "id": {"vendor": 32902, "device": 10688}, "qdev_id": "", "regions": []},
            {"bus": 0, "slot": 2, "function": 0, "class_info": {"class": 1540, "desc": "PCI bridge"},
             "id": {"vendor": 6966, "device": 12}, "qdev_id": "rp1", "regions": [],
             "pci_bridge": {"bus": {"number": 0, "secondary": 1, "subordinate": 2,
                 "io_range": {"base": 0, "limit": 0}},
               "devices": [
                {"bus": 1, "slot": 0, "function": 0, "class_info": {"class": 1540},
                 "id": {"vendor": 6966, "device": 12}, "qdev_id": "br1",
                 "pci_bridge": {"bus": {"number": 1, "secondary": 2, "subordinate": 2}, "devices": [
                    {"bus": 2, "slot": 0, "function": 0, "class_info": {"class": 512, "desc": "Ethernet controller"},
                     "id": {"vendor": 32902, "device": 4298}, "qdev_id": "hostdev0", "irq_pin": 1}
                 ]}}
               ]}}
        ]}]);
        let wire: Vec<PciInfoWire> = serde_json::from_value(raw).unwrap();
        let flat = flatten_pci(&wire);
        let ids: Vec<_> = flat.iter().map(|d| d.qdev_id.as_deref()).collect();
        assert_eq!(ids, vec![None, Some("rp1"), Some("br1"), Some("hostdev0")]);
        let vf = &flat[3];
        assert_eq!((vf.bus, vf.slot, vf.function), (2, 0, 0));
        assert_eq!((vf.vendor, vf.device), (0x8086, 0x10ca));
        assert_eq!(vf.parent_bridge.as_deref(), Some("br1"));
        assert_eq!(flat[1].secondary_bus, Some(1));
        assert_eq!(flat[0].parent_bridge, None);
    }

    #[test]
    fn child_properties() {
        let p = ObjectProperty {
            name: "hostdev0".into(),
            ty: "child<vfio-pci>".into(),
            description: None,
        };
        assert!(p.is_child());
        let p = ObjectProperty {
            name: "type".into(),
            ty: "string".into(),
            description: None,
        };
        assert!(!p.is_child());
    }
}
