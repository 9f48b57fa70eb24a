//! Fake sysfs trees, laid out the way the kernel lays them out, for tests and benchmarks.
//!
//! Enabled by the cargo feature `fixture`. Everything is created with real directories, regular
//! files and **relative** symlinks, so code under test cannot tell it from `/sys` except that
//! writes do not trigger the kernel (use [`FixtureKernel`] for that):
//!
//! ```text
//! <root>/devices/pci0000:00/0000:00:03.0/<bdf>/   vendor device class numa_node driver_override reset
//!        sriov_totalvfs sriov_numvfs sriov_drivers_autoprobe (PFs), virtfnN -> ../<vf>,
//!        physfn -> ../<pf> (VFs), driver -> ../../../../bus/pci/drivers/<drv>,
//!        iommu_group -> ../../../../kernel/iommu_groups/<n>, net/<if>/{type,carrier,operstate,address}
//! <root>/bus/pci/devices/<bdf> -> ../../../devices/pci0000:00/0000:00:03.0/<bdf>
//! <root>/bus/pci/drivers/<drv>/{bind,unbind,<bdf> -> ../../../../devices/...}
//! <root>/bus/pci/drivers_probe
//! <root>/class/net/<if> -> ../../devices/pci0000:00/0000:00:03.0/<bdf>/net/<if>
//! <root>/kernel/iommu_groups/<n>/devices/<bdf> -> ../../../../devices/...
//! ```
//!
//! ```
//! # use vfplug_host::fixture::{SysfsBuilder, VfSpec};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = vfplug_host::fixture::tempdir()?; // on tmpfs when there is one
//! let mut b = SysfsBuilder::new(dir.path());
//! b.pf("0000:3b:00.0").vendor("8086").device("1572").driver("i40e").netdev("ens785f0").numa(0)
//!     .vfs(8, |i| VfSpec::new().driver("iavf").netdev(format!("ens785f0v{i}")))
//!     .build()?;
//! b.rebind("0000:3b:01.0", Some("vfio-pci"))?; // VF 0 (offset 8, stride 1)
//! let inv = vfplug_host::sysfs::SysfsInventory::new(dir.path().into()).scan()?;
//! assert_eq!(inv.vfs.len(), 8);
//! assert!(inv.vfs.values().any(|v| v.driver.as_deref() == Some("vfio-pci")));
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use vfplug_core::PciAddress;

use crate::driver::SysfsWriter;

/// A temporary directory for a fixture tree, on tmpfs (`/dev/shm`) when there is one. Sysfs
/// lives in memory; so should its stand-in: an 8 x 256 VF tree (~60k inodes) builds in well
/// under a second on tmpfs but can take many seconds on a busy ext4 disk.
pub fn tempdir() -> io::Result<tempfile::TempDir> {
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(d) = tempfile::Builder::new()
            .prefix("vfplug-sysfs-")
            .tempdir_in(shm)
    {
        return Ok(d);
    }
    tempfile::Builder::new().prefix("vfplug-sysfs-").tempdir()
}

/// Where every fixture device lives, relative to the root: one host bridge, one root port.
pub const PCI_PARENT: &str = "devices/pci0000:00/0000:00:03.0";

/// Errors of the fixture builder.
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    /// A file-system operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was attempted.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A PCI address did not parse.
    #[error(transparent)]
    Address(#[from] vfplug_core::PciAddressError),
    /// The described tree cannot exist (VF address clash, more VFs than `sriov_totalvfs`...).
    #[error("invalid fixture: {0}")]
    Invalid(String),
}

fn io_err<'p>(op: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> FixtureError + 'p {
    move |source| FixtureError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// What one VF looks like. `Default` is an unbound VF without netdev, NUMA node and IDs
/// inherited from the PF, and an IOMMU group assigned automatically.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VfSpec {
    /// Bound driver (`iavf`, `vfio-pci`, `mlx5_core`), `None` for unbound.
    pub driver: Option<String>,
    /// The VF's netdev in the host namespace.
    pub netdev: Option<String>,
    /// IOMMU group; `None` means "assign the next free group" unless the PF was built with
    /// `auto_iommu_groups(false)`, in which case the VF has no `iommu_group` link.
    pub iommu_group: Option<u32>,
    /// `numa_node` contents; `None` copies the PF's value (as the kernel does).
    pub numa: Option<i32>,
}

