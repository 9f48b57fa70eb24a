//! What a CNI attachment asks of a VF, and what vfplug remembers about it so that DEL, CHECK and
//! GC can work from the ledger alone (no CNI cache files, no netns needed).
//!
//! [`VfConfig`] holds the settings applied through the PF (sriov-cni's `mac`, `vlan`, `vlanQoS`,
//! `vlanProto`, `spoofchk`, `trust`, `link_state`, `min_tx_rate`, `max_tx_rate`); its
//! [`VfConfig::validate`] names the offending field. [`CniAttachment`] is stored in the VF's
//! [`Lease`](crate::Lease) by `Reserved → Configured`, *before* vfplugd touches the VF, so a
//! crash at any point leaves enough in the ledger to put everything back.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ledger::VfLinkState;

/// A MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct MacAddr(pub [u8; 6]);

/// Why a string is not a MAC address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid MAC address {0:?} (expected six hex bytes, e.g. 02:00:00:aa:bb:cc)")]
pub struct MacAddrError(pub String);

impl MacAddr {
    /// All zero: "no administrative MAC".
    pub const ZERO: Self = Self([0; 6]);

    /// Whether all bytes are zero.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 6]
    }

    /// Whether the group (multicast) bit is set; such a MAC cannot be a VF's.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }
}

impl FromStr for MacAddr {
    type Err = MacAddrError;

    /// `aa:bb:cc:dd:ee:ff` or `aa-bb-cc-dd-ee-ff`, either case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || MacAddrError(s.to_owned());
        let parts: Vec<&str> = s.split([':', '-']).collect();
        if parts.len() != 6 {
            return Err(err());
        }
        let mut out = [0u8; 6];
        for (o, p) in out.iter_mut().zip(parts) {
            if p.len() != 2 {
                return Err(err());
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| err())?;
        }
        Ok(Self(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// VLAN protocol of a VF VLAN (`ip link set <pf> vf N vlan V proto ...`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum VlanProto {
    /// 802.1Q (0x8100), the default.
    #[default]
    #[serde(rename = "802.1q")]
    Dot1Q,
    /// 802.1ad (0x88a8), QinQ service tag.
    #[serde(rename = "802.1ad")]
    Dot1Ad,
}

impl VlanProto {
    /// The ethertype.
    pub fn ethertype(self) -> u16 {
        match self {
            Self::Dot1Q => 0x8100,
            Self::Dot1Ad => 0x88a8,
        }
    }

    /// The protocol of an ethertype, if it is one of the two.
    pub fn from_ethertype(t: u16) -> Option<Self> {
        match t {
            0x8100 => Some(Self::Dot1Q),
            0x88a8 => Some(Self::Dot1Ad),
            _ => None,
        }
    }
}

impl FromStr for VlanProto {
    type Err = String;

    /// `802.1q` / `802.1Q` / `802.1ad` / `802.1AD`, as sriov-cni accepts.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "802.1q" => Ok(Self::Dot1Q),
            "802.1ad" => Ok(Self::Dot1Ad),
            _ => Err(format!("{s:?} is not a VLAN protocol (802.1q or 802.1ad)")),
        }
    }
}

impl fmt::Display for VlanProto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Dot1Q => "802.1q",
            Self::Dot1Ad => "802.1ad",
        })
    }
}

impl FromStr for VfLinkState {
    type Err = String;

    /// `auto`, `enable`, `disable` (sriov-cni's `link_state`).
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "enable" => Ok(Self::Enable),
            "disable" => Ok(Self::Disable),
            _ => Err(format!(
                "{s:?} is not a link state (auto, enable or disable)"
            )),
        }
    }
}

impl fmt::Display for VfLinkState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Enable => "enable",
            Self::Disable => "disable",
        })
    }
}

/// Settings an attachment asks for. `None` leaves a setting as the VF has it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VfConfig {
    /// Administrative MAC through the PF (and the pod netdev's MAC in netdev mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
    /// VLAN ID, 0..=4094 (0 clears the VLAN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<u16>,
    /// VLAN QoS (PCP), 0..=7; needs a non-zero `vlan`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan_qos: Option<u8>,
    /// VLAN protocol; needs a non-zero `vlan`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan_proto: Option<VlanProto>,
    /// Spoof checking.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spoofchk: Option<bool>,
    /// Trusted VF.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust: Option<bool>,
    /// Link state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_state: Option<VfLinkState>,
    /// Minimum TX rate, Mbit/s (0 = none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_tx_rate: Option<u32>,
    /// Maximum TX rate, Mbit/s (0 = none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tx_rate: Option<u32>,
    /// MTU of the pod netdev (netdev mode only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

