//! Peer links: this server as a client of other Mles servers, so a channel spans them.
//!
//! When a channel gets its first client here, a link task starts for each `--peer`. The
//! link joins the peer's channel like any client (uid = this server's id, auth from the
//! shared key) and joins the local channel as a [`MemberKind::Peer`] member; then
//! [`session::serve_member`] pumps frames both ways. Joining replays each side's history
//! to the other, so after every (re)connect both hold the union of their histories, and
//! the frame keys ([`crate::hub::MsgKey`]) make every frame stored and delivered once
//! however many paths (cycles, mutual links) bring it.
//!
//! With a peer of this kind, frames travel in envelopes carrying their keys. A peer that
//! does not answer the envelope header (plain mles v2) gets bare frames, and frames from it
//! are de-duplicated by content, as the Mles protocol asks of proxies; such links suit tree
//! topologies only.
//!
//! A link reconnects with capped exponential backoff and jitter, and closes once its
//! channel has had no local clients for the grace period. Links never block local
//! delivery: they are members like any other, with the same lag limits.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use http::{HeaderValue, Uri};
use hyper_util::rt::TokioIo;
use log::{debug, info, warn};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::connection::Connection;
use crate::frame::Frame;
use crate::hub::{Backplane, Channel, MemberKind};
use crate::limits::Backoff;
use crate::protocol::{
    self, PeerRole, PEER_CHALLENGE_HEADER, PEER_HEADER, PEER_NONCE_HEADER, PEER_PROOF_HEADER,
    PEER_VERSION, SUBPROTOCOL,
};
use crate::server::Shared;
use crate::session::{self, Mode};
use crate::tls::BoxedIo;
use crate::websocket::{self, Role};
use crate::Error;

/// How long connecting (TCP, TLS, upgrade) to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_START: Duration = Duration::from_millis(250);
const BACKOFF_CAP: Duration = Duration::from_secs(30);

/// Peer settings, validated.
#[derive(Clone, Debug)]
pub struct PeerConfig {
    pub urls: Vec<Uri>,
    /// Extra CA certificates (PEM) to trust for `wss://` peers.
    pub ca: Option<std::path::PathBuf>,
    /// How long a link stays up after its channel's last local client left.
    pub grace: Duration,
}

/// Parses and checks a `ws://` or `wss://` peer URL.
pub fn parse_url(url: &str) -> Result<Uri, Error> {
    let uri: Uri = url
        .parse()
        .map_err(|e| Error::Config(format!("peer URL '{url}': {e}")))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("ws" | "wss"), Some(_)) => Ok(uri),
        _ => Err(Error::Config(format!(
            "peer URL '{url}' must be ws://host[:port]/ or wss://host[:port]/"
        ))),
    }
}

/// The links of this server: one task per (channel, peer) while the channel is active.
pub struct Peers {
    shared: Weak<Shared>,
    config: PeerConfig,
    tls: TlsConnector,
    running: Mutex<HashSet<(Arc<str>, usize)>>,
}

