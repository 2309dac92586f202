//! TLS on the main listener: a self-signed certificate made at start, certificate files
//! that a running server (and the real binary, on SIGHUP) swaps for new handshakes while
//! open connections carry on, a handshake timeout for silent clients, and TLS 1.2/1.3 with
//! ALPN http/1.1 only.

mod common;
mod tls_support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use mles::config::TlsConfig;
use tls_support::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

fn tls_config(tls: TlsConfig) -> mles::config::Config {
    let mut config = mles::config::Config::local(common::static_root());
    config.tls = tls;
    config
}

#[tokio::test]
async fn a_self_signed_server_presents_a_certificate_for_its_domain_and_relays_over_wss() {
    let server = common::start_config(tls_config(TlsConfig::SelfSigned)).await;
    // Look at what the server presents, then trust exactly that for "localhost".
    let any = std::sync::Arc::new(accepting_anything(&[
        &rustls::version::TLS13,
        &rustls::version::TLS12,
    ]));
    let first = tls_connect(server.addr, "localhost", any).await.unwrap();
    let cert = peer_cert(&first);
    assert_eq!(first.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let trust = trusting(&[cert]);
    let mut a = wss_join(server.addr, "localhost", trust.clone(), "a", "selfsigned").await;
    let mut b = wss_join(server.addr, "localhost", trust.clone(), "b", "selfsigned").await;
    relay_works(&mut a, &mut b, "a", "selfsigned").await;
    // The certificate is not valid for other names.
    assert!(tls_connect(server.addr, "example.org", trust)
        .await
        .is_err());
}

#[tokio::test]
async fn certificate_files_are_served_and_a_reload_swaps_them_for_new_handshakes_only() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let ca = TestCa::new("mles test CA");
    let old = ca.issue(&["localhost"]);
    old.write(&cert, &key);
    let server = common::start_config(tls_config(TlsConfig::Files {
        cert: cert.clone(),
        key: key.clone(),
    }))
    .await;
    let trust = trusting(&[ca.der()]);

    let tls = tls_connect(server.addr, "localhost", trust.clone())
        .await
        .unwrap();
    assert_eq!(peer_cert(&tls), old.der);
    let mut a = upgrade(tls, "localhost").await;
    send_text(&mut a, &join_frame("a", "files")).await;
    let mut b = wss_join(server.addr, "localhost", trust.clone(), "b", "files").await;
    relay_works(&mut a, &mut b, "a", "files").await;

    // New files: new handshakes get the new certificate...
    let new = ca.issue(&["localhost"]);
    new.write(&cert, &key);
    assert!(server.shared.reload_certificates().unwrap());
    let tls = tls_connect(server.addr, "localhost", trust.clone())
        .await
        .unwrap();
    assert_eq!(peer_cert(&tls), new.der);
    assert_ne!(new.der, old.der);
    let mut c = upgrade(tls, "localhost").await;
    send_text(&mut c, &join_frame("c", "files")).await;
    // ...while the connections opened before the reload keep working.
    send_text(&mut a, "after reload").await;
    assert_eq!(recv_text(&mut b).await, "after reload");
    recv_until(&mut c, "after reload").await; // after the channel's history

    // A broken file is refused and the current certificate stays.
    std::fs::write(&cert, "not a certificate").unwrap();
    assert!(server.shared.reload_certificates().is_err());
    let tls = tls_connect(server.addr, "localhost", trust).await.unwrap();
    assert_eq!(peer_cert(&tls), new.der);
    send_text(&mut b, "still up").await;
    assert_eq!(recv_text(&mut a).await, "still up");
}

/// The running binary's log, line by line, bounded by [`WAIT`].
struct Log(tokio::io::Lines<BufReader<tokio::process::ChildStderr>>);

impl Log {
    /// Reads log lines until one contains `needle`, and returns it.
    async fn until(&mut self, needle: &str) -> String {
        let wait = async {
            while let Some(line) = self.0.next_line().await.unwrap() {
                eprintln!("mles: {line}");
                if line.contains(needle) {
                    return line;
                }
            }
            panic!("mles exited before logging '{needle}'");
        };
        tokio::time::timeout(WAIT, wait)
            .await
            .unwrap_or_else(|_| panic!("mles did not log '{needle}' in time"))
    }
}

