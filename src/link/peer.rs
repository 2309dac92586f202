//! Peer links: this server as a WebSocket client of another Mles server, so a channel spans
//! them. One [`PeerTransport`] per `--peer` URL.
//!
//! The link opens a WebSocket with the `mles-websocket` subprotocol and the peer handshake
//! headers (see [`PeerKey`]): a server of this kind that holds the peer key answers with
//! its nonce and its proof of the key, the link checks it and proves the key in its join
//! frame, and from then on frames travel in envelopes carrying their keys, so every frame
//! is stored and delivered once however many paths (cycles, mutual links) bring it. A
//! server that does not answer the handshake (plain mles v2, or one without a peer key) is
//! joined as an ordinary client: bare frames, de-duplicated by content as the Mles
//! protocol asks of proxies (tree topologies only). A peer that answers the handshake but
//! cannot prove the key is not linked to at all.
//!
//! Joining replays each side's history to the other, so after every (re)connect both hold
//! the union of their histories. The link's socket is driven like a session's (one poll
//! loop, no buffer while idle), pinged when quiet and dropped when silent, by the same
//! sweeper as every session.

use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::BoxFuture;
use http::{HeaderValue, Uri};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::{LinkConnection, LinkError, Received, Transport};
use crate::budget::{Budget, Need, Reservation};
use crate::connection::{BoxedIo, Connection, Event, Flow, ReadError, ReadStop};
use crate::frame::{Frame, FrameKind};
use crate::hub::{Entry, MsgKey};
use crate::protocol::{
    self, close, Envelope, EnvelopeKind, PeerKey, PeerRole, PEER_CHALLENGE_HEADER, PEER_HEADER,
    PEER_NONCE_HEADER, PEER_PROOF_HEADER, PEER_VERSION, SUBPROTOCOL,
};
use crate::sweeper::{Expiry, Registration, Sweeper};
use crate::websocket::{self, Opcode, Role};
use crate::Error;

/// How long connecting (TCP, TLS, upgrade, join) to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes queued on a link before the pump stops taking more from the channel.
const QUEUE_BYTES: usize = 256 * 1024;

/// Memory charged per received frame beyond its payload.
const FRAME_OVERHEAD: usize = 64;

/// Who this server is on a link: its id and the keys it proves.
#[derive(Clone)]
pub struct Identity {
    pub server_id: String,
    /// `MLES_KEY`, for the auth token a plain mles v2 peer checks.
    pub key: Option<String>,
    pub peer_key: Option<PeerKey>,
}

/// The link to one peer server.
pub struct PeerTransport {
    url: Uri,
    name: String,
    tls: TlsConnector,
    identity: Identity,
    max_message: usize,
    budget: Arc<Budget>,
    sweeper: Arc<Sweeper>,
}

impl PeerTransport {
    /// A transport to the peer at `url`, trusting the public web PKI plus `ca` for wss.
    pub fn new(
        url: Uri,
        ca: Option<&std::path::Path>,
        identity: Identity,
        max_message: usize,
        budget: Arc<Budget>,
        sweeper: Arc<Sweeper>,
    ) -> Result<PeerTransport, Error> {
        let tls = TlsConnector::from(Arc::new(client_tls(ca)?));
        Ok(PeerTransport {
            name: format!("peer {url}"),
            url,
            tls,
            identity,
            max_message,
            budget,
            sweeper,
        })
    }
}

/// Roots for `wss://` peers: the public web PKI plus `--peer-ca`.
fn client_tls(ca: Option<&std::path::Path>) -> Result<rustls::ClientConfig, Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(ca) = ca {
        let certs = CertificateDer::pem_file_iter(ca)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| Error::Tls(format!("reading peer CA '{}': {e}", ca.display())))?;
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| Error::Tls(format!("peer CA '{}': {e}", ca.display())))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

#[async_trait]
impl Transport for PeerTransport {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        "peer"
    }

    async fn connect(&self, channel: &str) -> Result<Box<dyn LinkConnection>, LinkError> {
        let (conn, envelopes) = tokio::time::timeout(CONNECT_TIMEOUT, self.open(channel))
            .await
            .map_err(|_| LinkError::Timeout("connecting"))??;
        let registration = self.sweeper.register();
        registration.watch().joined(false, None);
        Ok(Box::new(PeerConnection {
            conn,
            envelopes,
            name: format!("to {}", self.url),
            registration,
            budget: self.budget.clone(),
            memory: None,
        }))
    }
}

