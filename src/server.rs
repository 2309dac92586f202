//! The server: binds its listeners, accepts connections under a connection limit, runs
//! TLS and HTTP on each, and shuts everything down gracefully on request. SIGHUP re-reads
//! certificate files; the optional redirect listener sends plain HTTP requests for the
//! configured domains to HTTPS.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use log::{debug, error, info, warn};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::budget::{Budget, Need};
use crate::config::Config;
use crate::http::{self, Handler};
use crate::hub::{Hub, Recorder};
use crate::limits::{IpConnections, IpRateLimiter, Permit};
use crate::logging::Notable;
use crate::metrics::Metrics;
use crate::session::Sessions;
use crate::shutdown::{self, Shutdown, Trigger};
use crate::sweeper::Sweeper;
use crate::tls::{self, Acceptor};
use crate::write_deadline::WriteDeadline;
use crate::Error;

/// How long shutdown waits for connections to close before exiting anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Memory charged to the budget for each open connection: its task, socket, protocol state
/// and the buffers below it (hyper's request buffer before an upgrade; with TLS, the
/// record buffers rustls keeps each way).
pub const CONNECTION_COST: usize = 16 * 1024;
pub const TLS_CONNECTION_COST: usize = 48 * 1024;

/// Largest HTTP request head read before a request is refused.
const MAX_REQUEST_HEAD: usize = 16 * 1024;

/// State every connection shares.
pub struct Shared {
    pub config: Config,
    pub hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
    pub budget: Arc<Budget>,
    pub sessions: Arc<Sessions>,
    pub shutdown: Shutdown,
    /// Static files and the cache of their compressed bodies.
    pub site: crate::static_files::Site,
    /// The compressed-file cache's share of the memory budget, set aside at start.
    _static_cache_share: Option<crate::budget::Reservation>,
    acceptor: Arc<Acceptor>,
    /// History on disk, with `--cache`.
    pub store: Option<Arc<crate::store::Store>>,
    /// New connections per minute per IP, with `--ip-rate`.
    ip_limiter: Option<IpRateLimiter>,
    /// Open connections per IP, with `--per-ip-limit`.
    ip_connections: Option<Arc<IpConnections>>,
}

impl Shared {
    /// What `/health` answers: 503 once shutdown has begun; 200 `DEGRADED: …` while a
    /// backplane is down (local members are still served, so a load balancer should keep
    /// this server); else 200 `OK`.
    pub fn health(&self) -> (::http::StatusCode, String) {
        if self.shutdown.is_shutdown() {
            (
                ::http::StatusCode::SERVICE_UNAVAILABLE,
                "shutting down".into(),
            )
        } else if let Some(part) = crate::nats::degraded(self) {
            (::http::StatusCode::OK, format!("DEGRADED: {part}"))
        } else {
            (::http::StatusCode::OK, "OK".into())
        }
    }

    /// Admits a connection from `peer` on the `which` listener under the per-IP accept
    /// rate, the per-IP open-connection cap and the overall connection limit, in that order
    /// (cheapest refusal first). A refusal is counted and logged, and the caller drops the
    /// socket before any TLS or HTTP work.
    fn admit(&self, peer: SocketAddr, connections: &Arc<Semaphore>, which: &str) -> Option<Permit> {
        let refuse = |reason: &'static str, why: &str| {
            self.metrics.refused(reason);
            let detail = format!("{why} ({which} listener)");
            crate::logging::notable(Notable::ConnectionRefused, reason, &detail, Some(peer));
        };
        if !self.ip_limiter.as_ref().is_none_or(|l| l.admit(peer.ip())) {
            refuse("ip_rate", "over the per-address connection rate");
            return None;
        }
        let ip_place = match &self.ip_connections {
            Some(limit) => match limit.hold(peer.ip()) {
                Some(place) => Some(place),
                None => {
                    refuse("per_ip_limit", "its address has the most connections open");
                    return None;
                }
            },
            None => None,
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            refuse("max_connections", "connection limit reached");
            return None;
        };
        let cost = if self.acceptor.is_tls() {
            TLS_CONNECTION_COST
        } else {
            CONNECTION_COST
        };
        let mut memory = self.budget.try_reserve(cost, Need::Growth);
        if memory.is_none() {
            // History of channels without members goes before anyone is turned away.
            self.hub.relieve(self.budget.relief_for(cost, Need::Growth));
            memory = self.budget.try_reserve(cost, Need::Growth);
        }
        let Some(memory) = memory else {
            refuse("memory", "memory budget reached");
            self.metrics.budget_refused("connection");
            return None;
        };
        Some(Permit::new(
            permit,
            ip_place,
            memory,
            self.metrics.connections_open.clone(),
        ))
    }

    /// Updates the gauges that are computed rather than counted.
    pub fn refresh_gauges(&self) {
        let (channels, frames, bytes) = self.hub.stats();
        self.metrics.channels.set(channels as i64);
        self.metrics.history_frames.set(frames as i64);
        self.metrics.history_bytes.set(bytes as i64);
        self.metrics.memory_budget.set(self.budget.limit() as i64);
        self.metrics.memory_used.set(self.budget.used() as i64);
    }

    /// Re-reads the --cert/--key files for new handshakes (what SIGHUP does); connections
    /// already open keep their certificate. Ok(false) when there are no files to read. On
    /// error the current certificate stays in use.
    pub fn reload_certificates(&self) -> Result<bool, Error> {
        let result = self.acceptor.reload();
        match &result {
            Ok(true) => info!("certificate files reloaded"),
            Ok(false) => info!("no certificate files to reload"),
            Err(e) => warn!("certificate reload failed, keeping the current certificate: {e}"),
        }
        result
    }
}