impl VfSpec {
    /// An unbound VF (see the type docs).
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets the bound driver.
    pub fn driver(mut self, d: impl Into<String>) -> Self {
        self.driver = Some(d.into());
        self
    }
    /// Sets the netdev name.
    pub fn netdev(mut self, n: impl Into<String>) -> Self {
        self.netdev = Some(n.into());
        self
    }
    /// Sets the IOMMU group.
    pub fn iommu_group(mut self, g: u32) -> Self {
        self.iommu_group = Some(g);
        self
    }
    /// Sets `numa_node` (use -1 for "no affinity").
    pub fn numa(mut self, n: i32) -> Self {
        self.numa = Some(n);
        self
    }
}

#[derive(Clone, Debug)]
struct PfSpec {
    vendor: String,
    device: String,
    vf_device: Option<String>,
    class: String,
    driver: Option<String>,
    netdev: Option<String>,
    link_type: u32,
    carrier: bool,
    numa: i32,
    sriov: bool,
    total_vfs: Option<u32>,
    offset: u32,
    stride: u32,
    iommu_group: Option<u32>,
    auto_groups: bool,
}

#[derive(Debug)]
struct PfState {
    spec: PfSpec,
    total_vfs: u32,
    /// One spec per possible VF index (`0..total_vfs`), so `set_num_vfs` can grow later.
    vf_specs: Vec<VfSpec>,
    num_vfs: u32,
}

/// Builds and mutates a fake sysfs tree under a root directory (which stands for `/sys`).
#[derive(Debug)]
pub struct SysfsBuilder {
    root: PathBuf,
    pfs: BTreeMap<PciAddress, PfState>,
    next_group: u32,
}

