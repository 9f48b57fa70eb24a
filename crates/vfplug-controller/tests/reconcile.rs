//! One reconcile ([`Ctx::reconcile`]) against kube's real client over a mocked service
//! (`tower_test::mock::pair`): a task plays the API server, checking every request's method and
//! path (and body where it matters) against a script and answering as the API server would; a
//! request the script does not name fails the test. The node is a fake [`NodePort`] holding a
//! VM's records (`vfplug_core::records`) and attachments, recording the attaches and releases
//! asked of it and answering them from a script.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use common::{NAME, NS, QMP, UID, Vf, view};
use futures::StreamExt as _;
use futures::stream::BoxStream;
use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::client::Body;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher;
use serde_json::{Value, json};
use vfplug_agent::{NodeError, Released};
use vfplug_api::v1;
use vfplug_controller::plan::{self, NodeView, domain_container_id};
use vfplug_controller::port::{Holder, NodePort};
use vfplug_controller::reconcile::{Ctx, MANAGER, Next, ReconcileError, domain_facts};
use vfplug_core::{Phase, PodRef};
use vfplug_crd::Domain;
use vfplug_executor::{ErrorKind, ExecError};

const NODE: &str = "node-a";
const OLD: &str = "uid-0";
const PCI_A: &str = "0000:3b:02.0";
const PCI_B: &str = "0000:3b:02.1";
const DOMAINS: &str = "/apis/vfplug.io/v1alpha1/namespaces/ns/domains";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/ns/events";

// ---------------------------------------------------------------------------------------------
// The node: a fake NodePort.

#[derive(Debug)]
enum Call {
    Attach(Box<v1::AddRequest>),
    Release(String, String),
}

/// A scripted answer of the node, and the view of a pod UID after it.
#[derive(Debug)]
struct Scripted<T> {
    outcome: Result<T, NodeError>,
    then: Option<(String, NodeView)>,
}

#[derive(Debug, Default)]
struct State {
    views: BTreeMap<String, NodeView>,
    holders: Vec<Holder>,
    calls: Vec<Call>,
    attaches: VecDeque<Scripted<v1::AddResponse>>,
    releases: VecDeque<Scripted<Released>>,
}

#[derive(Clone, Debug, Default)]
struct Fake(Arc<Mutex<State>>);

impl Fake {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap()
    }

    /// The node holds `view` for the pod `uid`: its managed nets under the controller's
    /// container ID, its CNI nets under a sandbox's.
    fn holding(self, uid: &str, v: NodeView) -> Self {
        {
            let mut s = self.lock();
            let pod = PodRef::new(NS, NAME, uid);
            for n in v.managed.keys() {
                s.holders.push(Holder {
                    pod: pod.clone(),
                    container_id: domain_container_id(uid),
                    ifname: n.clone(),
                });
            }
            for n in &v.cni {
                s.holders.push(Holder {
                    pod: pod.clone(),
                    container_id: format!("sandbox-{uid}"),
                    ifname: n.clone(),
                });
            }
            s.views.insert(uid.to_owned(), v);
        }
        self
    }

    fn attach_answers(self, outcome: Result<v1::AddResponse, NodeError>, then: NodeView) -> Self {
        self.lock().attaches.push_back(Scripted {
            outcome,
            then: Some((UID.to_owned(), then)),
        });
        self
    }

    fn release_answers(
        self,
        outcome: Result<Released, NodeError>,
        then: Option<(&str, NodeView)>,
    ) -> Self {
        self.lock().releases.push_back(Scripted {
            outcome,
            then: then.map(|(u, v)| (u.to_owned(), v)),
        });
        self
    }

    fn attaches(&self) -> Vec<v1::AddRequest> {
        self.lock()
            .calls
            .iter()
            .filter_map(|c| match c {
                Call::Attach(r) => Some((**r).clone()),
                Call::Release(..) => None,
            })
            .collect()
    }

    fn releases(&self) -> Vec<(String, String)> {
        self.lock()
            .calls
            .iter()
            .filter_map(|c| match c {
                Call::Release(c, i) => Some((c.clone(), i.clone())),
                Call::Attach(_) => None,
            })
            .collect()
    }
}

impl NodePort for Fake {
    fn view(&self, uid: &str) -> NodeView {
        self.lock().views.get(uid).cloned().unwrap_or_default()
    }

    fn holders(&self) -> Vec<Holder> {
        self.lock().holders.clone()
    }

    async fn attach(&self, req: v1::AddRequest) -> Result<v1::AddResponse, NodeError> {
        let mut s = self.lock();
        s.calls.push(Call::Attach(Box::new(req.clone())));
        let step = s
            .attaches
            .pop_front()
            .unwrap_or_else(|| panic!("an attach the test did not expect: {req:?}"));
        if let Some((uid, v)) = step.then {
            s.views.insert(uid, v);
        }
        step.outcome
    }