/// A bound, not yet running server.
pub struct Server {
    listener: TcpListener,
    /// The separate plain-HTTP listener for /metrics and /health, if configured.
    metrics_listener: Option<TcpListener>,
    redirect: Option<TcpListener>,
    shared: Arc<Shared>,
    acceptor: Arc<Acceptor>,
    trigger: Trigger,
    connections: Arc<Semaphore>,
}

impl Server {
    /// Binds the listener and prepares TLS. Nothing is served until [`Server::run`].
    pub async fn bind(config: Config) -> Result<Server, Error> {
        let acceptor = Arc::new(Acceptor::from_config(&config)?);
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| Error::Bind(config.listen, e))?;
        let metrics_listener = match config.metrics_bind {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|e| Error::Bind(addr, e))?,
            ),
            None => None,
        };
        let redirect = match config.redirect {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|e| Error::Bind(addr, e))?,
            ),
            None => None,
        };
        let (trigger, shutdown) = shutdown::channel();
        let connections = Arc::new(Semaphore::new(config.max_connections));
        let budget = Budget::new(config.max_memory);
        let hub = Arc::new(Hub::new(
            config.hub.clone(),
            &config.server_id,
            budget.clone(),
        ));
        let (ip_rate, per_ip_limit) = (config.ip_rate, config.per_ip_limit);
        let metrics = Arc::new(Metrics::new());
        let sweeper = Sweeper::new(config.session.deadlines());
        let sessions = Arc::new(Sessions {
            hub: hub.clone(),
            metrics: metrics.clone(),
            budget: budget.clone(),
            sweeper,
            config: config.session.clone(),
            key: config.key.clone(),
            peer_key: config.peer_key.clone(),
        });
        let store = match &config.cache {
            Some(cache) => {
                let store =
                    crate::store::Store::open(cache, &config.hub, &metrics, budget.clone())?;
                hub.set_recorder(store.clone());
                Some(store)
            }
            None => None,
        };
        let shared = Arc::new(Shared {
            hub,
            metrics,
            budget: budget.clone(),
            sessions,
            store,
            site: crate::static_files::Site {
                root: config.wwwroot.clone(),
                domains: config.domains.clone(),
                cache: crate::compression::StaticCache::new(config.static_cache_bytes),
                budget: budget.clone(),
            },
            _static_cache_share: Some(budget.charge(config.static_cache_bytes)),
            config,
            shutdown,
            acceptor: acceptor.clone(),
            ip_limiter: ip_rate.map(IpRateLimiter::new),
            ip_connections: per_ip_limit.map(IpConnections::new),
        });
        if !shared.config.peers.urls.is_empty() {
            let peers =
                crate::peer::Peers::new(Arc::downgrade(&shared), shared.config.peers.clone())?;
            shared.hub.set_backplane(Arc::new(peers));
        }
        if let Some(nats) = &shared.config.nats {
            let nats = crate::nats::Nats::connect(Arc::downgrade(&shared), nats.clone()).await?;
            shared.hub.set_backplane(Arc::new(nats));
        }
        Ok(Server {
            listener,
            metrics_listener,
            redirect,
            shared,
            acceptor,
            trigger,
            connections,
        })
    }

    /// The address the main listener is bound to (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    /// The address the HTTP-to-HTTPS redirect listener is bound to, if there is one.
    pub fn redirect_addr(&self) -> Option<SocketAddr> {
        self.redirect
            .as_ref()
            .map(|l| l.local_addr().expect("bound listener has an address"))
    }

    /// The address the separate metrics listener is bound to, if there is one.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .map(|l| l.local_addr().expect("bound listener has an address"))
    }

    /// State shared with connections, for inspection by tests and embedders.
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Serves until `signal` completes, then closes every connection (WebSockets get
    /// close 1001) and returns once they are gone or the grace period is over.
    pub async fn run(self, signal: impl Future<Output = ()>) -> Result<(), Error> {
        let Server {
            listener,
            metrics_listener,
            redirect,
            shared,
            acceptor,
            trigger,
            connections,
        } = self;
        let handler = http::routes(shared.clone());
        info!(
            "listening on {} ({}), domains {:?}",
            listener.local_addr().map_err(Error::Io)?,
            if acceptor.is_tls() { "TLS" } else { "plain" },
            shared.config.domains
        );
        // Installed before anything is served, so a SIGHUP never meets the default action.
        let reloader = reload_on_hangup(shared.clone())?;
        let sweeper = tokio::spawn(sweep_expired(shared.clone()));
        let session_sweeper =
            tokio::spawn(shared.sessions.sweeper.clone().run(shared.shutdown.clone()));
        let metrics_server = match metrics_listener {
            Some(l) => {
                info!("serving /metrics on {}", l.local_addr().map_err(Error::Io)?);
                Some(tokio::spawn(crate::admin::serve(l, shared.clone())))
            }
            None => None,
        };
        let redirector = match redirect {
            Some(redirect) => {
                let https_port = listener.local_addr().map_err(Error::Io)?.port();
                info!(
                    "redirecting HTTP on {} to HTTPS",
                    redirect.local_addr().map_err(Error::Io)?
                );
                Some(tokio::spawn(redirect_loop(
                    redirect,
                    https_port,
                    shared.clone(),
                    connections.clone(),
                )))
            }
            None => None,
        };
        let accept = accept_loop(&listener, &shared, &acceptor, &handler, &connections);
        tokio::select! {
            _ = accept => {}
            _ = signal => info!("shutting down"),
        }
        trigger.fire();
        sweeper.abort();
        if let Some(metrics_server) = metrics_server {
            metrics_server.abort();
        }
        if let Some(reloader) = reloader {
            reloader.abort();
        }
        if let Some(redirector) = redirector {
            redirector.abort();
            let _ = redirector.await; // the redirect listener is closed from here on
        }
        acceptor.stop();
        drop(listener);
        let all = shared.config.max_connections as u32;
        match tokio::time::timeout(SHUTDOWN_GRACE, connections.acquire_many(all)).await {
            Ok(_) => info!("all connections closed"),
            Err(_) => warn!("shutdown grace period over with connections still open"),
        }
        session_sweeper.abort();
        if let Some(store) = &shared.store {
            if tokio::time::timeout(SHUTDOWN_GRACE, store.sync())
                .await
                .is_err()
            {
                warn!("history not fully written at shutdown");
            }
        }
        Ok(())
    }
}