/// A [`VfConfig`] field that is out of range, named as sriov-cni's config key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct VfConfigError {
    /// The config key (`vlan`, `vlanQoS`, `vlanProto`, `mac`, `min_tx_rate`, `max_tx_rate`, `mtu`).
    pub field: &'static str,
    /// What is wrong.
    pub message: String,
}

impl VfConfig {
    /// Checks ranges and combinations. Field names are sriov-cni's config keys.
    pub fn validate(&self) -> Result<(), VfConfigError> {
        let err = |field, message: String| Err(VfConfigError { field, message });
        if let Some(v) = self.vlan
            && v > 4094
        {
            return err("vlan", format!("{v} is out of range 0..=4094"));
        }
        let vlan = self.vlan.unwrap_or(0);
        if let Some(q) = self.vlan_qos {
            if q > 7 {
                return err("vlanQoS", format!("{q} is out of range 0..=7"));
            }
            if q != 0 && vlan == 0 {
                return err("vlanQoS", "needs a non-zero vlan".to_owned());
            }
        }
        if let Some(p) = self.vlan_proto
            && p != VlanProto::Dot1Q
            && vlan == 0
        {
            return err("vlanProto", format!("{p} needs a non-zero vlan"));
        }
        if let Some(m) = self.mac {
            if m.is_zero() {
                return err(
                    "mac",
                    "00:00:00:00:00:00 cannot be a VF's address".to_owned(),
                );
            }
            if m.is_multicast() {
                return err("mac", format!("{m} is a multicast address"));
            }
        }
        if let (Some(min), Some(max)) = (self.min_tx_rate, self.max_tx_rate)
            && max != 0
            && min > max
        {
            return err(
                "min_tx_rate",
                format!("{min} is above max_tx_rate {max} (Mbit/s)"),
            );
        }
        if let Some(m) = self.mtu
            && !(68..=65535).contains(&m)
        {
            return err("mtu", format!("{m} is out of range 68..=65535"));
        }
        Ok(())
    }
}

/// How the VF reaches the workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// The VF's kernel netdev is moved into the pod's netns.
    #[default]
    Netdev,
    /// The VF stays on vfio-pci (DPDK or a VM); no netns work.
    Vfio,
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Netdev => "netdev",
            Self::Vfio => "vfio",
        })
    }
}

/// A netdev's identity in the host netns before vfplug moved it, and its identity in the pod.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetdevPlacement {
    /// Name in the host netns (restored on DEL).
    pub host_name: String,
    /// MAC it had in the host netns (restored on DEL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_mac: Option<MacAddr>,
    /// MTU it had in the host netns (restored on DEL).
    pub host_mtu: u32,
    /// Alternative names it had (removed before the move, put back on DEL).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub altnames: Vec<String>,
    /// Name in the pod (CNI_IFNAME).
    pub pod_ifname: String,
    /// MAC in the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_mac: Option<MacAddr>,
    /// MTU in the pod.
    pub pod_mtu: u32,
}

/// What a CNI ADD did to a VF, kept in its lease: enough for DEL, CHECK and GC without any cache.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniAttachment {
    /// The CNI network name (GC is scoped by it).
    pub network: String,
    /// CNI_NETNS at ADD.
    pub netns: String,
    /// Netdev or vfio.
    pub mode: AttachMode,
    /// The settings applied through the PF.
    pub config: VfConfig,
    /// Knobs of `config` the driver refused with EOPNOTSUPP and that were skipped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
    /// Netdev mode: where the netdev was and where it went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netdev: Option<NetdevPlacement>,
    /// Addresses applied in the pod (CIDR strings, from IPAM), for CHECK.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<String>,
    /// The delegated IPAM plugin's result (JSON, opaque to vfplugd), so that a repeated ADD is
    /// answered without allocating again.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ipam_result: String,
    /// Whether the ADD finished (settings applied, netdev placed). `false` from the write-ahead
    /// record until the ADD's last record: a restart undoes an ADD that never finished, as DEL
    /// would. Older logs lack the field; their attachments were complete.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub complete: bool,
    /// The VM the VF is for (a VM pod's network): after the ADD configured it, it is hot-plugged
    /// into that VM's QEMU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<crate::ident::VmRef>,
    /// A VM pod's ADD answered while its QEMU was not running yet (the runtime sets up a pod's
    /// networks before its containers start): the hot-plug is owed, and vfplugd does it as soon
    /// as the QMP socket answers, also after a restart. `false` while an ADD is still attaching
    /// by itself (a crash then undoes it), and for container pods.
    #[serde(default, skip_serializing_if = "is_false")]
    pub attach_pending: bool,
    /// Why the last try of an owed hot-plug failed; it is tried again when the VM's QEMU is
    /// reached anew (its QMP socket recreated, or vfplugd restarted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attach_error: Option<String>,
}

