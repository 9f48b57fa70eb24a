//! qemu tier, crash injection: the real vfplugd SIGKILLed at every failpoint of the attach and
//! detach sagas (`vfplug_executor::failpoint::POINTS`), against a real QEMU with a real Linux
//! guest that acknowledges unplugs. Run with `VMLAB_TIER=qemu cargo nextest run -p vfplug-vmlab
//! --no-capture -E 'binary(crash_tier)'`.
//!
//! One VM for every failpoint (TCG boots are slow): q35 with two `pcie-root-port`s `vfplug-rp1`,
//! `vfplug-rp2`, vfplugd's QMP socket in a fake kubelet dir
//! (`pods/<uid>/volumes/kubernetes.io~empty-dir/qmp/qmp.sock`) and a second QMP monitor for the
//! test's own look at `/machine/peripheral`. Per failpoint, a fresh fake node (two VFs on vfio-pci
//! in a vfio pool, the simulated PF kept in a file so a crash does not lose it) and ledger; the
//! real vfplugd with `--vm-stand-in-device e1000e` (no VFIO on the host) and the real `vfplug`
//! CNI binary for ADD and DEL, as a runtime execs it.
//!
//! Per failpoint (`VMLAB_CRASH_ROUNDS` times, default 3; the figures are medians): vfplugd
//! started with it; ADD (attach points) or ADD then DEL (detach points);
//! vfplugd must die by SIGKILL with the failpoint's stderr line; restarted without it; then what
//! a runtime does (a failed ADD is followed by DEL; a failed DEL is retried); then, until they
//! hold: every VF listed once and Free (none lost, none owned), the simulated VF settings back to
//! what they were, the VF on vfio-pci, reset once touched, no device-info file left, and QEMU's
//! `/machine/peripheral` without the hostdev (the ledger says Free).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vfplug_api::v1::node_client::NodeClient;
use vfplug_api::v1::{ListRequest, VfEntry};
use vfplug_core::PciAddress;
use vfplug_executor::failpoint;
use vfplug_host::fixture::{vfio_node, vfplugd_command};
use vfplug_qmp::Qmp;
use vfplug_vmlab::guest::{self, GUEST_PREFIX};
use vfplug_vmlab::lab::{Gate, Lab, Tier, gate, host_binaries};
use vfplug_vmlab::qmp::connect_retry;
use vfplug_vmlab::timing::{Figures, median_ms};
use vfplug_vmlab::vm::{Vm, VmConfig};

const BOOT: Duration = Duration::from_secs(120);
const POD_UID: &str = "crash-pod-uid";
/// A second VM pod whose volume holds no QMP socket (its QEMU not started): its ADD owes the
/// hot-plug (the `attach-owed` point).
const OWED_UID: &str = "crash-owed-uid";

/// The pod a round's CNI calls are for.
fn pod_uid(point: &str) -> &'static str {
    if point == "attach-owed" {
        OWED_UID
    } else {
        POD_UID
    }
}
const ALIAS: &str = "vfplug-net1";
/// The stand-in QEMU driver for the VF (`VMLAB_STAND_IN` overrides): hotplugs into a
/// `pcie-root-port` and the guest acknowledges its unplug.
const STAND_IN: &str = "e1000e";

fn stand_in() -> String {
    std::env::var("VMLAB_STAND_IN").unwrap_or_else(|_| STAND_IN.to_owned())
}
/// Long enough for the guest's ACPI unplug acknowledgement under TCG.
const UNPLUG_WAIT_SECONDS: &str = "20";
/// How long the invariants may take to hold after the restart.
const RECOVERY_BOUND: Duration = Duration::from_secs(90);

/// Where in the sagas a failpoint sits, which decides how the test drives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Hit during the ADD.
    Attach,
    /// Hit during the DEL of a completed ADD.
    Detach,
    /// Hit only when a Configured VF is finalized: by recovery at start, after a crash at
    /// `add-complete`.
    Recovery,
}

fn kind(point: &str) -> Kind {
    match point {
        "finalize-begin" => Kind::Recovery,
        p if p.starts_with("add-") || p.starts_with("attach-") => Kind::Attach,
        _ => Kind::Detach,
    }
}

/// The shared VM and the binaries.
struct Rig {
    lab: Lab,
    dir: PathBuf,
    kubelet: PathBuf,
    vfplugd: PathBuf,
    cni: PathBuf,
    /// The test's own monitor (not vfplugd's socket).
    qmp: Qmp,
}

