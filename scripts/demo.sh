#!/usr/bin/env bash
# The main job: vfplug's whole present flow on a simulated node, then real QEMU hotplug.
#  1. vfplugd (the real binary) on a fake sysfs SR-IOV node, with a kubelet stand-in speaking the
#     real device-plugin gRPC protocol: registration, snapshots, GetPreferredAllocation, Allocate,
#     health flips, sriov_numvfs changes, vfplugd and kubelet restarts.
#  2. The VM lab's qemu tier: a real QEMU 10 (TCG) guest, device_add/device_del through vfplug's
#     QMP client with the guest acknowledging the unplug.
# Run as root on a fresh Debian bookworm machine (root only for apt-get in the lab setup).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
echo "== build"
cargo build --bin vfplugd --example demo -p vfplugd
echo "== part 1: device plugin on a simulated node"
target/debug/examples/demo target/debug/vfplugd "$@"
echo "== part 2: real QEMU hotplug through vfplug-qmp (VM lab, qemu tier)"
bash tests/vmlab/setup.sh
VMLAB_TIER=qemu VMLAB_REQUIRE=1 cargo nextest run -p vfplug-vmlab --no-capture --test-threads 1
