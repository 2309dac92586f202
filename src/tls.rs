//! Transport security for the main listener: none (behind a proxy), a certificate made at
//! start (self-signed), PEM files that can be reloaded while serving, or ACME.
//! [`Acceptor::accept`] turns an accepted TCP stream into the byte stream HTTP is served on.
//!
//! ACME (rustls-acme) keeps one certificate per domain, each ordered, cached and renewed by
//! its own background task, so a domain whose validation fails never holds up the others
//! and adding a domain orders only that one. TLS-ALPN-01 challenges are answered on the
//! main listener: [`Acceptor::accept`] completes them and then reports the connection as
//! [`challenge_answered`] instead of handing it to HTTP.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use futures::StreamExt;
use log::{info, warn};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_acme::caches::DirCache;
use rustls_acme::{AcmeConfig, AcmeState, EventOk, ResolvesServerCertAcme};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::task::AbortHandle;
use tokio_rustls::{LazyConfigAcceptor, TlsAcceptor};

use crate::config::{Config, TlsConfig};
use crate::Error;

pub use crate::connection::BoxedIo;

/// Turns accepted TCP connections into HTTP byte streams.
pub enum Acceptor {
    Plain,
    Rustls {
        acceptor: TlsAcceptor,
        /// Present for --cert/--key: reloaded on SIGHUP.
        reloadable: Option<Arc<FileCert>>,
    },
    Acme(AcmeTls),
}

impl Acceptor {
    /// Builds the acceptor the configuration asks for. ACME starts its background tasks on
    /// the current tokio runtime, so it must be called inside one.
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
            TlsConfig::Acme {
                staging,
                directory,
                ca,
            } => {
                let directory = match directory {
                    Some(url) => url.clone(),
                    None if *staging => rustls_acme::acme::LETS_ENCRYPT_STAGING_DIRECTORY.into(),
                    None => rustls_acme::acme::LETS_ENCRYPT_PRODUCTION_DIRECTORY.into(),
                };
                let client = match ca {
                    Some(ca) => Some(acme_client_config(ca)?),
                    None => None,
                };
                AcmeTls::start(config, &directory, client).map(Acceptor::Acme)
            }
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

    /// Completes the TLS handshake, if any. The caller bounds it with a timeout. An ACME
    /// TLS-ALPN-01 validation connection is answered here and then returned as an error
    /// for which [`challenge_answered`] is true.
    pub async fn accept(&self, tcp: TcpStream) -> io::Result<BoxedIo> {
        match self {
            Acceptor::Plain => Ok(Box::pin(tcp)),
            Acceptor::Rustls { acceptor, .. } => Ok(Box::pin(acceptor.accept(tcp).await?)),
            Acceptor::Acme(acme) => acme.accept(tcp).await,
        }
    }