impl Peers {
    pub fn new(shared: Weak<Shared>, config: PeerConfig) -> Result<Arc<Peers>, Error> {
        let tls = TlsConnector::from(Arc::new(client_tls(config.ca.as_deref())?));
        Ok(Arc::new(Peers {
            shared,
            config,
            tls,
            running: Mutex::new(HashSet::new()),
        }))
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashSet<(Arc<str>, usize)>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
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

impl Backplane for Arc<Peers> {
    fn channel_active(&self, channel: &Arc<Channel>) {
        for index in 0..self.config.urls.len() {
            let key = (Arc::from(channel.name()), index);
            if !self.running().insert(key.clone()) {
                continue;
            }
            let peers = self.clone();
            let channel = channel.clone();
            tokio::spawn(async move {
                if let Some(shared) = peers.shared.upgrade() {
                    run_link(&peers, &shared, &channel, index).await;
                }
                peers.running().remove(&key);
                // A client may have joined just as the link gave up.
                if channel.client_count() > 0 {
                    peers.channel_active(&channel);
                }
            });
        }
    }
}

/// Keeps one link up while its channel has local clients (or did within the grace period).
async fn run_link(peers: &Peers, shared: &Arc<Shared>, channel: &Arc<Channel>, index: usize) {
    let url = &peers.config.urls[index];
    let mut shutdown = shared.shutdown.clone();
    let mut backoff = Backoff::new(BACKOFF_START, BACKOFF_CAP);
    let sessions = &shared.sessions;
    loop {
        if shutdown.is_shutdown() || inactive(channel, peers.config.grace) {
            return;
        }
        match connect(peers, shared, url, channel.name()).await {
            Ok((mut conn, envelopes)) => {
                sessions.hub.prepare(channel.name()).await;
                let name = format!("to {url}");
                let member = match sessions
                    .hub
                    .join(channel.name(), &name, MemberKind::Peer, None)
                {
                    Ok(member) => member,
                    Err(e) => {
                        warn!("link to {url} for {}: {e}", channel.name());
                        return;
                    }
                };
                let mode = if envelopes {
                    Mode::Peer
                } else {
                    Mode::PeerPlain
                };
                info!("link to {url} for channel {} up ({mode:?})", channel.name());
                shared.metrics.peer_links_up.inc();
                let started = Instant::now();
                let registration = sessions.sweeper.register();
                registration.watch().joined(false, None);
                let end = tokio::select! {
                    end = session::serve(&mut conn, &member, sessions, &registration, mode) => Some(end),
                    _ = shutdown.recv() => None,
                    _ = wait_inactive(channel, peers.config.grace) => None,
                };
                drop(member);
                match &end {
                    Some(end) => {
                        if let Some((code, reason)) = end.close_frame() {
                            session::closing(&mut conn, code, &reason).await;
                        }
                    }
                    None => {
                        session::closing(&mut conn, protocol::close::GOING_AWAY, "link closed")
                            .await
                    }
                }
                shared.metrics.peer_links_up.dec();
                info!("link to {url} for channel {} down: {end:?}", channel.name());
                if started.elapsed() > BACKOFF_CAP {
                    backoff.reset();
                }
            }
            Err(e) => {
                shared.metrics.peer_link_failures.inc();
                debug!("link to {url} for channel {}: {e}", channel.name());
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = shutdown.recv() => return,
        }
    }
}

/// True once the channel has had no local clients for `grace` (frames arriving over the
/// links do not count: the remote side talking must not keep a link up).
fn inactive(channel: &Channel, grace: Duration) -> bool {
    channel
        .without_clients_for()
        .is_some_and(|idle| idle >= grace)
}

async fn wait_inactive(channel: &Channel, grace: Duration) {
    let step = (grace / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    loop {
        if inactive(channel, grace) {
            return;
        }
        tokio::time::sleep(step).await;
    }
}

/// Opens the WebSocket to a peer and sends the join frame. Returns the connection and
/// whether the peer speaks envelopes (it proved the peer key).
async fn connect(
    peers: &Peers,
    shared: &Shared,
    url: &Uri,
    channel: &str,
) -> Result<(Connection<BoxedIo>, bool), String> {
    let link_nonce = protocol::peer_nonce();
    let host = url.host().unwrap_or_default().trim_matches(['[', ']']);
    let tls = url.scheme_str() == Some("wss");
    let port = url.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let key = websocket::client_key();
    let connecting = async {
        let tcp = TcpStream::connect((host, port))
            .await
            .map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        let io: BoxedIo = if tls {
            let name = ServerName::try_from(host.to_string()).map_err(|e| e.to_string())?;
            Box::pin(
                peers
                    .tls
                    .connect(name, tcp)
                    .await
                    .map_err(|e| e.to_string())?,
            )
        } else {
            Box::pin(tcp)
        };
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| e.to_string())?;
        let driver = tokio::spawn(connection.with_upgrades());
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
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        if response.status() != http::StatusCode::SWITCHING_PROTOCOLS {
            return Err(format!("upgrade refused: {}", response.status()));
        }
        let accept = response
            .headers()
            .get(http::header::SEC_WEBSOCKET_ACCEPT)
            .map(HeaderValue::as_bytes);
        if accept != Some(websocket::accept_key(key.as_bytes()).as_bytes()) {
            return Err("upgrade answered with a wrong accept key".into());
        }
        let headers = response.headers().clone();
        let upgraded = hyper::upgrade::on(response)
            .await
            .map_err(|e| e.to_string())?;
        let _ = driver.await;
        let (io, leftover) = match upgraded.downcast::<TokioIo<BoxedIo>>() {
            Ok(parts) => (parts.io.into_inner(), parts.read_buf),
            Err(upgraded) => {
                let io: BoxedIo = Box::pin(TokioIo::new(upgraded));
                (io, bytes::Bytes::new())
            }
        };
        Ok::<_, String>((io, leftover, headers))
    };
    let (io, leftover, headers) = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| "connect timed out".to_string())??;
    let header = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    let uid = &shared.config.server_id;
    let auth = protocol::auth_token(uid, channel, shared.config.key.as_deref());
    let mut join = serde_json::json!({"uid": uid, "channel": channel, "auth": auth});
    // A server of this kind with a peer key answers with its nonce and its proof; anything
    // else (a plain mles v2 server, or one without a peer key) gets an ordinary client.
    let envelopes = match (header(PEER_HEADER), &shared.config.peer_key) {
        (Some(PEER_VERSION), Some(key)) => {
            let server_nonce = header(PEER_CHALLENGE_HEADER)
                .filter(|n| protocol::valid_peer_nonce(n))
                .ok_or("peer answered without a challenge")?;
            let proof = header(PEER_PROOF_HEADER).unwrap_or_default();
            if !key.verify(PeerRole::Server, &link_nonce, server_nonce, &[], proof) {
                return Err("peer did not prove the peer key".to_string());
            }
            let names = [uid.as_str(), channel];
            join["peer_proof"] = key
                .prove(PeerRole::Link, &link_nonce, server_nonce, &names)
                .into();
            true
        }
        _ => false,
    };
    let max = shared.config.session.max_message_size;
    let mut conn = Connection::new(io, Role::Client, max, leftover);
    conn.queue_frame(&Frame::text(join.to_string()));
    let write = std::future::poll_fn(|cx| conn.poll_write(cx));
    tokio::time::timeout(CONNECT_TIMEOUT, write)
        .await
        .map_err(|_| "join frame not sent in time".to_string())?
        .map_err(|e| e.to_string())?;
    Ok((conn, envelopes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_urls_must_be_websocket_urls() {
        assert!(parse_url("ws://127.0.0.1:8080/").is_ok());
        assert!(parse_url("wss://example.org").is_ok());
        assert!(parse_url("http://example.org").is_err());
        assert!(parse_url("example.org").is_err());
    }
}
