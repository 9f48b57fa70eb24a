//! The VM sagas against a scripted QMP server over a real unix socket (vfplug-qmp's `testing`):
//! attach into a free root port with QEMU's memlock raised first, the detach proved by
//! `DEVICE_DELETED` (during the wait, or late), the guest's refusal, `device_add` failing, and
//! QEMU's exit finalizing what it had. Fault injection (issue 9): the event before the reply, no
//! event, the guest's error, a disconnect mid-detach, QEMU killed mid-attach, each QMP step of
//! the attach failing, and a reply that never comes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{attach, pci, setup_with, state, token};
use serde_json::{Value, json};
use vfplug_core::ledger::VfState;
use vfplug_core::{PodRef, VmRef};
use vfplug_executor::vm::BoxFuture;
use vfplug_executor::{ExecError, QmpConnector, VmAttached, VmDetach, VmLink, VmPorts};
use vfplug_host::driver::BinderOp;
use vfplug_host::net::VfNetlink;
use vfplug_host::vmpod::{FakeMemlock, MemlockLimit};
use vfplug_qmp::testing::{Script, ServerTask};

const GIB: u64 = 1 << 30;
const QEMU_PID: u32 = 4242;

/// Hands out the scripted connections in order; QEMU "exits" when told.
#[derive(Debug)]
struct Scripted {
    link: Mutex<VecDeque<VmLink>>,
    exited: Mutex<bool>,
    /// After the scripted connections: nobody listens on the socket any more.
    not_running: Mutex<bool>,
    /// "QEMU started": wakes `ready` (the pod volume's change, in vfplugd).
    started: tokio::sync::Notify,
    /// How long each connect takes, and how many were made.
    connect_delay: Mutex<Duration>,
    connects: Mutex<usize>,
}

impl QmpConnector for Scripted {
    fn connect<'a>(&'a self, _vm: &'a VmRef) -> BoxFuture<'a, Result<VmLink, ExecError>> {
        Box::pin(async move {
            *self.connects.lock().unwrap() += 1;
            let delay = *self.connect_delay.lock().unwrap();
            tokio::time::sleep(delay).await;
            let kind = if *self.not_running.lock().unwrap() {
                vfplug_executor::ErrorKind::VmNotRunning
            } else {
                vfplug_executor::ErrorKind::TryAgain
            };
            self.link
                .lock()
                .unwrap()
                .pop_front()
                .ok_or_else(|| ExecError::new(kind, "no QEMU"))
        })
    }

    fn exited<'a>(&'a self, _vm: &'a VmRef, _link: &'a VmLink) -> BoxFuture<'a, bool> {
        Box::pin(async move { *self.exited.lock().unwrap() })
    }

    fn can_wait(&self, _vm: &VmRef) -> Result<(), ExecError> {
        Ok(())
    }

    fn ready<'a>(&'a self, _vm: &'a VmRef) -> BoxFuture<'a, Result<(), ExecError>> {
        Box::pin(async move {
            self.started.notified().await;
            Ok(())
        })
    }
}

fn vm() -> VmRef {
    VmRef {
        pod: PodRef::new("ns", "vm-a", "uid-a"),
        qmp_socket: "/var/lib/kubelet/pods/uid-a/volumes/kubernetes.io~empty-dir/qmp/qmp.sock"
            .into(),
        qmp_spec: "qmp/qmp.sock".into(),
    }
}

fn peripherals(extra: &[&str]) -> Value {
    let mut v = vec![
        json!({"name": "type", "type": "string"}),
        json!({"name": "vfplug-rp1", "type": "child<pcie-root-port>"}),
        json!({"name": "vfplug-rp2", "type": "child<pcie-root-port>"}),
        json!({"name": "disk0", "type": "child<virtio-blk-pci>"}),
    ];
    for e in extra {
        v.push(json!({"name": e, "type": "child<vfio-pci>"}));
    }
    Value::Array(v)
}