impl SysfsBuilder {
    /// A builder for a tree under `root` (created if missing). Nothing is written until a PF
    /// is built.
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            pfs: BTreeMap::new(),
            next_group: 1,
        }
    }

    /// The root (the fake `/sys`).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Starts describing a PF (or, with `.sriov(false)`, a plain PCI device). Defaults: Intel
    /// `8086:1572` (X710, VF device `154c`), ethernet, carrier up, NUMA 0, no driver, no
    /// netdev, no VFs, `sriov_totalvfs` = max(64, VFs), VF offset 8 and stride 1.
    pub fn pf(&mut self, pci: &str) -> PfBuilder<'_> {
        PfBuilder {
            b: self,
            pci: pci.to_owned(),
            spec: PfSpec {
                vendor: "8086".into(),
                device: "1572".into(),
                vf_device: None,
                class: "0x020000".into(),
                driver: None,
                netdev: None,
                link_type: 1,
                carrier: true,
                numa: 0,
                sriov: true,
                total_vfs: None,
                offset: 8,
                stride: 1,
                iommu_group: None,
                auto_groups: true,
            },
            vfs: None,
        }
    }

    /// The PCI address of VF `index` of `pf` (offset/stride arithmetic, as the kernel does).
    pub fn vf_address(&self, pf: &str, index: u32) -> Result<PciAddress, FixtureError> {
        let pf: PciAddress = pf.parse()?;
        let st = self.state(pf)?;
        vf_address(pf, &st.spec, index)
    }

    fn state(&self, pf: PciAddress) -> Result<&PfState, FixtureError> {
        self.pfs
            .get(&pf)
            .ok_or_else(|| FixtureError::Invalid(format!("no PF {pf} in fixture")))
    }

    fn alloc_group(&mut self) -> u32 {
        let g = self.next_group;
        self.next_group += 1;
        g
    }

    /// Changes `sriov_numvfs` like the kernel does: removes VFs `n..` (dirs, `virtfn` links,
    /// bus/driver/class/iommu links) or creates VFs `current..n` from the PF's VF specs.
    pub fn set_num_vfs(&mut self, pf: &str, n: u32) -> Result<(), FixtureError> {
        let pf: PciAddress = pf.parse()?;
        let (current, total) = {
            let st = self.state(pf)?;
            (st.num_vfs, st.total_vfs)
        };
        if n > total {
            return Err(FixtureError::Invalid(format!(
                "{pf}: {n} VFs > sriov_totalvfs {total}"
            )));
        }
        let pf_dir = self.dev_dir(pf);
        for i in (n..current).rev() {
            let st = self.state(pf)?;
            let vf = vf_address(pf, &st.spec, i)?;
            let link = pf_dir.join(format!("virtfn{i}"));
            fs::remove_file(&link).map_err(io_err("remove", &link))?;
            self.remove_device(vf)?;
        }
        for i in current..n {
            self.create_vf(pf, i)?;
        }
        if let Some(st) = self.pfs.get_mut(&pf) {
            st.num_vfs = n;
        }
        write(&pf_dir.join("sriov_numvfs"), &format!("{n}\n"))
    }

    /// Changes the driver a device is bound to (`None`: unbind). Like the kernel, unbinding
    /// destroys the device's netdevs; use [`SysfsBuilder::add_netdev`] to give a newly bound
    /// netdev driver its interface.
    pub fn rebind(&self, pci: &str, driver: Option<&str>) -> Result<(), FixtureError> {
        rebind_at(&self.root, pci.parse()?, driver)
    }

    /// Creates a netdev `ifname` on a device (with its `class/net` link).
    pub fn add_netdev(&self, pci: &str, ifname: &str) -> Result<(), FixtureError> {
        let pci: PciAddress = pci.parse()?;
        let link_type = self.link_type_for(pci);
        create_netdev(&self.root, pci, ifname, link_type, true)
    }

    /// Removes a VF's netdev from the host view, as when a CNI moves it into a pod's network
    /// namespace: `net/<if>` and `class/net/<if>` go, the (now empty) `net/` dir stays.
    pub fn move_vf_netdev_away(&self, vf: &str) -> Result<Vec<String>, FixtureError> {
        let vf: PciAddress = vf.parse()?;
        let net = self.dev_dir(vf).join("net");
        let names = list(&net)?;
        for n in &names {
            remove_netdev(&self.root, vf, n)?;
        }
        Ok(names)
    }

    /// Sets `carrier` (and `operstate`) of a netdev, looked up through `class/net/<ifname>`.
    pub fn set_carrier(&self, ifname: &str, up: bool) -> Result<(), FixtureError> {
        let dir = self.root.join("class/net").join(ifname);
        write(&dir.join("carrier"), if up { "1\n" } else { "0\n" })?;
        write(&dir.join("operstate"), if up { "up\n" } else { "down\n" })
    }

    /// Marks IOMMU group `group` as a vfio no-IOMMU group, as the kernel does when vfio runs
    /// with `enable_unsafe_noiommu_mode` (the group's `name` file says `vfio-noiommu`).
    pub fn set_noiommu(&self, group: u32) -> Result<(), FixtureError> {
        let dir = self
            .root
            .join("kernel/iommu_groups")
            .join(group.to_string());
        fs::create_dir_all(&dir).map_err(io_err("mkdir", &dir))?;
        write(&dir.join("name"), "vfio-noiommu\n")
    }

    /// Gives device `pci` the RDMA device `ibdev` (`mlx5_3`) with char devices numbered `n`,
    /// laid out as the kernel does and rdmamap reads it: `<dev>/infiniband/<ibdev>/`, and
    /// `class/infiniband_verbs/uverbs<n>`, `class/infiniband_mad/{umad<n>,issm<n>}` each with an
    /// `ibdev` file naming it. The `/dev/infiniband` nodes are the caller's (a fake dev root).
    pub fn add_rdma(&self, pci: &str, ibdev: &str, n: u32) -> Result<(), FixtureError> {
        let pci: PciAddress = pci.parse()?;
        let dir = self.dev_dir(pci).join("infiniband").join(ibdev);
        fs::create_dir_all(&dir).map_err(io_err("mkdir", &dir))?;
        for (class, node) in [
            ("infiniband_verbs", format!("uverbs{n}")),
            ("infiniband_mad", format!("umad{n}")),
            ("infiniband_mad", format!("issm{n}")),
        ] {
            let d = self.root.join("class").join(class).join(node);
            fs::create_dir_all(&d).map_err(io_err("mkdir", &d))?;
            write(&d.join("ibdev"), &format!("{ibdev}\n"))?;
        }
        Ok(())
    }

    /// The real directory of a device.
    pub fn dev_dir(&self, pci: PciAddress) -> PathBuf {
        self.root.join(PCI_PARENT).join(pci.to_string())
    }

    fn link_type_for(&self, pci: PciAddress) -> u32 {
        if let Some(st) = self.pfs.get(&pci) {
            return st.spec.link_type;
        }
        // A VF: its PF's link type.
        self.pfs
            .iter()
            .find(|(pf, st)| {
                (0..st.num_vfs).any(|i| vf_address(**pf, &st.spec, i).ok() == Some(pci))
            })
            .map_or(1, |(_, st)| st.spec.link_type)
    }

    fn insert_pf(
        &mut self,
        pci: PciAddress,
        spec: PfSpec,
        vf_specs: Vec<VfSpec>,
        num_vfs: u32,
    ) -> Result<(), FixtureError> {
        if self.pfs.contains_key(&pci) {
            return Err(FixtureError::Invalid(format!("PF {pci} built twice")));
        }
        let total = if spec.sriov {
            spec.total_vfs.unwrap_or(num_vfs.max(64))
        } else {
            0
        };
        if num_vfs > total {
            return Err(FixtureError::Invalid(format!(
                "{pci}: {num_vfs} VFs > total {total}"
            )));
        }
        for i in 0..num_vfs {
            let vf = vf_address(pci, &spec, i)?;
            if self.dev_dir(vf).exists() {
                return Err(FixtureError::Invalid(format!(
                    "VF {i} of {pci} clashes with {vf}"
                )));
            }
        }
        let group = match spec.iommu_group {
            Some(g) => Some(g),
            None if spec.auto_groups => Some(self.alloc_group()),
            None => None,
        };
        let dir = create_device(
            &self.root,
            pci,
            &DevAttrs {
                vendor: &spec.vendor,
                device: &spec.device,
                class: &spec.class,
                numa: spec.numa,
                driver: spec.driver.as_deref(),
                iommu_group: group,
            },
        )?;
        if spec.sriov {
            write(&dir.join("sriov_totalvfs"), &format!("{total}\n"))?;
            write(&dir.join("sriov_numvfs"), "0\n")?;
            write(&dir.join("sriov_drivers_autoprobe"), "1\n")?;
            write(&dir.join("sriov_offset"), &format!("{}\n", spec.offset))?;
            write(&dir.join("sriov_stride"), &format!("{}\n", spec.stride))?;
            let vfdev = spec.vf_device.as_deref().unwrap_or(&spec.device);
            write(&dir.join("sriov_vf_device"), &format!("{vfdev}\n"))?;
        }
        if let Some(ifname) = &spec.netdev {
            create_netdev(&self.root, pci, ifname, spec.link_type, spec.carrier)?;
        }
        let mut vf_specs = vf_specs;
        vf_specs.resize(total as usize, VfSpec::default());
        self.pfs.insert(
            pci,
            PfState {
                spec,
                total_vfs: total,
                vf_specs,
                num_vfs: 0,
            },
        );
        if num_vfs > 0 {
            self.set_num_vfs(&pci.to_string(), num_vfs)?;
        }
        Ok(())
    }

    fn create_vf(&mut self, pf: PciAddress, index: u32) -> Result<(), FixtureError> {
        let (spec, vspec) = {
            let st = self.state(pf)?;
            let v = st.vf_specs.get(index as usize).cloned().unwrap_or_default();
            (st.spec.clone(), v)
        };
        let vf = vf_address(pf, &spec, index)?;
        let group = match vspec.iommu_group {
            Some(g) => Some(g),
            None if spec.auto_groups => Some(self.alloc_group()),
            None => None,
        };
        let vf_device = spec.vf_device.as_deref().unwrap_or(&spec.device);
        let dir = create_device(
            &self.root,
            vf,
            &DevAttrs {
                vendor: &spec.vendor,
                device: vf_device,
                class: &spec.class,
                numa: vspec.numa.unwrap_or(spec.numa),
                driver: vspec.driver.as_deref(),
                iommu_group: group,
            },
        )?;
        link(&format!("../{pf}"), &dir.join("physfn"))?;
        link(
            &format!("../{vf}"),
            &self.dev_dir(pf).join(format!("virtfn{index}")),
        )?;
        if let Some(ifname) = &vspec.netdev {
            create_netdev(&self.root, vf, ifname, spec.link_type, true)?;
        }
        Ok(())
    }

    /// Removes a device and every link to it.
    fn remove_device(&self, pci: PciAddress) -> Result<(), FixtureError> {
        let dir = self.dev_dir(pci);
        rebind_at(&self.root, pci, None)?;
        // A netdev without a bound driver cannot exist on a real host, but tests may build one.
        for n in list(&dir.join("net"))? {
            remove_netdev(&self.root, pci, &n)?;
        }
        if let Ok(target) = fs::read_link(dir.join("iommu_group")) {
            let group_dir = dir.join(target);
            let l = group_dir.join("devices").join(pci.to_string());
            remove_if_exists(&l)?;
        }
        remove_if_exists(&self.root.join("bus/pci/devices").join(pci.to_string()))?;
        fs::remove_dir_all(&dir).map_err(io_err("remove_dir_all", &dir))
    }
}

