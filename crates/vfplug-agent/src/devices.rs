//! From a pool's VF to what the kubelet hands the container: the pool's config and the host's
//! device nodes (read through vfplug-host) become vfplug-kubelet's [`SriovDevice`], the input of
//! both Allocate and the CDI spec files. The formats themselves live in
//! `vfplug_kubelet::{sriov, cdi}`.

use std::collections::BTreeMap;

use tracing::{info, warn};
use vfplug_core::{DeviceMode, PoolConfig, VfInfo};
use vfplug_host::devnodes;
use vfplug_kubelet::{cdi, sriov};

use crate::options::AgentOptions;
use crate::state::State;

/// The Allocate view of one VF of `pool`, with its device nodes as they are on the host now
/// (SRIOV-DP reads them at Allocate too). `Err` says why the VF cannot be handed out.
pub(crate) fn sriov_device(
    opts: &AgentOptions,
    pool: &PoolConfig,
    vf: &VfInfo,
) -> Result<sriov::SriovDevice, String> {
    let id = vf.pci.to_string();
    let mut dev = match pool.device_mode {
        DeviceMode::Vfio => {
            let group = vf
                .iommu_group
                .ok_or("vfio mode but the VF has no IOMMU group")?;
            let mut d = sriov::SriovDevice::vfio(id.clone(), group);
            d.noiommu = devnodes::is_noiommu_group(&opts.sysfs_root, group);
            d
        }
        DeviceMode::Netdev => sriov::SriovDevice::netdev(id.clone()),
    }
    .with_pf(vf.pf.to_string());
    if pool.rdma {
        let devices = devnodes::rdma_devices(&opts.sysfs_root, vf.pci);
        if devices.is_empty() {
            return Err("isRdma pool, but the VF has no RDMA device now".into());
        }
        let char_devices = devices
            .iter()
            .flat_map(|d| devnodes::rdma_char_devices(&opts.sysfs_root, &opts.dev_root, d))
            .collect();
        dev.rdma = Some(sriov::RdmaInfo {
            devices,
            char_devices,
        });
    }
    dev.vhost_net = pool.need_vhost_net;
    if !pool.additional_info.is_empty() {
        dev.extra = Some(sriov::extra_info(&pool.additional_info, &id));
    }
    Ok(dev)
}

/// What the CDI spec files are made of: each pool with its prefix and member VFs. Taken under
/// the state lock (a copy), so that the files are built and written outside it.
pub(crate) struct CdiSnapshot {
    pools: Vec<(String, PoolConfig, Vec<VfInfo>)>,
}

/// The [`CdiSnapshot`] of `st`; `None` without `--use-cdi`.
pub(crate) fn cdi_snapshot(opts: &AgentOptions, st: &State) -> Option<CdiSnapshot> {
    if !opts.use_cdi {
        return None;
    }
    let pools = st
        .config
        .pools
        .iter()
        .map(|pool| {
            let vfs = st
                .members
                .get(&st.config.resource_name(pool))
                .into_iter()
                .flatten()
                .filter_map(|pci| st.inventory.vfs.get(pci))
                .cloned()
                .collect();
            (st.config.prefix_of(pool).to_owned(), pool.clone(), vfs)
        })
        .collect();
    Some(CdiSnapshot { pools })
}

/// With `--use-cdi`: writes each pool's CDI spec where it changed and removes vfplugd's other
/// spec files (pools that went, pools without device nodes, files of an earlier run). Errors
/// are logged: a missing spec fails only the containers that name it, with the runtime's
/// error.
pub(crate) fn sync_cdi_specs(opts: &AgentOptions, snapshot: Option<CdiSnapshot>) {
    let Some(snapshot) = snapshot else {
        return;
    };
    let mut keep = Vec::new();
    for (prefix, pool, vfs) in &snapshot.pools {
        let resource = format!("{prefix}/{}", pool.name);
        let mut devices: BTreeMap<String, Vec<_>> = BTreeMap::new();
        for vf in vfs {
            // A VF that cannot be described now gets no entry; Allocate refuses it anyway.
            if let Ok(dev) = sriov_device(opts, pool, vf)
                && let Ok(specs) = sriov::device_specs(std::slice::from_ref(&dev))
            {
                devices.insert(dev.pci, specs);
            }
        }
        let Some(spec) =
            cdi::pool_spec(prefix, devices.iter().map(|(k, v)| (k.as_str(), v.clone())))
        else {
            continue;
        };
        let file = cdi::spec_file_name(prefix, &pool.name);
        match cdi::write_spec(&opts.cdi_dir, &file, &spec) {
            Ok(true) => info!(%resource, file, "CDI spec written"),
            Ok(false) => {}
            Err(e) => warn!(%resource, error = %e, "cannot write the CDI spec"),
        }
        keep.push(file);
    }
    remove_cdi_specs(opts, &keep);
}

/// Removes vfplugd's CDI spec files except `keep` (all of them at shutdown, as SRIOV-DP's
/// `CleanupSpecs` does).
pub(crate) fn remove_cdi_specs(opts: &AgentOptions, keep: &[String]) {
    if !opts.use_cdi {
        return;
    }
    match cdi::remove_stale(&opts.cdi_dir, keep) {
        Ok(removed) => {
            for file in removed {
                info!(file, "CDI spec removed");
            }
        }
        Err(e) => warn!(error = %e, "cannot clean the CDI spec directory"),
    }
}
