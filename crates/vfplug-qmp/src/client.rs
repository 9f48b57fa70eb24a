//! The connection: [`Qmp`] handles, the background reader and writer tasks, reply routing,
//! event fan-out and waiters.
//!
//! Shape: every handle shares one `Inner`. Requests are encoded whole and queued to a writer
//! task, so cancelling or timing out a call can never leave half a line on the socket. One reader
//! task owns the read half; it routes replies by id to one-shot channels, hands each event first
//! to registered waiters (registered *before* the command that causes the event is sent, so an
//! event that overtakes its reply is not lost) and then to the broadcast channel. When the reader
//! stops (EOF, I/O error, last handle dropped) it fails every outstanding call and waiter with
//! [`QmpError::Disconnected`] carrying the reason.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, warn};

use crate::commands::{
    Command, DeviceAdd, DeviceDel, ObjectProperty, PciDeviceInfo, QmpCapabilities, QomList,
    QueryPci, QueryStatus, QueryVersion, StatusInfo, SystemReset, VersionInfo, flatten_pci,
};
use crate::error::{QmpError, classify};
use crate::event::{Event, PERIPHERAL_PATH};
use crate::wire::{self, ErrorBody, Greeting, LineFramer, ServerMessage};

/// Default per-call timeout. The first vfio-pci `device_add` took 1-2 s under nested TCG in the
/// VM lab (vm-lab.md §4), so this is generous.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Tuning for a connection. `Default` is what [`Qmp::connect`] and [`Qmp::from_stream`] use.
#[derive(Debug, Clone)]
pub struct QmpOptions {
    /// Per-call timeout of new handles, and the bound on greeting + negotiation.
    pub default_timeout: Duration,
    /// Longest accepted server line.
    pub max_line: usize,
    /// Broadcast buffer for [`Qmp::events`]; slower subscribers see `Lagged`. Waiters are not
    /// affected by this bound.
    pub event_capacity: usize,
}

impl Default for QmpOptions {
    fn default() -> Self {
        Self {
            default_timeout: DEFAULT_TIMEOUT,
            max_line: wire::DEFAULT_MAX_LINE,
            event_capacity: 256,
        }
    }
}

/// Result of [`Qmp::device_del`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DelOutcome {
    /// QEMU accepted the request; completion is `DEVICE_DELETED`.
    Requested,
    /// QEMU says an unplug of this device is already in progress. Not a failure.
    AlreadyPending,
}

/// Result of [`Qmp::device_del_and_wait`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnplugOutcome {
    /// `DEVICE_DELETED` arrived: the device is gone and its id may be reused.
    Deleted,
    /// No event within the wait: the unplug is pending (the guest may still ack it, or a reset
    /// will complete it). The device is still there as far as we know.
    Pending,
    /// `DEVICE_UNPLUG_GUEST_ERROR`: the guest refused; the device stays attached.
    GuestError,
}

type ReplyTx = oneshot::Sender<Result<Value, ErrorBody>>;

struct Waiter {
    pred: Arc<dyn Fn(&Event) -> bool + Send + Sync>,
    tx: oneshot::Sender<Event>,
}

#[derive(Default)]
struct State {
    pending: HashMap<u64, ReplyTx>,
    waiters: HashMap<u64, Waiter>,
    next_waiter: u64,
    /// Set once, when the connection is gone; the reason every later call gets.
    closed: Option<String>,
    /// Taken on close so subscribers see `Closed` even while handles are alive.
    events: Option<broadcast::Sender<Event>>,
}

struct Shared {
    state: Mutex<State>,
    next_id: AtomicU64,
    protocol_errors: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The lock is never held across a panic-prone section; recover rather than cascade.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn disconnected(&self) -> QmpError {
        let reason = self
            .lock()
            .closed
            .clone()
            .unwrap_or_else(|| "connection closed".to_owned());
        QmpError::Disconnected { reason }
    }

    fn close(&self, reason: String) {
        let mut st = self.lock();
        if st.closed.is_some() {
            return;
        }
        debug!(%reason, pending = st.pending.len(), waiters = st.waiters.len(), "QMP connection closed");
        st.closed = Some(reason);
        // Dropping the senders wakes every call and waiter; they read `closed` for the reason.
        st.pending.clear();
        st.waiters.clear();
        st.events = None;
    }