/// rp1 is taken by a NIC of the VM's own; rp2 is free.
fn pci_tree() -> Value {
    json!([{"bus": 0, "devices": [
        {"bus": 0, "slot": 2, "function": 0, "class_info": {"class": 1540},
         "id": {"vendor": 6966, "device": 12}, "qdev_id": "vfplug-rp1",
         "pci_bridge": {"bus": {"number": 0, "secondary": 1, "subordinate": 1},
           "devices": [{"bus": 1, "slot": 0, "function": 0, "class_info": {"class": 512},
             "id": {"vendor": 6900, "device": 4161}, "qdev_id": "nic0"}]}},
        {"bus": 0, "slot": 3, "function": 0, "class_info": {"class": 1540},
         "id": {"vendor": 6966, "device": 12}, "qdev_id": "vfplug-rp2",
         "pci_bridge": {"bus": {"number": 0, "secondary": 2, "subordinate": 2}, "devices": []}}]}])
}

/// The attach part of a script: memory size, ports, device_add into rp2, presence check.
fn attach_script(s: Script, host: &str) -> Script {
    s.expect("query-memory-size-summary")
        .ret(json!({"base-memory": 2 * GIB}))
        .expect_args("qom-list", json!({"path": "/machine/peripheral"}))
        .ret(peripherals(&[]))
        .expect("query-pci")
        .ret(pci_tree())
        .expect_args(
            "device_add",
            json!({"driver": "vfio-pci", "id": "vfplug-net1", "bus": "vfplug-rp2", "host": host}),
        )
        .ok()
        .expect_args("qom-list", json!({"path": "/machine/peripheral"}))
        .ret(peripherals(&["vfplug-net1"]))
}

/// A 1 GiB guest's attach up to `device_add`, whose answer the test scripts next.
fn until_device_add() -> Script {
    Script::new()
        .expect("query-memory-size-summary")
        .ret(json!({"base-memory": GIB}))
        .expect("qom-list")
        .ret(peripherals(&[]))
        .expect("query-pci")
        .ret(pci_tree())
        .expect("device_add")
}

struct Vm {
    s: common::Setup,
    memlock: Arc<FakeMemlock>,
    qmp: Arc<Scripted>,
    server: ServerTask,
}

async fn start(script: Script) -> Vm {
    start_with(script, None).await
}

/// [`start`] with QMP calls bounded by `timeout` instead of the client's default.
async fn start_with(script: Script, timeout: Option<Duration>) -> Vm {
    let (mut q, server) = script.connect().await.unwrap();
    if let Some(t) = timeout {
        q.set_default_timeout(t);
    }
    let qmp = Arc::new(Scripted {
        link: Mutex::new(VecDeque::from([VmLink {
            qmp: Arc::new(q),
            pid: Some(QEMU_PID),
        }])),
        exited: Mutex::new(false),
        not_running: Mutex::new(false),
        started: tokio::sync::Notify::new(),
        connect_delay: Mutex::new(Duration::ZERO),
        connects: Mutex::new(0),
    });
    let memlock = Arc::new(FakeMemlock::new([(QEMU_PID, MemlockLimit::both(64 << 20))]));
    let s = setup_with(Some(VmPorts {
        qmp: qmp.clone(),
        memlock: memlock.clone(),
        port_prefix: "vfplug-rp".into(),
        hostdev: vfplug_executor::HostdevModel::VfioPci,
    }));
    Vm {
        s,
        memlock,
        qmp,
        server,
    }
}

