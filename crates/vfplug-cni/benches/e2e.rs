//! ADD and DEL end to end, on the fake node of `tests/common/mod.rs` (real vfplugd with
//! `--vf-netlink simulated`, VF netdevs that are real veths, pods that are real netns):
//!
//! - (a) the real shim exec'd + the real vfplugd, ADD then DEL, N times, with and without
//!   Debian's host-local as IPAM;
//! - (b) vfplugd's own share: the same Add and Del through the generated node API client (a
//!   fresh connection per call, as the shim makes), no exec, no IPAM; (a) and (b) interleaved;
//! - shim overhead = median (a, no IPAM) - median (b); IPAM's share = median (a) - (a, no IPAM);
//! - (c) 64 ADDs at once (64 threads exec'ing the shim, IPAM on) on 64 VFs of one PF, then 64
//!   DELs at once: wall time, p50/p99 per call, errors.
//!
//! `sudo cargo bench -p vfplug-cni --bench e2e` (N: `VFPLUG_BENCH_N`, default 100). Uses the
//! vfplugd next to the bench's `vfplug` (release), built if missing; `VFPLUGD_BIN` overrides.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{Host, NETWORK, Pod, missing_prerequisite};
use serde_json::{Value, json};
use vfplug_api::v1;

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

#[derive(Default)]
struct Series {
    add: Vec<Duration>,
    del: Vec<Duration>,
}

impl Series {
    fn sorted(mut self) -> Self {
        self.add.sort();
        self.del.sort();
        self
    }
}

fn row(label: &str, v: &[Duration], errors: usize) {
    println!(
        "{label:<44} {:>5} {:>9} {:>9} {:>9} {:>6}",
        v.len(),
        ms(pct(v, 0.5)),
        ms(pct(v, 0.99)),
        ms(*v.last().unwrap()),
        errors
    );
}

/// (a): one round trip through the shim on VF 0; (ADD, DEL) times.
fn shim_round_trip(h: &Host, pod: &Pod, conf: &Value, cid: &str) -> (Duration, Duration) {
    let out = h.cni("ADD", cid, &pod.path, "net1", conf);
    assert_eq!(out.code, Some(0), "ADD: {}\n{}", out.stdout, out.stderr);
    let add = out.elapsed;
    let out = h.cni("DEL", cid, &pod.path, "net1", conf);
    assert_eq!(out.code, Some(0), "DEL: {}\n{}", out.stdout, out.stderr);
    (add, out.elapsed)
}

/// (b): the same through the node API client, a fresh connection per call.
fn node_api_round_trip(h: &Host, pod: &Pod, cid: &str) -> (Duration, Duration) {
    let vf = &h.vfs[0];
    let att = v1::Attachment {
        container_id: cid.into(),
        ifname: "net1".into(),
        pod_uid: format!("uid-{cid}"),
        pod_namespace: "e2e".into(),
        pod_name: cid.into(),
    };
    h.rt.block_on(async {
        let t = Instant::now();
        h.client()
            .await
            .add(v1::AddRequest {
                attachment: Some(att.clone()),
                netns: pod.path.clone(),
                network: NETWORK.into(),
                device_id: vf.pci.clone(),
                pool: String::new(),
                config: Some(v1::VfConfig::default()),
                ips: vec![],
                routes: vec![],
                ipam_result: String::new(),
                qmp_socket: String::new(),
            })
            .await
            .expect("Add");
        let add = t.elapsed();
        let t = Instant::now();
        h.client()
            .await
            .del(v1::DelRequest {
                attachment: Some(att),
                netns: pod.path.clone(),
                network: NETWORK.into(),
                device_id: vf.pci.clone(),
            })
            .await
            .expect("Del");
        (add, t.elapsed())
    })
}

