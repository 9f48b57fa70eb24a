//! `vfplugctl`: the operator's view of one node's vfplugd, over its node API, for a node without
//! kubectl at hand (`virsh`-like; docs/operator-cli.md). Read-only except `unquarantine`.
//!
//! ```text
//! vfplugctl [--socket PATH] status
//! vfplugctl vfs [--state STATE] [--pool POOL]
//! vfplugctl vms [--pod-uid UID | --namespace NS [--name NAME]]
//! vfplugctl unquarantine PCI
//! ```
//!
//! Exit codes: 0 done (for `status`: ready), 1 vfplugd refused or could not be reached (for
//! `status`: not ready), 2 bad usage (clap's, or an argument that does not parse). Errors go to
//! stderr as `vfplugctl: <what>: <why>`; stdout carries only the answer.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use vfplug_api::v1;
use vfplug_api::v1::node_client::NodeClient;
use vfplug_core::PciAddress;

#[derive(Debug, Parser)]
#[command(
    name = "vfplugctl",
    version,
    about = "Operator view of a node's vfplugd"
)]
struct Cli {
    /// vfplugd's node API socket (vfplugd's `--socket`).
    #[arg(
        long,
        env = "VFPLUG_SOCKET",
        default_value = "/run/vfplug/vfplugd.sock"
    )]
    socket: PathBuf,
    /// How long to wait for vfplugd to answer.
    #[arg(long, default_value_t = 5)]
    timeout_seconds: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Whether vfplugd is ready for CNI calls (exit 1 when not), and its free VFs.
    Status,
    /// Every VF with its ledger state, pool, owner and driver.
    Vfs {
        /// Only VFs in this state (free, configured, attached, quarantined, ...).
        #[arg(long)]
        state: Option<String>,
        /// Only VFs of this pool (resource name, e.g. `intel.com/sriov_vm`).
        #[arg(long)]
        pool: Option<String>,
    },
    /// Each VM pod's nets and hostdevs, with their phase.
    Vms {
        /// Only the VM pod with this UID.
        #[arg(long)]
        pod_uid: Option<String>,
        /// Only VM pods of this namespace.
        #[arg(long)]
        namespace: Option<String>,
        /// Only the VM pod of this name (needs --namespace).
        #[arg(long, requires = "namespace")]
        name: Option<String>,
    },
    /// Returns a quarantined VF to its pool: the operator says it is fine (its current
    /// settings are kept). Prints why it had been quarantined.
    Unquarantine {
        /// The VF's PCI address, e.g. 0000:af:02.1.
        pci: String,
    },
}

