//! The agent's `vfplugd` phase: the real `vfplugd` and the real `vfplug` CNI binary (both built on
//! the host, staged in /lab) on the igb PF's real VFs in L1. No kubelet: registration retries in
//! the background, which must not stop the node API from being ready (docs/node-api.md).
//!
//! VF 0 is a netdev pool (`rootDevices: <pf>#0`), VF 1 a vfio pool with `bindVfio`. The CNI binary
//! is exec'd as a runtime would (`CNI_*` env, config on stdin) into a netns made by `ip netns
//! add`; what happened is read back with the host's iproute2, sysfs and vfplugd's `List`, never
//! from vfplugd's own answer alone.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vfplug_api::v1::node_client::NodeClient;
use vfplug_api::v1::{ListRequest, VfEntry};
use vfplug_core::MacAddr;
use vfplug_core::pci::PciAddress;
use vfplug_host::net::{VfNetlink, VfSettings};
use vfplug_host::rtnl::RtVfNetlink;

use crate::agent::{AGENT_PREFIX, figure, iproute2_mismatches, iproute2_vf_line, pass};
use crate::sriov::Sysfs;

type Step<T> = Result<T, String>;

/// vfplugd's files in L1 (tmpfs: unix sockets do not work on the 9p share).
pub(crate) const DIR: &str = "/tmp/vfplugd";
/// The pod's netns, made with `ip netns add`.
const NETNS: &str = "labpod";
/// Settings the netdev ADD asks for; the test on the host checks them in the PASS lines.
pub const NETDEV_MAC: &str = "02:00:00:00:00:64";
/// VLAN of the netdev ADD.
pub const NETDEV_VLAN: u16 = 100;
/// VLAN of the vfio ADD.
pub const VFIO_VLAN: u16 = 200;
const NET_POOL: &str = "lab_net";
const VFIO_POOL: &str = "lab_vfio";
/// host-local in the host's /usr (Debian's containernetworking-plugins), if installed.
const HOST_LOCAL_DIR: &str = "/usr/lib/cni";
/// At most this many lines of vfplugd's log are copied to the serial console.
pub(crate) const LOG_LINES: usize = 400;

/// Paths of the two host-built binaries in L1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binaries {
    /// `vfplugd`.
    pub vfplugd: PathBuf,
    /// The `vfplug` CNI plugin.
    pub cni: PathBuf,
}

pub(crate) fn sock() -> PathBuf {
    Path::new(DIR).join("vfplugd.sock")
}

pub(crate) fn log_path() -> PathBuf {
    Path::new(DIR).join("vfplugd.log")
}

/// The pool config vfplugd reads: one pool per VF, selected by the PF's address and VF index.
pub fn pool_config(pf: &PciAddress) -> String {
    format!(
        "resourcePrefix: vfplug.io\npools:\n  - name: {NET_POOL}\n    deviceMode: netdev\n    \
         selectors:\n      rootDevices: [\"{pf}#0\"]\n  - name: {VFIO_POOL}\n    deviceMode: vfio\n    \
         bindVfio: true\n    selectors:\n      rootDevices: [\"{pf}#1\"]\n"
    )
}

/// The netdev NAD's config: `deviceID` (as Multus passes it), MAC, VLAN, spoofchk, and host-local
/// when it is there. `extra` is spliced in (e.g. `"prevResult": {...}`).
pub fn netdev_config(vf: &PciAddress, ipam: bool, extra: &str) -> String {
    let ipam = if ipam {
        format!(
            ",\"ipam\":{{\"type\":\"host-local\",\"dataDir\":\"{DIR}/ipam\",\
             \"ranges\":[[{{\"subnet\":\"10.99.0.0/24\"}}]]}}"
        )
    } else {
        String::new()
    };
    format!(
        "{{\"cniVersion\":\"1.1.0\",\"name\":\"labnet\",\"type\":\"vfplug\",\"socket\":\"{}\",\
         \"deviceID\":\"{vf}\",\"mac\":\"{NETDEV_MAC}\",\"vlan\":{NETDEV_VLAN},\"spoofchk\":\"off\"\
         {ipam}{extra}}}",
        sock().display()
    )
}