    async fn release(&self, container_id: &str, ifname: &str) -> Result<Released, NodeError> {
        let mut s = self.lock();
        s.calls
            .push(Call::Release(container_id.to_owned(), ifname.to_owned()));
        let step = s.releases.pop_front().unwrap_or_else(|| {
            panic!("a release the test did not expect: {container_id} {ifname}")
        });
        if let Ok(r) = &step.outcome
            && (r.released || r.quarantined)
        {
            // The attachment ends: gone from the holders and its pod's view.
            let at = s
                .holders
                .iter()
                .position(|h| h.container_id == container_id && h.ifname == ifname)
                .expect("released what the node does not hold");
            let h = s.holders.remove(at);
            if let Some(v) = s.views.get_mut(&h.pod.uid) {
                v.managed.remove(ifname);
                v.cni.remove(ifname);
                if let Some(r) = &mut v.records {
                    r.nets.retain(|n| n.name != ifname);
                    r.hostdevs.retain(|d| d.parent_net != ifname);
                    if r.nets.is_empty() {
                        v.records = None;
                    }
                }
            }
        }
        if let Some((uid, v)) = step.then {
            s.views.insert(uid, v);
        }
        step.outcome
    }

    fn changes(&self) -> BoxStream<'static, ()> {
        futures::stream::pending().boxed()
    }
}

fn released(pci: &str) -> Released {
    Released {
        pci: Some(pci.parse().unwrap()),
        released: true,
        quarantined: false,
        note: "back in its pool".into(),
    }
}

fn try_again(msg: &str) -> NodeError {
    NodeError::from(ExecError::new(ErrorKind::TryAgain, msg))
}

// ---------------------------------------------------------------------------------------------
// The API server: a script of expected requests over tower-test's mock.

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// A request as the API server saw it.
#[derive(Debug)]
struct Seen {
    method: Method,
    path: String,
    query: BTreeMap<String, String>,
    content_type: String,
    body: Value,
}

type Answer = Box<dyn FnOnce(&Seen) -> (StatusCode, Value) + Send>;

struct Step {
    method: Method,
    path: String,
    answer: Answer,
}

fn expect(
    method: Method,
    path: impl Into<String>,
    answer: impl FnOnce(&Seen) -> (StatusCode, Value) + Send + 'static,
) -> Step {
    Step {
        method,
        path: path.into(),
        answer: Box::new(answer),
    }
}

/// An Event of the Domain with this reason (and type), created; answered as created.
fn event(reason: &'static str, type_: &'static str) -> Step {
    expect(Method::POST, EVENTS, move |s| {
        let b = &s.body;
        assert_eq!(b["apiVersion"], "events.k8s.io/v1", "{b}");
        assert_eq!(b["reason"], reason, "{b}");
        assert_eq!(b["type"], type_, "{b}");
        assert_eq!(b["regarding"]["kind"], "Domain", "{b}");
        assert_eq!(b["regarding"]["name"], NAME, "{b}");
        assert_eq!(b["regarding"]["namespace"], NS, "{b}");
        assert_eq!(b["reportingController"], MANAGER, "{b}");
        assert_eq!(b["reportingInstance"], NODE, "{b}");
        (StatusCode::CREATED, b.clone())
    })
}

fn status_error(code: u16, reason: &str, message: &str) -> (StatusCode, Value) {
    (
        StatusCode::from_u16(code).unwrap(),
        json!({
            "apiVersion": "v1", "kind": "Status", "metadata": {},
            "status": "Failure", "message": message, "reason": reason, "code": code,
        }),
    )
}

async fn read(req: Request<Body>) -> Seen {
    let (parts, body) = req.into_parts();
    let bytes = body.collect_bytes().await.expect("request body");
    let query = parts
        .uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_owned(), v.to_owned())
        })
        .collect();
    Seen {
        method: parts.method,
        path: parts.uri.path().to_owned(),
        query,
        content_type: parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default(),
        body: if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("a JSON body")
        },
    }
}

