//! The controller's loop: two watches (this node's pods, this node's Domains) fill their caches
//! and the node API's [`PodIndex`]; every pod or Domain event, and every ledger change that
//! touches a VM, queues that VM's key; a small queue runs one reconcile per key at a time, with
//! backoff for those that failed.
//!
//! The key is the VM's namespace and name, not an object: a VM's pod or Domain may each be
//! missing (a pod deleted while vfplugd was down leaves a Domain; a new VM pod has none yet),
//! and kube-runtime's `Controller` skips a key whose main object is gone.
//!
//! A pod gone while vfplugd was down whose VFs are held but that never had a Domain is found
//! by a sweep over the ledger's holders once the pod watch has listed, confirmed with one GET of
//! the pod by name, and released.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, debug, info, info_span, warn};
use vfplug_agent::{PodEntry, PodIndex};
use vfplug_crd::Domain;

use crate::plan::NODE_LABEL;
use crate::port::NodePort;
use crate::reconcile::{Ctx, Next};

/// A unit of work.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Key {
    /// The VM `namespace/name`.
    Vm(String, String),
    /// Look for gone pods whose VFs are still held.
    Sweep,
}

/// Keys due at a time; one run per key at once; a key queued while it runs runs again after.
#[derive(Debug, Default)]
struct Queue {
    due: HashMap<Key, Instant>,
    running: HashSet<Key>,
    again: HashSet<Key>,
    failures: HashMap<Key, u32>,
}

impl Queue {
    fn push(&mut self, key: Key, at: Instant) {
        if self.running.contains(&key) {
            self.again.insert(key);
            return;
        }
        let t = self.due.entry(key).or_insert(at);
        *t = (*t).min(at);
    }

    fn next_due(&self) -> Option<Instant> {
        self.due.values().min().copied()
    }

    fn pop(&mut self, now: Instant) -> Option<Key> {
        let key = self
            .due
            .iter()
            .filter(|(_, t)| **t <= now)
            .min_by_key(|(_, t)| **t)
            .map(|(k, _)| k.clone())?;
        self.due.remove(&key);
        self.running.insert(key.clone());
        Some(key)
    }

    /// The run of `key` ended: `Ok(next)` or failed.
    fn done(&mut self, key: Key, outcome: Result<Next, ()>, now: Instant) {
        self.running.remove(&key);
        let at = match outcome {
            Ok(next) => {
                self.failures.remove(&key);
                match next {
                    Next::Idle => None,
                    Next::After(d) => Some(now + d),
                }
            }
            Err(()) => {
                let n = self.failures.entry(key.clone()).or_default();
                *n = n.saturating_add(1);
                // 1 s, 2 s, 4 s ... 5 min.
                let secs = 1u64 << (*n - 1).min(8);
                Some(now + Duration::from_secs(secs.min(300)))
            }
        };
        if self.again.remove(&key) {
            self.push(key, now);
        } else if let Some(at) = at {
            self.push(key, at);
        }
    }
}

/// How the controller runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// This node's name (the pod watch's field selector, the Domains' label).
    pub node: String,
    /// Reconciles at once (keys are independent; each key runs alone).
    pub concurrency: usize,
}

fn pod_entry(p: &Pod) -> PodEntry {
    PodEntry {
        namespace: p.namespace().unwrap_or_default(),
        name: p.name_any(),
        qmp_socket: p
            .annotations()
            .get(vfplug_agent::QMP_SOCKET_ANNOTATION)
            .cloned(),
    }
}

fn vm_key<K: ResourceExt>(o: &K) -> Key {
    Key::Vm(o.namespace().unwrap_or_default(), o.name_any())
}

