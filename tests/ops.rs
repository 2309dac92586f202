//! Operating it: /health, /metrics after real traffic, and graceful shutdown on SIGTERM.

mod common;
use common::*;
use std::net::SocketAddr;
use std::process::Command;

async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let reply = http_client::get(addr, path).await;
    (reply.status.as_u16(), reply.text())
}

/// The value of a metric line `name value` in Prometheus text.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("{name} missing from metrics:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn health_says_ok() {
    let server = start().await;
    assert_eq!(
        http_get(server.addr, "/health").await,
        (200, "OK".to_string())
    );
}

#[tokio::test]
async fn metrics_count_real_traffic() {
    let server = start_with(|c| c.metrics_on_main = true).await;
    let mut a = join_now(&server, "a", "m").await;
    let mut b = join(server.addr, "b", "m").await;
    recv_text(&mut b).await;
    for _ in 0..7 {
        send_text(&mut a, "12345").await;
    }
    recv_texts(&mut b, 7).await;
    let mut bad = connect(server.addr).await;
    send_text(&mut bad, "not json").await;
    expect_close(&mut bad).await;
    let _ = connect_with(server.addr, None).await;
    let (status, text) = http_get(server.addr, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(metric(&text, "mles_joins_total"), 2.0);
    assert_eq!(metric(&text, "mles_messages_in_total"), 7.0);
    assert_eq!(metric(&text, "mles_bytes_in_total"), 35.0);
    assert!(metric(&text, "mles_messages_out_total") >= 8.0); // 7 + b's history
    assert_eq!(metric(&text, "mles_channels"), 1.0);
    assert_eq!(metric(&text, "mles_history_frames"), 9.0); // two joins + seven messages
    assert_eq!(metric(&text, "mles_connections_open"), 3.0); // a, b and this request
    assert_eq!(
        metric(&text, r#"mles_bad_first_frames_total{reason="malformed"}"#),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            r#"mles_connections_refused_total{reason="subprotocol"}"#
        ),
        1.0
    );
    assert_eq!(metric(&text, "mles_slow_consumers_total"), 0.0);
}

#[tokio::test]
async fn sigterm_closes_every_websocket_with_1001_and_exits_0() {
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut process = spawn_binary(port, &[]).await;
    let mut clients = Vec::new();
    for i in 0..5 {
        clients.push(join(addr, &format!("u{i}"), "bye").await);
    }
    let mut last = join(addr, "last", "bye").await;
    recv_texts(&mut last, 5).await; // everyone has joined
    let child = &mut process.0;
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    clients.push(last);
    for ws in clients.iter_mut() {
        // Skip the history (join frames) each client was sent first.
        let code = loop {
            match recv(ws).await {
                tokio_tungstenite::tungstenite::Message::Close(Some(f)) => break u16::from(f.code),
                tokio_tungstenite::tungstenite::Message::Text(t) if t.starts_with('{') => {}
                other => panic!("expected close, got {other:?}"),
            }
        };
        assert_eq!(code, 1001);
    }
    let mut exit = None;
    wait_until("the server to exit", WAIT, async || {
        exit = child.try_wait().unwrap();
        exit.is_some()
    })
    .await;
    let exit = exit.expect("exited");
    assert!(exit.success(), "exit status {exit:?}");
    // Nothing listens any more.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
