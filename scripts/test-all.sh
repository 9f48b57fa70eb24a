#!/usr/bin/env bash
# Sets up this machine and runs every test of vfplug: unit and property tests, in-process peers
# over real sockets (fake kubelet, scripted QMP server, fake sysfs trees), the real vfplugd binary,
# and all three VM lab tiers (real QEMU 10 under TCG, emulated igb SR-IOV + VFIO): qemu, sriov and
# the slow sriov-full, where a nested Linux guest acknowledges the unplug of a VF that vfplugd
# hot-plugged into it through the CNI plugin (the heart of the product: proven on every run).
#
#   bash scripts/test-all.sh            # as root on a fresh Debian bookworm machine
#   VMLAB_TIERS=qemu,sriov bash scripts/test-all.sh   # leave out the slow tier (~8 min less)
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
        golang-google-grpc-dev >/dev/null
else
    echo "== setup: not root, skipping apt-get (packages assumed present)"
fi
if ! command -v cargo-nextest >/dev/null 2>&1; then
    echo "== setup: cargo-nextest"
    cargo install --locked cargo-nextest
fi
echo "== setup: VM lab (QEMU 10 from bookworm-backports, cached kernel and busybox)"
bash tests/vmlab/setup.sh

echo "== tests: workspace (VM lab tiers: $TIERS)"
# The VM lab runs its VMs one at a time; everything else in parallel.
# Both suites always run, so one failure does not hide the other's results.
status=0
VMLAB_TIER="" cargo nextest run --workspace --exclude vfplug-vmlab --no-fail-fast || status=1
VMLAB_TIER="$TIERS" VMLAB_REQUIRE=1 \
    cargo nextest run -p vfplug-vmlab --no-capture --no-fail-fast --test-threads 1 || status=1
if [ "$status" != 0 ]; then
    echo "== some tests FAILED (see above)" >&2
fi
exit "$status"
