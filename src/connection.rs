//! One WebSocket connection's I/O: reading frames through the [`Decoder`] and writing
//! queued frames with vectored writes, both driven by polling, so that one task can read
//! and write the same socket without splitting it (no lock, no second task).
//!
//! Memory is held only while in use. Reads go into one scratch buffer per worker thread,
//! and the decoder copies out what it needs, so an idle connection keeps no read buffer;
//! only when the caller stops reading mid-buffer (its publisher is paused, or it waits for
//! memory) are the unread bytes kept, and given back once read. Writes take each frame's
//! shared payload as it is — the header in a few inline bytes, the payload by reference —
//! so a frame delivered to a thousand members is never copied into a thousand buffers, and
//! the queue of a connection with nothing to send is empty and unallocated.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::budget::Reservation;
use crate::frame::{Frame, FrameKind};
use crate::websocket::{self, Decoded, Decoder, Opcode, ProtocolError, Role};

/// A connection's byte stream, plain or TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The byte stream every connection is served on, whatever is below it.
pub type BoxedIo = Pin<Box<dyn Io>>;

/// Size of each worker thread's read buffer.
const SCRATCH: usize = 32 * 1024;

/// Slices handed to one vectored write.
const MAX_SLICES: usize = 64;

/// Write queues kept per worker thread for reuse; a connection holds one only while it
/// has something to write.
const POOLED_QUEUES: usize = 256;

thread_local! {
    static SCRATCH_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; SCRATCH]);
    static QUEUES: RefCell<Vec<VecDeque<Segment>>> = const { RefCell::new(Vec::new()) };
    static BUFFERS: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// An empty write buffer for at least `len` bytes, reused if the thread has one.
fn take_buffer(len: usize) -> Vec<u8> {
    if len <= BUFFER {
        if let Some(buf) = BUFFERS.with(|pool| pool.borrow_mut().pop()) {
            return buf;
        }
    }
    Vec::with_capacity(len.max(BUFFER))
}

/// Gives a written buffer back for reuse.
fn give_buffer(mut buf: Vec<u8>) {
    if buf.capacity() != BUFFER {
        return;
    }
    buf.clear();
    BUFFERS.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < POOLED_QUEUES {
            pool.push(buf);
        }
    });
}

/// An empty write queue, reused if the thread has one.
fn take_queue() -> VecDeque<Segment> {
    QUEUES
        .with(|pool| pool.borrow_mut().pop())
        .unwrap_or_default()
}

/// Gives an emptied write queue back for reuse (a large one is dropped instead).
fn give_queue(queue: VecDeque<Segment>) {
    if queue.capacity() == 0 || queue.capacity() > 1024 {
        return;
    }
    QUEUES.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < POOLED_QUEUES {
            pool.push(queue);
        }
    });
}

/// What the reader found, for the caller's handler.
#[derive(Debug)]
pub enum Event {
    Message(Frame),
    Ping(Bytes),
    Pong,
    Close(Option<websocket::Close>),
}

/// The handler's answer: go on, or stop reading for now (the unread input is kept).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// Why reading stopped.
#[derive(Debug)]
pub enum ReadStop {
    /// The handler said [`Flow::Stop`].
    Stopped,
    /// A data frame of this many bytes needs memory: [`Connection::grant`] it, then read on.
    NeedMemory(usize),
    /// The peer closed the connection (end of stream).
    Eof,
}

/// Reading failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Payloads up to this size are copied into the write buffer; larger ones are written
/// from the frame's shared bytes. Copying a small payload costs less than sharing it
/// (a reference count touched by every member's core, and a slice of its own per write).
const COPY_LIMIT: usize = 2048;

/// Size of each write buffer.
const BUFFER: usize = 16 * 1024;

/// Part of what is queued for writing: copied bytes (headers and small payloads), or a
/// large payload by reference.
enum Segment {
    Copied(Vec<u8>),
    Shared(Bytes),
}

impl Segment {
    fn bytes(&self) -> &[u8] {
        match self {
            Segment::Copied(bytes) => bytes,
            Segment::Shared(bytes) => bytes,
        }
    }
}

