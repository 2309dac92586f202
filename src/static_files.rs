//! Static files per domain: `GET /path` with `Host: example.org` reads
//! `<wwwroot>/example.org/path` (the loopback addresses `127.0.0.1` and `[::1]` read
//! `<wwwroot>/localhost/`). Only configured domains are served, and nothing outside the
//! domain's folder can be read: every path segment is decoded and checked, and the
//! resolved file must still lie inside the folder after symlinks are followed.
//!
//! Text-like files are sent compressed when the client accepts it (see
//! [`crate::compression`]), from a cache of compressed bodies. Everything else streams
//! from disk in [`CHUNK`]-sized pieces, so a client that asks for a large file and reads
//! nothing makes the server hold one chunk, not the file; compressing a file first
//! reserves its size from the memory budget, and without the memory the file is sent as
//! it is.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::{header, Response, StatusCode};
use percent_encoding::percent_decode_str;
use tokio::io::AsyncReadExt;
use warp::reply::Response as WarpResponse;
use warp::Reply;

use crate::budget::{Budget, Need};
use crate::compression::{self, StaticCache, Version};

/// Bytes read from disk per piece of a streamed file.
pub const CHUNK: usize = 16 * 1024;

/// What static files are served from: the root, the domains, the cache of compressed
/// bodies and the memory budget compressing is charged to.
pub struct Site {
    pub root: PathBuf,
    pub domains: Vec<String>,
    pub cache: StaticCache,
    pub budget: Arc<Budget>,
}

/// The names a local server answers to when no domains are configured, as [`host_name`]
/// gives them: `https://localhost/`, `https://127.0.0.1/` and `https://[::1]/` all serve
/// the `localhost` folder.
pub const LOOPBACK_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// The folder under wwwroot that serves `host`: its own name, except that the loopback
/// addresses share `localhost`'s (a folder cannot be called `::1` everywhere, and one
/// local site should not need three copies).
pub fn site_folder(host: &str) -> &str {
    if LOOPBACK_NAMES.contains(&host) {
        "localhost"
    } else {
        host
    }
}

/// The lowercased host of a Host header value, without its port.
pub fn host_name(host: &str) -> String {
    let host = host.trim();
    let name = if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(name, _)| name)
    };
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Splits a raw (percent-encoded) request path into safe, decoded segments, or `None`
/// when any segment could step outside the root.
pub fn safe_segments(raw_path: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    for raw in raw_path.split('/') {
        if raw.is_empty() {
            continue;
        }
        let seg = percent_decode_str(raw).decode_utf8().ok()?;
        let hidden = seg.starts_with('.') && seg != ".well-known";
        if hidden || seg.contains(['/', '\\', '\0', ':']) {
            return None;
        }
        out.push(seg.into_owned());
    }
    Some(out)
}

/// Answers a GET or HEAD for a static file, compressed as `accept_encoding` allows.
pub async fn serve(
    site: &Site,
    host: Option<&str>,
    raw_path: &str,
    head: bool,
    accept_encoding: Option<&str>,
) -> WarpResponse {
    let Some(host) = host.map(host_name) else {
        return status(StatusCode::NOT_FOUND);
    };
    if !site.domains.contains(&host) {
        return status(StatusCode::NOT_FOUND);
    }
    let Some(segments) = safe_segments(raw_path) else {
        return status(StatusCode::NOT_FOUND);
    };
    let folder = site.root.join(site_folder(&host));
    match resolve(&folder, &segments).await {
        Resolved::File {
            path,
            len,
            modified,
            index,
        } if !index || raw_path.ends_with('/') => {
            let version = Version { modified, len };
            file_response(&path, version, head, accept_encoding, site).await
        }
        Resolved::File { .. } => {
            // Relative links in an index page need the trailing slash.
            let location = format!("{}/", raw_path.trim_end_matches('/'));
            Response::builder()
                .status(StatusCode::MOVED_PERMANENTLY)
                .header(header::LOCATION, location)
                .body(String::new())
                .expect("valid response")
                .map(Into::into)
        }
        Resolved::NotFound => status(StatusCode::NOT_FOUND),
    }
}

enum Resolved {
    /// `index` when the path named a directory and this is its index.html.
    File {
        path: PathBuf,
        len: u64,
        modified: Option<SystemTime>,
        index: bool,
    },
    NotFound,
}

async fn resolve(site: &Path, segments: &[String]) -> Resolved {
    let Ok(site) = tokio::fs::canonicalize(site).await else {
        return Resolved::NotFound;
    };
    let mut path = site.clone();
    path.extend(segments);
    let Ok(mut real) = tokio::fs::canonicalize(&path).await else {
        return Resolved::NotFound;
    };
    if !real.starts_with(&site) {
        return Resolved::NotFound;
    }
    let Ok(mut meta) = tokio::fs::metadata(&real).await else {
        return Resolved::NotFound;
    };
    let index = meta.is_dir();
    if index {
        let index = real.join("index.html");
        let Ok(index_real) = tokio::fs::canonicalize(&index).await else {
            return Resolved::NotFound;
        };
        if !index_real.starts_with(&site) {
            return Resolved::NotFound;
        }
        real = index_real;
        let Ok(m) = tokio::fs::metadata(&real).await else {
            return Resolved::NotFound;
        };
        meta = m;
    }
    if meta.is_file() {
        Resolved::File {
            path: real,
            len: meta.len(),
            modified: meta.modified().ok(),
            index,
        }
    } else {
        Resolved::NotFound
    }
}

