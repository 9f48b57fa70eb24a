//! Exec time of the optimized `vfplug` binary, as a runtime sees it (spawn, run, exit):
//! VERSION (no config, no runtime, no socket) and a full ADD against the in-process fake node
//! API server (config parsing, tokio current-thread runtime, unix-socket gRPC dial and call,
//! result). `cargo bench -p vfplug-cni --bench exec` (N=200 each; prints p50/p99/max).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::json;
use vfplug_cni::testing::{FakeNode, Plugin, tempdir};

const N: usize = 200;

fn report(name: &str, mut d: Vec<Duration>) {
    d.sort();
    let pct = |p: f64| d[((d.len() as f64 * p).ceil() as usize).saturating_sub(1)];
    println!(
        "{name:<34} n={:<4} p50 {:>7.2} ms   p99 {:>7.2} ms   max {:>7.2} ms",
        d.len(),
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        d[d.len() - 1].as_secs_f64() * 1e3,
    );
}

fn main() {
    let plugin = Plugin::new(env!("CARGO_BIN_EXE_vfplug"));

    // The floor: the same spawn, pipes and wait around a program that does nothing.
    let truth = Plugin::new("/bin/true");
    let floor: Vec<Duration> = (0..N)
        .map(|_| truth.run(&[], b"").unwrap().elapsed)
        .collect();
    report("/bin/true (spawn floor)", floor);

    // Warm the page cache so the first run's disk read is not counted.
    plugin.run(&[("CNI_COMMAND", "VERSION")], b"").unwrap();
    let version: Vec<Duration> = (0..N)
        .map(|_| {
            let r = plugin.run(&[("CNI_COMMAND", "VERSION")], b"").unwrap();
            assert_eq!(r.code, Some(0));
            r.elapsed
        })
        .collect();
    report("VERSION (exec to exit)", version);

    let dir = tempdir().unwrap();
    let node = FakeNode::start(dir.path()).unwrap();
    let conf = json!({
        "cniVersion": "1.1.0", "name": "bench-net", "type": "vfplug",
        "deviceID": "0000:3b:02.1", "vlan": 100, "spoofchk": "on",
        "socket": node.socket.to_str().unwrap(),
    })
    .to_string();
    let add: Vec<Duration> = (0..N)
        .map(|i| {
            let id = format!("c{i}");
            let r = plugin
                .run(
                    &[
                        ("CNI_COMMAND", "ADD"),
                        ("CNI_CONTAINERID", &id),
                        ("CNI_NETNS", "/var/run/netns/bench"),
                        ("CNI_IFNAME", "net1"),
                        (
                            "CNI_ARGS",
                            "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p",
                        ),
                    ],
                    conf.as_bytes(),
                )
                .unwrap();
            assert_eq!(r.code, Some(0), "{}", r.stdout);
            r.elapsed
        })
        .collect();
    report("ADD via fake node API (exec to exit)", add);
}
