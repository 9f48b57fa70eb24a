#!/usr/bin/env bash
# Part 5 of scripts/demo.sh: the Domain resource on a real one-node Kubernetes cluster.
#
# The real kube-apiserver, kubelet, containerd, scheduler and controller-manager (1.20, built from
# Debian's source package by tests/k8s/build.sh; ~15 min once per machine, then cached), the
# real vfplugd with its Domain controller on, running as its least-privilege ServiceAccount, on a
# fake SR-IOV node (3 VFs on vfio-pci, simulated PF), and a VM pod whose container runs QEMU 10
# (TCG) with a Linux guest that acknowledges unplugs. Shown with the real kubectl: the Domain's
# columns, a VF network added by `kubectl patch`, the status and Events, the guest's own serial
# line seeing the device, the net removed, the pod deleted, the VF Free and the Domain gone.
#
# This host has no VFIO, so QEMU gets a stand-in emulated device (e1000e) where a VF would be
# passed through (vfplugd's --vm-stand-in-device, for tests only); the ledger, the executor's
# sagas, the QMP hot-plug and unplug, and the guest's acknowledgement are the real ones.
#
# Needs root. Reuses a lab cluster that is already up (and leaves it up); one it starts itself it
# stops at the end (tests/k8s/cluster.sh down). Everything else it starts (vfplugd, the
# namespace with its pod, the fake node) it removes, also on failure or Ctrl-C.
#
# Binaries from `${DEMO_BIN_DIR:-${CARGO_TARGET_DIR:-target}/debug}`: vfplugd, vfplugctl,
# examples/vfio_node (vfplug-host), vmlab-vm-pod (vfplug-vmlab); scripts/demo.sh builds them.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${DEMO_BIN_DIR:-${CARGO_TARGET_DIR:-target}/debug}"
LAB="${K8S_LAB_DIR:-/tmp/vfplug-k8s}"
NS="${DEMO_NAMESPACE:-vfplug-demo}"
POD=vm-a

T0=$(date +%s.%N)
ts() { awk -v t0="$T0" -v now="$(date +%s.%N)" 'BEGIN { printf "[%6.1fs]", now - t0 }'; }
say() { echo "$(ts) $*"; }
indent() { sed -u 's/^/           /'; }
skip() {
    echo
    echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
    echo "!!! PART 5 SKIPPED: $*"
    echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
    echo
    exit 0
}
die() { say "FAILED: $*"; exit 1; }

[ "$(id -u)" = 0 ] || skip "needs root (the kubelet, containerd, mounts, cgroups); run scripts/demo.sh as root"
for b in vfplugd vfplugctl examples/vfio_node vmlab-vm-pod; do
    [ -x "$BIN/$b" ] || die "$BIN/$b missing: scripts/demo.sh builds it"
done

