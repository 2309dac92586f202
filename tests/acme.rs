//! ACME against Pebble, the ACME test CA, on loopback: a certificate is ordered, validated
//! over TLS-ALPN-01 on the server's own port and served to wss clients; a restart with the
//! same cache serves the cached certificate without a new order; a domain added later
//! gets its own certificate while the first is kept.
//!
//! Pebble really validates: it looks the test domains up in pebble-challtestsrv's DNS
//! (every name is 127.0.0.1) and connects to the server's port with the challenge ALPN.
//! Needs the Debian package `pebble` (both binaries).

mod common;
mod tls_support;

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use clap::Parser;
use mles::config::{Args, Config};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tls_support::*;

/// How long an order may take: Pebble validates at once, rustls-acme polls every 1-2 s.
const ACME_WAIT: Duration = Duration::from_secs(90);

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until something accepts TCP connections on `addr`.
async fn listening(addr: SocketAddr, what: &str) {
    common::wait_until(&format!("{what} to listen on {addr}"), WAIT, async || {
        tokio::net::TcpStream::connect(addr).await.is_ok()
    })
    .await;
}

/// Pebble and its DNS server, killed when dropped.
struct Pebble {
    children: Vec<Child>,
    dir: tempfile::TempDir,
    directory: String,
    management: SocketAddr,
    /// The CA that issued Pebble's own HTTPS certificate.
    https_ca: TestCa,
}

impl Pebble {
    /// Starts Pebble validating TLS-ALPN-01 on `tls_port`.
    async fn start(tls_port: u16) -> Pebble {
        let dir = tempfile::tempdir().unwrap();
        let https_ca = TestCa::new("Pebble HTTPS test CA");
        let https = https_ca.issue(&["127.0.0.1", "localhost"]);
        https.write(&dir.path().join("cert.pem"), &dir.path().join("key.pem"));
        std::fs::write(dir.path().join("https-ca.pem"), https_ca.pem()).unwrap();
        let listen: SocketAddr = format!("127.0.0.1:{}", common::free_port())
            .parse()
            .unwrap();
        let management: SocketAddr = format!("127.0.0.1:{}", common::free_port())
            .parse()
            .unwrap();
        let dns = format!("127.0.0.1:{}", free_udp_port());
        let dns_management: SocketAddr = format!("127.0.0.1:{}", common::free_port())
            .parse()
            .unwrap();
        let config = serde_json::json!({"pebble": {
            "listenAddress": listen.to_string(),
            "managementListenAddress": management.to_string(),
            "certificate": dir.path().join("cert.pem"),
            "privateKey": dir.path().join("key.pem"),
            "httpPort": common::free_port(),
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }});
        std::fs::write(dir.path().join("pebble.json"), config.to_string()).unwrap();
        let logs = dir.path().to_path_buf();
        let log = |name: &str| std::fs::File::create(logs.join(name)).unwrap();
        let mut pebble = Pebble {
            children: Vec::new(),
            directory: format!("https://{listen}/dir"),
            management,
            https_ca,
            dir,
        };
        // DNS for every name: A 127.0.0.1, no AAAA; its challenge servers are not needed.
        let dns_server = Command::new("pebble-challtestsrv")
            .args(["-dns01", &dns, "-defaultIPv6", ""])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-management", &dns_management.to_string()])
            .stdin(Stdio::null())
            .stdout(log("challtestsrv.log"))
            .stderr(log("challtestsrv.err"))
            .spawn()
            .expect("pebble-challtestsrv runs (Debian package pebble)");
        pebble.children.push(dns_server);
        let server = Command::new("pebble")
            .arg("-config")
            .arg(pebble.dir.path().join("pebble.json"))
            .args(["-dnsserver", &dns])
            // Validate at once (no random sleeps) and accept every good nonce, so the test
            // runs at full speed; challenges are still really validated.
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdin(Stdio::null())
            .stdout(log("pebble.log"))
            .stderr(log("pebble.err"))
            .spawn()
            .expect("pebble runs (Debian package pebble)");
        pebble.children.push(server);
        listening(dns_management, "pebble-challtestsrv").await;
        listening(listen, "pebble").await;
        listening(management, "pebble's management interface").await;
        pebble
    }

    fn https_ca_file(&self) -> PathBuf {
        self.dir.path().join("https-ca.pem")
    }

    /// New-order requests Pebble has received so far.
    fn orders(&self) -> usize {
        std::fs::read_to_string(self.dir.path().join("pebble.log"))
            .unwrap()
            .matches("POST /order-plz")
            .count()
    }

    /// The root Pebble issues certificates under, from its management interface.
    async fn issuing_root(&self) -> CertificateDer<'static> {
        let https = common::http_client::Http::tls(trusting(&[self.https_ca.der()]));
        let reply = https
            .send(http::Method::GET, self.management, "/roots/0", &[], b"")
            .await;
        assert_eq!(reply.status, 200, "{reply:?}");
        let reply = reply.text();
        CertificateDer::pem_slice_iter(reply.as_bytes())
            .next()
            .expect("a certificate in the reply")
            .unwrap()
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            for log in ["pebble.log", "pebble.err", "challtestsrv.log"] {
                let text = std::fs::read_to_string(self.dir.path().join(log)).unwrap_or_default();
                eprintln!("--- {log}\n{text}");
            }
        }
    }
}