/// One round's fake node.
struct Node {
    root: PathBuf,
    vfs: Vec<PciAddress>,
}

impl Node {
    fn sock(&self) -> PathBuf {
        self.root.join("vfplugd.sock")
    }
    fn sim(&self) -> PathBuf {
        self.root.join("pf.json")
    }
    fn state(&self) -> PathBuf {
        self.root.join("state")
    }
}

/// vfplugd as a child, its stderr in a file.
struct Daemon {
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    fn start(rig: &Rig, node: &Node, failpoint: Option<&str>, wait: &str, n: u32) -> Daemon {
        let log = node.root.join(format!("vfplugd-{n}.log"));
        let err = std::fs::File::create(&log).unwrap();
        let mut c = vfplugd_command(&rig.vfplugd, &node.root, &node.state());
        c.arg("--sim-pf-state")
            .arg(node.sim())
            .arg("--vm-stand-in-device")
            .arg(stand_in())
            .args(["--unplug-wait-seconds", wait])
            .env("RUST_LOG", "info")
            .env_remove(failpoint::ENV)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err);
        if let Some(fp) = failpoint {
            c.args(["--failpoint", fp]);
        }
        Daemon {
            child: Some(c.spawn().unwrap()),
            log,
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the exit (bounded) and returns the status.
    fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let c = self.child.as_mut().expect("running");
        let t = Instant::now();
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                self.child = None;
                return st;
            }
            assert!(
                t.elapsed() < within,
                "vfplugd still running after {within:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGTERM and wait (kill after 30 s).
    fn stop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
        }
        if self.child.is_some() {
            self.wait_exit(Duration::from_secs(30));
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

/// Waits until the node API answers `List`.
async fn wait_served(node: &Node, d: &mut Daemon) -> Vec<VfEntry> {
    let t = Instant::now();
    loop {
        assert!(
            d.alive(),
            "vfplugd exited before serving:\n{}",
            d.log_text()
        );
        if node.sock().exists()
            && let Ok(l) = list(node).await
        {
            return l;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "vfplugd never served:\n{}",
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn list(node: &Node) -> Result<Vec<VfEntry>, String> {
    let ch = vfplug_api::connect(&node.sock(), Duration::from_secs(5))
        .await
        .map_err(|e| e.to_string())?;
    NodeClient::new(ch)
        .list(ListRequest {})
        .await
        .map(|r| r.into_inner().vfs)
        .map_err(|s| s.to_string())
}

/// The NAD: a vfio pool, a VLAN and a MAC to restore, the VM pod's QMP socket by convention.
fn cni_config(node: &Node) -> String {
    format!(
        "{{\"cniVersion\":\"1.1.0\",\"name\":\"vmnet\",\"type\":\"vfplug\",\"socket\":\"{}\",\
         \"pool\":\"vm\",\"vlan\":100,\"mac\":\"02:00:00:00:00:42\",\"spoofchk\":\"off\",\
         \"qmpSocket\":\"qmp/qmp.sock\"}}",
        node.sock().display()
    )
}

/// Execs the CNI plugin as a runtime does; (success, stdout + stderr).
fn cni(rig: &Rig, node: &Node, uid: &str, command: &str) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new(&rig.cni)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "crash-sandbox")
        .env("CNI_NETNS", "/var/run/netns/crash-pod")
        .env("CNI_IFNAME", "net1")
        .env("CNI_PATH", "/opt/cni/bin")
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=lab;K8S_POD_NAME=vm-a;K8S_POD_UID={uid}"),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(cni_config(node).as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

async fn peripherals(rig: &Rig) -> Vec<String> {
    rig.qmp.peripheral_ids().await.expect("qom-list")
}

/// Asserts that vfplugd died by SIGKILL at `point`, with its line on stderr.
fn died_at(d: &mut Daemon, point: &str) {
    let st = d.wait_exit(Duration::from_secs(60));
    let log = d.log_text();
    assert_eq!(
        st.signal(),
        Some(9),
        "vfplugd did not die by SIGKILL at {point} ({st}):\n{log}"
    );
    let line = format!("{} {point}", failpoint::PREFIX);
    assert!(
        log.lines().any(|l| l == line),
        "no {line:?} on vfplugd's stderr:\n{log}"
    );
}

/// Whether QEMU must (`Some(true)`), must not (`Some(false)`) or may have the hostdev right
/// after vfplugd died at `point`.
fn in_qemu_at_crash(point: &str) -> Option<bool> {
    match point {
        "attach-device-added" | "attach-attached" | "detach-detaching" => Some(true),
        // The guest may or may not have acknowledged yet.
        "detach-unplug-pending" => None,
        _ => Some(false),
    }
}

/// Whether the NAD's VLAN is on the (simulated) PF right after vfplugd died at `point`: applied
/// from `add-vfio-bound` on, restored from `finalize-restored` on.
fn applied_at_crash(point: &str) -> bool {
    !matches!(
        point,
        "add-reserved"
            | "add-configured"
            | "finalize-restored"
            | "finalize-reset"
            | "finalize-rebound"
            | "finalize-freed"
    )
}

/// The VLANs of the simulated PF's VFs, as a crashed vfplugd left them.
fn vlans(node: &Node) -> Vec<u16> {
    vfplug_host::sim::read_persisted(&node.sim())
        .unwrap()
        .values()
        .map(|s| s.vlan)
        .filter(|v| *v != 0)
        .collect()
}

/// The ledger and QEMU agree: the hostdev is in QEMU iff one VF is attached or detaching, and no
/// VF is left attaching (the start-time reconcile decides those). `Err` says how they differ.
async fn agree(rig: &Rig, node: &Node) -> Result<String, String> {
    let vfs = list(node).await?;
    let present = peripherals(rig).await.iter().any(|i| i == ALIAS);
    let in_guest = vfs
        .iter()
        .filter(|v| v.state == "attached" || v.state == "detaching")
        .count();
    let attaching = vfs.iter().filter(|v| v.state == "attaching").count();
    let states: Vec<&str> = vfs.iter().map(|v| v.state.as_str()).collect();
    if attaching == 0 && in_guest == usize::from(present) {
        Ok(format!("in QEMU={present}, ledger {states:?}"))
    } else {
        Err(format!("in QEMU={present}, ledger {states:?}"))
    }
}

/// Everything that must hold once recovery is done; `Err` says what does not (yet).
async fn invariants(rig: &Rig, node: &Node, touched: bool) -> Result<(), String> {
    let vfs = list(node).await?;
    let mut listed: Vec<&str> = vfs.iter().map(|v| v.pci_address.as_str()).collect();
    listed.sort_unstable();
    listed.dedup();
    if listed.len() != vfs.len() || vfs.len() != node.vfs.len() {
        return Err(format!(
            "List has {} entries ({} distinct) for {} VFs: {vfs:?}",
            vfs.len(),
            listed.len(),
            node.vfs.len()
        ));
    }
    for v in &vfs {
        if v.state != "free" || v.owner.is_some() {
            return Err(format!(
                "VF {} is {} (owner {:?}, reason {:?})",
                v.pci_address, v.state, v.owner, v.reason
            ));
        }
    }
    let ids = peripherals(rig).await;
    if ids.iter().any(|i| i == ALIAS) {
        return Err(format!(
            "QEMU still has {ALIAS} while the ledger says Free: {ids:?}"
        ));
    }
    let sim = vfplug_host::sim::read_persisted(&node.sim()).map_err(|e| e.to_string())?;
    for ((pf, vf), s) in &sim {
        let fresh =
            s.vlan == 0 && s.mac.is_zero() && s.spoofchk == Some(true) && s.trust == Some(false);
        if !fresh {
            return Err(format!("PF {pf} VF {vf} not restored: {s:?}"));
        }
    }
    for vf in &node.vfs {
        let dev = node.root.join("sys/bus/pci/devices").join(vf.to_string());
        let driver = std::fs::read_link(dev.join("driver")).map_err(|e| e.to_string())?;
        if driver.file_name().and_then(|n| n.to_str()) != Some("vfio-pci") {
            return Err(format!("VF {vf} is on {}", driver.display()));
        }
    }
    if touched {
        // The one VF that was configured was reset by the finalize-removal.
        let resets = node
            .vfs
            .iter()
            .filter(|vf| {
                let f = node
                    .root
                    .join("sys/bus/pci/devices")
                    .join(vf.to_string())
                    .join("reset");
                std::fs::read_to_string(f).is_ok_and(|s| s.trim() == "1")
            })
            .count();
        if resets != 1 {
            return Err(format!("{resets} VFs were reset, want 1"));
        }
    }
    let devinfo = node.root.join("devinfo");
    let left: Vec<_> = std::fs::read_dir(&devinfo)
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    if !left.is_empty() {
        return Err(format!("device-info files left: {left:?}"));
    }
    Ok(())
}

/// Drives one failpoint; returns (outcome, time from restart to every invariant holding).
async fn round(rig: &Rig, point: &'static str, n: usize) -> (String, Duration) {
    let root = rig.dir.join(format!("round-{point}-{n}"));
    std::fs::create_dir_all(&root).unwrap();
    let vfs = vfio_node(&root, 2).unwrap();
    // The shared kubelet dir, where the VM pod's QMP socket lives.
    std::os::unix::fs::symlink(&rig.kubelet, root.join("kubelet")).unwrap();
    for vf in &vfs {
        // Empty, so a reset (a write of "1") shows.
        let f = root
            .join("sys/bus/pci/devices")
            .join(vf.to_string())
            .join("reset");
        std::fs::write(f, "").unwrap();
    }
    let node = Node { root, vfs };
    let k = kind(point);
    // The unplug-pending point needs the wait to end before the guest acknowledges.
    let wait = if point == "detach-unplug-pending" {
        "0"
    } else {
        UNPLUG_WAIT_SECONDS
    };
    let mut starts = 0;
    let mut start = |fp: Option<&str>| {
        starts += 1;
        Daemon::start(rig, &node, fp, wait, starts)
    };

    let outcome: String;
    match k {
        Kind::Attach => {
            let mut d = start(Some(point));
            wait_served(&node, &mut d).await;
            let (ok, out) = cni(rig, &node, pod_uid(point), "ADD");
            assert!(!ok, "ADD succeeded although vfplugd died at {point}: {out}");
            died_at(&mut d, point);
            outcome = "ADD failed; DEL after restart".into();
        }
        Kind::Detach => {
            let mut d = start(Some(point));
            wait_served(&node, &mut d).await;
            let (ok, out) = cni(rig, &node, pod_uid(point), "ADD");
            assert!(ok, "ADD before {point}: {out}\n{}", d.log_text());
            // Mid-way: the ledger and QEMU agree that the hostdev is in.
            let l = list(&node).await.unwrap();
            let attached: Vec<_> = l.iter().filter(|v| v.state == "attached").collect();
            assert_eq!(attached.len(), 1, "{l:?}");
            assert!(peripherals(rig).await.iter().any(|i| i == ALIAS));
            let (ok, out) = cni(rig, &node, pod_uid(point), "DEL");
            assert!(!ok, "DEL succeeded although vfplugd died at {point}: {out}");
            died_at(&mut d, point);
            outcome = "DEL failed; DEL retried after restart".into();
        }
        Kind::Recovery => {
            let mut d = start(Some("add-complete"));
            wait_served(&node, &mut d).await;
            let (ok, _) = cni(rig, &node, pod_uid(point), "ADD");
            assert!(!ok);
            died_at(&mut d, "add-complete");
            // The restart's recovery finalizes the half-done ADD, and dies at the point.
            let mut d = start(Some(point));
            died_at(&mut d, point);
            outcome = "crash in recovery; DEL after second restart".into();
        }
    }

    let want = if applied_at_crash(point) {
        vec![100]
    } else {
        vec![]
    };
    assert_eq!(vlans(&node), want, "{point}: the PF right after the crash");
    if let Some(want) = in_qemu_at_crash(point) {
        let ids = peripherals(rig).await;
        assert_eq!(
            ids.iter().any(|i| i == ALIAS),
            want,
            "{point}: QEMU's /machine/peripheral right after the crash: {ids:?}"
        );
    }

    let t = Instant::now();
    let mut d = start(None);
    wait_served(&node, &mut d).await;
    // Before anyone asks: the start-time reconcile makes the ledger match QEMU.
    loop {
        match agree(rig, &node).await {
            Ok(_) => break,
            Err(why) => {
                assert!(
                    t.elapsed() < RECOVERY_BOUND,
                    "{point}: ledger and QEMU disagree after the restart: {why}\n{}",
                    d.log_text()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let (ok, out) = cni(rig, &node, pod_uid(point), "DEL");
    assert!(
        ok,
        "DEL after the restart ({point}): {out}\n{}",
        d.log_text()
    );
    let touched = point != "add-reserved";
    loop {
        match invariants(rig, &node, touched).await {
            Ok(()) => break,
            Err(why) => {
                assert!(
                    t.elapsed() < RECOVERY_BOUND,
                    "{point}: not recovered after {RECOVERY_BOUND:?}: {why}\n{}",
                    d.log_text()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let took = t.elapsed();
    d.stop();
    (outcome, took)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vfplugd_killed_at_every_failpoint_recovers_against_real_qemu() {
    let Gate::Run(lab) = gate(Tier::Qemu) else {
        return;
    };
    let (vfplugd, cni) = host_binaries(
        Path::new(env!("CARGO")),
        Path::new(env!("CARGO_BIN_EXE_vmlab-guest-agent")),
    )
    .expect("vfplugd and vfplug");
    let dir = tempfile::tempdir().expect("tempdir");
    let kubelet = dir.path().join("kubelet");
    let qmp_dir = kubelet
        .join("pods")
        .join(POD_UID)
        .join("volumes/kubernetes.io~empty-dir/qmp");
    std::fs::create_dir_all(&qmp_dir).unwrap();
    std::fs::create_dir_all(
        kubelet
            .join("pods")
            .join(OWED_UID)
            .join("volumes/kubernetes.io~empty-dir/qmp"),
    )
    .unwrap();
    let vm_dir = dir.path().join("vm");
    std::fs::create_dir_all(&vm_dir).unwrap();
    let initrd = vm_dir.join("initrd.cpio");
    std::fs::write(&initrd, guest::hotplug_guest(&lab).expect("initramfs")).unwrap();
    let mut extra = Vec::new();
    for i in 1..=2u8 {
        extra.push("-device".to_owned());
        extra.push(format!(
            "pcie-root-port,id=vfplug-rp{i},bus=pcie.0,chassis={i},slot={i},addr={:#x}",
            i + 1
        ));
    }
    extra.push("-qmp".into());
    extra.push(format!(
        "unix:{},server=on,wait=off",
        qmp_dir.join("qmp.sock").display()
    ));
    let cfg = VmConfig {
        kernel: Some(lab.kernel.clone()),
        initrd: Some(initrd),
        root_ports: 0,
        extra,
        ..VmConfig::default()
    };
    let t0 = Instant::now();
    let mut vm = Vm::spawn(&lab, &cfg, &vm_dir).expect("spawn QEMU");
    let qmp = connect_retry(&vm.qmp_socket(), Duration::from_secs(20))
        .await
        .expect("QMP");
    let prefix = format!("{GUEST_PREFIX} READY");
    vm.wait_serial("guest READY", BOOT, |l| l.starts_with(&prefix))
        .await
        .expect("guest boots");
    let mut f = Figures::default();
    f.record("crash.guest_boot", t0.elapsed());
    let rig = Rig {
        lab,
        dir: dir.path().to_path_buf(),
        kubelet,
        vfplugd,
        cni,
        qmp,
    };
    let _ = &rig.lab;

    // Each failpoint this many times (the figures are medians); one VM throughout.
    let rounds: usize = std::env::var("VMLAB_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let mut rows = Vec::new();
    let mut all = Vec::new();
    for (point, _) in failpoint::POINTS {
        let mut times = Vec::new();
        let mut outcome = String::new();
        for n in 0..rounds {
            let (o, took) = round(&rig, point, n).await;
            println!(
                "VMLAB CRASH {point} #{n}: {o}; recovered in {:.0} ms",
                took.as_secs_f64() * 1e3
            );
            outcome = o;
            times.push(took);
        }
        let median = median_ms(&times).unwrap_or(f64::NAN);
        f.record_ms(&format!("crash.recover.{point}"), median);
        all.extend(times);
        rows.push((*point, outcome, median));
    }
    println!(
        "\n| failpoint | outcome | restart → invariants hold, median of {rounds} |\n|---|---|---:|"
    );
    for (p, o, ms) in &rows {
        println!("| {p} | {o} | {ms:.0} ms |");
    }
    f.record_ms(
        "crash.recover_median_all",
        median_ms(&all).unwrap_or(f64::NAN),
    );
    println!("{}", f.table());
    assert_eq!(rows.len(), failpoint::POINTS.len());
    vm.kill().await;
}
