//! The commands (I/O): IPAM delegation and node API calls in the order the CNI spec and
//! vfplugd need them. [`run`] returns what goes on stdout; the binary prints it.
//!
//! - ADD: dial vfplugd (unreachable: 11, before anything is allocated), IPAM ADD, `Node.Add`
//!   with the addresses; if `Node.Add` fails, IPAM DEL (rollback) and vfplugd's error.
//! - DEL: `Node.Del` (unreachable: 11 when a prevResult shows an earlier ADD succeeded, so the
//!   runtime retries; without one — from CNI 0.4.0 — success, as nothing was attached), then
//!   IPAM DEL. IPAM DEL is
//!   skipped when `Node.Del` failed, so the retried DEL does both and no address is reused
//!   while the VF may still carry it.
//! - CHECK: `Node.Check`, then IPAM CHECK.
//! - STATUS: `Node.Status` (unreachable or not ready: 50), then IPAM STATUS.
//! - GC: `Node.Gc`, then IPAM GC even if `Node.Gc` failed (GC continues on error); the first
//!   error is returned.

use tracing::{debug, info, warn};
use vfplug_api::{CniCode, v1};

use crate::devinfo::DeviceInfo;
use crate::env::Command;
use crate::error::CniError;
use crate::invocation::Invocation;
use crate::ipam::{self, Delegate};
use crate::mapping;
use crate::node::NodeApi;
use crate::result::CniResult;
use crate::version::{CniVersion, VersionInfo};

/// VERSION's output. Needs no config, no runtime and no socket.
pub fn version_output() -> String {
    serde_json::to_string(&VersionInfo::current()).unwrap_or_default()
}

/// Runs `inv` on a current-thread runtime made for this call (VERSION never gets here).
pub fn run_blocking(inv: &Invocation) -> Result<Option<String>, CniError> {
    if inv.env.command == Command::Version {
        return Ok(Some(version_output()));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CniError::new(CniCode::Io, format!("cannot start the async runtime: {e}")))?;
    rt.block_on(run(inv))
}

/// Runs the command; `Some(json)` is the result to print (ADD and VERSION only).
pub async fn run(inv: &Invocation) -> Result<Option<String>, CniError> {
    if inv.env.command == Command::Version {
        return Ok(Some(version_output()));
    }
    let conf = inv.conf()?;
    let delegate = ipam::delegate(
        conf.ipam.as_ref(),
        &inv.env,
        &inv.stdin,
        conf.timeout,
        conf.cni_version,
    )?;
    match inv.env.command {
        Command::Add => add(inv, delegate.as_ref()).await.map(Some),
        Command::Del => del(inv, delegate.as_ref()).await.map(|()| None),
        Command::Check => check(inv, delegate.as_ref()).await.map(|()| None),
        Command::Status => status(inv, delegate.as_ref()).await.map(|()| None),
        Command::Gc => gc(inv, delegate.as_ref()).await.map(|()| None),
        Command::Version => Ok(Some(version_output())),
    }
}

async fn connect(inv: &Invocation, unreachable: CniCode) -> Result<NodeApi, CniError> {
    let conf = inv.conf()?;
    NodeApi::connect(&conf.socket, conf.timeout)
        .await
        .map_err(|u| u.into_error(unreachable))
}

