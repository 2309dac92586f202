//! TLS helpers for the TLS, redirect and ACME tests: a throwaway CA that issues server
//! certificates (rcgen), rustls client settings that trust a given root (or, for
//! self-signed servers, anything while recording what was presented), and WebSocket
//! clients over TLS that speak `mles-websocket`. Every network wait is bounded by
//! [`WAIT`].
#![allow(dead_code)]

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::WebSocketStream;

pub use crate::common::{join_frame, recv_text, send_text, WAIT};

pub type Wss = WebSocketStream<TlsStream<TcpStream>>;

/// A certificate authority made for one test.
pub struct TestCa {
    pub cert: rcgen::Certificate,
    issuer: Issuer<'static, KeyPair>,
}

/// A server certificate and key issued by a [`TestCa`].
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            cert,
            issuer: Issuer::new(params, key),
        }
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    pub fn der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    /// A fresh key and certificate for `names` (DNS names or IP addresses).
    pub fn issue(&self, names: &[&str]) -> Issued {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, &names[0]);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }
}

impl Issued {
    /// Writes the certificate and key so that a reader sees either the old or the new file.
    pub fn write(&self, cert: &Path, key: &Path) {
        for (path, text) in [(cert, &self.cert_pem), (key, &self.key_pem)] {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, path).unwrap();
        }
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Client settings that trust `roots`, offering TLS 1.2 and 1.3 and ALPN http/1.1, without
/// session resumption.
pub fn trusting(roots: &[CertificateDer<'static>]) -> Arc<ClientConfig> {
    let mut store = RootCertStore::empty();
    for root in roots {
        store.add(root.clone()).unwrap();
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Every handshake is a full one, so the certificate it shows is the one served now.
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// Client settings that accept any certificate (still checking handshake signatures):
/// only for looking at what a self-signed server presents.
pub fn accepting_anything(versions: &[&'static rustls::SupportedProtocolVersion]) -> ClientConfig {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnything(provider())))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config
}

#[derive(Debug)]
struct AcceptAnything(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS connection to `addr` for server name `name`, handshake done.
pub async fn tls_connect(
    addr: SocketAddr,
    name: &str,
    config: Arc<ClientConfig>,
) -> io::Result<TlsStream<TcpStream>> {
    let server_name = ServerName::try_from(name.to_string()).unwrap();
    tokio::time::timeout(WAIT, async {
        let tcp = TcpStream::connect(addr).await?;
        TlsConnector::from(config).connect(server_name, tcp).await
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))?
}

/// The certificate the server presented on `tls`.
pub fn peer_cert(tls: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    tls.get_ref()
        .1
        .peer_certificates()
        .expect("server sent a certificate")[0]
        .clone()
}

/// Upgrades an established TLS connection to a WebSocket offering `mles-websocket`.
pub async fn upgrade(tls: TlsStream<TcpStream>, host: &str) -> Wss {
    let mut request = format!("wss://{host}/").into_client_request().unwrap();
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static("mles-websocket"),
    );
    let (ws, response) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(request, tls))
        .await
        .expect("upgrade in time")
        .expect("upgrade accepted");
    assert_eq!(
        response.headers()["sec-websocket-protocol"],
        "mles-websocket"
    );
    ws
}

/// Connects over TLS as `name`, upgrades, and joins `channel` as `uid`.
pub async fn wss_join(
    addr: SocketAddr,
    name: &str,
    config: Arc<ClientConfig>,
    uid: &str,
    channel: &str,
) -> Wss {
    let tls = tls_connect(addr, name, config)
        .await
        .expect("TLS handshake");
    let mut ws = upgrade(tls, name).await;
    send_text(&mut ws, &join_frame(uid, channel)).await;
    ws
}

/// Reads text frames until one equals `text`, all within [`WAIT`].
pub async fn recv_until<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    text: &str,
) {
    tokio::time::timeout(WAIT, async { while recv_text(ws).await != text {} })
        .await
        .unwrap_or_else(|_| panic!("'{text}' did not arrive in time"));
}

/// Two members of `channel` reach each other: b sees a's join frame and a's message, a
/// sees b's message.
pub async fn relay_works(a: &mut Wss, b: &mut Wss, a_uid: &str, channel: &str) {
    assert_eq!(recv_text(b).await, join_frame(a_uid, channel));
    send_text(a, "hello from a").await;
    assert_eq!(recv_text(b).await, "hello from a");
    send_text(b, "hello from b").await;
    assert_eq!(recv_text(a).await, "hello from b");
}
