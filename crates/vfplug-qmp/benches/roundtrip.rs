//! QMP command round trip against the scripted server over a real unix socket (tempdir path,
//! `Qmp::connect`): p50/p99/max of sequential `query-status` calls, then throughput with
//! concurrent callers sharing one connection. Measures this client's overhead (encode, writer
//! task, socket, reader task, id routing, decode) — QEMU's own time is not included.
//!
//! Run: `cargo bench -p vfplug-qmp --bench roundtrip` (env `QMP_BENCH_N`, default 10000).

use std::time::{Duration, Instant};

use serde_json::json;
use vfplug_qmp::Qmp;
use vfplug_qmp::testing::QmpPeer;
use vfplug_qmp::wire::{QemuVersion, VersionInfo};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = std::env::var("QMP_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(n))
}

async fn run(n: usize) -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("qmp.sock");
    let listener = tokio::net::UnixListener::bind(&path)?;
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await?;
        let mut peer = QmpPeer::new(stream);
        let version = VersionInfo {
            qemu: QemuVersion {
                major: 10,
                minor: 0,
                micro: 2,
            },
            package: String::new(),
        };
        peer.handshake(&version).await?;
        let status = json!({"running": true, "status": "running"});
        let empty = json!({});
        while let Some(req) = peer.next_request().await? {
            let reply = if req.execute == "query-status" {
                &status
            } else {
                &empty
            };
            peer.reply(&req, reply).await?;
        }
        Ok::<_, vfplug_qmp::testing::ScriptError>(())
    });

    let t0 = Instant::now();
    let qmp = Qmp::connect(&path, Duration::from_secs(5)).await?;
    let connect = t0.elapsed();

    for _ in 0..n / 10 {
        qmp.query_status().await?;
    }
    let mut samples = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        let st = qmp.query_status().await?;
        samples.push(t.elapsed());
        assert!(st.running);
    }
    let total = start.elapsed();
    samples.sort_unstable();

    let tasks = 8;
    let per_task = n / tasks;
    let start_c = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let q = qmp.clone();
        handles.push(tokio::spawn(async move {
            for _ in 0..per_task {
                q.query_status().await?;
            }
            Ok::<_, vfplug_qmp::QmpError>(())
        }));
    }
    for h in handles {
        h.await??;
    }
    let total_c = start_c.elapsed();

    println!("vfplug-qmp round trip, scripted server over a unix socket, {n} x query-status");
    println!("  connect + greeting + qmp_capabilities: {connect:?}");
    println!(
        "  sequential: p50 {:?}  p99 {:?}  max {:?}  mean {:?}  ({:.0} calls/s)",
        percentile(&samples, 0.50),
        percentile(&samples, 0.99),
        samples.last().copied().unwrap_or_default(),
        total / u32::try_from(n.max(1))?,
        n as f64 / total.as_secs_f64()
    );
    println!(
        "  {tasks} concurrent callers, one connection: {} calls in {total_c:?} ({:.0} calls/s)",
        tasks * per_task,
        (tasks * per_task) as f64 / total_c.as_secs_f64()
    );
    drop(qmp);
    server.await??;
    Ok(())
}
