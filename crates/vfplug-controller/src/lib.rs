//! # vfplug-controller
//!
//! vfplugd's Domain controller: the Kubernetes adapter that gives every VM pod on the node a
//! `Domain` (`vfplug.io/v1alpha1`, crate vfplug-crd) showing the VM's nets and hostdevs, attaches
//! and detaches the VF networks its spec asks for, and releases everything of pods that are gone.
//! The user's guide is `docs/domain.md`.
//!
//! Start at [`plan`]: the decisions, pure (facts in, steps out). [`reconcile`] carries one VM's
//! plan out against the API server and the node; [`run`] is the loop (two watches, a ledger
//! change stream, a keyed queue). [`port`] is what the controller needs of vfplugd
//! ([`port::NodePort`], real: [`port::AgentPort`] over vfplug-agent's in-process node API, so
//! an attach by the controller is validated and carried out exactly as a CNI ADD is). [`nad`]
//! turns a NetworkAttachmentDefinition into that ADD; [`client`] builds the kube client with
//! every request counted.
//!
//! Everything the controller reads comes from its watch caches; it writes only when something
//! changed (a Domain to create, a status that differs, a finalizer), so a node at rest costs the
//! API server two watches and nothing more.

pub mod client;
pub mod nad;
pub mod plan;
pub mod port;
pub mod reconcile;
pub mod run;

pub use client::{ClientError, Metrics, client};
pub use port::{AgentPort, NodePort};
pub use run::{Options, run};
