//! Accept any HTTP/2 `:authority` on our unix-socket gRPC servers.
//!
//! gRPC clients that dial a unix socket often send the socket path as `:authority`: grpc-go
//! before the kubelet set `WithAuthority` (kubelets before 1.26, kubernetes#112597), Python's
//! grpcio, grpc-java, grpcurl. h2, the HTTP/2 layer under tonic, parses `:authority` as a URI
//! authority and answers a path with `RST_STREAM PROTOCOL_ERROR` (h2 `server.rs`, "malformed
//! authority"; hyperium/h2#487 open since 2020, hyperium/hyper#3750 closed: the maintainers ask
//! clients to change). h2 0.4.20 has no option to relax it, so vfplugd mends the requests itself.
//!
//! [`AuthorityRewriter`] is a sans-IO filter of the client→server byte stream: it forwards the
//! connection preface and every frame byte-for-byte, except header blocks (HEADERS plus
//! CONTINUATION). Those it HPACK-decodes, replaces an `:authority` that is not a valid URI
//! authority with `localhost` (a valid one is kept), and re-encodes as literals without
//! indexing. Literals never touch h2's dynamic table, so the only HPACK state to mirror is the
//! client's encoder table, kept by our decoder; dynamic table size updates are applied there and
//! not forwarded.
//!
//! A gRPC channel sends one `:authority` for the life of a connection, so the first header block
//! decides: when h2 would accept it (valid, or absent), that block goes out unchanged and the
//! whole connection passes through untouched from then on, at no cost (tonic's and newer
//! kubelets' connections). Only a connection whose first `:authority` h2 would refuse is
//! rewritten, every block of it. (A later per-call authority h2 refuses, on a connection that
//! began with a valid one, still meets h2's refusal, as without this filter.) [`AuthorityFixed`] puts the filter between an accepted socket and tonic; the
//! server→client direction is untouched.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// What an unusable `:authority` becomes.
pub const REPLACEMENT_AUTHORITY: &[u8] = b"localhost";

const FRAME_HEADER_LEN: usize = 9;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// SETTINGS_MAX_FRAME_SIZE's initial value: every HTTP/2 peer accepts frames this large, so the
/// re-encoded block is cut at this size whatever the server advertised.
const MAX_FRAME: usize = 16_384;
/// The dynamic table limit our servers advertise: h2's default SETTINGS_HEADER_TABLE_SIZE,
/// which tonic does not change. A client's size update above it is a decoding error, as in h2.
const SERVER_HEADER_TABLE_SIZE: usize = 4096;
/// Upper bound of one buffered header block (all its frames); h2 itself refuses header lists
/// over 16 KiB by default, so this only stops a client from making us buffer without end.
pub const MAX_HEADER_BLOCK: usize = 1 << 20;

/// Why the rewriter gave up on a connection. The connection is closed: h2 would have ended it
/// too (all of these are connection errors in RFC 9113).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RewriteError {
    /// The header block could not be HPACK-decoded (h2 would answer COMPRESSION_ERROR).
    #[error("HPACK decoding failed: {0}")]
    Hpack(String),
    /// A HEADERS frame without END_HEADERS was not followed by CONTINUATION on its stream.
    #[error(
        "expected CONTINUATION for stream {expected}, got frame type {got_type:#x} on stream {got_stream}"
    )]
    ExpectedContinuation {
        /// Stream of the open header block.
        expected: u32,
        /// Type of the frame that came instead.
        got_type: u8,
        /// Its stream.
        got_stream: u32,
    },
    /// CONTINUATION without an open header block.
    #[error("CONTINUATION on stream {0} without a header block open")]
    StrayContinuation(u32),
    /// Padding or priority fields longer than the HEADERS frame.
    #[error("malformed HEADERS frame on stream {0}")]
    MalformedHeaders(u32),
    /// One header block larger than [`MAX_HEADER_BLOCK`].
    #[error("header block larger than {MAX_HEADER_BLOCK} bytes")]
    BlockTooLarge,
}

/// Where the parser stands in the client's byte stream.
#[derive(Debug)]
enum Phase {
    /// Waiting for the 24-byte connection preface.
    Preface,
    /// Waiting for a 9-byte frame header.
    FrameHeader,
    /// Forwarding this many more payload bytes of a frame we do not touch.
    Forward(usize),
    /// Collecting the payload of a HEADERS or CONTINUATION frame.
    HeaderFrame(FrameHeader),
    /// Not HTTP/2 (bad preface) or an earlier error: everything passes unchanged, h2 answers.
    Passthrough,
}

