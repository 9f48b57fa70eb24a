#!/usr/bin/env bash
# Sets up this machine and runs every test of vfplug: unit and property tests, in-process peers
# over real sockets (fake kubelet, scripted QMP server, fake sysfs trees), the real vfplugd binary,
# and all three VM lab tiers (real QEMU 10 under TCG, emulated igb SR-IOV + VFIO): qemu, sriov and
# the slow sriov-full, where a nested Linux guest acknowledges the unplug of a VF that vfplugd
# hot-plugged into it through the CNI plugin (the heart of the product: proven on every run).
#
#   bash scripts/test-all.sh            # as root on a fresh Debian bookworm machine
#   VMLAB_TIERS=qemu,sriov bash scripts/test-all.sh   # leave out the slow tier (~8 min less)
#   K8S_TIER=0 bash scripts/test-all.sh  # leave out the real Kubernetes tier (says so loudly)
#
# The real Kubernetes tier (docs/k8s-lab.md) runs last: vfplugd against a real kubelet 1.20,
# kube-apiserver and containerd on a one-node cluster (tests/k8s/cluster.sh). Its binaries are
# built from Debian's source by tests/k8s/build.sh (~15 min on a fresh 2-core machine, cached in
# /var/cache/vfplug/k8s afterwards), in the background while the other suites run.
#
# Setup needs root (apt-get); without root it assumes the packages are there already.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# As root or in CI every prerequisite is there (or installed below): a test that would skip
# for want of root, `ip`, QEMU or the CNI plugins fails instead (vfplug_host::prereq).
if [ "$(id -u)" = 0 ] || [ "${CI:-}" = true ]; then
    export VFPLUG_REQUIRE=1
fi
TIERS="${VMLAB_TIERS:-qemu,sriov,sriov-full}"

if [ "$(id -u)" = 0 ]; then
    echo "== setup: Debian packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends iproute2 cpio bc ca-certificates \
        containernetworking-plugins python3-grpcio python3-grpc-tools golang-go \
        golang-google-grpc-dev python3-venv >/dev/null
else
    echo "== setup: not root, skipping apt-get (packages assumed present)"
fi
if ! command -v cargo-nextest >/dev/null 2>&1; then
    echo "== setup: cargo-nextest"
    cargo install --locked cargo-nextest
fi
echo "== setup: VM lab (QEMU 10 from bookworm-backports, cached kernel and busybox)"
bash tests/vmlab/setup.sh
echo "== setup: helm and kubernetes-validate for the chart tests (cached in /var/cache/vfplug/tools)"
if tools="$(bash scripts/get-chart-tools.sh)"; then
    eval "$tools"
else
    echo "== setup: helm or kubernetes-validate NOT installed: the chart tests skip (fail with VFPLUG_REQUIRE=1)" >&2
fi

# The Kubernetes build starts now (after the other apt-get runs: it uses apt-get too) and
# overlaps the cargo suites, niced so it slows them less; it is waited for before its tier.
K8S_TIER="${K8S_TIER:-1}"
K8S_BUILD_LOG="${K8S_BUILD_LOG:-/tmp/vfplug-k8s-build.log}"
k8s_build_pid=""
k8s_unrunnable=0
k8s_cluster_ours=0
# On any exit (a failure, Ctrl-C): the background build stops (its whole session: make and go
# too) and a cluster this run started goes down. Nothing of ours may keep running.
k8s_cleanup() {
    if [ -n "$k8s_build_pid" ] && kill -0 "$k8s_build_pid" 2>/dev/null; then
        echo "== stopping the background Kubernetes build" >&2
        kill -TERM -- "-$k8s_build_pid" 2>/dev/null || true
    fi
    if [ "$k8s_cluster_ours" = 1 ]; then
        bash tests/k8s/cluster.sh down || true
    fi
}
trap k8s_cleanup EXIT
if [ "$K8S_TIER" = 0 ]; then
    echo "== SKIPPING the real Kubernetes tier (K8S_TIER=0): vfplugd is NOT tested against a real kubelet" >&2
elif [ "$(id -u)" != 0 ]; then
    echo "== SKIPPING the real Kubernetes tier: it needs root (cluster.sh, build.sh)" >&2
    # In CI a tier that cannot run is a failure (set K8S_TIER=0 to leave it out on purpose).
    [ "${CI:-}" = true ] && k8s_unrunnable=1
else
    echo "== setup: Kubernetes 1.20 binaries in the background (tests/k8s/build.sh, log $K8S_BUILD_LOG)"
    # Its own session (setsid), so that k8s_cleanup can stop all of it.
    setsid nice -n 10 bash tests/k8s/build.sh >"$K8S_BUILD_LOG" 2>&1 &
    k8s_build_pid=$!
fi

echo "== tests: workspace (VM lab tiers: $TIERS)"
# The VM lab runs its VMs one at a time; everything else in parallel.
# Both suites always run, so one failure does not hide the other's results.
status=0
VMLAB_TIER="" cargo nextest run --workspace --exclude vfplug-vmlab --exclude vfplug-k8slab \
    --no-fail-fast || status=1
VMLAB_TIER="$TIERS" VMLAB_REQUIRE=1 \
    cargo nextest run -p vfplug-vmlab --no-capture --no-fail-fast --test-threads 1 || status=1

if [ -n "$k8s_build_pid" ]; then
    echo "== tests: real Kubernetes tier (docs/k8s-lab.md)"
    echo "== waiting for tests/k8s/build.sh (log $K8S_BUILD_LOG)"
    build_rc=0
    wait "$k8s_build_pid" || build_rc=$?
    k8s_build_pid=""
    if [ "$build_rc" != 0 ]; then
        echo "== tests/k8s/build.sh FAILED (exit $build_rc); its log:" >&2
        cat "$K8S_BUILD_LOG" >&2
        status=1
    else
        tail -n 1 "$K8S_BUILD_LOG"
        export K8S_LAB_DIR="${K8S_LAB_DIR:-/tmp/vfplug-k8s}"
        # A cluster someone already runs in this lab dir (a developer's, another session's) is
        # used and left running; one started here goes down after the tests (or in k8s_cleanup).
        if bash tests/k8s/cluster.sh running; then
            echo "== the lab cluster in $K8S_LAB_DIR was already up: using it and leaving it up"
        else
            k8s_cluster_ours=1
        fi
        if bash tests/k8s/cluster.sh up; then
            VFPLUG_K8S_ENV="$K8S_LAB_DIR/env" \
                cargo nextest run -p vfplug-k8slab --no-capture --no-fail-fast --test-threads 1 \
                || status=1
        else
            echo "== tests/k8s/cluster.sh up FAILED (daemon log tail above); the Kubernetes tier did not run" >&2
            status=1
        fi
        if [ "$k8s_cluster_ours" = 1 ]; then
            k8s_cluster_ours=0
            bash tests/k8s/cluster.sh down || status=1
        fi
    fi
fi
if [ "$k8s_unrunnable" = 1 ]; then
    echo "== FAILED: CI without root cannot run the real Kubernetes tier (K8S_TIER=0 leaves it out)" >&2
    status=1
fi

if [ "$status" != 0 ]; then
    echo "== some tests FAILED (see above)" >&2
fi
exit "$status"