# --- cleanup: only what this part started -----------------------------------------------------
STARTED_CLUSTER=0
build_pid=""
VFPLUGD_PID=""
WORK=""
KUBECTL=""
kc() { "$KUBECTL" --kubeconfig "$KUBECONFIG" "$@"; }
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    if [ -n "$build_pid" ]; then
        kill -TERM -- "-$build_pid" 2>/dev/null
        say "cleanup: the Kubernetes build stopped (tests/k8s/build.sh resumes it next time)"
    fi
    if [ -n "$KUBECTL" ] && kc get namespace "$NS" >/dev/null 2>&1; then
        say "cleanup: deleting namespace $NS (vfplugd still up, so it can release and finalize)"
        kc delete pod -n "$NS" --all --wait=false >/dev/null 2>&1
        local i
        for i in $(seq 1 120); do
            [ -z "$(kc get domains -n "$NS" -o name 2>/dev/null)" ] && break
            sleep 0.5
        done
        # vfplugd gone or stuck: do not leave a namespace stuck on the finalizer.
        for d in $(kc get domains -n "$NS" -o name 2>/dev/null); do
            say "cleanup: $d still there; removing its finalizer"
            kc patch -n "$NS" "$d" --type merge -p '{"metadata":{"finalizers":null}}' >/dev/null
        done
        kc delete namespace "$NS" --wait=false >/dev/null 2>&1
    fi
    if [ -n "$VFPLUGD_PID" ] && kill -0 "$VFPLUGD_PID" 2>/dev/null; then
        kill -TERM "$VFPLUGD_PID"
        wait "$VFPLUGD_PID" 2>/dev/null
        say "cleanup: vfplugd (pid $VFPLUGD_PID) stopped"
    fi
    if [ "$rc" != 0 ] && [ -n "$WORK" ] && [ -f "$WORK/vfplugd.log" ]; then
        echo "--- last 40 lines of vfplugd's log ---"
        tail -n 40 "$WORK/vfplugd.log"
    fi
    [ -n "$WORK" ] && rm -rf "$WORK"
    if [ "$STARTED_CLUSTER" = 1 ]; then
        say "cleanup: stopping the cluster this part started (tests/k8s/cluster.sh down)"
        bash tests/k8s/cluster.sh down 2>&1 | indent
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_until WHAT SECONDS CMD...: polls CMD every 0.5 s, a progress line every 10 s.
wait_until() {
    local what="$1" secs="$2"; shift 2
    local start now last
    start=$(date +%s.%N); last=$(date +%s)
    until "$@" >/dev/null 2>&1; do
        now=$(date +%s)
        if [ $((now - ${start%.*})) -ge "$secs" ]; then die "$what: not within $secs s"; fi
        if [ $((now - last)) -ge 10 ]; then say "  … waiting for $what ($((now - ${start%.*})) s)"; last=$now; fi
        sleep 0.5
    done
    say "$what ($(awk -v s="$start" -v n="$(date +%s.%N)" 'BEGIN { printf "%.1f", n - s }') s)"
}
# show ARGS...: prints `$ kubectl ARGS` and its output.
show() { echo "$(ts) \$ kubectl $*"; kc "$@" 2>&1 | indent; }

# --- 1. Kubernetes binaries ------------------------------------------------------------------
say "Kubernetes 1.20 binaries: tests/k8s/build.sh (cached: instant; on a fresh machine it builds"
say "kube-apiserver, kubelet, kubectl, controller-manager and scheduler from Debian's source"
say "package: ~15 min on 2 cores, once; progress every 30 s)"
# Its own session, so that an interrupted demo can stop the whole build (make, go) at once.
setsid bash -c "bash tests/k8s/build.sh 2>&1 | sed -u 's/^/           /'" &
build_pid=$!
b0=$(date +%s)
while kill -0 "$build_pid" 2>/dev/null; do
    sleep 1
    n=$(( $(date +%s) - b0 ))
    if [ "$n" -gt 0 ] && [ $((n % 30)) = 0 ] && kill -0 "$build_pid" 2>/dev/null; then
        say "  … building Kubernetes ($n s; make's logs in /var/cache/vfplug/k8s/*/make-*.log)"
    fi
done
build_rc=0
wait "$build_pid" || build_rc=$?
build_pid=""
[ "$build_rc" = 0 ] || skip "tests/k8s/build.sh failed (its output is above), so no cluster can start"

# --- 2. the one-node cluster -----------------------------------------------------------------
if pgrep -x kube-apiserver >/dev/null; then
    [ -f "$LAB/env" ] || skip "a kube-apiserver runs (pid $(pgrep -x kube-apiserver | head -1)) but $LAB/env is missing: not the lab's cluster, and two clusters cannot share the kubelet's ports"
    say "a lab cluster is up already (kube-apiserver pid $(pgrep -x kube-apiserver | head -1)): using it, and leaving it up"
else
    say "starting the one-node cluster: tests/k8s/cluster.sh up (~20 s)"
    STARTED_CLUSTER=1
    if ! bash tests/k8s/cluster.sh up 2>&1 | indent; then
        skip "tests/k8s/cluster.sh up failed (its output is above; logs in $LAB/log)"
    fi