#[derive(Debug, Clone, Copy)]
struct FrameHeader {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl FrameHeader {
    fn parse(b: &[u8]) -> Self {
        Self {
            len: (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }
}

/// A header block being collected across HEADERS and CONTINUATION frames.
#[derive(Debug)]
struct OpenBlock {
    /// The block's frames as received, kept only until the connection's mode is decided.
    raw: Option<Vec<u8>>,
    stream: u32,
    /// END_STREAM of the HEADERS frame.
    end_stream: bool,
    /// The 5 priority bytes of the HEADERS frame, when it had the PRIORITY flag.
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

/// The client→server filter (see the module docs). Feed it bytes as they arrive; it appends what
/// h2 should read to `out`.
pub struct AuthorityRewriter {
    phase: Phase,
    /// Bytes received but not yet consumed (a partial preface, frame header or header frame).
    pending: BytesMut,
    open: Option<OpenBlock>,
    decoder: loona_hpack::Decoder<'static>,
    rewritten: u64,
    /// Set once a block needed rewriting: from then on every block is re-encoded.
    rewriting: bool,
    /// Set when the first block went out unchanged: the rest of the connection passes through.
    pass_rest: bool,
}

impl std::fmt::Debug for AuthorityRewriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorityRewriter")
            .field("phase", &self.phase)
            .field("pending", &self.pending.len())
            .field("open", &self.open)
            .field("rewritten", &self.rewritten)
            .finish_non_exhaustive()
    }
}

impl Default for AuthorityRewriter {
    fn default() -> Self {
        Self::new()
    }
}

impl AuthorityRewriter {
    /// A filter for a new connection.
    pub fn new() -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(SERVER_HEADER_TABLE_SIZE);
        Self {
            phase: Phase::Preface,
            pending: BytesMut::new(),
            open: None,
            decoder,
            rewritten: 0,
            rewriting: false,
            pass_rest: false,
        }
    }

    /// Whether everything from now on passes unchanged and nothing is buffered, so the caller
    /// may read past the filter.
    pub fn is_transparent(&self) -> bool {
        matches!(self.phase, Phase::Passthrough) && self.pending.is_empty()
    }

    /// How many `:authority` values were replaced so far.
    pub fn rewritten(&self) -> u64 {
        self.rewritten
    }

    /// Consumes `input` and appends the bytes for the server to `out`. Incomplete frames are kept
    /// until more input arrives. After an error the connection must be closed.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), RewriteError> {
        self.pending.extend_from_slice(input);
        loop {
            match self.phase {
                Phase::Passthrough => {
                    out.extend_from_slice(&self.pending);
                    self.pending.clear();
                    return Ok(());
                }
                Phase::Preface => {
                    let n = self.pending.len().min(PREFACE.len());
                    if self.pending[..n] != PREFACE[..n] {
                        self.phase = Phase::Passthrough;
                        continue;
                    }
                    if n < PREFACE.len() {
                        return Ok(());
                    }
                    out.extend_from_slice(&self.pending.split_to(PREFACE.len()));
                    self.phase = Phase::FrameHeader;
                }
                Phase::FrameHeader => {
                    if self.pending.len() < FRAME_HEADER_LEN {
                        return Ok(());
                    }
                    let head = FrameHeader::parse(&self.pending[..FRAME_HEADER_LEN]);
                    if let Some(open) = &self.open
                        && (head.kind != TYPE_CONTINUATION || head.stream != open.stream)
                    {
                        return Err(RewriteError::ExpectedContinuation {
                            expected: open.stream,
                            got_type: head.kind,
                            got_stream: head.stream,
                        });
                    }
                    match head.kind {
                        TYPE_HEADERS | TYPE_CONTINUATION => {
                            if head.len > MAX_HEADER_BLOCK {
                                return Err(RewriteError::BlockTooLarge);
                            }
                            self.pending.advance(FRAME_HEADER_LEN);
                            self.phase = Phase::HeaderFrame(head);
                        }
                        _ => {
                            out.extend_from_slice(&self.pending.split_to(FRAME_HEADER_LEN));
                            self.phase = Phase::Forward(head.len);
                        }
                    }
                }
                Phase::Forward(left) => {
                    let n = left.min(self.pending.len());
                    out.extend_from_slice(&self.pending.split_to(n));
                    if n < left {
                        self.phase = Phase::Forward(left - n);
                        return Ok(());
                    }
                    self.phase = Phase::FrameHeader;
                }
                Phase::HeaderFrame(head) => {
                    if self.pending.len() < head.len {
                        return Ok(());
                    }
                    let payload = self.pending.split_to(head.len);
                    self.phase = Phase::FrameHeader;
                    self.header_frame(head, &payload, out)?;
                    if self.pass_rest {
                        self.phase = Phase::Passthrough;
                    }
                }
            }
        }
    }