/// Describes one PF; finish with [`PfBuilder::build`].
#[must_use = "nothing is written until build()"]
pub struct PfBuilder<'a> {
    b: &'a mut SysfsBuilder,
    pci: String,
    spec: PfSpec,
    #[allow(clippy::type_complexity)]
    vfs: Option<(u32, Box<dyn FnMut(u32) -> VfSpec + 'a>)>,
}

impl std::fmt::Debug for PfBuilder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PfBuilder")
            .field("pci", &self.pci)
            .field("spec", &self.spec)
            .finish()
    }
}

impl<'a> PfBuilder<'a> {
    /// Vendor ID without `0x` (`8086`, `15b3`).
    pub fn vendor(mut self, v: &str) -> Self {
        self.spec.vendor = v.into();
        self
    }
    /// Device ID without `0x`.
    pub fn device(mut self, d: &str) -> Self {
        self.spec.device = d.into();
        self
    }
    /// Device ID of the VFs (default: the PF's).
    pub fn vf_device(mut self, d: &str) -> Self {
        self.spec.vf_device = Some(d.into());
        self
    }
    /// PCI class, e.g. `0x020000` (ethernet), `0x020700` (infiniband).
    pub fn class(mut self, c: &str) -> Self {
        self.spec.class = c.into();
        self
    }
    /// Bound driver.
    pub fn driver(mut self, d: &str) -> Self {
        self.spec.driver = Some(d.into());
        self
    }
    /// The PF's netdev.
    pub fn netdev(mut self, n: &str) -> Self {
        self.spec.netdev = Some(n.into());
        self
    }
    /// ARPHRD link type of the netdevs (1 ethernet, 32 infiniband).
    pub fn link_type(mut self, arphrd: u32) -> Self {
        self.spec.link_type = arphrd;
        self
    }
    /// Carrier of the PF netdev.
    pub fn carrier(mut self, up: bool) -> Self {
        self.spec.carrier = up;
        self
    }
    /// `numa_node` (-1: none).
    pub fn numa(mut self, n: i32) -> Self {
        self.spec.numa = n;
        self
    }
    /// `false`: a plain PCI device without SR-IOV capability (no `sriov_*` files).
    pub fn sriov(mut self, yes: bool) -> Self {
        self.spec.sriov = yes;
        self
    }
    /// `sriov_totalvfs`.
    pub fn total_vfs(mut self, n: u32) -> Self {
        self.spec.total_vfs = Some(n);
        self
    }
    /// First VF offset and VF stride, in routing IDs (the kernel's `sriov_offset`/`_stride`).
    pub fn vf_layout(mut self, offset: u32, stride: u32) -> Self {
        self.spec.offset = offset;
        self.spec.stride = stride.max(1);
        self
    }
    /// The PF's IOMMU group (default: next free one).
    pub fn iommu_group(mut self, g: u32) -> Self {
        self.spec.iommu_group = Some(g);
        self
    }
    /// `false`: devices without an explicit group get no `iommu_group` link (IOMMU off).
    pub fn auto_iommu_groups(mut self, yes: bool) -> Self {
        self.spec.auto_groups = yes;
        self
    }
    /// Enables `n` VFs (`sriov_numvfs = n`); `spec(i)` describes VF `i`. It is also asked for
    /// indices up to `sriov_totalvfs` so that a later `set_num_vfs` can grow the PF.
    pub fn vfs(mut self, n: u32, spec: impl FnMut(u32) -> VfSpec + 'a) -> Self {
        self.vfs = Some((n, Box::new(spec)));
        self
    }

