//! The agent's `vmpod` phases: L2 is a VM pod, and the real vfplugd in L1 hot-plugs a real VF
//! into it through the real `vfplug` CNI binary (issue 9, docs/vm-pods.md).
//!
//! The pod: a kubelet dir on L1's tmpfs ([`KUBELET`]), a pod UID in UUID form, the emptyDir
//! volume `qmp` at `pods/<uid>/volumes/kubernetes.io~empty-dir/qmp/`, and L2's QEMU (run as root,
//! a trusted owner) with its QMP socket `qmp.sock` in that volume plus a *second* monitor in the
//! VM's own directory that only the agent uses, to observe (`qom-list`, `qom-get`, `query-pci`)
//! and to act as the guest would not (`system_reset`). L2's root ports are `vfplug-rp1..3`
//! (vfplugd's default `--vm-port-prefix`). The ADD names no `deviceID`: vfplugd picks the VF
//! from the vfio pool (`bindVfio`) over all VFs, the hotplug case; the socket is named by the
//! config key `"qmpSocket": "qmp/qmp.sock"` and the pod by `K8S_POD_UID` in `CNI_ARGS`.
//!
//! Every effect is read from outside vfplugd: L2's QEMU (observer monitor), `/proc/<qemu>/limits`,
//! sysfs, the PF's `ip link` vf line, vfplugd's `List`, and in `vmpod-linux` L2's serial console.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vfplug_core::pci::PciAddress;
use vfplug_qmp::Qmp;

use crate::agent::{
    AgentArgs, IGB_VENDOR, IGB_VF_DEVICE, figure, linux_direct, pass, say, start_l2,
    wait_serial_progress,
};
use crate::guest::GUEST_PREFIX;
use crate::plugd::{self, Cni, DIR, Daemon};
use crate::sriov::Sysfs;
use crate::vm::{Vm, VmConfig};

type Step<T> = Result<T, String>;

/// vfplugd's `--kubelet-dir` in L1.
pub const KUBELET: &str = "/tmp/vfplugd/kubelet";
/// The pool every VF is in.
pub const VM_POOL: &str = "lab_vm";
/// What the NAD asks for: VLAN, admin MAC and spoofchk, set through the PF.
pub const VM_VLAN: u16 = 300;
/// Admin MAC of the VM pod's VF.
pub const VM_MAC: &str = "02:00:00:00:01:2c";
/// The interface name the runtime passes; vfplugd names the QEMU device `vfplug-net1`.
pub const IFNAME: &str = "net1";
/// QEMU device id vfplugd derives from [`IFNAME`].
pub const ALIAS: &str = "vfplug-net1";
/// Root-port id prefix of L2 (vfplugd's default `--vm-port-prefix`).
pub const PORT_PREFIX: &str = "vfplug-rp";
/// The pod's netns.
const NETNS: &str = "vmpod";
/// The fast tier's bounded unplug wait: short, since the prelaunch L2 never acknowledges.
const WAIT_PRELAUNCH: &str = "2";
/// The slow tier's: long enough that the guest's acknowledgement (2 s measured, TCG in TCG)
/// arrives inside the DEL, so the DEL itself finalizes.
const WAIT_LINUX: &str = "60";

/// The pool config: one vfio pool over every VF of the PF, bound to vfio-pci by vfplugd.
pub fn pool_config(pf: &PciAddress, numvfs: usize) -> String {
    format!(
        "resourcePrefix: vfplug.io\npools:\n  - name: {VM_POOL}\n    deviceMode: vfio\n    \
         bindVfio: true\n    selectors:\n      rootDevices: [\"{pf}#0-{}\"]\n",
        numvfs.saturating_sub(1)
    )
}

/// The NAD's config as the runtime passes it: a `pool`, no `deviceID`, the VM pod's QMP socket
/// by volume and file, the device-info file Multus asks for, and `extra` spliced in.
pub fn vm_config(devinfo: &Path, extra: &str) -> String {
    format!(
        "{{\"cniVersion\":\"1.1.0\",\"name\":\"labvm\",\"type\":\"vfplug\",\"socket\":\"{}\",\
         \"pool\":\"{VM_POOL}\",\"vlan\":{VM_VLAN},\"mac\":\"{VM_MAC}\",\"spoofchk\":\"off\",\
         \"qmpSocket\":\"qmp/qmp.sock\",\"runtimeConfig\":{{\"CNIDeviceInfoFile\":\"{}\"}}{extra}}}",
        plugd::sock().display(),
        devinfo.display()
    )
}

/// A pod UID in the API server's UUID form, distinct per L2.
pub fn pod_uid(n: u32) -> String {
    format!("5e1f0c2a-7d1b-4c3e-9a0f-{n:012}")
}

/// `pods/<uid>/volumes/kubernetes.io~empty-dir/qmp` under the kubelet dir.
pub fn volume_dir(uid: &str) -> PathBuf {
    Path::new(KUBELET)
        .join("pods")
        .join(uid)
        .join("volumes/kubernetes.io~empty-dir/qmp")
}