/// Runs the controller until `cancel`. `synced` turns true once both watches have listed.
pub async fn run<P: NodePort>(
    client: Client,
    opts: Options,
    port: P,
    index: Arc<PodIndex>,
    cancel: CancellationToken,
    synced: tokio::sync::watch::Sender<bool>,
) {
    let mut pod_writer: Writer<Pod> = Writer::default();
    let mut dom_writer: Writer<Domain> = Writer::default();
    let pods_api: Api<Pod> = Api::all(client.clone());
    let doms_api: Api<Domain> = Api::all(client.clone());
    let node_sel = format!("spec.nodeName={}", opts.node);
    let mut pod_events = watcher::watcher(
        pods_api.clone(),
        watcher::Config::default().fields(&node_sel),
    )
    .default_backoff()
    .boxed();
    let mut dom_events = watcher::watcher(
        doms_api,
        watcher::Config::default().labels(&format!("{NODE_LABEL}={}", opts.node)),
    )
    .default_backoff()
    .boxed();
    let mut ledger = port.changes();
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        node: opts.node.clone(),
        port,
        pods: pod_writer.as_reader(),
        domains: dom_writer.as_reader(),
        reporter: Reporter {
            controller: crate::reconcile::MANAGER.into(),
            instance: Some(opts.node.clone()),
        },
    });
    let mut queue = Queue::default();
    let mut running: JoinSet<(Key, Result<Next, ()>)> = JoinSet::new();
    let (mut pods_synced, mut doms_synced) = (false, false);
    let mut init_pods: Vec<(String, PodEntry)> = Vec::new();
    // What each VM's view was at the last ledger change, to queue only VMs it touched.
    let mut last_views: BTreeMap<String, crate::plan::NodeView> = BTreeMap::new();
    info!(node = %opts.node, "Domain controller starting its watches");

    loop {
        let now = Instant::now();
        while running.len() < opts.concurrency.max(1) {
            let Some(key) = queue.pop(now) else { break };
            let ctx = Arc::clone(&ctx);
            let pods_api = pods_api.clone();
            let span = info_span!("reconcile", key = ?key);
            running.spawn(
                async move {
                    let out = match &key {
                        Key::Vm(ns, name) => ctx.reconcile(ns, name).await.map_err(|e| {
                            warn!(namespace = %ns, name = %name, error = %e, "reconcile failed; retrying with backoff");
                        }),
                        Key::Sweep => sweep(&ctx, &pods_api).await.map(|()| Next::Idle),
                    };
                    (key, out)
                }
                .instrument(span),
            );
        }
        let wake = queue.next_due().unwrap_or(now + Duration::from_secs(3600));
        tokio::select! {
            () = cancel.cancelled() => break,
            Some(done) = running.join_next(), if !running.is_empty() => match done {
                Ok((key, out)) => queue.done(key, out, Instant::now()),
                Err(e) => warn!(error = %e, "a reconcile task ended abnormally"),
            },
            ev = pod_events.next() => match ev {
                Some(Ok(ev)) => {
                    pod_writer.apply_watcher_event(&ev);
                    match &ev {
                        Event::Init => init_pods.clear(),
                        Event::InitApply(p) => {
                            init_pods.push((p.uid().unwrap_or_default(), pod_entry(p)));
                            queue.push(vm_key(p), now);
                        }
                        Event::InitDone => {
                            index.replace(init_pods.drain(..));
                            if !pods_synced {
                                info!(pods = ctx.pods.len(), "pod watch listed this node's pods");
                            }
                            pods_synced = true;
                            // Pods that went while the watch was away: Domains and holders.
                            for d in ctx.domains.state() {
                                queue.push(vm_key(d.as_ref()), now);
                            }
                            queue.push(Key::Sweep, now);
                        }
                        Event::Apply(p) => {
                            index.upsert(&p.uid().unwrap_or_default(), pod_entry(p));
                            queue.push(vm_key(p), now);
                        }
                        Event::Delete(p) => {
                            index.remove(&p.uid().unwrap_or_default());
                            queue.push(vm_key(p), now);
                            queue.push(Key::Sweep, now + Duration::from_secs(1));
                        }
                    }
                }
                Some(Err(e)) => warn!(error = %e, "pod watch failed; it retries with backoff"),
                None => break,
            },
            ev = dom_events.next() => match ev {
                Some(Ok(ev)) => {
                    dom_writer.apply_watcher_event(&ev);
                    match &ev {
                        Event::InitApply(d) | Event::Apply(d) | Event::Delete(d) => queue.push(vm_key(d), now),
                        Event::InitDone => {
                            if !doms_synced {
                                info!(domains = ctx.domains.len(), "Domain watch listed this node's Domains");
                            }
                            doms_synced = true;
                        }
                        Event::Init => {}
                    }
                }
                Some(Err(e)) => warn!(error = %e, "Domain watch failed (is the CRD installed?); it retries with backoff"),
                None => break,
            },
            Some(()) = ledger.next() => {
                for key in touched(&ctx, &mut last_views) {
                    queue.push(key, now);
                }
            },
            () = tokio::time::sleep_until(wake) => {},
        }
        if pods_synced && doms_synced && !*synced.borrow() {
            // send_replace: the value is set even when nobody holds a receiver (else this
            // branch, and its log line, would run on every turn of the loop).
            synced.send_replace(true);
            info!("Domain controller synced");
        }
    }
    running.shutdown().await;
    info!("Domain controller stopped");
}

/// The pods holding VFs on the node, by UID, with their namespace and name (empty when the
/// runtime did not pass them).
fn holder_names<P: NodePort>(port: &P) -> BTreeMap<String, (String, String)> {
    port.holders()
        .into_iter()
        .filter(|h| !h.pod.uid.is_empty())
        .map(|h| (h.pod.uid, (h.pod.namespace, h.pod.name)))
        .collect()
}

