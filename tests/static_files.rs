//! Static files: per-domain roots, content types, and nothing outside a domain's folder.

mod common;
use common::*;
use std::path::Path;

struct Site {
    dir: tempfile::TempDir,
}

/// wwwroot/localhost and wwwroot/other.test, plus a secret beside wwwroot and a symlink
/// inside localhost's folder that points at it.
fn site() -> Site {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("www");
    let write = |p: &Path, s: &str| {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, s).unwrap();
    };
    write(&root.join("localhost/index.html"), "<p>home</p>");
    write(&root.join("localhost/app.js"), "let x = 1;");
    write(&root.join("localhost/style.css"), "p{}");
    write(&root.join("localhost/docs/index.html"), "<p>docs</p>");
    write(&root.join("localhost/data.bin"), "\u{1}");
    write(&root.join("other.test/index.html"), "<p>other</p>");
    write(&dir.path().join("secret.txt"), "TOP SECRET");
    write(&root.join("secret-root.txt"), "ROOT SECRET");
    std::os::unix::fs::symlink(
        dir.path().join("secret.txt"),
        root.join("localhost/link.txt"),
    )
    .unwrap();
    std::os::unix::fs::symlink(dir.path(), root.join("localhost/outside")).unwrap();
    Site { dir }
}

async fn server_for(site: &Site) -> TestServer {
    let root = site.dir.path().join("www");
    start_with(move |c| {
        c.wwwroot = root;
        c.domains = vec!["localhost".into(), "other.test".into()];
    })
    .await
}

/// GET `path` with `Host: host`: status, headers (as `name: value` lines, lowercased) and
/// body.
async fn get(server: &TestServer, host: &str, path: &str) -> (u16, String, String) {
    let reply = http_client::Http::plain()
        .get_host(server.addr, host, path)
        .await;
    let head = reply
        .headers
        .iter()
        .map(|(name, value)| format!("{name}: {}\n", value.to_str().unwrap_or("")))
        .collect::<String>()
        .to_ascii_lowercase();
    (reply.status.as_u16(), head, reply.text())
}

#[tokio::test]
async fn each_domain_is_served_from_its_own_folder_with_the_right_content_type() {
    let site = site();
    let server = server_for(&site).await;
    let (status, head, body) = get(&server, "localhost", "/").await;
    assert_eq!((status, body.as_str()), (200, "<p>home</p>"));
    assert!(head.contains("content-type: text/html"), "{head}");
    let (status, _, body) = get(&server, "OTHER.test:8443", "/").await;
    assert_eq!((status, body.as_str()), (200, "<p>other</p>"));
    for (path, mime) in [
        ("/app.js", "javascript"),
        ("/style.css", "text/css"),
        ("/data.bin", "application/octet-stream"),
        ("/docs/", "text/html"),
    ] {
        let (status, head, _) = get(&server, "localhost", path).await;
        assert_eq!(status, 200, "{path}");
        assert!(
            head.contains("content-type: ") && head.contains(mime),
            "{path}: {head}"
        );
    }
    let (status, head, _) = get(&server, "localhost", "/docs").await;
    assert_eq!(status, 301);
    assert!(head.contains("location: /docs/"), "{head}");
    assert_eq!(get(&server, "localhost", "/missing.html").await.0, 404);
}

#[tokio::test]
async fn hosts_that_are_not_configured_get_404_and_nothing_from_any_folder() {
    let site = site();
    let server = server_for(&site).await;
    for host in ["evil.test", "127.0.0.1", "localhost.evil.test", ""] {
        let (status, _, body) = get(&server, host, "/").await;
        assert!(status == 404 || status == 400, "{host}: {status}");
        assert!(
            !body.contains("home") && !body.contains("other"),
            "{host}: {body}"
        );
    }
}

#[tokio::test]
async fn nothing_outside_the_domain_folder_can_be_read() {
    let site = site();
    let server = server_for(&site).await;
    let attempts = [
        "/../secret.txt",
        "/../../secret.txt",
        "/../secret-root.txt",
        "/docs/../../secret-root.txt",
        "/%2e%2e/secret-root.txt",
        "/%2E%2E/%2E%2E/secret.txt",
        "/..%2fsecret-root.txt",
        "/..%2F..%2Fsecret.txt",
        "/..\\secret-root.txt",
        "/..%5csecret-root.txt",
        "/%252e%252e/secret-root.txt",
        "//etc/passwd",
        "/etc/passwd",
        "/link.txt",
        "/outside/secret.txt",
        "/../other.test/index.html",
        "/%2e%2e/other.test/index.html",
    ];
    // Raw requests on purpose: a URL library would resolve `..` and `%2e%2e` (and turn `\\`
    // into `/`) before sending, so the server would never see these paths.
    for path in attempts {
        let http_client::RawReply { status, body, .. } =
            http_client::raw_get(server.addr, "localhost", path).await;
        assert_ne!(status, 200, "{path} was served");
        assert!(
            !body.contains("SECRET") && !body.contains("root:") && !body.contains("other"),
            "{path}: {body}"
        );
    }
    // An absolute-form request target cannot escape either.
    let http_client::RawReply { status, body, .. } = http_client::raw_get(
        server.addr,
        "localhost",
        "http://localhost/../secret-root.txt",
    )
    .await;
    assert_ne!(status, 200);
    assert!(!body.contains("SECRET"));
}

#[tokio::test]
async fn the_shipped_default_site_is_served_for_localhost() {
    let server = start().await;
    let (status, head, body) = get(&server, "localhost", "/").await;
    assert_eq!(status, 200);
    assert!(head.contains("text/html"));
    assert!(
        body.contains("mles-websocket"),
        "default page has no Mles client"
    );
}