impl PeerTransport {
    /// Upgrades a connection to the peer and sends the join frame. Returns the connection
    /// and whether the peer speaks envelopes (it proved the peer key).
    async fn open(&self, channel: &str) -> Result<(Connection<BoxedIo>, bool), LinkError> {
        let url = &self.url;
        let link_nonce = protocol::peer_nonce();
        let host = url.host().unwrap_or_default().trim_matches(['[', ']']);
        let tls = url.scheme_str() == Some("wss");
        let port = url.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let connect = |e: &dyn std::fmt::Display| LinkError::Connect(e.to_string());
        let tcp = TcpStream::connect((host, port)).await?;
        let _ = tcp.set_nodelay(true);
        let io: BoxedIo = if tls {
            let name = ServerName::try_from(host.to_string()).map_err(|e| connect(&e))?;
            Box::pin(self.tls.connect(name, tcp).await?)
        } else {
            Box::pin(tcp)
        };
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| connect(&e))?;
        let driver = tokio::spawn(connection.with_upgrades());
        let key = websocket::client_key();
        let authority = url.authority().map_or(host, |a| a.as_str());
        let path = url.path_and_query().map_or("/", |p| p.as_str());
        let request = http::Request::get(path)
            .header(http::header::HOST, authority)
            .header(http::header::UPGRADE, "websocket")
            .header(http::header::CONNECTION, "upgrade")
            .header(http::header::SEC_WEBSOCKET_KEY, &key)
            .header(http::header::SEC_WEBSOCKET_VERSION, "13")
            .header(http::header::SEC_WEBSOCKET_PROTOCOL, SUBPROTOCOL)
            .header(PEER_HEADER, PEER_VERSION)
            .header(PEER_NONCE_HEADER, &link_nonce)
            .body(http_body_util::Empty::<Bytes>::new())
            .map_err(|e| connect(&e))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| connect(&e))?;
        if response.status() != http::StatusCode::SWITCHING_PROTOCOLS {
            return Err(LinkError::Refused(response.status().to_string()));
        }
        let accept = response
            .headers()
            .get(http::header::SEC_WEBSOCKET_ACCEPT)
            .map(HeaderValue::as_bytes);
        if accept != Some(websocket::accept_key(key.as_bytes()).as_bytes()) {
            return Err(LinkError::Refused("wrong accept key".into()));
        }
        let headers = response.headers().clone();
        let upgraded = hyper::upgrade::on(response)
            .await
            .map_err(|e| connect(&e))?;
        let _ = driver.await;
        let (io, leftover) = match upgraded.downcast::<TokioIo<BoxedIo>>() {
            Ok(parts) => (parts.io.into_inner(), parts.read_buf),
            Err(upgraded) => {
                let io: BoxedIo = Box::pin(TokioIo::new(upgraded));
                (io, Bytes::new())
            }
        };
        let header = |name| {
            headers
                .get(name)
                .and_then(|v: &HeaderValue| v.to_str().ok())
        };
        let uid = &self.identity.server_id;
        let auth = protocol::auth_token(uid, channel, self.identity.key.as_deref());
        let mut join = serde_json::json!({"uid": uid, "channel": channel, "auth": auth});
        let envelopes = match (header(PEER_HEADER), &self.identity.peer_key) {
            (Some(PEER_VERSION), Some(key)) => {
                let server_nonce = header(PEER_CHALLENGE_HEADER)
                    .filter(|n| protocol::valid_peer_nonce(n))
                    .ok_or(LinkError::PeerAuth)?;
                let proof = header(PEER_PROOF_HEADER).unwrap_or_default();
                if !key.verify(PeerRole::Server, &link_nonce, server_nonce, &[], proof) {
                    return Err(LinkError::PeerAuth);
                }
                let names = [uid.as_str(), channel];
                join["peer_proof"] = key
                    .prove(PeerRole::Link, &link_nonce, server_nonce, &names)
                    .into();
                true
            }
            _ => false,
        };
        let mut conn = Connection::new(io, Role::Client, self.max_message, leftover);
        conn.queue_frame(&Frame::text(join.to_string()));
        std::future::poll_fn(|cx| conn.poll_write(cx)).await?;
        Ok((conn, envelopes))
    }
}

/// One connected peer link.
struct PeerConnection {
    conn: Connection<BoxedIo>,
    /// The peer proved the key: frames travel in envelopes.
    envelopes: bool,
    name: String,
    registration: Registration,
    budget: Arc<Budget>,
    /// Waiting for memory for a frame being received.
    memory: Option<BoxFuture<'static, Option<Reservation>>>,
}

#[async_trait]
impl LinkConnection for PeerConnection {
    fn member_name(&self) -> String {
        self.name.clone()
    }

    fn send(&mut self, batch: &mut Vec<Entry>) -> Result<(), LinkError> {
        for entry in batch.drain(..) {
            if self.envelopes {
                let (prefix, payload) = seal_envelope(&entry);
                self.conn.queue_prefixed(&prefix, payload);
            } else if entry.live {
                // A plain server has no place for other members' join frames.
                self.conn.queue_frame(&entry.frame);
            }
        }
        Ok(())
    }

    fn ready_to_send(&self) -> bool {
        self.conn.queued_bytes() < QUEUE_BYTES
    }

