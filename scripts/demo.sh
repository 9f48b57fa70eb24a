#!/usr/bin/env bash
# The main job: vfplug's whole present flow on a simulated node, then real QEMU hotplug.
#  1. vfplugd (the real binary) on a fake sysfs SR-IOV node, with a kubelet stand-in speaking the
#     real device-plugin gRPC protocol: registration, snapshots, GetPreferredAllocation, Allocate,
#     health flips, sriov_numvfs changes, vfplugd and kubelet restarts.
#  2. The `vfplug` CNI plugin exec'd as a runtime does (env, stdin, stdout) against vfplugd on a
#     simulated node whose VF netdevs are real veth links: ADD into real network namespaces with
#     Debian's host-local IPAM, idempotent ADD, CHECK, pool allocation, a bad config, DEL (also
#     after the netns is gone), GC, STATUS, and the codes when vfplugd is down.
#  3. The VM lab's qemu tier: a real QEMU 10 (TCG) guest, device_add/device_del through vfplug's
#     QMP client with the guest acknowledging the unplug.
#  4. A VM pod (VM lab, sriov-full): in an L1 guest with an emulated igb SR-IOV NIC and VT-d, the
#     real vfplugd hot-plugs a real VF into a running nested Linux VM through the `vfplug` CNI
#     plugin (ADD by pool, the VM's QMP socket in a pod volume), shows it in the VM and in its
#     List, then unplugs it with the guest's acknowledgement (DEL) and shows the VF Free again.
#     Each line carries its time since L1 started; slow boots print progress every 10 s.
#  5. The Domain on a real node (scripts/demo-domain.sh): a one-node Kubernetes 1.20 cluster
#     (tests/k8s; its build takes ~15 min once per machine), the real vfplugd with the Domain
#     controller, a VM pod running QEMU; `kubectl get domains`, a net added and removed with
#     `kubectl patch`, status and Events, the guest seeing the device, the pod deleted, the VF
#     Free and the Domain gone. Skipped loudly without root or a cluster.
#  6. Installing with Helm on that node (tests/k8s/tests/chart.rs): vfplug's image written by
#     scripts/image.sh and imported into containerd, `helm install` of deploy/helm/vfplug, vfplugd
#     as the DaemonSet's pod registering with the kubelet, the CNI plugin installed by the init
#     container and called by containerd itself for a pod's VF (ADD and DEL), the chart's RBAC,
#     a VM pod's Domain from the in-cluster controller, `helm uninstall`.
# Run as root on a fresh Debian bookworm machine. DEMO_PARTS=3,5 runs only those parts (default
# all); the build and the setup are done for the parts selected.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
DEMO_PARTS="${DEMO_PARTS:-1,2,3,4,5,6}"
selected() { case ",$DEMO_PARTS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
part() { # N TITLE: prints the part's title, or that it is not selected (and returns 1)
    if selected "$1"; then echo "== part $1: $2"; else echo "== part $1: not selected (DEMO_PARTS=$DEMO_PARTS)"; return 1; fi
}
BIN="${CARGO_TARGET_DIR:-target}/debug"
if [ "$(id -u)" = 0 ] && selected 2; then
    echo "== setup: Debian packages (iproute2, CNI plugins for host-local IPAM)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends iproute2 containernetworking-plugins >/dev/null
fi
echo "== build"
cargo build --bin vfplugd --bin vfplugctl -p vfplugd
if selected 1 || selected 2; then
    cargo build --example demo --example cni_demo -p vfplugd
    cargo build --bin vfplug -p vfplug-cni
fi
if selected 5; then
    cargo build -p vfplug-host --example vfio_node
    cargo build -p vfplug-vmlab --bin vmlab-vm-pod
fi
if part 1 "device plugin on a simulated node"; then
    "$BIN/examples/demo" "$BIN/vfplugd" "$@"
fi
if part 2 "the vfplug CNI plugin into real network namespaces"; then
    "$BIN/examples/cni_demo" "$BIN/vfplugd" "$BIN/vfplug"
fi
if selected 3 || selected 4 || selected 5; then
    bash tests/vmlab/setup.sh
fi
if part 3 "real QEMU hotplug through vfplug-qmp (VM lab, qemu tier)"; then
    VMLAB_TIER=qemu VMLAB_REQUIRE=1 cargo nextest run -p vfplug-vmlab --no-capture --test-threads 1
fi
if part 4 "a VM pod: vfplugd hot-plugs a real VF into a running nested VM through the CNI plugin"; then
    echo "   L1 = a VM with an emulated SR-IOV NIC (igb) and VT-d; L2 = a Linux VM inside it (the VM pod)."
    echo "   Both run under TCG (no KVM), so L2 boots in minutes; [time] = seconds since L1 started."
    # vfplugd's own log (copied from L1 after the run) and the figures' table are left out here;
    # `make vm-test TIER=sriov-full` shows everything.
    VMLAB_TIER=sriov-full VMLAB_REQUIRE=1 cargo nextest run -p vfplug-vmlab --no-capture \
        --test-threads 1 -E 'test(vm_pod_unplug_acknowledged_by_l2_linux)' 2>&1 |
        grep --line-buffered -v -e 'LOG vfplugd: ' -e '^VMLAB FIGURE ' -e '^|'
fi
if part 5 "the Domain on a real node: kubectl, the Domain controller, a VM pod running QEMU"; then
    echo "   A one-node Kubernetes 1.20 cluster on this machine (tests/k8s), the real vfplugd with its"
    echo "   Domain controller, a VM pod whose QEMU boots Linux under TCG; [time] = seconds since part 5 began."
    DEMO_BIN_DIR="$BIN" bash scripts/demo-domain.sh
fi
if part 6 "installing with Helm: the chart on the real node, containerd calling the vfplug plugin"; then
    if [ "$(id -u)" != 0 ]; then
        echo "!!! PART 6 SKIPPED: needs root (the lab cluster); run scripts/demo.sh as root"
    else
        eval "$(bash scripts/get-chart-tools.sh)"
        bash tests/k8s/build.sh >/tmp/vfplug-k8s-build.log 2>&1 ||
            { tail -20 /tmp/vfplug-k8s-build.log; exit 1; }
        lab_was_up=0
        bash tests/k8s/cluster.sh running >/dev/null 2>&1 && lab_was_up=1
        bash tests/k8s/cluster.sh up | tail -1
        # The test prints its story (CHART lines) and figures (TIMING lines).
        rc=0
        VFPLUG_K8S_ENV="${K8S_LAB_DIR:-/tmp/vfplug-k8s}/env" VFPLUG_REQUIRE=1 cargo nextest run \
            -p vfplug-k8slab --test chart --no-capture 2>&1 |
            grep --line-buffered -e '^CHART ' -e '^TIMING ' -e 'PASS \[' -e 'FAIL' -e 'panicked' || rc=$?
        [ "$lab_was_up" = 1 ] || bash tests/k8s/cluster.sh down | tail -1
        [ "$rc" = 0 ] || { echo "part 6 FAILED; the whole output: VFPLUG_K8S_ENV=${K8S_LAB_DIR:-/tmp/vfplug-k8s}/env cargo nextest run -p vfplug-k8slab --test chart --no-capture"; exit 1; }
    fi
fi