/// `"pciID":"..."` of a CNI result.
pub fn result_pci(out: &str) -> Option<&str> {
    let rest = out.split("\"pciID\":\"").nth(1)?;
    rest.split('"').next()
}

/// Soft and hard "Max locked memory" of `/proc/<pid>/limits` text, in bytes (`None`:
/// unlimited).
pub fn memlock_limits(limits: &str) -> Option<(Option<u64>, Option<u64>)> {
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max locked memory"))?;
    let mut it = line["Max locked memory".len()..].split_whitespace();
    let v = |s: &str| -> Option<Option<u64>> {
        if s == "unlimited" {
            Some(None)
        } else {
            s.parse().ok().map(Some)
        }
    };
    Some((v(it.next()?)?, v(it.next()?)?))
}

/// Whether both limits cover `want` bytes.
fn covers(l: (Option<u64>, Option<u64>), want: u64) -> bool {
    l.0.is_none_or(|v| v >= want) && l.1.is_none_or(|v| v >= want)
}

/// One L2 as a VM pod.
struct Pod {
    vm: Vm,
    /// The agent's own monitor (not the pod's socket).
    observer: Qmp,
    uid: String,
    /// Container ID the runtime uses for it (also `K8S_POD_NAME`).
    name: String,
    devinfo: PathBuf,
}

async fn qom_get(q: &Qmp, path: &str, prop: &str) -> Step<String> {
    let args = serde_json::json!({ "path": path, "property": prop });
    let v = q
        .execute("qom-get", Some(&args))
        .await
        .map_err(|e| format!("qom-get {path} {prop}: {e}"))?;
    Ok(v.as_str().map_or_else(|| v.to_string(), str::to_owned))
}

/// Starts L2 with its QMP socket in a fresh pod volume; `kernel` boots Linux.
/// Pod `n`'s UID, name and device-info file (what the runtime knows before QEMU runs).
fn pod_ids(n: u32) -> (String, String, PathBuf) {
    let name = format!("vmpod-{n}");
    let devinfo = Path::new(DIR).join(format!("cni-devinfo/{name}-{IFNAME}.json"));
    (pod_uid(n), name, devinfo)
}

async fn start_pod(args: &AgentArgs, n: u32, ram_mb: u32, linux: bool) -> Step<Pod> {
    let (uid, name, devinfo) = pod_ids(n);
    let vol = volume_dir(&uid);
    std::fs::create_dir_all(&vol).map_err(|e| format!("{}: {e}", vol.display()))?;
    let sock = vol.join("qmp.sock");
    let extra = vec![
        "-qmp".to_owned(),
        format!("unix:{},server=on,wait=off", sock.display()),
    ];
    let (vm, observer) = if linux {
        crate::agent::boot_l2_linux(args, &name, PORT_PREFIX, extra).await?
    } else {
        let cfg = VmConfig {
            prelaunch: true,
            memory_mb: ram_mb,
            port_prefix: PORT_PREFIX.into(),
            extra,
            ..VmConfig::default()
        };
        start_l2(args, &name, &cfg).await?
    };
    // QEMU creates every monitor's socket before it serves any: the observer answering means
    // the pod's socket is there.
    if !sock.exists() {
        return Err(format!("{name}: {} missing", sock.display()));
    }
    Ok(Pod {
        vm,
        observer,
        uid,
        name,
        devinfo,
    })
}

/// What is checked and kept around one attachment.
struct Attached {
    vf: PciAddress,
    index: u32,
    add_result: String,
}

/// Node-level things every step needs.
struct Node<'a> {
    sys: &'a Sysfs,
    vfs: &'a [PciAddress],
    pf_dev: String,
    bins: plugd::Binaries,
    wait: &'static str,
}

impl Node<'_> {
    fn start_daemon(&self) -> Step<Daemon> {
        Daemon::start(&self.bins.vfplugd, &["--unplug-wait-seconds", self.wait])
    }

    fn cni<'a>(&'a self, pod: &'a Pod) -> Cni<'a> {
        Cni {
            bin: &self.bins.cni,
            netns: NETNS,
            pod_uid: Some(&pod.uid),
        }
    }

    /// The PF's vf lines of every VF, by index.
    fn lines(&self) -> Step<Vec<String>> {
        (0..self.vfs.len() as u32)
            .map(|i| plugd::vf_line(&self.pf_dev, i))
            .collect()
    }
}

/// vfplugd started and ready, every VF Free and on vfio-pci.
async fn daemon_ready(node: &Node<'_>, daemon: &mut Option<Daemon>, step: &str) -> Step<()> {
    let e = |x: String| format!("{step}: {x}");
    let t = Instant::now();
    let d = daemon.insert(node.start_daemon().map_err(e)?);
    plugd::wait_ready(&Cni::new(&node.bins.cni), d).map_err(e)?;
    let mut listed = Vec::new();
    for vf in node.vfs {
        plugd::wait_driver(node.sys, vf, "vfio-pci").map_err(e)?;
        listed.push(
            plugd::expect_listed(vf, "free", None)
                .await
                .map_err(|x| e(format!("{vf}: {x}")))?,
        );
    }
    figure("vmpod.start_to_ready", t.elapsed());
    pass(step, &format!("vfs_on=vfio-pci {}", listed.join("; ")));
    Ok(())
}

