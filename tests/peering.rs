//! Peering: servers linked as clients of each other share channels and their history,
//! and every member receives every other member's frame exactly once, in any topology.

mod common;
use common::*;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;

/// Loopback ports picked up front, so servers can name each other before they start.
/// `N` free ports (see [`free_port`]): peers must know each other's before they start.
fn free_ports<const N: usize>() -> [u16; N] {
    std::array::from_fn(|_| free_port())
}

/// The secret the test servers share as peers.
const PEER_KEY: &str = "peer servers' secret";

async fn peer_server(id: &str, port: u16, peers: &[u16], plain: bool) -> TestServer {
    peer_server_with(id, port, peers, move |c| c.peer_envelopes = !plain).await
}

/// A server `id` on `port` linking to `peers`, with `more` settings.
async fn peer_server_with(
    id: &str,
    port: u16,
    peers: &[u16],
    more: impl FnOnce(&mut mles::config::Config),
) -> TestServer {
    linked_server(id, port, peers, PEER_KEY, more).await
}

/// How long frames may take to cross the links.
const LINK_WAIT: Duration = Duration::from_secs(30);

/// [`collect`]s `want` data frames; returns how often each was seen.
async fn tally<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    want: usize,
) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for frame in collect(ws, want, LINK_WAIT).await {
        *seen.entry(frame).or_insert(0) += 1;
    }
    seen
}

/// Each client publishes `per` numbered frames; every client must get every other
/// client's frames exactly once.
async fn everyone_gets_everything_once(clients: &mut [(String, Ws)], per: usize) {
    for (name, ws) in clients.iter_mut() {
        for i in 0..per {
            send_text(ws, &format!("{name}:{i}")).await;
        }
    }
    let names: Vec<String> = clients.iter().map(|(n, _)| n.clone()).collect();
    for (name, ws) in clients.iter_mut() {
        let expected: HashMap<String, usize> = names
            .iter()
            .filter(|n| *n != name)
            .flat_map(|n| (0..per).map(move |i| (format!("{n}:{i}"), 1)))
            .collect();
        let got = tally(ws, expected.len()).await;
        assert_eq!(got, expected, "{name} did not get every frame exactly once");
    }
}

/// Joins one client per server and waits until every server's links are up.
async fn clients_on(servers: &[&TestServer], channel: &str, links: i64) -> Vec<(String, Ws)> {
    let mut clients = Vec::new();
    for (i, s) in servers.iter().enumerate() {
        clients.push((
            format!("c{i}"),
            join(s.addr, &format!("c{i}"), channel).await,
        ));
    }
    let total = || {
        servers
            .iter()
            .map(|s| s.shared.metrics.peer_links_up.get())
            .sum::<i64>()
    };
    wait_until("links up", WAIT, async || total() == links).await;
    clients
}

#[tokio::test]
async fn a_chain_of_three_servers_delivers_every_frame_exactly_once() {
    let [a, b, c] = free_ports::<3>();
    let sa = peer_server("a", a, &[b], false).await;
    let sb = peer_server("b", b, &[c], false).await;
    let sc = peer_server("c", c, &[], false).await;
    let mut clients = clients_on(&[&sa, &sb, &sc], "chain", 2).await;
    everyone_gets_everything_once(&mut clients, 50).await;
}

#[tokio::test]
async fn a_mutual_pair_delivers_every_frame_exactly_once() {
    let [a, b] = free_ports::<2>();
    let sa = peer_server("a", a, &[b], false).await;
    let sb = peer_server("b", b, &[a], false).await;
    let mut clients = clients_on(&[&sa, &sb], "pair", 2).await;
    everyone_gets_everything_once(&mut clients, 100).await;
}

