//! The HTTP side beyond plain files: compression negotiated by Accept-Encoding and its
//! bounded cache, `--proxy` rules forwarding to an upstream, and where `/metrics` answers.

mod common;
use common::*;

use std::io::Read;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::http_client::{Http, Reply};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use mles::config::Config;
use mles::proxy::ProxyRule;
use mles::server::Server;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

/// One request on a fresh connection, bounded by [`WAIT`].
async fn send(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    Http::plain().send(method, addr, path, headers, body).await
}

async fn get(addr: SocketAddr, path: &str, accept_encoding: Option<&str>) -> Reply {
    let mut headers = vec![("host", "localhost")];
    if let Some(ae) = accept_encoding {
        headers.push(("accept-encoding", ae));
    }
    send(addr, Method::GET, path, &headers, b"").await
}

fn decode(encoding: Option<&str>, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match encoding {
        None => out.extend_from_slice(body),
        Some("br") => {
            brotli::Decompressor::new(body, 4096)
                .read_to_end(&mut out)
                .expect("valid brotli");
        }
        Some("zstd") => out = zstd::stream::decode_all(body).expect("valid zstd"),
        Some("gzip") => {
            flate2::read::GzDecoder::new(body)
                .read_to_end(&mut out)
                .expect("valid gzip");
        }
        Some(other) => panic!("unexpected content-encoding {other}"),
    }
    out
}

/// Text that compresses to roughly half: pseudo-random letters, different per `seed`.
fn text(seed: u64, len: usize) -> String {
    let alphabet = b"abcdefghij \n<>/=";
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            alphabet[(x >> 33) as usize % alphabet.len()] as char
        })
        .collect()
}

fn write(path: &Path, data: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
}

#[tokio::test]
async fn static_files_are_compressed_as_accept_encoding_negotiates() {
    let dir = tempfile::tempdir().unwrap();
    let site = dir.path().join("localhost");
    let js = text(1, 20_000);
    write(&site.join("app.js"), js.as_bytes());
    write(&site.join("small.css"), b"p{color:red}");
    let png: Vec<u8> = text(2, 20_000).into_bytes();
    write(&site.join("image.png"), &png);
    let root = dir.path().to_path_buf();
    let server = start_with(move |c| c.wwwroot = root).await;

    for (accept, expected) in [
        (Some("br"), Some("br")),
        (Some("zstd"), Some("zstd")),
        (Some("gzip"), Some("gzip")),
        (Some("gzip, deflate, br, zstd"), Some("br")),
        (Some("gzip, zstd"), Some("zstd")),
        (Some("br;q=0.5, zstd;q=0.9, gzip;q=0.1"), Some("zstd")),
        (Some("br;q=0, gzip"), Some("gzip")),
        (Some("*;q=0.8, br;q=0"), Some("zstd")),
        (Some("identity"), None),
        (Some("gzip;q=0.5, identity"), None),
        (Some("br;q=0, zstd;q=0, gzip;q=0"), None),
        (Some("deflate"), None),
        (None, None),
    ] {
        let reply = get(server.addr, "/app.js", accept).await;
        assert_eq!(reply.status, StatusCode::OK, "{accept:?}");
        let encoding = reply.header("content-encoding");
        assert_eq!(encoding, expected, "{accept:?}");
        assert_eq!(
            reply.header("vary").map(str::to_ascii_lowercase).as_deref(),
            Some("accept-encoding"),
            "{accept:?}"
        );
        assert!(reply.header("content-type").unwrap().contains("javascript"));
        assert_eq!(
            reply.header("content-length"),
            Some(reply.body.len().to_string().as_str())
        );
        if expected.is_some() {
            assert!(
                reply.body.len() < js.len() * 3 / 4,
                "{accept:?}: {} bytes is not compressed",
                reply.body.len()
            );
        }
        assert_eq!(decode(encoding, &reply.body), js.as_bytes(), "{accept:?}");
    }

    // Too small to be worth it: sent as it is.
    let reply = get(server.addr, "/small.css", Some("br, gzip")).await;
    assert_eq!(reply.header("content-encoding"), None);
    assert_eq!(&reply.body[..], b"p{color:red}");

    // Not a compressible type: sent as it is, and no Vary.
    let reply = get(server.addr, "/image.png", Some("br, gzip")).await;
    assert_eq!(reply.header("content-encoding"), None);
    assert_eq!(reply.header("vary"), None);
    assert_eq!(&reply.body[..], &png[..]);

    // HEAD describes the compressed body without sending it.
    let br = get(server.addr, "/app.js", Some("br")).await;
    let head = send(
        server.addr,
        Method::HEAD,
        "/app.js",
        &[("host", "localhost"), ("accept-encoding", "br")],
        b"",
    )
    .await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(head.header("content-encoding"), Some("br"));
    assert_eq!(
        head.header("content-length"),
        Some(br.body.len().to_string().as_str())
    );
    assert!(head.body.is_empty());
}

