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
use log::{debug, info, warn};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::admin::{self, accept, serve_plain, Ops};
use crate::budget::{Budget, Need};
use crate::config::Config;
use crate::http::{self, Handler, HttpContext, HttpSettings};
use crate::hub::{Hub, Recorder};
use crate::limits::{IpConnections, IpRateLimiter, Permit};
use crate::link::nats::NatsTransport;
use crate::link::peer::{Identity, PeerTransport};
use crate::link::{LinkBackplane, LinkContext, LinkCounters, Links, Transport};
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

/// The server's own state: what it wires together. Modules get narrow handles from it (the
/// hub, metrics, the budget, a shutdown signal, their settings), never this whole.
/// Public for tests and embedders, which inspect it.
pub struct Shared {
    pub config: Config,
    pub hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
    pub budget: Arc<Budget>,
    pub sessions: Arc<Sessions>,
    pub shutdown: Shutdown,
    /// What the main listener's requests need (static site included).
    pub http: Arc<HttpContext>,
    /// `/metrics` and `/health`.
    pub ops: Arc<Ops>,
    /// Links to other servers, with `--peer` or `--nats`.
    pub links: Option<Arc<Links>>,
    /// The compressed-file cache's share of the memory budget, set aside at start.
    _static_cache_share: crate::budget::Reservation,
    acceptor: Arc<Acceptor>,
    /// History on disk, with `--cache`.
    pub store: Option<Arc<crate::store::Store>>,
    /// New connections per minute per IP, with `--ip-rate`.
    ip_limiter: Option<IpRateLimiter>,
    /// Open connections per IP, with `--per-ip-limit`.
    ip_connections: Option<Arc<IpConnections>>,
}

impl Shared {
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
        let listener = bind(config.listen).await?;
        let metrics_listener = match config.metrics_bind {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let redirect = match config.redirect {
            Some(addr) => Some(bind(addr).await?),
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
        let sweeper = Sweeper::new((&config.session).into());
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
        let links = links(
            &config,
            &hub,
            &metrics,
            &budget,
            &sessions.sweeper,
            &shutdown,
        )
        .await?;
        if let Some(links) = &links {
            hub.set_backplane(Arc::new(LinkBackplane(links.clone())));
        }
        let ops = Arc::new(Ops {
            metrics: metrics.clone(),
            hub: hub.clone(),
            budget: budget.clone(),
            shutdown: shutdown.clone(),
            links: links.clone(),
        });
        let http = Arc::new(HttpContext {
            settings: HttpSettings {
                domains: config.domains.clone(),
                tls: acceptor.is_tls(),
                proxies: config.proxies.clone(),
                metrics_on_main: config.metrics_on_main,
                peer_key: config.peer_key.clone(),
                peer_envelopes: config.peer_envelopes,
            },
            sessions: sessions.clone(),
            site: crate::static_files::Site {
                root: config.wwwroot.clone(),
                domains: config.domains.clone(),
                cache: crate::compression::StaticCache::new(config.static_cache_bytes),
                budget: budget.clone(),
            },
            ops: ops.clone(),
            metrics: metrics.clone(),
        });
        let shared = Arc::new(Shared {
            hub,
            metrics,
            budget: budget.clone(),
            sessions,
            store,
            http,
            ops,
            links,
            _static_cache_share: budget.charge(config.static_cache_bytes),
            config,
            shutdown,
            acceptor: acceptor.clone(),
            ip_limiter: ip_rate.map(IpRateLimiter::new),
            ip_connections: per_ip_limit.map(IpConnections::new),
        });
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
        let handler = http::routes(shared.http.clone());
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
                let timeout = shared.config.handshake_timeout;
                Some(tokio::spawn(admin::serve(l, shared.ops.clone(), timeout)))
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

/// A listener on `addr`.
async fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Bind(addr, e))
}

/// The links to other servers the configuration asks for: one transport per `--peer`, or
/// NATS with `--nats` (never both).
async fn links(
    config: &Config,
    hub: &Arc<Hub>,
    metrics: &Arc<Metrics>,
    budget: &Arc<Budget>,
    sweeper: &Arc<Sweeper>,
    shutdown: &Shutdown,
) -> Result<Option<Arc<Links>>, Error> {
    let mut transports: Vec<(Arc<dyn Transport>, LinkCounters)> = Vec::new();
    let peer_counters = LinkCounters {
        up: metrics.peer_links_up.clone(),
        failures: metrics.peer_link_failures.clone(),
        down: metrics.peer_links_down.clone(),
    };
    let identity = Identity {
        server_id: config.server_id.clone(),
        key: config.key.clone(),
        peer_key: config.peer_key.clone(),
    };
    for url in &config.peers.urls {
        let transport = PeerTransport::new(
            url.clone(),
            config.peers.ca.as_deref(),
            identity.clone(),
            config.session.max_message_size,
            budget.clone(),
            sweeper.clone(),
        )?;
        transports.push((Arc::new(transport), peer_counters.clone()));
    }
    if let Some(nats) = &config.nats {
        let per_subject = config.hub.history_limit + config.hub.queue_frames;
        let transport = NatsTransport::connect(
            nats.clone(),
            &config.server_id,
            per_subject,
            metrics.clone(),
            budget.clone(),
        )
        .await?;
        let nats_counters = LinkCounters {
            down: metrics.nats_links_down.clone(),
            ..LinkCounters::default()
        };
        transports.push((transport, nats_counters));
    }
    if transports.is_empty() {
        return Ok(None);
    }
    let context = LinkContext {
        hub: hub.clone(),
        shutdown: shutdown.clone(),
        grace: config.peers.grace,
        pause_limit: config.session.write_timeout,
    };
    Ok(Some(Links::new(context, transports)))
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
            http::dispatch(req, handler.clone(), shared.http.clone(), permit.clone())
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
        let domains = shared.config.domains.clone();
        serve_plain(
            tcp,
            peer,
            permit,
            shared.config.handshake_timeout,
            shared.shutdown.clone(),
            move |req| redirect_response(&domains, https_port, req),
        );
    }
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