/// Answers requests by `steps` until `stop`; any other request fails the test.
async fn serve(
    mut handle: Handle,
    steps: Vec<Step>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> (Handle, Vec<Seen>) {
    let mut steps: VecDeque<Step> = steps.into();
    let mut seen = Vec::new();
    loop {
        tokio::select! {
            biased;
            r = handle.next_request() => {
                let Some((req, send)) = r else { break };
                let s = read(req).await;
                let Some(step) = steps.pop_front() else {
                    panic!(
                        "a request the script does not have: {} {} {:?} {}",
                        s.method, s.path, s.query, s.body
                    );
                };
                assert_eq!(
                    (&s.method, s.path.as_str()),
                    (&step.method, step.path.as_str()),
                    "request {} (body {})",
                    seen.len() + 1,
                    s.body
                );
                let (code, body) = (step.answer)(&s);
                send.send_response(
                    Response::builder()
                        .status(code)
                        .header(http::header::CONTENT_TYPE, "application/json")
                        .body(Body::from(serde_json::to_vec(&body).unwrap()))
                        .unwrap(),
                );
                seen.push(s);
            }
            _ = &mut stop => break,
        }
    }
    let left: Vec<String> = steps
        .iter()
        .map(|s| format!("{} {}", s.method, s.path))
        .collect();
    assert!(
        left.is_empty(),
        "requests the script expected never came: {left:?}"
    );
    (handle, seen)
}

/// The API server and the node, and the caches the reconcile reads.
struct Harness {
    handle: Option<Handle>,
    ctx: Ctx<Fake>,
    port: Fake,
}

impl Harness {
    fn new(port: Fake, pods: Vec<Pod>, domains: Vec<Domain>) -> Self {
        let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(svc, "default");
        let mut pw: Writer<Pod> = Writer::default();
        for p in pods {
            pw.apply_watcher_event(&watcher::Event::Apply(p));
        }
        let mut dw: Writer<Domain> = Writer::default();
        for d in domains {
            dw.apply_watcher_event(&watcher::Event::Apply(d));
        }
        let ctx = Ctx {
            client: client.clone(),
            node: NODE.into(),
            port: port.clone(),
            pods: pw.as_reader(),
            domains: dw.as_reader(),
            reporter: Reporter {
                controller: MANAGER.into(),
                instance: Some(NODE.into()),
            },
        };
        Self {
            handle: Some(handle),
            ctx,
            port,
        }
    }

    /// One reconcile of `ns/vm`, the API server answering by `steps` and nothing else.
    async fn round(&mut self, steps: Vec<Step>) -> (Result<Next, ReconcileError>, Vec<Seen>) {
        let handle = self.handle.take().expect("a handle");
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let server = tokio::spawn(serve(handle, steps, stopped));
        let out = tokio::time::timeout(Duration::from_secs(10), self.ctx.reconcile(NS, NAME))
            .await
            .expect("the reconcile hung (a request nobody answered?)");
        // Every request of the round has had its answer: whatever comes now is not the round's.
        let _ = stop.send(());
        let (handle, seen) = match server.await {
            Ok(r) => r,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        self.handle = Some(handle);
        (out, seen)
    }
}

// ---------------------------------------------------------------------------------------------
// The objects, as the watches would have them (JSON, through serde, like the API server's).

fn pod(uid: &str, qmp: bool, phase: &str) -> Pod {
    let annotations = if qmp {
        json!({ (vfplug_agent::QMP_SOCKET_ANNOTATION): QMP })
    } else {
        json!({})
    };
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "namespace": NS, "name": NAME, "uid": uid, "resourceVersion": "7",
            "annotations": annotations,
        },
        "spec": { "nodeName": NODE, "containers": [{ "name": "compute", "image": "vm" }] },
        "status": { "phase": phase },
    }))
    .unwrap()
}

/// The Domain of the pod `owner` wanting the nets `nets` (name, NetworkAttachmentDefinition),
/// with the finalizer, at resourceVersion 100.
fn domain_json(owner: &str, nets: &[(&str, &str)]) -> Value {
    json!({
        "apiVersion": "vfplug.io/v1alpha1", "kind": "Domain",
        "metadata": {
            "namespace": NS, "name": NAME, "uid": "dom-uid", "resourceVersion": "100",
            "generation": 1,
            "labels": { "vfplug.io/node": NODE },
            "finalizers": ["vfplug.io/release"],
            "ownerReferences": [{
                "apiVersion": "v1", "kind": "Pod", "name": NAME, "uid": owner,
                "controller": true, "blockOwnerDeletion": false,
            }],
        },
        "spec": {
            "nets": nets.iter().map(|(n, w)| json!({ "name": n, "network": w })).collect::<Vec<_>>(),
        },
    })
}

fn domain(v: &Value) -> Domain {
    serde_json::from_value(v.clone()).unwrap()
}

/// `d` with the status the controller would have written for the node's view `v` at `at`,
/// through JSON as the watch would bring it back.
fn with_status(d: &Value, v: &NodeView, at: i64) -> Value {
    let facts = domain_facts(&domain(d));
    let s = plan::status(&facts, v, &[], &Time(Timestamp::from_second(at).unwrap()));
    let mut d = d.clone();
    d["status"] = serde_json::to_value(&s).unwrap();
    d
}

fn cond<'a>(status: &'a Value, kind: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == kind)
        .unwrap_or_else(|| panic!("no {kind} condition in {status}"))
}

/// The status apply: its query and body, answered with the Domain carrying the new status.
fn status_apply(d: &Value, check: impl FnOnce(&Value) + Send + 'static) -> Step {
    let d = d.clone();
    expect(
        Method::PATCH,
        format!("{DOMAINS}/{NAME}/status"),
        move |s| {
            assert_eq!(
                s.query.get("fieldManager").map(String::as_str),
                Some(MANAGER)
            );
            assert_eq!(s.query.get("force").map(String::as_str), Some("true"));
            assert_eq!(s.content_type, "application/apply-patch+yaml");
            let b = &s.body;
            assert_eq!(b["apiVersion"], "vfplug.io/v1alpha1", "{b}");
            assert_eq!(b["kind"], "Domain", "{b}");
            let keys: Vec<&String> = b.as_object().unwrap().keys().collect();
            assert_eq!(
                keys,
                ["apiVersion", "kind", "status"],
                "the status apply owns the status only"
            );
            check(&b["status"]);
            let mut out = d;
            out["status"] = b["status"].clone();
            out["metadata"]["resourceVersion"] = json!("101");
            (StatusCode::OK, out)
        },
    )
}

