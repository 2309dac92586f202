//! Transport security for the main listener: none (behind a proxy), a certificate made at
//! start (self-signed), PEM files that can be reloaded while serving, or ACME.
//! [`Acceptor::accept`] turns an accepted TCP stream into the byte stream HTTP is served on.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use crate::config::{Config, TlsConfig};
use crate::Error;

/// A connection's byte stream, plain or TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub type BoxedIo = Pin<Box<dyn Io>>;

/// Turns accepted TCP connections into HTTP byte streams.
pub enum Acceptor {
    Plain,
    Rustls {
        acceptor: TlsAcceptor,
        /// Present for --cert/--key: reloaded on SIGHUP.
        reloadable: Option<Arc<FileCert>>,
    },
}

impl Acceptor {
    /// Builds the acceptor the configuration asks for.
    pub fn from_config(config: &Config) -> Result<Acceptor, Error> {
        match &config.tls {
            TlsConfig::Off => Ok(Acceptor::Plain),
            TlsConfig::SelfSigned => {
                let key = self_signed(&config.domains)?;
                let resolver = Arc::new(FixedCert(Arc::new(key)));
                Ok(Acceptor::rustls(resolver, None))
            }
            TlsConfig::Files { cert, key } => {
                let file_cert = Arc::new(FileCert::load(cert.clone(), key.clone())?);
                Ok(Acceptor::rustls(file_cert.clone(), Some(file_cert)))
            }
            TlsConfig::Acme { .. } => Err(Error::Config(
                "--tls acme is not built into this server yet".into(),
            )),
        }
    }

    fn rustls(
        resolver: Arc<dyn ResolvesServerCert>,
        reloadable: Option<Arc<FileCert>>,
    ) -> Acceptor {
        Acceptor::Rustls {
            acceptor: TlsAcceptor::from(Arc::new(server_config(resolver))),
            reloadable,
        }
    }

    /// True when connections are encrypted.
    pub fn is_tls(&self) -> bool {
        !matches!(self, Acceptor::Plain)
    }

    /// Completes the TLS handshake, if any. The caller bounds it with a timeout.
    pub async fn accept(&self, tcp: TcpStream) -> io::Result<BoxedIo> {
        match self {
            Acceptor::Plain => Ok(Box::pin(tcp)),
            Acceptor::Rustls { acceptor, .. } => Ok(Box::pin(acceptor.accept(tcp).await?)),
        }
    }

    /// Re-reads certificate files, if this acceptor has any.
    pub fn reload(&self) -> Result<bool, Error> {
        match self {
            Acceptor::Rustls {
                reloadable: Some(files),
                ..
            } => files.reload().map(|()| true),
            _ => Ok(false),
        }
    }
}

/// TLS 1.2 and 1.3 with the ring provider, ALPN http/1.1 (WebSocket runs over HTTP/1.1).
pub fn server_config(resolver: Arc<dyn ResolvesServerCert>) -> ServerConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("ring supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config
}

/// A certificate made now for `domains`, valid for local use.
pub fn self_signed(domains: &[String]) -> Result<CertifiedKey, Error> {
    let generated = rcgen::generate_simple_self_signed(domains.to_vec())
        .map_err(|e| Error::Tls(format!("making self-signed certificate: {e}")))?;
    let key = PrivateKeyDer::try_from(generated.signing_key.serialize_der())
        .map_err(|e| Error::Tls(format!("self-signed key: {e}")))?;
    certified_key(vec![generated.cert.der().clone()], key)
}

fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<CertifiedKey, Error> {
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(chain, key, &provider)
        .map_err(|e| Error::Tls(format!("certificate and key: {e}")))
}

/// Reads a PEM certificate chain and private key.
pub fn load_pem(cert: &Path, key: &Path) -> Result<CertifiedKey, Error> {
    let read_err = |p: &Path, e: rustls::pki_types::pem::Error| {
        Error::Tls(format!("reading '{}': {e}", p.display()))
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| read_err(cert, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read_err(cert, e))?;
    if chain.is_empty() {
        return Err(Error::Tls(format!(
            "no certificate in '{}'",
            cert.display()
        )));
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| read_err(key, e))?;
    certified_key(chain, private)
}

#[derive(Debug)]
struct FixedCert(Arc<CertifiedKey>);

impl ResolvesServerCert for FixedCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// A certificate from PEM files; [`FileCert::reload`] swaps in new files for new
/// handshakes while established connections keep theirs.
#[derive(Debug)]
pub struct FileCert {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
}

impl FileCert {
    pub fn load(cert: PathBuf, key: PathBuf) -> Result<FileCert, Error> {
        let current = RwLock::new(Arc::new(load_pem(&cert, &key)?));
        Ok(FileCert { cert, key, current })
    }

    /// Re-reads the files; on error the old certificate stays in use.
    pub fn reload(&self) -> Result<(), Error> {
        let fresh = Arc::new(load_pem(&self.cert, &self.key)?);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }
}

impl ResolvesServerCert for FileCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}