async fn wait_state(s: &common::Setup, i: u8, want: fn(&VfState) -> bool) -> VfState {
    for _ in 0..200 {
        let st = state(s, i);
        if want(&st) {
            return st;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("VF {i} never reached the state: {:?}", state(s, i));
}

#[tokio::test]
async fn attach_then_detach_acknowledged_within_the_wait() {
    let host = pci(0).to_string();
    let script = attach_script(Script::new(), &host)
        .expect_args("device_del", json!({"id": "vfplug-net1"}))
        // QEMU may emit the event before the reply (an unpowered slot): the waiter is ready.
        .event(
            "DEVICE_DELETED",
            json!({"device": "vfplug-net1", "path": "/machine/peripheral/vfplug-net1"}),
        )
        .ok();
    let v = start(script).await;
    let t = attach(&v.s, 0).await;
    let a = v.s.exec.vm_attach(pci(0), t, &vm()).await.unwrap();
    assert_eq!(
        a,
        VmAttached {
            alias: "vfplug-net1".into(),
            port: "vfplug-rp2".into()
        }
    );
    match state(&v.s, 0) {
        VfState::Attached { alias, vm: v2, .. } => {
            assert_eq!(alias, "vfplug-net1");
            assert_eq!(v2, vm());
        }
        other => panic!("{other:?}"),
    }
    // Guest RAM + 1 GiB, asked before the device_add.
    assert_eq!(v.memlock.calls(), vec![(QEMU_PID, 3 * GIB)]);

    let d =
        v.s.exec
            .vm_detach(pci(0), t, Duration::from_secs(5))
            .await
            .unwrap();
    let VmDetach::Finalized(f) = d else {
        panic!("{d:?}")
    };
    assert!(f.released, "{f:?}");
    assert_eq!(state(&v.s, 0), VfState::Free);
    // Restored, reset, and its driver left as it was.
    assert_eq!(v.s.pf.read_vf("ens1f1", 0).unwrap().vlan, 0);
    assert_eq!(v.s.binder.ops(), vec![BinderOp::Reset(pci(0))]);
    // The script saw exactly these commands, and nothing more, once the connection closes.
    v.s.exec.close_vms();
    drop(v.s);
    tokio::time::timeout(Duration::from_secs(5), v.server)
        .await
        .expect("the QMP connection was closed")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_late_device_deleted_finishes_a_pending_detach() {
    let host = pci(1).to_string();
    let script = attach_script(Script::new(), &host)
        .expect_args("device_del", json!({"id": "vfplug-net1"}))
        .ok()
        // The guest acknowledges only after the wait ran out.
        .sleep(Duration::from_millis(400))
        .event(
            "DEVICE_DELETED",
            json!({"device": "vfplug-net1", "path": "/machine/peripheral/vfplug-net1"}),
        );
    let v = start(script).await;
    let t = attach(&v.s, 1).await;
    v.s.exec.vm_attach(pci(1), t, &vm()).await.unwrap();
    let d =
        v.s.exec
            .vm_detach(pci(1), t, Duration::from_millis(100))
            .await
            .unwrap();
    assert_eq!(d, VmDetach::Pending);
    // Never earlier: still detaching, still held, settings still applied.
    assert!(matches!(state(&v.s, 1), VfState::Detaching { .. }));
    assert_eq!(v.s.pf.read_vf("ens1f1", 1).unwrap().vlan, 42);
    wait_state(&v.s, 1, |s| *s == VfState::Free).await;
    assert_eq!(v.s.pf.read_vf("ens1f1", 1).unwrap().vlan, 0);
}

#[tokio::test]
async fn the_guest_refusing_keeps_the_device_attached() {
    let host = pci(0).to_string();
    let script = attach_script(Script::new(), &host)
        .expect_args("device_del", json!({"id": "vfplug-net1"}))
        .ok()
        .event(
            "DEVICE_UNPLUG_GUEST_ERROR",
            json!({"device": "vfplug-net1", "path": "/machine/peripheral/vfplug-net1"}),
        );
    let v = start(script).await;
    let t = attach(&v.s, 0).await;
    v.s.exec.vm_attach(pci(0), t, &vm()).await.unwrap();
    let d =
        v.s.exec
            .vm_detach(pci(0), t, Duration::from_secs(5))
            .await
            .unwrap();
    assert_eq!(d, VmDetach::GuestRefused);
    // Attached again, with the refusal on record for the VM's records (guest-error).
    match state(&v.s, 0) {
        VfState::Attached {
            reason: Some(r), ..
        } => assert!(r.contains("DEVICE_UNPLUG_GUEST_ERROR"), "{r}"),
        s => panic!("{s:?}"),
    }
    assert_eq!(token(&v.s, 0), t);
}

#[tokio::test]
async fn a_failed_device_add_leaves_nothing_in_the_guest_and_the_vf_configured() {
    let script = until_device_add().error(
        "GenericError",
        "vfio 0000:5e:01.0: failed to setup container for group 7: Operation not permitted",
    );
    let v = start(script).await;
    let t = attach(&v.s, 0).await;
    let e = v.s.exec.vm_attach(pci(0), t, &vm()).await.unwrap_err();
    assert!(e.msg.contains("device_add"), "{e}");
    assert!(matches!(state(&v.s, 0), VfState::Configured { .. }));
    // The caller's rollback is the one finalize-removal.
    let f =
        v.s.exec
            .finalize_removal(pci(0), t, "attach failed")
            .await
            .unwrap();
    assert!(f.released, "{f:?}");
}

#[tokio::test]
async fn qemus_exit_finalizes_every_vf_it_had() {
    let host = pci(0).to_string();
    let script = attach_script(Script::new(), &host)
        .sleep(Duration::from_millis(100))
        .disconnect();
    let v = start(script).await;
    let t = attach(&v.s, 0).await;
    // QEMU is gone by the time the connection ends.
    *v.qmp.exited.lock().unwrap() = true;
    v.s.exec.vm_attach(pci(0), t, &vm()).await.unwrap();
    wait_state(&v.s, 0, |s| *s == VfState::Free).await;
    assert_eq!(v.s.pf.read_vf("ens1f1", 0).unwrap().vlan, 0);
}

#[tokio::test]
async fn no_free_root_port_is_try_again_and_touches_nothing() {
    let script = Script::new()
        .expect("query-memory-size-summary")
        .ret(json!({"base-memory": GIB}))
        .expect("qom-list")
        .ret(json!([{"name": "vfplug-rp1", "type": "child<pcie-root-port>"}]))
        .expect("query-pci")
        .ret(pci_tree());
    let v = start(script).await;
    let t = attach(&v.s, 0).await;
    let e = v.s.exec.vm_attach(pci(0), t, &vm()).await.unwrap_err();
    assert_eq!(e.kind, vfplug_executor::ErrorKind::TryAgain, "{e}");
    assert!(e.msg.contains("no free hotplug slot"), "{e}");
    assert!(matches!(state(&v.s, 0), VfState::Configured { .. }));
}

/// QEMU's connection drops right after `device_add`: the device may be in the guest, so the VF
/// is never released on a guess — it stays `Attaching`, and the rollback of the ADD cannot free
/// it (a VM step owns it) until a reconnect decides.
#[tokio::test]
async fn a_lost_connection_during_the_attach_never_frees_the_vf() {
    let script = until_device_add().disconnect();
    let v = start(script).await;
    let t = attach(&v.s, 0).await;
    let e = v.s.exec.vm_attach(pci(0), t, &vm()).await.unwrap_err();
    assert_eq!(e.kind, vfplug_executor::ErrorKind::TryAgain, "{e}");
    assert!(matches!(state(&v.s, 0), VfState::Attaching { .. }));
    let r = v.s.exec.finalize_removal(pci(0), t, "rollback").await;
    assert!(r.is_err(), "{r:?}");
    assert!(matches!(state(&v.s, 0), VfState::Attaching { .. }));
    assert_eq!(
        v.s.pf.read_vf("ens1f1", 0).unwrap().vlan,
        42,
        "settings kept"
    );
}

/// The pod is being torn down: QEMU stopped before the CNI DEL, its socket has no listener.
/// That is proof the device is in no guest: the DEL finalizes instead of waiting forever; and a
/// restart's reconcile does the same for a VM that went away while vfplugd was down.
#[tokio::test]
async fn a_qemu_that_is_not_running_proves_the_removal() {
    for via_reconcile in [false, true] {
        let host = pci(0).to_string();
        let v = start(attach_script(Script::new(), &host).disconnect()).await;
        let t = attach(&v.s, 0).await;
        v.s.exec.vm_attach(pci(0), t, &vm()).await.unwrap();
        // The connection ends; QEMU's pid is not known gone, so nothing is finalized yet.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(matches!(state(&v.s, 0), VfState::Attached { .. }));
        *v.qmp.not_running.lock().unwrap() = true;
        if via_reconcile {
            v.s.exec.vm_reconcile(&vm()).await.unwrap();
        } else {
            let d =
                v.s.exec
                    .vm_detach(pci(0), t, Duration::from_secs(1))
                    .await
                    .unwrap();
            assert!(matches!(&d, VmDetach::Finalized(f) if f.released), "{d:?}");
        }
        assert_eq!(
            state(&v.s, 0),
            VfState::Free,
            "via_reconcile={via_reconcile}"
        );
        assert_eq!(v.s.pf.read_vf("ens1f1", 0).unwrap().vlan, 0);
    }
}

/// A VM pod's CNI ADD of `pci(0)` (VLAN 42) for `vm()`.
fn vm_add_request() -> vfplug_executor::AddRequest {
    vfplug_executor::AddRequest {
        owner: common::owner(0),
        network: "vm-net".into(),
        device: Some(pci(0)),
        config: vfplug_core::VfConfig {
            vlan: Some(42),
            ..Default::default()
        },
        vm: Some(vm()),
        ..Default::default()
    }
}

/// The runtime sets up a pod's networks before its containers start: an ADD for a VM pod whose
/// QEMU is not running yet reserves and configures the VF and answers with the hot-plug owed;
/// a repeat of it is answered from the ledger; a restart's recovery keeps it owed; and the
/// hot-plug happens by itself once QEMU answers (woken, not polled).
#[tokio::test]
async fn an_add_before_qemu_runs_owes_the_hotplug_and_does_it_when_qemu_answers() {
    let host = pci(0).to_string();
    let v = start(attach_script(Script::new(), &host)).await;
    // No QEMU yet: the scripted connection is held back.
    let link = v.qmp.link.lock().unwrap().pop_front().unwrap();
    *v.qmp.not_running.lock().unwrap() = true;
    let req = vm_add_request();
    let out = v.s.exec.add(req.clone()).await.unwrap();
    assert!(out.attach_pending && !out.existing, "{out:?}");
    let owed = |st: &VfState| {
        matches!(st, VfState::Configured { lease }
            if lease.cni.as_deref().is_some_and(|c| c.attach_pending && c.vm.is_some()))
    };
    assert!(owed(&state(&v.s, 0)), "{:?}", state(&v.s, 0));
    assert_eq!(v.s.pf.read_vf("ens1f1", 0).unwrap().vlan, 42);

    let again = v.s.exec.add(req).await.unwrap();
    assert!(again.existing && again.attach_pending, "{again:?}");
    let r = v.s.exec.recover().await;
    assert!(
        r.released.is_empty(),
        "recovery must not undo an answered ADD: {r:?}"
    );
    assert!(owed(&state(&v.s, 0)));
    assert_eq!(v.s.exec.resume_owed_attaches(), 1);

    // QEMU starts.
    v.qmp.link.lock().unwrap().push_back(link);
    *v.qmp.not_running.lock().unwrap() = false;
    v.qmp.started.notify_one();
    let st = wait_state(&v.s, 0, |s| matches!(s, VfState::Attached { .. })).await;
    let VfState::Attached { alias, .. } = st else {
        unreachable!()
    };
    assert_eq!(alias, "vfplug-net1");
    assert_eq!(v.memlock.calls(), [(QEMU_PID, 3 * GIB)]);
    // The script saw exactly the attach, and nothing more, once the connection closes.
    v.s.exec.close_vms();
    drop(v.s);
    tokio::time::timeout(Duration::from_secs(5), v.server)
        .await
        .expect("the QMP connection was closed")
        .unwrap()
        .unwrap();
}

/// A DEL of an owed hot-plug (the pod went away before its QEMU ever ran) releases the VF,
/// and nothing is hot-plugged afterwards.
#[tokio::test]
async fn a_del_of_an_owed_hotplug_releases_the_vf() {
    let v = start(Script::new()).await;
    let _never = v.qmp.link.lock().unwrap().pop_front();
    *v.qmp.not_running.lock().unwrap() = true;
    let req = vm_add_request();
    assert!(v.s.exec.add(req).await.unwrap().attach_pending);
    let d =
        v.s.exec
            .del("c0", "net1", Duration::from_secs(1))
            .await
            .unwrap();
    assert!(d.finalized.released, "{d:?}");
    assert_eq!(state(&v.s, 0), VfState::Free);
    assert_eq!(v.s.pf.read_vf("ens1f1", 0).unwrap().vlan, 0);
    // A late "QEMU started" finds nothing owed.
    v.qmp.started.notify_one();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(state(&v.s, 0), VfState::Free);
    assert_eq!(v.s.exec.resume_owed_attaches(), 0);
}

impl Vm {
    /// QEMU answers the next connection with `script` (a reconnect after a lost one).
    async fn next_connection(&self, script: Script) -> ServerTask {
        let (q, server) = script.connect().await.unwrap();
        self.qmp.link.lock().unwrap().push_back(VmLink {
            qmp: Arc::new(q),
            pid: Some(QEMU_PID),
        });
        server
    }
}

/// The connection drops after `device_del` was sent, before any reply or event, while QEMU is
/// still running: nothing is restored and the VF stays held. When QEMU answers again, the
/// reconnect's `qom-list` diff proves the removal (the guest let go meanwhile), or finds the
/// device still there and asks for the unplug again, finished by the event; when QEMU does not
/// answer again, the DEL fails with "try again" (the runtime retries it) and the VF stays
/// Detaching.
#[tokio::test]
async fn a_disconnect_mid_detach_stays_pending_until_a_reconnect_proves_the_removal() {
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Then {
        GuestLetGo,
        StillInGuest,
        NoAnswer,
    }
    for then in [Then::GuestLetGo, Then::StillInGuest, Then::NoAnswer] {
        let host = pci(0).to_string();
        let script = attach_script(Script::new(), &host)
            .expect_args("device_del", json!({"id": "vfplug-net1"}))
            .disconnect();
        let v = start(script).await;
        let t = attach(&v.s, 0).await;
        v.s.exec.vm_attach(pci(0), t, &vm()).await.unwrap();
        let reconnect =
            Script::new().expect_args("qom-list", json!({"path": "/machine/peripheral"}));
        let _again = match then {
            Then::GuestLetGo => Some(v.next_connection(reconnect.ret(peripherals(&[]))).await),
            Then::StillInGuest => Some(
                v.next_connection(
                    reconnect
                        .ret(peripherals(&["vfplug-net1"]))
                        .expect_args("device_del", json!({"id": "vfplug-net1"}))
                        .ok()
                        .event(
                            "DEVICE_DELETED",
                            json!({"device": "vfplug-net1",
                                   "path": "/machine/peripheral/vfplug-net1"}),
                        ),
                )
                .await,
            ),
            Then::NoAnswer => None,
        };
        let d = v.s.exec.vm_detach(pci(0), t, Duration::from_secs(5)).await;
        if then == Then::NoAnswer {
            let e = d.unwrap_err();
            assert_eq!(e.kind, vfplug_executor::ErrorKind::TryAgain, "{e}");
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(matches!(state(&v.s, 0), VfState::Detaching { .. }));
            assert_eq!(token(&v.s, 0), t);
            assert_eq!(v.s.pf.read_vf("ens1f1", 0).unwrap().vlan, 42);
            assert!(v.s.binder.ops().is_empty(), "{:?}", v.s.binder.ops());
        } else {
            assert_eq!(d.unwrap(), VmDetach::Pending, "{then:?}");
            wait_state(&v.s, 0, |s| *s == VfState::Free).await;
            assert_eq!(v.s.pf.read_vf("ens1f1", 0).unwrap().vlan, 0, "{then:?}");
        }
    }
}

/// QEMU is killed right after `device_add` (its connection ends, its pid is gone): the attach's
/// outcome was unknown, but QEMU's exit proves the device is in no guest, so the VF is restored
/// and freed without anyone asking.
#[tokio::test]
async fn qemu_killed_mid_attach_frees_the_vf_once_its_exit_is_known() {
    let script = until_device_add().disconnect();
    let v = start(script).await;
    *v.qmp.exited.lock().unwrap() = true;
    let t = attach(&v.s, 0).await;
    let e = v.s.exec.vm_attach(pci(0), t, &vm()).await.unwrap_err();
    assert_eq!(e.kind, vfplug_executor::ErrorKind::TryAgain, "{e}");
    wait_state(&v.s, 0, |s| *s == VfState::Free).await;
    assert_eq!(v.s.pf.read_vf("ens1f1", 0).unwrap().vlan, 0);
    assert_eq!(v.s.binder.ops(), vec![BinderOp::Reset(pci(0))]);
}

/// Each QMP step of the attach answered with an error. Before `device_add` nothing was
/// persisted beyond Configured; a refused `device_add` or a device QEMU does not list afterwards
/// is back to Configured (nothing in the guest); a failed look after the `device_add` leaves the
/// outcome unknown (Attaching, never freed on a guess). Every error names the step.
#[tokio::test]
async fn each_qmp_step_of_the_attach_failing() {
    let steps = [
        "query-memory-size-summary",
        "qom-list",
        "query-pci",
        "device_add",
        "qom-list after device_add",
        "device missing after device_add",
    ];
    for (n, step) in steps.iter().enumerate() {
        let mut script = Script::new();
        let answers: [(&str, Value); 5] = [
            ("query-memory-size-summary", json!({"base-memory": GIB})),
            ("qom-list", peripherals(&[])),
            ("query-pci", pci_tree()),
            ("device_add", json!({})),
            ("qom-list", peripherals(&["vfplug-net1"])),
        ];
        for (i, (cmd, ret)) in answers.into_iter().enumerate() {
            script = script.expect(cmd);
            if i == n.min(4) {
                script = if n == 5 {
                    script.ret(peripherals(&[]))
                } else {
                    script.error("GenericError", &format!("injected failure of {step}"))
                };
                break;
            }
            script = script.ret(ret);
        }
        let v = start(script).await;
        let t = attach(&v.s, 0).await;
        let e = v.s.exec.vm_attach(pci(0), t, &vm()).await.unwrap_err();
        let st = state(&v.s, 0);
        assert_eq!(token(&v.s, 0), t, "{step}: the lease is kept");
        if n == 4 {
            assert!(matches!(st, VfState::Attaching { .. }), "{step}: {st:?}");
        } else {
            assert!(matches!(st, VfState::Configured { .. }), "{step}: {st:?}");
            let f =
                v.s.exec
                    .finalize_removal(pci(0), t, "attach failed")
                    .await
                    .unwrap();
            assert!(f.released, "{step}: {f:?}");
        }
        let name = step.split(' ').next().unwrap_or(step);
        let named = if n == 5 {
            e.msg.contains("not in /machine/peripheral")
        } else {
            e.msg.contains(name) || e.msg.contains("injected failure")
        };
        assert!(named, "{step}: {e}");
    }
}

/// QEMU never answers `device_add`: the attach does not hang (every QMP call is bounded by the
/// client's timeout), and since QEMU may still add the device, the VF is not freed on a guess.
#[tokio::test]
async fn a_device_add_reply_that_never_comes_is_bounded_and_frees_nothing() {
    let script = until_device_add().sleep(Duration::from_secs(3));
    let v = start_with(script, Some(Duration::from_millis(300))).await;
    let t = attach(&v.s, 0).await;
    let t0 = std::time::Instant::now();
    let e = tokio::time::timeout(
        Duration::from_secs(10),
        v.s.exec.vm_attach(pci(0), t, &vm()),
    )
    .await
    .expect("the attach hangs")
    .unwrap_err();
    println!(
        "device_add without a reply: attach failed after {:?}: {e}",
        t0.elapsed()
    );
    let st = state(&v.s, 0);
    assert!(
        matches!(st, VfState::Attaching { .. }),
        "a device_add that may still happen left the VF {st:?}"
    );
}

/// Two users of a VM with no connection yet (a DEL racing the start-time reconcile, found by the
/// crash test): one connect, shared. QEMU's QMP monitor serves one client at a time, so a second
/// connect would wait for a greeting until it times out.
#[tokio::test]
async fn concurrent_first_uses_of_a_vm_share_one_connect() {
    let v = start(Script::new()).await;
    *v.qmp.connect_delay.lock().unwrap() = Duration::from_millis(200);
    let vm = vm();
    let (a, b) = tokio::join!(v.s.exec.vm_reconcile(&vm), v.s.exec.vm_reconcile(&vm));
    a.unwrap();
    b.unwrap();
    assert_eq!(*v.qmp.connects.lock().unwrap(), 1);
}
