//! The VM lab: real QEMU, emulated SR-IOV (igb) and VFIO, driven by vfplug's own code