    fn protocol_error(&self, what: &str) {
        self.protocol_errors.fetch_add(1, Ordering::Relaxed);
        warn!(error = %what, "ignoring unusable QMP line");
    }

    fn handle_line(&self, line: Result<Vec<u8>, wire::FrameError>) {
        let line = match line {
            Ok(line) => line,
            Err(e) => return self.protocol_error(&e.to_string()),
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        match wire::parse_server_line(&line) {
            Ok(ServerMessage::Return { id, value }) => self.route_reply(id, Ok(value)),
            Ok(ServerMessage::Error { id, error }) => self.route_reply(id, Err(error)),
            Ok(ServerMessage::Event(event)) => self.dispatch_event(event),
            Ok(ServerMessage::Greeting(_)) => self.protocol_error("unexpected second greeting"),
            Err(e) => self.protocol_error(&e.to_string()),
        }
    }

    fn route_reply(&self, id: Option<u64>, reply: Result<Value, ErrorBody>) {
        let Some(id) = id else {
            // QEMU answers unparsable input with an error without id; nobody to give it to.
            return self.protocol_error(&format!("reply without our id: {reply:?}"));
        };
        let tx = self.lock().pending.remove(&id);
        match tx {
            // The caller may have just given up; then the send fails and the reply is dropped.
            Some(tx) => {
                let _ = tx.send(reply);
            }
            None => debug!(id, "dropping reply for unknown or timed-out id"),
        }
    }

    fn dispatch_event(&self, event: Event) {
        debug!(event = event.name(), "QMP event");
        // Predicates run without the lock held, so one that calls back into the handle (or is
        // slow) cannot deadlock or stall the other users of the state. Only this task dispatches,
        // so events still reach waiters in wire order.
        let candidates: Vec<_> = self
            .lock()
            .waiters
            .iter()
            .map(|(k, w)| (*k, w.pred.clone()))
            .collect();
        let fired: Vec<u64> = candidates
            .into_iter()
            .filter(|(_, pred)| pred(&event))
            .map(|(k, _)| k)
            .collect();
        let mut st = self.lock();
        for key in fired {
            // A waiter dropped meanwhile is simply gone.
            if let Some(w) = st.waiters.remove(&key) {
                let _ = w.tx.send(event.clone());
            }
        }
        if let Some(events) = &st.events {
            // No subscribers is fine.
            let _ = events.send(event);
        }
    }
}

struct Inner {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Vec<u8>>,
    greeting: Greeting,
    /// Cancels the reader and writer tasks when the last handle goes away.
    _shutdown: DropGuard,
}

/// A QMP connection handle. Cheap to clone; all clones share one connection, which closes when
/// the last handle is dropped.
#[derive(Clone)]
pub struct Qmp {
    inner: Arc<Inner>,
    default_timeout: Duration,
}

impl fmt::Debug for Qmp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Qmp")
            .field("qemu", &self.inner.greeting.version.qemu)
            .field("default_timeout", &self.default_timeout)
            .finish_non_exhaustive()
    }
}

