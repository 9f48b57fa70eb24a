//! A scripted QMP server for tests (cargo feature `testing`), usable from any crate's tests.
//!
//! Two levels:
//! - [`Script`]: a declarative, in-order script (greeting and negotiation are automatic), run on
//!   one end of a real socket. `expect` a command (optionally its exact arguments), `ret` or
//!   `error` to answer it, `event`s at any point (also *before* the answer), raw garbage,
//!   sleeps, and `disconnect`. When the script ends, the server waits for the client to close and
//!   fails if it sends anything else. The server task returns every request it saw.
//! - [`QmpPeer`]: the primitives the script uses, for servers that loop (e.g. the benchmark).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use vfplug_qmp::testing::Script;
//! use vfplug_qmp::UnplugOutcome;
//! let (qmp, server) = Script::new()
//!     .expect("device_del")
//!     .event("DEVICE_DELETED", serde_json::json!({"device": "hostdev0",
//!                                                  "path": "/machine/peripheral/hostdev0"}))
//!     .ret(serde_json::json!({}))
//!     .connect()
//!     .await?;
//! assert_eq!(qmp.device_del_and_wait("hostdev0", Duration::from_secs(1)).await?,
//!            UnplugOutcome::Deleted);
//! drop(qmp);
//! server.await??;
//! # Ok(()) }
//! ```

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::UnixStream;
use tokio::task::JoinHandle;

use crate::wire::{LineFramer, QemuVersion, VersionInfo};
use crate::{Qmp, QmpError};

/// Why the scripted server failed: the client did something the script did not expect.
#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    /// Socket error.
    #[error("scripted server I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The client closed while the script expected a command.
    #[error("client closed the connection while the script expected {expected}")]
    Eof {
        /// What the script wanted next.
        expected: String,
    },
    /// A different command than expected.
    #[error("expected command {expected}, got {got:?}")]
    Unexpected {
        /// What the script wanted.
        expected: String,
        /// What came.
        got: ClientRequest,
    },
    /// The right command with other arguments.
    #[error("command {command}: expected arguments {expected:?}, got {got:?}")]
    Arguments {
        /// Command name.
        command: String,
        /// Expected arguments.
        expected: Option<Value>,
        /// Received arguments.
        got: Option<Value>,
    },
    /// The client sent a line that is not a QMP request.
    #[error("client sent a non-request line: {0}")]
    BadRequest(String),
    /// `ret`/`error` with no earlier `expect` to answer, or `ret_to` out of range.
    #[error("script error: {0}")]
    Script(String),
}

/// A request as the server received it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ClientRequest {
    /// Command name.
    pub execute: String,
    /// Arguments, if sent.
    #[serde(default)]
    pub arguments: Option<Value>,
    /// The client's id (any JSON; ours are numbers).
    #[serde(default)]
    pub id: Option<Value>,
}

#[derive(Serialize)]
struct ReturnMsg<'a> {
    #[serde(rename = "return")]
    ret: &'a Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a Value>,
}

#[derive(Serialize)]
struct ErrorMsg<'a> {
    error: ErrorBodyMsg<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a Value>,
}

#[derive(Serialize)]
struct ErrorBodyMsg<'a> {
    class: &'a str,
    desc: &'a str,
}

#[derive(Serialize)]
struct EventMsg<'a> {
    event: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a Value>,
    timestamp: Timestamp,
}

#[derive(Serialize)]
struct Timestamp {
    seconds: u64,
    microseconds: u64,
}

#[derive(Serialize)]
struct GreetingMsg<'a> {
    #[serde(rename = "QMP")]
    qmp: GreetingBody<'a>,
}

#[derive(Serialize)]
struct GreetingBody<'a> {
    version: &'a VersionInfo,
    capabilities: [&'a str; 1],
}

/// The server side of one QMP connection: read requests, write replies, events and raw bytes.
/// Lines are written CRLF-terminated, like QEMU.
#[derive(Debug)]
pub struct QmpPeer<S> {
    rd: ReadHalf<S>,
    wr: WriteHalf<S>,
    framer: LineFramer,
    buf: Vec<u8>,
    event_seq: u64,
}

impl<S: AsyncRead + AsyncWrite> QmpPeer<S> {
    /// Wraps the server end of a stream.
    pub fn new(stream: S) -> Self {
        let (rd, wr) = tokio::io::split(stream);
        Self {
            rd,
            wr,
            framer: LineFramer::new(usize::MAX / 2),
            buf: vec![0; 16 * 1024],
            event_seq: 0,
        }
    }

    async fn write_line<T: Serialize>(&mut self, msg: &T) -> Result<(), ScriptError> {
        let mut line = serde_json::to_vec(msg).map_err(|e| ScriptError::Script(e.to_string()))?;
        line.extend_from_slice(b"\r\n");
        self.send_raw(&line).await
    }

