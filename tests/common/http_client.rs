//! The one HTTP client of the integration tests, built on `reqwest` (a maintained client)
//! rather than hand-written HTTP/1.1: plain or over TLS with the test's own rustls settings
//! (a test CA, or any certificate of a self-signed server), a Host header of the test's
//! choosing, bodies exactly as the server sent them (no decompression: the compression
//! tests look at the coded bytes), redirects never followed, and every request on a fresh
//! connection (tests count connections). Every request is bounded by [`WAIT`].
//!
//! [`raw_exchange`] is only for requests no client library sends: paths that must reach
//! the server byte for byte (a URL library normalises `/../` and `%2e%2e` away before
//! sending), requests without a Host header, HTTP/1.0.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::WAIT;

/// A response: status, headers and the body as sent.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// A header's value, if present and visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// An HTTP client for requests to test servers on loopback.
pub struct Http {
    client: reqwest::Client,
    scheme: &'static str,
}

/// Settings for [`Http`] beyond the defaults.
#[derive(Default)]
pub struct HttpOptions {
    /// Speak TLS with these settings (None: plain HTTP).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Connect from this local address (another loopback address than 127.0.0.1).
    pub local_address: Option<IpAddr>,
}

impl Http {
    /// Plain HTTP from 127.0.0.1.
    pub fn plain() -> Http {
        Http::with(HttpOptions::default())
    }

    /// HTTPS with `tls` (e.g. `tls_support::trusting(&[ca])`).
    pub fn tls(tls: Arc<rustls::ClientConfig>) -> Http {
        Http::with(HttpOptions {
            tls: Some(tls),
            ..HttpOptions::default()
        })
    }

    pub fn with(options: HttpOptions) -> Http {
        let scheme = if options.tls.is_some() {
            "https"
        } else {
            "http"
        };
        // reqwest is built without a crypto provider of its own, so it always gets rustls
        // settings; for plain HTTP they are never used.
        let tls = match options.tls {
            Some(config) => (*config).clone(),
            None => rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
        };
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(0)
            .no_proxy()
            .connect_timeout(WAIT)
            .timeout(WAIT)
            .local_address(options.local_address)
            .build()
            .expect("HTTP client builds");
        Http { client, scheme }
    }

    /// Sends one request to `addr` for `path` (with its query) on a fresh connection.
    /// `headers` may set Host. An error means no response came (refused, reset, closed).
    pub async fn try_send(
        &self,
        method: Method,
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Reply, reqwest::Error> {
        let url = format!("{}://{addr}{path}", self.scheme);
        let mut request = self.client.request(method, url).body(body.to_vec());
        if !headers
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("connection"))
        {
            request = request.header("connection", "close");
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes().await?;
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    /// Like [`Http::try_send`], panicking when no response comes.
    pub async fn send(
        &self,
        method: Method,
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Reply {
        self.try_send(method.clone(), addr, path, headers, body)
            .await
            .unwrap_or_else(|e| panic!("{method} {path} to {addr}: no response: {e:?}"))
    }

    /// GET `path` with `Host: host`.
    pub async fn get_host(&self, addr: SocketAddr, host: &str, path: &str) -> Reply {
        self.send(Method::GET, addr, path, &[("host", host)], b"")
            .await
    }
}

/// GET `path` over plain HTTP with `Host: localhost`.
pub async fn get(addr: SocketAddr, path: &str) -> Reply {
    Http::plain().get_host(addr, "localhost", path).await
}

/// What came back for a raw request.
#[derive(Debug)]
pub struct RawReply {
    /// The status code, 0 when the answer had no status line (or there was none).
    pub status: u16,
    /// The status line and headers, lowercased.
    pub head: String,
    pub body: String,
}

/// Writes `request` as it is on a fresh connection and reads until the server closes it.
/// Only for requests no client library would send (see the module header); the request
/// should say `Connection: close` (HTTP/1.1) or be HTTP/1.0.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> RawReply {
    let exchange = async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.write_all(request).await?;
        let mut raw = Vec::new();
        tcp.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(WAIT, exchange)
        .await
        .expect("the server answers and closes in time")
        .expect("raw exchange");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    RawReply {
        status,
        head: head.to_ascii_lowercase(),
        body: body.to_string(),
    }
}

/// A raw GET of `path` exactly as written, with `Host: host`.
pub async fn raw_get(addr: SocketAddr, host: &str, path: &str) -> RawReply {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    raw_exchange(addr, request.as_bytes()).await
}
