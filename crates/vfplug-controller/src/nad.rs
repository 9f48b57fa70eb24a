//! A spec net's network config, from its NetworkAttachmentDefinition (the Network Plumbing WG's
//! `k8s.cni.cncf.io/v1`, read with one GET when a net is attached) or inline, to the node API's
//! `Add` request: parsed by the CNI plugin's own parser (vfplug-cni), so a config means the same
//! whether containerd runs the plugin or the controller attaches it.

use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use serde_json::Value;
use vfplug_api::v1;
use vfplug_cni::{Command, NetConf};
use vfplug_crd::NetSpec;

use crate::plan::domain_container_id;

/// The annotation naming a NetworkAttachmentDefinition's device-plugin resource (the pool).
pub const RESOURCE_NAME_ANNOTATION: &str = "k8s.v1.cni.cncf.io/resourceName";

/// Why a spec net's config cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum NadError {
    /// `network` is not `[namespace/]name`.
    #[error("network {0:?}: give a NetworkAttachmentDefinition as [namespace/]name")]
    BadRef(String),
    /// Neither `network` nor `config`, or both.
    #[error("give exactly one of network and config")]
    OneOf,
    /// The NetworkAttachmentDefinition does not exist (or cannot be read).
    #[error("NetworkAttachmentDefinition {0}: {msg}", msg = fetch_message(.1))]
    Fetch(String, kube::Error),
    /// Its `spec.config` is missing or not a vfplug config.
    #[error("{0}: {1}")]
    Config(String, String),
}

/// What the API server said, as a person reads it: its message, not kube's dump of the whole
/// Status (this text ends up in the Domain's Synced condition and an Event).
fn fetch_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) if !s.message.is_empty() => s.message.clone(),
        e => e.to_string(),
    }
}

impl NadError {
    /// Whether trying again later may succeed (the API server, not the config).
    pub fn transient(&self) -> bool {
        match self {
            Self::Fetch(_, kube::Error::Api(s)) => s.code >= 500 || s.code == 429,
            Self::Fetch(..) => true,
            _ => false,
        }
    }
}

/// The network config of a net, and the pool its NetworkAttachmentDefinition names.
#[derive(Clone, Debug)]
pub struct Resolved {
    /// `namespace/name` of the NetworkAttachmentDefinition, or `inline/<net>`.
    pub network: String,
    /// The config's JSON.
    pub config: String,
    /// The resourceName annotation.
    pub resource: Option<String>,
}

fn nad_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("k8s.cni.cncf.io", "v1", "NetworkAttachmentDefinition"),
        "network-attachment-definitions",
    )
}

/// Reads the net's config: its NetworkAttachmentDefinition's (one GET), or the inline one.
pub async fn resolve(
    client: &Client,
    namespace: &str,
    net: &NetSpec,
) -> Result<Resolved, NadError> {
    match (net.network.trim(), net.config.as_deref()) {
        ("", Some(c)) => Ok(Resolved {
            network: format!("inline/{}", net.name),
            config: c.to_owned(),
            resource: None,
        }),
        (r, None) if !r.is_empty() => {
            let (ns, name) = match r.split_once('/') {
                Some((ns, name)) => (ns, name),
                None => (namespace, r),
            };
            if ns.is_empty() || name.is_empty() || name.contains('/') {
                return Err(NadError::BadRef(r.to_owned()));
            }
            let full = format!("{ns}/{name}");
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &nad_resource());
            let obj = api
                .get(name)
                .await
                .map_err(|e| NadError::Fetch(full.clone(), e))?;
            let config = obj
                .data
                .pointer("/spec/config")
                .and_then(Value::as_str)
                .ok_or_else(|| NadError::Config(full.clone(), "spec.config is missing".into()))?
                .to_owned();
            let resource = obj
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(RESOURCE_NAME_ANNOTATION))
                .cloned();
            Ok(Resolved {
                network: full,
                config,
                resource,
            })
        }
        _ => Err(NadError::OneOf),
    }
}

/// The pod a net is attached to.
#[derive(Clone, Debug)]
pub struct PodId<'a> {
    /// Namespace.
    pub namespace: &'a str,
    /// Name.
    pub name: &'a str,
    /// UID.
    pub uid: &'a str,
    /// Its `vfplug.io/qmp-socket` annotation.
    pub qmp_socket: Option<&'a str>,
}