#[tokio::test]
async fn the_compressed_cache_keeps_within_its_bound_and_serves_edited_files_fresh() {
    const BOUND: usize = 64 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let site = dir.path().join("localhost");
    let files: Vec<(String, String)> = (0..10)
        .map(|i| (format!("/f{i}.txt"), text(100 + i, 20_000)))
        .collect();
    for (name, body) in &files {
        write(&site.join(&name[1..]), body.as_bytes());
    }
    let root = dir.path().to_path_buf();
    let server = start_with(move |c| {
        c.wwwroot = root;
        c.static_cache_bytes = BOUND;
    })
    .await;
    let cache = &server.shared.http.site.cache;
    assert_eq!(cache.capacity(), BOUND);
    assert!(cache.is_empty());

    // Every file in every coding, twice over: far more than the bound holds.
    let mut most = 0;
    for round in 0..2 {
        for (name, body) in &files {
            for encoding in ["br", "zstd", "gzip"] {
                let reply = get(server.addr, name, Some(encoding)).await;
                assert_eq!(reply.header("content-encoding"), Some(encoding));
                assert_eq!(
                    decode(Some(encoding), &reply.body),
                    body.as_bytes(),
                    "round {round} {name} {encoding}"
                );
                let size = cache.size();
                assert!(size <= BOUND, "cache holds {size} bytes, bound {BOUND}");
                most = most.max(size);
            }
        }
    }
    assert!(most > BOUND / 2, "the cache was barely used: {most} bytes");
    assert!(cache.len() < files.len() * 3, "nothing was evicted");

    // A cached file, then edited with a new length: the new text is served.
    let (name, old) = &files[0];
    let path = site.join(&name[1..]);
    assert_eq!(
        decode(Some("br"), &get(server.addr, name, Some("br")).await.body),
        old.as_bytes()
    );
    let new = text(999, 25_000);
    write(&path, new.as_bytes());
    let reply = get(server.addr, name, Some("br")).await;
    assert_eq!(decode(Some("br"), &reply.body), new.as_bytes());

    // Edited again with the same length: the new modification time is enough.
    let same_len = text(1000, 25_000);
    write(&path, same_len.as_bytes());
    let file = std::fs::File::options().write(true).open(&path).unwrap();
    file.set_modified(SystemTime::now() + Duration::from_secs(10))
        .unwrap();
    drop(file);
    for encoding in ["br", "br", "zstd", "gzip"] {
        let reply = get(server.addr, name, Some(encoding)).await;
        assert_eq!(
            decode(Some(encoding), &reply.body),
            same_len.as_bytes(),
            "{encoding}"
        );
    }
    // Uncompressed, too.
    assert_eq!(
        &get(server.addr, name, None).await.body[..],
        same_len.as_bytes()
    );
    assert!(cache.size() <= BOUND);
}

/// What the test upstream saw of one request.
#[derive(Debug)]
struct Seen {
    method: Method,
    uri: String,
    headers: HeaderMap,
    body: Bytes,
}

