//! Connecting vfplug-qmp to a QEMU that was just started: the socket file appears some time after
//! the process starts (50 ms on the host, over a second in L1), so connecting is retried until a
//! deadline. Everything else is vfplug-qmp's own API, used unchanged.

use std::path::Path;
use std::time::{Duration, Instant};

use vfplug_qmp::{DeviceAdd, Qmp};

use crate::LabError;

/// Per-command default timeout for lab connections. Generous because under TCG (and more so in
/// L1) a vfio-pci `device_add` maps all guest RAM through the emulated IOMMU: 1-2 s measured.
pub const LAB_QMP_TIMEOUT: Duration = Duration::from_secs(30);

/// Connects to the QMP socket at `path`, retrying every 50 ms until `within` has passed.
pub async fn connect_retry(path: &Path, within: Duration) -> Result<Qmp, LabError> {
    let deadline = Instant::now() + within;
    loop {
        let err = match Qmp::connect(path, LAB_QMP_TIMEOUT).await {
            Ok(q) => return Ok(q),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(LabError::Timeout {
                what: format!("QMP socket {}", path.display()),
                after: within,
                tail: format!("last error: {err}"),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `device_add` of a vfio-pci passthrough of `host` as `id` into root port `bus` at slot 0: the
/// shape KubeVirt and libvirt send. One place for the call, so the lab follows vfplug-qmp's builder.
pub fn vfio_device(host: impl std::fmt::Display, id: &str, bus: &str) -> DeviceAdd {
    DeviceAdd::vfio_pci(host, id, bus, Some("0x0"))
}