/// CNI ADD for `pod`, and everything it must have done, read back from outside vfplugd.
async fn add(node: &Node<'_>, pod: &Pod, ram_mb: u32, step: &str, fig: &str) -> Step<Attached> {
    let e = |x: String| format!("{step}: {x}");
    let cni = node.cni(pod);
    say(&format!(
        "CNI ADD {}/{IFNAME} (pool {VM_POOL}, no deviceID, qmpSocket qmp/qmp.sock): vfplugd \
         picks a VF and hot-plugs it into L2 ({ram_mb} MiB)",
        pod.name
    ));
    let t = Instant::now();
    let out = cni
        .ok("ADD", &pod.name, &vm_config(&pod.devinfo, ""))
        .map_err(e)?;
    let took = t.elapsed();
    figure(fig, took);
    verify_added(node, pod, ram_mb, step, out, took).await
}

/// Everything an ADD (answered with `out` after `took`) must have done once the VF is in L2,
/// read back from outside vfplugd.
async fn verify_added(
    node: &Node<'_>,
    pod: &Pod,
    ram_mb: u32,
    step: &str,
    out: String,
    took: Duration,
) -> Step<Attached> {
    let e = |x: String| format!("{step}: {x}");
    let pci = result_pci(&out).ok_or_else(|| e(format!("result has no pciID: {out}")))?;
    let index = node
        .vfs
        .iter()
        .position(|v| v.to_string() == pci)
        .ok_or_else(|| {
            e(format!(
                "result names {pci}, not a VF of the pool {:?}",
                node.vfs
            ))
        })?;
    let vf = node.vfs[index];
    let index = index as u32;
    // The device-info file Multus asked for names the same VF.
    let info = std::fs::read_to_string(&pod.devinfo)
        .map_err(|x| e(format!("{}: {x}", pod.devinfo.display())))?;
    if !info.contains(&format!("\"pci-address\":\"{vf}\"")) {
        return Err(e(format!("device-info file does not name {vf}: {info}")));
    }
    let drv = plugd::driver(node.sys, &vf).map_err(e)?;
    if drv != "vfio-pci" {
        return Err(e(format!("{vf} is on {drv}, not vfio-pci")));
    }
    // QEMU's view (the agent's own monitor): the device, with vfplugd's alias, is the VF, behind
    // one of the pod's root ports.
    let ids = pod
        .observer
        .peripheral_ids()
        .await
        .map_err(|x| e(format!("qom-list: {x}")))?;
    if !ids.iter().any(|i| i == ALIAS) {
        return Err(e(format!("{ALIAS} not in /machine/peripheral: {ids:?}")));
    }
    let dev = format!("/machine/peripheral/{ALIAS}");
    let host = qom_get(&pod.observer, &dev, "host").await.map_err(e)?;
    let bus = qom_get(&pod.observer, &dev, "parent_bus")
        .await
        .map_err(e)?;
    let port = bus
        .strip_prefix("/machine/peripheral/")
        .and_then(|b| b.split('/').next())
        .unwrap_or_default()
        .to_owned();
    if host != vf.to_string() || !port.starts_with(PORT_PREFIX) {
        return Err(e(format!(
            "{ALIAS}: host {host:?} (want {vf}), parent_bus {bus:?} (want a {PORT_PREFIX}* port)"
        )));
    }
    // vfplugd raised QEMU's RLIMIT_MEMLOCK to the guest's RAM + 1 GiB before the first VFIO device.
    let pid = pod.vm.pid().ok_or_else(|| e("L2's QEMU is gone".into()))?;
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .map_err(|x| e(format!("/proc/{pid}/limits: {x}")))?;
    let memlock =
        memlock_limits(&limits).ok_or_else(|| e(format!("no Max locked memory in {limits}")))?;
    let want = (u64::from(ram_mb) + 1024) << 20;
    if !covers(memlock, want) {
        return Err(e(format!(
            "QEMU's RLIMIT_MEMLOCK {memlock:?} does not cover guest RAM + 1 GiB = {want}"
        )));
    }
    // The ledger, through the node API.
    let listed = plugd::expect_listed(&vf, "attached", Some(&pod.name))
        .await
        .map_err(e)?;
    // The PF: the NAD's VLAN, MAC and spoofchk on the VF.
    let line = plugd::vf_line(&node.pf_dev, index).map_err(e)?;
    for want in [
        format!("link/ether {VM_MAC} "),
        format!(", vlan {VM_VLAN}"),
        ", spoof checking off".to_owned(),
    ] {
        if !line.contains(&want) {
            return Err(e(format!("vf {index} line lacks {want:?}: {line:?}")));
        }
    }
    let lim = |v: Option<u64>| v.map_or("unlimited".to_owned(), |b| (b >> 20).to_string());
    pass(
        step,
        &format!(
            "vf={vf} ram_mb={ram_mb} alias={ALIAS} port={port} host={host} driver={drv} \
             memlock_mib={}/{} {listed} line={line:?}",
            lim(memlock.0),
            lim(memlock.1)
        ),
    );
    say(&format!(
        "  {vf} is in L2 as {ALIAS} behind {port} ({:.2} s); List: {listed}",
        took.as_secs_f64()
    ));
    Ok(Attached {
        vf,
        index,
        add_result: out.trim().to_owned(),
    })
}