    /// Writes raw bytes (garbage, partial lines, over-long lines).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ScriptError> {
        self.wr.write_all(bytes).await?;
        self.wr.flush().await?;
        Ok(())
    }

    /// Sends the greeting of QEMU `major.minor.micro` offering `oob`.
    pub async fn send_greeting(&mut self, version: &VersionInfo) -> Result<(), ScriptError> {
        self.write_line(&GreetingMsg {
            qmp: GreetingBody {
                version,
                capabilities: ["oob"],
            },
        })
        .await
    }

    /// Greeting, then expects `qmp_capabilities` (without arguments) and answers `{}`.
    pub async fn handshake(&mut self, version: &VersionInfo) -> Result<(), ScriptError> {
        self.send_greeting(version).await?;
        let req = self.expect("qmp_capabilities", None).await?;
        self.reply(&req, &Value::Object(serde_json::Map::new()))
            .await
    }

    /// The next request, or `Ok(None)` when the client closed the connection.
    pub async fn next_request(&mut self) -> Result<Option<ClientRequest>, ScriptError> {
        loop {
            if let Some(line) = self.framer.next_line() {
                let line = line.map_err(|e| ScriptError::BadRequest(e.to_string()))?;
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return serde_json::from_slice(&line).map(Some).map_err(|e| {
                    ScriptError::BadRequest(format!("{e}: {}", String::from_utf8_lossy(&line)))
                });
            }
            let n = self.rd.read(&mut self.buf).await?;
            if n == 0 {
                return Ok(None);
            }
            self.framer.push(&self.buf[..n]);
        }
    }

    /// Reads the next request and checks its name, and its arguments if `arguments` is given.
    pub async fn expect(
        &mut self,
        execute: &str,
        arguments: Option<&Value>,
    ) -> Result<ClientRequest, ScriptError> {
        let req = self.next_request().await?.ok_or_else(|| ScriptError::Eof {
            expected: execute.to_owned(),
        })?;
        if req.execute != execute {
            return Err(ScriptError::Unexpected {
                expected: execute.to_owned(),
                got: req,
            });
        }
        if let Some(want) = arguments
            && req.arguments.as_ref() != Some(want)
        {
            return Err(ScriptError::Arguments {
                command: req.execute,
                expected: Some(want.clone()),
                got: req.arguments,
            });
        }
        Ok(req)
    }

    /// Answers `req` with `{"return": value, "id": <req.id>}`.
    pub async fn reply(&mut self, req: &ClientRequest, value: &Value) -> Result<(), ScriptError> {
        self.write_line(&ReturnMsg {
            ret: value,
            id: req.id.as_ref(),
        })
        .await
    }

    /// Answers `req` with a QMP error.
    pub async fn reply_error(
        &mut self,
        req: &ClientRequest,
        class: &str,
        desc: &str,
    ) -> Result<(), ScriptError> {
        self.write_line(&ErrorMsg {
            error: ErrorBodyMsg { class, desc },
            id: req.id.as_ref(),
        })
        .await
    }

    /// Sends an event with a synthetic, increasing timestamp.
    pub async fn send_event(
        &mut self,
        name: &str,
        data: Option<&Value>,
    ) -> Result<(), ScriptError> {
        self.event_seq += 1;
        self.write_line(&EventMsg {
            event: name,
            data,
            timestamp: Timestamp {
                seconds: 1_700_000_000 + self.event_seq,
                microseconds: self.event_seq % 1_000_000,
            },
        })
        .await
    }
}

/// The scripted server's task: the requests it expected, in order, or what went wrong.
pub type ServerTask = JoinHandle<Result<Vec<ClientRequest>, ScriptError>>;

/// One step of a [`Script`].
#[derive(Debug, Clone)]
pub enum Step {
    /// Read the next request; check its name and, if given, its exact arguments.
    Expect {
        /// Command name.
        execute: String,
        /// Exact arguments, if checked.
        arguments: Option<Value>,
    },
    /// Answer the most recent `Expect` with a return value.
    Return(Value),
    /// Answer the `nth` (0-based) expected request of the script with a return value.
    ReturnTo {
        /// Index among the script's `Expect` steps.
        nth: usize,
        /// The return value.
        value: Value,
    },
    /// Answer the most recent `Expect` with a QMP error.
    Error {
        /// Error class.
        class: String,
        /// Error text.
        desc: String,
    },
    /// Send an event.
    Event {
        /// Event name.
        name: String,
        /// Event data.
        data: Option<Value>,
    },
    /// Send raw bytes.
    Raw(Vec<u8>),
    /// Pause.
    Sleep(Duration),
    /// Close the connection now (the script ends here).
    Disconnect,
}

/// A scripted QMP server; see the module docs.
#[derive(Debug, Clone)]
pub struct Script {
    steps: Vec<Step>,
    version: VersionInfo,
}

impl Default for Script {
    fn default() -> Self {
        Self::new()
    }
}

impl Script {
    /// An empty script that greets as QEMU 10.0.2 and negotiates.
    pub fn new() -> Self {
        Self {
            steps: Vec::new(),
            version: VersionInfo {
                qemu: QemuVersion {
                    major: 10,
                    minor: 0,
                    micro: 2,
                },
                package: "vfplug scripted server".to_owned(),
            },
        }
    }

    /// Greets as another QEMU version.
    #[must_use]
    pub fn version(mut self, major: u32, minor: u32, micro: u32) -> Self {
        self.version.qemu = QemuVersion {
            major,
            minor,
            micro,
        };
        self
    }