    async fn recv(&mut self) -> Result<Received, LinkError> {
        std::future::poll_fn(|cx| {
            let watch = self.registration.watch();
            watch.register(cx.waker());
            loop {
                let signals = watch.take_signals();
                match signals.expired {
                    Some(Expiry::WriteStalled) => return Poll::Ready(Err(LinkError::Stalled)),
                    Some(_) => return Poll::Ready(Err(LinkError::Unresponsive)),
                    None => {}
                }
                if signals.ping {
                    self.conn.queue_control(Opcode::Ping, b"");
                }
                match self.conn.poll_write(cx) {
                    Poll::Ready(Ok(())) => watch.write_stalled(false),
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                    Poll::Pending => watch.write_stalled(true),
                }
                if let Some(waiting) = self.memory.as_mut() {
                    match waiting.as_mut().poll(cx) {
                        Poll::Ready(Some(reservation)) => {
                            self.memory = None;
                            self.conn.grant(reservation);
                        }
                        Poll::Ready(None) => return Poll::Ready(Err(LinkError::OutOfMemory)),
                        Poll::Pending => return Poll::Pending,
                    }
                }
                let mut got = None;
                let mut pong = None;
                let mut closed = false;
                let budget = &self.budget;
                let grant = |n: usize| budget.try_reserve(n + FRAME_OVERHEAD, Need::Service);
                let step = self.conn.poll_read(cx, grant, |event| match event {
                    Event::Message(frame) => {
                        watch.heard_data();
                        got = Some(frame);
                        Flow::Stop
                    }
                    Event::Ping(payload) => {
                        watch.heard();
                        pong = Some(payload);
                        Flow::Continue
                    }
                    Event::Pong => {
                        watch.heard();
                        Flow::Continue
                    }
                    Event::Close(_) => {
                        closed = true;
                        Flow::Stop
                    }
                });
                if let Some(payload) = pong {
                    self.conn.queue_control(Opcode::Pong, &payload);
                }
                if closed {
                    return Poll::Ready(Err(LinkError::Closed));
                }
                if let Some(frame) = got {
                    return Poll::Ready(self.received(frame));
                }
                match step {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(ReadStop::Stopped)) => {}
                    Poll::Ready(Ok(ReadStop::NeedMemory(n))) => {
                        let cost = n + FRAME_OVERHEAD;
                        match self.budget.try_reserve(cost, Need::Service) {
                            Some(reservation) => self.conn.grant(reservation),
                            None => {
                                let budget = self.budget.clone();
                                self.memory = Some(Box::pin(async move {
                                    let wait = budget.reserve(cost, Need::Service);
                                    tokio::time::timeout(CONNECT_TIMEOUT, wait)
                                        .await
                                        .ok()
                                        .flatten()
                                }));
                            }
                        }
                    }
                    Poll::Ready(Ok(ReadStop::Eof)) => return Poll::Ready(Err(LinkError::Closed)),
                    Poll::Ready(Err(ReadError::Protocol(e))) => return Poll::Ready(Err(e.into())),
                    Poll::Ready(Err(ReadError::Io(e))) => return Poll::Ready(Err(e.into())),
                }
            }
        })
        .await
    }

    async fn close(&mut self) {
        self.conn.queue_control(
            Opcode::Close,
            &websocket::close_payload(close::GOING_AWAY, "link closed"),
        );
        let _ = std::future::poll_fn(|cx| self.conn.poll_write(cx)).await;
    }
}

impl PeerConnection {
    fn received(&self, frame: Frame) -> Result<Received, LinkError> {
        if !self.envelopes {
            return Ok(Received {
                key: None,
                live: true,
                frame,
                stream: None,
            });
        }
        let (key, live, frame) = open_envelope(&frame).ok_or(LinkError::Malformed)?;
        Ok(Received {
            key: Some(key),
            live,
            frame,
            stream: None,
        })
    }
}

/// The key, liveness and frame inside a peer's envelope; the frame shares the envelope's
/// bytes (and their memory charge).
pub fn open_envelope(frame: &Frame) -> Option<(MsgKey, bool, Frame)> {
    if frame.kind() != FrameKind::Binary {
        return None;
    }
    let data = frame.data();
    let envelope = Envelope::decode(data).ok()?;
    let key = MsgKey {
        origin: Arc::from(envelope.origin),
        seq: envelope.seq,
    };
    let payload = data.slice_ref(envelope.payload);
    let (kind, live) = match envelope.kind {
        EnvelopeKind::Binary => (FrameKind::Binary, true),
        EnvelopeKind::Text => (FrameKind::Text, true),
        EnvelopeKind::Join => (FrameKind::Text, false),
    };
    // decode checked that text is UTF-8
    let frame = Frame::new(kind, payload)?;
    Some((key, live, frame))
}

/// A stored entry as a link carries it: the envelope's prefix and the payload.
pub fn seal_envelope(entry: &Entry) -> (Vec<u8>, Bytes) {
    let kind = match (entry.frame.kind(), entry.live) {
        (FrameKind::Text, true) => EnvelopeKind::Text,
        (FrameKind::Text, false) => EnvelopeKind::Join,
        (FrameKind::Binary, _) => EnvelopeKind::Binary,
    };
    let prefix = Envelope {
        kind,
        origin: &entry.key.origin,
        seq: entry.key.seq,
        payload: &[],
    }
    .prefix();
    (prefix, entry.frame.data().clone())
}