const ATTACHED_A: &[Vf<'static>] = &[("net1", PCI_A, Phase::Attached)];

// ---------------------------------------------------------------------------------------------

/// (a) A VM pod without a Domain: exactly one POST of its Domain, owned by the pod (its UID),
/// labelled with the node, holding the finalizer. Nothing asked of the node.
#[tokio::test]
async fn a_vm_pod_without_a_domain_gets_one() {
    for (what, p, port) in [
        (
            "by its annotation",
            pod(UID, true, "Running"),
            Fake::default(),
        ),
        (
            "by its records alone",
            pod(UID, false, "Running"),
            Fake::default().holding(UID, view(UID, ATTACHED_A, &[], &["net1"])),
        ),
    ] {
        let mut h = Harness::new(port, vec![p], vec![]);
        let (out, seen) = h
            .round(vec![expect(Method::POST, DOMAINS, |s| {
                let b = &s.body;
                assert_eq!(b["apiVersion"], "vfplug.io/v1alpha1");
                assert_eq!(b["kind"], "Domain");
                let m = &b["metadata"];
                assert_eq!(m["name"], NAME);
                assert_eq!(m["namespace"], NS);
                assert_eq!(m["labels"], json!({ "vfplug.io/node": NODE }));
                assert_eq!(m["finalizers"], json!(["vfplug.io/release"]));
                assert_eq!(
                    m["ownerReferences"],
                    json!([{
                        "apiVersion": "v1", "kind": "Pod", "name": NAME, "uid": UID,
                        "controller": true, "blockOwnerDeletion": false,
                    }])
                );
                assert_eq!(b["spec"], json!({}), "an empty spec: the user fills it");
                assert!(b.get("status").is_none_or(Value::is_null), "{b}");
                let mut out = b.clone();
                out["metadata"]["uid"] = json!("dom-uid");
                out["metadata"]["resourceVersion"] = json!("100");
                (StatusCode::CREATED, out)
            })])
            .await;
        assert_eq!(out.unwrap(), Next::Idle, "{what}");
        assert_eq!(seen.len(), 1, "{what}");
        assert!(h.port.lock().calls.is_empty(), "{what}");
    }

    // The watch has not shown the Domain yet and it exists: no error, nothing else.
    let mut h = Harness::new(Fake::default(), vec![pod(UID, true, "Running")], vec![]);
    let (out, _) = h
        .round(vec![expect(Method::POST, DOMAINS, |_| {
            status_error(
                409,
                "AlreadyExists",
                "domains.vfplug.io \"vm\" already exists",
            )
        })])
        .await;
    assert_eq!(out.unwrap(), Next::Idle);

    // A container pod: nothing at all.
    let mut h = Harness::new(
        Fake::default().holding(UID, view(UID, &[], &[], &["net1"])),
        vec![pod(UID, false, "Running")],
        vec![],
    );
    let (out, seen) = h.round(vec![]).await;
    assert_eq!(out.unwrap(), Next::Idle);
    assert!(seen.is_empty());
}

/// (b) At rest: a Domain whose status is already what the node says costs no request at all,
/// and asks nothing of the node.
#[tokio::test]
async fn a_domain_in_step_with_the_node_costs_no_request() {
    let v = view(
        UID,
        &[
            ("net1", PCI_A, Phase::Attached),
            ("net2", PCI_B, Phase::Attached),
        ],
        &["net2"],
        &["net1"],
    );
    let d = with_status(&domain_json(UID, &[("net2", "sriov-net2")]), &v, 1_000);
    let mut h = Harness::new(
        Fake::default().holding(UID, v),
        vec![pod(UID, true, "Running")],
        vec![domain(&d)],
    );
    for _ in 0..3 {
        let (out, seen) = h.round(vec![]).await;
        assert_eq!(out.unwrap(), Next::Idle);
        assert!(seen.is_empty());
    }
    assert!(h.port.lock().calls.is_empty());
}

/// (c) The node's records changed: exactly one status apply (SSA, our field manager, forced,
/// status only), and one Attached Event per VF that went in, each naming its own VF.
#[tokio::test]
async fn changed_records_are_applied_once_with_an_event_per_vf() {
    let before = view(
        UID,
        &[
            ("net1", PCI_A, Phase::Attaching),
            ("net2", PCI_B, Phase::Attaching),
        ],
        &["net2"],
        &["net1"],
    );
    let now = view(
        UID,
        &[
            ("net1", PCI_A, Phase::Attached),
            ("net2", PCI_B, Phase::Attached),
        ],
        &["net2"],
        &["net1"],
    );
    let d = with_status(&domain_json(UID, &[("net2", "sriov-net2")]), &before, 1_000);
    let synced_since = cond(&d["status"], "Synced")["lastTransitionTime"].clone();
    let mut h = Harness::new(
        Fake::default().holding(UID, now),
        vec![pod(UID, true, "Running")],
        vec![domain(&d)],
    );
    let (out, seen) = h
        .round(vec![
            status_apply(&d, move |s| {
                assert_eq!(s["phase"], "attached", "{s}");
                assert_eq!(
                    (s["netCount"].clone(), s["hostdevCount"].clone()),
                    (json!(2), json!(2))
                );
                assert_eq!(s["hostdevs"][0]["phase"], "attached");
                assert_eq!(s["hostdevs"][0]["pciAddress"], PCI_A);
                assert_eq!(s["observedGeneration"], 1);
                let ready = cond(s, "Ready");
                assert_eq!(
                    (ready["status"].clone(), ready["reason"].clone()),
                    (json!("True"), json!("InGuest"))
                );
                let synced = cond(s, "Synced");
                assert_eq!(synced["status"], "True");
                assert_eq!(
                    synced["lastTransitionTime"], synced_since,
                    "Synced did not change: its transition time stays"
                );
            }),
            event("Attached", "Normal"),
            event("Attached", "Normal"),
        ])
        .await;
    assert_eq!(out.unwrap(), Next::Idle);
    let notes: Vec<&str> = seen[1..]
        .iter()
        .map(|s| s.body["note"].as_str().unwrap())
        .collect();
    assert!(
        notes[0].contains(PCI_A) && notes[0].contains("net1"),
        "{notes:?}"
    );
    assert!(
        notes[1].contains(PCI_B) && notes[1].contains("net2"),
        "{notes:?}"
    );
    assert!(
        h.port.lock().calls.is_empty(),
        "nothing to attach or detach"
    );
}

fn nad(name: &str, resource: &str, config: &str) -> Value {
    json!({
        "apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
        "metadata": {
            "namespace": NS, "name": name, "resourceVersion": "3",
            "annotations": { "k8s.v1.cni.cncf.io/resourceName": resource },
        },
        "spec": { "config": config },
    })
}

const NAD_PATH: &str = "/apis/k8s.cni.cncf.io/v1/namespaces/ns/network-attachment-definitions";

/// (d) A net added to the spec: one GET of its NetworkAttachmentDefinition, then the node's
/// attach under the controller's container ID, with the pool of the NAD's resourceName and the
/// pod's QMP socket; the status shows it, with its Event.
#[tokio::test]
async fn a_net_added_to_the_spec_is_attached_from_its_nad() {
    let before = view(UID, ATTACHED_A, &[], &["net1"]);
    let after = view(
        UID,
        &[
            ("net1", PCI_A, Phase::Attached),
            ("net2", PCI_B, Phase::Attached),
        ],
        &["net2"],
        &["net1"],
    );
    let d = with_status(&domain_json(UID, &[("net2", "sriov-net2")]), &before, 1_000);
    let port = Fake::default().holding(UID, before).attach_answers(
        Ok(v1::AddResponse {
            pci_address: PCI_B.into(),
            mode: "vfio".into(),
            ifname: "net2".into(),
            pool: "vfplug.io/vf-b".into(),
            ..Default::default()
        }),
        after,
    );
    let mut h = Harness::new(port, vec![pod(UID, true, "Running")], vec![domain(&d)]);
    let (out, _) = h
        .round(vec![
            expect(Method::GET, format!("{NAD_PATH}/sriov-net2"), |_| {
                (
                    StatusCode::OK,
                    nad(
                        "sriov-net2",
                        "vfplug.io/vf-b",
                        r#"{"cniVersion":"1.0.0","name":"sriov-net2","type":"vfplug","vlan":200}"#,
                    ),
                )
            }),
            status_apply(&d, |s| {
                assert_eq!(s["netCount"], 2);
                assert_eq!(cond(s, "Ready")["status"], "True", "{s}");
                assert_eq!(cond(s, "Synced")["status"], "True", "{s}");
            }),
            event("Attached", "Normal"),
        ])
        .await;
    assert_eq!(out.unwrap(), Next::Idle);
    let attaches = h.port.attaches();
    assert_eq!(attaches.len(), 1);
    let req = &attaches[0];
    let a = req.attachment.as_ref().unwrap();
    assert_eq!(a.container_id, format!("vfplug-domain-{UID}"));
    assert_eq!(
        (
            a.ifname.as_str(),
            a.pod_uid.as_str(),
            a.pod_namespace.as_str(),
            a.pod_name.as_str()
        ),
        ("net2", UID, NS, NAME)
    );
    assert_eq!(
        req.pool, "vfplug.io/vf-b",
        "the pool is the NAD's resourceName"
    );
    assert_eq!(req.qmp_socket, QMP, "the VM is the pod's QMP socket");
    assert_eq!(req.network, "ns/sriov-net2");
    assert_eq!(req.config.as_ref().unwrap().vlan, Some(200));
    assert!(h.port.releases().is_empty());
}

/// (d) A net whose NetworkAttachmentDefinition does not exist: nothing attached; Synced=False
/// naming it, one warning Event; looked at again later.
#[tokio::test]
async fn a_net_whose_nad_is_missing_is_not_attached_and_says_so() {
    let before = view(UID, ATTACHED_A, &[], &["net1"]);
    let d = with_status(&domain_json(UID, &[("net2", "sriov-net2")]), &before, 1_000);
    let mut h = Harness::new(
        Fake::default().holding(UID, before),
        vec![pod(UID, true, "Running")],
        vec![domain(&d)],
    );
    let (out, seen) = h
        .round(vec![
            expect(Method::GET, format!("{NAD_PATH}/sriov-net2"), |_| {
                status_error(
                    404,
                    "NotFound",
                    "network-attachment-definitions.k8s.cni.cncf.io \"sriov-net2\" not found",
                )
            }),
            status_apply(&d, |s| {
                let synced = cond(s, "Synced");
                assert_eq!(synced["status"], "False", "{s}");
                assert_eq!(synced["reason"], "Attach", "{s}");
                assert_eq!(
                    synced["message"],
                    "net2: NetworkAttachmentDefinition ns/sriov-net2: \
                     network-attachment-definitions.k8s.cni.cncf.io \"sriov-net2\" not found",
                    "the API server's message, not kube's dump of its Status"
                );
                assert_eq!(cond(s, "Ready")["status"], "False", "{s}");
            }),
            event("AttachFailed", "Warning"),
        ])
        .await;
    assert!(
        matches!(out.unwrap(), Next::After(d) if !d.is_zero()),
        "tried again later"
    );
    assert!(
        seen[2].body["note"]
            .as_str()
            .unwrap()
            .contains("sriov-net2")
    );
    assert!(h.port.attaches().is_empty(), "no attach without a config");

    // The retry fails the same way: the GET again, but no status write and no Event.
    let d2 = {
        let mut d2 = d.clone();
        d2["status"] = seen[1].body["status"].clone();
        d2
    };
    let mut h = Harness::new(
        Fake::default().holding(UID, view(UID, ATTACHED_A, &[], &["net1"])),
        vec![pod(UID, true, "Running")],
        vec![domain(&d2)],
    );
    let (out, _) = h
        .round(vec![expect(
            Method::GET,
            format!("{NAD_PATH}/sriov-net2"),
            |_| {
                status_error(
                    404,
                    "NotFound",
                    "network-attachment-definitions.k8s.cni.cncf.io \"sriov-net2\" not found",
                )
            },
        )])
        .await;
    assert!(matches!(out.unwrap(), Next::After(d) if !d.is_zero()));
}

/// (e) A managed net removed from the spec: the node releases `(vfplug-domain-<uid>, name)`;
/// the guest has not let go yet: no error, the status shows the unplug pending.
#[tokio::test]
async fn a_net_removed_from_the_spec_is_detached() {
    let before = view(
        UID,
        &[
            ("net1", PCI_A, Phase::Attached),
            ("net2", PCI_B, Phase::Attached),
        ],
        &["net2"],
        &["net1"],
    );
    let unplugging = view(
        UID,
        &[
            ("net1", PCI_A, Phase::Attached),
            ("net2", PCI_B, Phase::UnplugPending),
        ],
        &["net2"],
        &["net1"],
    );
    let d = with_status(&domain_json(UID, &[]), &before, 1_000);
    let port = Fake::default().holding(UID, before).release_answers(
        Ok(Released {
            pci: Some(PCI_B.parse().unwrap()),
            released: false,
            quarantined: false,
            note: "device_del sent; waiting for the guest".into(),
        }),
        Some((UID, unplugging)),
    );
    let mut h = Harness::new(port, vec![pod(UID, true, "Running")], vec![domain(&d)]);
    let (out, seen) = h
        .round(vec![
            status_apply(&d, |s| {
                assert_eq!(s["phase"], "unplugPending", "{s}");
                assert_eq!(s["hostdevs"][1]["phase"], "unplugPending", "{s}");
                assert_eq!(
                    cond(s, "Synced")["status"],
                    "True",
                    "a pending unplug is no error"
                );
                let ready = cond(s, "Ready");
                assert_eq!(
                    (ready["status"].clone(), ready["reason"].clone()),
                    (json!("False"), json!("Settling"))
                );
            }),
            event("Detaching", "Normal"),
        ])
        .await;
    assert_eq!(
        out.unwrap(),
        Next::Idle,
        "the guest's DEVICE_DELETED brings the next round"
    );
    assert!(seen[1].body["note"].as_str().unwrap().contains(PCI_B));
    assert_eq!(
        h.port.releases(),
        vec![(format!("vfplug-domain-{UID}"), "net2".to_owned())],
        "the managed net only: the CNI net stays"
    );

    // The node cannot yet (try again later): Synced=False Pending, no Event, looked at again.
    let before = view(UID, &[("net2", PCI_B, Phase::Attached)], &["net2"], &[]);
    let d = with_status(&domain_json(UID, &[]), &before, 1_000);
    let port = Fake::default()
        .holding(UID, before)
        .release_answers(Err(try_again("QEMU is not answering")), None);
    let mut h = Harness::new(port, vec![pod(UID, true, "Running")], vec![domain(&d)]);
    let (out, _) = h
        .round(vec![status_apply(&d, |s| {
            let synced = cond(s, "Synced");
            assert_eq!(
                (synced["status"].clone(), synced["reason"].clone()),
                (json!("False"), json!("Pending"))
            );
            assert!(
                synced["message"]
                    .as_str()
                    .unwrap()
                    .contains("QEMU is not answering")
            );
        })])
        .await;
    assert!(matches!(out.unwrap(), Next::After(d) if !d.is_zero()));
    assert_eq!(h.port.releases().len(), 1);
}

/// (f) The pod is gone: every attachment of its UID is released (nobody else's), with an
/// Event each; then, the node holding nothing of it, the Domain is deleted and our finalizer
/// removed, compare-and-swap on the resourceVersion, others' finalizers kept.
#[tokio::test]
async fn a_gone_pods_vfs_are_released_then_its_domain_goes() {
    let held = view(
        OLD,
        &[
            ("net1", PCI_A, Phase::Attached),
            ("net2", PCI_B, Phase::Attached),
        ],
        &["net2"],
        &["net1"],
    );
    let mut d = with_status(&domain_json(OLD, &[("net2", "sriov-net2")]), &held, 1_000);
    d["metadata"]["finalizers"] = json!(["vfplug.io/release", "example.com/keep"]);
    let port = Fake::default()
        .holding(OLD, held)
        .holding("someone-else", view("someone-else", &[], &[], &["eth1"]))
        .release_answers(Ok(released(PCI_B)), None)
        .release_answers(Ok(released(PCI_A)), None);
    let mut h = Harness::new(port, vec![], vec![domain(&d)]);

    let (out, seen) = h
        .round(vec![
            event("Released", "Normal"),
            event("Released", "Normal"),
        ])
        .await;
    assert_eq!(
        out.unwrap(),
        Next::After(Duration::ZERO),
        "all released: another round at once, to finish"
    );
    let mut released = h.port.releases();
    released.sort();
    assert_eq!(
        released,
        vec![
            (format!("sandbox-{OLD}"), "net1".to_owned()),
            (format!("vfplug-domain-{OLD}"), "net2".to_owned()),
        ],
        "every holder of the old UID, nobody else's"
    );
    let mut notes: Vec<&str> = seen
        .iter()
        .map(|s| s.body["note"].as_str().unwrap())
        .collect();
    notes.sort_unstable();
    assert!(
        notes[0].contains("net1") && notes[0].contains(PCI_A),
        "{notes:?}"
    );
    assert!(
        notes[1].contains("net2") && notes[1].contains(PCI_B),
        "{notes:?}"
    );

    // The node holds nothing more of it: DELETE, then the finalizer off.
    let d2 = d.clone();
    let (out, _) = h
        .round(vec![
            expect(Method::DELETE, format!("{DOMAINS}/{NAME}"), move |_| {
                // The API server marks it deleted (it has finalizers): a new resourceVersion.
                let mut out = d2;
                out["metadata"]["deletionTimestamp"] = json!("2026-12-03T19:00:00Z");
                out["metadata"]["resourceVersion"] = json!("101");
                (StatusCode::OK, out)
            }),
            expect(Method::PATCH, format!("{DOMAINS}/{NAME}"), |s| {
                assert_eq!(s.content_type, "application/merge-patch+json");
                let m = &s.body["metadata"];
                assert_eq!(m["finalizers"], json!(["example.com/keep"]), "only ours goes");
                if m["resourceVersion"] != "101" {
                    // As the API server answers a stale compare-and-swap.
                    return status_error(
                        409,
                        "Conflict",
                        "Operation cannot be fulfilled on domains.vfplug.io \"vm\": the object has been modified",
                    );
                }
                let mut out = s.body.clone();
                out["apiVersion"] = json!("vfplug.io/v1alpha1");
                out["kind"] = json!("Domain");
                out["metadata"]["name"] = json!(NAME);
                out["spec"] = json!({});
                (StatusCode::OK, out)
            }),
        ])
        .await;
    assert_eq!(out.unwrap(), Next::Idle);
    assert_eq!(h.port.releases().len(), 2, "nothing more released");
    assert_eq!(h.port.holders().len(), 1, "someone else's attachment stays");
}

/// (f) A release the node has not finished: no finish yet, looked at again soon.
#[tokio::test]
async fn a_gone_pods_release_not_finished_is_retried_before_the_domain_goes() {
    let held = view(OLD, &[], &["net2"], &[]);
    let d = domain_json(OLD, &[]);
    let port = Fake::default().holding(OLD, held).release_answers(
        Err(NodeError::from(ExecError::new(
            ErrorKind::Busy,
            "the VF is busy",
        ))),
        None,
    );
    let mut h = Harness::new(
        port,
        vec![pod("uid-new", true, "Running")],
        vec![domain(&d)],
    );
    let (out, seen) = h.round(vec![]).await;
    assert!(matches!(out.unwrap(), Next::After(d) if !d.is_zero()));
    assert!(
        seen.is_empty(),
        "no Event for what did not happen, no finish"
    );
    assert_eq!(
        h.port.releases(),
        vec![(format!("vfplug-domain-{OLD}"), "net2".to_owned())],
        "the old UID's, not the new pod's"
    );
}

/// (g) The API server fails the status apply: the reconcile fails (the queue backs off), and
/// records no Event for a status it could not write.
#[tokio::test]
async fn an_api_error_on_the_status_fails_the_reconcile() {
    let before = view(UID, &[("net1", PCI_A, Phase::Attaching)], &[], &["net1"]);
    let d = with_status(&domain_json(UID, &[]), &before, 1_000);
    let mut h = Harness::new(
        Fake::default().holding(UID, view(UID, ATTACHED_A, &[], &["net1"])),
        vec![pod(UID, true, "Running")],
        vec![domain(&d)],
    );
    let (out, _) = h
        .round(vec![expect(
            Method::PATCH,
            format!("{DOMAINS}/{NAME}/status"),
            |_| status_error(500, "InternalError", "etcdserver: request timed out"),
        )])
        .await;
    let e = out.expect_err("the status could not be written");
    let ReconcileError::Api { what, source } = &e;
    assert_eq!(what, "writing the status");
    assert!(
        matches!(source, kube::Error::Api(s) if s.code == 500),
        "{e}"
    );
}

/// The finalizer taken off by someone: put back with one merge patch (then the status as usual).
#[tokio::test]
async fn a_missing_finalizer_is_put_back() {
    let v = view(UID, ATTACHED_A, &[], &["net1"]);
    let mut d = with_status(&domain_json(UID, &[]), &v, 1_000);
    d["metadata"]["finalizers"] = json!(["example.com/keep"]);
    let d2 = d.clone();
    let mut h = Harness::new(
        Fake::default().holding(UID, v),
        vec![pod(UID, true, "Running")],
        vec![domain(&d)],
    );
    let (out, _) = h
        .round(vec![expect(
            Method::PATCH,
            format!("{DOMAINS}/{NAME}"),
            move |s| {
                assert_eq!(s.content_type, "application/merge-patch+json");
                assert_eq!(
                    s.body["metadata"]["finalizers"],
                    json!(["example.com/keep", "vfplug.io/release"])
                );
                assert_eq!(
                    s.body["metadata"]["resourceVersion"], "100",
                    "the list is replaced whole: compare-and-swap, or another's finalizer \
                     added meanwhile is lost"
                );
                let mut out = d2;
                out["metadata"]["finalizers"] = s.body["metadata"]["finalizers"].clone();
                (StatusCode::OK, out)
            },
        )])
        .await;
    assert_eq!(out.unwrap(), Next::Idle);
}

/// The user deletes the Domain of a running VM: its managed nets are detached (not the CNI
/// ones), no status is written to a Domain on its way out, and once they are gone our
/// finalizer comes off (no second DELETE), compare-and-swap on the cached resourceVersion.
#[tokio::test]
async fn a_domain_deleted_under_a_live_vm_detaches_its_nets_then_lets_go() {
    let v = view(
        UID,
        &[
            ("net1", PCI_A, Phase::Attached),
            ("net2", PCI_B, Phase::Attached),
        ],
        &["net2"],
        &["net1"],
    );
    let mut d = with_status(&domain_json(UID, &[("net2", "sriov-net2")]), &v, 1_000);
    d["metadata"]["deletionTimestamp"] = json!("2026-12-03T19:00:00Z");
    let port = Fake::default()
        .holding(UID, v)
        .release_answers(Ok(released(PCI_B)), None);
    let mut h = Harness::new(port, vec![pod(UID, true, "Running")], vec![domain(&d)]);

    let (out, seen) = h.round(vec![]).await;
    assert_eq!(out.unwrap(), Next::Idle);
    assert!(seen.is_empty(), "no status for a Domain being deleted");
    assert_eq!(
        h.port.releases(),
        vec![(format!("vfplug-domain-{UID}"), "net2".to_owned())]
    );

    let (out, _) = h
        .round(vec![expect(
            Method::PATCH,
            format!("{DOMAINS}/{NAME}"),
            |s| {
                assert_eq!(s.content_type, "application/merge-patch+json");
                assert_eq!(
                    s.body["metadata"],
                    json!({ "finalizers": [], "resourceVersion": "100" })
                );
                let mut out = s.body.clone();
                out["apiVersion"] = json!("vfplug.io/v1alpha1");
                out["kind"] = json!("Domain");
                out["metadata"]["name"] = json!(NAME);
                out["spec"] = json!({});
                (StatusCode::OK, out)
            },
        )])
        .await;
    assert_eq!(out.unwrap(), Next::Idle);
    assert_eq!(h.port.releases().len(), 1, "the CNI net stays with the pod");
    assert_eq!(h.port.view(UID).cni.len(), 1);
}

/// A gone pod's VF that cannot be restored is quarantined by the node: a warning Event saying
/// so, and nothing left to retry (another round at once finishes the Domain).
#[tokio::test]
async fn a_gone_pods_vf_quarantined_is_a_warning() {
    let held = view(OLD, &[("net2", PCI_B, Phase::Attached)], &["net2"], &[]);
    let d = with_status(&domain_json(OLD, &[("net2", "sriov-net2")]), &held, 1_000);
    let port = Fake::default().holding(OLD, held).release_answers(
        Ok(Released {
            pci: Some(PCI_B.parse().unwrap()),
            released: false,
            quarantined: true,
            note: "the VF's MAC could not be restored: quarantined".into(),
        }),
        None,
    );
    let mut h = Harness::new(port, vec![], vec![domain(&d)]);
    let (out, seen) = h.round(vec![event("Quarantined", "Warning")]).await;
    assert_eq!(
        out.unwrap(),
        Next::After(Duration::ZERO),
        "to finish at once"
    );
    assert_eq!(
        seen[0].body["note"],
        "net2: the VF's MAC could not be restored: quarantined"
    );
    assert!(!h.port.view(OLD).holds_any());
}
