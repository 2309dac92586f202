//! The optional `--metrics-bind` listener: plain HTTP serving only `GET /metrics` and
//! `GET /health`, so that metrics can be scraped on a private address while the public
//! listener answers 404 for them.

use std::sync::Arc;

use http::{header, Method, Request, Response, StatusCode};
use log::debug;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::server::Shared;

/// Connections the metrics listener serves at once; more are closed at accept.
const MAX_CONNECTIONS: usize = 64;

/// The Prometheus text content type.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Accepts and serves connections on `listener` until the task is dropped or shutdown
/// begins.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (tcp, peer) = crate::server::accept(&listener, "metrics").await;
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            debug!("refused {peer} on the metrics listener: too many connections");
            continue;
        };
        crate::server::serve_plain(tcp, peer, permit, shared.clone(), "metrics", respond);
    }
}

/// The answer to one request on the metrics listener.
pub fn respond<B>(shared: &Shared, req: &Request<B>) -> Response<String> {
    let get = req.method() == Method::GET || req.method() == Method::HEAD;
    let (code, content_type, body) = match req.uri().path() {
        "/metrics" if get => {
            shared.refresh_gauges();
            (
                StatusCode::OK,
                METRICS_CONTENT_TYPE,
                shared.metrics.render(),
            )
        }
        "/health" if get => {
            let (status, body) = shared.health();
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