/// What `main` turns into an exit code.
enum Outcome {
    Done,
    /// `status`: vfplugd answered, not ready.
    NotReady,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Parse before dialing: a bad argument is a usage error, whatever vfplugd's state.
    if let Cmd::Unquarantine { pci } = &cli.cmd
        && let Err(e) = pci.parse::<PciAddress>()
    {
        eprintln!("vfplugctl: unquarantine {pci:?}: not a PCI address ({e})");
        return ExitCode::from(2);
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vfplugctl: tokio runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(Outcome::Done) => ExitCode::SUCCESS,
        Ok(Outcome::NotReady) => ExitCode::from(1),
        Err(e) => {
            eprintln!("vfplugctl: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<Outcome> {
    let timeout = Duration::from_secs(cli.timeout_seconds);
    let channel = vfplug_api::connect(&cli.socket, timeout).await?;
    let mut node = NodeClient::new(channel);
    // tonic's Status prints its code and message; the message is vfplugd's own sentence.
    let refused = |what: &str, s: tonic::Status| {
        anyhow::anyhow!("{what}: vfplugd refused ({:?}): {}", s.code(), s.message())
    };
    match cli.cmd {
        Cmd::Status => {
            let s = node
                .status(v1::StatusRequest::default())
                .await
                .map_err(|s| refused("status", s))?
                .into_inner();
            if s.ready {
                println!("ready: {} free VFs", s.free);
                Ok(Outcome::Done)
            } else {
                println!("not ready: {}", s.reason);
                Ok(Outcome::NotReady)
            }
        }
        Cmd::Vfs { state, pool } => {
            let vfs = node
                .list(v1::ListRequest {})
                .await
                .map_err(|s| refused("vfs", s))?
                .into_inner()
                .vfs
                .into_iter()
                .filter(|v| state.as_ref().is_none_or(|s| *s == v.state))
                .filter(|v| pool.as_ref().is_none_or(|p| *p == v.pool))
                .collect::<Vec<_>>();
            print!("{}", vfs_table(&vfs));
            Ok(Outcome::Done)
        }
        Cmd::Vms {
            pod_uid,
            namespace,
            name,
        } => {
            let vms = node
                .vm_records(v1::VmRecordsRequest {
                    pod_uid: pod_uid.unwrap_or_default(),
                    pod_namespace: namespace.unwrap_or_default(),
                    pod_name: name.unwrap_or_default(),
                })
                .await
                .map_err(|s| refused("vms", s))?
                .into_inner()
                .vms;
            print!("{}", vms_text(&vms));
            Ok(Outcome::Done)
        }
        Cmd::Unquarantine { pci } => {
            let r = node
                .unquarantine(v1::UnquarantineRequest {
                    pci_address: pci.clone(),
                })
                .await
                .map_err(|s| refused(&format!("unquarantine {pci}"), s))?
                .into_inner();
            println!(
                "{}: back in its pool (it had been quarantined: {})",
                r.pci_address, r.previous_reason
            );
            Ok(Outcome::Done)
        }
    }
}

/// Left-aligned columns separated by two spaces; a header line first.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&width).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_owned()
    }
}

/// `vfs`: one line per VF; the quarantine reason last, as it may be long.
fn vfs_table(vfs: &[v1::VfEntry]) -> String {
    let rows: Vec<Vec<String>> = vfs
        .iter()
        .map(|v| {
            let owner = v.owner.as_ref().map_or(String::new(), |o| {
                let pod = if o.pod_name.is_empty() {
                    String::new()
                } else {
                    format!(" ({}/{})", o.pod_namespace, o.pod_name)
                };
                format!("{}/{}{pod}", o.container_id, o.ifname)
            });
            vec![
                v.pci_address.clone(),
                or_dash(&v.pf_netdev),
                v.vf_index.to_string(),
                or_dash(&v.pool),
                v.state.clone(),
                or_dash(&v.driver),
                or_dash(&owner),
                or_dash(&v.reason),
            ]
        })
        .collect();
    table(
        &[
            "PCI", "PF", "VF", "POOL", "STATE", "DRIVER", "OWNER", "REASON",
        ],
        &rows,
    )
}

fn phase_name(p: i32) -> &'static str {
    match v1::VmPhase::try_from(p) {
        Ok(v1::VmPhase::Pending) => "pending",
        Ok(v1::VmPhase::Attaching) => "attaching",
        Ok(v1::VmPhase::Attached) => "attached",
        Ok(v1::VmPhase::UnplugPending) => "unplug-pending",
        Ok(v1::VmPhase::GuestError) => "guest-error",
        Ok(v1::VmPhase::Releasing) => "releasing",
        Ok(v1::VmPhase::Unspecified) | Err(_) => "unknown",
    }
}

