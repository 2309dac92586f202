//! Attacks a hostile client can try on a public server, each performed over real sockets
//! against real servers: posing as a peer server, squatting a peer's name. Each test was
//! seen failing before the defence it checks was built.

mod common;
use common::*;
use std::net::SocketAddr;
use std::time::Duration;

use mles::protocol::{Envelope, EnvelopeKind};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

/// The key every client of a keyed server knows (the chat page asks for it).
const CLIENT_KEY: &str = "known to every client";
/// The secret only the operators' servers share.
const PEER_KEY: &str = "only the servers know this";

/// A server on `port` with the client key and the peer key, linking to `peers`.
async fn keyed_server(
    id: &str,
    port: u16,
    peers: &[u16],
    tweak: impl FnOnce(&mut mles::config::Config),
) -> TestServer {
    linked_server(id, port, peers, PEER_KEY, move |c| {
        c.key = Some(CLIENT_KEY.into());
        tweak(c);
    })
    .await
}

/// The join frame of a client of a keyed server.
fn keyed_join(uid: &str, channel: &str) -> String {
    let auth = mles::protocol::auth_token(uid, channel, Some(CLIENT_KEY));
    serde_json::json!({"uid": uid, "channel": channel, "auth": auth}).to_string()
}

async fn join_keyed(addr: SocketAddr, uid: &str, channel: &str) -> Ws {
    let mut ws = connect(addr).await;
    send_text(&mut ws, &keyed_join(uid, channel)).await;
    ws
}

/// An attacker's connection that asks for peer mode with the upgrade headers every server
/// of this kind sends (`x-mles-peer` and a nonce), and joins with a valid client token for
/// its own uid (it knows the client key, not the peer key).
async fn fake_peer(addr: SocketAddr, uid: &str, channel: &str) -> Ws {
    let request = peer_request(addr, &mles::protocol::peer_nonce());
    let (mut ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("connect in time")
        .expect("upgrade accepted");
    send_text(&mut ws, &keyed_join(uid, channel)).await;
    ws
}

/// The upgrade request a linking server sends, with `nonce`.
fn peer_request(
    addr: SocketAddr,
    nonce: &str,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    use mles::protocol::{PEER_HEADER, PEER_NONCE_HEADER, PEER_VERSION};
    let mut request = format!("ws://{addr}/").into_client_request().unwrap();
    let headers = request.headers_mut();
    headers.insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static("mles-websocket"),
    );
    headers.insert(PEER_HEADER, HeaderValue::from_static(PEER_VERSION));
    headers.insert(PEER_NONCE_HEADER, HeaderValue::from_str(nonce).unwrap());
    request
}

/// Next data frame, or None when the connection closes or nothing comes within `quiet`.
async fn next_data(ws: &mut Ws, quiet: Duration) -> Option<Message> {
    loop {
        match tokio::time::timeout(quiet, futures::StreamExt::next(ws)).await {
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            Ok(Some(Ok(Message::Close(_)))) | Ok(Some(Err(_))) | Ok(None) | Err(_) => return None,
            Ok(Some(Ok(msg))) => return Some(msg),
        }
    }
}

/// Reads data frames until `want` non-join texts arrived or `quiet` passes without one.
async fn texts(ws: &mut Ws, want: usize, quiet: Duration) -> Vec<String> {
    let mut got = Vec::new();
    while got.len() < want {
        match next_data(ws, quiet).await {
            Some(Message::Text(t)) if !t.starts_with('{') => got.push(t.to_string()),
            Some(_) => {}
            None => break,
        }
    }
    got
}