/// The VF is back: Free in `List`, its vf line as before the ADD, on vfio-pci (its pool's
/// driver), and the alias gone from QEMU.
async fn check_free(node: &Node<'_>, pod: &Pod, a: &Attached, line_before: &str) -> Step<String> {
    let listed = plugd::expect_listed(&a.vf, "free", None).await?;
    if listed.contains(" owner=") && !listed.contains(" owner= ") {
        return Err(format!("Free VF still has an owner: {listed}"));
    }
    let line = plugd::vf_line(&node.pf_dev, a.index)?;
    if line != line_before {
        return Err(format!(
            "vf {} not restored: before {line_before:?}, now {line:?}",
            a.index
        ));
    }
    let drv = plugd::driver(node.sys, &a.vf)?;
    if drv != "vfio-pci" {
        return Err(format!(
            "{} is on {drv}, its pool's driver is vfio-pci",
            a.vf
        ));
    }
    // A QEMU that is gone has the device in no guest; a running one must not list it.
    if !pod.observer.is_closed() {
        let ids = pod
            .observer
            .peripheral_ids()
            .await
            .map_err(|x| format!("qom-list: {x}"))?;
        if ids.iter().any(|i| i == ALIAS) {
            return Err(format!("{ALIAS} still in /machine/peripheral: {ids:?}"));
        }
    }
    Ok(format!(
        "vf={} driver={drv} restored=true in_qemu=false {listed} line={line:?}",
        a.vf
    ))
}