#[tokio::test]
async fn the_binary_reloads_certificate_files_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let ca = TestCa::new("mles test CA");
    let old = ca.issue(&["localhost"]);
    old.write(&cert, &key);
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_mles"))
        .args(["--bind", "127.0.0.1", "--port", "0", "--wwwroot"])
        .arg(common::static_root())
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("mles starts");
    let mut log = Log(BufReader::new(child.stderr.take().unwrap()).lines());
    let line = log.until("listening on ").await;
    let addr: std::net::SocketAddr = line
        .split("listening on ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in '{line}'"));
    let trust = trusting(&[ca.der()]);
    let before = tls_connect(addr, "localhost", trust.clone()).await.unwrap();
    assert_eq!(peer_cert(&before), old.der);
    let mut open = upgrade(before, "localhost").await;
    send_text(&mut open, &join_frame("open", "hup")).await;

    let new = ca.issue(&["localhost"]);
    new.write(&cert, &key);
    let pid = child.id().expect("mles is running").to_string();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    log.until("certificate files reloaded").await;

    let after = tls_connect(addr, "localhost", trust.clone()).await.unwrap();
    assert_eq!(peer_cert(&after), new.der);
    let mut late = upgrade(after, "localhost").await;
    send_text(&mut late, &join_frame("late", "hup")).await;
    send_text(&mut open, "opened before SIGHUP").await;
    assert_eq!(recv_text(&mut late).await, join_frame("open", "hup")); // history
    assert_eq!(recv_text(&mut late).await, "opened before SIGHUP");
    assert!(child.try_wait().unwrap().is_none(), "mles is still running");
    child.kill().await.unwrap();
}

#[tokio::test]
async fn a_client_that_never_starts_tls_is_dropped_after_the_handshake_timeout() {
    let mut config = tls_config(TlsConfig::SelfSigned);
    config.handshake_timeout = Duration::from_secs(1);
    let server = common::start_config(config).await;
    // A raw socket on purpose: it never starts TLS.
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(WAIT, silent.read(&mut buf))
        .await
        .expect("the server drops the silent client in time");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "expected the connection closed, got {read:?}"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "dropped too early, after {waited:?}"
    );
    // The server is fine for everyone else.
    let any = std::sync::Arc::new(accepting_anything(&[&rustls::version::TLS13]));
    tls_connect(server.addr, "localhost", any).await.unwrap();
}

#[tokio::test]
async fn tls_1_2_and_1_3_are_spoken_and_older_versions_are_refused() {
    let server = common::start_config(tls_config(TlsConfig::SelfSigned)).await;
    for (version, expected) in [
        (&rustls::version::TLS12, rustls::ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, rustls::ProtocolVersion::TLSv1_3),
    ] {
        let config = std::sync::Arc::new(accepting_anything(&[version]));
        let tls = tls_connect(server.addr, "localhost", config).await.unwrap();
        assert_eq!(tls.get_ref().1.protocol_version(), Some(expected));
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    }
    // A ClientHello that offers at most TLS 1.1 is answered with a protocol_version alert
    // (written by hand: rustls cannot offer TLS 1.1).
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(&tls11_client_hello()).await.unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut reply))
        .await
        .expect("the server answers in time")
        .ok();
    assert!(reply.len() >= 7, "reply: {reply:02x?}");
    assert_eq!(reply[0], 21, "an alert record: {reply:02x?}");
    assert_eq!((reply[5], reply[6]), (2, 70), "fatal protocol_version");
}

/// A minimal ClientHello whose highest version is TLS 1.1 (no supported_versions
/// extension), otherwise acceptable to the server.
fn tls11_client_hello() -> Vec<u8> {
    let mut body = vec![0x03, 0x02]; // client_version TLS 1.1
    body.extend_from_slice(&[0x42; 32]); // random
    body.push(0); // no session id
    body.extend_from_slice(&[0x00, 0x04, 0xc0, 0x2b, 0xc0, 0x2f]); // suites the server has
    body.extend_from_slice(&[0x01, 0x00]); // null compression
    body.extend_from_slice(&[0x00, 18]); // extensions:
    body.extend_from_slice(&[0x00, 0x0d, 0x00, 0x06, 0x00, 0x04, 0x04, 0x03, 0x08, 0x04]); // signature_algorithms
    body.extend_from_slice(&[0x00, 0x0a, 0x00, 0x04, 0x00, 0x02, 0x00, 0x1d]); // supported_groups: x25519
    let mut handshake = vec![0x01, 0, 0, body.len() as u8];
    handshake.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01, 0, handshake.len() as u8];
    record.extend_from_slice(&handshake);
    record
}
