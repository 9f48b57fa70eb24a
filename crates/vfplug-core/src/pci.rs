//! PCI addresses (`domain:bus:device.function`), the key of everything vfplug tracks.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A PCI address such as `0000:3b:02.1`. Ordered by domain, bus, device, function, so a sorted
/// list of VFs is in PCI order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    /// PCI segment (domain), 16 bits in practice.
    pub domain: u32,
    /// Bus number.
    pub bus: u8,
    /// Device (slot), 0..=31.
    pub device: u8,
    /// Function, 0..=7.
    pub function: u8,
}

/// Why a string is not a PCI address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid PCI address {input:?}: {reason} (expected dddd:bb:dd.f, e.g. 0000:3b:02.1)")]
pub struct PciAddressError {
    /// What was given.
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl PciAddress {
    /// Builds an address, checking the device and function ranges.
    pub fn new(domain: u32, bus: u8, device: u8, function: u8) -> Option<Self> {
        (device < 32 && function < 8).then_some(Self {
            domain,
            bus,
            device,
            function,
        })
    }
}

impl FromStr for PciAddress {
    type Err = PciAddressError;

    /// Accepts the full form `0000:3b:02.1` and the short form `3b:02.1` (domain 0), hex digits
    /// in either case, as `lspci` and sysfs print them.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| PciAddressError {
            input: s.to_owned(),
            reason,
        };
        let (head, function) = s
            .rsplit_once('.')
            .ok_or_else(|| err("missing '.function'"))?;
        let mut parts = head.split(':').collect::<Vec<_>>();
        let (domain, bus, device) = match parts.len() {
            3 => (parts.remove(0), parts.remove(0), parts.remove(0)),
            2 => ("0", parts.remove(0), parts.remove(0)),
            _ => return Err(err("expected domain:bus:device.function")),
        };
        let hex = |p: &str, max_len: usize, what| {
            if p.is_empty() || p.len() > max_len || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
                Err(err(what))
            } else {
                u32::from_str_radix(p, 16).map_err(|_| err(what))
            }
        };
        let domain = hex(domain, 8, "bad domain")?;
        let bus = hex(bus, 2, "bad bus")? as u8;
        let device = hex(device, 2, "bad device")?;
        let function = hex(function, 1, "bad function")?;
        if device > 31 {
            return Err(err("device number above 0x1f"));
        }
        if function > 7 {
            return Err(err("function number above 7"));
        }
        Ok(Self {
            domain,
            bus,
            device: device as u8,
            function: function as u8,
        })
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

impl Serialize for PciAddress {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PciAddress {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_full_and_short_forms() {
        let a: PciAddress = "0000:3b:02.1".parse().unwrap();
        assert_eq!(a, PciAddress::new(0, 0x3b, 2, 1).unwrap());
        assert_eq!("3B:02.1".parse::<PciAddress>().unwrap(), a);
        assert_eq!(a.to_string(), "0000:3b:02.1");
    }

    #[test]
    fn rejects_bad_input_with_reason() {
        for bad in [
            "",
            "0000:3b:02",
            "0000:3b:20.1",
            "0000:3b:02.8",
            "zz:02.1",
            "0:0:0:0.0",
            "0000:3b:02.1 ",
        ] {
            let e = bad.parse::<PciAddress>().unwrap_err();
            assert!(e.to_string().contains("invalid PCI address"), "{bad}: {e}");
        }
    }

    proptest! {
        #[test]
        fn display_parse_roundtrip(d in 0u32..0x10000, b: u8, dev in 0u8..32, f in 0u8..8) {
            let a = PciAddress::new(d, b, dev, f).unwrap();
            prop_assert_eq!(a.to_string().parse::<PciAddress>().unwrap(), a);
        }
    }
}