async fn file_response(
    path: &Path,
    version: Version,
    head: bool,
    accept_encoding: Option<&str>,
    site: &Site,
) -> WarpResponse {
    let mime = mime_guess::from_path(path).first_or_octet_stream();
    let content_type = match mime.type_() {
        mime_guess::mime::TEXT => format!("{mime}; charset=utf-8"),
        _ if mime.subtype() == "javascript" => format!("{mime}; charset=utf-8"),
        _ => mime.to_string(),
    };
    let compressible = compression::compressible(&content_type);
    let encoding = if compressible
        && (compression::MIN_COMPRESS..=compression::MAX_COMPRESS).contains(&version.len)
    {
        compression::negotiate(accept_encoding)
    } else {
        None
    };
    // A cached compressed body needs no file read at all.
    let mut coded = encoding.and_then(|e| match site.cache.get(path, e, version) {
        Some(compression::Cached::Body(b)) => Some((e, b)),
        _ => None,
    });
    if coded.is_none() {
        // Compressing reads the whole file: only with the memory for it.
        let reserved = encoding.and_then(|e| {
            Some((
                e,
                site.budget
                    .try_reserve(version.len as usize, Need::Growth)?,
            ))
        });
        if let Some((e, _reservation)) = reserved {
            let body = match tokio::fs::read(path).await {
                Ok(body) => Bytes::from(body),
                Err(_) => return status(StatusCode::NOT_FOUND),
            };
            // Compress only what matches the version the cache is keyed by; a file that
            // changed between stat and read is sent as it is now.
            if body.len() as u64 == version.len {
                if let Some(b) = site.cache.compressed(path, e, version, body).await {
                    coded = Some((e, b));
                }
            }
        }
    }
    let mut response = Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    if compressible {
        response = response.header(header::VARY, "Accept-Encoding");
    }
    if let Some((e, body)) = coded {
        let len = body.len();
        let body = if head { Bytes::new() } else { body };
        return response
            .header(header::CONTENT_ENCODING, e.token())
            .header(header::CONTENT_LENGTH, len)
            .body(body)
            .expect("valid response")
            .map(Into::into);
    }
    let response = response.header(header::CONTENT_LENGTH, version.len);
    if head {
        return response
            .body(Bytes::new())
            .expect("valid response")
            .map(Into::into);
    }
    let file = match tokio::fs::File::open(path).await {
        Ok(file) => file,
        Err(_) => return status(StatusCode::NOT_FOUND),
    };
    let (parts, ()) = response.body(()).expect("valid response").into_parts();
    let mut streamed = warp::reply::stream(chunks(file, version.len)).into_response();
    *streamed.headers_mut() = parts.headers;
    streamed
}

/// The first `len` bytes of `file` in pieces of at most [`CHUNK`], read as the client
/// takes them.
fn chunks(
    file: tokio::fs::File,
    len: u64,
) -> impl futures::Stream<Item = std::io::Result<Bytes>> + Send + Sync + 'static {
    futures::stream::unfold((file, len), |(mut file, left)| async move {
        if left == 0 {
            return None;
        }
        let mut buf = vec![0u8; CHUNK.min(left as usize)];
        match file.read(&mut buf).await {
            // The file got shorter since it was measured: end here.
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Bytes::from(buf)), (file, left - n as u64)))
            }
            Err(e) => Some((Err(e), (file, 0))),
        }
    })
}

pub fn status(code: StatusCode) -> WarpResponse {
    let text = code.canonical_reason().unwrap_or("").to_string();
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(text)
        .expect("valid response")
        .map(Into::into)
}

#[cfg(test)]
mod properties;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_lose_port_and_case() {
        assert_eq!(host_name("Example.ORG:8443"), "example.org");
        assert_eq!(host_name("localhost"), "localhost");
        assert_eq!(host_name("[::1]:443"), "::1");
        assert_eq!(host_name("example.org."), "example.org");
    }

    #[test]
    fn loopback_addresses_share_the_localhost_folder() {
        assert_eq!(site_folder(&host_name("127.0.0.1:8443")), "localhost");
        assert_eq!(site_folder(&host_name("[::1]:8443")), "localhost");
        assert_eq!(site_folder(&host_name("LOCALHOST")), "localhost");
        assert_eq!(site_folder(&host_name("example.org")), "example.org");
        assert_eq!(site_folder(&host_name("127.0.0.2")), "127.0.0.2");
    }

    #[test]
    fn traversal_segments_are_refused() {
        for bad in [
            "/../etc/passwd",
            "/a/%2e%2e/b",
            "/%2E%2E/x",
            "/a%2f..%2fb",
            "/a%5c..%5cb",
            "/..\\x",
            "/x%00.html",
            "/.git/config",
            "/c:/windows",
            "/%ff",
        ] {
            assert_eq!(safe_segments(bad), None, "{bad}");
        }
        assert_eq!(
            safe_segments("/a//b/c.html").unwrap(),
            vec!["a", "b", "c.html"]
        );
        assert_eq!(
            safe_segments("/hello%20world.txt").unwrap(),
            vec!["hello world.txt"]
        );
    }
}