    /// Writes the PF, its VFs and all links. Returns the PF's address.
    pub fn build(self) -> Result<PciAddress, FixtureError> {
        let pci: PciAddress = self.pci.parse()?;
        let (n, specs) = match self.vfs {
            Some((n, mut f)) => {
                let total = self.spec.total_vfs.unwrap_or(n.max(64));
                (n, (0..total.max(n)).map(&mut f).collect())
            }
            None => (0, Vec::new()),
        };
        if !self.spec.sriov && n > 0 {
            return Err(FixtureError::Invalid(format!(
                "{pci}: VFs on a non-SR-IOV device"
            )));
        }
        self.b.insert_pf(pci, self.spec, specs, n)?;
        Ok(pci)
    }
}

fn vf_address(pf: PciAddress, spec: &PfSpec, index: u32) -> Result<PciAddress, FixtureError> {
    let rid = (u32::from(pf.bus) << 8) | (u32::from(pf.device) << 3) | u32::from(pf.function);
    let vf = rid + spec.offset + index * spec.stride;
    let bus = u8::try_from(vf >> 8)
        .map_err(|_| FixtureError::Invalid(format!("VF {index} of {pf} is past bus 0xff")))?;
    let devfn = (vf & 0xff) as u8;
    PciAddress::new(pf.domain, bus, devfn >> 3, devfn & 7)
        .ok_or_else(|| FixtureError::Invalid(format!("VF {index} of {pf}: bad devfn")))
}

