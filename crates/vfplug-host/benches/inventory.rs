//! Inventory benchmark: 8 PFs x 256 VFs (2048 VFs, the DESIGN.md §8 scale point).
//!
//! Measures, on a fake sysfs tree built by the fixture:
//! - the fixture build (once),
//! - `SysfsInventory::scan()` over N iterations (p50 / p99 / mean / max),
//! - `watch::Fingerprint::compute()` over N iterations (the watcher's poll cost),
//! - the watcher's detection latency for PF carrier flips and VF rebinds on that tree.
//!
//! Run: `cargo bench -p vfplug-host --bench inventory` (N via `VFPLUG_BENCH_ITERS`, default
//! 200; the tree goes on tmpfs (`/dev/shm`) when available, as sysfs is in memory too, or under
//! `VFPLUG_BENCH_DIR` to pick another file system). Timings are printed, never asserted.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use vfplug_host::fixture::{SysfsBuilder, VfSpec};
use vfplug_host::sysfs::SysfsInventory;
use vfplug_host::watch::{Fingerprint, HostEvent, WatchConfig, spawn_watcher};

const PFS: u32 = 8;
const VFS: u32 = 256;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let iters: usize = std::env::var("VFPLUG_BENCH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let base = std::env::var_os("VFPLUG_BENCH_DIR").map(std::path::PathBuf::from);
    let dir = match &base {
        Some(b) => tempfile::tempdir_in(b)?,
        None => vfplug_host::fixture::tempdir()?,
    };

    let t = Instant::now();
    let mut b = SysfsBuilder::new(dir.path());
    for p in 0..PFS {
        b.pf(&format!("0000:{:02x}:00.0", 0x10 + 2 * p))
            .driver("ice")
            .netdev(&format!("ens{p}f0"))
            .numa((p % 2) as i32)
            .total_vfs(VFS)
            .vfs(VFS, |i| {
                // A realistic mix: most VFs on the host driver, a quarter on vfio-pci.
                if i % 4 == 3 {
                    VfSpec::new().driver("vfio-pci")
                } else {
                    VfSpec::new().driver("iavf").netdev(format!("ens{p}f0v{i}"))
                }
            })
            .build()?;
    }
    let build = t.elapsed();
    println!(
        "fixture build: {PFS} PFs x {VFS} VFs in {:.1} ms ({})",
        ms(build),
        dir.path().display()
    );

    let inv = SysfsInventory::new(dir.path().to_path_buf());
    let first = inv.scan()?;
    if first.vfs.len() != (PFS * VFS) as usize || first.pfs.len() != PFS as usize {
        return Err(format!(
            "scan found {} PFs / {} VFs",
            first.pfs.len(),
            first.vfs.len()
        )
        .into());
    }
    report("scan() default threads", iters, || {
        std::hint::black_box(inv.scan()).ok();
    });
    let single = SysfsInventory::new(dir.path().to_path_buf()).with_threads(1);
    report("scan() 1 thread", iters, || {
        std::hint::black_box(single.scan()).ok();
    });
    report("Fingerprint::compute()", iters, || {
        std::hint::black_box(Fingerprint::compute(dir.path()));
    });
    watcher_latency(&b, dir.path())
}

/// Time from a change in the tree to its event, with the watcher's defaults for a fake root
/// (carrier poll 50 ms, fingerprint poll 100 ms). Changes are spaced by varying delays so
/// they land at different points of the poll period.
fn watcher_latency(
    b: &SysfsBuilder,
    root: &std::path::Path,
) -> Result<(), Box<dyn std::error::Error>> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut cfg = WatchConfig::new(root.to_path_buf());
        cfg.resync = Duration::from_secs(3600);
        let (carrier_poll, fp_poll) = (cfg.carrier_poll, cfg.fingerprint_poll);
        let cancel = CancellationToken::new();
        let mut rx = spawn_watcher(cfg, cancel.clone());
        tokio::time::sleep(Duration::from_millis(500)).await; // first fingerprint = baseline

        let mut carrier = Vec::new();
        for i in 0..40u64 {
            let t = Instant::now();
            b.set_carrier("ens0f0", i % 2 == 1)?;
            wait_for(&mut rx, |e| matches!(e, HostEvent::CarrierChanged { .. })).await?;
            carrier.push(t.elapsed());
            tokio::time::sleep(Duration::from_millis(5 + (i * 17) % 50)).await;
        }
        let mut pci = Vec::new();
        for i in 0..20u64 {
            let t = Instant::now();
            b.rebind(
                "0000:10:01.3",
                Some(if i % 2 == 0 { "iavf" } else { "vfio-pci" }),
            )?;
            wait_for(&mut rx, |e| matches!(e, HostEvent::PciChanged { .. })).await?;
            pci.push(t.elapsed());
            tokio::time::sleep(Duration::from_millis(5 + (i * 37) % 100)).await;
        }
        cancel.cancel();
        summary(
            &format!("carrier change -> CarrierChanged (poll {carrier_poll:?})"),
            carrier,
        );
        summary(
            &format!("VF rebind -> PciChanged (fingerprint every {fp_poll:?})"),
            pci,
        );
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}

async fn wait_for(
    rx: &mut tokio::sync::mpsc::Receiver<HostEvent>,
    want: impl Fn(&HostEvent) -> bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let deadline = Duration::from_secs(10);
    tokio::time::timeout(deadline, async {
        while let Some(e) = rx.recv().await {
            if want(&e) {
                return Ok(());
            }
        }
        Err("watcher stopped")
    })
    .await
    .map_err(|_| "no event within 10 s")??;
    Ok(())
}

fn summary(what: &str, mut v: Vec<Duration>) {
    v.sort_unstable();
    let mean = v.iter().sum::<Duration>() / v.len().max(1) as u32;
    println!(
        "{what}: n={}: p50 {:.1} ms, mean {:.1} ms, max {:.1} ms",
        v.len(),
        ms(v[v.len() / 2]),
        ms(mean),
        ms(v[v.len() - 1])
    );
}

/// CPU time of the calling thread so far, from `/proc/thread-self/schedstat` (ns). On a
/// shared, loaded machine wall time includes waiting for a CPU; this does not.
fn thread_cpu() -> Option<Duration> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace()
        .next()?
        .parse()
        .ok()
        .map(Duration::from_nanos)
}

fn report(what: &str, iters: usize, mut f: impl FnMut()) {
    // Warm the dentry and inode caches first, as a long-running daemon would have them.
    for _ in 0..3 {
        f();
    }
    let mut v = Vec::with_capacity(iters);
    let mut cpu = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let c0 = thread_cpu();
        let t = Instant::now();
        f();
        v.push(t.elapsed());
        if let (Some(a), Some(b)) = (c0, thread_cpu()) {
            cpu.push(b.saturating_sub(a));
        }
    }
    v.sort_unstable();
    cpu.sort_unstable();
    let pct = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
    let mean = v.iter().sum::<Duration>() / v.len() as u32;
    println!(
        "{what}: {} VFs, n={}: p50 {:.2} ms, p99 {:.2} ms, mean {:.2} ms, max {:.2} ms",
        PFS * VFS,
        v.len(),
        ms(pct(0.5)),
        ms(pct(0.99)),
        ms(mean),
        ms(v[v.len() - 1])
    );
    if !cpu.is_empty() {
        let mean = cpu.iter().sum::<Duration>() / cpu.len() as u32;
        println!(
            "{what}: CPU time of the calling thread: p50 {:.2} ms, mean {:.2} ms",
            ms(cpu[cpu.len() / 2]),
            ms(mean)
        );
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