async fn add(inv: &Invocation, delegate: Option<&Delegate<'_>>) -> Result<String, CniError> {
    let conf = inv.conf()?;
    let mut node = connect(inv, CniCode::TryAgainLater).await?;
    // A repeat of a completed ADD is answered from vfplugd's ledger, with the IPAM result kept
    // there: the IPAM plugin is not asked again (host-local refuses a second allocation).
    match node.lookup(mapping::add_request(inv, None)?).await {
        Ok(resp) if resp.existing => {
            let ipam: Option<CniResult> = if resp.ipam_result.is_empty() {
                None
            } else {
                Some(serde_json::from_str(&resp.ipam_result).map_err(|e| {
                    CniError::new(
                        CniCode::Internal,
                        format!("vfplugd's stored IPAM result does not decode: {e}"),
                    )
                })?)
            };
            info!(pci = %resp.pci_address, "repeated ADD: answered from vfplugd's ledger");
            return finish_add(inv, &resp, ipam.as_ref());
        }
        Ok(_) => {}
        Err(e) if e.code == CniCode::TryAgainLater.code() => return Err(e),
        // Not a repeat (3), or a vfplugd without Lookup: do the ADD.
        Err(e) => debug!(code = e.code, msg = %e.msg, "not a repeated ADD"),
    }
    if conf.device_id.is_none() && conf.pool.is_none() {
        // vfplugd refuses this (7) and knows what to tell the pod (the VF the kubelet gave it,
        // and the NAD annotation that would pass it on): ask it before IPAM allocates anything.
        let req = mapping::add_request(inv, None)?;
        let resp = node.add(req).await?;
        return Err(CniError::new(
            CniCode::Internal,
            format!(
                "vfplugd accepted an ADD without deviceID or pool (VF {}); refusing it",
                resp.pci_address
            ),
        ));
    }
    let ipam_result = match delegate {
        Some(d) => Some(d.add().await?),
        None => None,
    };
    if let Some(d) = delegate
        && let Err(e) = expressible(inv, ipam_result.as_ref())
    {
        // Before Node.Add, so nothing but the lease needs undoing.
        if let Err(rb) = d.run(Command::Del).await {
            warn!(error = %rb.msg, "rollback: IPAM DEL after an address-less IPAM result failed too");
        }
        return Err(CniError::new(
            CniCode::Ipam,
            format!("ipam plugin {:?} returned no IP address: {e}", d.name),
        ));
    }
    let mut req = mapping::add_request(inv, ipam_result.as_ref())?;
    if let Some(r) = &ipam_result {
        req.ipam_result = serde_json::to_string(r).map_err(|e| {
            CniError::new(
                CniCode::Internal,
                format!("cannot encode the IPAM result: {e}"),
            )
        })?;
    }
    debug!(?req, "Node.Add");
    let resp = match node.add(req).await {
        Ok(r) => r,
        Err(e) => {
            if let Some(d) = delegate
                && let Err(rb) = d.run(Command::Del).await
            {
                warn!(error = %rb.msg, "rollback: IPAM DEL after a failed Node.Add failed too");
            }
            return Err(e);
        }
    };
    for w in &resp.warnings {
        warn!(pci = %resp.pci_address, "vfplugd: {w}");
    }
    info!(
        pci = %resp.pci_address, mode = %resp.mode, existing = resp.existing, token = resp.token,
        attach_pending = resp.attach_pending,
        "attached {} ({}) to {}", inv.env.ifname, inv.env.container_id, conf.name
    );
    finish_add(inv, &resp, ipam_result.as_ref())
}

/// Whether the result can be written in the config's version (0.1.0/0.2.0 need an address).
fn expressible(inv: &Invocation, ipam_result: Option<&CniResult>) -> Result<(), String> {
    let version = inv.version();
    if !version.is_legacy() {
        return Ok(());
    }
    let prev = inv.conf.as_ref().and_then(|c| c.prev_result.as_ref());
    let any_ip =
        prev.is_some_and(|p| !p.ips.is_empty()) || ipam_result.is_some_and(|r| !r.ips.is_empty());
    if any_ip {
        Ok(())
    } else {
        Err(format!(
            "a cniVersion {version} result is an ip4/ip6 object and needs one"
        ))
    }
}

/// Writes the device-info file if asked and prints the result.
fn finish_add(
    inv: &Invocation,
    resp: &v1::AddResponse,
    ipam_result: Option<&CniResult>,
) -> Result<String, CniError> {
    let conf = inv.conf()?;
    if let Some(path) = &conf.runtime_config.device_info_file
        && !resp.pci_address.is_empty()
    {
        // Multus reads it after the chain; without it only network-status lacks the device,
        // the attachment itself is fine, so this does not fail the ADD.
        if let Err(e) = DeviceInfo::pci(&resp.pci_address, &resp.pf_pci_address).write(path) {
            warn!(path = %path.display(), "cannot write the device-info file: {e}");
        }
    }
    let result = mapping::add_result(inv, resp, ipam_result)
        .to_version(inv.version())
        .map_err(|e| CniError::new(CniCode::Internal, format!("cannot write the result: {e}")))?;
    serde_json::to_string(&result)
        .map_err(|e| CniError::new(CniCode::Internal, format!("cannot encode the result: {e}")))
}

