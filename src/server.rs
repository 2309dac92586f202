//! The server: binds its listeners, accepts connections under a connection limit, runs
//! TLS and HTTP on each, and shuts everything down gracefully on request.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use log::{debug, error, info, warn};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::Config;
use crate::http::{self, Handler};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::shutdown::{self, Shutdown, Trigger};
use crate::tls::Acceptor;
use crate::Error;

/// How long shutdown waits for connections to close before exiting anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// State every connection shares.
pub struct Shared {
    pub config: Config,
    pub hub: Hub,
    pub metrics: Metrics,
    pub shutdown: Shutdown,
}

impl Shared {
    /// Updates the gauges that are computed rather than counted.
    pub fn refresh_gauges(&self) {
        let (channels, frames, bytes) = self.hub.stats();
        self.metrics.channels.set(channels as i64);
        self.metrics.history_frames.set(frames as i64);
        self.metrics.history_bytes.set(bytes as i64);
    }
}

/// A bound, not yet running server.
pub struct Server {
    listener: TcpListener,
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
        let (trigger, shutdown) = shutdown::channel();
        let connections = Arc::new(Semaphore::new(config.max_connections));
        let shared = Arc::new(Shared {
            hub: Hub::new(config.hub.clone()),
            metrics: Metrics::new(),
            config,
            shutdown,
        });
        Ok(Server {
            listener,
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

    /// State shared with connections, for inspection by tests and embedders.
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Serves until `signal` completes, then closes every connection (WebSockets get
    /// close 1001) and returns once they are gone or the grace period is over.
    pub async fn run(self, signal: impl Future<Output = ()>) -> Result<(), Error> {
        let Server {
            listener,
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
        let sweeper = tokio::spawn(sweep_expired(shared.clone()));
        let accept = accept_loop(&listener, &shared, &acceptor, &handler, &connections);
        tokio::select! {
            _ = accept => {}
            _ = signal => info!("shutting down"),
        }
        trigger.fire();
        sweeper.abort();
        drop(listener);
        let all = shared.config.max_connections as u32;
        match tokio::time::timeout(SHUTDOWN_GRACE, connections.acquire_many(all)).await {
            Ok(_) => info!("all connections closed"),
            Err(_) => warn!("shutdown grace period over with connections still open"),
        }
        Ok(())
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
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors or similar: back off instead of spinning.
                error!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        shared.metrics.connections_accepted.inc();
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            shared.metrics.refused("max_connections");
            debug!("refused {peer}: connection limit reached");
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
    permit: OwnedSemaphorePermit,
    shared: Arc<Shared>,
    acceptor: Arc<Acceptor>,
    handler: Handler,
) {
    let metrics = &shared.metrics;
    metrics.connections_open.inc();
    let _ = tcp.set_nodelay(true);
    let timeout = shared.config.handshake_timeout;
    let io = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(Ok(io)) => io,
        Ok(Err(e)) => {
            metrics.tls_handshake_failures.inc();
            debug!("{peer}: TLS handshake failed: {e}");
            metrics.connections_open.dec();
            return;
        }
        Err(_) => {
            metrics.tls_handshake_failures.inc();
            debug!("{peer}: TLS handshake timed out");
            metrics.connections_open.dec();
            return;
        }
    };
    let permit = Arc::new(permit);
    let mut shutdown = shared.shutdown.clone();
    let service = {
        let shared = shared.clone();
        let permit = permit.clone();
        service_fn(move |req| {
            http::dispatch(
                req,
                handler.clone(),
                shared.clone(),
                permit.clone(),
                shared.shutdown.clone(),
            )
        })
    };
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(io), service)
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
    metrics.connections_open.dec();
}

/// Drops channels whose history has expired, once a minute.
async fn sweep_expired(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tick.tick().await;
        let removed = shared.hub.sweep_expired();
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
    let server = Server::bind(config).await?;
    server.run(termination()).await
}