/// A WebSocket over `S`, after the upgrade.
pub struct Connection<S> {
    io: S,
    role: Role,
    decoder: Decoder,
    /// Input read but not decoded yet, kept only while the caller stopped reading.
    unread: Vec<u8>,
    unread_at: usize,
    queue: VecDeque<Segment>,
    /// Bytes of the front segment already written.
    front_written: usize,
    queued_bytes: usize,
    /// Written but maybe still buffered below us (TLS): flush before going idle.
    needs_flush: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// A connection over `io` in `role`, with `leftover` bytes that were read past the
    /// upgrade request, refusing messages over `max_message` bytes.
    pub fn new(io: S, role: Role, max_message: usize, leftover: Bytes) -> Connection<S> {
        Connection {
            io,
            role,
            decoder: Decoder::new(role, max_message),
            unread: leftover.to_vec(),
            unread_at: 0,
            queue: VecDeque::new(),
            front_written: 0,
            queued_bytes: 0,
            needs_flush: false,
        }
    }

    /// Gives the data frame announced by [`ReadStop::NeedMemory`] its memory.
    pub fn grant(&mut self, reservation: Reservation) {
        self.decoder.grant(reservation);
    }

    /// Reads and decodes until the socket has nothing more, calling `handle` for each
    /// event, or until `handle` stops, memory is needed and `grant` has none, or the peer
    /// closed. `grant` is asked for each data frame's memory as its header arrives.
    pub fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        mut grant: impl FnMut(usize) -> Option<Reservation>,
        mut handle: impl FnMut(Event) -> Flow,
    ) -> Poll<Result<ReadStop, ReadError>> {
        loop {
            if self.unread_at < self.unread.len() {
                let input = std::mem::take(&mut self.unread);
                let rest = &input[self.unread_at..];
                let (used, stop) = decode(&mut self.decoder, rest, &mut grant, &mut handle)?;
                self.unread = input;
                self.unread_at += used;
                if self.unread_at >= self.unread.len() {
                    // All given back: hold no buffer while idle.
                    self.unread = Vec::new();
                    self.unread_at = 0;
                }
                if let Some(stop) = stop {
                    return Poll::Ready(Ok(stop));
                }
                continue;
            }
            let io = &mut self.io;
            let decoder = &mut self.decoder;
            let result = SCRATCH_BUF.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                let mut buf = ReadBuf::new(&mut scratch[..]);
                match Pin::new(io).poll_read(cx, &mut buf) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Err(e)) => Poll::Ready(Err(ReadError::Io(e))),
                    Poll::Ready(Ok(())) if buf.filled().is_empty() => {
                        Poll::Ready(Ok((Some(ReadStop::Eof), Vec::new())))
                    }
                    Poll::Ready(Ok(())) => {
                        let input = buf.filled();
                        let (used, stop) = decode(decoder, input, &mut grant, &mut handle)?;
                        // Stopped mid-buffer: keep what was not decoded.
                        let rest = input[used..].to_vec();
                        Poll::Ready(Ok((stop, rest)))
                    }
                }
            });
            match result {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok((stop, rest))) => {
                    if !rest.is_empty() {
                        self.unread = rest;
                        self.unread_at = 0;
                    }
                    if let Some(stop) = stop {
                        return Poll::Ready(Ok(stop));
                    }
                }
            }
        }
    }

    /// Queues a data frame.
    pub fn queue_frame(&mut self, frame: &Frame) {
        let opcode = match frame.kind() {
            FrameKind::Text => Opcode::Text,
            FrameKind::Binary => Opcode::Binary,
        };
        self.queue_payload(opcode, None, frame.data().clone());
    }

    /// Queues a binary frame made of `prefix` followed by `payload` (an envelope), without
    /// copying the payload.
    pub fn queue_prefixed(&mut self, prefix: &[u8], payload: Bytes) {
        self.queue_payload(Opcode::Binary, Some(prefix), payload);
    }

    /// Queues a control frame (ping, pong, close) with `payload` (at most 125 bytes).
    pub fn queue_control(&mut self, opcode: Opcode, payload: &[u8]) {
        let payload = &payload[..payload.len().min(websocket::MAX_CONTROL)];
        self.queue_payload(opcode, None, Bytes::copy_from_slice(payload));
    }

    fn queue_payload(&mut self, opcode: Opcode, prefix: Option<&[u8]>, payload: Bytes) {
        let prefix = prefix.unwrap_or_default();
        let len = prefix.len() + payload.len();
        if self.queue.capacity() == 0 {
            self.queue = take_queue();
        }
        match self.role {
            Role::Server => {
                let (header, n) = websocket::header(opcode, len, None);
                self.append(&header[..n]);
                self.append(prefix);
                if payload.len() <= COPY_LIMIT {
                    self.append(&payload);
                } else {
                    self.queued_bytes += payload.len();
                    self.queue.push_back(Segment::Shared(payload));
                }
            }
            Role::Client => {
                // A client masks what it sends, so the payload is copied once anyway.
                let key = mask_key();
                let (header, n) = websocket::header(opcode, len, Some(key));
                let mut body = Vec::with_capacity(len);
                body.extend_from_slice(prefix);
                body.extend_from_slice(&payload);
                websocket::mask(&mut body, key, 0);
                self.append(&header[..n]);
                if body.len() <= COPY_LIMIT {
                    self.append(&body);
                } else {
                    self.queued_bytes += body.len();
                    self.queue.push_back(Segment::Shared(Bytes::from(body)));
                }
            }
        }
    }

    /// Copies `data` to the end of the queue: into the last buffer if it has room, else a
    /// new one.
    fn append(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        self.queued_bytes += data.len();
        if let Some(Segment::Copied(buf)) = self.queue.back_mut() {
            if buf.len() + data.len() <= buf.capacity() {
                buf.extend_from_slice(data);
                return;
            }
        }
        let mut buf = take_buffer(data.len());
        buf.extend_from_slice(data);
        self.queue.push_back(Segment::Copied(buf));
    }

    /// Bytes queued and not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// True when nothing is queued and nothing waits in a buffer below us.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty() && !self.needs_flush
    }

    /// Writes what is queued, then flushes. Ready once all of it is written and flushed.
    pub fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.queue.is_empty() {
            let mut slices: [IoSlice<'_>; MAX_SLICES] = [IoSlice::new(&[]); MAX_SLICES];
            let mut count = 0;
            for (i, segment) in self.queue.iter().take(MAX_SLICES).enumerate() {
                let skip = if i == 0 { self.front_written } else { 0 };
                slices[count] = IoSlice::new(&segment.bytes()[skip..]);
                count += 1;
            }
            let n = match Pin::new(&mut self.io).poll_write_vectored(cx, &slices[..count]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            };
            self.needs_flush = true;
            self.advance(n);
        }
        if self.needs_flush {
            match Pin::new(&mut self.io).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.needs_flush = false,
                other => return other,
            }
        }
        if self.queue.capacity() > 0 {
            // Idle: the queue goes back to the thread's pool.
            give_queue(std::mem::take(&mut self.queue));
        }
        Poll::Ready(Ok(()))
    }

    fn advance(&mut self, mut n: usize) {
        self.queued_bytes -= n;
        while n > 0 {
            let Some(front) = self.queue.front() else {
                break;
            };
            let left = front.bytes().len() - self.front_written;
            if n < left {
                self.front_written += n;
                return;
            }
            n -= left;
            self.front_written = 0;
            if let Some(Segment::Copied(buf)) = self.queue.pop_front() {
                give_buffer(buf);
            }
        }
    }

    /// Shuts the write side down (after a close frame was written).
    pub fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Feeds `input` to the decoder and the events to `handle`. Returns the bytes consumed and