    fn header_frame(
        &mut self,
        head: FrameHeader,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), RewriteError> {
        if head.kind == TYPE_HEADERS {
            let bad = || RewriteError::MalformedHeaders(head.stream);
            let mut body = payload;
            let mut pad = 0;
            if head.flags & FLAG_PADDED != 0 {
                let (&p, rest) = body.split_first().ok_or_else(bad)?;
                pad = usize::from(p);
                body = rest;
            }
            let mut priority = None;
            if head.flags & FLAG_PRIORITY != 0 {
                let (p, rest) = body.split_first_chunk::<5>().ok_or_else(bad)?;
                priority = Some(*p);
                body = rest;
            }
            if pad > body.len() {
                return Err(bad());
            }
            // Padding is dropped: it carries nothing and the re-encoded frames need none.
            let fragment = body[..body.len() - pad].to_vec();
            let raw = (!self.rewriting).then(|| raw_frame(head, payload));
            self.open = Some(OpenBlock {
                raw,
                stream: head.stream,
                end_stream: head.flags & FLAG_END_STREAM != 0,
                priority,
                fragment,
            });
        } else {
            let open = self
                .open
                .as_mut()
                .ok_or(RewriteError::StrayContinuation(head.stream))?;
            if open.fragment.len() + payload.len() > MAX_HEADER_BLOCK {
                return Err(RewriteError::BlockTooLarge);
            }
            open.fragment.extend_from_slice(payload);
            if let Some(raw) = &mut open.raw {
                raw.extend(raw_frame(head, payload));
            }
        }
        if head.flags & FLAG_END_HEADERS != 0
            && let Some(block) = self.open.take()
        {
            self.emit_block(&block, out)?;
        }
        Ok(())
    }

    fn emit_block(&mut self, block: &OpenBlock, out: &mut Vec<u8>) -> Result<(), RewriteError> {
        let mut encoded = Vec::with_capacity(block.fragment.len() * 2);
        let mut rewritten = 0;
        self.decoder
            .decode_with_cb(&block.fragment, |name, value| {
                let value: &[u8] = if &*name == b":authority" && !valid_authority(&value) {
                    rewritten += 1;
                    REPLACEMENT_AUTHORITY
                } else {
                    &value
                };
                encode_literal(&name, value, &mut encoded);
            })
            .map_err(|e| RewriteError::Hpack(e.to_string()))?;
        if rewritten > 0 {
            tracing::debug!(
                stream = block.stream,
                "replaced an :authority that is not a URI authority with localhost"
            );
        }
        self.rewritten += rewritten;
        match &block.raw {
            // The first block, and h2 accepts it as it is: so will it the rest of the connection.
            Some(raw) if rewritten == 0 && !self.rewriting => {
                out.extend_from_slice(raw);
                self.pass_rest = true;
            }
            _ => {
                self.rewriting = true;
                write_header_frames(block, &encoded, out);
            }
        }
        Ok(())
    }
}

/// Whether h2 accepts `value` as `:authority` (the same parser h2 uses).
/// `localhost` and `host:port` pass; a path, a percent-encoded path and an empty value do not.
pub fn valid_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

/// HPACK "literal header field without indexing — new name" (RFC 7541 §6.2.2), no Huffman.
fn encode_literal(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.push(0x00);
    encode_string(name, out);
    encode_string(value, out);
}

fn encode_string(s: &[u8], out: &mut Vec<u8>) {
    encode_integer(s.len(), 7, 0x00, out);
    out.extend_from_slice(s);
}

