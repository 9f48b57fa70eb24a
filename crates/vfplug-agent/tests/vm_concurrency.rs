//! 8 VMs × 8 VFs hot-plugged and unplugged concurrently through the executor, against 8 fake
//! QEMUs over real unix sockets, with the ledger behind the agent's real journal: zero errors,
//! zero leaks (every VF Free, every device gone from its QEMU). The benchmark (`benches/vm.rs`)
//! runs the same harness for figures.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../benches/vm_common/mod.rs"]
mod harness;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_vms_by_eight_vfs_attach_and_detach_concurrently_without_leaks() {
    let dir = tempfile::tempdir().unwrap();
    let node = harness::node(8, 8, harness::Store::Journal(dir.path().to_path_buf())).await;
    let c = harness::attach_detach_all(&node).await;
    assert_eq!((c.attach_each.len(), c.detach_each.len()), (64, 64));
    eprintln!(
        "FIGURE 8x8 (debug build): attach wall {:?}, detach wall {:?}",
        c.attach_wall, c.detach_wall
    );
    // A second round on the same node: nothing left over from the first gets in the way.
    let c = harness::attach_detach_all(&node).await;
    assert_eq!((c.attach_each.len(), c.detach_each.len()), (64, 64));
}
