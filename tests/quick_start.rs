//! The quick start as a newcomer tries it: without `--domains` the server answers on every
//! loopback name — `https://localhost:PORT/`, `https://127.0.0.1:PORT/` and
//! `https://[::1]:PORT/` serve the chat page — and its self-signed certificate names each
//! of them (DNS name `localhost`, IP addresses 127.0.0.1 and ::1), so a client that trusts
//! the certificate accepts it for every one and for nothing else. Over real sockets, both
//! for an in-process server on each loopback address and for the real binary run as the
//! README's first command does (default bind `::`, the shipped `static/`).

mod common;
mod tls_support;

use std::net::SocketAddr;
use std::sync::Arc;

use clap::Parser;
use mles::config::{Args, Config};
use rustls::ClientConfig;
use tls_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

/// The Host header (and URL authority) for `name` on `port`: IPv6 literals in brackets.
fn authority(name: &str, port: u16) -> String {
    if name.contains(':') {
        format!("[{name}]:{port}")
    } else {
        format!("{name}:{port}")
    }
}

/// What the server presents on `addr`, looked at without trusting it; then client
/// settings that trust exactly that certificate.
async fn trust_what_is_presented(addr: SocketAddr) -> Arc<ClientConfig> {
    let any = Arc::new(accepting_anything(&[
        &rustls::version::TLS13,
        &rustls::version::TLS12,
    ]));
    let tls = tls_connect(addr, "localhost", any)
        .await
        .expect("TLS handshake");
    trusting(&[peer_cert(&tls)])
}

/// `GET /` over TLS to `addr`, validating the certificate for `name` and sending it as
/// the Host; returns the status and body.
async fn get_page(addr: SocketAddr, name: &str, trust: Arc<ClientConfig>) -> (u16, String) {
    let mut tls = tls_connect(addr, name, trust)
        .await
        .unwrap_or_else(|e| panic!("the certificate is not valid for {name}: {e}"));
    let req = format!(
        "GET / HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        authority(name, addr.port())
    );
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, tls.read_to_end(&mut raw))
        .await
        .expect("answer in time")
        .ok();
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// Joins `channel` as `uid` over wss:// to `addr` as `name`, with the certificate checked.
async fn wss_join_as(
    addr: SocketAddr,
    name: &str,
    trust: Arc<ClientConfig>,
    uid: &str,
    channel: &str,
) -> Wss {
    let tls = tls_connect(addr, name, trust).await.expect("TLS handshake");
    let url = format!("wss://{}/", authority(name, addr.port()));
    let mut request = url.into_client_request().unwrap();
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static("mles-websocket"),
    );
    let (mut ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(request, tls))
        .await
        .expect("upgrade in time")
        .expect("upgrade accepted");
    send_text(&mut ws, &join_frame(uid, channel)).await;
    ws
}

/// The page, the certificate and a WebSocket on `addr` for each of `names`; and the
/// certificate refused for names it does not carry.
async fn check_loopback_names(addr: SocketAddr, names: &[&str]) {
    let trust = trust_what_is_presented(addr).await;
    for name in names {
        let (status, body) = get_page(addr, name, trust.clone()).await;
        assert_eq!(status, 200, "GET https://{}/", authority(name, addr.port()));
        assert!(
            body.contains("<title>mles chat</title>"),
            "{name}: not the chat page: {body:.200}"
        );
    }
    for other in ["example.org", "127.0.0.2", "::2"] {
        assert!(
            tls_connect(addr, other, trust.clone()).await.is_err(),
            "the certificate must not be valid for {other}"
        );
    }
    // A relay between a member that came in as `localhost` and one that came in by the
    // last name. b gets a's "hello" from history or live, whichever way their joins
    // landed; after it a is surely joined and gets b's answer.
    let channel = format!("loop-{addr}");
    let mut a = wss_join_as(addr, "localhost", trust.clone(), "a", &channel).await;
    send_text(&mut a, "hello").await;
    let last = names.last().unwrap();
    let mut b = wss_join_as(addr, last, trust, "b", &channel).await;
    recv_until(&mut b, "hello").await;
    send_text(&mut b, "over the loopback").await;
    assert_eq!(recv_text(&mut a).await, "over the loopback");
}

/// A server configured as `mles --tls self-signed --bind IP --port 0`, no domains.
async fn quick_start_server(bind: &str) -> common::TestServer {
    let wwwroot = common::static_root();
    let args = Args::try_parse_from([
        "mles",
        "--tls",
        "self-signed",
        "--port",
        "0",
        "--bind",
        bind,
        "--wwwroot",
        wwwroot.to_str().unwrap(),
    ])
    .unwrap();
    let config = Config::from_args(args, Default::default()).expect("valid flags");
    assert_eq!(config.domains, ["localhost", "127.0.0.1", "::1"]);
    common::start_config(config).await
}

#[tokio::test]
async fn without_domains_ipv4_loopback_serves_localhost_and_127_0_0_1() {
    let server = quick_start_server("127.0.0.1").await;
    check_loopback_names(server.addr, &["localhost", "127.0.0.1"]).await;
    server.stop().await;
}

#[tokio::test]
async fn without_domains_ipv6_loopback_serves_localhost_and_the_bracketed_address() {
    let server = quick_start_server("::1").await;
    check_loopback_names(server.addr, &["localhost", "::1"]).await;
    server.stop().await;
}

#[tokio::test]
async fn configured_domains_do_not_serve_the_loopback_addresses() {
    // With --domains the names are exactly those: 127.0.0.1 gets 404.
    let server = common::start_with(|c| c.domains = vec!["localhost".into()]).await;
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let req = format!(
        "GET / HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\r\n",
        server.addr.port()
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    tokio::time::timeout(WAIT, tcp.read_to_string(&mut raw))
        .await
        .expect("answer in time")
        .unwrap();
    assert!(raw.starts_with("HTTP/1.1 404"), "{raw:.200}");
    server.stop().await;
}

#[tokio::test]
async fn the_readme_quick_start_command_serves_every_loopback_name() {
    // `cargo run --release -- --tls self-signed --port 8443`, on a free port: the binary
    // as built, run from the repository (wwwroot `static`), default bind `::`.
    let port = common::free_port();
    let mut process = common::Process(
        std::process::Command::new(env!("CARGO_BIN_EXE_mles"))
            .args(["--tls", "self-signed", "--port", &port.to_string()])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env_remove("MLES_DOMAINS")
            .env_remove("MLES_WWWROOT")
            .env_remove("MLES_BIND")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("mles starts"),
    );
    let v4 = SocketAddr::from(([127, 0, 0, 1], port));
    let v6: SocketAddr = format!("[::1]:{port}").parse().unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::net::TcpStream::connect(v6).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "server did not start"
        );
        assert!(process.0.try_wait().unwrap().is_none(), "server exited");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    check_loopback_names(v4, &["localhost", "127.0.0.1"]).await;
    check_loopback_names(v6, &["localhost", "::1"]).await;
}