/// RFC 7541 §5.1 integer with an `prefix`-bit prefix; `high` holds the bits above the prefix.
fn encode_integer(mut v: usize, prefix: u32, high: u8, out: &mut Vec<u8>) {
    let max = (1usize << prefix) - 1;
    if v < max {
        // v < 2^prefix <= 128, so it fits a byte.
        out.push(high | v as u8);
        return;
    }
    out.push(high | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// One HEADERS frame (with the block's END_STREAM and priority) and as many CONTINUATION frames
/// as the block needs at [`MAX_FRAME`] bytes each; END_HEADERS on the last.
fn write_header_frames(block: &OpenBlock, encoded: &[u8], out: &mut Vec<u8>) {
    let prio_len = if block.priority.is_some() { 5 } else { 0 };
    let first_room = MAX_FRAME - prio_len;
    let (first, mut rest) = encoded.split_at(encoded.len().min(first_room));
    let mut flags = 0;
    if block.end_stream {
        flags |= FLAG_END_STREAM;
    }
    if block.priority.is_some() {
        flags |= FLAG_PRIORITY;
    }
    if rest.is_empty() {
        flags |= FLAG_END_HEADERS;
    }
    write_frame_header(
        prio_len + first.len(),
        TYPE_HEADERS,
        flags,
        block.stream,
        out,
    );
    if let Some(p) = block.priority {
        out.extend_from_slice(&p);
    }
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(MAX_FRAME));
        let flags = if tail.is_empty() { FLAG_END_HEADERS } else { 0 };
        write_frame_header(chunk.len(), TYPE_CONTINUATION, flags, block.stream, out);
        out.extend_from_slice(chunk);
        rest = tail;
    }
}

/// A received frame's bytes (the reserved stream-id bit, which receivers ignore, is cleared).
fn raw_frame(head: FrameHeader, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + payload.len());
    write_frame_header(payload.len(), head.kind, head.flags, head.stream, &mut out);
    out.extend_from_slice(payload);
    out
}

fn write_frame_header(len: usize, kind: u8, flags: u8, stream: u32, out: &mut Vec<u8>) {
    // len <= MAX_HEADER_BLOCK < 2^24.
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
}

/// An accepted connection with the client→server direction passed through an
/// [`AuthorityRewriter`]. Writes go to the inner stream unchanged.
#[derive(Debug)]
pub struct AuthorityFixed<S> {
    inner: S,
    rewriter: AuthorityRewriter,
    /// Rewritten bytes not yet handed to the reader.
    ready: BytesMut,
    scratch: Vec<u8>,
    eof: bool,
}