/// A small HTTP server on loopback that reports every request and answers 201 with
/// `saw <path and query>` (or 1 MiB of data for `/big`).
async fn upstream() -> (SocketAddr, mpsc::UnboundedReceiver<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let tx = tx.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await?.to_bytes();
                        let uri = parts.uri.to_string();
                        let _ = tx.send(Seen {
                            method: parts.method,
                            uri: uri.clone(),
                            headers: parts.headers,
                            body,
                        });
                        let reply = if uri == "/big" {
                            Bytes::from(text(7, 1 << 20))
                        } else {
                            Bytes::from(format!("saw {uri}"))
                        };
                        let response = http::Response::builder()
                            .status(StatusCode::CREATED)
                            .header("x-upstream", "yes")
                            .header("keep-alive", "timeout=5")
                            .body(Full::new(reply))
                            .unwrap();
                        Ok::<_, hyper::Error>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (addr, rx)
}

async fn seen(rx: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("the upstream sees the request in time")
        .expect("upstream running")
}

#[tokio::test]
async fn requests_under_a_proxy_prefix_are_forwarded_to_the_upstream() {
    let (up, mut rx) = upstream().await;
    // Nothing listens there, and the kernel gives it to no other socket meanwhile.
    let dead = free_port();
    let rules = vec![
        ProxyRule::parse(&format!("api/keeper=http://{up}")).unwrap(),
        ProxyRule::parse(&format!("/down/=http://127.0.0.1:{dead}")).unwrap(),
    ];
    let server = start_with(move |c| c.proxies = rules).await;

    let reply = send(
        server.addr,
        Method::POST,
        "/api/keeper/v1/items?x=1&y=%20",
        &[
            ("host", "localhost"),
            ("content-type", "application/json"),
            ("x-forwarded-for", "10.9.9.9"),
            ("x-forwarded-proto", "https"),
            ("connection", "x-hop"),
            ("x-hop", "secret"),
            ("x-end", "kept"),
        ],
        b"{\"hello\":1}",
    )
    .await;
    assert_eq!(reply.status, StatusCode::CREATED);
    assert_eq!(&reply.body[..], b"saw /v1/items?x=1&y=%20");
    assert_eq!(reply.header("x-upstream"), Some("yes"));
    assert_eq!(
        reply.header("keep-alive"),
        None,
        "hop-by-hop header passed back"
    );
    let req = seen(&mut rx).await;
    assert_eq!(req.method, Method::POST);
    assert_eq!(req.uri, "/v1/items?x=1&y=%20");
    assert_eq!(&req.body[..], b"{\"hello\":1}");
    let h = |name: &str| {
        req.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    };
    assert_eq!(h("x-forwarded-for").as_deref(), Some("10.9.9.9, 127.0.0.1"));
    assert_eq!(h("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(h("x-forwarded-host").as_deref(), Some("localhost"));
    assert_eq!(h("content-type").as_deref(), Some("application/json"));
    assert_eq!(h("x-end").as_deref(), Some("kept"));
    assert_eq!(
        h("x-hop"),
        None,
        "a header named in Connection was forwarded"
    );
    assert_eq!(h("host"), Some(up.to_string()));

    // The bare prefix goes to the upstream's root; a GET carries no body.
    let reply = get(server.addr, "/api/keeper", None).await;
    assert_eq!(&reply.body[..], b"saw /");
    let req = seen(&mut rx).await;
    assert_eq!((req.method, req.uri.as_str()), (Method::GET, "/"));
    assert!(req.body.is_empty());

    // A large response is streamed back whole.
    let reply = get(server.addr, "/api/keeper/big", None).await;
    assert_eq!(reply.status, StatusCode::CREATED);
    assert_eq!(&reply.body[..], text(7, 1 << 20).as_bytes());
    seen(&mut rx).await;

    // Prefixes match whole segments; other hosts and dot segments are not forwarded.
    assert_eq!(
        get(server.addr, "/api/keeperx", None).await.status,
        StatusCode::NOT_FOUND
    );
    let other = send(
        server.addr,
        Method::GET,
        "/api/keeper/x",
        &[("host", "evil.test")],
        b"",
    )
    .await;
    assert_eq!(other.status, StatusCode::NOT_FOUND);
    // Raw on purpose: a URL library would resolve the `%2e%2e` before sending.
    assert_eq!(
        common::http_client::raw_get(server.addr, "localhost", "/api/keeper/a/%2e%2e/b")
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(200), rx.recv())
            .await
            .is_err(),
        "the upstream was reached by a request that should not be forwarded"
    );

    // An upstream that is down: 502, promptly.
    let started = std::time::Instant::now();
    let reply = get(server.addr, "/down/anything", None).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert!(started.elapsed() < Duration::from_secs(8));
}

/// A server with `config`, also returning its metrics listener's address.
async fn start_with_metrics(
    config: Config,
) -> (SocketAddr, Option<SocketAddr>, oneshot::Sender<()>) {
    let server = Server::bind(config).await.expect("server binds");
    let addr = server.local_addr();
    let metrics = server.metrics_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    (addr, metrics, stop)
}

#[tokio::test]
async fn metrics_are_served_on_their_own_listener_and_not_on_the_main_one() {
    let mut config = Config::local(static_root());
    config.metrics_bind = Some("127.0.0.1:0".parse().unwrap());
    let (addr, metrics, _stop) = start_with_metrics(config).await;
    let metrics = metrics.expect("a metrics listener");
    assert_ne!(metrics, addr);

    // Some traffic first, so the counters have something to say.
    let mut ws = join(addr, "alice", "metrics-test").await;
    send_text(&mut ws, "hello").await;

    let reply = send(metrics, Method::GET, "/metrics", &[("host", "x")], b"").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply
        .header("content-type")
        .unwrap()
        .starts_with("text/plain"));
    let text = String::from_utf8(reply.body.to_vec()).unwrap();
    assert!(text.contains("mles_connections_accepted_total"), "{text}");
    assert!(text.contains("mles_joins_total"), "{text}");
    let health = send(metrics, Method::GET, "/health", &[("host", "x")], b"").await;
    assert_eq!(
        (health.status, &health.body[..]),
        (StatusCode::OK, &b"OK"[..])
    );
    let other = send(metrics, Method::GET, "/", &[("host", "localhost")], b"").await;
    assert_eq!(other.status, StatusCode::NOT_FOUND);

    // The main listener: no metrics, even for a loopback client; health still there.
    let reply = get(addr, "/metrics", None).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert!(!String::from_utf8_lossy(&reply.body).contains("mles_"));
    assert_eq!(get(addr, "/health", None).await.status, StatusCode::OK);
}