#[tokio::test]
async fn a_client_posing_as_a_peer_cannot_suppress_real_frames_with_forged_envelopes() {
    let [a, b] = [free_port(), free_port()];
    let sb = keyed_server("b", b, &[], |_| {}).await;
    let sa = keyed_server("a", a, &[b], |_| {}).await;
    let mut alice = join_keyed(sa.addr, "alice", "ch").await;
    let mut bob = join_keyed(sb.addr, "bob", "ch").await;
    let shared = sa.shared.clone();
    wait_until("a's link up", WAIT, async || {
        shared.metrics.peer_links_up.get() == 1
    })
    .await;
    send_text(&mut alice, "first").await;
    assert_eq!(texts(&mut bob, 1, WAIT).await, vec!["first"]);

    // The attacker joins b as a "peer" and learns a's origin and sequence numbers from
    // the envelopes b sends it, then claims a's next numbers with garbage.
    let mut mallory = fake_peer(sb.addr, "mallory", "ch").await;
    let mut learned = None;
    while let Some(msg) = next_data(&mut mallory, Duration::from_secs(2)).await {
        if let Message::Binary(data) = &msg {
            if let Ok(e) = Envelope::decode(data) {
                if e.origin.starts_with("a#") {
                    learned = Some((e.origin.to_string(), e.seq));
                }
            }
        }
    }
    if let Some((origin, seq)) = &learned {
        for n in 1..=20 {
            let forged = Envelope {
                kind: EnvelopeKind::Text,
                origin,
                seq: seq + n,
                payload: b"forged",
            };
            let _ = futures::SinkExt::send(&mut mallory, Message::binary(forged.encode())).await;
        }
    }
    for i in 0..5 {
        send_text(&mut alice, &format!("real {i}")).await;
    }
    let got = texts(&mut bob, 5, Duration::from_secs(3)).await;
    assert_eq!(
        got,
        (0..5).map(|i| format!("real {i}")).collect::<Vec<_>>(),
        "bob lost alice's frames"
    );
    assert!(
        learned.is_none(),
        "a client learned a server's origin: {learned:?}"
    );
}

#[tokio::test]
async fn a_client_posing_as_a_peer_is_held_to_every_client_limit() {
    let port = free_port();
    let server = keyed_server("b", port, &[], |c| {
        c.session.message_rate = Some((10, Duration::from_secs(60)));
        c.per_ip_limit = Some(5);
    })
    .await;
    let mut reader = join_keyed(server.addr, "reader", "ch").await;
    let mut mallory = fake_peer(server.addr, "mallory", "ch").await;
    for i in 0..50 {
        let flood = Envelope {
            kind: EnvelopeKind::Text,
            origin: "m#1",
            seq: i,
            payload: b"flood",
        };
        let frame = Message::binary(flood.encode());
        if futures::SinkExt::send(&mut mallory, frame).await.is_err() {
            break;
        }
    }
    let mut got = Vec::new();
    while let Some(msg) = next_data(&mut reader, Duration::from_secs(2)).await {
        if !matches!(&msg, Message::Text(t) if t.starts_with('{')) {
            got.push(msg);
        }
    }
    assert!(
        got.len() <= 10,
        "{} frames got past --message-rate 10",
        got.len()
    );
    // More "peers" from one address than --per-ip-limit allows stay out.
    let mut held = Vec::new();
    for i in 0..10 {
        held.push(fake_peer(server.addr, &format!("p{i}"), &format!("c{i}")).await);
    }
    let shared = server.shared.clone();
    wait_until("the joins settled", WAIT, async || {
        shared.metrics.connections_open.get() <= 5
    })
    .await;
}

#[tokio::test]
async fn a_client_posing_as_a_peer_cannot_inject_someone_elses_join_or_hide_its_own() {
    let port = free_port();
    let server = keyed_server("b", port, &[], |_| {}).await;
    let mut mallory = fake_peer(server.addr, "mallory", "ch").await;
    let forged = Envelope {
        kind: EnvelopeKind::Join,
        origin: "x#1",
        seq: 1,
        payload: br#"{"uid":"admin","channel":"ch"}"#,
    };
    let _ = futures::SinkExt::send(&mut mallory, Message::binary(forged.encode())).await;
    let shared = server.shared.clone();
    wait_until("mallory's connection handled", WAIT, async || {
        shared.metrics.joins.get()
            + shared.metrics.render().matches("bad_first_frames").count() as u64
            >= 1
    })
    .await;
    let mut late = join_keyed(server.addr, "late", "ch").await;
    let mut history = Vec::new();
    while let Some(Message::Text(t)) = next_data(&mut late, Duration::from_millis(500)).await {
        history.push(t.to_string());
    }
    assert!(
        !history.iter().any(|h| h.contains("admin")),
        "a forged join reached history: {history:?}"
    );
    if server
        .shared
        .hub
        .channel("ch")
        .is_some_and(|c| c.has_member("mallory"))
    {
        assert!(
            history.iter().any(|h| h.contains("mallory")),
            "mallory listens without its join in history: {history:?}"
        );
    }
}