struct DevAttrs<'s> {
    vendor: &'s str,
    device: &'s str,
    class: &'s str,
    numa: i32,
    driver: Option<&'s str>,
    iommu_group: Option<u32>,
}

fn create_device(root: &Path, pci: PciAddress, a: &DevAttrs<'_>) -> Result<PathBuf, FixtureError> {
    let bdf = pci.to_string();
    let dir = root.join(PCI_PARENT).join(&bdf);
    mkdir(&dir)?;
    write(&dir.join("vendor"), &format!("0x{}\n", a.vendor))?;
    write(&dir.join("device"), &format!("0x{}\n", a.device))?;
    write(&dir.join("class"), &format!("{}\n", a.class))?;
    write(&dir.join("numa_node"), &format!("{}\n", a.numa))?;
    // The kernel shows an unset override as "(null)".
    write(&dir.join("driver_override"), "(null)\n")?;
    // Write-only in the kernel; present when the device has a reset method (VFs: FLR).
    write(&dir.join("reset"), "")?;
    let bus_devices = root.join("bus/pci/devices");
    mkdir(&bus_devices)?;
    link(
        &format!("../../../{PCI_PARENT}/{bdf}"),
        &bus_devices.join(&bdf),
    )?;
    if let Some(g) = a.iommu_group {
        let gdir = root.join("kernel/iommu_groups").join(g.to_string());
        let gdevs = gdir.join("devices");
        if !gdevs.exists() {
            mkdir(&gdevs)?;
            write(&gdir.join("type"), "DMA\n")?;
        }
        link(
            &format!("../../../../{PCI_PARENT}/{bdf}"),
            &gdevs.join(&bdf),
        )?;
        link(
            &format!("../../../../kernel/iommu_groups/{g}"),
            &dir.join("iommu_group"),
        )?;
    }
    if let Some(d) = a.driver {
        bind_link(root, pci, d)?;
    }
    Ok(dir)
}

/// Creates `bus/pci/drivers/<drv>/` (with `bind`, `unbind` and `new_id`) if needed.
fn ensure_driver(root: &Path, driver: &str) -> Result<PathBuf, FixtureError> {
    if driver.is_empty() || driver.contains('/') || driver.contains(char::is_whitespace) {
        return Err(FixtureError::Invalid(format!("driver name {driver:?}")));
    }
    let pci = root.join("bus/pci");
    let d = pci.join("drivers").join(driver);
    if !d.exists() {
        mkdir(&d)?;
        for f in ["bind", "unbind", "new_id", "remove_id"] {
            write(&d.join(f), "")?;
        }
        let probe = pci.join("drivers_probe");
        if !probe.exists() {
            write(&probe, "")?;
        }
    }
    Ok(d)
}

fn bind_link(root: &Path, pci: PciAddress, driver: &str) -> Result<(), FixtureError> {
    let bdf = pci.to_string();
    let ddir = ensure_driver(root, driver)?;
    link(&format!("../../../../{PCI_PARENT}/{bdf}"), &ddir.join(&bdf))?;
    link(
        &format!("../../../../bus/pci/drivers/{driver}"),
        &root.join(PCI_PARENT).join(&bdf).join("driver"),
    )
}

