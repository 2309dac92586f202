//! What an operator asks of a running server — `/metrics` and `/health` — and the small
//! plain-HTTP listeners beside the main one: the optional `--metrics-bind` listener (only
//! `GET /metrics` and `GET /health`, so metrics can be scraped on a private address) and
//! the connection loop the redirect listener shares with it.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{header, Method, Request, Response, StatusCode};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use log::{debug, error};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::budget::Budget;
use crate::hub::Hub;
use crate::link::Links;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// Connections the metrics listener serves at once; more are closed at accept.
const MAX_CONNECTIONS: usize = 64;

/// The Prometheus text content type.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What `/metrics` and `/health` read.
pub struct Ops {
    pub metrics: Arc<Metrics>,
    pub hub: Arc<Hub>,
    pub budget: Arc<Budget>,
    pub shutdown: Shutdown,
    /// Links to other servers, whose state `/health` reports.
    pub links: Option<Arc<Links>>,
}

impl Ops {
    /// What `/health` answers: 503 once shutdown has begun; 200 `DEGRADED: …` while a
    /// link's transport is down (local members are still served, so a load balancer
    /// should keep this server); else 200 `OK`.
    pub fn health(&self) -> (StatusCode, String) {
        if self.shutdown.is_shutdown() {
            (StatusCode::SERVICE_UNAVAILABLE, "shutting down".into())
        } else if let Some(part) = self.links.as_ref().and_then(|l| l.degraded()) {
            (StatusCode::OK, format!("DEGRADED: {part}"))
        } else {
            (StatusCode::OK, "OK".into())
        }
    }

    /// The Prometheus text of every metric, with the computed gauges brought up to date.
    pub fn metrics_text(&self) -> String {
        let (channels, frames, bytes) = self.hub.stats();
        let m = &self.metrics;
        m.channels.set(channels as i64);
        m.history_frames.set(frames as i64);
        m.history_bytes.set(bytes as i64);
        m.memory_budget.set(self.budget.limit() as i64);
        m.memory_used.set(self.budget.used() as i64);
        m.render()
    }
}

/// Accepts and serves connections on the metrics listener until the task is dropped.
pub async fn serve(listener: TcpListener, ops: Arc<Ops>, header_timeout: Duration) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (tcp, peer) = accept(&listener, "metrics").await;
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            debug!("refused {peer} on the metrics listener: too many connections");
            continue;
        };
        let ops_for_request = ops.clone();
        serve_plain(
            tcp,
            peer,
            permit,
            header_timeout,
            ops.shutdown.clone(),
            move |req| respond(&ops_for_request, req),
        );
    }
}

/// The answer to one request on the metrics listener.
pub fn respond<B>(ops: &Ops, req: &Request<B>) -> Response<String> {
    let get = req.method() == Method::GET || req.method() == Method::HEAD;
    let (code, content_type, body) = match req.uri().path() {
        "/metrics" if get => (StatusCode::OK, METRICS_CONTENT_TYPE, ops.metrics_text()),
        "/health" if get => {
            let (status, body) = ops.health();
            (status, "text/plain; charset=utf-8", body)
        }
        "/metrics" | "/health" => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "Method Not Allowed\n".to_string(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "Not Found\n".to_string(),
        ),
    };
    let mut response = Response::new(body);
    *response.status_mut() = code;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

/// The next connection on `listener`. Accept errors (out of file descriptors, mostly) are
/// logged and retried after a pause instead of spinning.
pub async fn accept(listener: &TcpListener, which: &str) -> (TcpStream, SocketAddr) {
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

/// Serves one plain-HTTP connection on a side listener (redirect, metrics) in its own task,
/// answering each request with `respond`, under the header timeout, until it closes or
/// shutdown begins. `permit` is held for the connection's life.
pub fn serve_plain<F, P>(
    tcp: TcpStream,
    peer: SocketAddr,
    permit: P,
    header_timeout: Duration,
    mut shutdown: Shutdown,
    respond: F,
) where
    F: Fn(&hyper::Request<hyper::body::Incoming>) -> Response<String> + Send + Sync + 'static,
    P: Send + 'static,
{
    tokio::spawn(async move {
        let _permit = permit;
        let service = service_fn(move |req| {
            let response = respond(&req);
            std::future::ready(Ok::<_, std::convert::Infallible>(response))
        });
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .serve_connection(TokioIo::new(tcp), service);
        tokio::pin!(conn);
        let stopped: std::pin::Pin<Box<dyn Future<Output = ()> + Send>> =
            Box::pin(async move { shutdown.recv().await });
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result { debug!("{peer}: {e}"); }
            }
            _ = stopped => {}
        }
    });
}
