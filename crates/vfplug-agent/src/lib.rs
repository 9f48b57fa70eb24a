//! vfplugd's engine: ledger persistence, pools, health, wiring of inventory and kubelet
