//! Running the sriov tiers' L1 guest: q35 + emulated VT-d + an `igb` PF, the host's /usr shared
//! read-only and a run directory shared as /lab, with `vmlab-guest-agent` started by `run.sh`.
//! [`run_l1`] stages the run directory, boots L1, waits for the agent to finish and returns the
//! agent's report lines and figures; each tier test then asserts on the lines. The agent's lines
//! are printed as they appear, with the time since L1 was started, and a progress line every
//! 10 s without news: slow TCG runs (the demo) must be followable by a human.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::LabError;
use crate::agent::AGENT_PREFIX;
use crate::guest::{self, L1_PREFIX, TAG_LAB, TAG_USR};
use crate::lab::Lab;
use crate::timing::Figures;
use crate::vm::{Virtfs, Vm, VmConfig};

/// The L1 VM: the lab's run directory shared as `lab`, the host's /usr read-only as `usr`.
pub fn l1_config(lab: &Lab, run: &Path, initrd: &Path, memory_mb: u32) -> VmConfig {
    VmConfig {
        memory_mb,
        smp: 2,
        intel_iommu: true,
        no_reboot: true,
        kernel: Some(lab.kernel.clone()),
        initrd: Some(initrd.to_path_buf()),
        // no_timer_check: under load, TCG can miss the early IO-APIC timer check, which with
        // interrupt remapping panics ("timer doesn't work through Interrupt-remapped IO-APIC").
        append: "intel_iommu=on iommu=pt no_timer_check".into(),
        virtfs: vec![
            Virtfs {
                path: "/usr".into(),
                tag: TAG_USR.into(),
                readonly: true,
            },
            Virtfs {
                path: run.to_path_buf(),
                tag: TAG_LAB.into(),
                readonly: false,
            },
        ],
        extra: [
            "-netdev",
            "user,id=pfnet",
            "-device",
            "igb,bus=rp1,netdev=pfnet,id=pf0",
        ]
        .map(String::from)
        .to_vec(),
        ..VmConfig::default()
    }
}

