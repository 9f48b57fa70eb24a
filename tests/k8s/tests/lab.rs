//! The lab cluster itself, as the other suites rely on it: vfplugd's ServiceAccount kubeconfig
//! authenticates, and the VM pod stand-in image runs the host's QEMU.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use vfplug_k8slab::{Lab, create_pod, delete_pod, pod_logs, vm_pod, wait_for, wait_pod_running};

/// The kubeconfig `cluster.sh up` writes for ServiceAccount vfplug/vfplugd carries a token the
/// API server accepts: a request is either allowed (RBAC from deploy/rbac) or refused with 403
/// *as that ServiceAccount*, never 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vfplugd_service_account_authenticates() {
    let Some(lab) = Lab::for_test("vfplugd_service_account_authenticates") else {
        return;
    };
    let sa = lab.client_for(&lab.vfplugd_kubeconfig).await.unwrap();
    match Api::<Pod>::namespaced(sa, "vfplug")
        .list(&ListParams::default())
        .await
    {
        Ok(_) => eprintln!("vfplug/vfplugd may list pods in vfplug (deploy/rbac applied)"),
        Err(kube::Error::Api(s)) if s.code == 403 => {
            assert!(
                s.message.contains("system:serviceaccount:vfplug:vfplugd"),
                "403 for someone else: {s:?}"
            );
            eprintln!("vfplug/vfplugd authenticated, not allowed to list pods (no deploy/rbac)");
        }
        Err(e) => panic!("the vfplugd kubeconfig does not work: {e}"),
    }
}

/// A pod of the `vm` image with the host's /usr at /usr runs /usr/bin/qemu-system-x86_64 (its
/// loader and libraries resolve through the image's merged-/usr links).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_pod_stand_in_runs_the_hosts_qemu() {
    let Some(lab) = Lab::for_test("vm_pod_stand_in_runs_the_hosts_qemu") else {
        return;
    };
    let client = lab.client().await.unwrap();
    let ns = lab.namespace(&client, "vfplug-lab").await.unwrap();
    let pod = vm_pod(
        "qemu-version",
        &lab.vm_image,
        &[
            "sh",
            "-c",
            "/usr/bin/qemu-system-x86_64 --version; echo READY; trap 'exit 0' TERM; sleep 3600 & wait",
        ],
    )
    .unwrap();
    let t = Instant::now();
    create_pod(&client, &ns.name, &pod).await.unwrap();
    wait_pod_running(
        &lab,
        &client,
        &ns.name,
        "qemu-version",
        Duration::from_secs(90),
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}\n--- kubelet ---\n{}",
            lab.daemon_log_tail("kubelet", 30)
        )
    });
    eprintln!(
        "TIMING lab.vm_pod_create_to_running {:.3} s",
        t.elapsed().as_secs_f64()
    );
    let (log, _) = wait_for("the VM pod's output", Duration::from_secs(30), || async {
        match pod_logs(&client, &ns.name, "qemu-version").await {
            Ok(l) if l.contains("READY") => Ok(l),
            Ok(l) => Err(format!("{l:?}")),
            Err(e) => Err(e.to_string()),
        }
    })
    .await
    .unwrap();
    assert!(
        log.contains("QEMU emulator version"),
        "the host's QEMU did not run in the VM pod: {log}"
    );
    delete_pod(&client, &ns.name, "qemu-version", Duration::from_secs(90))
        .await
        .unwrap();
}