/// Polls `List` until `vf` is Free (the start-time reconcile and the VM watcher run in the
/// background; nothing else tells when they are done).
async fn wait_free(vf: &PciAddress, within: Duration) -> Step<Duration> {
    let t = Instant::now();
    loop {
        let l = plugd::listed(vf).await?;
        if l.starts_with("state=free ") {
            return Ok(t.elapsed());
        }
        if t.elapsed() > within {
            return Err(format!("{vf} not Free after {within:?}: {l}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `system_reset` on the observer monitor and the `DEVICE_DELETED` it brings (prelaunch L2
/// never acknowledges an unplug; a reset completes it). Also says whether QEMU dropped the
/// monitor during the reset: QEMU 10.0 sometimes aborts there *after* `DEVICE_DELETED`
/// (`resettable_container_child_foreach: Assertion 'len == rc->children->len'`, seen 2 times in
/// ~12 runs); the removal is proved all the same, and vfplugd must still finish it.
async fn reset_until_deleted(pod: &Pod) -> Step<(Duration, bool)> {
    let waiter = pod.observer.event_waiter(|ev| ev.is_device_deleted(ALIAS));
    let t = Instant::now();
    let died = match pod.observer.system_reset().await {
        Ok(()) => false,
        Err(x) if x.is_connection_error() => true,
        Err(x) => return Err(format!("system_reset: {x}")),
    };
    match waiter.wait(Duration::from_secs(60)).await {
        Ok(Some(_)) => Ok((t.elapsed(), died)),
        Ok(None) => Err("no DEVICE_DELETED within 60 s of system_reset".into()),
        Err(x) => Err(format!(
            "waiting for DEVICE_DELETED: {x} (QEMU dropped the monitor during system_reset: {died})"
        )),
    }
}

/// The phase; vfplugd's log is copied to the console whatever happens.
pub async fn run(
    args: &AgentArgs,
    sys: &Sysfs,
    pf: &PciAddress,
    vfs: &[PciAddress],
    linux: bool,
) -> Step<()> {
    let mut daemon = None;
    let r = steps(args, sys, pf, vfs, linux, &mut daemon).await;
    if let Some(mut d) = daemon
        && let Err(e) = d.stop()
    {
        println!("{} LOG agent: {e}", crate::agent::AGENT_PREFIX);
    }
    plugd::dump_log();
    r
}

async fn steps(
    args: &AgentArgs,
    sys: &Sysfs,
    pf: &PciAddress,
    vfs: &[PciAddress],
    linux: bool,
    daemon: &mut Option<Daemon>,
) -> Step<()> {
    let setup = |x: String| format!("vmpod-setup: {x}");
    let t = Instant::now();
    let bins = plugd::stage(&args.plugd).map_err(setup)?;
    figure("vmpod.stage_binaries", t.elapsed());
    plugd::prepare(&pool_config(pf, vfs.len())).map_err(setup)?;
    for d in [KUBELET, &format!("{DIR}/cni-devinfo")] {
        std::fs::create_dir_all(d).map_err(|x| setup(format!("{d}: {x}")))?;
    }
    plugd::ip(&["netns", "add", NETNS]).map_err(setup)?;
    let pf_dev = crate::agent::pf_netdev(sys, pf).map_err(setup)?;
    let node = Node {
        sys,
        vfs,
        pf_dev,
        bins,
        wait: if linux { WAIT_LINUX } else { WAIT_PRELAUNCH },
    };
    let before = node.lines().map_err(setup)?;
    pass(
        "vmpod-setup",
        &format!(
            "pf={pf} pf_dev={} kubelet={KUBELET} vfs={} lines={before:?}",
            node.pf_dev,
            vfs.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ),
    );
    if linux {
        linux_pod(args, &node, &before, daemon).await
    } else {
        prelaunch_pods(args, &node, &before, daemon).await
    }
}

/// Fast tier: L2 in prelaunch, which never acknowledges an unplug.
async fn prelaunch_pods(
    args: &AgentArgs,
    node: &Node<'_>,
    before: &[String],
    daemon: &mut Option<Daemon>,
) -> Step<()> {
    say("vfplugd starts in L1 on the igb VFs (a vfio pool, bindVfio)");
    daemon_ready(node, daemon, "vmpod-ready").await?;
    for (n, &ram) in args.vmpod_ram_mb.iter().enumerate() {
        let step = format!("vmpod-l2-{ram}mb");
        say(&format!(
            "L2 QEMU starts in prelaunch with {ram} MiB, its QMP socket in a pod volume"
        ));
        let mut pod = start_pod(args, n as u32, ram, false)
            .await
            .map_err(|x| format!("{step}: {x}"))?;
        let r = one_prelaunch_pod(node, &mut pod, n, ram, before, daemon).await;
        if r.is_err() {
            l2_diagnostics(&mut pod.vm);
        }
        r?;
        pod.vm.kill().await;
    }
    // A fresh L2 (the last one may have been lost to QEMU's reset abort, see above), in the
    // order a runtime uses: the pod's networks first, then its containers (QEMU).
    let ram = args.vmpod_ram_mb[0];
    let n = args.vmpod_ram_mb.len() as u32;
    let (mut pod, a) = add_before_qemu_runs(args, node, n, ram).await?;
    let r = qemu_gone_before_del(node, &mut pod, &a, before).await;
    if r.is_err() {
        l2_diagnostics(&mut pod.vm);
    }
    r
}

/// The runtime's ADD comes before the pod's QEMU runs (its volume is there, its socket is not):
/// vfplugd reserves and configures the VF and answers at once with the hot-plug owed; when QEMU
/// starts and binds its QMP socket, vfplugd (woken by inotify on the volume) hot-plugs the VF.
async fn add_before_qemu_runs(
    args: &AgentArgs,
    node: &Node<'_>,
    n: u32,
    ram: u32,
) -> Step<(Pod, Attached)> {
    let step = "vmpod-add-owed";
    let e = |x: String| format!("{step}: {x}");
    let (uid, name, devinfo) = pod_ids(n);
    let vol = volume_dir(&uid);
    std::fs::create_dir_all(&vol).map_err(|x| e(format!("{}: {x}", vol.display())))?;
    say(&format!(
        "CNI ADD {name}/{IFNAME} before the pod's QEMU runs (its volume is there, no socket yet)"
    ));
    let cni = Cni {
        bin: &node.bins.cni,
        netns: NETNS,
        pod_uid: Some(&uid),
    };
    let t = Instant::now();
    let out = cni.ok("ADD", &name, &vm_config(&devinfo, "")).map_err(e)?;
    let took = t.elapsed();
    figure("vmpod.cni_add_before_qemu", took);
    let pci = result_pci(&out).ok_or_else(|| e(format!("result has no pciID: {out}")))?;
    let vf: PciAddress = pci.parse().map_err(|x| e(format!("{pci}: {x}")))?;
    let owed = plugd::expect_listed(&vf, "configured", Some(&name))
        .await
        .map_err(e)?;
    say(&format!(
        "  answered in {:.2} s with {vf}, the hot-plug owed; List: {owed}",
        took.as_secs_f64()
    ));
    say(&format!(
        "L2 QEMU starts in prelaunch with {ram} MiB and binds its QMP socket"
    ));
    let pod = start_pod(args, n, ram, false).await.map_err(e)?;
    let t = Instant::now();
    // The test looks every 100 ms for 120 s at most; vfplugd itself is woken, not polling.
    let mut listed = String::new();
    for _ in 0..1200 {
        listed = plugd::listed(&vf).await.map_err(e)?;
        if listed.starts_with("state=attached ") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !listed.starts_with("state=attached ") {
        return Err(e(format!("the owed hot-plug was not done: {listed}")));
    }
    let waited = t.elapsed();
    figure("vmpod.qemu_socket_to_attached", waited);
    say(&format!(
        "  vfplugd hot-plugged it {:.2} s after QEMU's socket appeared",
        waited.as_secs_f64()
    ));
    let a = verify_added(node, &pod, ram, step, out, took).await?;
    Ok((pod, a))
}

/// L2's serial tail, QEMU's stderr and whether it still runs, as `LOG l2:` lines: a QEMU that
/// died under a step says why only there.
fn l2_diagnostics(vm: &mut Vm) {
    for l in vm.diagnostics().lines() {
        println!("{} LOG l2: {l}", crate::agent::AGENT_PREFIX);
    }
}

async fn one_prelaunch_pod(
    node: &Node<'_>,
    pod: &mut Pod,
    n: usize,
    ram: u32,
    before: &[String],
    daemon: &mut Option<Daemon>,
) -> Step<()> {
    let a = add(
        node,
        pod,
        ram,
        &format!("vmpod-add-{ram}mb"),
        &format!("vmpod.cni_add_{ram}mb"),
    )
    .await?;
    let line_before = &before[a.index as usize];
    if n == 0 {
        crash_between_del_and_deleted(node, pod, &a, line_before, daemon).await?;
    } else {
        late_event(node, pod, &a, line_before, ram).await?;
    }
    Ok(())
}

/// The pod is torn down: QEMU is killed with the VF in it, then the runtime's DEL comes. QEMU's
/// exit proves the device is in no guest: vfplugd's VM watcher frees the VF by itself, and the
/// DEL that follows finds nothing held and succeeds.
async fn qemu_gone_before_del(
    node: &Node<'_>,
    pod: &mut Pod,
    a: &Attached,
    before: &[String],
) -> Step<()> {
    let step = "vmpod-qemu-gone";
    let e = |x: String| format!("{step}: {x}");
    say("L2's QEMU is killed with the VF in it (pod teardown), then the runtime's CNI DEL");
    let t = Instant::now();
    pod.vm.kill().await;
    // vfplugd's watcher is woken by the connection's end and by QEMU's exit (pidfd): it frees
    // the VF by itself, before any DEL. The test looks every 100 ms, for 60 s at most.
    let mut before_del = String::new();
    for _ in 0..600 {
        before_del = plugd::listed(&a.vf).await.map_err(e)?;
        if before_del.starts_with("state=free ") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !before_del.starts_with("state=free ") {
        return Err(e(format!(
            "QEMU's exit did not free the VF before the DEL: {before_del}"
        )));
    }
    figure("vmpod.qemu_exit_to_free", t.elapsed());
    let prev = format!(",\"prevResult\":{}", a.add_result);
    let t = Instant::now();
    node.cni(pod)
        .ok("DEL", &pod.name, &vm_config(&pod.devinfo, &prev))
        .map_err(e)?;
    figure("vmpod.cni_del_qemu_gone", t.elapsed());
    // The DEL found nothing held: the VF stays Free.
    let listed = plugd::expect_listed(&a.vf, "free", None).await.map_err(e)?;
    let line = plugd::vf_line(&node.pf_dev, a.index).map_err(e)?;
    if line != before[a.index as usize] {
        return Err(e(format!(
            "vf {} not restored: before {:?}, now {line:?}",
            a.index, before[a.index as usize]
        )));
    }
    let drv = plugd::driver(node.sys, &a.vf).map_err(e)?;
    if drv != "vfio-pci" {
        return Err(e(format!("{} is on {drv}, not vfio-pci", a.vf)));
    }
    let before_state = before_del.split_whitespace().next().unwrap_or_default();
    pass(
        step,
        &format!(
            "vf={} before_del={before_state} driver={drv} restored=true {listed}",
            a.vf
        ),
    );
    say(&format!(
        "  after QEMU's exit vfplugd had the VF {before_state} before any DEL; after the DEL: {listed}"
    ));
    Ok(())
}

/// DEL with the unplug pending, vfplugd SIGKILLed, the unplug completed while it is dead, and
/// the restart finishing the removal.
async fn crash_between_del_and_deleted(
    node: &Node<'_>,
    pod: &Pod,
    a: &Attached,
    line_before: &str,
    daemon: &mut Option<Daemon>,
) -> Step<()> {
    let step = "vmpod-del-pending";
    let e = |x: String| format!("{step}: {x}");
    let cni = node.cni(pod);
    let prev = format!(",\"prevResult\":{}", a.add_result);
    say(&format!(
        "CNI DEL {}/{IFNAME}: L2 has no OS to acknowledge the unplug; DEL answers after the {} s \
         wait",
        pod.name, node.wait
    ));
    let t = Instant::now();
    cni.ok("DEL", &pod.name, &vm_config(&pod.devinfo, &prev))
        .map_err(e)?;
    figure("vmpod.cni_del_pending", t.elapsed());
    let listed = plugd::expect_listed(&a.vf, "detaching", Some(&pod.name))
        .await
        .map_err(e)?;
    let ids = pod
        .observer
        .peripheral_ids()
        .await
        .map_err(|x| e(format!("qom-list: {x}")))?;
    if !ids.iter().any(|i| i == ALIAS) {
        return Err(e(format!("{ALIAS} left QEMU without a guest: {ids:?}")));
    }
    pass(step, &format!("vf={} in_qemu=true {listed}", a.vf));
    say(&format!(
        "  DEL returned; List: {listed}; QEMU still has {ALIAS}"
    ));

    let step = "vmpod-crash-recovery";
    let e = |x: String| format!("{step}: {x}");
    let d = daemon.as_mut().ok_or_else(|| e("no vfplugd".into()))?;
    let killed = d.crash().map_err(e)?;
    say("vfplugd SIGKILLed; system_reset makes QEMU complete the unplug while vfplugd is dead");
    let (took, died) = reset_until_deleted(pod).await.map_err(e)?;
    figure("vmpod.reset_to_device_deleted", took);
    // Nobody finished the removal yet: the VF still carries the pod's settings.
    let line = plugd::vf_line(&node.pf_dev, a.index).map_err(e)?;
    if !line.contains(&format!(", vlan {VM_VLAN}")) {
        return Err(e(format!(
            "vf {} changed while vfplugd was dead: {line:?}",
            a.index
        )));
    }
    let t = Instant::now();
    let d = daemon.insert(node.start_daemon().map_err(e)?);
    let ready = plugd::wait_ready(&Cni::new(&node.bins.cni), d).map_err(e)?;
    figure("vmpod.restart_to_ready", ready);
    wait_free(&a.vf, Duration::from_secs(120))
        .await
        .map_err(e)?;
    let took = t.elapsed();
    figure("vmpod.restart_to_free", took);
    let free = check_free(node, pod, a, line_before).await.map_err(e)?;
    pass(
        step,
        &format!("killed={killed:?} qemu_aborted_at_reset={died} dead_line={line:?} {free}"),
    );
    say(&format!(
        "  vfplugd restarted; its start-time reconcile (qom-list) finished the removal in {:.2} \
         s: {free}",
        took.as_secs_f64()
    ));
    Ok(())
}

/// DEL pending, then the unplug completed with vfplugd running: its VM watcher finalizes on the
/// late `DEVICE_DELETED`.
async fn late_event(
    node: &Node<'_>,
    pod: &Pod,
    a: &Attached,
    line_before: &str,
    ram: u32,
) -> Step<()> {
    let step = format!("vmpod-late-event-{ram}mb");
    let e = |x: String| format!("{step}: {x}");
    let cni = node.cni(pod);
    let prev = format!(",\"prevResult\":{}", a.add_result);
    let t = Instant::now();
    cni.ok("DEL", &pod.name, &vm_config(&pod.devinfo, &prev))
        .map_err(e)?;
    figure(&format!("vmpod.cni_del_pending_{ram}mb"), t.elapsed());
    let pending = plugd::expect_listed(&a.vf, "detaching", Some(&pod.name))
        .await
        .map_err(e)?;
    say(
        "  DEL left the unplug pending; system_reset completes it, vfplugd (running) sees the late event",
    );
    let t = Instant::now();
    let (_, died) = reset_until_deleted(pod).await.map_err(e)?;
    wait_free(&a.vf, Duration::from_secs(60)).await.map_err(e)?;
    figure(&format!("vmpod.late_event_to_free_{ram}mb"), t.elapsed());
    let free = check_free(node, pod, a, line_before).await.map_err(e)?;
    pass(
        &step,
        &format!("pending: {pending}; qemu_aborted_at_reset={died}; then {free}"),
    );
    Ok(())
}

/// Slow tier: L2 boots Linux; first the lab's own hotplug (vfplug-qmp), then vfplugd's through
/// the CNI binary, with the guest acknowledging the unplug inside the DEL.
async fn linux_pod(
    args: &AgentArgs,
    node: &Node<'_>,
    before: &[String],
    daemon: &mut Option<Daemon>,
) -> Step<()> {
    say("L2 QEMU starts and boots Linux, its QMP socket in a pod volume");
    let mut pod = start_pod(args, 9, 256, true)
        .await
        .map_err(|x| format!("vmpod-linux-l2: {x}"))?;
    let r = linux_pod_steps(node, &mut pod, before, daemon).await;
    if r.is_err() {
        l2_diagnostics(&mut pod.vm);
    }
    r?;
    pod.vm.kill().await;
    Ok(())
}

async fn linux_pod_steps(
    node: &Node<'_>,
    pod: &mut Pod,
    before: &[String],
    daemon: &mut Option<Daemon>,
) -> Step<()> {
    // Before vfplugd owns the VFs: the lab's own hotplug of VF 0 (bound by the agent).
    say(
        "the lab's own hotplug first (vfplug-qmp, no vfplugd): VF 0 in, guest sees it, guest acks the unplug",
    );
    linux_direct(
        &mut pod.vm,
        &pod.observer,
        &node.vfs[0],
        &format!("{PORT_PREFIX}1"),
    )
    .await?;

    say("vfplugd starts in L1 on the igb VFs (a vfio pool, bindVfio)");
    daemon_ready(node, daemon, "vmpod-ready").await?;
    let a = add(node, pod, 256, "vmpod-linux-add", "vmpod.linux.cni_add").await?;
    let plus = format!("{GUEST_PREFIX} PCI+");
    let t = Instant::now();
    let seen = wait_serial_progress(
        &mut pod.vm,
        "L2 sees the VF",
        Duration::from_secs(120),
        "waiting for L2 to enumerate the VF",
        |l| l.starts_with(&plus),
    )
    .await
    .map_err(|x| format!("vmpod-linux-guest: {x}"))?;
    figure("vmpod.linux.visible_in_guest", t.elapsed());
    if !seen.ends_with(&format!("{IGB_VENDOR}:{IGB_VF_DEVICE}")) {
        return Err(format!("vmpod-linux-guest: L2 saw another device: {seen}"));
    }
    // QEMU's query-pci, now that the guest has enumerated the port's bus.
    let pci = pod
        .observer
        .query_pci()
        .await
        .map_err(|x| format!("vmpod-linux-guest: query-pci: {x}"))?;
    let dev = pci
        .iter()
        .find(|d| d.qdev_id.as_deref() == Some(ALIAS))
        .ok_or_else(|| format!("vmpod-linux-guest: {ALIAS} not in query-pci: {pci:?}"))?;
    let parent = dev.parent_bridge.clone().unwrap_or_default();
    if !parent.starts_with(PORT_PREFIX) || dev.vendor != 0x8086 || dev.device != 0x10ca {
        return Err(format!("vmpod-linux-guest: query-pci shows {dev:?}"));
    }
    pass(
        "vmpod-linux-guest",
        &format!(
            "vf={} guest={} query_pci={ALIAS}@{parent} {:04x}:{:04x}",
            a.vf,
            seen.trim(),
            dev.vendor,
            dev.device
        ),
    );
    say(&format!(
        "  L2 sees it: {}; query-pci: {ALIAS} behind {parent}",
        seen.trim()
    ));

    let step = "vmpod-linux-del";
    let e = |x: String| format!("{step}: {x}");
    say(&format!(
        "CNI DEL {}/{IFNAME}: vfplugd unplugs, L2 acknowledges within the {} s wait, the DEL \
         finalizes",
        pod.name, node.wait
    ));
    let prev = format!(",\"prevResult\":{}", a.add_result);
    let t = Instant::now();
    node.cni(pod)
        .ok("DEL", &pod.name, &vm_config(&pod.devinfo, &prev))
        .map_err(e)?;
    let took = t.elapsed();
    figure("vmpod.linux.cni_del", took);
    // No polling: the DEL itself must have finished the removal.
    let free = check_free(node, pod, &a, &before[a.index as usize])
        .await
        .map_err(e)?;
    let minus = format!("{GUEST_PREFIX} PCI-");
    let gone = pod
        .vm
        .wait_serial("L2 loses the VF", Duration::from_secs(60), |l| {
            l.starts_with(&minus)
        })
        .await
        .map_err(|x| e(format!("L2 removal: {x}")))?;
    pass(step, &format!("{free} guest={}", gone.trim()));
    say(&format!(
        "  DEL done in {:.2} s: {free}; L2: {}",
        took.as_secs_f64(),
        gone.trim()
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_pci_reads_the_interface() {
        let r = r#"{"cniVersion":"1.1.0","interfaces":[{"name":"net1","pciID":"0000:01:10.2"}]}"#;
        assert_eq!(result_pci(r), Some("0000:01:10.2"));
        assert_eq!(result_pci("{}"), None);
    }

    #[test]
    fn memlock_limits_parse_numbers_and_unlimited() {
        let l = "Limit                     Soft Limit           Hard Limit           Units     \n\
                 Max processes             7848                 7848                 processes \n\
                 Max locked memory         1342177280           unlimited            bytes     \n";
        assert_eq!(memlock_limits(l), Some((Some(1_342_177_280), None)));
        assert!(covers((Some(1_342_177_280), None), 1_342_177_280));
        assert!(!covers((Some(8 << 20), Some(8 << 20)), 1_342_177_280));
        assert_eq!(memlock_limits("Max processes 1 1 processes"), None);
    }

    #[test]
    fn pod_paths_and_config() {
        let uid = pod_uid(3);
        assert_eq!(uid, "5e1f0c2a-7d1b-4c3e-9a0f-000000000003");
        assert_eq!(
            volume_dir(&uid),
            PathBuf::from(format!(
                "{KUBELET}/pods/{uid}/volumes/kubernetes.io~empty-dir/qmp"
            ))
        );
        let c = vm_config(Path::new("/d/x.json"), "");
        assert!(c.contains("\"qmpSocket\":\"qmp/qmp.sock\"") && !c.contains("deviceID"));
        assert!(c.contains("\"CNIDeviceInfoFile\":\"/d/x.json\""));
        assert!(pool_config(&"0000:01:00.0".parse().unwrap(), 2).contains("0000:01:00.0#0-1"));
    }
}