/// The `Add` request for `net` on `pod`, from its resolved config. A config list
/// (`plugins: [...]`) contributes its `vfplug` entry; IPAM is not the controller's (the guest
/// configures its own addresses on a passed-through VF) and is refused rather than ignored.
pub fn add_request(
    pod: &PodId<'_>,
    net: &NetSpec,
    r: &Resolved,
) -> Result<v1::AddRequest, NadError> {
    let bad = |m: String| NadError::Config(r.network.clone(), m);
    let mut v: Value =
        serde_json::from_str(&r.config).map_err(|e| bad(format!("the config is not JSON: {e}")))?;
    if let Some(plugins) = v.get("plugins").and_then(Value::as_array) {
        let mut one = plugins
            .iter()
            .find(|p| p.get("type").and_then(Value::as_str) == Some("vfplug"))
            .cloned()
            .ok_or_else(|| bad("the config list has no plugin of type vfplug".into()))?;
        for k in ["cniVersion", "name"] {
            if let (Some(val), Some(obj)) = (v.get(k).cloned(), one.as_object_mut()) {
                obj.entry(k).or_insert(val);
            }
        }
        v = one;
    }
    if v.get("type").and_then(Value::as_str) != Some("vfplug") {
        return Err(bad("not a vfplug network (type is not \"vfplug\")".into()));
    }
    let bytes = serde_json::to_vec(&v).map_err(|e| bad(e.to_string()))?;
    let conf = NetConf::parse(&bytes, Command::Add).map_err(|e| bad(e.msg.clone()))?;
    if conf.ipam.is_some() {
        return Err(bad(
            "ipam is set: a VM's VF gets its addresses inside the guest; use a network without \
             ipam for a Domain"
                .into(),
        ));
    }
    let qmp = conf
        .qmp_socket
        .clone()
        .or_else(|| pod.qmp_socket.map(str::to_owned))
        .ok_or_else(|| {
            bad(format!(
                "pod {}/{} has no {} annotation and the config no qmpSocket: no VM to attach to",
                pod.namespace,
                pod.name,
                vfplug_agent::QMP_SOCKET_ANNOTATION
            ))
        })?;
    Ok(v1::AddRequest {
        attachment: Some(v1::Attachment {
            container_id: domain_container_id(pod.uid),
            ifname: net.name.clone(),
            pod_uid: pod.uid.to_owned(),
            pod_namespace: pod.namespace.to_owned(),
            pod_name: pod.name.to_owned(),
        }),
        // A Domain's network is named by its NetworkAttachmentDefinition, which a CNI network
        // name (a file name) never looks like: CNI GC of that network cannot take it.
        network: r.network.clone(),
        device_id: conf.device_id.map(|d| d.to_string()).unwrap_or_default(),
        pool: conf
            .pool
            .clone()
            .or_else(|| r.resource.clone())
            .unwrap_or_default(),
        config: Some(vfplug_cni::mapping::vf_config(&conf.vf)),
        qmp_socket: qmp,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(qmp: Option<&'static str>) -> PodId<'static> {
        PodId {
            namespace: "ns",
            name: "vm",
            uid: "u-1",
            qmp_socket: qmp,
        }
    }

    fn net() -> NetSpec {
        NetSpec {
            name: "net1".into(),
            network: "sriov-a".into(),
            config: None,
        }
    }

    fn resolved(config: &str) -> Resolved {
        Resolved {
            network: "ns/sriov-a".into(),
            config: config.into(),
            resource: Some("vfplug.io/vf-a".into()),
        }
    }

    #[test]
    fn a_vfplug_config_becomes_the_add_the_cni_plugin_would_send() {
        let r = resolved(
            r#"{"cniVersion":"1.0.0","name":"a","type":"vfplug","vlan":100,"mac":"02:00:00:00:00:01"}"#,
        );
        let req = add_request(&pod(Some("qmp/m.sock")), &net(), &r).expect("valid");
        let att = req.attachment.as_ref().expect("attachment");
        assert_eq!(att.container_id, "vfplug-domain-u-1");
        assert_eq!(att.ifname, "net1");
        assert_eq!(req.network, "ns/sriov-a");
        assert_eq!(req.pool, "vfplug.io/vf-a");
        assert_eq!(req.qmp_socket, "qmp/m.sock");
        let c = req.config.expect("config");
        assert_eq!(c.vlan, Some(100));
        assert_eq!(c.mac.as_deref(), Some("02:00:00:00:00:01"));
    }

    #[test]
    fn config_lists_other_plugins_ipam_and_missing_vm_are_refused_by_name() {
        let list = resolved(
            r#"{"cniVersion":"1.0.0","name":"a","plugins":[{"type":"tuning"},{"type":"vfplug","pool":"p"}]}"#,
        );
        let req = add_request(&pod(Some("q/s")), &net(), &list).expect("list");
        assert_eq!(req.pool, "p");
        let err = |c: &str, p: PodId<'static>| {
            add_request(&p, &net(), &resolved(c))
                .expect_err("refused")
                .to_string()
        };
        assert!(
            err(
                r#"{"cniVersion":"1.0.0","name":"a","type":"bridge"}"#,
                pod(Some("q/s"))
            )
            .contains("not a vfplug network")
        );
        assert!(
            err(
                r#"{"cniVersion":"1.0.0","name":"a","type":"vfplug","ipam":{"type":"host-local"}}"#,
                pod(Some("q/s"))
            )
            .contains("ipam")
        );
        assert!(
            err(
                r#"{"cniVersion":"1.0.0","name":"a","type":"vfplug"}"#,
                pod(None)
            )
            .contains("qmp-socket")
        );
        assert!(err("{", pod(Some("q/s"))).contains("not JSON"));
    }
}
