//! The minimal relay: the machine's ceiling for the same wire protocol.
//!
//! What it does, and nothing more: accept any WebSocket (echoing the `mles-websocket`
//! subprotocol when offered), take the first text frame as `{"uid","channel"}` JSON, and
//! send each later text or binary frame to every other member of that channel. Each member
//! has an unbounded tokio mpsc queue and a writer task; the reader of the publishing
//! connection clones the message (payload bytes are reference counted, so the clone is a
//! pointer copy) into each other member's queue under a read lock. A writer takes all that
//! is queued (up to 256 frames) with `recv_many`, `feed`s them into tungstenite's write
//! buffer, and flushes once, so one write syscall carries every frame that arrived while
//! the previous write was in flight.
//!
//! Deliberately absent: history, auth, limits of any kind (an unread member's queue grows
//! without bound), ping/liveness, slow-consumer handling. Settings that are not a guarantee
//! are chosen as a competent minimal relay would: a multi-threaded runtime, TCP_NODELAY,
//! a 4 KiB read buffer and a 64 KiB write batch per socket (the same sizes mles uses), and
//! optional TLS with a self-signed certificate via tokio-rustls and the ring provider.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use futures::{SinkExt, StreamExt};
use rustls::pki_types::PrivateKeyDer;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

/// Frames a writer takes from its queue before flushing.
const WRITE_BATCH: usize = 256;

type Queue = mpsc::UnboundedSender<Message>;

#[derive(Default)]
struct Channel {
    members: RwLock<Vec<(u64, Queue)>>,
}

#[derive(Default)]
struct Hub {
    channels: Mutex<HashMap<String, Arc<Channel>>>,
    next_id: AtomicU64,
}

impl Hub {
    fn join(&self, name: &str, queue: Queue) -> (u64, Arc<Channel>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        let channel = channels.entry(name.to_string()).or_default().clone();
        channel
            .members
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push((id, queue));
        (id, channel)
    }

    fn leave(&self, name: &str, id: u64, channel: &Channel) {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        let mut members = channel.members.write().unwrap_or_else(|e| e.into_inner());
        members.retain(|(m, _)| *m != id);
        if members.is_empty() {
            channels.remove(name);
        }
    }
}

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(64 * 1024)
}

/// Serves until killed.
pub async fn serve(bind: IpAddr, port: u16, tls: bool) -> std::io::Result<()> {
    let listener = TcpListener::bind(SocketAddr::new(bind, port)).await?;
    let acceptor = if tls { Some(tls_acceptor()?) } else { None };
    let hub = Arc::new(Hub::default());
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(_) => {
                // Out of descriptors: back off instead of spinning.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let hub = hub.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            match acceptor {
                None => session(tcp, hub).await,
                Some(acceptor) => {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        session(tls, hub).await;
                    }
                }
            }
        });
    }
}

fn tls_acceptor() -> std::io::Result<TlsAcceptor> {
    let err = |e: String| std::io::Error::other(e);
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
        .map_err(|e| err(e.to_string()))?;
    let key =
        PrivateKeyDer::try_from(cert.signing_key.serialize_der()).map_err(|e| err(e.into()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| err(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .map_err(|e| err(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The handshake callback: answers with the Mles subprotocol when the client offers it.
/// (The error type is tungstenite's `Callback` signature, large by design.)
#[allow(clippy::result_large_err)]
fn echo_subprotocol(req: &Request, mut resp: Response) -> Result<Response, ErrorResponse> {
    if let Some(p) = req.headers().get("sec-websocket-protocol") {
        if p.to_str().is_ok_and(|p| p.contains("mles-websocket")) {
            resp.headers_mut().insert(
                "sec-websocket-protocol",
                HeaderValue::from_static("mles-websocket"),
            );
        }
    }
    Ok(resp)
}

async fn session<S>(stream: S, hub: Arc<Hub>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Ok(ws) = tokio_tungstenite::accept_hdr_async_with_config(
        stream,
        echo_subprotocol,
        Some(ws_config()),
    )
    .await
    else {
        return;
    };
    let (sink, mut stream) = ws.split();
    let name = loop {
        match stream.next().await {
            Some(Ok(Message::Text(text))) => match channel_of(&text) {
                Some(name) => break name,
                None => return,
            },
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            _ => return,
        }
    };
    let (queue, rx) = mpsc::unbounded_channel();
    let (id, channel) = hub.join(&name, queue);
    let writer = tokio::spawn(write_loop(sink, rx));
    while let Some(Ok(msg)) = stream.next().await {
        match msg {
            Message::Text(_) | Message::Binary(_) => {
                let members = channel.members.read().unwrap_or_else(|e| e.into_inner());
                for (member, queue) in members.iter() {
                    if *member != id {
                        let _ = queue.send(msg.clone());
                    }
                }
            }
            Message::Close(_) => break,
            _ => {}
        }
    }
    hub.leave(&name, id, &channel);
    writer.abort();
}

fn channel_of(join: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(join).ok()?;
    Some(value.get("channel")?.as_str()?.to_string())
}

async fn write_loop<S>(
    mut sink: futures::stream::SplitSink<tokio_tungstenite::WebSocketStream<S>, Message>,
    mut rx: mpsc::UnboundedReceiver<Message>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Allocated on the first frame, so an idle member costs nothing here.
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, WRITE_BATCH).await > 0 {
        for msg in batch.drain(..) {
            if sink.feed(msg).await.is_err() {
                return;
            }
        }
        if sink.flush().await.is_err() {
            return;
        }
    }
}