fi
set -a
# shellcheck disable=SC1091
. "$LAB/env"
set +a
kc get --raw /readyz >/dev/null 2>&1 || skip "the cluster's API server ($K8S_API_SERVER) does not answer"
show get nodes -o wide
# One vfplugd per node: a second controller on the same node would fight over its Domains.
for p in $(pgrep -x vfplugd || true); do
    if tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -qF -- "$KUBELET_DIR"; then
        skip "another vfplugd (pid $p) serves this cluster's kubelet ($KUBELET_DIR): someone is using the cluster; two Domain controllers on one node would fight"
    fi
done

# --- 3. the CRDs and vfplugd's RBAC ----------------------------------------------------------
say "the Domain CRD (generated from crates/vfplug-crd), a minimal NetworkAttachmentDefinition CRD,"
say "and vfplugd's ServiceAccount and least-privilege ClusterRole"
show apply -f deploy/crds/domains.vfplug.io.yaml
show apply -f tests/k8s/manifests/nad-crd.yaml
show apply -f deploy/rbac/vfplugd.yaml
show wait --for=condition=Established --timeout=60s crd/domains.vfplug.io \
    crd/network-attachment-definitions.k8s.cni.cncf.io

# --- 4. vfplugd on a fake vfio node ----------------------------------------------------------
WORK="$(mktemp -d /tmp/vfplug-demo5.XXXXXX)"
SOCK="$WORK/vfplugd.sock"
ctl() { "$BIN/vfplugctl" --socket "$SOCK" "$@"; }
say "a fake SR-IOV node (vfplug_host::fixture::vfio_node): PF ens1f0 with 3 VFs on vfio-pci, pool vfplug.io/vm"
"$BIN/examples/vfio_node" "$WORK/node" 3 | indent
say "vfplugd: the real binary, device plugin on the real kubelet, Domain controller on as"
say "ServiceAccount vfplug/vfplugd; QEMU gets a stand-in e1000e per VF (no VFIO on this host)"
RUST_LOG="info,kube=warn,tower=warn,hyper=warn" setsid "$BIN/vfplugd" \
    --node-name "$NODE_NAME" \
    --sysfs-root "$WORK/node/sys" --dev-root "$WORK/node/dev" --config "$WORK/node/config.yaml" \
    --kubelet-dir "$KUBELET_DIR" --device-plugin-dir "$KUBELET_DEVICE_PLUGIN_DIR" \
    --state-dir "$WORK/state" --socket "$SOCK" \
    --vf-netlink simulated --sim-pf-state "$WORK/pf-state.json" \
    --device-info-dir "$WORK/devinfo" --cdi-dir "$WORK/cdi" --http-addr 127.0.0.1:0 \
    --vm-stand-in-device e1000e --unplug-wait-seconds 20 \
    --controller on --kubeconfig "$VFPLUGD_KUBECONFIG" \
    >"$WORK/vfplugd.log" 2>&1 </dev/null &
VFPLUGD_PID=$!
say "vfplugd started (pid $VFPLUGD_PID, log $WORK/vfplugd.log)"
wait_until "vfplugd's node API ready (inventory loaded, ledger open)" 60 ctl status
wait_until "the Domain controller synced (its pod and Domain watches listed)" 60 \
    grep -q "Domain controller synced" "$WORK/vfplugd.log"
echo "$(ts) \$ vfplugctl vfs"; ctl vfs | indent
# The kubelet's plugin watcher can take its time with a socket it saw go away a moment ago.
wait_until "vfplugd registered pool vfplug.io/vm with the kubelet (plugins_registry)" 120 \
    grep -q "registered with the kubelet" "$WORK/vfplugd.log"
alloc3() { [ "$(kc get node "$NODE_NAME" -o "jsonpath={.status.allocatable.vfplug\.io/vm}")" = 3 ]; }
wait_until "the kubelet shows the 3 VFs of vfplug.io/vm allocatable" 30 alloc3
show get node "$NODE_NAME" -o 'custom-columns=NODE:.metadata.name,VFS:.status.allocatable.vfplug\.io/vm'

# --- 5. the network and the VM pod -----------------------------------------------------------
if kc get namespace "$NS" >/dev/null 2>&1; then
    say "namespace $NS is left from an earlier run: deleting it first"
    kc delete namespace "$NS" --timeout=120s >/dev/null
