//! What the controller needs of vfplugd, behind a trait ([`NodePort`]) so the reconcile runs
//! against a fake in tests; [`AgentPort`] is the real one, over vfplug-agent's in-process node
//! API (the same validation, sagas and error codes a CNI call gets).

use std::future::Future;

use futures::StreamExt as _;
use futures::stream::BoxStream;
use vfplug_agent::{NodeError, NodeHandle, Released};
use vfplug_api::v1;
use vfplug_core::PodRef;
use vfplug_core::records::VmFilter;

use crate::plan::{NodeView, domain_container_id};

/// One attachment the node holds: whose, and its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    /// The pod (namespace and name may be empty for an older runtime's attachment).
    pub pod: PodRef,
    /// The attachment's container ID.
    pub container_id: String,
    /// Its interface name.
    pub ifname: String,
}

/// vfplugd, as the controller sees it.
pub trait NodePort: Send + Sync + 'static {
    /// What the node holds for the pod `uid`.
    fn view(&self, uid: &str) -> NodeView;
    /// Every attachment the node holds.
    fn holders(&self) -> Vec<Holder>;
    /// Attach (a CNI ADD in process).
    fn attach(
        &self,
        req: v1::AddRequest,
    ) -> impl Future<Output = Result<v1::AddResponse, NodeError>> + Send;
    /// End the attachment (a CNI DEL in process).
    fn release(
        &self,
        container_id: &str,
        ifname: &str,
    ) -> impl Future<Output = Result<Released, NodeError>> + Send;
    /// Yields whenever the ledger changed.
    fn changes(&self) -> BoxStream<'static, ()>;
}

/// [`NodePort`] over vfplugd's agent.
#[derive(Clone, Debug)]
pub struct AgentPort(pub NodeHandle);

impl NodePort for AgentPort {
    fn view(&self, uid: &str) -> NodeView {
        let records = self
            .0
            .vm_records(&VmFilter {
                pod_uid: uid.to_owned(),
                ..Default::default()
            })
            .into_iter()
            .next();
        let mine = domain_container_id(uid);
        let mut view = NodeView {
            records,
            ..Default::default()
        };
        for a in self.0.attachments() {
            if a.owner.pod.uid != uid {
                continue;
            }
            if a.owner.container_id == mine {
                view.managed.insert(a.owner.ifname, a.network);
            } else {
                view.cni.insert(a.owner.ifname);
            }
        }
        view
    }

    fn holders(&self) -> Vec<Holder> {
        self.0
            .attachments()
            .into_iter()
            .map(|a| Holder {
                pod: a.owner.pod,
                container_id: a.owner.container_id,
                ifname: a.owner.ifname,
            })
            .collect()
    }

    async fn attach(&self, req: v1::AddRequest) -> Result<v1::AddResponse, NodeError> {
        self.0.add(req).await
    }

    async fn release(&self, container_id: &str, ifname: &str) -> Result<Released, NodeError> {
        self.0.release(container_id, ifname).await
    }

    fn changes(&self) -> BoxStream<'static, ()> {
        let rx = self.0.ledger_changes();
        futures::stream::unfold(rx, |mut rx| async move {
            rx.changed().await.ok()?;
            Some(((), rx))
        })
        // Fused: the loop may poll it again after the journal closed.
        .fuse()
        .boxed()
    }
}