    /// Appends a step.
    #[must_use]
    pub fn step(mut self, step: Step) -> Self {
        self.steps.push(step);
        self
    }

    /// Expects command `execute` (arguments not checked).
    #[must_use]
    pub fn expect(self, execute: &str) -> Self {
        self.step(Step::Expect {
            execute: execute.to_owned(),
            arguments: None,
        })
    }

    /// Expects command `execute` with exactly `arguments`.
    #[must_use]
    pub fn expect_args(self, execute: &str, arguments: Value) -> Self {
        self.step(Step::Expect {
            execute: execute.to_owned(),
            arguments: Some(arguments),
        })
    }

    /// Answers the last expected command with `value`.
    #[must_use]
    pub fn ret(self, value: Value) -> Self {
        self.step(Step::Return(value))
    }

    /// Answers the last expected command with `{}`.
    #[must_use]
    pub fn ok(self) -> Self {
        self.ret(Value::Object(serde_json::Map::new()))
    }

    /// Answers the `nth` expected command with `value` (for out-of-order replies).
    #[must_use]
    pub fn ret_to(self, nth: usize, value: Value) -> Self {
        self.step(Step::ReturnTo { nth, value })
    }

    /// Answers the last expected command with a QMP error.
    #[must_use]
    pub fn error(self, class: &str, desc: &str) -> Self {
        self.step(Step::Error {
            class: class.to_owned(),
            desc: desc.to_owned(),
        })
    }

    /// Sends an event with data.
    #[must_use]
    pub fn event(self, name: &str, data: Value) -> Self {
        self.step(Step::Event {
            name: name.to_owned(),
            data: Some(data),
        })
    }

    /// Sends raw bytes.
    #[must_use]
    pub fn raw(self, bytes: impl Into<Vec<u8>>) -> Self {
        self.step(Step::Raw(bytes.into()))
    }

    /// Pauses the server.
    #[must_use]
    pub fn sleep(self, d: Duration) -> Self {
        self.step(Step::Sleep(d))
    }

    /// Closes the connection.
    #[must_use]
    pub fn disconnect(self) -> Self {
        self.step(Step::Disconnect)
    }

    /// Runs the script on the server end of `stream`. The task returns the requests it
    /// expected, in order (negotiation excluded).
    pub fn serve<S>(self, stream: S) -> ServerTask
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        tokio::spawn(self.run(QmpPeer::new(stream)))
    }

    /// Creates a `UnixStream::pair()`, serves the script on one end and returns the other.
    pub fn pair(self) -> Result<(UnixStream, ServerTask), ScriptError> {
        let (client, server) = UnixStream::pair()?;
        Ok((client, self.serve(server)))
    }

    /// Binds a unix socket at `path`, accepts one connection and serves the script on it.
    pub fn listen(self, path: &Path) -> Result<ServerTask, ScriptError> {
        let listener = tokio::net::UnixListener::bind(path)?;
        Ok(tokio::spawn(async move {
            let (stream, _) = listener.accept().await?;
            self.run(QmpPeer::new(stream)).await
        }))
    }

    /// [`Self::pair`] plus [`Qmp::from_stream`] on the client end.
    pub async fn connect(self) -> Result<(Qmp, ServerTask), QmpError> {
        let (client, server) = UnixStream::pair()?;
        let handle = self.serve(server);
        Ok((Qmp::from_stream(client).await?, handle))
    }

    async fn run<S: AsyncRead + AsyncWrite>(
        self,
        mut peer: QmpPeer<S>,
    ) -> Result<Vec<ClientRequest>, ScriptError> {
        peer.handshake(&self.version).await?;
        let mut seen: Vec<ClientRequest> = Vec::new();
        for step in self.steps {
            match step {
                Step::Expect { execute, arguments } => {
                    seen.push(peer.expect(&execute, arguments.as_ref()).await?);
                }
                Step::Return(value) => {
                    let req = seen
                        .last()
                        .ok_or_else(|| ScriptError::Script("ret before any expect".into()))?;
                    peer.reply(req, &value).await?;
                }
                Step::ReturnTo { nth, value } => {
                    let req = seen.get(nth).ok_or_else(|| {
                        ScriptError::Script(format!("no expected request #{nth}"))
                    })?;
                    peer.reply(req, &value).await?;
                }
                Step::Error { class, desc } => {
                    let req = seen
                        .last()
                        .ok_or_else(|| ScriptError::Script("error before any expect".into()))?;
                    peer.reply_error(req, &class, &desc).await?;
                }
                Step::Event { name, data } => peer.send_event(&name, data.as_ref()).await?,
                Step::Raw(bytes) => peer.send_raw(&bytes).await?,
                Step::Sleep(d) => tokio::time::sleep(d).await,
                Step::Disconnect => return Ok(seen),
            }
        }
        // Script done: the client must not send anything else before it closes.
        match peer.next_request().await? {
            None => Ok(seen),
            Some(got) => Err(ScriptError::Unexpected {
                expected: "end of script (client close)".into(),
                got,
            }),
        }
    }
}