/// The VMs whose view changed since the last ledger change.
fn touched<P: NodePort>(
    ctx: &Ctx<P>,
    last: &mut BTreeMap<String, crate::plan::NodeView>,
) -> Vec<Key> {
    let mut names = holder_names(&ctx.port);
    for uid in last.keys() {
        if !names.contains_key(uid) {
            // Gone from the ledger: its last holder had the name.
            names.insert(uid.clone(), (String::new(), String::new()));
        }
    }
    let mut keys = Vec::new();
    let mut next = BTreeMap::new();
    for (uid, (ns, name)) in names {
        let view = ctx.port.view(&uid);
        let changed = last.get(&uid) != Some(&view);
        let (ns, name) = if name.is_empty() {
            // Find the name from the caches (pod or Domain of that UID).
            ctx.pods
                .find(|p| p.uid().as_deref() == Some(uid.as_str()))
                .map(|p| (p.namespace().unwrap_or_default(), p.name_any()))
                .or_else(|| {
                    ctx.domains
                        .find(|d| {
                            crate::reconcile::domain_facts(d).pod_uid.as_deref()
                                == Some(uid.as_str())
                        })
                        .map(|d| (d.namespace().unwrap_or_default(), d.name_any()))
                })
                .unwrap_or_default()
        } else {
            (ns, name)
        };
        if changed && !name.is_empty() {
            keys.push(Key::Vm(ns, name));
        }
        if view.holds_any() {
            next.insert(uid, view);
        }
    }
    *last = next;
    keys
}

/// Releases what the node holds for pods that are gone and have no Domain to carry it.
async fn sweep<P: NodePort>(ctx: &Ctx<P>, pods: &Api<Pod>) -> Result<(), ()> {
    let by_uid = holder_names(&ctx.port);
    let mut failed = false;
    for (uid, (ns, name)) in by_uid {
        if ctx
            .pods
            .find(|p| p.uid().as_deref() == Some(uid.as_str()))
            .is_some()
            || ctx
                .domains
                .find(|d| {
                    crate::reconcile::domain_facts(d).pod_uid.as_deref() == Some(uid.as_str())
                })
                .is_some()
        {
            continue;
        }
        if ns.is_empty() || name.is_empty() {
            debug!(pod_uid = %uid, "holder without a pod name: left to its CNI DEL or GC");
            continue;
        }
        // The watch does not show it; the API server decides.
        let gone = match Api::<Pod>::namespaced(pods.clone().into_client(), &ns)
            .get_opt(&name)
            .await
        {
            Ok(None) => true,
            Ok(Some(p)) => p.uid().as_deref() != Some(uid.as_str()),
            Err(e) => {
                warn!(pod = %format!("{ns}/{name}"), error = %e, "cannot tell whether a pod is gone");
                failed = true;
                continue;
            }
        };
        if gone {
            info!(pod = %format!("{ns}/{name}"), pod_uid = %uid, "pod is gone but holds VFs: releasing them");
            // The same release as a Domain's gone pod gets; what is left (a failure, an unplug
            // still pending) brings the sweep back.
            if ctx.release_pod(&uid, None).await > 0 {
                failed = true;
            }
        }
    }
    if failed { Err(()) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_runs_alone_and_again_when_queued_meanwhile_and_backs_off_on_failure() {
        let mut q = Queue::default();
        let t0 = Instant::now();
        let k = Key::Vm("ns".into(), "vm".into());
        q.push(k.clone(), t0);
        q.push(k.clone(), t0 + Duration::from_secs(5));
        assert_eq!(q.pop(t0), Some(k.clone()));
        assert_eq!(q.pop(t0), None, "one run per key");
        q.push(k.clone(), t0);
        assert_eq!(q.pop(t0), None, "queued while running: waits");
        q.done(k.clone(), Ok(Next::Idle), t0);
        assert_eq!(q.pop(t0), Some(k.clone()), "runs again after");
        q.done(k.clone(), Err(()), t0);
        assert_eq!(q.next_due(), Some(t0 + Duration::from_secs(1)));
        assert_eq!(q.pop(t0 + Duration::from_secs(1)), Some(k.clone()));
        q.done(k.clone(), Err(()), t0);
        assert_eq!(q.next_due(), Some(t0 + Duration::from_secs(2)), "doubles");
        assert_eq!(q.pop(t0 + Duration::from_secs(2)), Some(k.clone()));
        q.done(k.clone(), Ok(Next::Idle), t0);
        assert_eq!(q.next_due(), None, "settled: nothing due");
    }
}
