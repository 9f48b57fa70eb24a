//! Device-plugin figures over real gRPC on unix sockets, against the fake kubelet:
//!
//! - first ListAndWatch snapshot after registration, 2048 devices;
//! - Allocate latency p50/p99 for 1 and 8 vfio devices (10k calls each, SR-IOV ABI built per call);
//! - change -> snapshot observed by the kubelet, after a quiet period and inside a burst;
//! - kubelet restart -> re-registration.
//!
//! Run: `cargo bench -p vfplug-kubelet --bench plugin`. Prints figures; asserts nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use vfplug_kubelet::plugin::{PluginConfig, RegistrationMode, spawn_plugin};
use vfplug_kubelet::testing::{FakeKubelet, TestBackend};

const RES: &str = "vfplug.io/pool0";
const WAIT: Duration = Duration::from_secs(30);

fn pct(v: &mut [Duration], q: f64) -> Duration {
    v.sort();
    let i = ((v.len() as f64) * q) as usize;
    v[i.min(v.len() - 1)]
}

fn summary(name: &str, v: &mut [Duration]) {
    let p50 = pct(v, 0.50);
    let p99 = pct(v, 0.99);
    let max = *v.iter().max().unwrap();
    println!(
        "{name:<48} n={:<6} p50={p50:>10.1?} p99={p99:>10.1?} max={max:>10.1?}",
        v.len()
    );
}

fn config(dir: &std::path::Path) -> PluginConfig {
    let mut c = PluginConfig::new("pool0", dir);
    c.mode = RegistrationMode::Legacy;
    c
}

async fn first_snapshot(iterations: usize, devices: usize) {
    let mut after_reg = Vec::new();
    let mut after_spawn = Vec::new();
    for _ in 0..iterations {
        let dir = tempfile::tempdir().unwrap();
        let kubelet = FakeKubelet::start(dir.path()).await.unwrap();
        let b = Arc::new(TestBackend::new(
            "vfplug.io",
            "pool0",
            TestBackend::vfio_devices(devices),
        ));
        let cancel = CancellationToken::new();
        let t0 = Instant::now();
        let h = spawn_plugin(config(dir.path()), b, cancel.clone());
        let snap = kubelet
            .wait_snapshot(RES, None, WAIT, |s| s.devices.len() == devices)
            .await
            .unwrap();
        let reg = kubelet.registrations()[0].at;
        after_reg.push(snap.at.saturating_duration_since(reg));
        after_spawn.push(snap.at - t0);
        cancel.cancel();
        h.join().await;
    }
    summary(
        &format!("first snapshot after Register ({devices} devs)"),
        &mut after_reg,
    );
    summary(
        &format!("spawn -> first snapshot ({devices} devs)"),
        &mut after_spawn,
    );
}

async fn allocate_latency(calls: usize) {
    let dir = tempfile::tempdir().unwrap();
    let kubelet = FakeKubelet::start(dir.path()).await.unwrap();
    let b = Arc::new(TestBackend::new(
        "vfplug.io",
        "pool0",
        TestBackend::vfio_devices(2048),
    ));
    let ids: Vec<String> = b.current().iter().map(|d| d.id.clone()).collect();
    let cancel = CancellationToken::new();
    let h = spawn_plugin(config(dir.path()), b, cancel.clone());
    kubelet.wait_registrations(1, WAIT).await.unwrap();
    for n in [1usize, 8] {
        // Warm up the connection.
        for i in 0..100 {
            let req: Vec<String> = (0..n)
                .map(|k| ids[(i * n + k) % ids.len()].clone())
                .collect();
            kubelet.allocate(RES, vec![req]).await.unwrap();
        }
        let mut lat = Vec::with_capacity(calls);
        for i in 0..calls {
            // Spread requests over the pool, devices near the end included.
            let req: Vec<String> = (0..n)
                .map(|k| ids[(i * 7919 + k * 131) % ids.len()].clone())
                .collect();
            let t = Instant::now();
            let resp = kubelet.allocate(RES, vec![req]).await.unwrap();
            lat.push(t.elapsed());
            assert_eq!(resp.container_responses.len(), 1);
        }
        summary(&format!("Allocate {n} device(s), 2048-dev pool"), &mut lat);
    }
    cancel.cancel();
    h.join().await;
}

async fn change_latency(iterations: usize) {
    let dir = tempfile::tempdir().unwrap();
    let kubelet = FakeKubelet::start(dir.path()).await.unwrap();
    let b = Arc::new(TestBackend::new(
        "vfplug.io",
        "pool0",
        TestBackend::vfio_devices(2048),
    ));
    let ids: Vec<String> = b.current().iter().map(|d| d.id.clone()).collect();
    let cancel = CancellationToken::new();
    let h = spawn_plugin(config(dir.path()), b.clone(), cancel.clone());
    kubelet
        .wait_snapshot(RES, None, WAIT, |s| s.devices.len() == 2048)
        .await
        .unwrap();
    let mut quiet = Vec::new();
    let mut burst = Vec::new();
    for i in 0..iterations {
        // Quiet period longer than the 100 ms debounce: the change goes out at once.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let id = ids[i % ids.len()].clone();
        let healthy = i % 2 == 1;
        let t0 = Instant::now();
        b.set_health(&id, healthy);
        let want = if healthy { "Healthy" } else { "Unhealthy" };
        let snap = kubelet
            .wait_snapshot(RES, Some(t0), WAIT, |s| {
                s.devices.iter().any(|d| d.id == id && d.health == want)
            })
            .await
            .unwrap();
        quiet.push(snap.at - t0);
        // A second change right after: coalesced, sent at the end of the window.
        let t1 = Instant::now();
        b.set_health(&id, !healthy);
        let want = if healthy { "Unhealthy" } else { "Healthy" };
        let snap = kubelet
            .wait_snapshot(RES, Some(t1), WAIT, |s| {
                s.devices.iter().any(|d| d.id == id && d.health == want)
            })
            .await
            .unwrap();
        burst.push(snap.at - t1);
    }
    summary("change -> kubelet snapshot, after quiet period", &mut quiet);
    summary(
        "change -> kubelet snapshot, inside 100 ms window",
        &mut burst,
    );
    cancel.cancel();
    h.join().await;
}

async fn restart_latency(iterations: usize) {
    let dir = tempfile::tempdir().unwrap();
    let kubelet = FakeKubelet::start(dir.path()).await.unwrap();
    let b = Arc::new(TestBackend::new(
        "vfplug.io",
        "pool0",
        TestBackend::vfio_devices(2048),
    ));
    let cancel = CancellationToken::new();
    let h = spawn_plugin(config(dir.path()), b, cancel.clone());
    kubelet.wait_registrations(1, WAIT).await.unwrap();
    let mut lat = Vec::new();
    for i in 0..iterations {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let t0 = Instant::now();
        kubelet.restart().unwrap();
        kubelet.wait_registrations(i + 2, WAIT).await.unwrap();
        let snap = kubelet
            .wait_snapshot(RES, Some(t0), WAIT, |s| s.devices.len() == 2048)
            .await
            .unwrap();
        lat.push(snap.at - t0);
    }
    summary("kubelet restart -> re-registered + snapshot", &mut lat);
    cancel.cancel();
    h.join().await;
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        first_snapshot(20, 2048).await;
        allocate_latency(10_000).await;
        change_latency(30).await;
        restart_latency(20).await;
    });
}