impl<S> AuthorityFixed<S> {
    /// Wraps an accepted stream.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            rewriter: AuthorityRewriter::new(),
            ready: BytesMut::new(),
            scratch: Vec::new(),
            eof: false,
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.ready.is_empty() && this.rewriter.is_transparent() {
            // The usual connection after its first request: read straight into the caller's
            // buffer, no copy.
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let mut chunk = [0u8; 16 * 1024];
        // A read that completes only part of a frame yields no output; read again rather than
        // return an empty read, which the caller would take for end of stream.
        while this.ready.is_empty() && !this.eof {
            let mut rb = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            let got = rb.filled();
            if got.is_empty() {
                this.eof = true;
                break;
            }
            this.scratch.clear();
            this.rewriter
                .feed(got, &mut this.scratch)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            this.ready.extend_from_slice(&this.scratch);
        }
        let n = this.ready.len().min(buf.remaining());
        buf.put_slice(&this.ready.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected
    for AuthorityFixed<S>
{
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Accepts connections on `listener`, each wrapped in [`AuthorityFixed`]: the incoming stream
/// for tonic's `serve_with_incoming*`.
pub fn incoming(
    listener: tokio::net::UnixListener,
) -> impl futures::Stream<Item = io::Result<AuthorityFixed<tokio::net::UnixStream>>> {
    use futures::StreamExt;
    tokio_stream::wrappers::UnixListenerStream::new(listener).map(|c| c.map(AuthorityFixed::new))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_frame_header(payload.len(), kind, flags, stream, &mut out);
        out.extend_from_slice(payload);
        out
    }

    fn encoder_block(headers: &[(&[u8], &[u8])], enc: &mut loona_hpack::Encoder<'_>) -> Vec<u8> {
        enc.encode(headers.iter().copied())
    }

    /// Splits the server-side stream back into frames and decodes every header block with a
    /// fresh decoder per connection (as h2 would), returning (stream, flags, headers).
    type Decoded = Vec<(u32, u8, Vec<(Vec<u8>, Vec<u8>)>)>;
    fn server_view(bytes: &[u8]) -> (Vec<u8>, Decoded) {
        assert!(bytes.starts_with(PREFACE));
        let mut rest = &bytes[PREFACE.len()..];
        let mut dec = loona_hpack::Decoder::new();
        let mut others = Vec::new();
        let mut blocks = Vec::new();
        let mut open: Option<(u32, u8, Vec<u8>)> = None;
        while !rest.is_empty() {
            let h = FrameHeader::parse(&rest[..9]);
            let payload = &rest[9..9 + h.len];
            match h.kind {
                TYPE_HEADERS => {
                    assert!(open.is_none());
                    assert_eq!(h.flags & FLAG_PADDED, 0, "we never emit padding");
                    let body = if h.flags & FLAG_PRIORITY != 0 {
                        &payload[5..]
                    } else {
                        payload
                    };
                    open = Some((h.stream, h.flags, body.to_vec()));
                }
                TYPE_CONTINUATION => {
                    let o = open.as_mut().expect("continuation after headers");
                    assert_eq!(o.0, h.stream);
                    o.2.extend_from_slice(payload);
                }
                _ => others.extend_from_slice(&rest[..9 + h.len]),
            }
            if matches!(h.kind, TYPE_HEADERS | TYPE_CONTINUATION) && h.flags & FLAG_END_HEADERS != 0
            {
                let (s, f, b) = open.take().expect("open block");
                blocks.push((s, f, dec.decode(&b).expect("server decodes")));
            }
            rest = &rest[9 + h.len..];
        }
        (others, blocks)
    }

    fn run(input: &[u8], split: usize) -> Vec<u8> {
        let mut rw = AuthorityRewriter::new();
        let mut out = Vec::new();
        for chunk in input.chunks(split.max(1)) {
            rw.feed(chunk, &mut out).expect("feed");
        }
        out
    }

    #[test]
    fn socket_path_becomes_localhost_and_valid_authorities_stay() {
        let mut enc = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        for (i, auth) in [
            &b"/var/lib/kubelet/device-plugins/vfplug-x.sock"[..],
            b"%2Fvar%2Flib%2Fkubelet%2Fvfplug.sock",
            b"vfplug.example:50051",
            b"unix:/run/vfplug.sock",
            b"",
        ]
        .iter()
        .enumerate()
        {
            let block = encoder_block(
                &[
                    (b":method", b"POST"),
                    (b":scheme", b"http"),
                    (b":authority", auth),
                    (b":path", b"/v1beta1.DevicePlugin/ListAndWatch"),
                    (b"te", b"trailers"),
                ],
                &mut enc,
            );
            input.extend(frame(
                TYPE_HEADERS,
                FLAG_END_HEADERS,
                2 * i as u32 + 1,
                &block,
            ));
            input.extend(frame(0x0, FLAG_END_STREAM, 2 * i as u32 + 1, b"\0\0\0\0\0"));
        }
        for split in [1, 7, 100, usize::MAX] {
            let (others, blocks) = server_view(&run(&input, split));
            let auths: Vec<_> = blocks
                .iter()
                .map(|(_, _, h)| {
                    h.iter()
                        .find(|(n, _)| n == b":authority")
                        .map(|(_, v)| v.clone())
                })
                .collect();
            // h2 refuses the percent-encoded path too ('%' is no authority character).
            let expect: Vec<Option<Vec<u8>>> = vec![
                Some(b"localhost".to_vec()),
                Some(b"localhost".to_vec()),
                Some(b"vfplug.example:50051".to_vec()),
                Some(b"localhost".to_vec()),
                Some(b"localhost".to_vec()),
            ];
            assert_eq!(auths, expect, "split {split}");
            // SETTINGS and five DATA frames pass unchanged.
            assert_eq!(others.len(), 9 + 5 * 14);
            assert!(
                blocks
                    .iter()
                    .all(|(_, _, h)| h[0] == (b":method".to_vec(), b"POST".to_vec()))
            );
        }
    }

    #[test]
    fn padding_priority_continuation_and_end_stream_are_honoured() {
        let mut enc = loona_hpack::Encoder::new();
        let block = encoder_block(
            &[
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":authority", b"/a/b.sock"),
                (b":path", b"/x/Y"),
                (b"x-long", &[b'v'; 40][..]),
            ],
            &mut enc,
        );
        let (a, b) = block.split_at(block.len() / 2);
        let mut payload = vec![3u8]; // pad length
        payload.extend_from_slice(&[0x80, 0, 0, 1, 15]); // exclusive dep on 1, weight 15
        payload.extend_from_slice(a);
        payload.extend_from_slice(&[0, 0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_PADDED | FLAG_PRIORITY | FLAG_END_STREAM,
            3,
            &payload,
        ));
        input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 3, b));
        let out = run(&input, 5);
        let h = FrameHeader::parse(&out[PREFACE.len()..PREFACE.len() + 9]);
        assert_eq!(h.kind, TYPE_HEADERS);
        assert_eq!(h.flags, FLAG_PRIORITY | FLAG_END_STREAM | FLAG_END_HEADERS);
        assert_eq!(
            &out[PREFACE.len() + 9..PREFACE.len() + 14],
            &[0x80, 0, 0, 1, 15]
        );
        let (_, blocks) = server_view(&out);
        assert_eq!(blocks.len(), 1);
        assert_eq!(
            blocks[0].2[2],
            (b":authority".to_vec(), b"localhost".to_vec())
        );
        assert_eq!(blocks[0].2[4].1, vec![b'v'; 40]);
    }

