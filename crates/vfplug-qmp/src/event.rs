//! Typed QMP events. Only the events the detach saga acts on get their own variant; everything
//! else is kept as [`Event::Other`] with its raw data.

use serde::Deserialize;
use serde_json::Value;

/// The QOM path under which `device_add` puts devices with an `id`.
pub const PERIPHERAL_PATH: &str = "/machine/peripheral";

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// `DEVICE_DELETED`: the device is gone from the guest; its id may be reused. Also emitted
    /// for child objects, without `device` (e.g. `/machine/peripheral/n1/virtio-backend`).
    DeviceDeleted {
        /// The device id, present only if the device had one.
        device: Option<String>,
        /// QOM path.
        path: String,
    },
    /// `DEVICE_UNPLUG_GUEST_ERROR` (QEMU >= 6.2): the guest refused the unplug; the device stays.
    DeviceUnplugGuestError {
        /// The device id, if any.
        device: Option<String>,
        /// QOM path.
        path: String,
    },
    /// `SHUTDOWN`.
    Shutdown {
        /// True if the guest asked for it.
        guest: bool,
        /// QEMU's reason, e.g. `host-qmp-quit`, `guest-shutdown`.
        reason: String,
    },
    /// `RESET`. A reset completes all pending unplugs (QEMU emits `DEVICE_DELETED` for each).
    Reset {
        /// True if the guest asked for it.
        guest: bool,
        /// QEMU's reason, e.g. `host-qmp-system-reset`.
        reason: String,
    },
    /// Any other event, or one of the above whose data did not match its schema.
    Other {
        /// Event name.
        name: String,
        /// Raw data, if any.
        data: Option<Value>,
    },
}

#[derive(Deserialize)]
struct DeviceData {
    device: Option<String>,
    path: String,
}

#[derive(Deserialize)]
struct ReasonData {
    #[serde(default)]
    guest: bool,
    #[serde(default)]
    reason: String,
}

impl Event {
    /// Builds an event from its wire name and data. Never fails: anything unexpected becomes
    /// [`Event::Other`].
    pub fn from_parts(name: &str, data: Option<&Value>) -> Self {
        let device = || data.and_then(|d| DeviceData::deserialize(d).ok());
        // SHUTDOWN/RESET data is optional in old QEMUs; default to empty.
        let reason = || match data {
            None => Some(ReasonData {
                guest: false,
                reason: String::new(),
            }),
            Some(d) => ReasonData::deserialize(d).ok(),
        };
        let typed = match name {
            "DEVICE_DELETED" => device().map(|d| Self::DeviceDeleted {
                device: d.device,
                path: d.path,
            }),
            "DEVICE_UNPLUG_GUEST_ERROR" => device().map(|d| Self::DeviceUnplugGuestError {
                device: d.device,
                path: d.path,
            }),
            "SHUTDOWN" => reason().map(|r| Self::Shutdown {
                guest: r.guest,
                reason: r.reason,
            }),
            "RESET" => reason().map(|r| Self::Reset {
                guest: r.guest,
                reason: r.reason,
            }),
            _ => None,
        };
        typed.unwrap_or_else(|| Self::Other {
            name: name.to_owned(),
            data: data.cloned(),
        })
    }

    /// The wire name, e.g. `DEVICE_DELETED`.
    pub fn name(&self) -> &str {
        match self {
            Self::DeviceDeleted { .. } => "DEVICE_DELETED",
            Self::DeviceUnplugGuestError { .. } => "DEVICE_UNPLUG_GUEST_ERROR",
            Self::Shutdown { .. } => "SHUTDOWN",
            Self::Reset { .. } => "RESET",
            Self::Other { name, .. } => name,
        }
    }

    /// True if this is `DEVICE_DELETED` for the device with qdev id `id` — matched by `device`
    /// or by the path `/machine/peripheral/<id>`, never by a child object's path.
    pub fn is_device_deleted(&self, id: &str) -> bool {
        match self {
            Self::DeviceDeleted { device, path } => device_matches(device.as_deref(), path, id),
            _ => false,
        }
    }

    /// True if this is `DEVICE_UNPLUG_GUEST_ERROR` for `id` (same matching as
    /// [`Self::is_device_deleted`]).
    pub fn is_unplug_guest_error(&self, id: &str) -> bool {
        match self {
            Self::DeviceUnplugGuestError { device, path } => {
                device_matches(device.as_deref(), path, id)
            }
            _ => false,
        }
    }
}

fn device_matches(device: Option<&str>, path: &str, id: &str) -> bool {
    // `device_del` also accepts a QOM path; then only the exact path matches.
    if id.starts_with('/') {
        return path == id;
    }
    // qdev ids cannot contain '/'; refusing them keeps child paths from matching.
    if id.contains('/') {
        return false;
    }
    if device == Some(id) {
        return true;
    }
    path.strip_prefix(PERIPHERAL_PATH)
        .and_then(|rest| rest.strip_prefix('/'))
        .is_some_and(|rest| rest == id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn device_deleted_matches_by_id_or_peripheral_path_only() {
        let by_id = Event::from_parts(
            "DEVICE_DELETED",
            Some(&json!({"device": "n1", "path": "/machine/peripheral/n1"})),
        );
        assert!(by_id.is_device_deleted("n1"));
        assert!(!by_id.is_device_deleted("n2"));
        let by_path = Event::from_parts(
            "DEVICE_DELETED",
            Some(&json!({"path": "/machine/peripheral/n1"})),
        );
        assert!(by_path.is_device_deleted("n1"));
        let child = Event::from_parts(
            "DEVICE_DELETED",
            Some(&json!({"path": "/machine/peripheral/n1/virtio-backend"})),
        );
        assert!(!child.is_device_deleted("n1"));
        assert!(!child.is_device_deleted("n1/virtio-backend"));
        let unattached = Event::from_parts(
            "DEVICE_DELETED",
            Some(&json!({"path": "/machine/unattached/device[5]"})),
        );
        assert!(!unattached.is_device_deleted("device[5]"));
        assert!(!by_id.is_unplug_guest_error("n1"));
        assert!(by_id.is_device_deleted("/machine/peripheral/n1"));
        assert!(!child.is_device_deleted("/machine/peripheral/n1"));
    }

    #[test]
    fn guest_error_and_reason_events() {
        let e = Event::from_parts(
            "DEVICE_UNPLUG_GUEST_ERROR",
            Some(&json!({"device": "hostdev0", "path": "/machine/peripheral/hostdev0"})),
        );
        assert!(e.is_unplug_guest_error("hostdev0"));
        assert_eq!(e.name(), "DEVICE_UNPLUG_GUEST_ERROR");
        assert_eq!(
            Event::from_parts(
                "RESET",
                Some(&json!({"guest": false, "reason": "host-qmp-system-reset"}))
            ),
            Event::Reset {
                guest: false,
                reason: "host-qmp-system-reset".into()
            }
        );
        assert_eq!(
            Event::from_parts("SHUTDOWN", None),
            Event::Shutdown {
                guest: false,
                reason: String::new()
            }
        );
    }

    #[test]
    fn malformed_known_events_become_other() {
        let e = Event::from_parts("DEVICE_DELETED", Some(&json!({"device": 3})));
        assert_eq!(
            e,
            Event::Other {
                name: "DEVICE_DELETED".into(),
                data: Some(json!({"device": 3}))
            }
        );
        let e = Event::from_parts("STOP", None);
        assert_eq!(e.name(), "STOP");
    }
}
