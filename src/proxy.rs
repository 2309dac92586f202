//! Reverse proxy rules, as mles v2.9 has them: `--proxy api/keeper=http://127.0.0.1:8080`
//! forwards every request whose path is `/api/keeper` or lies below it to the upstream,
//! with the prefix stripped (`/api/keeper/x?y` goes to `http://127.0.0.1:8080/x?y`) and the
//! query kept. Prefixes match whole path segments; when several match, the longest wins.
//!
//! The request and response bodies are streamed, hop-by-hop headers are dropped both ways,
//! and the upstream learns the client through `X-Forwarded-For`, `X-Forwarded-Proto` and
//! `X-Forwarded-Host`. An upstream that cannot be reached or fails answers 502, one that
//! does not answer in time 504. Only plain `http://` upstreams are supported.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use http::uri::{Authority, Scheme};
use http::{header, HeaderMap, HeaderName, HeaderValue, Request, StatusCode, Uri, Version};
use hyper::body::{Body, Incoming};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use log::{debug, warn};
use percent_encoding::percent_decode_str;
use tokio::time::Sleep;
use warp::reply::Response as WarpResponse;
use warp::Reply;

/// How long connecting to an upstream may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the upstream may take to send its response head (request body included).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the upstream's response body may stall between two chunks.
const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an idle pooled upstream connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Headers that describe one connection, not the message, and are never forwarded.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// One `prefix=upstream` rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyRule {
    /// `/seg/seg`, no trailing slash.
    prefix: String,
    authority: Authority,
    /// The upstream URL's own path without a trailing slash, usually empty.
    base: String,
}

impl ProxyRule {
    /// Parses `prefix=http://host:port[/base]`; the prefix may be written with or without
    /// slashes around it (`api/keeper`, `/api/keeper/`).
    pub fn parse(spec: &str) -> Result<ProxyRule, String> {
        let (prefix, upstream) = spec
            .split_once('=')
            .ok_or_else(|| format!("proxy rule '{spec}' is not prefix=http://host:port"))?;
        let segments: Vec<&str> = prefix
            .trim()
            .trim_matches('/')
            .split('/')
            .filter(|s| !s.is_empty())
            .collect();
        if segments.is_empty() {
            return Err(format!("proxy rule '{spec}' needs a non-empty path prefix"));
        }
        if segments.iter().any(|s| {
            *s == "." || *s == ".." || s.contains(['?', '#', '%', '\\']) || s.contains(' ')
        }) {
            return Err(format!("proxy prefix '{prefix}' is not a plain path"));
        }
        let uri: Uri = upstream
            .trim()
            .parse()
            .map_err(|e| format!("proxy upstream '{upstream}': {e}"))?;
        if uri.scheme() != Some(&Scheme::HTTP) {
            return Err(format!(
                "proxy upstream '{upstream}' must be an http:// URL"
            ));
        }
        let Some(authority) = uri.authority().cloned() else {
            return Err(format!("proxy upstream '{upstream}' has no host"));
        };
        if uri.query().is_some() || authority.as_str().contains('@') {
            return Err(format!(
                "proxy upstream '{upstream}' must be http://host:port[/path] only"
            ));
        }
        Ok(ProxyRule {
            prefix: format!("/{}", segments.join("/")),
            authority,
            base: uri.path().trim_end_matches('/').to_string(),
        })
    }

    /// The path prefix, as `/seg/seg`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The upstream, as `http://host:port/base`.
    pub fn upstream(&self) -> String {
        format!("http://{}{}", self.authority, self.base)
    }

    /// The rest of `path` after the prefix ("" or "/..."), if the prefix matches.
    fn tail<'a>(&self, path: &'a str) -> Option<&'a str> {
        let rest = path.strip_prefix(&self.prefix)?;
        (rest.is_empty() || rest.starts_with('/')).then_some(rest)
    }
}