fi
show create namespace "$NS"
say "NetworkAttachmentDefinition vmnet: a vfplug network of pool vfplug.io/vm, VLAN 42"
kc apply -n "$NS" -f - <<'EOF' 2>&1 | indent
apiVersion: k8s.cni.cncf.io/v1
kind: NetworkAttachmentDefinition
metadata:
  name: vmnet
  annotations: {k8s.v1.cni.cncf.io/resourceName: vfplug.io/vm}
spec:
  config: '{"cniVersion":"1.0.0","name":"vmnet","type":"vfplug","vlan":42,"spoofchk":"on"}'
EOF
say "the VM's files (VM lab kernel 6.12, hotplug guest initramfs) and QEMU's command line"
VMDIR="$WORK/vm"
vm_cmd="$("$BIN/vmlab-vm-pod" "$VMDIR" /qmp)"
echo "$vm_cmd" | sed 's/^\[//; s/\]$//; s/","/ /g; s/"//g' | fold -s -w 88 | indent
say "VM pod $POD: annotation vfplug.io/qmp-socket: qmp/qmp.sock, QEMU in its container"
kc apply -n "$NS" -f - <<EOF 2>&1 | indent
{"apiVersion": "v1", "kind": "Pod",
 "metadata": {"name": "$POD", "annotations": {"vfplug.io/qmp-socket": "qmp/qmp.sock"}},
 "spec": {"nodeName": "$NODE_NAME", "terminationGracePeriodSeconds": 2,
  "containers": [{"name": "qemu", "image": "$IMAGE_VM", "imagePullPolicy": "Never",
    "command": $vm_cmd,
    "volumeMounts": [{"name": "qmp", "mountPath": "/qmp"},
                     {"name": "usr", "mountPath": "/usr", "readOnly": true},
                     {"name": "vm", "mountPath": "$VMDIR", "readOnly": true}]}],
  "volumes": [{"name": "qmp", "emptyDir": {}},
              {"name": "usr", "hostPath": {"path": "/usr"}},
              {"name": "vm", "hostPath": {"path": "$VMDIR"}}]}}
EOF
t_pod=$(date +%s.%N)
running() { [ "$(kc get pod -n "$NS" "$POD" -o 'jsonpath={.status.phase}')" = Running ]; }
wait_until "pod $POD Running" 120 running
wait_until "vfplugd made its Domain" 30 kc get domain -n "$NS" "$POD"
UID_="$(kc get pod -n "$NS" "$POD" -o 'jsonpath={.metadata.uid}')"
SERIAL="$KUBELET_DIR/pods/$UID_/volumes/kubernetes.io~empty-dir/qmp/serial.log"
show get domains -n "$NS"
show get domain -n "$NS" "$POD" -o \
    'custom-columns=OWNER:.metadata.ownerReferences[0].kind,NODE:.metadata.labels.vfplug\.io/node,FINALIZERS:.metadata.finalizers'
say "the guest boots (Linux 6.12 under TCG, no KVM); its serial log is in the pod's volume"
wait_until "the guest is up" 300 grep -q "VMLAB-GUEST READY" "$SERIAL"
grep "VMLAB-GUEST READY" "$SERIAL" | sed 's/^/guest serial: /' | indent

# --- 6. a net added by editing the Domain ----------------------------------------------------
hostdev_phase() { kc get domain -n "$NS" "$POD" -o "jsonpath={.status.hostdevs[?(@.parentNet==\"$1\")].phase}"; }
attached() { [ "$(hostdev_phase "$1")" = attached ]; }
show patch domain "$POD" -n "$NS" --type merge -p '{"spec":{"nets":[{"name":"net1","network":"vmnet"}]}}'
wait_until "net1 attached (Domain status: VF hot-plugged into the running VM)" 120 attached net1
wait_until "the guest sees the device arrive" 60 grep -q "VMLAB-GUEST PCI+" "$SERIAL"
grep "VMLAB-GUEST PCI+" "$SERIAL" | sed 's/^/guest serial: /' | indent
say "  (8086:10d3 is the stand-in e1000e; with VFIO it would be the VF itself)"
show get domains -n "$NS"
echo "$(ts) \$ kubectl get domain $POD -n $NS -o yaml   # from spec: on (metadata left out)"
kc get domain -n "$NS" "$POD" -o yaml | sed -n '/^spec:/,$p' | indent
echo "$(ts) \$ kubectl describe domain $POD -n $NS   # its Events"
kc describe domain -n "$NS" "$POD" | sed -n '/^Events:/,$p' | indent
echo "$(ts) \$ vfplugctl vms   # the same records, from vfplugd's ledger over its node API"
ctl vms | indent

