//! What vfplugd's pod watch knows of the pods on its node, for the node API: a VM pod's QMP
//! socket comes from its `vfplug.io/qmp-socket` annotation, read from the same watch the
//! Domain controller runs (crate vfplug-controller), so a CNI ADD costs no API request.
//!
//! The controller fills the index ([`PodIndex::upsert`], [`PodIndex::remove`],
//! [`PodIndex::set_synced`]); the node API asks it ([`PodIndex::lookup`]). Without a controller
//! (no kubeconfig) there is no index and a VM pod's network config must name its `qmpSocket`.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;

/// The annotation that makes a pod a VM pod: where its QEMU's QMP socket is, as
/// `<volume>/<file>` in the pod's volumes (the form of the CNI config's `qmpSocket`).
pub const QMP_SOCKET_ANNOTATION: &str = "vfplug.io/qmp-socket";

/// One pod as the watch last saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodEntry {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The [`QMP_SOCKET_ANNOTATION`], if the pod has it.
    pub qmp_socket: Option<String>,
}

/// What the index says of a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodLookup {
    /// A VM pod: its QMP socket spec.
    VmPod(String),
    /// A pod on this node without the annotation.
    NotVmPod,
    /// Not seen (the watch has not listed yet, or the pod is not on this node).
    Unknown,
}

#[derive(Debug, Default)]
struct Inner {
    by_uid: HashMap<String, PodEntry>,
    synced: bool,
}

/// The pods of this node, by UID. See the module docs.
#[derive(Debug)]
pub struct PodIndex {
    inner: Mutex<Inner>,
    /// Bumped on every change, so a lookup can wait for a pod the watch has not shown yet.
    changed: watch::Sender<u64>,
}

impl Default for PodIndex {
    fn default() -> Self {
        Self {
            inner: Mutex::default(),
            changed: watch::Sender::new(0),
        }
    }
}

impl PodIndex {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Only plain maps under it: nothing half-updated to fear from a poisoned lock.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// The watch saw `uid` as `entry`.
    pub fn upsert(&self, uid: &str, entry: PodEntry) {
        let changed = {
            let mut g = self.lock();
            g.by_uid.insert(uid.to_owned(), entry.clone()).as_ref() != Some(&entry)
        };
        if changed {
            self.bump();
        }
    }

    /// `uid` is gone from the node.
    pub fn remove(&self, uid: &str) {
        if self.lock().by_uid.remove(uid).is_some() {
            self.bump();
        }
    }

    /// Replaces every entry with a fresh list (a re-list of the watch) and marks it synced.
    pub fn replace(&self, entries: impl IntoIterator<Item = (String, PodEntry)>) {
        {
            let mut g = self.lock();
            g.by_uid = entries.into_iter().collect();
            g.synced = true;
        }
        self.bump();
    }

    /// The watch has listed every pod of the node once.
    pub fn set_synced(&self) {
        self.lock().synced = true;
        self.bump();
    }

    /// Whether the first list is in.
    pub fn synced(&self) -> bool {
        self.lock().synced
    }

    /// What the index knows of `uid` now.
    pub fn get(&self, uid: &str) -> PodLookup {
        match self.lock().by_uid.get(uid) {
            Some(PodEntry {
                qmp_socket: Some(s),
                ..
            }) => PodLookup::VmPod(s.clone()),
            Some(_) => PodLookup::NotVmPod,
            None => PodLookup::Unknown,
        }
    }

    /// What the index knows of `uid`, waiting up to `wait` for the watch to show the pod (a CNI
    /// ADD can come before the watch event of the pod's binding has arrived).
    pub async fn lookup(&self, uid: &str, wait: Duration) -> PodLookup {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let found = self.get(uid);
            if found != PodLookup::Unknown {
                return found;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                // Timed out, or the sender is gone (cannot be: we hold it).
                _ => return PodLookup::Unknown,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(qmp: Option<&str>) -> PodEntry {
        PodEntry {
            namespace: "ns".into(),
            name: "vm".into(),
            qmp_socket: qmp.map(str::to_owned),
        }
    }

    #[tokio::test]
    async fn lookup_waits_for_the_watch_then_answers() {
        let idx = std::sync::Arc::new(PodIndex::default());
        assert_eq!(idx.get("u1"), PodLookup::Unknown);
        let i2 = std::sync::Arc::clone(&idx);
        let t = tokio::spawn(async move { i2.lookup("u1", Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        idx.upsert("u1", entry(Some("qmp/monitor.sock")));
        assert_eq!(
            t.await.expect("join"),
            PodLookup::VmPod("qmp/monitor.sock".into())
        );
        idx.upsert("u2", entry(None));
        assert_eq!(idx.get("u2"), PodLookup::NotVmPod);
        idx.remove("u2");
        assert_eq!(
            idx.lookup("u2", Duration::from_millis(10)).await,
            PodLookup::Unknown
        );
        assert!(!idx.synced());
        idx.replace([("u3".to_owned(), entry(None))]);
        assert!(idx.synced());
        assert_eq!(idx.get("u1"), PodLookup::Unknown);
    }
}
