//! The VM sagas against a scripted QMP server over a real unix socket (vfplug-qmp's `testing`):
//! attach into a free root port with QEMU's memlock raised first, the detach proved by
//! `DEVICE_DELETED` (during the wait, or late), the guest's refusal, `device_add` failing, and
//! QEMU's exit finalizing what it had.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

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

/// Hands out one scripted connection; QEMU "exits" when told.
#[derive(Debug)]
struct Scripted {
    link: Mutex<Option<VmLink>>,
    exited: Mutex<bool>,
    /// After the one scripted connection: nobody listens on the socket any more.
    not_running: Mutex<bool>,
}

impl QmpConnector for Scripted {
    fn connect<'a>(&'a self, _vm: &'a VmRef) -> BoxFuture<'a, Result<VmLink, ExecError>> {
        Box::pin(async move {
            let kind = if *self.not_running.lock().unwrap() {
                vfplug_executor::ErrorKind::VmNotRunning
            } else {
                vfplug_executor::ErrorKind::TryAgain
            };
            self.link
                .lock()
                .unwrap()
                .take()
                .ok_or_else(|| ExecError::new(kind, "no QEMU"))
        })
    }

    fn exited(&self, _vm: &VmRef, _link: &VmLink) -> bool {
        *self.exited.lock().unwrap()
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

struct Vm {
    s: common::Setup,
    memlock: Arc<FakeMemlock>,
    qmp: Arc<Scripted>,
    server: ServerTask,
}

async fn start(script: Script) -> Vm {
    let (q, server) = script.connect().await.unwrap();
    let qmp = Arc::new(Scripted {
        link: Mutex::new(Some(VmLink {
            qmp: Arc::new(q),
            pid: Some(QEMU_PID),
        })),
        exited: Mutex::new(false),
        not_running: Mutex::new(false),
    });
    let memlock = Arc::new(FakeMemlock::new([(QEMU_PID, MemlockLimit::both(64 << 20))]));
    let s = setup_with(Some(VmPorts {
        qmp: qmp.clone(),
        memlock: memlock.clone(),
        port_prefix: "vfplug-rp".into(),
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
    let script = Script::new()
        .expect("query-memory-size-summary")
        .ret(json!({"base-memory": GIB}))
        .expect("qom-list")
        .ret(peripherals(&[]))
        .expect("query-pci")
        .ret(pci_tree())
        .expect("device_add")
        .error(
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
    let script = Script::new()
        .expect("query-memory-size-summary")
        .ret(json!({"base-memory": GIB}))
        .expect("qom-list")
        .ret(peripherals(&[]))
        .expect("query-pci")
        .ret(pci_tree())
        .expect("device_add")
        .disconnect();
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
