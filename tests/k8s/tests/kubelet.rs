//! vfplugd against the real kubelet 1.20 of the lab cluster (docs/k8s-lab.md): registration in
//! both modes, a pod's Allocate env, re-registration after a kubelet restart, and what vfplugd
//! learns from the kubelet's PodResources. Each test prints its timings (`TIMING ...` lines).
//!
//! Needs `tests/k8s/cluster.sh up` and `VFPLUG_K8S_ENV=<lab dir>/env`; without them each test
//! says SKIP (or fails, with `VFPLUG_REQUIRE=1`). One at a time: they share the kubelet.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use vfplug_k8slab::{
    Lab, Pool, PoolSpec, Registration, Vfplugd, VfplugdOptions, create_pod, delete_pod,
    node_resource, pod_logs, pod_requesting, wait_for, wait_node_resource, wait_pod_running,
};

/// Node status is reported every second (the lab's kubelet config); this leaves room for a
/// loaded 2-core machine.
const CAPACITY_WAIT: Duration = Duration::from_secs(30);
const POD_WAIT: Duration = Duration::from_secs(90);

fn timing(name: &str, d: Duration) {
    eprintln!("TIMING {name} {:.3} s", d.as_secs_f64());
}

/// Fails the test with `what`, the error, vfplugd's log tail and the kubelet's.
fn fail(lab: &Lab, d: &Vfplugd, what: &str, e: impl std::fmt::Display) -> ! {
    panic!(
        "{what}: {e}\n--- vfplugd log (tail) ---\n{}\n--- kubelet log (tail) ---\n{}",
        d.log_tail(40),
        lab.daemon_log_tail("kubelet", 40)
    )
}

/// Waits until vfplugd has logged more than `than` registrations of `pool` (the log line can
/// come a moment after the kubelet has opened ListAndWatch and updated the node); returns the
/// count.
async fn registered_more_than(lab: &Lab, d: &Vfplugd, pool: &Pool, than: usize) -> usize {
    let (n, _) = wait_for(
        &format!(
            "vfplugd to log registration #{} of {}",
            than + 1,
            pool.resource
        ),
        CAPACITY_WAIT,
        || async {
            let n = d.registrations(pool);
            if n > than {
                Ok(n)
            } else {
                Err(format!("{n} registrations logged"))
            }
        },
    )
    .await
    .unwrap_or_else(|e| fail(lab, d, "registration", e));
    n
}