/// The next connection on `listener`. Accept errors (out of file descriptors, mostly) are
/// logged and retried after a pause instead of spinning.
pub(crate) async fn accept(listener: &TcpListener, which: &str) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(e) => {
                error!("accept on the {which} listener failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn accept_loop(
    listener: &TcpListener,
    shared: &Arc<Shared>,
    acceptor: &Arc<Acceptor>,
    handler: &Handler,
    connections: &Arc<Semaphore>,
) {
    loop {
        let (tcp, peer) = accept(listener, "main").await;
        shared.metrics.connections_accepted.inc();
        let Some(permit) = shared.admit(peer, connections, "main") else {
            continue;
        };
        tokio::spawn(serve_connection(
            tcp,
            peer,
            permit,
            shared.clone(),
            acceptor.clone(),
            handler.clone(),
        ));
    }
}

async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    permit: Permit,
    shared: Arc<Shared>,
    acceptor: Arc<Acceptor>,
    handler: Handler,
) {
    let metrics = &shared.metrics;
    // Held by this task and, after an upgrade, by the session: the connection counts
    // against the limits and as open until both are done.
    let permit = Arc::new(permit);
    let _ = tcp.set_nodelay(true);
    let timeout = shared.config.handshake_timeout;
    let io = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(Ok(io)) => io,
        Ok(Err(e)) if tls::challenge_answered(&e) => return,
        Ok(Err(e)) => {
            metrics.tls_handshake_failures.inc();
            debug!("{peer}: TLS handshake failed: {e}");
            return;
        }
        Err(_) => {
            metrics.tls_handshake_failures.inc();
            debug!("{peer}: TLS handshake timed out");
            return;
        }
    };
    let mut shutdown = shared.shutdown.clone();
    let service = {
        let shared = shared.clone();
        let permit = permit.clone();
        service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(http::PeerAddr(peer));
            http::dispatch(req, handler.clone(), shared.clone(), permit.clone())
        })
    };
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .max_buf_size(MAX_REQUEST_HEAD)
        .serve_connection(
            TokioIo::new(WriteDeadline::new(io, shared.config.session.write_timeout)),
            service,
        )
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result { debug!("{peer}: {e}"); }
        }
        _ = shutdown.recv() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
        }
    }
}

