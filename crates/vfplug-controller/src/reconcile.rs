//! One reconcile of one VM: gather the [`Facts`] (the two watch caches and the node), [`plan`],
//! carry the plan out (API writes, attaches and detaches through the node), then write the status
//! only if it changed and record the Events the change is worth.
//!
//! Reads come from the watch caches, so a reconcile that finds nothing to do makes no request:
//! at rest the controller costs the API server its two watches and nothing else.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, info, warn};
use vfplug_api::CniCode;
use vfplug_crd::{Domain, DomainSpec};

use crate::nad::{self, PodId};
use crate::plan::{
    self, DomainFacts, FINALIZER, Facts, NODE_LABEL, NetError, Note, PodFacts, domain_container_id,
};
use crate::port::NodePort;

/// How long a net whose config is wrong (its NetworkAttachmentDefinition missing, say) waits
/// before it is tried again.
pub const CONFIG_RETRY: Duration = Duration::from_secs(60);

/// The field manager of everything the controller writes.
pub const MANAGER: &str = "vfplug-controller";

/// A reconcile's failure: the API server said no, or could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// A request to the API server failed.
    #[error("{what}: {source}")]
    Api {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: kube::Error,
    },
}

fn api(what: impl Into<String>) -> impl FnOnce(kube::Error) -> ReconcileError {
    let what = what.into();
    move |source| ReconcileError::Api { what, source }
}

/// Whether an API error is "not found" (the object went away meanwhile: nothing to do).
fn not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// What a reconcile asks of the queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Settled: wait for a watch event or a ledger change.
    Idle,
    /// Look again after this long (an attach that failed, a release not finished).
    After(Duration),
}

/// Everything a reconcile reads and writes through.
pub struct Ctx<P> {
    /// The API server.
    pub client: Client,
    /// This node's name.
    pub node: String,
    /// vfplugd.
    pub port: P,
    /// The pods of this node (watch cache).
    pub pods: Store<Pod>,
    /// The Domains of this node (watch cache).
    pub domains: Store<Domain>,
    /// Who records the Events (the controller, on this node).
    pub reporter: Reporter,
}

impl<P> std::fmt::Debug for Ctx<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// The facts of a pod.
pub fn pod_facts(pod: &Pod) -> PodFacts {
    PodFacts {
        uid: pod.uid().unwrap_or_default(),
        qmp_socket: pod
            .annotations()
            .get(vfplug_agent::QMP_SOCKET_ANNOTATION)
            .cloned(),
        // A VM pod being deleted is done (PodFacts::done): its spec nets must not be attached
        // again while its QEMU stops (the demo saw a dying VM's net re-attached as an owed
        // hot-plug).
        deleting: pod.metadata.deletion_timestamp.is_some(),
        ended: pod
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|p| p == "Succeeded" || p == "Failed"),
    }
}

/// The facts of a Domain.
pub fn domain_facts(d: &Domain) -> DomainFacts {
    DomainFacts {
        pod_uid: d
            .owner_references()
            .iter()
            .find(|o| o.kind == "Pod" && o.api_version == "v1")
            .map(|o| o.uid.clone()),
        generation: d.metadata.generation,
        spec: d.spec.clone(),
        status: d.status.clone(),
        has_finalizer: d.finalizers().iter().any(|f| f == FINALIZER),
        deleting: d.metadata.deletion_timestamp.is_some(),
    }
}

fn now() -> Time {
    Time(Timestamp::now())
}

impl<P: NodePort> Ctx<P> {
    /// The facts of the VM `namespace/name`.
    pub fn facts(
        &self,
        namespace: &str,
        name: &str,
    ) -> (Facts, Option<Arc<Pod>>, Option<Arc<Domain>>) {
        let pod = self.pods.get(&ObjectRef::new(name).within(namespace));
        let dom = self.domains.get(&ObjectRef::new(name).within(namespace));
        let pf = pod.as_deref().map(pod_facts);
        let df = dom.as_deref().map(domain_facts);
        let live = pf
            .as_ref()
            .map(|p| self.port.view(&p.uid))
            .unwrap_or_default();
        let gone = match (&df, &pf) {
            (
                Some(DomainFacts {
                    pod_uid: Some(u), ..
                }),
                p,
            ) if p.as_ref().is_none_or(|p| p.uid != *u) => self.port.view(u),
            _ => Default::default(),
        };
        (
            Facts {
                pod: pf,
                domain: df,
                live,
                gone,
            },
            pod,
            dom,
        )
    }