/// why it stopped early, if it did.
fn decode(
    decoder: &mut Decoder,
    input: &[u8],
    grant: &mut impl FnMut(usize) -> Option<Reservation>,
    handle: &mut impl FnMut(Event) -> Flow,
) -> Result<(usize, Option<ReadStop>), ProtocolError> {
    let mut at = 0;
    while at < input.len() {
        let (used, decoded) = decoder.decode(&input[at..])?;
        at += used;
        let event = match decoded {
            None => continue,
            Some(Decoded::NeedMemory(n)) => match grant(n) {
                Some(reservation) => {
                    decoder.grant(reservation);
                    continue;
                }
                None => return Ok((at, Some(ReadStop::NeedMemory(n)))),
            },
            Some(Decoded::Message(frame)) => Event::Message(frame),
            Some(Decoded::Ping(payload)) => Event::Ping(payload),
            Some(Decoded::Pong) => Event::Pong,
            Some(Decoded::Close(close)) => Event::Close(close),
        };
        if handle(event) == Flow::Stop {
            return Ok((at, Some(ReadStop::Stopped)));
        }
    }
    Ok((at, None))
}

/// A fresh masking key for a frame a client sends.
fn mask_key() -> [u8; 4] {
    let mut key = [0u8; 4];
    // Masking protects intermediaries, not secrets; a weak key only weakens that.
    if getrandom::getrandom(&mut key).is_err() {
        key = (std::process::id() ^ 0x5bd1_e995).to_ne_bytes();
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::{Budget, Need};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn frames_cross_a_real_socket_pair_both_ways() {
        let (a, b) = tokio::io::duplex(64);
        let mut server = Connection::new(a, Role::Server, 1 << 20, Bytes::new());
        let mut client = Connection::new(b, Role::Client, 1 << 20, Bytes::new());
        let budget = Budget::new(1 << 20);
        client.queue_frame(&Frame::text("hello"));
        client.queue_frame(&Frame::binary(vec![9u8; 5000]));
        client.queue_control(Opcode::Ping, b"p");
        let mut got = Vec::new();
        std::future::poll_fn(|cx| {
            let _ = client.poll_write(cx);
            loop {
                let step = server.poll_read(
                    cx,
                    |_| None,
                    |event| {
                        got.push(format!("{event:?}"));
                        Flow::Continue
                    },
                );
                match step {
                    Poll::Ready(Ok(ReadStop::NeedMemory(n))) => {
                        server.grant(budget.try_reserve(n, Need::Service).unwrap())
                    }
                    Poll::Ready(other) => panic!("{other:?}"),
                    Poll::Pending if got.len() == 3 => return Poll::Ready(()),
                    Poll::Pending => {
                        let _ = client.poll_write(cx);
                        return Poll::Pending;
                    }
                }
            }
        })
        .await;
        assert_eq!(got[0], "Message(Text(\"hello\"))");
        assert_eq!(got[1], "Message(Binary(5000 bytes))");
        assert_eq!(got[2], "Ping(b\"p\")");
        // The server's frames are unmasked and arrive whole.
        server.queue_frame(&Frame::text("back"));
        std::future::poll_fn(|cx| server.poll_write(cx))
            .await
            .unwrap();
        assert!(server.is_idle());
        let mut raw = [0u8; 6];
        let (mut read_half, _) = tokio::io::split(client.io);
        read_half.read_exact(&mut raw).await.unwrap();
        assert_eq!(&raw, b"\x81\x04back");
    }

    #[tokio::test]
    async fn a_stop_keeps_the_rest_for_later() {
        let (mut raw, b) = tokio::io::duplex(1 << 16);
        let mut conn = Connection::new(b, Role::Client, 1 << 20, Bytes::from_static(b"\x81\x01a"));
        raw.write_all(b"\x81\x01b\x81\x01c").await.unwrap();
        let budget = Budget::new(1 << 20);
        let mut seen = Vec::new();
        while seen.len() < 3 {
            let step = std::future::poll_fn(|cx| {
                conn.poll_read(
                    cx,
                    |_| None,
                    |event| {
                        seen.push(format!("{event:?}"));
                        Flow::Stop
                    },
                )
            })
            .await
            .unwrap();
            match step {
                ReadStop::NeedMemory(n) => {
                    conn.grant(budget.try_reserve(n, Need::Service).unwrap())
                }
                ReadStop::Stopped => {}
                ReadStop::Eof => panic!("ended early"),
            }
        }
        assert_eq!(
            seen,
            [
                "Message(Text(\"a\"))",
                "Message(Text(\"b\"))",
                "Message(Text(\"c\"))"
            ]
        );
        assert!(conn.unread.capacity() == 0, "nothing held once all is read");
    }
}
