//! HTTP on the main listener: WebSocket upgrades for the `mles-websocket` subprotocol go
//! to a session; requests under a `--proxy` prefix go to their upstream; everything else
//! goes to warp filters (health, metrics, static files).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use futures::future::BoxFuture;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use log::debug;
use warp::reply::Response as WarpResponse;
use warp::Filter;

use crate::admin::Ops;
use crate::logging::Notable;
use crate::metrics::Metrics;
use crate::protocol::{
    self, PeerRole, PEER_CHALLENGE_HEADER, PEER_HEADER, PEER_NONCE_HEADER, PEER_PROOF_HEADER,
    PEER_VERSION, SUBPROTOCOL,
};
use crate::proxy::ProxyRule;
use crate::session::{PeerChallenge, Sessions};
use crate::static_files;
use crate::write_deadline::WriteDeadline;

/// The client's address, set as a request extension by the connection that read it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// The client address of `req`, if its connection recorded one.
pub fn peer_addr<B>(req: &Request<B>) -> Option<SocketAddr> {
    req.extensions().get::<PeerAddr>().map(|p| p.0)
}

/// Whether `/metrics` on the main listener answers a client at `peer`: only when asked
/// for with `--metrics-on-main` (`on_main`), and then only to loopback clients.
pub fn metrics_allowed(on_main: bool, peer: Option<SocketAddr>) -> bool {
    on_main && peer.is_some_and(|p| is_loopback(p.ip()))
}

/// The main listener's settings.
#[derive(Clone)]
pub struct HttpSettings {
    /// Hosts static files and proxied paths are served for.
    pub domains: Vec<String>,
    /// Whether the listener speaks TLS (for `X-Forwarded-Proto`).
    pub tls: bool,
    pub proxies: Vec<ProxyRule>,
    pub metrics_on_main: bool,
    /// Upgrades asking for peer mode are challenged only with a peer key.
    pub peer_key: Option<protocol::PeerKey>,
    /// Off only to answer peer links as a plain mles v2 server would.
    pub peer_envelopes: bool,
}

/// What the main listener's requests need: its settings, the sessions upgrades start,
/// the static site, and the operator's view.
pub struct HttpContext {
    pub settings: HttpSettings,
    pub sessions: Arc<Sessions>,
    pub site: static_files::Site,
    pub ops: Arc<Ops>,
    pub metrics: Arc<Metrics>,
}

fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// Answers one HTTP request; built once per server and shared by every connection.
pub type Handler = Arc<dyn Fn(Request<Incoming>) -> BoxFuture<'static, WarpResponse> + Send + Sync>;

/// The warp routes for requests that are not WebSocket upgrades.
pub fn routes(shared: Arc<HttpContext>) -> Handler {
    let health_state = shared.clone();
    let health = warp::path!("health").and(warp::get()).map(move || {
        let (status, body) = health_state.ops.health();
        warp::reply::with_status(body, status).into_response()
    });
    let metrics_state = shared.clone();
    let metrics = warp::path!("metrics").and(warp::get()).map(move || {
        let body = metrics_state.ops.metrics_text();
        warp::reply::with_header(
            body,
            header::CONTENT_TYPE,
            crate::admin::METRICS_CONTENT_TYPE,
        )
        .into_response()
    });
    let static_state = shared.clone();
    let files = warp::method()
        .and(warp::header::optional::<String>("host"))
        .and(warp::path::full())
        .and(warp::header::optional::<String>("accept-encoding"))
        .then(
            move |method: Method,
                  host: Option<String>,
                  path: warp::path::FullPath,
                  accept_encoding: Option<String>| {
                let shared = static_state.clone();
                async move {
                    if method != Method::GET && method != Method::HEAD {
                        return static_files::status(StatusCode::METHOD_NOT_ALLOWED);
                    }
                    static_files::serve(
                        &shared.site,
                        host.as_deref(),
                        path.as_str(),
                        method == Method::HEAD,
                        accept_encoding.as_deref(),
                    )
                    .await
                }
            },
        );
    let service = warp::service(health.or(metrics).unify().or(files).unify());
    let settings = &shared.settings;
    let proxy = Arc::new(crate::proxy::Proxy::new(&settings.proxies, settings.tls));
    Arc::new(move |req| {
        use tower_service::Service;
        let mut service = service.clone();
        let proxy = proxy.clone();
        let shared = shared.clone();
        Box::pin(async move {
            let path = req.uri().path();
            let peer = peer_addr(&req);
            let on_main = shared.settings.metrics_on_main;
            if path.trim_end_matches('/') == "/metrics" && !metrics_allowed(on_main, peer) {
                return static_files::status(StatusCode::NOT_FOUND);
            }
            if let Some(rule) = proxy.route(path) {
                // Like static files, proxied paths are served for the configured domains only.
                let host = req
                    .headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(static_files::host_name);
                if host.is_some_and(|h| shared.settings.domains.contains(&h)) {
                    return proxy.forward(req, rule, peer).await;
                }
            }
            match service.call(req).await {
                Ok(response) => response,
                Err(never) => match never {},
            }
        })
    })
}

use warp::Reply;

