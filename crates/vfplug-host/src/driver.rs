//! Driver binding: moving a VF to `vfio-pci` for a VM and back to its host driver.
//!
//! The kernel interface used is the standard one (device-plugin.md §7):
//! 1. `echo <drv> > <dev>/driver_override` — only `<drv>` may claim the device from now on. We
//!    never use `new_id`, which would make the driver grab every device with that vendor:device.
//! 2. `echo <bdf> > <dev>/driver/unbind` — if bound to something else.
//! 3. `echo <bdf> > bus/pci/drivers_probe` — the kernel binds the device to the override.
//! 4. Read `<dev>/driver` back: the write succeeding does not mean the probe did.
//!
//! The override is left in place afterwards on purpose: if the device is re-probed (PF reset,
//! `sriov_drivers_autoprobe`), it comes back on the same driver instead of racing to another.
//!
//! The trait is synchronous: these are a handful of small writes, but a real probe can take
//! hundreds of milliseconds, so async callers should use `tokio::task::spawn_blocking`.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tracing::{debug, info};
use vfplug_core::PciAddress;

use crate::HostError;
use crate::sysfs::read_link_name;

/// The driver VMs get their VFs through.
pub const VFIO_PCI: &str = "vfio-pci";

/// Binds and unbinds PCI devices.
pub trait DriverBinder: Send + Sync + Debug {
    /// The driver the device is bound to now, `None` when unbound.
    fn current_driver(&self, pci: PciAddress) -> Result<Option<String>, HostError>;
    /// Unbinds the device from its driver; a no-op when already unbound.
    fn unbind(&self, pci: PciAddress) -> Result<(), HostError>;
    /// Binds the device to `driver`; a no-op when already bound to it. Fails with
    /// [`HostError::BindFailed`] when the device is on another driver afterwards.
    fn bind(&self, pci: PciAddress, driver: &str) -> Result<(), HostError>;
    /// Binds the device to `vfio-pci`.
    fn bind_vfio(&self, pci: PciAddress) -> Result<(), HostError> {
        self.bind(pci, VFIO_PCI)
    }
    /// Resets the function (`echo 1 > <dev>/reset`: FLR or whatever `reset_method` the kernel
    /// picked), as done before a VF goes back to the pool. Fails when the device has no reset
    /// method (no `reset` attribute).
    fn reset(&self, pci: PciAddress) -> Result<(), HostError>;
}

/// How sysfs attributes are written; the seam that lets tests watch (and simulate) the kernel.
pub trait SysfsWriter: Send + Sync + Debug {
    /// Writes `value` to the attribute at `path` in one `write(2)`.
    fn write(&self, path: &Path, value: &str) -> io::Result<()>;
}

/// Writes to the real files.
#[derive(Clone, Copy, Debug, Default)]
pub struct RealWriter;

impl SysfsWriter for RealWriter {
    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        // No O_CREAT: a missing attribute means a missing device, not a file to create.
        // O_TRUNC is what `echo >` does; sysfs ignores it, regular files (fixtures) need it.
        let mut f = OpenOptions::new().write(true).truncate(true).open(path)?;
        f.write_all(value.as_bytes())
    }
}

/// [`DriverBinder`] over sysfs (`root` stands for `/sys`).
#[derive(Debug)]
pub struct SysfsDriverBinder<W: SysfsWriter = RealWriter> {
    root: PathBuf,
    writer: W,
}

impl SysfsDriverBinder<RealWriter> {
    /// A binder writing the real files under `root`.
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            writer: RealWriter,
        }
    }
}

impl<W: SysfsWriter> SysfsDriverBinder<W> {
    /// A binder with a custom writer (tests: `fixture::FixtureKernel`, with the `fixture` feature).
    pub fn with_writer(root: PathBuf, writer: W) -> Self {
        Self { root, writer }
    }

    /// The writer (to inspect a recording writer in tests).
    pub fn writer(&self) -> &W {
        &self.writer
    }

    fn dev(&self, pci: PciAddress) -> PathBuf {
        self.root.join("bus/pci/devices").join(pci.to_string())
    }

    fn write(&self, path: &Path, value: &str) -> Result<(), HostError> {
        debug!(path = %path.display(), value, "sysfs write");
        self.writer
            .write(path, value)
            .map_err(|e| HostError::io("write", path, e))
    }
}