/// One L1 run.
#[derive(Debug, Clone)]
pub struct L1Run {
    /// The host-built `vmlab-guest-agent` binary (tests pass `env!("CARGO_BIN_EXE_...")`).
    pub agent: PathBuf,
    /// The agent's arguments (e.g. `--numvfs 2 --phases vfconfig --workdir /tmp/vmlab-l2`).
    pub agent_args: String,
    /// More host-built binaries, staged in /lab under their file names (e.g. vfplugd).
    pub binaries: Vec<PathBuf>,
    /// Also stage L2's kernel (`/lab/vmlinuz`) and initramfs (`/lab/l2.cpio`).
    pub stage_l2: bool,
    /// L1's memory.
    pub memory_mb: u32,
    /// How long the agent may take after L1 is up.
    pub budget: Duration,
    /// Name of the figure recording the whole run.
    pub total_figure: &'static str,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LabError + '_ {
    move |source| LabError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Stages `run_dir` (seen by L1 as /lab), boots L1 with its files in `vm_dir`, and returns the
/// agent's report lines (`AGENT_PREFIX ...`) once the agent has finished, with the figures it
/// printed plus L1's boot and total times. QEMU is killed if it does not power off.
pub async fn run_l1(
    lab: &Lab,
    run_dir: &Path,
    vm_dir: &Path,
    r: &L1Run,
) -> Result<(Vec<String>, Figures), LabError> {
    let staged = run_dir.join("vmlab-guest-agent");
    std::fs::copy(&r.agent, &staged).map_err(io(&staged))?;
    for b in &r.binaries {
        let name = b.file_name().ok_or_else(|| LabError::Missing {
            what: format!("{}: not a file name", b.display()),
        })?;
        let to = run_dir.join(name);
        std::fs::copy(b, &to).map_err(io(&to))?;
    }
    if r.stage_l2 {
        let k = run_dir.join("vmlinuz");
        std::fs::copy(&lab.kernel, &k).map_err(io(&k))?;
        let l2 = run_dir.join("l2.cpio");
        std::fs::write(&l2, guest::hotplug_guest(lab)?).map_err(io(&l2))?;
    }
    // Runs chrooted in L1 with the host's /usr: the agent is this checkout's build, unchanged.
    let script = format!(
        "echo \"{AGENT_PREFIX} START $(uname -r)\"\nexec /lab/vmlab-guest-agent {}\n",
        r.agent_args
    );
    let run_sh = run_dir.join("run.sh");
    std::fs::write(&run_sh, script).map_err(io(&run_sh))?;
    let initrd = vm_dir.join("l1.cpio");
    std::fs::write(&initrd, guest::l1_guest(lab)?).map_err(io(&initrd))?;

    let mut f = Figures::default();
    let cfg = l1_config(lab, run_dir, &initrd, r.memory_mb);
    let ready = format!("{L1_PREFIX} READY");
    let mut attempt = 0;
    let (mut vm, t0) = loop {
        attempt += 1;
        let t0 = Instant::now();
        let dir = if attempt == 1 {
            vm_dir.to_path_buf()
        } else {
            let d = vm_dir.join(format!("boot-{attempt}"));
            std::fs::create_dir_all(&d).map_err(io(&d))?;
            d
        };
        let mut vm = Vm::spawn(lab, &cfg, &dir)?;
        let booted = follow(
            &mut vm,
            t0,
            Duration::from_secs(180),
            Duration::from_secs(10),
            "still booting L1",
            |l| l.starts_with(&ready),
        )
        .await;
        match booted {
            Ok(_) => break (vm, t0),
            Err(e) => {
                let stderr = vm.stderr_text();
                vm.kill().await;
                // QEMU's TCG itself now and then dies on one of its own assertions while L1
                // boots (seen: `physmem.c: iotlb_to_section: Assertion ... failed`, once in
                // about ten CI runs). Nothing of vfplug runs before READY, so that is the
                // emulator's failure, not the test's: L1 is booted once more, loudly.
                let assertion = stderr.lines().find(|l| l.contains("Assertion"));
                if let (1, Some(a)) = (attempt, assertion) {
                    println!(
                        "VMLAB NOTE: L1's QEMU died on its own assertion while booting, before \
                         any vfplug code ran ({a}); booting L1 once more"
                    );
                    continue;
                }
                return Err(e);
            }
        }
    };
    f.record("sriov.l1_boot_to_ready", t0.elapsed());
    let exit = format!("{L1_PREFIX} EXIT");
    // The agent narrates its own slow steps; this only covers its silences.
    let done = follow(
        &mut vm,
        t0,
        r.budget,
        Duration::from_secs(30),
        "L1 agent at work",
        |l| l.starts_with(&exit),
    )
    .await;
    f.record(r.total_figure, t0.elapsed());
    if let Err(e) = done {
        vm.kill().await;
        return Err(e);
    }
    let lines: Vec<String> = vm
        .serial_text()
        .lines()
        .filter(|l| l.starts_with(AGENT_PREFIX))
        .map(String::from)
        .collect();
    let figure = format!("{AGENT_PREFIX} FIGURE ");
    for l in &lines {
        if let Some(rest) = l.strip_prefix(&figure) {
            let mut it = rest.split_whitespace();
            if let (Some(name), Some(ms)) = (it.next(), it.next().and_then(|v| v.parse().ok())) {
                f.record_ms(name, ms);
            }
        }
    }
    // Power-off is QEMU's exit; do not leave it running if it hangs.
    // (The agent's lines were printed as they came, by `follow`.)
    if vm.wait_exit(Duration::from_secs(30)).await.is_err() {
        vm.kill().await;
    }
    Ok((lines, f))
}

/// `[  12.3s] ` for a line printed `since` after L1's start.
fn stamp(since: Duration) -> String {
    format!("[{:>6.1}s]", since.as_secs_f64())
}

/// Waits (at most `within`) for the serial line `done` accepts, printing every agent line on the
/// way as it appears (`SAY` lines as plain text) and `<quiet>… N s` after `every` without one.
async fn follow(
    vm: &mut Vm,
    t0: Instant,
    within: Duration,
    every: Duration,
    quiet: &str,
    done: impl Fn(&str) -> bool,
) -> Result<String, LabError> {
    let start = Instant::now();
    let say = format!("{AGENT_PREFIX} SAY ");
    loop {
        let left = within.saturating_sub(start.elapsed());
        let next = vm
            .wait_serial(quiet, left.min(every), |l| {
                done(l) || l.starts_with(AGENT_PREFIX)
            })
            .await;
        match next {
            Ok(l) if done(&l) => return Ok(l),
            Ok(l) => match l.strip_prefix(&say) {
                Some(text) => println!("{} {text}", stamp(t0.elapsed())),
                None => println!("{} {l}", stamp(t0.elapsed())),
            },
            Err(LabError::Timeout { .. }) if start.elapsed() < within => {
                println!(
                    "{} {quiet}… {} s",
                    stamp(t0.elapsed()),
                    start.elapsed().as_secs()
                );
            }
            Err(LabError::Timeout { tail, .. }) => {
                return Err(LabError::Timeout {
                    what: quiet.into(),
                    after: within,
                    tail,
                });
            }
            Err(e) => return Err(e),
        }
    }
}

/// The host-built `vfplugd` and `vfplug` CNI binary for L1, next to the agent `agent` (tests pass
/// `env!("CARGO_BIN_EXE_vmlab-guest-agent")`), without debug info, in `into`.
///
/// Built by [`crate::lab::host_binaries`] (a no-op when they are fresh). Stripping (`objcopy --strip-debug`: 157 MB → ~32 MB for a debug vfplugd) matters
/// because 9p under TCG reads ~13 MB/s; without `objcopy` the binaries are staged as they are.
pub fn host_binaries(agent: &Path, into: &Path) -> Result<(PathBuf, PathBuf), LabError> {
    let (vfplugd, cni) = crate::lab::host_binaries(Path::new(env!("CARGO")), agent)?;
    let strip = |bin: PathBuf| -> PathBuf {
        let Some(name) = bin.file_name() else {
            return bin;
        };
        let to = into.join(name);
        let ok = std::process::Command::new("objcopy")
            .arg("--strip-debug")
            .arg(&bin)
            .arg(&to)
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            to
        } else {
            println!(
                "VMLAB NOTE: objcopy failed or missing; staging {} unstripped",
                bin.display()
            );
            bin
        }
    };
    Ok((strip(vfplugd), strip(cni)))
}

/// The detail of step `step`'s `PASS` line in the agent's report, if there is one.
pub fn pass_detail<'a>(lines: &'a [String], step: &str) -> Option<&'a str> {
    let p = format!("{AGENT_PREFIX} PASS {step} ");
    lines.iter().find_map(|l| l.strip_prefix(&p))
}