/// Routes one request on a connection: upgrades to a session, the rest to `handler`.
pub async fn dispatch(
    req: Request<Incoming>,
    handler: Handler,
    shared: Arc<HttpContext>,
    permit: Arc<crate::limits::Permit>,
) -> Result<WarpResponse, Infallible> {
    if is_upgrade(req.headers()) {
        Ok(upgrade(req, shared, permit))
    } else {
        Ok(handler(req).await)
    }
}

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    header_has_token(headers, header::UPGRADE, "websocket")
}

/// True when the client offers the Mles subprotocol, alone or in a list.
pub fn offers_subprotocol(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == SUBPROTOCOL)
}

fn refuse(
    shared: &HttpContext,
    code: StatusCode,
    reason: &'static str,
    metric: &'static str,
    client: Option<SocketAddr>,
) -> WarpResponse {
    shared.metrics.refused(metric);
    crate::logging::notable(Notable::ConnectionRefused, metric, reason, client);
    let mut response = Response::new(format!("{reason}\n"));
    *response.status_mut() = code;
    response.map(Into::into)
}

/// Validates a WebSocket upgrade and, if it is acceptable, answers 101 and starts a
/// session on the upgraded connection.
fn upgrade(
    mut req: Request<Incoming>,
    shared: Arc<HttpContext>,
    permit: Arc<crate::limits::Permit>,
) -> WarpResponse {
    let client = peer_addr(&req);
    let headers = req.headers();
    if req.method() != Method::GET || !header_has_token(headers, header::CONNECTION, "upgrade") {
        return refuse(
            &shared,
            StatusCode::BAD_REQUEST,
            "malformed WebSocket upgrade",
            "bad_upgrade",
            client,
        );
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        let mut response = refuse(
            &shared,
            StatusCode::UPGRADE_REQUIRED,
            "WebSocket version 13 required",
            "bad_upgrade",
            client,
        );
        response.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return response;
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return refuse(
            &shared,
            StatusCode::BAD_REQUEST,
            "Sec-WebSocket-Key missing",
            "bad_upgrade",
            client,
        );
    };
    if !offers_subprotocol(headers) {
        return refuse(
            &shared,
            StatusCode::BAD_REQUEST,
            "subprotocol mles-websocket required",
            "subprotocol",
            client,
        );
    }
    let accept = crate::websocket::accept_key(key.as_bytes());
    let (challenge, peer_answer) = match peer_challenge(&shared.settings, headers) {
        Some((challenge, proof)) => {
            let answer = (challenge.server_nonce.clone(), proof);
            (Some(challenge), Some(answer))
        }
        None => (None, None),
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let sessions = shared.sessions.clone();
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                // Back to the connection's own stream (and what was read past the request),
                // so the session reads it without hyper's layer in between.
                type Io = WriteDeadline<crate::connection::BoxedIo>;
                let (io, leftover) = match upgraded.downcast::<TokioIo<Io>>() {
                    // The session keeps its own deadlines.
                    Ok(parts) => (parts.io.into_inner().into_inner(), parts.read_buf),
                    Err(upgraded) => {
                        let io: crate::connection::BoxedIo = Box::pin(TokioIo::new(upgraded));
                        (io, bytes::Bytes::new())
                    }
                };
                crate::session::run(io, leftover, sessions, challenge, permit, client).await;
            }
            Err(e) => debug!("upgrade failed: {e}"),
        }
    });
    let mut response = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .header(header::SEC_WEBSOCKET_PROTOCOL, SUBPROTOCOL);
    if let Some((server_nonce, proof)) = peer_answer {
        response = response
            .header(PEER_HEADER, PEER_VERSION)
            .header(PEER_CHALLENGE_HEADER, server_nonce)
            .header(PEER_PROOF_HEADER, proof);
    }
    response
        .body(String::new())
        .expect("valid response")
        .map(Into::into)
}

/// The challenge for a server of this kind that asks to link (with its nonce) to a server
/// holding a peer key, and this server's proof of that key. Without a peer key here, or
/// without a well-formed request, the connection is an ordinary client: nothing it sends
/// can earn it more than a client gets.
fn peer_challenge(config: &HttpSettings, headers: &HeaderMap) -> Option<(PeerChallenge, String)> {
    let key = config.peer_key.as_ref().filter(|_| config.peer_envelopes)?;
    if headers.get(PEER_HEADER).map(HeaderValue::as_bytes) != Some(PEER_VERSION.as_bytes()) {
        return None;
    }
    let link_nonce = headers
        .get(PEER_NONCE_HEADER)
        .and_then(|n| n.to_str().ok())
        .filter(|n| protocol::valid_peer_nonce(n))?
        .to_string();
    let server_nonce = protocol::peer_nonce();
    let proof = key.prove(PeerRole::Server, &link_nonce, &server_nonce, &[]);
    Some((
        PeerChallenge {
            link_nonce,
            server_nonce,
        },
        proof,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subprotocol_is_found_alone_or_in_a_list() {
        let mut h = HeaderMap::new();
        assert!(!offers_subprotocol(&h));
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("chat, mles-websocket"),
        );
        assert!(offers_subprotocol(&h));
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("mles-websocket-x, chat"),
        );
        assert!(!offers_subprotocol(&h));
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("chat"),
        );
        h.append(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("mles-websocket"),
        );
        assert!(offers_subprotocol(&h));
    }
}