fn check_driver_name(driver: &str) -> Result<(), HostError> {
    if driver.is_empty() || driver.contains('/') || driver.contains(char::is_whitespace) {
        return Err(HostError::InvalidDriver(driver.to_owned()));
    }
    Ok(())
}

impl<W: SysfsWriter> DriverBinder for SysfsDriverBinder<W> {
    fn current_driver(&self, pci: PciAddress) -> Result<Option<String>, HostError> {
        let dev = self.dev(pci);
        // Distinguish "unbound" from "no such device": the device dir must exist.
        std::fs::symlink_metadata(&dev).map_err(|e| HostError::io("stat", &dev, e))?;
        read_link_name(&dev.join("driver"))
    }

    fn unbind(&self, pci: PciAddress) -> Result<(), HostError> {
        if self.current_driver(pci)?.is_none() {
            return Ok(());
        }
        match self.write(&self.dev(pci).join("driver/unbind"), &pci.to_string()) {
            // Unbound by someone else in between: the goal is reached.
            Err(e) if e.is_not_found() => Ok(()),
            other => other,
        }
    }

    fn bind(&self, pci: PciAddress, driver: &str) -> Result<(), HostError> {
        check_driver_name(driver)?;
        let before = self.current_driver(pci)?;
        if before.as_deref() == Some(driver) {
            debug!(%pci, driver, "already bound");
            return Ok(());
        }
        let dev = self.dev(pci);
        let bdf = pci.to_string();
        self.write(&dev.join("driver_override"), driver)?;
        if before.is_some() {
            match self.write(&dev.join("driver/unbind"), &bdf) {
                Err(e) if e.is_not_found() => {}
                other => other?,
            }
        }
        self.write(&self.root.join("bus/pci/drivers_probe"), &bdf)?;
        let after = self.current_driver(pci)?;
        if after.as_deref() != Some(driver) {
            return Err(HostError::BindFailed {
                pci,
                wanted: driver.to_owned(),
                actual: after,
            });
        }
        info!(%pci, from = ?before, to = driver, "rebound device");
        Ok(())
    }

    fn reset(&self, pci: PciAddress) -> Result<(), HostError> {
        self.write(&self.dev(pci).join("reset"), "1")?;
        info!(%pci, "function reset");
        Ok(())
    }
}

/// One call recorded by [`FakeDriverBinder`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BinderOp {
    /// `bind(pci, driver)` (including via `bind_vfio`).
    Bind(PciAddress, String),
    /// `unbind(pci)`.
    Unbind(PciAddress),
    /// `reset(pci)`.
    Reset(PciAddress),
}

#[derive(Debug, Default)]
struct FakeState {
    drivers: BTreeMap<PciAddress, Option<String>>,
    failing: BTreeMap<PciAddress, Option<String>>,
    ops: Vec<BinderOp>,
}

/// In-memory [`DriverBinder`] for tests of code that binds (the attach/detach sagas).
#[derive(Debug, Default)]
pub struct FakeDriverBinder {
    state: Mutex<FakeState>,
}

impl FakeDriverBinder {
    /// Knows the given devices and their current drivers.
    pub fn new(devices: impl IntoIterator<Item = (PciAddress, Option<String>)>) -> Self {
        let drivers = devices.into_iter().collect();
        Self {
            state: Mutex::new(FakeState {
                drivers,
                ..FakeState::default()
            }),
        }
    }

    /// Makes binds of `pci` fail: the device ends up on `stuck_on` (as when a probe fails).
    /// `None` lifts the failure.
    pub fn fail_binds(&self, pci: PciAddress, stuck_on: Option<Option<String>>) {
        let mut st = self.lock();
        match stuck_on {
            Some(d) => st.failing.insert(pci, d),
            None => st.failing.remove(&pci),
        };
    }

    /// The calls made so far (no-op calls included).
    pub fn ops(&self) -> Vec<BinderOp> {
        self.lock().ops.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        // A panicking test thread must not hide the state from the others.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn unknown(pci: PciAddress) -> HostError {
    HostError::io(
        "stat",
        format!("fake:/sys/bus/pci/devices/{pci}"),
        io::Error::from(io::ErrorKind::NotFound),
    )
}

impl DriverBinder for FakeDriverBinder {
    fn current_driver(&self, pci: PciAddress) -> Result<Option<String>, HostError> {
        self.lock()
            .drivers
            .get(&pci)
            .cloned()
            .ok_or_else(|| unknown(pci))
    }