    #[test]
    fn large_block_is_cut_into_continuations() {
        let mut enc = loona_hpack::Encoder::new();
        let big = vec![b'x'; 40_000];
        let block = encoder_block(
            &[
                (b":method", b"POST"),
                (b":authority", b"/s.sock"),
                (b"x-big", &big),
            ],
            &mut enc,
        );
        let mut input = PREFACE.to_vec();
        // The client may send frames up to the server's SETTINGS_MAX_FRAME_SIZE; pretend large.
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block));
        let out = run(&input, 4096);
        let mut rest = &out[PREFACE.len()..];
        let mut kinds = Vec::new();
        while !rest.is_empty() {
            let h = FrameHeader::parse(rest);
            assert!(h.len <= MAX_FRAME);
            kinds.push((h.kind, h.flags & FLAG_END_HEADERS != 0));
            rest = &rest[9 + h.len..];
        }
        assert_eq!(kinds, vec![(1, false), (9, false), (9, true)]);
        let (_, blocks) = server_view(&out);
        assert_eq!(blocks[0].2[2].1, big);
    }

    #[test]
    fn dynamic_table_and_size_updates_are_mirrored() {
        // Size update to 0 (evicts everything) then back to 4096, in a later block.
        let mut enc = loona_hpack::Encoder::new();
        let b1 = encoder_block(&[(b":authority", b"/p.sock"), (b"x-a", b"1")], &mut enc);
        let b2 = encoder_block(&[(b":authority", b"/p.sock"), (b"x-a", b"1")], &mut enc);
        let mut b3 = vec![0x20, 0x3f, 0xe1, 0x1f]; // size update 0, then 4096
        b3.extend(encoder_block(
            &[(b"x-b", b"2")],
            &mut loona_hpack::Encoder::new(),
        ));
        let mut input = PREFACE.to_vec();
        for (i, b) in [b1, b2, b3].iter().enumerate() {
            input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 2 * i as u32 + 1, b));
        }
        let (_, blocks) = server_view(&run(&input, 3));
        assert_eq!(blocks[1].2, blocks[0].2);
        assert_eq!(blocks[1].2[0].1, b"localhost".to_vec());
        assert_eq!(blocks[2].2, vec![(b"x-b".to_vec(), b"2".to_vec())]);
    }

    #[test]
    fn size_update_beyond_the_server_limit_is_an_error() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS,
            1,
            &[0x3f, 0xe1, 0x3f, 0x82],
        ));
        let mut out = Vec::new();
        let err = AuthorityRewriter::new().feed(&input, &mut out).unwrap_err();
        assert!(matches!(err, RewriteError::Hpack(_)), "{err}");
    }

    #[test]
    fn protocol_violations_are_errors() {
        let mut enc = loona_hpack::Encoder::new();
        let block = encoder_block(&[(b":method", b"GET")], &mut enc);
        let mut input = PREFACE.to_vec();
        input.extend(frame(TYPE_HEADERS, 0, 1, &block));
        input.extend(frame(0x0, 0, 1, b"x"));
        let err = AuthorityRewriter::new()
            .feed(&input, &mut Vec::new())
            .unwrap_err();
        assert!(matches!(
            err,
            RewriteError::ExpectedContinuation {
                expected: 1,
                got_type: 0,
                ..
            }
        ));

        let mut input = PREFACE.to_vec();
        input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, &block));
        let err = AuthorityRewriter::new()
            .feed(&input, &mut Vec::new())
            .unwrap_err();
        assert_eq!(err, RewriteError::StrayContinuation(1));

        let mut input = PREFACE.to_vec();
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_PADDED | FLAG_END_HEADERS,
            1,
            &[9, 0x82],
        ));
        let err = AuthorityRewriter::new()
            .feed(&input, &mut Vec::new())
            .unwrap_err();
        assert_eq!(err, RewriteError::MalformedHeaders(1));
    }

    #[test]
    fn a_connection_that_starts_with_a_valid_authority_passes_byte_for_byte() {
        let mut enc = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[0, 4, 0, 1, 0, 0]));
        let b1 = encoder_block(
            &[(b":method", b"POST"), (b":authority", b"localhost")],
            &mut enc,
        );
        // Padded, with a CONTINUATION: forwarded as it came.
        let (a, b) = b1.split_at(2);
        let mut p = vec![2u8];
        p.extend_from_slice(a);
        p.extend_from_slice(&[0, 0]);
        input.extend(frame(TYPE_HEADERS, FLAG_PADDED, 1, &p));
        input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, b));
        input.extend(frame(0x0, FLAG_END_STREAM, 1, b"\0\0\0\0\0"));
        // Even bytes that are no valid HPACK pass: h2 judges them, not the filter.
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS,
            3,
            &[0xff, 0xff, 0xff],
        ));
        let mut rw = AuthorityRewriter::new();
        let mut out = Vec::new();
        for chunk in input.chunks(3) {
            rw.feed(chunk, &mut out).expect("feed");
        }
        assert_eq!(out, input);
        assert_eq!(rw.rewritten(), 0);
        // Without any :authority, too.
        let mut enc = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        let blk = encoder_block(&[(b":method", b"POST"), (b":path", b"/a/B")], &mut enc);
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &blk));
        assert_eq!(run(&input, 1), input);
    }

    #[test]
    fn not_http2_passes_unchanged() {
        let input = b"GET / HTTP/1.1\r\nHost: /x.sock\r\n\r\n";
        assert_eq!(run(input, 3), input.to_vec());
    }

    #[test]
    fn integers_round_trip_through_the_decoder() {
        for len in [0usize, 1, 126, 127, 128, 255, 300, 16_383, 70_000] {
            let mut block = Vec::new();
            encode_literal(b"x-n", &vec![b'a'; len], &mut block);
            let got = loona_hpack::Decoder::new().decode(&block).expect("decode");
            assert_eq!(got, vec![(b"x-n".to_vec(), vec![b'a'; len])]);
        }
    }
    mod props {
        use super::*;
        use proptest::prelude::*;

        /// h2's own check (`Authority::from_maybe_shared`), independent of the code under test.
        fn h2_refuses(v: &[u8]) -> bool {
            http::uri::Authority::from_maybe_shared(bytes::Bytes::copy_from_slice(v)).is_err()
        }

        fn authority() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                "/[a-z/]{1,40}\\.sock".prop_map(String::into_bytes),
                "%2F[a-z%2F]{1,30}".prop_map(String::into_bytes),
                "[a-z]{1,10}(\\.[a-z]{1,5})?(:[0-9]{1,5})?".prop_map(String::into_bytes),
                Just(b"localhost".to_vec()),
                Just(Vec::new()),
                proptest::collection::vec(any::<u8>(), 0..20),
            ]
        }

        /// One request: its header list (pseudo-headers first) and how its block is framed.
        #[derive(Debug, Clone)]
        struct Req {
            headers: Vec<(Vec<u8>, Vec<u8>)>,
            cuts: Vec<usize>,
            pad: Option<u8>,
            priority: bool,
            end_stream: bool,
            data_after: Vec<u8>,
        }

        fn req() -> impl Strategy<Value = Req> {
            (
                proptest::option::of(authority()),
                proptest::collection::vec(("x-[a-z]{1,8}", "[ -~]{0,60}"), 0..6),
                proptest::collection::vec(0usize..200, 0..4),
                proptest::option::of(any::<u8>()),
                any::<bool>(),
                any::<bool>(),
                proptest::collection::vec(any::<u8>(), 0..40),
            )
                .prop_map(
                    |(auth, extra, cuts, pad, priority, end_stream, data_after)| {
                        let mut headers = vec![
                            (b":method".to_vec(), b"POST".to_vec()),
                            (b":scheme".to_vec(), b"http".to_vec()),
                        ];
                        if let Some(a) = auth {
                            headers.push((b":authority".to_vec(), a));
                        }
                        headers.push((
                            b":path".to_vec(),
                            b"/v1beta1.DevicePlugin/Allocate".to_vec(),
                        ));
                        headers.extend(
                            extra
                                .into_iter()
                                .map(|(n, v)| (n.into_bytes(), v.into_bytes())),
                        );
                        Req {
                            headers,
                            cuts,
                            pad,
                            priority,
                            end_stream,
                            data_after,
                        }
                    },
                )
        }

        fn framed(r: &Req, stream: u32, block: &[u8]) -> Vec<u8> {
            let mut cuts: Vec<usize> = r.cuts.iter().map(|c| c % (block.len() + 1)).collect();
            cuts.sort_unstable();
            cuts.dedup();
            let mut pieces = Vec::new();
            let mut at = 0;
            for c in cuts {
                pieces.push(&block[at..c]);
                at = c;
            }
            pieces.push(&block[at..]);
            let mut out = Vec::new();
            for (i, piece) in pieces.iter().enumerate() {
                let last = i + 1 == pieces.len();
                let mut flags = if last { FLAG_END_HEADERS } else { 0 };
                let mut payload = Vec::new();
                if i == 0 {
                    if r.end_stream {
                        flags |= FLAG_END_STREAM;
                    }
                    if let Some(p) = r.pad {
                        flags |= FLAG_PADDED;
                        payload.push(p);
                    }
                    if r.priority {
                        flags |= FLAG_PRIORITY;
                        payload.extend_from_slice(&[0, 0, 0, 0, 16]);
                    }
                    payload.extend_from_slice(piece);
                    payload.extend(std::iter::repeat_n(0u8, usize::from(r.pad.unwrap_or(0))));
                    out.extend(frame(TYPE_HEADERS, flags, stream, &payload));
                } else {
                    out.extend(frame(TYPE_CONTINUATION, flags, stream, piece));
                }
            }
            out.extend(frame(0x0, 0, stream, &r.data_after));
            out
        }

        proptest! {
            #[test]
            fn only_unusable_authorities_change(
                reqs in proptest::collection::vec(req(), 1..6),
                table in prop_oneof![Just(4096usize), Just(0), Just(256)],
                split in 1usize..64,
            ) {
                let mut enc = loona_hpack::Encoder::new();
                let mut input = PREFACE.to_vec();
                input.extend(frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]));
                let mut want_others = frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]);
                for (i, r) in reqs.iter().enumerate() {
                    let stream = 2 * i as u32 + 1;
                    let mut block = Vec::new();
                    if i == 0 && table != 4096 {
                        // A dynamic table size update, as an encoder with a smaller table sends.
                        encode_integer(table, 5, 0x20, &mut block);
                        enc.set_max_table_size(table);
                    }
                    let pairs: Vec<(&[u8], &[u8])> =
                        r.headers.iter().map(|(n, v)| (&n[..], &v[..])).collect();
                    block.extend(enc.encode(pairs));
                    input.extend(framed(r, stream, &block));
                    want_others.extend(frame(0x0, 0, stream, &r.data_after));
                }
                let out = run(&input, split);
                // The first block decides: rewrite the connection when h2 would refuse its
                // :authority, else pass everything through unchanged.
                let rewrite = reqs[0]
                    .headers
                    .iter()
                    .any(|(n, v)| n == b":authority" && h2_refuses(v));
                if !rewrite {
                    prop_assert_eq!(out, input);
                    return Ok(());
                }
                let (others, blocks) = server_view(&out);
                prop_assert_eq!(others, want_others);
                prop_assert_eq!(blocks.len(), reqs.len());
                for (i, (r, (stream, flags, got))) in reqs.iter().zip(&blocks).enumerate() {
                    prop_assert_eq!(*stream, 2 * i as u32 + 1);
                    prop_assert_eq!(flags & FLAG_END_STREAM != 0, r.end_stream);
                    prop_assert_eq!(flags & FLAG_PRIORITY != 0, r.priority);
                    let want: Vec<(Vec<u8>, Vec<u8>)> = r
                        .headers
                        .iter()
                        .map(|(n, v)| {
                            if n == b":authority" && h2_refuses(v) {
                                (n.clone(), b"localhost".to_vec())
                            } else {
                                (n.clone(), v.clone())
                            }
                        })
                        .collect();
                    prop_assert_eq!(got, &want);
                    // Whatever the server now sees as :authority, h2 accepts.
                    for (n, v) in got {
                        if n == b":authority" {
                            prop_assert!(!h2_refuses(v));
                        }
                    }
                }
            }
        }
    }
}