/// Rebinds using only the tree (no builder state), so [`FixtureKernel`] can call it.
fn rebind_at(root: &Path, pci: PciAddress, driver: Option<&str>) -> Result<(), FixtureError> {
    let bdf = pci.to_string();
    let dir = root.join(PCI_PARENT).join(&bdf);
    if !dir.exists() {
        return Err(FixtureError::Invalid(format!("no device {bdf}")));
    }
    let dlink = dir.join("driver");
    if let Ok(target) = fs::read_link(&dlink) {
        if let Some(old) = target.file_name() {
            remove_if_exists(&root.join("bus/pci/drivers").join(old).join(&bdf))?;
        }
        fs::remove_file(&dlink).map_err(io_err("remove", &dlink))?;
        // Unbinding a network driver unregisters its netdevs.
        for n in list(&dir.join("net"))? {
            remove_netdev(root, pci, &n)?;
        }
    }
    if let Some(d) = driver {
        bind_link(root, pci, d)?;
    }
    Ok(())
}

fn create_netdev(
    root: &Path,
    pci: PciAddress,
    ifname: &str,
    link_type: u32,
    carrier: bool,
) -> Result<(), FixtureError> {
    let bdf = pci.to_string();
    let net = root.join(PCI_PARENT).join(&bdf).join("net").join(ifname);
    mkdir(&net)?;
    write(&net.join("type"), &format!("{link_type}\n"))?;
    write(&net.join("carrier"), if carrier { "1\n" } else { "0\n" })?;
    write(
        &net.join("operstate"),
        if carrier { "up\n" } else { "down\n" },
    )?;
    // A stable, locally administered MAC derived from the address.
    let mac = format!(
        "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}\n",
        (pci.domain & 0xff) as u8,
        pci.bus,
        pci.device,
        pci.function,
        ifname.len() as u8
    );
    write(&net.join("address"), &mac)?;
    link(&format!("../../../{bdf}"), &net.join("device"))?;
    let class = root.join("class/net");
    mkdir(&class)?;
    link(
        &format!("../../{PCI_PARENT}/{bdf}/net/{ifname}"),
        &class.join(ifname),
    )
}

fn remove_netdev(root: &Path, pci: PciAddress, ifname: &str) -> Result<(), FixtureError> {
    let net = root
        .join(PCI_PARENT)
        .join(pci.to_string())
        .join("net")
        .join(ifname);
    remove_if_exists(&root.join("class/net").join(ifname))?;
    fs::remove_dir_all(&net).map_err(io_err("remove_dir_all", &net))
}

fn mkdir(p: &Path) -> Result<(), FixtureError> {
    fs::create_dir_all(p).map_err(io_err("mkdir", p))
}

fn write(p: &Path, content: &str) -> Result<(), FixtureError> {
    fs::write(p, content).map_err(io_err("write", p))
}

fn link(target: &str, at: &Path) -> Result<(), FixtureError> {
    symlink(target, at).map_err(io_err("symlink", at))
}

