//! The executor's errors: a kind that says what the caller should do, and a message that says
//! what happened. The node API maps the kind to a CNI code in one place.

use vfplug_core::ledger::LedgerError;
use vfplug_host::net::NetError;

/// What went wrong, from the caller's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The request lacks something the runtime must pass (container ID, ifname, netns).
    InvalidRequest,
    /// A config value is not acceptable (names the field).
    InvalidConfig,
    /// No such VF or pool, or the VF does not fit the pool's mode.
    NoSuchDevice,
    /// The VF is held by another attachment, quarantined or missing.
    Busy,
    /// Transient: the pool is empty, the PF is busy, a VM step owns the VF right now.
    TryAgain,
    /// Setting the VF through its PF failed.
    VfConfig,
    /// Placing the netdev in the pod (or bringing it back) failed.
    Netdev,
    /// CHECK found the attachment not as ADD left it.
    CheckFailed,
    /// No record of the attachment.
    Unknown,
    /// The VM's QEMU is not running: its QMP socket is gone, or nobody listens on it. For an
    /// attach, try again later; for a detach, proof that the device is in no guest.
    VmNotRunning,
    /// vfplugd itself failed (ledger write, a task).
    Internal,
}

/// An executor error. See [`ErrorKind`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{msg}")]
pub struct ExecError {
    /// What the caller should do.
    pub kind: ErrorKind,
    /// What happened (names the VF, field or step).
    pub msg: String,
}

impl ExecError {
    /// An error of `kind`.
    pub fn new(kind: ErrorKind, msg: impl Into<String>) -> Self {
        Self {
            kind,
            msg: msg.into(),
        }
    }

    /// An internal failure of `what`.
    pub fn internal(what: &str, e: impl std::fmt::Display) -> Self {
        Self::new(ErrorKind::Internal, format!("{what}: {e}"))
    }

    /// A refused ledger plan, classified.
    pub fn ledger(e: &LedgerError) -> Self {
        let kind = match e {
            LedgerError::NotFree { .. }
            | LedgerError::OwnerBusy { .. }
            | LedgerError::Fenced { .. }
            | LedgerError::InvalidTransition { .. }
            | LedgerError::NoChange { .. } => ErrorKind::Busy,
            LedgerError::UnknownVf { .. } => ErrorKind::NoSuchDevice,
            _ => ErrorKind::Internal,
        };
        Self::new(kind, e.to_string())
    }

    /// A netlink/netdev failure: busy ones are transient.
    pub fn net(default: ErrorKind, e: &NetError) -> Self {
        match e {
            NetError::Netns { gone: true, .. } => {
                Self::new(ErrorKind::InvalidRequest, format!("CNI_NETNS: {e}"))
            }
            _ if e.is_busy() => Self::new(ErrorKind::TryAgain, e.to_string()),
            _ => Self::new(default, e.to_string()),
        }
    }

    pub(crate) fn joined(e: tokio::task::JoinError) -> Self {
        Self::internal("host task failed", e)
    }
}