    /// Stops background work (ACME ordering and renewal). Called when the server stops.
    pub fn stop(&self) {
        if let Acceptor::Acme(acme) = self {
            acme.stop();
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

/// True for the error [`Acceptor::accept`] returns after answering an ACME challenge.
pub fn challenge_answered(e: &io::Error) -> bool {
    e.get_ref()
        .is_some_and(|inner| inner.is::<ChallengeAnswered>())
}

#[derive(Debug, thiserror::Error)]
#[error("ACME TLS-ALPN-01 challenge answered")]
struct ChallengeAnswered;

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

/// A certificate made now for `domains`, valid for local use. Names that are IP
/// addresses (`127.0.0.1`, `::1`) become IP-address SANs, the others DNS-name SANs, so
/// clients that trust the certificate accept it for every one of them.
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

/// The client TLS settings for talking to an ACME directory whose HTTPS certificate is
/// issued by the CA(s) in the PEM file `ca` (a private or test ACME server).
pub fn acme_client_config(ca: &Path) -> Result<Arc<ClientConfig>, Error> {
    let read_err = |e: rustls::pki_types::pem::Error| {
        Error::Tls(format!("reading ACME CA '{}': {e}", ca.display()))
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(read_err)? {
        roots
            .add(cert.map_err(read_err)?)
            .map_err(|e| Error::Tls(format!("ACME CA '{}': {e}", ca.display())))?;
    }
    if roots.is_empty() {
        return Err(Error::Tls(format!(
            "no certificate in ACME CA '{}'",
            ca.display()
        )));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("ring supports TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Certificates from an ACME CA: one [`AcmeState`] per domain, each driven by a task for
/// the life of the server (ordering, caching and renewing), and the TLS settings for normal
/// and for TLS-ALPN-01 validation connections.
pub struct AcmeTls {
    tls: Arc<ServerConfig>,
    challenge: Arc<ServerConfig>,
    tasks: Vec<AbortHandle>,
}

impl AcmeTls {
    /// Starts ordering (or loading from the cache) a certificate for each configured domain
    /// from `directory`; `client` overrides the TLS settings for talking to it.
    fn start(
        config: &Config,
        directory: &str,
        client: Option<Arc<ClientConfig>>,
    ) -> Result<AcmeTls, Error> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| Error::Tls("ACME needs a running tokio runtime".into()))?;
        let contact: Vec<String> = config
            .email
            .iter()
            .map(|e| match e.strip_prefix("mailto:") {
                Some(_) => e.clone(),
                None => format!("mailto:{e}"),
            })
            .collect();
        let cache_dir = config.cache.as_ref().map(|dir| dir.join("acme"));
        match &cache_dir {
            Some(dir) => info!(
                "ACME: certificates for {:?} from {directory}, cached in {}",
                config.domains,
                dir.display()
            ),
            None => warn!(
                "ACME: certificates for {:?} from {directory} without --cache: every \
                 restart orders new ones and may hit the CA's rate limits",
                config.domains
            ),
        }
        let account = Arc::new(tokio::sync::Mutex::new(None));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut resolvers = Vec::new();
        let mut tasks = Vec::new();
        for domain in &config.domains {
            let cache = AcmeCache {
                dir: cache_dir.clone().map(DirCache::new),
                account: account.clone(),
            };
            let mut acme = AcmeConfig::new_with_provider([domain], provider.clone())
                .directory(directory)
                .contact(&contact)
                .cache(cache);
            if let Some(client) = &client {
                acme = acme.client_tls_config(client.clone());
            }
            let state = acme.state();
            resolvers.push((domain.clone(), state.resolver()));
            tasks.push(runtime.spawn(drive(domain.clone(), state)).abort_handle());
        }
        let resolver = Arc::new(AcmeResolver(resolvers));
        let mut challenge = server_config(resolver.clone());
        challenge.alpn_protocols = vec![rustls_acme::acme::ACME_TLS_ALPN_NAME.to_vec()];
        Ok(AcmeTls {
            tls: Arc::new(server_config(resolver)),
            challenge: Arc::new(challenge),
            tasks,
        })
    }

    async fn accept(&self, tcp: TcpStream) -> io::Result<BoxedIo> {
        let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp).await?;
        let hello = start.client_hello();
        if rustls_acme::is_tls_alpn_challenge(&hello) {
            let domain = hello.server_name().unwrap_or("").to_string();
            let mut tls = start.into_stream(self.challenge.clone()).await?;
            let _ = tls.shutdown().await;
            info!("ACME {domain}: answered a TLS-ALPN-01 validation request");
            return Err(io::Error::other(ChallengeAnswered));
        }
        Ok(Box::pin(start.into_stream(self.tls.clone()).await?))
    }

    fn stop(&self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Drop for AcmeTls {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Polls one domain's ACME state for the life of the server and logs what it does.
async fn drive(domain: String, mut state: AcmeState<io::Error>) {
    let mut serving = false;
    while let Some(event) = state.next().await {
        match event {
            Ok(EventOk::DeployedCachedCert) => {
                serving = true;
                info!("ACME {domain}: serving the certificate from the cache");
            }
            Ok(EventOk::DeployedNewCert) => {
                let what = if serving { "renewed" } else { "ordered" };
                serving = true;
                info!("ACME {domain}: certificate {what} and now served");
            }
            Ok(EventOk::CertCacheStore) => info!("ACME {domain}: certificate saved to the cache"),
            Ok(EventOk::AccountCacheStore) => info!("ACME {domain}: account key saved"),
            Err(e) => warn!("ACME {domain}: certificate not obtained: {e}"),
        }
    }
}

/// Picks the ACME certificate (or challenge certificate) for the domain the client names;
/// a client that names none gets the first domain's.
#[derive(Debug)]
struct AcmeResolver(Vec<(String, Arc<ResolvesServerCertAcme>)>);

impl ResolvesServerCert for AcmeResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let named = hello.server_name().and_then(|name| {
            self.0
                .iter()
                .find(|(domain, _)| domain.eq_ignore_ascii_case(name))
        });
        let (_, resolver) = named.or(self.0.first())?;
        resolver.resolve(hello)
    }
}

/// The ACME cache: certificates per domain in `<cache>/acme` (when there is a cache), and
/// one account key shared by every domain's state, made once and then reused, so they do
/// not each register an account.
struct AcmeCache {
    dir: Option<DirCache<PathBuf>>,
    account: Arc<tokio::sync::Mutex<Option<Vec<u8>>>>,
}

#[async_trait::async_trait]
impl rustls_acme::CertCache for AcmeCache {
    type EC = io::Error;

    async fn load_cert(&self, domains: &[String], directory: &str) -> io::Result<Option<Vec<u8>>> {
        match &self.dir {
            Some(dir) => dir.load_cert(domains, directory).await,
            None => Ok(None),
        }
    }

    async fn store_cert(&self, domains: &[String], directory: &str, cert: &[u8]) -> io::Result<()> {
        match &self.dir {
            Some(dir) => dir.store_cert(domains, directory, cert).await,
            None => Ok(()),
        }
    }
}

#[async_trait::async_trait]
impl rustls_acme::AccountCache for AcmeCache {
    type EA = io::Error;

    async fn load_account(
        &self,
        contact: &[String],
        directory: &str,
    ) -> io::Result<Option<Vec<u8>>> {
        let mut account = self.account.lock().await;
        if let Some(key) = &*account {
            return Ok(Some(key.clone()));
        }
        let cached = match &self.dir {
            Some(dir) => dir.load_account(contact, directory).await?,
            None => None,
        };
        let key = match cached {
            Some(key) => key,
            None => {
                let key = rustls_acme::acme::Account::generate_key_pair();
                if let Some(dir) = &self.dir {
                    dir.store_account(contact, directory, &key).await?;
                }
                info!("ACME: new account key made");
                key
            }
        };
        *account = Some(key.clone());
        Ok(Some(key))
    }

    async fn store_account(
        &self,
        contact: &[String],
        directory: &str,
        key: &[u8],
    ) -> io::Result<()> {
        *self.account.lock().await = Some(key.to_vec());
        match &self.dir {
            Some(dir) => dir.store_account(contact, directory, key).await,
            None => Ok(()),
        }
    }
}