/// (c): `cmd` for every VF at once, one thread per VF; (per-call times, errors, wall).
fn concurrent(h: &Host, pods: &[Pod], cmd: &str) -> (Vec<Duration>, usize, Duration) {
    let start = Instant::now();
    let results: Vec<(Duration, bool, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = h
            .vfs
            .iter()
            .zip(pods)
            .enumerate()
            .map(|(i, (vf, pod))| {
                s.spawn(move || {
                    let conf = h.conf(json!({"deviceID": vf.pci}));
                    let out = h.cni(cmd, &format!("c{i}"), &pod.path, "net1", &conf);
                    (out.elapsed, out.code == Some(0), out.stdout)
                })
            })
            .collect();
        handles.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let wall = start.elapsed();
    let errors: Vec<_> = results.iter().filter(|r| !r.1).map(|r| &r.2).collect();
    for e in errors.iter().take(3) {
        eprintln!("{cmd} failed: {e}");
    }
    let mut v: Vec<Duration> = results.iter().map(|r| r.0).collect();
    v.sort();
    (v, errors.len(), wall)
}

fn main() {
    if let Some(why) = missing_prerequisite() {
        vfplug_host::prereq::skip("benches/e2e", &why);
        return;
    }
    let n: usize = std::env::var("VFPLUG_BENCH_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);

    let h = Host::start(1);
    let pod = h.pod();
    let ipam = h.conf(json!({"deviceID": h.vfs[0].pci}));
    let no_ipam = h.conf_no_ipam(json!({"deviceID": h.vfs[0].pci}));
    // Warm-up: page cache, first ledger writes.
    for i in 0..3 {
        shim_round_trip(&h, &pod, &no_ipam, &format!("w{i}"));
    }
    // Interleaved, so the shared machine's load drifts hit all three series alike.
    let (mut a_ipam, mut a, mut b) = (Series::default(), Series::default(), Series::default());
    for i in 0..n {
        for (s, t) in [
            (
                &mut a_ipam,
                shim_round_trip(&h, &pod, &ipam, &format!("i{i}")),
            ),
            (
                &mut a,
                shim_round_trip(&h, &pod, &no_ipam, &format!("a{i}")),
            ),
            (&mut b, node_api_round_trip(&h, &pod, &format!("b{i}"))),
        ] {
            s.add.push(t.0);
            s.del.push(t.1);
        }
    }
    let (a_ipam, a, b) = (a_ipam.sorted(), a.sorted(), b.sorted());
    h.assert_all_free();
    drop(h);

    let h64 = Host::start(64);
    let pods: Vec<Pod> = (0..64).map(|_| h64.pod()).collect();
    let (c_add, c_add_err, c_add_wall) = concurrent(&h64, &pods, "ADD");
    let configured = h64
        .list()
        .iter()
        .filter(|v| v.state == "configured")
        .count();
    let (c_del, c_del_err, c_del_wall) = concurrent(&h64, &pods, "DEL");
    let left = h64.list().iter().filter(|v| v.state != "free").count();

    println!(
        "\n{:<44} {:>5} {:>9} {:>9} {:>9} {:>6}",
        "ms per call", "n", "p50", "p99", "max", "errors"
    );
    row("(a) shim+vfplugd ADD, host-local IPAM", &a_ipam.add, 0);
    row("(a) shim+vfplugd DEL, host-local IPAM", &a_ipam.del, 0);
    row("(a) shim+vfplugd ADD, no IPAM", &a.add, 0);
    row("(a) shim+vfplugd DEL, no IPAM", &a.del, 0);
    row("(b) node API Add (vfplugd only)", &b.add, 0);
    row("(b) node API Del (vfplugd only)", &b.del, 0);
    row("(c) 64 concurrent ADDs (host-local)", &c_add, c_add_err);
    row("(c) 64 concurrent DELs (host-local)", &c_del, c_del_err);
    let med = |v: &[Duration]| pct(v, 0.5).as_secs_f64() * 1000.0;
    println!("\nmedians, ms:");
    println!(
        "  shim overhead ADD (a no IPAM - b): {:.2}   DEL: {:.2}",
        med(&a.add) - med(&b.add),
        med(&a.del) - med(&b.del)
    );
    println!(
        "  shim overhead ADD with IPAM (a - b): {:.2}   DEL: {:.2}",
        med(&a_ipam.add) - med(&b.add),
        med(&a_ipam.del) - med(&b.del)
    );
    println!(
        "  IPAM's share ADD (a - a no IPAM): {:.2}   DEL: {:.2}",
        med(&a_ipam.add) - med(&a.add),
        med(&a_ipam.del) - med(&a.del)
    );
    println!(
        "  (c) wall: 64 ADDs {} ms ({configured} configured after), 64 DELs {} ms ({left} not free after)",
        ms(c_add_wall),
        ms(c_del_wall)
    );
    assert_eq!(
        (c_add_err, c_del_err, left),
        (0, 0, 0),
        "concurrent run had failures"
    );
    assert_eq!(configured, 64);
}