impl Default for CniAttachment {
    fn default() -> Self {
        Self {
            network: String::new(),
            netns: String::new(),
            mode: AttachMode::default(),
            config: VfConfig::default(),
            skipped: Vec::new(),
            netdev: None,
            ips: Vec::new(),
            ipam_result: String::new(),
            complete: true,
            vm: None,
            attach_pending: false,
            attach_error: None,
        }
    }
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An owed hot-plug survives a round trip through the log; records written before the
    /// fields existed read as "nothing owed", and the fields are left out when unset so that
    /// those records are written as before.
    #[test]
    fn an_owed_hotplug_is_kept_and_old_attachments_owe_nothing() {
        let owed = CniAttachment {
            attach_pending: true,
            attach_error: Some("no free hotplug slot".into()),
            ..CniAttachment::default()
        };
        let json = serde_json::to_string(&owed).unwrap();
        assert_eq!(serde_json::from_str::<CniAttachment>(&json).unwrap(), owed);
        let plain = serde_json::to_value(CniAttachment::default()).unwrap();
        assert!(plain.get("attach_pending").is_none() && plain.get("attach_error").is_none());
        let old: CniAttachment =
            serde_json::from_str(r#"{"network":"n","netns":"/ns","mode":"vfio","config":{}}"#)
                .unwrap();
        assert!(!old.attach_pending && old.attach_error.is_none() && old.complete);
    }

    #[test]
    fn mac_parses_and_prints() {
        let m: MacAddr = "02:AA:bb:0c:0D:ff".parse().unwrap();
        assert_eq!(m.to_string(), "02:aa:bb:0c:0d:ff");
        assert_eq!("02-aa-bb-0c-0d-ff".parse::<MacAddr>().unwrap(), m);
        for bad in [
            "",
            "02:aa:bb:0c:0d",
            "02:aa:bb:0c:0d:ff:00",
            "0g:aa:bb:0c:0d:ff",
            "2:aa:bb:0c:0d:ff0",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        let j = serde_json::to_string(&m).unwrap();
        assert_eq!(j, "\"02:aa:bb:0c:0d:ff\"");
        assert_eq!(serde_json::from_str::<MacAddr>(&j).unwrap(), m);
    }

    #[test]
    fn validation_names_the_field() {
        let cases: Vec<(VfConfig, &str)> = vec![
            (
                VfConfig {
                    vlan: Some(4095),
                    ..Default::default()
                },
                "vlan",
            ),
            (
                VfConfig {
                    vlan: Some(10),
                    vlan_qos: Some(8),
                    ..Default::default()
                },
                "vlanQoS",
            ),
            (
                VfConfig {
                    vlan_qos: Some(3),
                    ..Default::default()
                },
                "vlanQoS",
            ),
            (
                VfConfig {
                    vlan_proto: Some(VlanProto::Dot1Ad),
                    ..Default::default()
                },
                "vlanProto",
            ),
            (
                VfConfig {
                    mac: Some(MacAddr::ZERO),
                    ..Default::default()
                },
                "mac",
            ),
            (
                VfConfig {
                    mac: Some(MacAddr([1, 0, 0, 0, 0, 1])),
                    ..Default::default()
                },
                "mac",
            ),
            (
                VfConfig {
                    min_tx_rate: Some(200),
                    max_tx_rate: Some(100),
                    ..Default::default()
                },
                "min_tx_rate",
            ),
            (
                VfConfig {
                    mtu: Some(20),
                    ..Default::default()
                },
                "mtu",
            ),
        ];
        for (c, field) in cases {
            assert_eq!(c.validate().unwrap_err().field, field, "{c:?}");
        }
        let ok = VfConfig {
            mac: Some("02:00:00:00:00:01".parse().unwrap()),
            vlan: Some(100),
            vlan_qos: Some(5),
            vlan_proto: Some(VlanProto::Dot1Ad),
            spoofchk: Some(true),
            trust: Some(false),
            link_state: Some(VfLinkState::Auto),
            min_tx_rate: Some(10),
            max_tx_rate: Some(100),
            mtu: Some(9000),
        };
        assert_eq!(ok.validate(), Ok(()));
        assert_eq!(
            VfConfig {
                vlan: Some(0),
                vlan_qos: Some(0),
                ..Default::default()
            }
            .validate(),
            Ok(())
        );
    }

    #[test]
    fn enums_parse() {
        assert_eq!("802.1AD".parse::<VlanProto>().unwrap(), VlanProto::Dot1Ad);
        assert!("802.1x".parse::<VlanProto>().is_err());
        assert_eq!(VlanProto::from_ethertype(0x88a8), Some(VlanProto::Dot1Ad));
        assert_eq!(
            "disable".parse::<VfLinkState>().unwrap(),
            VfLinkState::Disable
        );
        assert!("on".parse::<VfLinkState>().is_err());
    }
}
