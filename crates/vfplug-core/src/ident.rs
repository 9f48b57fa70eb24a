//! Typed identities: which pod holds a VF, and which VM a hostdev went into.
//!
//! The ledger used to keep the pod as one string ("namespace/name", or a UID when the runtime
//! did not say the name). Recovery (which QEMU to ask after a crash) and the controller
//! (ownerReferences need the UID; PodResources names pods by namespace/name) need both halves,
//! so a [`PodRef`] carries all three fields and old logs' strings still deserialize.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

/// A pod, as far as vfplugd was told: namespace and name (from `K8S_POD_NAMESPACE` /
/// `K8S_POD_NAME`, or PodResources) and UID (`K8S_POD_UID`). Any field may be empty when the
/// caller did not know it.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PodRef {
    /// Namespace (empty when unknown).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    /// Name (empty when unknown).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// UID (empty when unknown).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
}

impl PodRef {
    /// A pod known by namespace and name (and maybe UID).
    pub fn new(
        namespace: impl Into<String>,
        name: impl Into<String>,
        uid: impl Into<String>,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            uid: uid.into(),
        }
    }

    /// Parses the ledger's old one-string form: `namespace/name`, else a UID.
    pub fn from_legacy(s: &str) -> Self {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() => Self::new(ns, name, ""),
            _ => Self::new("", "", s),
        }
    }

    /// `namespace/name`, as PodResources names pods, when both are known.
    pub fn key(&self) -> Option<String> {
        (!self.namespace.is_empty() && !self.name.is_empty())
            .then(|| format!("{}/{}", self.namespace, self.name))
    }

    /// Whether this is the pod PodResources calls `key` (`namespace/name`). A pod known only by
    /// UID matches a key equal to its UID (how older ledgers named it).
    pub fn is_key(&self, key: &str) -> bool {
        match self.key() {
            Some(k) => k == key,
            None => !self.uid.is_empty() && self.uid == key,
        }
    }

    /// Whether two references can be the same pod: equal UIDs when both have one, else equal
    /// namespace/name when both have them.
    pub fn same_pod(&self, other: &PodRef) -> bool {
        if !self.uid.is_empty() && !other.uid.is_empty() {
            return self.uid == other.uid;
        }
        match (self.key(), other.key()) {
            (Some(a), Some(b)) => a == b,
            _ => false,
        }
    }
}

impl fmt::Display for PodRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.key(), self.uid.is_empty()) {
            (Some(k), true) => f.write_str(&k),
            (Some(k), false) => write!(f, "{k}({})", self.uid),
            (None, false) => f.write_str(&self.uid),
            (None, true) => f.write_str("?"),
        }
    }
}

impl From<&str> for PodRef {
    fn from(s: &str) -> Self {
        Self::from_legacy(s)
    }
}

impl From<String> for PodRef {
    fn from(s: String) -> Self {
        Self::from_legacy(&s)
    }
}

impl<'de> Deserialize<'de> for PodRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Wire {
            Legacy(String),
            Typed {
                #[serde(default)]
                namespace: String,
                #[serde(default)]
                name: String,
                #[serde(default)]
                uid: String,
            },
        }
        Ok(match Wire::deserialize(d)? {
            Wire::Legacy(s) => Self::from_legacy(&s),
            Wire::Typed {
                namespace,
                name,
                uid,
            } => Self {
                namespace,
                name,
                uid,
            },
        })
    }
}

/// The VM a hostdev goes into: the pod that runs its QEMU and the QMP socket that drives it.
/// Recorded from the first attach step, so recovery after a crash knows which QEMU to ask.
/// (Pre-typed logs held one string, the QMP socket; it still reads.)
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct VmRef {
    /// The VM pod.
    pub pod: PodRef,
    /// The QMP socket's path on the host, as resolved when the attach began.
    pub qmp_socket: String,
    /// The socket as the pod named it (`<volume>/<file>` below its volume dir), to resolve it
    /// again (never following symlinks) on every reconnect.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub qmp_spec: String,
}

impl<'de> Deserialize<'de> for VmRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Wire {
            Legacy(String),
            Typed {
                #[serde(default)]
                pod: PodRef,
                #[serde(default)]
                qmp_socket: String,
                #[serde(default)]
                qmp_spec: String,
            },
        }
        Ok(match Wire::deserialize(d)? {
            Wire::Legacy(s) => Self {
                pod: PodRef::default(),
                qmp_socket: s,
                qmp_spec: String::new(),
            },
            Wire::Typed {
                pod,
                qmp_socket,
                qmp_spec,
            } => Self {
                pod,
                qmp_socket,
                qmp_spec,
            },
        })
    }
}

/// Reads a VM field that older logs may hold as `null` (a detach of an attach that never
/// completed).
pub(crate) fn vm_or_null<'de, D: Deserializer<'de>>(d: D) -> Result<VmRef, D::Error> {
    Ok(Option::<VmRef>::deserialize(d)?.unwrap_or_default())
}

impl fmt::Display for VmRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.pod, self.qmp_socket)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn legacy_strings_and_typed_records_both_read() {
        let a: PodRef = serde_json::from_str(r#""ns/vm-a""#).unwrap();
        assert_eq!(a, PodRef::new("ns", "vm-a", ""));
        let b: PodRef = serde_json::from_str(r#""0f1e-uid""#).unwrap();
        assert_eq!(b, PodRef::new("", "", "0f1e-uid"));
        let c: PodRef =
            serde_json::from_str(r#"{"namespace":"ns","name":"vm-a","uid":"u1"}"#).unwrap();
        assert_eq!(c, PodRef::new("ns", "vm-a", "u1"));
        let back: PodRef = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn matching_prefers_uid_then_name() {
        let full = PodRef::new("ns", "a", "u1");
        assert!(full.is_key("ns/a"));
        assert!(!full.is_key("ns/b"));
        assert!(full.same_pod(&PodRef::new("ns", "a", "")));
        // Same name, different UIDs: a recreated pod is another pod.
        assert!(!full.same_pod(&PodRef::new("ns", "a", "u2")));
        assert!(PodRef::from_legacy("u9").is_key("u9"));
        assert_eq!(full.to_string(), "ns/a(u1)");
    }
}