/// The server's configuration, from the flags an operator would pass.
fn acme_config(port: u16, domains: &str, pebble: &Pebble, cache: &Path) -> Config {
    let args = Args::try_parse_from([
        "mles",
        "--bind",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--wwwroot",
        common::static_root().to_str().unwrap(),
        "--tls",
        "acme",
        "--domains",
        domains,
        "--email",
        "ops@mles.test",
        "--acme-directory",
        &pebble.directory,
        "--acme-ca",
        pebble.https_ca_file().to_str().unwrap(),
        "--cache",
        cache.to_str().unwrap(),
    ])
    .expect("flags parse");
    Config::from_args(args, Default::default()).expect("valid configuration")
}

/// The certificate served for `domain` once there is one that `trust` accepts for it.
async fn served_cert(
    addr: SocketAddr,
    domain: &str,
    trust: std::sync::Arc<rustls::ClientConfig>,
) -> CertificateDer<'static> {
    let mut served = None;
    common::wait_until(
        &format!("a certificate for {domain}"),
        ACME_WAIT,
        async || {
            match tls_connect(addr, domain, trust.clone()).await {
                Ok(tls) => served = Some(peer_cert(&tls)),
                Err(e) => log::debug!("no certificate for {domain} yet: {e}"),
            }
            served.is_some()
        },
    )
    .await;
    served.expect("served")
}

/// Waits until the server has saved `cert` in its cache (it does so just after serving it).
async fn saved_in_cache(cache: &Path, cert: &CertificateDer<'static>) {
    let dir = cache.join("acme");
    let saved = || {
        std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .any(|entry| {
                let name = entry.file_name();
                name.to_string_lossy().starts_with("cached_cert_")
                    && std::fs::read(entry.path()).is_ok_and(|pem| {
                        CertificateDer::pem_slice_iter(&pem)
                            .next()
                            .is_some_and(|first| first.is_ok_and(|first| &first == cert))
                    })
            })
    };
    common::wait_until(
        "the certificate to be saved in the cache",
        WAIT,
        async || saved(),
    )
    .await;
}

fn init_log() {
    let _ = env_logger::builder().is_test(true).try_init();
}

#[tokio::test]
async fn a_certificate_is_ordered_and_served_and_a_restart_reuses_it_from_the_cache() {
    init_log();
    let port = common::free_port();
    let pebble = Pebble::start(port).await;
    let cache = tempfile::tempdir().unwrap();
    let config = acme_config(port, "a.mles.test", &pebble, cache.path());

    let server = common::start_config(config.clone()).await;
    let trust = trusting(&[pebble.issuing_root().await]);
    let ordered = served_cert(server.addr, "a.mles.test", trust.clone()).await;
    assert_eq!(pebble.orders(), 1);
    let mut a = wss_join(server.addr, "a.mles.test", trust.clone(), "a", "acme").await;
    let mut b = wss_join(server.addr, "a.mles.test", trust.clone(), "b", "acme").await;
    relay_works(&mut a, &mut b, "a", "acme").await;
    drop((a, b));
    saved_in_cache(cache.path(), &ordered).await;
    server.stop().await;

    let server = common::start_config(config).await;
    let cached = served_cert(server.addr, "a.mles.test", trust.clone()).await;
    assert_eq!(
        cached, ordered,
        "the restarted server serves the cached certificate"
    );
    assert_eq!(pebble.orders(), 1, "no new order after the restart");
    let mut c = wss_join(server.addr, "a.mles.test", trust.clone(), "c", "restarted").await;
    let mut d = wss_join(server.addr, "a.mles.test", trust, "d", "restarted").await;
    relay_works(&mut c, &mut d, "c", "restarted").await;
    server.stop().await;
}

#[tokio::test]
async fn a_domain_added_later_gets_its_own_certificate_and_the_first_is_not_reordered() {
    init_log();
    let port = common::free_port();
    let pebble = Pebble::start(port).await;
    let cache = tempfile::tempdir().unwrap();
    let trust = trusting(&[pebble.issuing_root().await]);

    let server =
        common::start_config(acme_config(port, "a.mles.test", &pebble, cache.path())).await;
    let first = served_cert(server.addr, "a.mles.test", trust.clone()).await;
    saved_in_cache(cache.path(), &first).await;
    server.stop().await;
    assert_eq!(pebble.orders(), 1);

    let both = acme_config(port, "a.mles.test,b.mles.test", &pebble, cache.path());
    let server = common::start_config(both).await;
    let second = served_cert(server.addr, "b.mles.test", trust.clone()).await;
    assert_ne!(second, first);
    assert_eq!(
        served_cert(server.addr, "a.mles.test", trust.clone()).await,
        first,
        "the first domain keeps its cached certificate"
    );
    assert_eq!(pebble.orders(), 2, "only the new domain was ordered");
    // Clients of either domain meet in the same channels.
    let mut a = wss_join(server.addr, "a.mles.test", trust.clone(), "a", "both").await;
    let mut b = wss_join(server.addr, "b.mles.test", trust, "b", "both").await;
    relay_works(&mut a, &mut b, "a", "both").await;
    server.stop().await;
}