async fn del(inv: &Invocation, delegate: Option<&Delegate<'_>>) -> Result<(), CniError> {
    let conf = inv.conf()?;
    for note in &conf.ignored {
        debug!("DEL ignores a config error it does not need to care about: {note}");
    }
    let mut node = match connect(inv, CniCode::TryAgainLater).await {
        Ok(n) => n,
        // From CNI 0.4.0 on, the runtime passes the cached result of a successful ADD as
        // prevResult on DEL. Without one, no ADD of this attachment succeeded: vfplugd holds
        // nothing for it that its own recovery does not undo, so an unreachable vfplugd must
        // not keep the pod Terminating forever. (With a prevResult, 11: the runtime retries.)
        Err(e) if conf.prev_result.is_none() && conf.cni_version >= CniVersion::V0_4_0 => {
            warn!(
                "vfplugd is unreachable ({}); no earlier ADD succeeded (no prevResult), so there \
                 is nothing to release: DEL succeeds",
                e.msg
            );
            if let Some(d) = delegate {
                d.run(Command::Del).await?;
            }
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let req = mapping::del_request(inv)?;
    debug!(?req, "Node.Del");
    let resp = node.del(req).await?;
    for w in &resp.warnings {
        warn!(pci = %resp.pci_address, "vfplugd: {w}");
    }
    info!(
        released = resp.released, pci = %resp.pci_address, note = %resp.note,
        "detached {} ({}) from {}", inv.env.ifname, inv.env.container_id, conf.name
    );
    if let Some(d) = delegate {
        d.run(Command::Del).await?;
    }
    Ok(())
}

async fn check(inv: &Invocation, delegate: Option<&Delegate<'_>>) -> Result<(), CniError> {
    let req = mapping::check_request(inv)?;
    let mut node = connect(inv, CniCode::TryAgainLater).await?;
    debug!(?req, "Node.Check");
    node.check(req).await?;
    if let Some(d) = delegate {
        d.run(Command::Check).await?;
    }
    Ok(())
}

async fn status(inv: &Invocation, delegate: Option<&Delegate<'_>>) -> Result<(), CniError> {
    let mut node = connect(inv, CniCode::NotAvailable).await?;
    let resp = node
        .status(mapping::status_request(inv))
        .await
        .map_err(|e| {
            // STATUS speaks only "available or not": a transient failure means "not now".
            if e.code == CniCode::TryAgainLater.code() {
                CniError::raw(CniCode::NotAvailable.code(), e.msg, e.details)
            } else {
                e
            }
        })?;
    if !resp.ready {
        let reason = if resp.reason.is_empty() {
            "no reason given".to_owned()
        } else {
            resp.reason
        };
        return Err(CniError::new(
            CniCode::NotAvailable,
            format!("vfplugd is not ready: {reason}"),
        ));
    }
    debug!(free = resp.free, "vfplugd is ready");
    if let Some(d) = delegate {
        d.run(Command::Status).await?;
    }
    Ok(())
}

async fn gc(inv: &Invocation, delegate: Option<&Delegate<'_>>) -> Result<(), CniError> {
    let node_result = async {
        let mut node = connect(inv, CniCode::TryAgainLater).await?;
        let req = mapping::gc_request(inv)?;
        debug!(valid = req.valid.len(), network = %req.network, "Node.Gc");
        node.gc(req).await
    }
    .await;
    match &node_result {
        Ok(r) => {
            for pci in &r.released {
                info!(%pci, "GC released");
            }
            for e in &r.errors {
                warn!("GC could not release: {e}");
            }
        }
        Err(e) => warn!(code = e.code, "Node.Gc failed: {}", e.msg),
    }
    let ipam_result = match delegate {
        Some(d) => d.run(Command::Gc).await,
        None => Ok(()),
    };
    node_result.map(|_| ()).and(ipam_result)
}