/// `vms`: per VM pod, its nets and its hostdevs (libvirt's two lists), each with its phase.
fn vms_text(vms: &[v1::VmRecord]) -> String {
    if vms.is_empty() {
        return "no VM pod has a VF\n".into();
    }
    let mut out = String::new();
    for vm in vms {
        out.push_str(&format!(
            "VM {}/{} (uid {}, QMP {})\n",
            vm.pod_namespace, vm.pod_name, vm.pod_uid, vm.qmp_socket
        ));
        let nets: Vec<Vec<String>> = vm
            .nets
            .iter()
            .map(|n| {
                vec![
                    n.name.clone(),
                    or_dash(&n.network),
                    or_dash(&n.pool),
                    or_dash(&n.mac),
                    n.vlan.map_or("-".into(), |v| v.to_string()),
                    n.actual
                        .as_ref()
                        .map_or("-".into(), |a| format!("{} {}", a.r#type, a.pci_address)),
                    phase_name(n.phase).into(),
                ]
            })
            .collect();
        out.push_str("  nets:\n");
        for l in table(
            &["NAME", "NETWORK", "POOL", "MAC", "VLAN", "ACTUAL", "PHASE"],
            &nets,
        )
        .lines()
        {
            out.push_str(&format!("    {l}\n"));
        }
        let hostdevs: Vec<Vec<String>> = vm
            .hostdevs
            .iter()
            .map(|h| {
                vec![
                    or_dash(&h.alias),
                    h.pci_address.clone(),
                    h.parent_net.clone(),
                    phase_name(h.phase).into(),
                    or_dash(&h.reason),
                ]
            })
            .collect();
        out.push_str("  hostdevs:\n");
        for l in table(&["ALIAS", "PCI", "NET", "PHASE", "REASON"], &hostdevs).lines() {
            out.push_str(&format!("    {l}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vms_records_print_as_two_lists_with_their_phases() {
        let vm = v1::VmRecord {
            pod_namespace: "ns".into(),
            pod_name: "vm-a".into(),
            pod_uid: "uid-a".into(),
            qmp_socket: "/k/pods/uid-a/volumes/kubernetes.io~empty-dir/qmp/qmp.sock".into(),
            nets: vec![v1::NetRecord {
                name: "net1".into(),
                network: "vmnet".into(),
                pool: "intel.com/vm".into(),
                mac: "02:00:00:00:00:42".into(),
                vlan: Some(100),
                actual: Some(v1::ActualDevice {
                    r#type: "hostdev".into(),
                    pci_address: "0000:af:02.1".into(),
                }),
                phase: v1::VmPhase::GuestError.into(),
            }],
            hostdevs: vec![v1::HostdevRecord {
                alias: "vfplug-net1".into(),
                pci_address: "0000:af:02.1".into(),
                parent_net: "net1".into(),
                phase: v1::VmPhase::GuestError.into(),
                reason: "the guest refused the unplug".into(),
            }],
        };
        let text = vms_text(&[vm]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with("VM ns/vm-a (uid uid-a, QMP /k/pods/"),
            "{text}"
        );
        assert_eq!(lines[1], "  nets:");
        assert!(
            lines[2]
                .split_whitespace()
                .eq(["NAME", "NETWORK", "POOL", "MAC", "VLAN", "ACTUAL", "PHASE"])
        );
        assert!(
            lines[3].split_whitespace().eq([
                "net1",
                "vmnet",
                "intel.com/vm",
                "02:00:00:00:00:42",
                "100",
                "hostdev",
                "0000:af:02.1",
                "guest-error"
            ]),
            "{text}"
        );
        assert_eq!(lines[4], "  hostdevs:");
        assert!(
            lines[6].starts_with("    vfplug-net1  0000:af:02.1  net1  guest-error  the guest"),
            "{text}"
        );
        assert_eq!(vms_text(&[]), "no VM pod has a VF\n");
    }

    #[test]
    fn columns_line_up_and_empty_cells_are_dashes() {
        let t = table(
            &["A", "LONGER", "C"],
            &[
                vec!["xxxx".into(), or_dash(""), "z".into()],
                vec!["y".into(), "b".into(), or_dash("")],
            ],
        );
        assert_eq!(t, "A     LONGER  C\nxxxx  -       z\ny     b       -\n");
    }
}