# --- 7. the net removed ----------------------------------------------------------------------
PCI1="$(kc get domain -n "$NS" "$POD" -o 'jsonpath={.status.nets[?(@.name=="net1")].actual.pciAddress}')"
vf_state() { [ "$(ctl vfs | awk -v p="$1" '$1 == p { print $5 }')" = "$2" ]; }
show patch domain "$POD" -n "$NS" --type merge -p '{"spec":{"nets":[]}}'
wait_until "net1's VF $PCI1 Free (the guest acknowledged the unplug, settings restored)" 120 \
    vf_state "$PCI1" free
wait_until "the guest sees the device go" 30 grep -q "VMLAB-GUEST PCI-" "$SERIAL"
grep "VMLAB-GUEST PCI-" "$SERIAL" | sed 's/^/guest serial: /' | indent
no_nets() { [ "$(kc get domain -n "$NS" "$POD" -o 'jsonpath={.status.netCount}')" = 0 ]; }
wait_until "the Domain's status without net1" 30 no_nets
show get domains -n "$NS"
echo "$(ts) \$ kubectl describe domain $POD -n $NS   # its Events"
kc describe domain -n "$NS" "$POD" | sed -n '/^Events:/,$p' | indent

# --- 8. the pod deleted ----------------------------------------------------------------------
say "net1 back for the last act: the VM holds a VF when its pod is deleted"
show patch domain "$POD" -n "$NS" --type merge -p '{"spec":{"nets":[{"name":"net1","network":"vmnet"}]}}'
wait_until "net1 attached again" 120 attached net1
echo "$(ts) \$ vfplugctl vfs"; ctl vfs | indent
t_del=$(date +%s.%N)
show delete pod "$POD" -n "$NS" --wait=false
all_free() { [ "$(ctl vfs | awk 'NR > 1 && $5 == "free"' | wc -l)" = 3 ]; }
wait_until "every VF Free (QEMU exited; vfplugd released what the VM held)" 120 all_free
no_domain() { [ -z "$(kc get domains -n "$NS" -o name 2>/dev/null)" ]; }
wait_until "the Domain gone (finalizer removed by vfplugd, then the Domain deleted)" 120 no_domain
say "pod deletion → VFs Free and Domain gone: $(awk -v s="$t_del" -v n="$(date +%s.%N)" 'BEGIN { printf "%.1f", n - s }') s"
echo "$(ts) \$ vfplugctl vfs"; ctl vfs | indent
show get domains -n "$NS"
say "vfplugd's log: what the controller and the executor did (time, module: message)"
sed -E 's/\x1b\[[0-9;]*m//g' "$WORK/vfplugd.log" |
    grep -E 'Domain created|net attached|VF hot-plugged|status written|DEVICE_DELETED|detached and released|QEMU exited|VF restored|finalizer removed' |
    sed -E 's/^[0-9-]+T([0-9:]{8})\.[0-9]+Z +[A-Z]+ +/\1 /; s/controller:reconcile\{[^}]*\}(:vm_watch\{[^}]*\})?: //; s/vm=[^ ]+ \([^)]*\)//; s/qmp_socket=[^ ]+ //' |
    cut -c1-150 | indent
say "part 5 done in $(awk -v s="$T0" -v n="$(date +%s.%N)" 'BEGIN { printf "%.0f", n - s }') s (pod created at +$(awk -v s="$T0" -v n="$t_pod" 'BEGIN { printf "%.0f", n - s }') s); cleaning up"