#[tokio::test]
async fn metrics_are_not_on_the_main_listener_unless_asked_for() {
    // Behind a local reverse proxy every client is a loopback client: trusting loopback
    // would make /metrics public there.
    let server = start().await;
    let reply = get(server.addr, "/metrics", None).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert!(!String::from_utf8_lossy(&reply.body).contains("mles_"));
    let peer = "127.0.0.1:40000".parse().unwrap();
    let on_main = server.shared.config.metrics_on_main;
    assert!(!mles::http::metrics_allowed(on_main, Some(peer)));
}

#[tokio::test]
async fn metrics_on_the_main_listener_answer_loopback_clients_only() {
    let server = start_with(|c| c.metrics_on_main = true).await;
    let reply = get(server.addr, "/metrics", None).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(String::from_utf8_lossy(&reply.body).contains("mles_connections_accepted_total"));

    let on_main = server.shared.config.metrics_on_main;
    let allowed = |peer: &str| mles::http::metrics_allowed(on_main, Some(peer.parse().unwrap()));
    assert!(allowed("127.0.0.1:40000"));
    assert!(allowed("127.8.9.10:40000"));
    assert!(allowed("[::1]:40000"));
    assert!(allowed("[::ffff:127.0.0.1]:40000"));
    assert!(!allowed("10.0.0.1:40000"));
    assert!(!allowed("[2001:db8::1]:40000"));
    assert!(!allowed("[::ffff:192.0.2.1]:40000"));
    assert!(!mles::http::metrics_allowed(on_main, None));
}