/// The container's environment as its `env` printed it (lines up to the READY marker).
fn parse_env(log: &str) -> BTreeMap<String, String> {
    log.lines()
        .take_while(|l| *l != "READY")
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// A busybox pod that prints its env, then `READY`, then sleeps until SIGTERM (a shell as PID 1
/// has no default action for it: without the trap every deletion waits out the grace period).
const PRINT_ENV: &[&str] = &[
    "sh",
    "-c",
    "env; echo READY; trap 'exit 0' TERM; sleep 3600 & wait",
];

/// Runs a pod requesting one VF of `pool` in `ns`, waits for it to run and print its env;
/// returns the env, the time from create to Running, and when Running was seen.
async fn pod_with_one_vf(
    lab: &Lab,
    client: &kube::Client,
    d: &Vfplugd,
    ns: &str,
    name: &str,
    pool: &Pool,
) -> (BTreeMap<String, String>, Duration, Instant) {
    let pod = pod_requesting(name, &lab.busybox_image, &pool.resource, 1, PRINT_ENV).unwrap();
    let t = Instant::now();
    create_pod(client, ns, &pod)
        .await
        .unwrap_or_else(|e| fail(lab, d, "creating the pod", e));
    wait_pod_running(lab, client, ns, name, POD_WAIT)
        .await
        .unwrap_or_else(|e| fail(lab, d, "the pod requesting one VF", e));
    let running = t.elapsed();
    let running_at = Instant::now();
    let (log, _) = wait_for(
        &format!("pod {ns}/{name} to print its env"),
        Duration::from_secs(30),
        || async {
            match pod_logs(client, ns, name).await {
                Ok(l) if l.lines().any(|x| x == "READY") => Ok(l),
                Ok(l) => Err(format!("log so far: {l:?}")),
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await
    .unwrap_or_else(|e| fail(lab, d, "reading the pod's log", e));
    (parse_env(&log), running, running_at)
}

/// Checks the Allocate env of a pod that got one VF of `pool`: `PCIDEVICE_<PREFIX>_<POOL>` names
/// one of the pool's VFs, and `..._INFO` describes that VF. Returns the VF's PCI address.
fn assert_allocate_env(env: &BTreeMap<String, String>, pool: &Pool) -> String {
    let var = pool.env_name();
    let pci = env.get(&var).unwrap_or_else(|| {
        panic!(
            "the container has no {var}; its PCIDEVICE variables: {:?}",
            env.iter()
                .filter(|(k, _)| k.starts_with("PCIDEVICE"))
                .collect::<Vec<_>>()
        )
    });
    assert!(
        pool.vfs.contains(pci),
        "{var}={pci} is not a VF of the pool {:?}",
        pool.vfs
    );
    let info = env
        .get(&format!("{var}_INFO"))
        .unwrap_or_else(|| panic!("the container has no {var}_INFO"));
    let info: serde_json::Value =
        serde_json::from_str(info).unwrap_or_else(|e| panic!("{var}_INFO={info}: {e}"));
    assert_eq!(
        info[pci.as_str()]["generic"]["deviceID"],
        serde_json::json!(pci),
        "{var}_INFO does not describe {pci}: {info}"
    );
    pci.clone()
}

/// (a) Each registration mode: the node's capacity and allocatable show the pool's VF count
/// (a resource name no earlier run used), the plugin socket is where the mode puts it, and when
/// vfplugd stops the kubelet takes the devices out of allocatable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_pools_in_both_modes() {
    let Some(lab) = Lab::for_test("registers_pools_in_both_modes") else {
        return;
    };
    let client = lab.client().await.unwrap();
    for (mode, vfs) in [
        (Registration::Legacy, 3),
        (Registration::PluginsRegistry, 5),
    ] {
        let spec = PoolSpec::unique("laba_", vfs);
        let resource = format!("vfplug.io/{}", spec.name);
        let before = node_resource(&client, &lab.node_name, &resource)
            .await
            .unwrap();
        assert_eq!(
            before,
            Default::default(),
            "{resource} on the node before vfplugd started"
        );
        let t = Instant::now();
        let mut d = Vfplugd::start(&lab, VfplugdOptions::new(mode, vec![spec]))
            .await
            .unwrap();
        let pool = d.pools[0].clone();
        wait_node_resource(
            &client,
            &lab.node_name,
            &resource,
            vfs.into(),
            CAPACITY_WAIT,
        )
        .await
        .unwrap_or_else(|e| fail(&lab, &d, &format!("{mode:?} registration"), e));
        let visible = t.elapsed();
        let socket = match mode {
            Registration::PluginsRegistry => lab.kubelet_dir.join("plugins_registry"),
            _ => lab.device_plugin_dir.clone(),
        }
        .join(format!("vfplug-{}.sock", pool.name));
        assert!(
            socket.exists(),
            "{mode:?}: no plugin socket at {}",
            socket.display()
        );
        // vfplugd says so too (its plugin saw the kubelet open ListAndWatch).
        registered_more_than(&lab, &d, &pool, 0).await;
        timing(
            &format!("a.{}.spawn_to_capacity", mode.flag()),
            visible - d.started_in,
        );
        timing(&format!("a.{}.vfplugd_start", mode.flag()), d.started_in);

        let t = Instant::now();
        let st = d.stop().unwrap();
        assert!(st.success(), "vfplugd exited {st} on SIGTERM");
        wait_for(
            &format!("{resource}: allocatable 0 after vfplugd stopped"),
            CAPACITY_WAIT,
            || async {
                match node_resource(&client, &lab.node_name, &resource).await {
                    Ok(r) if r.allocatable == Some(0) => Ok(()),
                    Ok(r) => Err(format!("{r:?}")),
                    Err(e) => Err(e.to_string()),
                }
            },
        )
        .await
        .unwrap_or_else(|e| fail(&lab, &d, "after vfplugd stopped", e));
        timing(
            &format!("a.{}.stop_to_allocatable_0", mode.flag()),
            t.elapsed(),
        );
    }
}

/// (b) A pod requesting one VF runs, and its container has the Allocate env naming a VF of
/// the pool; a second pod asking for more than is left is not placed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_gets_a_vf_in_its_env() {
    let Some(lab) = Lab::for_test("pod_gets_a_vf_in_its_env") else {
        return;
    };
    let client = lab.client().await.unwrap();
    let ns = lab.namespace(&client, "vfplug-b").await.unwrap();
    let d = Vfplugd::start(
        &lab,
        VfplugdOptions::new(Registration::Legacy, vec![PoolSpec::unique("labb_", 2)]),
    )
    .await
    .unwrap();
    let pool = d.pools[0].clone();
    wait_node_resource(&client, &lab.node_name, &pool.resource, 2, CAPACITY_WAIT)
        .await
        .unwrap_or_else(|e| fail(&lab, &d, "registration", e));

    let (env, running, _) = pod_with_one_vf(&lab, &client, &d, &ns.name, "one-vf", &pool).await;
    let pci = assert_allocate_env(&env, &pool);
    timing("b.pod_create_to_running", running);
    eprintln!("pod one-vf got {pci} ({}={pci})", pool.env_name());

    // One VF is left: a pod asking for two stays unscheduled.
    let greedy =
        pod_requesting("two-vfs", &lab.busybox_image, &pool.resource, 2, PRINT_ENV).unwrap();
    create_pod(&client, &ns.name, &greedy).await.unwrap();
    // The scheduler says why (the message names the resource), and the pod stays Pending.
    let phase_reason = "jsonpath={.status.phase} \
        {.status.conditions[?(@.type==\"PodScheduled\")].reason} \
        {.status.conditions[?(@.type==\"PodScheduled\")].message}";
    let (out, _) = wait_for(
        "the pod asking for 2 VFs with 1 left to be Unschedulable",
        Duration::from_secs(30),
        || async {
            let out = lab
                .kubectl(&["-n", &ns.name, "get", "pod", "two-vfs", "-o", phase_reason])
                .map_err(|e| e.to_string())?;
            if out.contains("Unschedulable") {
                Ok(out)
            } else {
                Err(out)
            }
        },
    )
    .await
    .unwrap_or_else(|e| fail(&lab, &d, "the pod asking for too many VFs", e));
    assert!(
        out.starts_with("Pending Unschedulable") && out.contains(&pool.resource),
        "a pod asking for 2 VFs with 1 left: {out}"
    );
    delete_pod(&client, &ns.name, "two-vfs", POD_WAIT)
        .await
        .unwrap();
    let gone = delete_pod(&client, &ns.name, "one-vf", POD_WAIT)
        .await
        .unwrap_or_else(|e| fail(&lab, &d, "deleting the pod", e));
    timing("b.pod_delete_to_gone", gone);
}

/// (c) After the kubelet restarts (process stopped and started again), vfplugd registers
/// again in each mode, allocatable returns to the pool's count, and a new pod gets a VF.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_again_after_a_kubelet_restart() {
    let Some(lab) = Lab::for_test("registers_again_after_a_kubelet_restart") else {
        return;
    };
    let client = lab.client().await.unwrap();
    let ns = lab.namespace(&client, "vfplug-c").await.unwrap();
    for (mode, vfs) in [
        (Registration::Legacy, 2),
        (Registration::PluginsRegistry, 3),
    ] {
        let d = Vfplugd::start(
            &lab,
            VfplugdOptions::new(mode, vec![PoolSpec::unique("labc_", vfs)]),
        )
        .await
        .unwrap();
        let pool = d.pools[0].clone();
        wait_node_resource(
            &client,
            &lab.node_name,
            &pool.resource,
            vfs.into(),
            CAPACITY_WAIT,
        )
        .await
        .unwrap_or_else(|e| fail(&lab, &d, "registration", e));
        let before = registered_more_than(&lab, &d, &pool, 0).await;

        let t = Instant::now();
        let restart = lab
            .restart_kubelet()
            .unwrap_or_else(|e| fail(&lab, &d, "cluster.sh restart-kubelet", e));
        let ready = t.elapsed();
        registered_more_than(&lab, &d, &pool, before).await;
        let registered = t.elapsed();
        wait_node_resource(
            &client,
            &lab.node_name,
            &pool.resource,
            vfs.into(),
            CAPACITY_WAIT,
        )
        .await
        .unwrap_or_else(|e| fail(&lab, &d, "allocatable after the restart", e));
        let back = t.elapsed();
        timing(&format!("c.{}.restart_to_node_ready", mode.flag()), ready);
        timing(
            &format!("c.{}.restart_to_registered", mode.flag()),
            registered,
        );
        timing(&format!("c.{}.restart_to_allocatable", mode.flag()), back);
        eprintln!(
            "cluster.sh restart-kubelet took {:.1} s",
            restart.as_secs_f64()
        );

        // The restarted kubelet really has a working endpoint: Allocate for a new pod.
        let name = format!("after-restart-{}", mode.flag());
        let (env, running, _) = pod_with_one_vf(&lab, &client, &d, &ns.name, &name, &pool).await;
        assert_allocate_env(&env, &pool);
        timing(&format!("c.{}.pod_create_to_running", mode.flag()), running);
        delete_pod(&client, &ns.name, &name, POD_WAIT)
            .await
            .unwrap_or_else(|e| fail(&lab, &d, "deleting the pod", e));
    }
}

/// (d) vfplugd learns from the kubelet's PodResources which pod holds a VF: its node API lists
/// the pod's VF as kubelet_allocated, owned by that pod, the other VF free; after the pod is
/// gone (and the grace period), the VF is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learns_the_pods_vf_from_pod_resources() {
    let Some(lab) = Lab::for_test("learns_the_pods_vf_from_pod_resources") else {
        return;
    };
    let client = lab.client().await.unwrap();
    let ns = lab.namespace(&client, "vfplug-d").await.unwrap();
    let d = Vfplugd::start(
        &lab,
        VfplugdOptions::new(
            Registration::PluginsRegistry,
            vec![PoolSpec::unique("labd_", 2)],
        ),
    )
    .await
    .unwrap();
    let pool = d.pools[0].clone();
    wait_node_resource(&client, &lab.node_name, &pool.resource, 2, CAPACITY_WAIT)
        .await
        .unwrap_or_else(|e| fail(&lab, &d, "registration", e));
    let listed = d.list().await.unwrap();
    assert!(
        listed.iter().all(|v| v.state == "free"),
        "before any pod: {listed:?}"
    );

    let (env, _, running_at) = pod_with_one_vf(&lab, &client, &d, &ns.name, "holder", &pool).await;
    let pci = assert_allocate_env(&env, &pool);
    let (vfs, _) = wait_for(
        &format!("vfplugd to list {pci} as the pod's"),
        Duration::from_secs(30),
        || async {
            let vfs = d.list().await.map_err(|e| e.to_string())?;
            let mine = vfs.iter().find(|v| v.pci_address == pci);
            match mine.and_then(|v| v.owner.as_ref().map(|o| (v, o))) {
                Some((v, o))
                    if v.state == "kubelet_allocated"
                        && o.pod_namespace == ns.name
                        && o.pod_name == "holder" =>
                {
                    Ok(vfs)
                }
                _ => Err(format!("{mine:?}")),
            }
        },
    )
    .await
    .unwrap_or_else(|e| fail(&lab, &d, "PodResources", e));
    // PodResources is polled every second here (`--podresources-seconds 1`; default 5).
    timing("d.running_to_vfplugd_knows_owner", running_at.elapsed());
    let others: Vec<_> = vfs.iter().filter(|v| v.pci_address != pci).collect();
    assert_eq!(others.len(), 1, "{vfs:?}");
    assert_eq!(others[0].state, "free", "the VF no pod holds: {vfs:?}");
    assert!(others[0].owner.is_none(), "the VF no pod holds: {vfs:?}");

    let deleted_at = Instant::now();
    let gone = delete_pod(&client, &ns.name, "holder", POD_WAIT)
        .await
        .unwrap_or_else(|e| fail(&lab, &d, "deleting the pod", e));
    timing("d.pod_delete_to_gone", gone);
    wait_for(
        &format!("vfplugd to free {pci} after the pod is gone"),
        Duration::from_secs(30),
        || async {
            let vfs = d.list().await.map_err(|e| e.to_string())?;
            let mine = vfs.iter().find(|v| v.pci_address == pci);
            match mine {
                Some(v) if v.state == "free" && v.owner.is_none() => Ok(()),
                _ => Err(format!("{mine:?}")),
            }
        },
    )
    .await
    .unwrap_or_else(|e| fail(&lab, &d, "release after the pod", e));
    // Includes vfplugd's grace period for kubelet allocations (the lab's: 5 s), which runs from
    // the last PodResources answer that still named the VF.
    timing("d.pod_delete_to_vfplugd_free", deleted_at.elapsed());
}