/// Listens for SIGHUP and reloads certificate files on each (Unix only).
fn reload_on_hangup(shared: Arc<Shared>) -> Result<Option<JoinHandle<()>>, Error> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangup = signal(SignalKind::hangup()).map_err(Error::Io)?;
        Ok(Some(tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                info!("SIGHUP: reloading certificate files");
                let _ = shared.reload_certificates();
            }
        })))
    }
    #[cfg(not(unix))]
    {
        let _ = shared;
        Ok(None)
    }
}

/// Accepts plain HTTP connections on the redirect listener, under the same connection
/// limit and header timeout as the main listener.
async fn redirect_loop(
    listener: TcpListener,
    https_port: u16,
    shared: Arc<Shared>,
    connections: Arc<Semaphore>,
) {
    loop {
        let (tcp, peer) = accept(&listener, "redirect").await;
        let Some(permit) = shared.admit(peer, &connections, "redirect") else {
            continue;
        };
        serve_plain(
            tcp,
            peer,
            permit,
            shared.clone(),
            "redirect",
            move |shared, req| redirect_response(&shared.config.domains, https_port, req),
        );
    }
}

/// Serves one plain-HTTP connection on a side listener (redirect, metrics) in its own task,
/// answering each request with `respond`, under the header timeout, until it closes or
/// shutdown begins.
pub(crate) fn serve_plain<F, P>(
    tcp: TcpStream,
    peer: SocketAddr,
    permit: P,
    shared: Arc<Shared>,
    which: &'static str,
    respond: F,
) where
    F: Fn(&Shared, &hyper::Request<hyper::body::Incoming>) -> ::http::Response<String>
        + Send
        + Sync
        + 'static,
    P: Send + 'static,
{
    tokio::spawn(async move {
        let _permit = permit;
        let mut shutdown = shared.shutdown.clone();
        let service = {
            let shared = shared.clone();
            service_fn(move |req| {
                let response = respond(&shared, &req);
                async move { Ok::<_, std::convert::Infallible>(response) }
            })
        };
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(shared.config.handshake_timeout)
            .serve_connection(TokioIo::new(tcp), service);
        tokio::pin!(conn);
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result { debug!("{peer} ({which}): {e}"); }
            }
            _ = shutdown.recv() => {}
        }
    });
}

/// A 301 to the same path and query over HTTPS for the configured domains, 404 otherwise.
/// The port is left out of the location when HTTPS is on 443.
pub fn redirect_response<B>(
    domains: &[String],
    https_port: u16,
    req: &::http::Request<B>,
) -> ::http::Response<String> {
    let host = req
        .uri()
        .host()
        .or_else(|| {
            req.headers()
                .get(::http::header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .map(|h| {
            // A name with an optional port; bracketed IPv6 literals never match a domain.
            let name = h.rsplit_once(':').map_or(h, |(name, _port)| name);
            name.trim_end_matches('.').to_ascii_lowercase()
        });
    let path = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    let mut response = ::http::Response::new(String::new());
    match host.filter(|h| domains.iter().any(|d| d == h)) {
        Some(host) => {
            let port = match https_port {
                443 => String::new(),
                port => format!(":{port}"),
            };
            let location = format!("https://{host}{port}{path}");
            match ::http::HeaderValue::try_from(location) {
                Ok(location) => {
                    *response.status_mut() = ::http::StatusCode::MOVED_PERMANENTLY;
                    response
                        .headers_mut()
                        .insert(::http::header::LOCATION, location);
                    *response.body_mut() = "Moved Permanently\n".into();
                }
                Err(_) => *response.status_mut() = ::http::StatusCode::BAD_REQUEST,
            }
        }
        None => {
            *response.status_mut() = ::http::StatusCode::NOT_FOUND;
            *response.body_mut() = "Not Found\n".into();
        }
    }
    response
}

/// Drops channels whose history has expired, once a minute.
async fn sweep_expired(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tick.tick().await;
        if let Some(limiter) = &shared.ip_limiter {
            limiter.sweep();
        }
        let removed = shared.hub.sweep_expired();
        if let Some(store) = &shared.store {
            for channel in &removed {
                store.forget(channel.clone());
            }
        }
        let removed = removed.len();
        if removed > 0 {
            info!("expired the history of {removed} idle channels");
        }
    }
}

/// Completes on SIGTERM or Ctrl-C.
pub async fn termination() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// Runs a server with `config` until SIGTERM or Ctrl-C.
pub async fn run(config: Config) -> Result<(), Error> {
    // Every connection is a file descriptor: raise the soft limit to the hard one.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => info!("open file limit: {limit}"),
        Err(e) => warn!("could not raise the open file limit: {e}"),
    }
    let server = Server::bind(config).await?;
    server.run(termination()).await
}