/// The vfio NAD's config: a `pool`, no `deviceID` (vfplugd picks the VF), a VLAN, no IPAM.
pub fn vfio_config() -> String {
    format!(
        "{{\"cniVersion\":\"1.1.0\",\"name\":\"labvm\",\"type\":\"vfplug\",\"socket\":\"{}\",\
         \"pool\":\"{VFIO_POOL}\",\"vlan\":{VFIO_VLAN}}}",
        sock().display()
    )
}

/// The `vfplug` CNI binary, exec'd as a runtime does: into `netns`, for pods named by their
/// container ID, with `K8S_POD_UID` when the pod is a VM pod (its volumes are found by UID).
pub(crate) struct Cni<'a> {
    pub(crate) bin: &'a Path,
    /// The pod's netns name (`ip netns add`).
    pub(crate) netns: &'a str,
    /// `K8S_POD_UID` for `CNI_ARGS`, if any.
    pub(crate) pod_uid: Option<&'a str>,
}

/// One exec of the plugin: exit status, stdout, stderr.
pub(crate) struct CniOut {
    pub(crate) ok: bool,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl<'a> Cni<'a> {
    /// The plugin for the container pods of the `vfplugd` phase (netns [`NETNS`], no UID).
    pub(crate) fn new(bin: &'a Path) -> Self {
        Cni {
            bin,
            netns: NETNS,
            pod_uid: None,
        }
    }

    /// Execs the plugin with only what a runtime sets (`CNI_*` and a `PATH`).
    pub(crate) fn run(&self, command: &str, container: &str, stdin: &str) -> Step<CniOut> {
        let mut args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=lab;K8S_POD_NAME={container}");
        if let Some(uid) = self.pod_uid {
            args.push_str(&format!(";K8S_POD_UID={uid}"));
        }
        let mut child = Command::new(self.bin)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container)
            .env("CNI_NETNS", format!("/var/run/netns/{}", self.netns))
            .env("CNI_IFNAME", "net1")
            .env("CNI_PATH", HOST_LOCAL_DIR)
            .env("CNI_ARGS", args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("exec {}: {e}", self.bin.display()))?;
        if let Some(mut i) = child.stdin.take() {
            i.write_all(stdin.as_bytes())
                .map_err(|e| format!("CNI stdin: {e}"))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| format!("CNI {command}: {e}"))?;
        Ok(CniOut {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Runs `command` and fails the step unless the plugin exits 0.
    pub(crate) fn ok(&self, command: &str, container: &str, stdin: &str) -> Step<String> {
        let o = self.run(command, container, stdin)?;
        if o.ok {
            Ok(o.stdout)
        } else {
            Err(format!(
                "CNI {command} failed: stdout {:?} stderr {:?}",
                o.stdout.trim(),
                o.stderr.trim()
            ))
        }
    }
}

pub(crate) fn ip(args: &[&str]) -> Step<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {args:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip ARGS` in the pod's netns. Not `ip -n`: that also makes / a slave mount, which L1's chroot
/// (a directory of the initramfs, not a mount point) refuses; `nsenter --net` enters only the netns.
fn in_pod(args: &[&str]) -> Step<String> {
    let ns = format!("--net=/var/run/netns/{NETNS}");
    let out = Command::new("nsenter")
        .arg(&ns)
        .arg("ip")
        .args(args)
        .output()
        .map_err(|e| format!("nsenter {ns} ip {args:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "nsenter {ns} ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The `vf N` line of `ip link show <pf>`.
pub(crate) fn vf_line(pf_dev: &str, vf: u32) -> Step<String> {
    let out = ip(&["link", "show", "dev", pf_dev])?;
    iproute2_vf_line(&out, vf)
        .map(str::to_owned)
        .ok_or_else(|| format!("no `vf {vf}` line in `ip link show {pf_dev}`:\n{out}"))
}

/// iproute2's VF line must show exactly `want` (MAC, VLAN, QoS, rates, spoofchk, trust).
pub(crate) fn vf_line_is(pf_dev: &str, vf: u32, want: &VfSettings) -> Step<String> {
    let line = vf_line(pf_dev, vf)?;
    let bad = iproute2_mismatches(&line, want);
    if bad.is_empty() {
        Ok(line)
    } else {
        Err(format!("{}; line: {line:?}", bad.join("; ")))
    }
}

fn netdevs(sys: &Sysfs, dev: &PciAddress) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(sys.device(dev).join("net"))
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

pub(crate) fn driver(sys: &Sysfs, vf: &PciAddress) -> Step<String> {
    sys.driver(vf)
        .map_err(|e| e.to_string())
        .map(|d| d.unwrap_or_else(|| "none".into()))
}

/// Waits (30 s at most) until `vf` is on `want`: vfplugd binds a bindVfio pool's VFs when the
/// pool starts, which need not be done when STATUS first says ready.
pub(crate) fn wait_driver(sys: &Sysfs, vf: &PciAddress, want: &str) -> Step<String> {
    let t = Instant::now();
    loop {
        let d = driver(sys, vf)?;
        if d == want {
            return Ok(d);
        }
        if t.elapsed() > Duration::from_secs(30) {
            return Err(format!("{vf} is on {d} after 30 s, want {want}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// vfplugd's `List`, on a connection of its own that is closed on return: a runtime of its own
/// on a thread of its own, dropped at the end. (A connection left open by a runtime that is not
/// polled, as the agent's is while it waits for processes, would hold up vfplugd's graceful
/// shutdown, which waits for its clients to go.)
pub(crate) async fn list(sock: &Path) -> Step<Vec<VfEntry>> {
    let sock = sock.to_path_buf();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("List: runtime: {e}"))?;
        rt.block_on(async {
            let ch = vfplug_api::connect(&sock, Duration::from_secs(10))
                .await
                .map_err(|e| format!("List: {e}"))?;
            let r = NodeClient::new(ch)
                .list(ListRequest {})
                .await
                .map_err(|s| format!("List: {s}"))?;
            Ok(r.into_inner().vfs)
        })
    })
    .join()
    .map_err(|_| "List: thread panicked".to_owned())?
}

/// `state/pool/owner` of `vf` in vfplugd's `List`.
pub(crate) async fn listed(vf: &PciAddress) -> Step<String> {
    let vfs = list(&sock()).await?;
    let want = vf.to_string();
    let e = vfs
        .iter()
        .find(|e| e.pci_address == want)
        .ok_or_else(|| format!("List has no {want}: {vfs:?}"))?;
    let owner = e.owner.as_ref().map_or(String::new(), |o| {
        format!("{}/{}", o.container_id, o.ifname)
    });
    Ok(format!(
        "state={} pool={} owner={owner} driver={}",
        e.state, e.pool, e.driver
    ))
}

pub(crate) async fn expect_listed(
    vf: &PciAddress,
    state: &str,
    owner: Option<&str>,
) -> Step<String> {
    let got = listed(vf).await?;
    let mut ok = got.starts_with(&format!("state={state} "));
    if let Some(o) = owner {
        ok &= got.contains(&format!(" owner={o}/net1 "));
    }
    if ok {
        Ok(got)
    } else {
        Err(format!("List: want {state} {owner:?}, got {got}"))
    }
}

/// vfplugd as a child process, its log appended to [`log_path`].
pub(crate) struct Daemon {
    child: Option<Child>,
}

impl Daemon {
    /// vfplugd with the lab's paths (all under [`DIR`]) and `extra` arguments.
    pub(crate) fn start(bin: &Path, extra: &[&str]) -> Step<Daemon> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path())
            .map_err(|e| format!("{}: {e}", log_path().display()))?;
        let err = log.try_clone().map_err(|e| format!("log: {e}"))?;
        let d = |s: &str| format!("{DIR}/{s}");
        let child = Command::new(bin)
            .args(["--node-name", "vmlab-l1", "--sysfs-root", "/sys"])
            .args(["--vf-netlink", "netlink", "--kubelet-dir", &d("kubelet")])
            .args(["--state-dir", &d("state"), "--socket", &d("vfplugd.sock")])
            .args(["--config", &d("config.yaml")])
            .args(["--device-info-dir", &d("devinfo"), "--cdi-dir", &d("cdi")])
            .args(["--http-addr", "127.0.0.1:9464"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("exec {}: {e}", bin.display()))?;
        Ok(Daemon { child: Some(child) })
    }

    /// SIGTERM (through the host's `kill`: this crate has no unsafe), then wait for the exit.
    pub(crate) fn stop(&mut self) -> Step<String> {
        let Some(mut c) = self.child.take() else {
            return Ok("not running".into());
        };
        let pid = c.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return Ok(st.to_string());
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return Err("vfplugd did not exit within 30 s of SIGTERM".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL, as a crash: no shutdown path runs. Returns the exit status.
    pub(crate) fn crash(&mut self) -> Step<String> {
        let Some(mut c) = self.child.take() else {
            return Err("vfplugd not running".into());
        };
        c.kill().map_err(|e| format!("SIGKILL vfplugd: {e}"))?;
        c.wait()
            .map(|st| st.to_string())
            .map_err(|e| format!("reaping vfplugd: {e}"))
    }

    /// Fails if vfplugd has exited on its own.
    pub(crate) fn alive(&mut self) -> Step<()> {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => Ok(()),
            Some(Ok(Some(st))) => Err(format!("vfplugd exited: {st}")),
            Some(Err(e)) => Err(format!("vfplugd: {e}")),
            None => Err("vfplugd not started".into()),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Polls the CNI STATUS (what a runtime asks) until vfplugd is ready; returns the time taken.
pub(crate) fn wait_ready(cni: &Cni<'_>, d: &mut Daemon) -> Step<Duration> {
    let t = Instant::now();
    let cfg = format!(
        "{{\"cniVersion\":\"1.1.0\",\"name\":\"labnet\",\"type\":\"vfplug\",\"socket\":\"{}\"}}",
        sock().display()
    );
    let mut last = String::new();
    while t.elapsed() < Duration::from_secs(90) {
        d.alive()?;
        let o = cni.run("STATUS", "status", &cfg)?;
        if o.ok {
            return Ok(t.elapsed());
        }
        last = o.stdout;
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!("STATUS not ready after 90 s: {}", last.trim()))
}

/// Copies both binaries to [`DIR`].
pub(crate) fn stage(bins: &Binaries) -> Step<Binaries> {
    std::fs::create_dir_all(DIR).map_err(|e| format!("{DIR}: {e}"))?;
    let copy = |from: &Path| -> Step<PathBuf> {
        let name = from
            .file_name()
            .ok_or(format!("{}: no file name", from.display()))?;
        let to = Path::new(DIR).join(name);
        std::fs::copy(from, &to)
            .map_err(|e| format!("{} -> {}: {e}", from.display(), to.display()))?;
        Ok(to)
    };
    Ok(Binaries {
        vfplugd: copy(&bins.vfplugd)?,
        cni: copy(&bins.cni)?,
    })
}

/// Everything L1 needs before vfplugd starts: loopback (its HTTP endpoint), `/var/run` for `ip
/// netns`, vfplugd's directories and config.
pub(crate) fn prepare(config: &str) -> Step<()> {
    ip(&["link", "set", "lo", "up"])?;
    // The chroot has no /var; iproute2 keeps netns files in /var/run/netns.
    std::fs::create_dir_all("/var").map_err(|e| format!("/var: {e}"))?;
    if !Path::new("/var/run").exists() {
        std::os::unix::fs::symlink("/run", "/var/run").map_err(|e| format!("/var/run: {e}"))?;
    }
    for s in ["kubelet/device-plugins", "state", "devinfo", "cdi", "ipam"] {
        let p = Path::new(DIR).join(s);
        std::fs::create_dir_all(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    let c = Path::new(DIR).join("config.yaml");
    std::fs::write(&c, config).map_err(|e| format!("{}: {e}", c.display()))
}

/// The phase; vfplugd's log is copied to the console (`VMLAB-AGENT LOG ...`) whatever happens.
pub async fn run(sys: &Sysfs, pf: &PciAddress, vfs: &[PciAddress], bins: &Binaries) -> Step<()> {
    let mut daemon = None;
    let r = steps(sys, pf, vfs, bins, &mut daemon).await;
    if let Some(mut d) = daemon
        && let Err(e) = d.stop()
    {
        println!("{AGENT_PREFIX} LOG agent: {e}");
    }
    dump_log();
    r
}

/// Copies vfplugd's log (first [`LOG_LINES`] lines) to the console for the host test.
pub(crate) fn dump_log() {
    let log = std::fs::read_to_string(log_path()).unwrap_or_default();
    for l in log.lines().take(LOG_LINES) {
        let l: String = l.chars().take(400).collect();
        println!("{AGENT_PREFIX} LOG vfplugd: {l}");
    }
}

async fn steps(
    sys: &Sysfs,
    pf: &PciAddress,
    vfs: &[PciAddress],
    bins: &Binaries,
    daemon: &mut Option<Daemon>,
) -> Step<()> {
    let [net_vf, vfio_vf, ..] = vfs else {
        return Err(format!("plugd-setup: needs 2 VFs, have {vfs:?}"));
    };
    // Run from tmpfs: 9p has no page cache, so every exec of a binary on /lab would read it
    // again through TCG's virtio.
    let t = Instant::now();
    let bins = stage(bins).map_err(|e| format!("plugd-setup: {e}"))?;
    figure("plugd.stage_binaries", t.elapsed());
    let bins = &bins;
    let cni = Cni::new(&bins.cni);
    let pf_dev = crate::agent::pf_netdev(sys, pf).map_err(|e| format!("plugd-setup: {e}"))?;
    prepare(&pool_config(pf)).map_err(|e| format!("plugd-setup: {e}"))?;
    let ipam = Path::new(HOST_LOCAL_DIR).join("host-local").is_file();
    let name0 = netdevs(sys, net_vf)
        .into_iter()
        .next()
        .ok_or_else(|| format!("plugd-setup: {net_vf} has no netdev (igbvf not bound?)"))?;
    // What vfplugd must put back: the PF's view of both VFs, through vfplug-host's netlink (the
    // vfconfig phase checks it against iproute2) and as iproute2's line.
    let nl = RtVfNetlink::new().map_err(|e| format!("plugd-setup: {e}"))?;
    let before0 = nl
        .read_vf(&pf_dev, 0)
        .map_err(|e| format!("plugd-setup: {e}"))?;
    let line0 = vf_line(&pf_dev, 0).map_err(|e| format!("plugd-setup: {e}"))?;
    let line1 = vf_line(&pf_dev, 1).map_err(|e| format!("plugd-setup: {e}"))?;
    ip(&["netns", "add", NETNS]).map_err(|e| format!("plugd-setup: {e}"))?;
    pass(
        "plugd-setup",
        &format!(
            "pf={pf} pf_dev={pf_dev} vf0={net_vf} netdev0={name0} vf1={vfio_vf} ipam={} vf0_line={line0:?} vf1_line={line1:?}",
            if ipam { "host-local" } else { "none" }
        ),
    );

    // 1. vfplugd starts, with no kubelet, and says ready.
    let d =
        daemon.insert(Daemon::start(&bins.vfplugd, &[]).map_err(|e| format!("plugd-ready: {e}"))?);
    let took = wait_ready(&cni, d).map_err(|e| format!("plugd-ready: {e}"))?;
    figure("plugd.start_to_ready", took);
    let l0 = expect_listed(net_vf, "free", None)
        .await
        .map_err(|e| format!("plugd-ready: {e}"))?;
    let l1 = expect_listed(vfio_vf, "free", None)
        .await
        .map_err(|e| format!("plugd-ready: {e}"))?;
    // A bindVfio pool's free VFs wait on vfio-pci: vfplugd binds them when the pool starts, and
    // a DEL must leave VF 1 there again.
    let drv1 = wait_driver(sys, vfio_vf, "vfio-pci").map_err(|e| format!("plugd-ready: {e}"))?;
    pass(
        "plugd-ready",
        &format!("vf0: {l0}; vf1: {l1}; vf1_driver={drv1}"),
    );

    // 2. netdev ADD, CHECK, DEL.
    let want = VfSettings {
        mac: NETDEV_MAC.parse::<MacAddr>().map_err(|e| e.to_string())?,
        vlan: NETDEV_VLAN,
        spoofchk: Some(false),
        ..before0.clone()
    };
    let add = netdev_add(&cni, net_vf, ipam, "pod-a", &pf_dev, &want, &name0)
        .await
        .map_err(|e| format!("plugd-add-netdev: {e}"))?;
    let t = Instant::now();
    let prev = format!(",\"prevResult\":{}", add.trim());
    cni.ok("CHECK", "pod-a", &netdev_config(net_vf, ipam, &prev))
        .map_err(|e| format!("plugd-check: {e}"))?;
    figure("plugd.cni_check", t.elapsed());
    pass("plugd-check", "CHECK ok");
    netdev_del(&cni, net_vf, ipam, "pod-a", &pf_dev, &line0, &name0, &prev)
        .await
        .map_err(|e| format!("plugd-del-netdev: {e}"))?;

    // 3. vfio ADD by pool, DEL.
    let t = Instant::now();
    let out = cni
        .ok("ADD", "vm-a", &vfio_config())
        .map_err(|e| format!("plugd-add-vfio: {e}"))?;
    figure("plugd.cni_add_vfio", t.elapsed());
    let step = |e: String| format!("plugd-add-vfio: {e}");
    if !out.contains(&format!("\"pciID\":\"{vfio_vf}\"")) {
        return Err(step(format!("result does not name {vfio_vf}: {out}")));
    }
    let drv = driver(sys, vfio_vf).map_err(step)?;
    if drv != "vfio-pci" {
        return Err(step(format!("{vfio_vf} is on {drv}, not vfio-pci")));
    }
    let group = sys.iommu_group(vfio_vf).map_err(|e| step(e.to_string()))?;
    if !Path::new(&format!("/dev/vfio/{group}")).exists() {
        return Err(step(format!("/dev/vfio/{group} missing")));
    }
    let l = vf_line(&pf_dev, 1).map_err(step)?;
    if !l.split(", ").any(|f| f == format!("vlan {VFIO_VLAN}")) {
        return Err(step(format!("vf 1 line has no `vlan {VFIO_VLAN}`: {l:?}")));
    }
    let listed_now = expect_listed(vfio_vf, "configured", Some("vm-a"))
        .await
        .map_err(step)?;
    pass(
        "plugd-add-vfio",
        &format!("vf={vfio_vf} driver={drv} group={group} {listed_now} line={l:?}"),
    );

    let t = Instant::now();
    cni.ok("DEL", "vm-a", &vfio_config())
        .map_err(|e| format!("plugd-del-vfio: {e}"))?;
    figure("plugd.cni_del_vfio", t.elapsed());
    let step = |e: String| format!("plugd-del-vfio: {e}");
    let drv = driver(sys, vfio_vf).map_err(step)?;
    if drv != drv1 {
        return Err(step(format!("{vfio_vf} is on {drv}, was on {drv1}")));
    }
    let after1 = vf_line(&pf_dev, 1).map_err(step)?;
    let l = expect_listed(vfio_vf, "free", None).await.map_err(step)?;
    pass(
        "plugd-del-vfio",
        &format!(
            "vf={vfio_vf} driver={drv} {l} line={after1:?} line_before={line1:?} same={}",
            after1 == line1
        ),
    );

    // 4. An ADD, vfplugd restarted (SIGTERM), then CHECK and DEL from the ledger it reloaded.
    let add_b = netdev_add(&cni, net_vf, ipam, "pod-b", &pf_dev, &want, &name0)
        .await
        .map_err(|e| format!("plugd-restart: {e}"))?;
    let step = |e: String| format!("plugd-restart: {e}");
    let d = daemon.as_mut().ok_or("plugd-restart: no vfplugd")?;
    let t = Instant::now();
    let st = d.stop().map_err(step)?;
    figure("plugd.sigterm_to_exit", t.elapsed());
    // A stopped vfplugd must leave the VF as it was: still the pod's, settings untouched.
    vf_line_is(&pf_dev, 0, &want).map_err(step)?;
    let d = daemon.insert(Daemon::start(&bins.vfplugd, &[]).map_err(step)?);
    let took = wait_ready(&cni, d).map_err(step)?;
    figure("plugd.restart_to_ready", took);
    let l = expect_listed(net_vf, "configured", Some("pod-b"))
        .await
        .map_err(step)?;
    // The runtime may repeat an ADD: answered from the reloaded ledger, the same result.
    let again = cni
        .ok("ADD", "pod-b", &netdev_config(net_vf, ipam, ""))
        .map_err(|e| step(format!("repeated ADD after restart: {e}")))?;
    if again.trim() != add_b.trim() {
        return Err(step(format!(
            "repeated ADD after restart answered {again:?}, the first ADD {add_b:?}"
        )));
    }
    let prev_b = format!(",\"prevResult\":{}", add_b.trim());
    cni.ok("CHECK", "pod-b", &netdev_config(net_vf, ipam, &prev_b))
        .map_err(|e| step(format!("CHECK after restart: {e}")))?;
    pass(
        "plugd-restart",
        &format!("exit={st} {l} repeated_add=same check=ok"),
    );
    netdev_del(
        &cni, net_vf, ipam, "pod-b", &pf_dev, &line0, &name0, &prev_b,
    )
    .await
    .map_err(|e| format!("plugd-del-after-restart: {e}"))?;
    Ok(())
}

/// ADD in netdev mode and everything read back; returns the CNI result.
async fn netdev_add(
    cni: &Cni<'_>,
    vf: &PciAddress,
    ipam: bool,
    container: &str,
    pf_dev: &str,
    want: &VfSettings,
    name: &str,
) -> Step<String> {
    let first = container == "pod-a";
    let t = Instant::now();
    let out = cni.ok("ADD", container, &netdev_config(vf, ipam, ""))?;
    figure(
        if first {
            "plugd.cni_add_netdev"
        } else {
            "plugd.cni_add_netdev_again"
        },
        t.elapsed(),
    );
    if !out.contains(&format!("\"pciID\":\"{vf}\"")) {
        return Err(format!("result does not name {vf}: {out}"));
    }
    // The PF's view: exactly the requested MAC, VLAN and spoofchk, the rest as before.
    let line = vf_line_is(pf_dev, 0, want)?;
    // The netdev is in the pod under CNI_IFNAME, with the MAC, and gone from the root netns.
    let pod = in_pod(&["-o", "link", "show", "net1"])?;
    if !pod.contains(&format!("link/ether {NETDEV_MAC}")) {
        return Err(format!("net1 in {NETNS} lacks MAC {NETDEV_MAC}: {pod}"));
    }
    if ip(&["link", "show", name]).is_ok() {
        return Err(format!("{name} still in the root netns"));
    }
    let addr = if ipam {
        let a = in_pod(&["-o", "-4", "addr", "show", "net1"])?;
        let got = a
            .split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .unwrap_or_default()
            .to_owned();
        if !got.starts_with("10.99.0.") {
            return Err(format!("net1 in {NETNS} has no host-local address: {a}"));
        }
        got
    } else {
        "none".into()
    };
    let l = expect_listed(vf, "configured", Some(container)).await?;
    let step = if first {
        "plugd-add-netdev"
    } else {
        "plugd-add-netdev-again"
    };
    pass(
        step,
        &format!("vf={vf} netns={NETNS} ifname=net1 addr={addr} {l} line={line:?}"),
    );
    Ok(out)
}

/// DEL in netdev mode: the netdev home under its name, the PF's view as before, List free.
#[allow(clippy::too_many_arguments)]
async fn netdev_del(
    cni: &Cni<'_>,
    vf: &PciAddress,
    ipam: bool,
    container: &str,
    pf_dev: &str,
    line_before: &str,
    name: &str,
    prev: &str,
) -> Step<()> {
    let first = container == "pod-a";
    let t = Instant::now();
    cni.ok("DEL", container, &netdev_config(vf, ipam, prev))?;
    figure(
        if first {
            "plugd.cni_del_netdev"
        } else {
            "plugd.cni_del_after_restart"
        },
        t.elapsed(),
    );
    ip(&["link", "show", name]).map_err(|e| format!("{name} not back in the root netns: {e}"))?;
    let pod = in_pod(&["-o", "link", "show"])?;
    if pod.contains("net1") {
        return Err(format!("net1 still in {NETNS}: {pod}"));
    }
    let line = vf_line(pf_dev, 0)?;
    if line != line_before {
        return Err(format!(
            "vf 0 not restored: before {line_before:?}, after {line:?}"
        ));
    }
    let l = expect_listed(vf, "free", None).await?;
    let step = if first {
        "plugd-del-netdev"
    } else {
        "plugd-del-after-restart"
    };
    pass(
        step,
        &format!("vf={vf} netdev={name} restored=true {l} line={line:?}"),
    );
    Ok(())
}