#[tokio::test]
async fn a_triangle_delivers_every_frame_exactly_once() {
    let [a, b, c] = free_ports::<3>();
    let sa = peer_server("a", a, &[b, c], false).await;
    let sb = peer_server("b", b, &[a, c], false).await;
    let sc = peer_server("c", c, &[a, b], false).await;
    let mut clients = clients_on(&[&sa, &sb, &sc], "tri", 6).await;
    // A second client on one server too: local and remote delivery mixed.
    let extra = join(sa.addr, "extra", "tri").await;
    clients.push(("extra".into(), extra));
    everyone_gets_everything_once(&mut clients, 40).await;
}

#[tokio::test]
async fn identical_payloads_sent_twice_are_both_delivered_across_servers() {
    let [a, b, c] = free_ports::<3>();
    let sa = peer_server("a", a, &[b, c], false).await;
    let sb = peer_server("b", b, &[a, c], false).await;
    let sc = peer_server("c", c, &[a, b], false).await;
    let mut clients = clients_on(&[&sa, &sb, &sc], "same", 6).await;
    send_text(&mut clients[0].1, "same").await;
    send_text(&mut clients[0].1, "same").await;
    for (_, ws) in clients.iter_mut().skip(1) {
        let got = tally(ws, 2).await;
        assert_eq!(got.get("same"), Some(&2));
    }
}

#[tokio::test]
async fn a_restarted_server_gets_its_channel_history_back_from_its_peer() {
    let [a, b] = free_ports::<2>();
    let sa = peer_server("a", a, &[b], false).await;
    let sb = peer_server("b", b, &[a], false).await;
    let mut clients = clients_on(&[&sa, &sb], "keep", 2).await;
    for i in 0..10 {
        send_text(&mut clients[0].1, &format!("before restart {i}")).await;
    }
    assert_eq!(tally(&mut clients[1].1, 10).await.len(), 10);
    drop(clients);
    sb.stop().await;

    // A fresh b, empty memory, same address and identity.
    let sb = peer_server("b", b, &[a], false).await;
    let mut first = join(sb.addr, "first", "keep").await;
    let shared = sb.shared.clone();
    wait_until("history back on b", WAIT, async || {
        shared
            .hub
            .channel("keep")
            .map(|c| c.stored().0 >= 10)
            .unwrap_or(false)
    })
    .await;
    drop(first.close(None).await);
    let mut late = join(sb.addr, "late", "keep").await;
    let got = tally(&mut late, 10).await;
    let expected: HashMap<String, usize> = (0..10)
        .map(|i| (format!("before restart {i}"), 1))
        .collect();
    assert_eq!(got, expected);
}

#[tokio::test]
async fn a_peer_that_is_down_at_start_is_linked_when_it_comes_up() {
    let [a, b] = free_ports::<2>();
    let sa = peer_server("a", a, &[b], false).await;
    let mut early = join(sa.addr, "early", "late-peer").await;
    send_text(&mut early, "sent while b was down").await;
    let shared = sa.shared.clone();
    wait_until("a failed to reach b", WAIT, async || {
        shared.metrics.peer_link_failures.get() >= 1
    })
    .await;
    let sb = peer_server("b", b, &[], false).await;
    let mut on_b = join(sb.addr, "on-b", "late-peer").await;
    let got = tally(&mut on_b, 1).await;
    assert_eq!(got.get("sent while b was down"), Some(&1));
    send_text(&mut on_b, "reply").await;
    assert_eq!(tally(&mut early, 1).await.get("reply"), Some(&1));
}

#[tokio::test]
async fn a_link_to_a_plain_mles_v2_server_works_as_an_ordinary_client() {
    let [a, b] = free_ports::<2>();
    let sa = peer_server("a", a, &[b], false).await;
    let sb = peer_server("b", b, &[], true).await; // answers like mles v2: no envelopes
    let mut clients = clients_on(&[&sa, &sb], "tree", 1).await;
    everyone_gets_everything_once(&mut clients, 30).await;
}