fn remove_if_exists(p: &Path) -> Result<(), FixtureError> {
    match fs::remove_file(p) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(FixtureError::Io {
            op: "remove",
            path: p.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}

fn list(dir: &Path) -> Result<Vec<String>, FixtureError> {
    match fs::read_dir(dir) {
        Ok(it) => {
            let mut v = Vec::new();
            for e in it {
                let e = e.map_err(io_err("read_dir", dir))?;
                v.push(e.file_name().to_string_lossy().into_owned());
            }
            v.sort();
            Ok(v)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(FixtureError::Io {
            op: "read_dir",
            path: dir.to_path_buf(),
            source: e,
        }),
    }
}

/// A [`SysfsWriter`] that plays the kernel on a fixture tree: each write lands in the file (so
/// tests can read it back) and is logged in order, then the kernel's reaction is simulated:
/// a BDF written to `…/driver/unbind` unbinds the device, a BDF written to
/// `bus/pci/drivers_probe` binds it to its `driver_override` (if set), a BDF written to
/// `bus/pci/drivers/<drv>/bind` binds it to `<drv>`.
#[derive(Debug)]
pub struct FixtureKernel {
    root: PathBuf,
    log: Mutex<Vec<(PathBuf, String)>>,
}

impl FixtureKernel {
    /// A kernel for the tree under `root`.
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            log: Mutex::new(Vec::new()),
        }
    }

    /// Every write so far: (path relative to the root when possible, value).
    pub fn writes(&self) -> Vec<(PathBuf, String)> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    fn react(&self, path: &Path, value: &str) -> Result<(), FixtureError> {
        let rel = path.strip_prefix(&self.root).unwrap_or(path);
        let name = rel.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let parse = |v: &str| v.trim().parse::<PciAddress>();
        if rel == Path::new("bus/pci/drivers_probe") {
            let pci = parse(value)?;
            let ov = fs::read_to_string(
                self.root
                    .join(PCI_PARENT)
                    .join(pci.to_string())
                    .join("driver_override"),
            )
            .map_err(io_err("read", path))?;
            let ov = ov.trim();
            let bound = self
                .root
                .join(PCI_PARENT)
                .join(pci.to_string())
                .join("driver");
            if !ov.is_empty() && ov != "(null)" && fs::symlink_metadata(&bound).is_err() {
                rebind_at(&self.root, pci, Some(ov))?;
            }
        } else if name == "unbind" {
            rebind_at(&self.root, parse(value)?, None)?;
        } else if name == "bind" && rel.starts_with("bus/pci/drivers") {
            let drv = rel
                .parent()
                .and_then(|p| p.file_name())
                .and_then(|n| n.to_str())
                .ok_or_else(|| FixtureError::Invalid(format!("bind path {}", rel.display())))?;
            rebind_at(&self.root, parse(value)?, Some(drv))?;
        }
        Ok(())
    }
}

impl SysfsWriter for FixtureKernel {
    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        fs::write(path, value)?;
        let rel = path.strip_prefix(&self.root).unwrap_or(path).to_path_buf();
        if let Ok(mut log) = self.log.lock() {
            log.push((rel, value.to_owned()));
        }
        // "driver_override" writes with "\n" clear it in the real kernel; the file holds it.
        self.react(path, value).map_err(io::Error::other)
    }
}

/// The PF of [`vfio_node`].
pub const VFIO_NODE_PF: &str = "0000:af:00.0";

/// A fake node under `root` for vfplugd: `<root>/sys` with one PF ([`VFIO_NODE_PF`], netdev
/// `ens1f0`) whose `n` VFs sit on vfio-pci, and `<root>/config.yaml` with one vfio pool `vm`
/// (`vfplug.io/vm`) over them. Returns the VFs, VF 0 first.
pub fn vfio_node(root: &Path, n: u32) -> Result<Vec<PciAddress>, FixtureError> {
    let mut b = SysfsBuilder::new(&root.join("sys"));
    b.pf(VFIO_NODE_PF)
        .driver("ice")
        .netdev("ens1f0")
        .vfs(n, |_| VfSpec::new().driver("vfio-pci"))
        .build()?;
    let cfg = root.join("config.yaml");
    std::fs::write(
        &cfg,
        "pools:\n  - name: vm\n    deviceMode: vfio\n    selectors: { pfNames: [ens1f0] }\n",
    )
    .map_err(io_err("write", &cfg))?;
    (0..n).map(|i| b.vf_address(VFIO_NODE_PF, i)).collect()
}

/// The command that runs vfplugd (`bin`) on [`vfio_node`]'s tree under `root`, with its ledger in
/// `state`: node API at `<root>/vfplugd.sock`, kubelet dir `<root>/kubelet`, simulated PF,
/// device-info files in `<root>/devinfo`, HTTP on an ephemeral port, `RUST_LOG=warn`. Add flags
/// and set up stdio as the test needs.
pub fn vfplugd_command(bin: &Path, root: &Path, state: &Path) -> std::process::Command {
    let mut c = std::process::Command::new(bin);
    c.arg("--sysfs-root")
        .arg(root.join("sys"))
        .arg("--kubelet-dir")
        .arg(root.join("kubelet"))
        .arg("--state-dir")
        .arg(state)
        .arg("--socket")
        .arg(root.join("vfplugd.sock"))
        .args(["--vf-netlink", "simulated"])
        .arg("--config")
        .arg(root.join("config.yaml"))
        .arg("--device-info-dir")
        .arg(root.join("devinfo"))
        .args(["--http-addr", "127.0.0.1:0"])
        .env("RUST_LOG", "warn");
    c
}
