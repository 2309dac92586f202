//! The port-80 redirect: plain HTTP requests for a configured domain get a 301 to the same
//! path and query over HTTPS; any other host gets a 404.

mod common;

use std::net::SocketAddr;

use mles::server::{redirect_response, Server};
use tokio::net::TcpStream;

/// Status code and Location header of the answer to GET `path` with `Host: host`.
async fn ask(addr: SocketAddr, host: &str, path: &str) -> (u16, Option<String>) {
    let reply = common::http_client::Http::plain()
        .get_host(addr, host, path)
        .await;
    (
        reply.status.as_u16(),
        reply.header("location").map(str::to_string),
    )
}

#[tokio::test]
async fn configured_hosts_are_sent_to_https_with_path_and_query_and_others_get_404() {
    let mut config = mles::config::Config::local(common::static_root());
    config.domains = vec!["mles.test".into(), "chat.mles.test".into()];
    config.redirect = Some("127.0.0.1:0".parse().unwrap());
    let server = Server::bind(config).await.expect("server binds");
    let https_port = server.local_addr().port();
    let redirect = server.redirect_addr().expect("a redirect listener");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));

    assert_eq!(
        ask(redirect, "mles.test", "/room/a?x=1&y=%20").await,
        (
            301,
            Some(format!("https://mles.test:{https_port}/room/a?x=1&y=%20"))
        )
    );
    // The Host header's port is dropped and its case folded.
    assert_eq!(
        ask(redirect, "Chat.MLES.test:80", "/").await,
        (301, Some(format!("https://chat.mles.test:{https_port}/")))
    );
    assert_eq!(ask(redirect, "evil.example", "/").await, (404, None));
    assert_eq!(ask(redirect, "127.0.0.1", "/").await, (404, None));
    // Raw on purpose: an HTTP client always sends a Host header.
    let no_host = common::http_client::raw_exchange(redirect, b"GET / HTTP/1.0\r\n\r\n").await;
    assert_eq!(no_host.status, 404, "no Host header");
    assert!(!no_host.head.contains("location:"), "{}", no_host.head);

    let _ = stop.send(());
    tokio::time::timeout(common::WAIT, running)
        .await
        .expect("server stops in time")
        .unwrap()
        .unwrap();
    assert!(
        TcpStream::connect(redirect).await.is_err(),
        "the redirect listener closes with the server"
    );
}

#[test]
fn the_location_has_no_port_when_https_is_on_443() {
    let domains = vec!["mles.test".to_string()];
    let request = http::Request::get("/chat?room=1")
        .header("host", "mles.test")
        .body(())
        .unwrap();
    let response = redirect_response(&domains, 443, &request);
    assert_eq!(response.status(), 301);
    assert_eq!(
        response.headers()["location"],
        "https://mles.test/chat?room=1"
    );
}
