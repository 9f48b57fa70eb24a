//! From an [`Invocation`] to node API requests, and from vfplugd's answer to the CNI result.
//! Pure: the calls themselves are in [`crate::node`].

use vfplug_api::v1;
use vfplug_core::VfConfig;

use crate::env::CniEnv;
use crate::error::CniError;
use crate::invocation::Invocation;
use crate::result::{CniResult, Interface};

/// The attachment the run acts for: container ID, interface, and the pod from `CNI_ARGS`.
pub fn attachment(env: &CniEnv) -> v1::Attachment {
    let a = &env.args;
    v1::Attachment {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
        pod_uid: a.pod_uid.clone().unwrap_or_default(),
        pod_namespace: a.pod_namespace.clone().unwrap_or_default(),
        pod_name: a.pod_name.clone().unwrap_or_default(),
    }
}

/// The VF settings in the node API's form.
pub fn vf_config(c: &VfConfig) -> v1::VfConfig {
    v1::VfConfig {
        mac: c.mac.map(|m| m.to_string()),
        vlan: c.vlan.map(u32::from),
        vlan_qos: c.vlan_qos.map(u32::from),
        vlan_proto: c.vlan_proto.map(|p| p.to_string()),
        spoofchk: c.spoofchk,
        trust: c.trust,
        link_state: c.link_state.map(|s| s.to_string()),
        min_tx_rate: c.min_tx_rate,
        max_tx_rate: c.max_tx_rate,
        mtu: c.mtu,
    }
}

fn ips_of(ipam: Option<&CniResult>) -> Vec<v1::IpConfig> {
    ipam.map(|r| {
        r.ips
            .iter()
            .map(|ip| v1::IpConfig {
                address: ip.address.to_string(),
                gateway: ip.gateway.map(|g| g.to_string()).unwrap_or_default(),
            })
            .collect()
    })
    .unwrap_or_default()
}

/// `Node.Add` for an ADD, with the addresses and routes the IPAM plugin gave.
pub fn add_request(inv: &Invocation, ipam: Option<&CniResult>) -> Result<v1::AddRequest, CniError> {
    let conf = inv.conf()?;
    Ok(v1::AddRequest {
        attachment: Some(attachment(&inv.env)),
        netns: inv.env.netns.clone(),
        network: conf.name.clone(),
        device_id: conf.device_id.map(|d| d.to_string()).unwrap_or_default(),
        pool: conf.pool.clone().unwrap_or_default(),
        config: Some(vf_config(&inv.vf)),
        ips: ips_of(ipam),
        routes: ipam
            .map(|r| {
                r.routes
                    .iter()
                    .map(|rt| v1::RouteConfig {
                        dst: rt.dst.to_string(),
                        gw: rt.gw.map(|g| g.to_string()).unwrap_or_default(),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        ipam_result: String::new(),
        qmp_socket: conf.qmp_socket.clone().unwrap_or_default(),
    })
}

/// The device hint for DEL and CHECK: the `pciID` `prevResult` gave this attachment's interface,
/// else the config's device ID; empty when there is neither.
pub fn device_hint(inv: &Invocation) -> String {
    let Some(conf) = &inv.conf else {
        return String::new();
    };
    conf.prev_result
        .as_ref()
        .and_then(|p| {
            p.find_interface(&inv.env.ifname, &inv.env.netns)
                .and_then(|i| p.interfaces[i].pci_id.clone())
        })
        .filter(|s| !s.is_empty())
        .or_else(|| conf.device_id.map(|d| d.to_string()))
        .unwrap_or_default()
}

/// `Node.Del` for a DEL.
pub fn del_request(inv: &Invocation) -> Result<v1::DelRequest, CniError> {
    let conf = inv.conf()?;
    Ok(v1::DelRequest {
        attachment: Some(attachment(&inv.env)),
        netns: inv.env.netns.clone(),
        network: conf.name.clone(),
        device_id: device_hint(inv),
    })
}

/// `Node.Check` for a CHECK: the settings asked for, and the addresses `prevResult` lists for
/// this attachment's interface. Code 103 if `prevResult` has no such interface.
pub fn check_request(inv: &Invocation) -> Result<v1::CheckRequest, CniError> {
    let conf = inv.conf()?;
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::config("prevResult: CHECK needs the result of the previous ADD")
    })?;
    let idx = prev
        .find_interface(&inv.env.ifname, &inv.env.netns)
        .ok_or_else(|| {
            CniError::new(
                vfplug_api::CniCode::CheckFailed,
                format!(
                    "prevResult lists no interface {:?} in {:?}",
                    inv.env.ifname, inv.env.netns
                ),
            )
        })?;
    Ok(v1::CheckRequest {
        attachment: Some(attachment(&inv.env)),
        netns: inv.env.netns.clone(),
        network: conf.name.clone(),
        device_id: device_hint(inv),
        config: Some(vf_config(&inv.vf)),
        ips: prev
            .ips
            .iter()
            .filter(|ip| ip.interface == Some(idx))
            .map(|ip| v1::IpConfig {
                address: ip.address.to_string(),
                gateway: ip.gateway.map(|g| g.to_string()).unwrap_or_default(),
            })
            .collect(),
    })
}

/// `Node.Status` for a STATUS.
pub fn status_request(inv: &Invocation) -> v1::StatusRequest {
    v1::StatusRequest {
        pool: inv
            .conf
            .as_ref()
            .and_then(|c| c.pool.clone())
            .unwrap_or_default(),
    }
}

/// `Node.Gc` for a GC.
pub fn gc_request(inv: &Invocation) -> Result<v1::GcRequest, CniError> {
    let conf = inv.conf()?;
    Ok(v1::GcRequest {
        network: conf.name.clone(),
        valid: conf
            .valid_attachments
            .iter()
            .flatten()
            .map(|a| v1::Attachment {
                container_id: a.container_id.clone(),
                ifname: a.ifname.clone(),
                ..Default::default()
            })
            .collect(),
    })
}

/// The ADD result in the internal form: `prevResult`'s interfaces, addresses and routes first
/// (chaining), then this attachment's interface and the IPAM plugin's addresses (pointing at
/// that interface), routes and DNS. [`CniResult::to_version`] writes it in the config's
/// version.
pub fn add_result(inv: &Invocation, resp: &v1::AddResponse, ipam: Option<&CniResult>) -> CniResult {
    let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    let mut out = inv
        .conf
        .as_ref()
        .and_then(|c| c.prev_result.clone())
        .unwrap_or_default();
    let idx = out.interfaces.len();
    out.interfaces.push(Interface {
        name: non_empty(&resp.ifname).unwrap_or_else(|| inv.env.ifname.clone()),
        mac: non_empty(&resp.mac),
        mtu: (resp.mtu != 0).then_some(resp.mtu),
        sandbox: non_empty(&resp.sandbox).or_else(|| non_empty(&inv.env.netns)),
        socket_path: None,
        pci_id: non_empty(&resp.pci_address),
    });
    if let Some(r) = ipam {
        out.ips.extend(r.ips.iter().cloned().map(|mut ip| {
            ip.interface = Some(idx);
            ip
        }));
        out.routes.extend(r.routes.iter().cloned());
        if !r.dns.is_empty() {
            out.dns = r.dns.clone();
        }
    }
    out
}