#[tokio::test]
async fn links_close_after_the_grace_period_when_no_local_client_is_left() {
    let [a, b] = free_ports::<2>();
    let sa = peer_server("a", a, &[b], false).await;
    let sb = peer_server("b", b, &[], false).await;
    let clients = clients_on(&[&sa], "brief", 1).await;
    drop(clients);
    let shared = sa.shared.clone();
    wait_until("link closed", WAIT, async || {
        shared.metrics.peer_links_up.get() == 0
    })
    .await;
    let shared_b = sb.shared.clone();
    wait_until("peer member left b", WAIT, async || {
        shared_b.hub.channel("brief").map(|c| c.member_count()) == Some(0)
    })
    .await;
}

/// A client of a server with `key`: its join frame carries the auth token.
async fn join_keyed(addr: SocketAddr, uid: &str, channel: &str, key: &str) -> Ws {
    let mut ws = connect(addr).await;
    let auth = mles::protocol::auth_token(uid, channel, Some(key));
    let frame = serde_json::json!({"uid": uid, "channel": channel, "auth": auth});
    send_text(&mut ws, &frame.to_string()).await;
    ws
}

#[tokio::test]
async fn authenticated_peer_links_are_not_held_to_the_per_address_limit() {
    const KEY: &str = "the client key";
    let [a, b] = free_ports::<2>();
    let sb = peer_server_with("b", b, &[], |c| {
        c.key = Some(KEY.into());
        c.per_ip_limit = Some(2);
    })
    .await;
    let sa = peer_server_with("a", a, &[b], |c| {
        c.key = Some(KEY.into());
        c.per_ip_limit = None;
    })
    .await;
    // One client on b, and three channels on a: three links from a's address (which is
    // the clients' address too) to b.
    let mut on_b = join_keyed(sb.addr, "reader", "ch0", KEY).await;
    let mut on_a = Vec::new();
    for i in 0..3 {
        on_a.push(join_keyed(sa.addr, &format!("w{i}"), &format!("ch{i}"), KEY).await);
    }
    let shared = sb.shared.clone();
    wait_until("the reader and three links joined b", WAIT, async || {
        shared.metrics.joins.get() == 4
    })
    .await;
    send_text(&mut on_a[0], "over the link").await;
    let got = tally(&mut on_b, 1).await;
    assert_eq!(got, HashMap::from([("over the link".to_string(), 1)]));
    // Clients are still held to it: with the reader, one more fits and then no more.
    let _second = join_keyed(sb.addr, "second", "ch1", KEY).await;
    let third = http_client::Http::plain()
        .try_send(
            http::Method::GET,
            sb.addr,
            "/health",
            &[("host", "localhost")],
            b"",
        )
        .await;
    match third {
        Ok(reply) => panic!("a third connection from one address got in: {reply:?}"),
        Err(e) => assert!(!e.is_timeout(), "not closed in time: {e:?}"),
    }
}

#[tokio::test]
async fn a_link_closes_after_the_grace_period_even_while_the_remote_side_keeps_talking() {
    let [a, b] = free_ports::<2>();
    let sb = peer_server("b", b, &[], false).await;
    let sa = peer_server("a", a, &[b], false).await;
    let mut clients = clients_on(&[&sa, &sb], "chatty", 1).await;
    let (_, mut on_b) = clients.pop().unwrap();
    drop(clients); // a's only client leaves
    let left = tokio::time::Instant::now();
    // b's client keeps talking over the link the whole time.
    let talker = tokio::spawn(async move {
        for i in 0..100 {
            send_text(&mut on_b, &format!("still here {i}")).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        on_b
    });
    let shared = sa.shared.clone();
    wait_until("a's link closed", Duration::from_secs(6), async || {
        shared.metrics.peer_links_up.get() == 0
    })
    .await;
    // The grace period is one second (see peer_server_with), measured from the last local
    // client leaving, not from the last frame.
    assert!(
        left.elapsed() >= Duration::from_millis(900),
        "closed before the grace period"
    );
    assert!(
        !talker.is_finished(),
        "b stopped talking before the link closed"
    );
    talker.abort();
}