    /// Reconciles the VM `namespace/name`.
    pub async fn reconcile(&self, namespace: &str, name: &str) -> Result<Next, ReconcileError> {
        let (facts, pod, dom) = self.facts(namespace, name);
        let p = plan::plan(&facts);
        if p == plan::Plan::default() {
            return Ok(Next::Idle);
        }
        debug!(namespace, name, plan = ?p, "reconcile");
        let domains: Api<Domain> = Api::namespaced(self.client.clone(), namespace);
        let mut next = Next::Idle;

        if p.create_domain
            && let Some(pod) = &pod
        {
            self.create_domain(&domains, pod).await?;
            return Ok(Next::Idle);
        }
        if let Some(uid) = &p.release {
            // Another round either way: to finish once nothing is left, or to try again.
            let left = self.release_pod(uid, dom.as_deref()).await;
            next = Next::After(Duration::from_secs(if left > 0 { 2 } else { 0 }));
        }
        if p.finish
            && let Some(d) = &dom
        {
            self.finish(&domains, d).await?;
            return Ok(next);
        }
        let (Some(d), Some(df)) = (&dom, &facts.domain) else {
            return Ok(next);
        };
        if p.add_finalizer {
            let mut fins = d.finalizers().to_vec();
            fins.push(FINALIZER.to_owned());
            // A merge patch replaces the whole list: compare-and-swap on the resourceVersion, as
            // when the finalizer goes, so one someone else added meanwhile is not dropped (409,
            // and the next round sees it).
            domains
                .patch(
                    name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {
                        "finalizers": fins,
                        "resourceVersion": d.resource_version(),
                    }})),
                )
                .await
                .map_err(api("adding the finalizer"))?;
        }

        let mut errors: Vec<NetError> = p
            .refused
            .iter()
            .map(|(n, why)| NetError {
                name: n.clone(),
                reason: "Refused",
                message: why.clone(),
            })
            .collect();
        let uid = facts
            .pod
            .as_ref()
            .map(|p| p.uid.clone())
            .unwrap_or_default();
        for ifname in &p.detach {
            if let Some(e) = self.detach(d, &uid, ifname).await {
                errors.push(e);
            }
        }
        // Errors that may clear by themselves (QEMU not answering, the pool empty, the API
        // server) are retried soon; a config error (a NAD missing, a bad config) only slowly:
        // the NAD is not watched, so this retry is how its creation is noticed.
        let mut soon = errors.iter().any(|e| e.reason != "Refused");
        let mut slow = false;
        if let Some(pod) = &pod {
            for net in &p.attach {
                if let Some((e, transient)) = self.attach(pod, net).await {
                    soon |= transient;
                    slow |= !transient;
                    errors.push(e);
                }
            }
        }
        if soon {
            next = Next::After(Duration::from_secs(5));
        } else if slow {
            next = Next::After(CONFIG_RETRY);
        }

        if p.write_status && !df.deleting {
            let view = self.port.view(&uid);
            let status = plan::status(df, &view, &errors, &now());
            let notes = plan::events(df.status.as_ref(), &status, &errors);
            if df.status.as_ref() != Some(&status) {
                domains
                    .patch_status(
                        name,
                        &PatchParams::apply(MANAGER).force(),
                        &Patch::Apply(json!({
                            "apiVersion": "vfplug.io/v1alpha1",
                            "kind": "Domain",
                            "status": status,
                        })),
                    )
                    .await
                    .map_err(api("writing the status"))?;
                info!(
                    namespace, name,
                    phase = ?status.phase, nets = status.net_count, hostdevs = status.hostdev_count,
                    "Domain status written"
                );
            }
            self.publish(d, &notes).await;
        }
        Ok(next)
    }

    async fn create_domain(&self, domains: &Api<Domain>, pod: &Pod) -> Result<(), ReconcileError> {
        let name = pod.name_any();
        let mut d = Domain::new(&name, DomainSpec::default());
        d.metadata.namespace = pod.namespace();
        d.metadata.labels = Some(BTreeMap::from([(NODE_LABEL.to_owned(), self.node.clone())]));
        d.metadata.finalizers = Some(vec![FINALIZER.to_owned()]);
        d.metadata.owner_references = Some(vec![OwnerReference {
            api_version: "v1".into(),
            kind: "Pod".into(),
            name: name.clone(),
            uid: pod.uid().unwrap_or_default(),
            controller: Some(true),
            block_owner_deletion: Some(false),
        }]);
        match domains.create(&PostParams::default(), &d).await {
            Ok(_) => {
                info!(namespace = ?pod.namespace(), name, "Domain created for a VM pod");
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(e) => Err(api("creating the Domain")(e)),
        }
    }

    /// Releases every attachment of the pod `uid`; returns how many are left.
    pub(crate) async fn release_pod(&self, uid: &str, dom: Option<&Domain>) -> usize {
        let mine: Vec<_> = self
            .port
            .holders()
            .into_iter()
            .filter(|h| h.pod.uid == uid)
            .collect();
        let mut left = 0;
        for h in mine {
            match self.port.release(&h.container_id, &h.ifname).await {
                Ok(r) if r.released => {
                    info!(pod_uid = uid, ifname = %h.ifname, pci = %r.pci.map(|p| p.to_string()).unwrap_or_default(), "VF of a gone pod released");
                    if let Some(d) = dom {
                        self.publish(
                            d,
                            &[Note {
                                warning: false,
                                reason: "Released",
                                message: format!(
                                    "{}: VF {} back in its pool (pod gone)",
                                    h.ifname,
                                    r.pci.map(|p| p.to_string()).unwrap_or_default()
                                ),
                            }],
                        )
                        .await;
                    }
                }
                Ok(r) if r.quarantined => {
                    warn!(pod_uid = uid, ifname = %h.ifname, note = %r.note, "VF of a gone pod quarantined");
                    if let Some(d) = dom {
                        self.publish(
                            d,
                            &[Note {
                                warning: true,
                                reason: "Quarantined",
                                message: format!("{}: {}", h.ifname, r.note),
                            }],
                        )
                        .await;
                    }
                }
                Ok(r) => {
                    left += 1;
                    debug!(pod_uid = uid, ifname = %h.ifname, note = %r.note, "release pending");
                }
                Err(e) => {
                    left += 1;
                    warn!(pod_uid = uid, ifname = %h.ifname, error = %e, "release of a gone pod's VF failed; retrying");
                }
            }
        }
        left
    }

    /// The pod is gone and the node holds nothing of it: the Domain goes.
    async fn finish(&self, domains: &Api<Domain>, d: &Domain) -> Result<(), ReconcileError> {
        let name = d.name_any();
        let mut current = d.clone();
        if d.metadata.deletion_timestamp.is_none() {
            match domains.delete(&name, &DeleteParams::background()).await {
                // Held by the finalizer: the delete changed its resourceVersion.
                Ok(either::Either::Left(now)) => current = now,
                Ok(either::Either::Right(_)) => return Ok(()),
                Err(e) if not_found(&e) => return Ok(()),
                Err(e) => return Err(api("deleting the Domain")(e)),
            }
        }
        let d = &current;
        if d.finalizers().iter().any(|f| f == FINALIZER) {
            let rest: Vec<String> = d
                .finalizers()
                .iter()
                .filter(|f| *f != FINALIZER)
                .cloned()
                .collect();
            // The resourceVersion makes this a compare-and-swap: a finalizer someone else added
            // meanwhile is not dropped (409, and the next round sees it).
            let body = json!({"metadata": {
                "finalizers": rest,
                "resourceVersion": d.resource_version(),
            }});
            match domains
                .patch(&name, &PatchParams::default(), &Patch::Merge(body))
                .await
            {
                Ok(_) => {
                    info!(namespace = ?d.namespace(), name, "every VF released: finalizer removed")
                }
                Err(e) if not_found(&e) => {}
                Err(e) => return Err(api("removing the finalizer")(e)),
            }
        }
        Ok(())
    }

    async fn detach(&self, d: &Domain, uid: &str, ifname: &str) -> Option<NetError> {
        let err = |reason, message| {
            Some(NetError {
                name: ifname.to_owned(),
                reason,
                message,
            })
        };
        match self.port.release(&domain_container_id(uid), ifname).await {
            Ok(r) if r.released => {
                info!(ifname, pci = %r.pci.map(|p| p.to_string()).unwrap_or_default(), "net detached and released");
                None
            }
            Ok(r) if r.quarantined => {
                self.publish(
                    d,
                    &[Note {
                        warning: true,
                        reason: "Quarantined",
                        message: format!("{ifname}: {}", r.note),
                    }],
                )
                .await;
                None
            }
            // Asked of the guest; its DEVICE_DELETED (a ledger change) brings the next round.
            Ok(_) => None,
            Err(e) if e.code() == CniCode::TryAgainLater => err("Pending", e.message().to_owned()),
            Err(e) => err("Detach", e.to_string()),
        }
    }

    /// Attaches `net`; on failure, why and whether trying again soon may help.
    async fn attach(&self, pod: &Pod, net: &vfplug_crd::NetSpec) -> Option<(NetError, bool)> {
        let err = |message, transient| {
            Some((
                NetError {
                    name: net.name.clone(),
                    reason: "Attach",
                    message,
                },
                transient,
            ))
        };
        let ns = pod.namespace().unwrap_or_default();
        let resolved = match nad::resolve(&self.client, &ns, net).await {
            Ok(r) => r,
            Err(e) => return err(e.to_string(), e.transient()),
        };
        let facts = pod_facts(pod);
        let id = PodId {
            namespace: &ns,
            name: &pod.name_any(),
            uid: &facts.uid,
            qmp_socket: facts.qmp_socket.as_deref(),
        };
        let req = match nad::add_request(&id, net, &resolved) {
            Ok(r) => r,
            Err(e) => return err(e.to_string(), false),
        };
        match self.port.attach(req).await {
            Ok(r) => {
                info!(net = %net.name, pci = %r.pci_address, owed = r.attach_pending, "net attached");
                None
            }
            Err(e) => {
                // The node's config errors do not clear by themselves; the rest may (11, busy).
                let config = matches!(
                    e.code(),
                    CniCode::InvalidConfig
                        | CniCode::InvalidEnv
                        | CniCode::NoSuchDevice
                        | CniCode::Decode
                );
                err(e.to_string(), !config)
            }
        }
    }

    /// Records `notes` as Events of the Domain. An Event that cannot be written is logged, never
    /// a reason to fail the round.
    ///
    /// Each note is an Event of its own. kube's [`Recorder`] folds every Event of the same
    /// object, type, reason and action it has sent in the last minutes into a series of the
    /// first (a PATCH that bumps its count and keeps its note), whatever the note says: the
    /// Attached of net2 would show as a second "VF ... (net net1)". The notes are already only
    /// what changed, so nothing is folded: a recorder per note, whose cache is empty.
    pub async fn publish(&self, d: &Domain, notes: &[Note]) {
        let reference = d.object_ref(&());
        for n in notes {
            let recorder = Recorder::new(self.client.clone(), self.reporter.clone());
            let ev = Event {
                type_: if n.warning {
                    EventType::Warning
                } else {
                    EventType::Normal
                },
                reason: n.reason.to_owned(),
                note: Some(n.message.chars().take(1000).collect()),
                action: n.reason.to_owned(),
                secondary: None,
            };
            if let Err(e) = recorder.publish(&ev, &reference).await {
                warn!(reason = n.reason, error = %e, "could not record an Event");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).expect("pod")
    }

    #[test]
    fn a_pod_being_deleted_or_done_gets_nothing_attached() {
        let running =
            json!({"metadata": {"name": "vm", "uid": "u"}, "status": {"phase": "Running"}});
        let facts = pod_facts(&pod(running.clone()));
        assert!(!facts.done(true) && !facts.done(false));
        let mut deleting = running;
        deleting["metadata"]["deletionTimestamp"] = json!("2026-12-03T20:00:00Z");
        let facts = pod_facts(&pod(deleting));
        assert!(
            facts.done(true),
            "a VM pod still Running, but being deleted"
        );
        assert!(
            !facts.done(false),
            "a container pod keeps its VFs through its grace period"
        );
        for phase in ["Succeeded", "Failed"] {
            let p = pod(json!({"metadata": {"name": "vm"}, "status": {"phase": phase}}));
            assert!(pod_facts(&p).done(false), "{phase}");
        }
    }
}