    fn unbind(&self, pci: PciAddress) -> Result<(), HostError> {
        let mut st = self.lock();
        st.ops.push(BinderOp::Unbind(pci));
        let slot = st.drivers.get_mut(&pci).ok_or_else(|| unknown(pci))?;
        *slot = None;
        Ok(())
    }

    fn bind(&self, pci: PciAddress, driver: &str) -> Result<(), HostError> {
        check_driver_name(driver)?;
        let mut st = self.lock();
        st.ops.push(BinderOp::Bind(pci, driver.to_owned()));
        let failing = st.failing.get(&pci).cloned();
        let slot = st.drivers.get_mut(&pci).ok_or_else(|| unknown(pci))?;
        if let Some(stuck) = failing {
            *slot = stuck.clone();
            return Err(HostError::BindFailed {
                pci,
                wanted: driver.to_owned(),
                actual: stuck,
            });
        }
        *slot = Some(driver.to_owned());
        Ok(())
    }

    fn reset(&self, pci: PciAddress) -> Result<(), HostError> {
        let mut st = self.lock();
        if !st.drivers.contains_key(&pci) {
            return Err(unknown(pci));
        }
        st.ops.push(BinderOp::Reset(pci));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture::{FixtureKernel, SysfsBuilder, VfSpec};

    fn tree() -> (tempfile::TempDir, SysfsBuilder) {
        let dir = tempfile::tempdir().unwrap();
        let mut b = SysfsBuilder::new(dir.path());
        b.pf("0000:3b:00.0")
            .driver("i40e")
            .netdev("ens785f0")
            .vfs(3, |i| {
                if i == 2 {
                    VfSpec::new() // unbound, e.g. sriov_drivers_autoprobe=0
                } else {
                    VfSpec::new().driver("iavf").netdev(format!("ens785f0v{i}"))
                }
            })
            .build()
            .unwrap();
        (dir, b)
    }

    fn pci(s: &str) -> PciAddress {
        s.parse().unwrap()
    }

    #[test]
    fn bind_vfio_writes_override_then_unbind_then_probe() {
        let (dir, _b) = tree();
        let vf = pci("0000:3b:01.0");
        let binder =
            SysfsDriverBinder::with_writer(dir.path().into(), FixtureKernel::new(dir.path()));
        binder.bind_vfio(vf).unwrap();

        let writes = binder.writer().writes();
        let dev = "bus/pci/devices/0000:3b:01.0";
        assert_eq!(
            writes,
            vec![
                (
                    PathBuf::from(format!("{dev}/driver_override")),
                    "vfio-pci".to_owned()
                ),
                (
                    PathBuf::from(format!("{dev}/driver/unbind")),
                    "0000:3b:01.0".to_owned()
                ),
                (
                    PathBuf::from("bus/pci/drivers_probe"),
                    "0000:3b:01.0".to_owned()
                ),
            ]
        );
        assert_eq!(
            binder.current_driver(vf).unwrap().as_deref(),
            Some("vfio-pci")
        );
        // The override stays, so a re-probe lands on vfio-pci again.
        let ov = std::fs::read_to_string(dir.path().join(dev).join("driver_override")).unwrap();
        assert_eq!(ov, "vfio-pci");
        // The kernel's view: back-link in the vfio-pci driver dir, old one gone, netdev gone.
        let drivers = dir.path().join("bus/pci/drivers");
        assert!(drivers.join("vfio-pci/0000:3b:01.0").exists());
        assert!(std::fs::symlink_metadata(drivers.join("iavf/0000:3b:01.0")).is_err());
        assert!(std::fs::symlink_metadata(dir.path().join("class/net/ens785f0v0")).is_err());
    }

    #[test]
    fn bind_is_idempotent_and_skips_unbind_for_unbound_devices() {
        let (dir, _b) = tree();
        let binder =
            SysfsDriverBinder::with_writer(dir.path().into(), FixtureKernel::new(dir.path()));
        let unbound = pci("0000:3b:01.2");
        binder.bind_vfio(unbound).unwrap();
        binder.bind_vfio(unbound).unwrap();
        let names: Vec<_> = binder
            .writer()
            .writes()
            .into_iter()
            .map(|(p, _)| p.display().to_string())
            .collect();
        assert_eq!(
            names,
            [
                "bus/pci/devices/0000:3b:01.2/driver_override",
                "bus/pci/drivers_probe"
            ],
            "second bind must write nothing, and an unbound device needs no unbind"
        );
        // And back to the host driver.
        binder.bind(unbound, "iavf").unwrap();
        assert_eq!(
            binder.current_driver(unbound).unwrap().as_deref(),
            Some("iavf")
        );
        binder.unbind(unbound).unwrap();
        assert_eq!(binder.current_driver(unbound).unwrap(), None);
    }

    #[test]
    fn bind_reports_a_probe_that_did_not_take() {
        // Plain files: the "kernel" ignores the writes, so the device stays on iavf.
        let (dir, _b) = tree();
        let binder = SysfsDriverBinder::new(dir.path().into());
        let err = binder.bind_vfio(pci("0000:3b:01.1")).unwrap_err();
        match err {
            HostError::BindFailed { wanted, actual, .. } => {
                assert_eq!(wanted, "vfio-pci");
                assert_eq!(actual.as_deref(), Some("iavf"));
            }
            other => panic!("expected BindFailed, got {other}"),
        }
        // RealWriter truncated and wrote the override file.
        let ov = dir
            .path()
            .join("bus/pci/devices/0000:3b:01.1/driver_override");
        assert_eq!(std::fs::read_to_string(ov).unwrap(), "vfio-pci");
    }

    #[test]
    fn reset_writes_one_to_the_reset_attribute() {
        let (dir, _b) = tree();
        let binder =
            SysfsDriverBinder::with_writer(dir.path().into(), FixtureKernel::new(dir.path()));
        binder.reset(pci("0000:3b:01.1")).unwrap();
        assert_eq!(
            binder.writer().writes(),
            vec![(
                PathBuf::from("bus/pci/devices/0000:3b:01.1/reset"),
                "1".to_owned()
            )]
        );
        // A device without a reset method has no `reset` file: an error naming the path.
        std::fs::remove_file(dir.path().join("bus/pci/devices/0000:3b:01.2/reset")).unwrap();
        let e = SysfsDriverBinder::new(dir.path().into())
            .reset(pci("0000:3b:01.2"))
            .unwrap_err();
        assert!(
            e.is_not_found() && e.to_string().contains("0000:3b:01.2/reset"),
            "{e}"
        );
    }

    #[test]
    fn unknown_device_and_bad_driver_names_are_errors() {
        let (dir, _b) = tree();
        let binder = SysfsDriverBinder::new(dir.path().into());
        let e = binder.bind_vfio(pci("0000:99:00.0")).unwrap_err();
        assert!(e.is_not_found(), "{e}");
        let e = binder.bind(pci("0000:3b:01.0"), "../evil").unwrap_err();
        assert!(matches!(e, HostError::InvalidDriver(_)), "{e}");
    }

    #[test]
    fn fake_binder_tracks_drivers_and_injected_failures() {
        let a = pci("0000:3b:01.0");
        let fake = FakeDriverBinder::new([(a, Some("iavf".to_owned()))]);
        fake.bind_vfio(a).unwrap();
        assert_eq!(fake.current_driver(a).unwrap().as_deref(), Some("vfio-pci"));
        fake.fail_binds(a, Some(None));
        assert!(matches!(
            fake.bind(a, "iavf"),
            Err(HostError::BindFailed { actual: None, .. })
        ));
        assert_eq!(fake.current_driver(a).unwrap(), None);
        fake.fail_binds(a, None);
        fake.bind(a, "iavf").unwrap();
        fake.reset(a).unwrap();
        assert_eq!(
            fake.ops(),
            vec![
                BinderOp::Bind(a, "vfio-pci".into()),
                BinderOp::Bind(a, "iavf".into()),
                BinderOp::Bind(a, "iavf".into()),
                BinderOp::Reset(a),
            ]
        );
        assert!(fake.reset(pci("0000:00:00.0")).unwrap_err().is_not_found());
        assert!(
            fake.current_driver(pci("0000:00:00.0"))
                .unwrap_err()
                .is_not_found()
        );
    }
}
