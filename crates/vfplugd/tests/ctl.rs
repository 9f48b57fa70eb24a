//! `vfplugctl` against the real vfplugd on a fake node (docs/operator-cli.md): its answers, its
//! exit codes, and the one thing it changes (a quarantine cleared).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use vfplug_api::v1;
use vfplug_api::v1::node_client::NodeClient;

fn ctl(sock: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vfplugctl"))
        .arg("--socket")
        .arg(sock)
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// vfplugd on a two-VF vfio node under `root`, serving its node API.
async fn vfplugd(root: &Path) -> Child {
    let sock = root.join("vfplugd.sock");
    let child = vfplug_host::fixture::vfplugd_command(
        Path::new(env!("CARGO_BIN_EXE_vfplugd")),
        root,
        &root.join("state"),
    )
    .spawn()
    .unwrap();
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "vfplugd never served"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vfplugctl_lists_vfs_and_vms_and_clears_a_quarantine() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let vfs = vfplug_host::fixture::vfio_node(root, 2).unwrap();
    let mut d = vfplugd(root).await;
    let sock = root.join("vfplugd.sock");
    let vf0 = vfs[0].to_string();

    let o = ctl(&sock, &["status"]);
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(
        text(&o).0.starts_with("ready: 2 free VFs"),
        "{:?}",
        text(&o)
    );

    let o = ctl(&sock, &["vfs"]);
    let (out, _) = text(&o);
    assert!(o.status.success(), "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("PCI "), "{out}");
    assert_eq!(lines.len(), 3, "{out}");
    for (l, vf) in lines[1..].iter().zip(&vfs) {
        let cols: Vec<&str> = l.split_whitespace().collect();
        assert_eq!(
            (cols[0], cols[3], cols[4], cols[5]),
            (vf.to_string().as_str(), "vfplug.io/vm", "free", "vfio-pci"),
            "{out}"
        );
    }

    // A VF whose function reset fails on release is quarantined, never freed: here its `reset`
    // is a directory, which cannot be written.
    let reset = root.join("sys/bus/pci/devices").join(&vf0).join("reset");
    std::fs::remove_file(&reset).unwrap();
    std::fs::create_dir(&reset).unwrap();
    let ch = vfplug_api::connect(&sock, Duration::from_secs(5))
        .await
        .unwrap();
    let mut node = NodeClient::new(ch);
    let att = v1::Attachment {
        container_id: "sb-1".into(),
        ifname: "net1".into(),
        pod_namespace: "ns".into(),
        pod_name: "pod-1".into(),
        ..Default::default()
    };
    node.add(v1::AddRequest {
        attachment: Some(att.clone()),
        device_id: vf0.clone(),
        network: "vmnet".into(),
        netns: "/var/run/netns/none".into(),
        config: Some(v1::VfConfig {
            vlan: Some(7),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let o = ctl(&sock, &["vfs", "--state", "configured"]);
    let (out, _) = text(&o);
    assert!(
        out.contains(&vf0) && out.contains("sb-1/net1 (ns/pod-1)"),
        "{out}"
    );
    node.del(v1::DelRequest {
        attachment: Some(att),
        ..Default::default()
    })
    .await
    .unwrap();
    let o = ctl(&sock, &["vfs", "--state", "quarantined"]);
    let (out, _) = text(&o);
    assert!(out.contains(&vf0) && out.contains("reset"), "{out}");

    // Clearing it: exit 0, the old reason printed, the VF back to free.
    let o = ctl(&sock, &["unquarantine", &vf0]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(
        out.starts_with(&format!("{vf0}: back in its pool")),
        "{out}"
    );
    let o = ctl(&sock, &["vfs", "--state", "free"]);
    assert_eq!(text(&o).0.lines().count(), 3, "{:?}", text(&o));

    // Refusals: a VF that is not quarantined (1, vfplugd's sentence), a bad address (2, nothing
    // asked), a name without its namespace (2, clap).
    let o = ctl(&sock, &["unquarantine", &vf0]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    assert!(
        out.is_empty() && err.starts_with(&format!("vfplugctl: unquarantine {vf0}")),
        "{err}"
    );
    let o = ctl(&sock, &["unquarantine", "af:02"]);
    assert_eq!(o.status.code(), Some(2), "{:?}", text(&o));
    assert!(text(&o).1.contains("not a PCI address"), "{:?}", text(&o));
    let o = ctl(&sock, &["vms", "--name", "vm-a"]);
    assert_eq!(o.status.code(), Some(2), "{:?}", text(&o));

    // No VM pods on this node.
    let o = ctl(&sock, &["vms"]);
    assert!(o.status.success());
    assert_eq!(text(&o).0, "no VM pod has a VF\n");

    let _ = Command::new("kill")
        .args(["-TERM", &d.id().to_string()])
        .status();
    d.wait().unwrap();
    // vfplugd gone: 1, and the socket named.
    let o = ctl(&sock, &["--timeout-seconds", "1", "status"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot reach vfplugd at") && err.contains("vfplugd.sock"),
        "{err}"
    );
}