#[tokio::test]
async fn a_client_holding_a_peer_servers_uid_does_not_break_the_link() {
    let [a, b] = [free_port(), free_port()];
    let sb = keyed_server("b", b, &[], |_| {}).await;
    let sa = keyed_server("a", a, &[b], |_| {}).await;
    // The squatter takes a's server id as its uid on b before a links.
    let _squatter = join_keyed(sb.addr, "a", "ch").await;
    let shared_b = sb.shared.clone();
    wait_until("the squatter joined", WAIT, async || {
        shared_b
            .hub
            .channel("ch")
            .is_some_and(|c| c.has_member("a"))
    })
    .await;
    let mut alice = join_keyed(sa.addr, "alice", "ch").await;
    let mut bob = join_keyed(sb.addr, "bob", "ch").await;
    let shared_a = sa.shared.clone();
    wait_until("a's link up", WAIT, async || {
        shared_a.metrics.peer_links_up.get() == 1
    })
    .await;
    for i in 0..5 {
        send_text(&mut alice, &format!("m{i}")).await;
    }
    let got = texts(&mut bob, 5, Duration::from_secs(5)).await;
    assert_eq!(got, (0..5).map(|i| format!("m{i}")).collect::<Vec<_>>());
    assert!(
        sa.shared.metrics.peer_link_failures.get() == 0,
        "the link failed while a client held the peer's uid"
    );
}

#[tokio::test]
async fn a_proof_made_with_the_client_key_or_for_another_connection_is_refused() {
    use mles::protocol::{PeerKey, PeerRole, PEER_CHALLENGE_HEADER};
    let port = free_port();
    let server = keyed_server("b", port, &[], |_| {}).await;
    let link_nonce = mles::protocol::peer_nonce();
    let (mut ws, response) =
        tokio_tungstenite::connect_async(peer_request(server.addr, &link_nonce))
            .await
            .unwrap();
    let challenge = response.headers()[PEER_CHALLENGE_HEADER]
        .to_str()
        .unwrap()
        .to_string();
    // The client key is no peer key.
    let wrong =
        PeerKey::new(CLIENT_KEY).prove(PeerRole::Link, &link_nonce, &challenge, &["x", "ch"]);
    let frame = serde_json::json!({"uid": "x", "channel": "ch", "peer_proof": wrong});
    send_text(&mut ws, &frame.to_string()).await;
    assert_eq!(
        expect_close(&mut ws).await,
        (1008, "peer authentication failed".into())
    );
    // The right key, but the proof made for the first connection's challenge, replayed.
    let (mut ws, _) = tokio_tungstenite::connect_async(peer_request(server.addr, &link_nonce))
        .await
        .unwrap();
    let replayed =
        PeerKey::new(PEER_KEY).prove(PeerRole::Link, &link_nonce, &challenge, &["x", "ch"]);
    let frame = serde_json::json!({"uid": "x", "channel": "ch", "peer_proof": replayed});
    send_text(&mut ws, &frame.to_string()).await;
    assert_eq!(
        expect_close(&mut ws).await,
        (1008, "peer authentication failed".into())
    );
    // A client that asks for peer mode without a proof is refused the same way.
    let mut ws = fake_peer(server.addr, "y", "ch").await;
    assert_eq!(
        expect_close(&mut ws).await,
        (1008, "peer authentication failed".into())
    );
}

#[tokio::test]
async fn a_server_without_a_peer_key_refuses_to_start_with_peers() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_mles"))
        .args(["--tls", "off", "--port", "0", "--peer", "ws://127.0.0.1:9/"])
        .arg("--wwwroot")
        .arg(static_root())
        .env("MLES_KEY", CLIENT_KEY)
        .env_remove("MLES_PEER_KEY")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--peer needs MLES_PEER_KEY"), "{stderr}");
}