impl std::str::FromStr for ProxyRule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ProxyRule::parse(s)
    }
}

/// The configured rules and the client that forwards to their upstreams.
pub struct Proxy {
    rules: Vec<ProxyRule>,
    client: Client<HttpConnector, Incoming>,
    /// `X-Forwarded-Proto`: how clients reach this server.
    proto: HeaderValue,
}

impl Proxy {
    /// A proxy for `rules`; `tls` tells whether clients reach the server over HTTPS.
    pub fn new(rules: &[ProxyRule], tls: bool) -> Proxy {
        let mut rules = rules.to_vec();
        rules.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build(connector);
        Proxy {
            rules,
            client,
            proto: HeaderValue::from_static(if tls { "https" } else { "http" }),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rule whose prefix covers `path`, if any.
    pub fn route(&self, path: &str) -> Option<&ProxyRule> {
        self.rules.iter().find(|r| r.tail(path).is_some())
    }

    /// Forwards `req` to `rule`'s upstream and streams the answer back. `peer` is the
    /// client's address, for `X-Forwarded-For`.
    pub async fn forward(
        &self,
        req: Request<Incoming>,
        rule: &ProxyRule,
        peer: Option<SocketAddr>,
    ) -> WarpResponse {
        let (mut parts, body) = req.into_parts();
        let tail = rule.tail(parts.uri.path()).unwrap_or("");
        // Dot segments would let a request climb out of the upstream's base path.
        if tail
            .split('/')
            .map(|s| percent_decode_str(s).decode_utf8_lossy())
            .any(|s| s == "." || s == ".." || s.contains('\\'))
        {
            return plain(StatusCode::BAD_REQUEST, "Bad Request");
        }
        let mut target = format!("{}{}", rule.base, tail);
        if !target.starts_with('/') {
            target.insert(0, '/');
        }
        if let Some(query) = parts.uri.query() {
            target.push('?');
            target.push_str(query);
        }
        let uri = match Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(rule.authority.clone())
            .path_and_query(target)
            .build()
        {
            Ok(uri) => uri,
            Err(_) => return plain(StatusCode::BAD_REQUEST, "Bad Request"),
        };
        let host = parts.headers.get(header::HOST).cloned();
        strip_hop_by_hop(&mut parts.headers);
        // The client sets Host from the upstream URI; 100-continue is answered here.
        parts.headers.remove(header::HOST);
        parts.headers.remove(header::EXPECT);
        if let Some(peer) = peer {
            add_forwarded_for(&mut parts.headers, peer);
        }
        parts.headers.insert(
            HeaderName::from_static("x-forwarded-proto"),
            self.proto.clone(),
        );
        match host {
            Some(host) => {
                parts
                    .headers
                    .insert(HeaderName::from_static("x-forwarded-host"), host);
            }
            None => {
                parts.headers.remove("x-forwarded-host");
            }
        }
        parts.uri = uri;
        parts.version = Version::HTTP_11;
        let method = parts.method.clone();
        let upstream = Request::from_parts(parts, body);
        let response =
            match tokio::time::timeout(RESPONSE_TIMEOUT, self.client.request(upstream)).await {
                Ok(Ok(response)) => response,
                Ok(Err(e)) => {
                    warn!("proxy {method} {}: upstream failed: {e}", rule.upstream());
                    return plain(StatusCode::BAD_GATEWAY, "Bad Gateway");
                }
                Err(_) => {
                    warn!("proxy {method} {}: upstream timed out", rule.upstream());
                    return plain(StatusCode::GATEWAY_TIMEOUT, "Gateway Timeout");
                }
            };
        debug!(
            "proxy {method} {} -> {}",
            rule.upstream(),
            response.status()
        );
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let mut reply = warp::reply::stream(IdleBody::new(body, BODY_IDLE_TIMEOUT)).into_response();
        *reply.status_mut() = parts.status;
        *reply.headers_mut() = parts.headers;
        reply
    }
}

fn plain(code: StatusCode, text: &'static str) -> WarpResponse {
    let mut response = warp::reply::with_header(
        format!("{text}\n"),
        header::CONTENT_TYPE,
        "text/plain; charset=utf-8",
    )
    .into_response();
    *response.status_mut() = code;
    response
}

/// Removes the hop-by-hop headers and every header the Connection header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Appends the client's address to X-Forwarded-For, as one list.
fn add_forwarded_for(headers: &mut HeaderMap, peer: SocketAddr) {
    let ip = peer.ip().to_canonical().to_string();
    let prior: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let value = if prior.is_empty() {
        ip
    } else {
        format!("{}, {ip}", prior.join(", "))
    };
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert(HeaderName::from_static("x-forwarded-for"), value);
    }
}

/// The upstream's response body as a stream of chunks, failing if it stalls longer than
/// the idle timeout between two chunks. Trailers are dropped.
struct IdleBody {
    body: Incoming,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl IdleBody {
    fn new(body: Incoming, idle: Duration) -> IdleBody {
        IdleBody {
            body,
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
        }
    }
}

impl Stream for IdleBody {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            match Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let next = tokio::time::Instant::now() + this.idle;
                    this.deadline.as_mut().reset(next);
                    if let Ok(data) = frame.into_data() {
                        return Poll::Ready(Some(Ok(data)));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    return Poll::Ready(Some(Err(std::io::Error::other(e))));
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => {
                    if this.deadline.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Some(Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "upstream body stalled",
                        ))));
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_normalise() {
        let r = ProxyRule::parse("api/keeper=http://127.0.0.1:8080").unwrap();
        assert_eq!(r.prefix(), "/api/keeper");
        assert_eq!(r.upstream(), "http://127.0.0.1:8080");
        let r = ProxyRule::parse("/x/=http://[::1]:9000/base/").unwrap();
        assert_eq!(r.prefix(), "/x");
        assert_eq!(r.upstream(), "http://[::1]:9000/base");
        for bad in [
            "api",
            "=http://127.0.0.1:1",
            "/=http://127.0.0.1:1",
            "api=https://127.0.0.1:1",
            "api=127.0.0.1:1",
            "api=http://127.0.0.1:1/?q=1",
            "../x=http://127.0.0.1:1",
            "a%2f=http://127.0.0.1:1",
            "api=http://user@127.0.0.1:1",
        ] {
            assert!(ProxyRule::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn prefixes_match_whole_segments_and_the_longest_wins() {
        let rules = [
            ProxyRule::parse("api=http://127.0.0.1:1").unwrap(),
            ProxyRule::parse("api/keeper=http://127.0.0.1:2").unwrap(),
        ];
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let proxy = rt.block_on(async { Proxy::new(&rules, false) });
        let port = |p: &str| proxy.route(p).map(|r| r.authority.port_u16().unwrap());
        assert_eq!(port("/api"), Some(1));
        assert_eq!(port("/api/"), Some(1));
        assert_eq!(port("/api/x"), Some(1));
        assert_eq!(port("/api/keeper"), Some(2));
        assert_eq!(port("/api/keeper/v1/x"), Some(2));
        assert_eq!(port("/api/keeperx"), Some(1));
        assert_eq!(port("/apix"), None);
        assert_eq!(port("/"), None);
        assert_eq!(rules[1].tail("/api/keeper/v1"), Some("/v1"));
        assert_eq!(rules[1].tail("/api/keeper"), Some(""));
    }

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::ACCEPT));
    }

    #[test]
    fn forwarded_for_appends_the_peer() {
        let mut h = HeaderMap::new();
        add_forwarded_for(&mut h, "[::ffff:10.0.0.1]:5".parse().unwrap());
        assert_eq!(h["x-forwarded-for"], "10.0.0.1");
        add_forwarded_for(&mut h, "127.0.0.1:5".parse().unwrap());
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
    }
}