impl Qmp {
    /// Connects to QEMU's QMP unix socket at `path`, reads the greeting and negotiates. `timeout`
    /// bounds the connect and, separately, greeting plus negotiation; it also becomes the
    /// default per-call timeout.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let stream = tokio::time::timeout(timeout, tokio::net::UnixStream::connect(path))
            .await
            .map_err(|_| QmpError::Timeout {
                command: format!("connect {}", path.display()),
                timeout,
            })?
            .map_err(|source| QmpError::Connect {
                path: path.to_owned(),
                source,
            })?;
        let opts = QmpOptions {
            default_timeout: timeout,
            ..QmpOptions::default()
        };
        Self::from_stream_with(stream, opts).await
    }

    /// Runs QMP over an already connected stream (e.g. one end of `UnixStream::pair()`), with
    /// default [`QmpOptions`].
    pub async fn from_stream<S>(s: S) -> Result<Qmp, QmpError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        Self::from_stream_with(s, QmpOptions::default()).await
    }

    /// Like [`Self::from_stream`] with explicit options.
    pub async fn from_stream_with<S>(s: S, opts: QmpOptions) -> Result<Qmp, QmpError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (mut rd, wr) = tokio::io::split(s);
        let mut framer = LineFramer::new(opts.max_line);
        let greeting =
            tokio::time::timeout(opts.default_timeout, read_greeting(&mut rd, &mut framer))
                .await
                .map_err(|_| QmpError::Timeout {
                    command: "greeting".into(),
                    timeout: opts.default_timeout,
                })??;
        debug!(qemu = ?greeting.version.qemu, "QMP greeting");

        let (events, _) = broadcast::channel(opts.event_capacity.max(1));
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                events: Some(events),
                ..State::default()
            }),
            next_id: AtomicU64::new(1),
            protocol_errors: AtomicU64::new(0),
        });
        let cancel = CancellationToken::new();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(reader_task(rd, framer, shared.clone(), cancel.clone()));
        tokio::spawn(writer_task(wr, rx, shared.clone(), cancel.clone()));
        let qmp = Qmp {
            inner: Arc::new(Inner {
                shared,
                tx,
                greeting,
                _shutdown: cancel.drop_guard(),
            }),
            default_timeout: opts.default_timeout,
        };
        qmp.call(&QmpCapabilities {}).await?;
        Ok(qmp)
    }

    /// The server's greeting (QEMU version, offered capabilities).
    pub fn greeting(&self) -> &Greeting {
        &self.inner.greeting
    }

    /// Sets this handle's per-call timeout (clones made afterwards inherit it).
    pub fn set_default_timeout(&mut self, d: Duration) {
        self.default_timeout = d;
    }

    /// This handle's per-call timeout.
    pub fn default_timeout(&self) -> Duration {
        self.default_timeout
    }

    /// Lines that were not usable QMP (garbage, over-long, replies without id) since connect.
    /// They are logged at warn and skipped; the stream stays in sync.
    pub fn protocol_errors(&self) -> u64 {
        self.inner.shared.protocol_errors.load(Ordering::Relaxed)
    }

    /// True once the connection is gone (EOF, I/O error).
    pub fn is_closed(&self) -> bool {
        self.inner.shared.lock().closed.is_some()
    }

    /// A receiver of every event from now on. Slow receivers may lag (see
    /// [`QmpOptions::event_capacity`]); use [`Self::event_waiter`] when one event must not be
    /// missed. After disconnect the receiver reports `Closed`.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        match &self.inner.shared.lock().events {
            Some(tx) => tx.subscribe(),
            None => broadcast::channel(1).1,
        }
    }

    /// Registers interest in the first event matching `pred`, from now on. Register *before*
    /// sending the command that causes the event: QEMU may emit it before the reply.
    pub fn event_waiter(
        &self,
        pred: impl Fn(&Event) -> bool + Send + Sync + 'static,
    ) -> EventWaiter {
        let (tx, rx) = oneshot::channel();
        let shared = self.inner.shared.clone();
        let key = {
            let mut st = shared.lock();
            let key = st.next_waiter;
            st.next_waiter += 1;
            // After close the sender is dropped at once, so `wait` reports Disconnected.
            if st.closed.is_none() {
                st.waiters.insert(
                    key,
                    Waiter {
                        pred: Arc::new(pred),
                        tx,
                    },
                );
            }
            key
        };
        EventWaiter { shared, key, rx }
    }

    /// Waits up to `timeout` for the next event matching `pred`; `Ok(None)` on timeout.
    pub async fn wait_event(
        &self,
        pred: impl Fn(&Event) -> bool + Send + Sync + 'static,
        timeout: Duration,
    ) -> Result<Option<Event>, QmpError> {
        self.event_waiter(pred).wait(timeout).await
    }

    /// Sends a typed command with the default timeout.
    pub async fn call<C: Command>(&self, cmd: &C) -> Result<C::Output, QmpError> {
        self.call_timeout(cmd, self.default_timeout).await
    }

    /// Sends a typed command; gives up after `timeout` (a late reply is then dropped).
    pub async fn call_timeout<C: Command>(
        &self,
        cmd: &C,
        timeout: Duration,
    ) -> Result<C::Output, QmpError> {
        let args = C::HAS_ARGS.then_some(cmd);
        let value = self.raw_call(C::NAME, args, timeout).await?;
        serde_json::from_value(value).map_err(|e| {
            QmpError::Protocol(format!("{} returned an unexpected shape: {e}", C::NAME))
        })
    }

    /// Escape hatch: any command by name with JSON arguments, JSON result.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<&Value>,
    ) -> Result<Value, QmpError> {
        self.raw_call(command, arguments, self.default_timeout)
            .await
    }

    async fn raw_call<A: Serialize>(
        &self,
        command: &str,
        arguments: Option<&A>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let shared = &self.inner.shared;
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let line = wire::encode_request(command, arguments, id)
            .map_err(|e| QmpError::Protocol(format!("cannot encode {command}: {e}")))?;
        let (tx, rx) = oneshot::channel();
        {
            let mut st = shared.lock();
            if st.closed.is_some() {
                drop(st);
                return Err(shared.disconnected());
            }
            st.pending.insert(id, tx);
        }
        // Removes the pending entry however this future ends (timeout, caller cancelled).
        let _guard = PendingGuard { shared, id };
        let exchange = async {
            self.inner
                .tx
                .send(line)
                .await
                .map_err(|_| shared.disconnected())?;
            rx.await.map_err(|_| shared.disconnected())
        };
        match tokio::time::timeout(timeout, exchange).await {
            Err(_) => {
                debug!(command, id, ?timeout, "QMP call timed out");
                Err(QmpError::Timeout {
                    command: command.to_owned(),
                    timeout,
                })
            }
            Ok(Err(e)) => Err(e),
            Ok(Ok(Ok(value))) => Ok(value),
            Ok(Ok(Err(body))) => Err(classify(command, &body.class, &body.desc)),
        }
    }

    /// `device_add`.
    pub async fn device_add(&self, dev: &DeviceAdd) -> Result<(), QmpError> {
        self.call(dev).await.map(drop)
    }

    /// `device_del`. "Already in the process of unplug" is `Ok(DelOutcome::AlreadyPending)`.
    pub async fn device_del(&self, id: &str) -> Result<DelOutcome, QmpError> {
        match self.call(&DeviceDel { id: id.to_owned() }).await {
            Ok(_) => Ok(DelOutcome::Requested),
            Err(QmpError::UnplugAlreadyPending { desc }) => {
                debug!(id, %desc, "unplug already pending");
                Ok(DelOutcome::AlreadyPending)
            }
            Err(e) => Err(e),
        }
    }

    /// `device_del`, then waits up to `wait` (counted from the call) for `DEVICE_DELETED` or
    /// `DEVICE_UNPLUG_GUEST_ERROR` of `id`. The waiter is registered before the command is sent.
    /// If the device is already unknown to QEMU but its `DEVICE_DELETED` arrived during this
    /// call, the answer is `Deleted`; otherwise `DeviceNotFound` is returned as an error.
    pub async fn device_del_and_wait(
        &self,
        id: &str,
        wait: Duration,
    ) -> Result<UnplugOutcome, QmpError> {
        let deadline = Instant::now() + wait;
        let want = id.to_owned();
        let mut waiter = self
            .event_waiter(move |e| e.is_device_deleted(&want) || e.is_unplug_guest_error(&want));
        match self.device_del(id).await {
            Ok(_) => {}
            Err(e @ QmpError::DeviceNotFound { .. }) => {
                return match waiter.try_take() {
                    Some(ev) if ev.is_device_deleted(id) => Ok(UnplugOutcome::Deleted),
                    _ => Err(e),
                };
            }
            Err(e) => return Err(e),
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        Ok(match waiter.wait(remaining).await? {
            Some(ev) if ev.is_device_deleted(id) => UnplugOutcome::Deleted,
            Some(_) => UnplugOutcome::GuestError,
            None => UnplugOutcome::Pending,
        })
    }

    /// `qom-list`.
    pub async fn qom_list(&self, path: &str) -> Result<Vec<ObjectProperty>, QmpError> {
        self.call(&QomList {
            path: path.to_owned(),
        })
        .await
    }

    /// The ids of user-created devices: `child<...>` entries of `/machine/peripheral`. This is
    /// the presence check (works before firmware ran, unlike `query-pci`).
    pub async fn peripheral_ids(&self) -> Result<Vec<String>, QmpError> {
        Ok(self
            .qom_list(PERIPHERAL_PATH)
            .await?
            .into_iter()
            .filter(ObjectProperty::is_child)
            .map(|p| p.name)
            .collect())
    }

    /// `query-pci`, flattened through bridges (see [`flatten_pci`]).
    pub async fn query_pci(&self) -> Result<Vec<PciDeviceInfo>, QmpError> {
        Ok(flatten_pci(&self.call(&QueryPci {}).await?))
    }

    /// `query-status`.
    pub async fn query_status(&self) -> Result<StatusInfo, QmpError> {
        self.call(&QueryStatus {}).await
    }

    /// `system_reset`.
    pub async fn system_reset(&self) -> Result<(), QmpError> {
        self.call(&SystemReset {}).await.map(drop)
    }

    /// `query-version`.
    pub async fn query_version(&self) -> Result<VersionInfo, QmpError> {
        self.call(&QueryVersion {}).await
    }
}

struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.lock().pending.remove(&self.id);
    }
}

/// A registered interest in one event; see [`Qmp::event_waiter`]. Dropping it unregisters.
pub struct EventWaiter {
    shared: Arc<Shared>,
    key: u64,
    rx: oneshot::Receiver<Event>,
}

impl fmt::Debug for EventWaiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventWaiter")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl EventWaiter {
    /// The event, if it has already arrived.
    pub fn try_take(&mut self) -> Option<Event> {
        self.rx.try_recv().ok()
    }

    /// Waits up to `timeout`; `Ok(None)` on timeout, `Disconnected` if the connection ended
    /// first.
    pub async fn wait(mut self, timeout: Duration) -> Result<Option<Event>, QmpError> {
        match tokio::time::timeout(timeout, &mut self.rx).await {
            Err(_) => Ok(None),
            Ok(Ok(ev)) => Ok(Some(ev)),
            Ok(Err(_)) => Err(self.shared.disconnected()),
        }
    }
}

impl Drop for EventWaiter {
    fn drop(&mut self) {
        self.shared.lock().waiters.remove(&self.key);
    }
}

async fn read_greeting<R: AsyncRead + Unpin>(
    rd: &mut R,
    framer: &mut LineFramer,
) -> Result<Greeting, QmpError> {
    let mut buf = vec![0u8; 4096];
    loop {
        while let Some(line) = framer.next_line() {
            let line = line.map_err(|e| QmpError::Protocol(format!("greeting: {e}")))?;
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return match wire::parse_server_line(&line) {
                Ok(ServerMessage::Greeting(g)) => Ok(g),
                Ok(other) => Err(QmpError::Protocol(format!(
                    "expected the QMP greeting, got {other:?}"
                ))),
                Err(e) => Err(QmpError::Protocol(format!(
                    "expected the QMP greeting: {e}"
                ))),
            };
        }
        let n = rd.read(&mut buf).await?;
        if n == 0 {
            return Err(QmpError::Disconnected {
                reason: "EOF before the QMP greeting".into(),
            });
        }
        framer.push(&buf[..n]);
    }
}

async fn reader_task<R: AsyncRead + Unpin>(
    mut rd: R,
    mut framer: LineFramer,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    let mut buf = vec![0u8; 16 * 1024];
    let reason = loop {
        while let Some(line) = framer.next_line() {
            shared.handle_line(line);
        }
        let read = tokio::select! {
            () = cancel.cancelled() => break "client closed the connection".to_owned(),
            r = rd.read(&mut buf) => r,
        };
        match read {
            Ok(0) => break "EOF from QEMU".to_owned(),
            Ok(n) => framer.push(&buf[..n]),
            Err(e) => break format!("read error: {e}"),
        }
    };
    shared.close(reason);
    cancel.cancel();
}

async fn writer_task<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::Receiver<Vec<u8>>,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    loop {
        let line = tokio::select! {
            () = cancel.cancelled() => break,
            line = rx.recv() => match line {
                Some(line) => line,
                None => break,
            },
        };
        let written = async {
            wr.write_all(&line).await?;
            wr.flush().await
        };
        if let Err(e) = written.await {
            shared.close(format!("write error: {e}"));
            cancel.cancel();
            break;
        }
    }
}
