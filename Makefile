# vfplug top-level Makefile. The vm-test target runs the VM lab (tests/vmlab, docs/vm-lab.md).
#   make vm-test TIER=qemu         host QEMU + tiny guest (~20 s)
#   make vm-test TIER=sriov        L1 with igb SR-IOV + VFIO, nested QEMU in prelaunch (~25 s)
#   make vm-test TIER=sriov-full   as sriov, L2 boots Linux and acks the unplug (~2-6 min under TCG; in CI)
#   make vm-test TIER=all          everything
# VMs run one at a time (--test-threads 1): TCG is CPU-bound and parallel VMs only make timings noisy.
# VMLAB_REQUIRE=1 (CI) turns a missing prerequisite into a failure instead of a loud skip.

TIER ?= qemu
VMLAB_REQUIRE ?= 0
CARGO ?= cargo

.PHONY: vm-test vm-setup

vm-setup:
	tests/vmlab/setup.sh

vm-test: vm-setup
	VMLAB_TIER=$(TIER) VMLAB_REQUIRE=$(VMLAB_REQUIRE) \
	  $(CARGO) nextest run -p vfplug-vmlab --no-capture --no-fail-fast --test-threads 1
