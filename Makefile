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

# The real Kubernetes tier (tests/k8s, docs/k8s-lab.md): a one-node Kubernetes 1.20 cluster on
# this machine (root). k8s-test brings it up if needed and leaves it up; k8s-down stops it.
#   make k8s-test                  build (cached) + up + the vfplug-k8slab suite (~80 s)
K8S_LAB_DIR ?= /tmp/vfplug-k8s

.PHONY: k8s-build k8s-up k8s-down k8s-test

k8s-build:
	bash tests/k8s/build.sh

k8s-up: k8s-build
	K8S_LAB_DIR=$(K8S_LAB_DIR) tests/k8s/cluster.sh up

k8s-down:
	K8S_LAB_DIR=$(K8S_LAB_DIR) tests/k8s/cluster.sh down

k8s-test: k8s-up
	VFPLUG_K8S_ENV=$(K8S_LAB_DIR)/env VFPLUG_REQUIRE=1 \
	  $(CARGO) nextest run -p vfplug-k8slab --no-capture --no-fail-fast --test-threads 1
