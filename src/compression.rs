//! Compressed static files: which coding a client gets (from its Accept-Encoding), which
//! files are worth compressing, and an in-memory cache of compressed bodies bounded in
//! bytes.
//!
//! Codings: brotli (`br`, the `brotli` crate), zstd (`zstd`, bindings to the reference
//! libzstd) and gzip (`flate2`). When the client weighs several equally, br is preferred
//! over zstd over gzip. Compression runs on the blocking pool, a few files at a time.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;
use tokio::sync::Semaphore;

/// Bodies smaller than this are sent as they are: the coding's framing would eat the gain.
pub const MIN_COMPRESS: u64 = 512;
/// Bodies larger than this are sent as they are, to bound the CPU one request can cost.
pub const MAX_COMPRESS: u64 = 16 * 1024 * 1024;
/// Bytes charged per cache entry on top of its body and path, for the bookkeeping.
const ENTRY_OVERHEAD: usize = 128;

const BROTLI_QUALITY: i32 = 6;
const BROTLI_WINDOW: i32 = 22;
const ZSTD_LEVEL: i32 = 9;

/// A content coding the server can produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Encoding {
    Brotli,
    Zstd,
    Gzip,
}

impl Encoding {
    /// In order of preference when the client weighs them equally.
    pub const ALL: [Encoding; 3] = [Encoding::Brotli, Encoding::Zstd, Encoding::Gzip];

    /// The token used in Accept-Encoding and Content-Encoding.
    pub fn token(self) -> &'static str {
        match self {
            Encoding::Brotli => "br",
            Encoding::Zstd => "zstd",
            Encoding::Gzip => "gzip",
        }
    }

    /// Compresses `data` whole.
    pub fn compress(self, data: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(data.len() / 3 + 64);
        match self {
            Encoding::Brotli => {
                let params = brotli::enc::BrotliEncoderParams {
                    quality: BROTLI_QUALITY,
                    lgwin: BROTLI_WINDOW,
                    size_hint: data.len(),
                    ..Default::default()
                };
                brotli::BrotliCompress(&mut &data[..], &mut out, &params)?;
            }
            Encoding::Zstd => {
                out = zstd::bulk::compress(data, ZSTD_LEVEL)?;
            }
            Encoding::Gzip => {
                let mut w = flate2::write::GzEncoder::new(&mut out, flate2::Compression::default());
                w.write_all(data)?;
                w.finish()?;
            }
        }
        Ok(out)
    }
}

/// The q-value of one Accept-Encoding element, or `None` when it is malformed.
fn qvalue(params: &str) -> Option<f32> {
    let mut q = 1.0;
    for param in params.split(';') {
        let param = param.trim();
        if param.is_empty() {
            continue;
        }
        let (name, value) = param.split_once('=')?;
        if name.trim().eq_ignore_ascii_case("q") {
            q = value.trim().parse::<f32>().ok()?;
            if !(0.0..=1.0).contains(&q) {
                return None;
            }
        }
    }
    Some(q)
}

/// The coding to use for a client sending `accept` as its Accept-Encoding, or `None` for
/// the file as it is. Codings the client does not list (and no `*` covers) or lists with
/// `q=0` are never chosen; among the rest the highest q wins, ties going br > zstd > gzip;
/// an explicit `identity` weighed higher than every coding wins over them all.
pub fn negotiate(accept: Option<&str>) -> Option<Encoding> {
    let accept = accept?;
    let mut weights: [Option<f32>; 3] = [None; 3];
    let mut star = None;
    let mut identity = None;
    for element in accept.split(',') {
        let (token, params) = element.split_once(';').unwrap_or((element, ""));
        let token = token.trim().to_ascii_lowercase();
        if token.is_empty() {
            continue;
        }
        let Some(q) = qvalue(params) else { continue };
        let slot = match token.as_str() {
            "br" => &mut weights[0],
            "zstd" => &mut weights[1],
            "gzip" | "x-gzip" => &mut weights[2],
            "*" => &mut star,
            "identity" => &mut identity,
            _ => continue,
        };
        // A coding listed twice keeps its first weight.
        slot.get_or_insert(q);
    }
    let mut best: Option<(Encoding, f32)> = None;
    for (encoding, weight) in Encoding::ALL.into_iter().zip(weights) {
        let q = weight.or(star).unwrap_or(0.0);
        if q > 0.0 && best.is_none_or(|(_, b)| q > b) {
            best = Some((encoding, q));
        }
    }
    let (encoding, q) = best?;
    match identity {
        Some(iq) if iq > q => None,
        _ => Some(encoding),
    }
}

/// True for content types that compress well: text, scripts, JSON, XML and SVG, wasm and
/// uncompressed font formats. Images, video, archives and other compressed formats are not.
pub fn compressible(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence.starts_with("text/")
        || ["javascript", "ecmascript", "json", "xml"]
            .iter()
            .any(|kind| essence.contains(kind))
        || matches!(
            essence.as_str(),
            "application/wasm"
                | "font/ttf"
                | "font/otf"
                | "application/x-font-ttf"
                | "application/vnd.ms-fontobject"
                | "image/x-icon"
                | "image/vnd.microsoft.icon"
                | "image/bmp"
        )
}

/// What the cache knows about one file in one coding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cached {
    /// The compressed body.
    Body(Bytes),
    /// Compression did not make the file smaller: send it as it is.
    NotWorthIt,
}

/// The file as it was when it was compressed: an edit changes its mtime or length, so a
/// cached body for an older version is never served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Version {
    pub modified: Option<SystemTime>,
    pub len: u64,
}

struct Entry {
    version: Version,
    value: Cached,
    cost: usize,
    last_used: u64,
}

#[derive(Default)]
struct Lru {
    entries: HashMap<(PathBuf, Encoding), Entry>,
    /// last_used tick → key; the first entry is the least recently used.
    order: BTreeMap<u64, (PathBuf, Encoding)>,
    tick: u64,
    size: usize,
}

impl Lru {
    fn remove(&mut self, key: &(PathBuf, Encoding)) {
        if let Some(entry) = self.entries.remove(key) {
            self.order.remove(&entry.last_used);
            self.size -= entry.cost;
        }
    }

    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }
}

/// Compressed bodies of static files, keyed by canonical path, coding and file version,
/// evicted least recently used first so that their total never exceeds the bound.
pub struct StaticCache {
    capacity: usize,
    lru: Mutex<Lru>,
    /// Bounds how many files are compressed at once.
    workers: Arc<Semaphore>,
}

impl StaticCache {
    /// A cache holding at most `capacity` bytes (0: nothing is cached, files are still
    /// compressed per request).
    pub fn new(capacity: usize) -> StaticCache {
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
        StaticCache {
            capacity,
            lru: Mutex::new(Lru::default()),
            workers: Arc::new(Semaphore::new(workers)),
        }
    }

    /// A cache bounded in MiB, as the --static-cache-mb flag gives it.
    pub fn with_megabytes(mb: usize) -> StaticCache {
        StaticCache::new(mb.saturating_mul(1024 * 1024))
    }

    /// The bound in bytes.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes held now: bodies, paths and per-entry bookkeeping; never above the bound.
    pub fn size(&self) -> usize {
        self.lru.lock().expect("cache lock").size
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.lru.lock().expect("cache lock").entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The cached body of `path` in `encoding` if it was made from this `version` of the
    /// file. An entry for another version is dropped.
    pub fn get(&self, path: &Path, encoding: Encoding, version: Version) -> Option<Cached> {
        let mut lru = self.lru.lock().expect("cache lock");
        let key = (path.to_path_buf(), encoding);
        let fresh = lru.entries.get(&key)?.version == version;
        if !fresh {
            lru.remove(&key);
            return None;
        }
        let tick = lru.next_tick();
        let entry = lru.entries.get_mut(&key).expect("entry present");
        let old = std::mem::replace(&mut entry.last_used, tick);
        let value = entry.value.clone();
        lru.order.remove(&old);
        lru.order.insert(tick, key);
        Some(value)
    }

    /// Stores `value`, evicting the least recently used entries to make room. A value that
    /// could never fit is not stored.
    pub fn insert(&self, path: &Path, encoding: Encoding, version: Version, value: Cached) {
        let body = match &value {
            Cached::Body(b) => b.len(),
            Cached::NotWorthIt => 0,
        };
        let cost = body + path.as_os_str().len() + ENTRY_OVERHEAD;
        let key = (path.to_path_buf(), encoding);
        let mut lru = self.lru.lock().expect("cache lock");
        lru.remove(&key);
        if cost > self.capacity {
            return;
        }
        while lru.size + cost > self.capacity {
            let Some((_, oldest)) = lru.order.pop_first() else {
                break;
            };
            if let Some(entry) = lru.entries.remove(&oldest) {
                lru.size -= entry.cost;
            }
        }
        let tick = lru.next_tick();
        lru.size += cost;
        lru.order.insert(tick, key.clone());
        lru.entries.insert(
            key,
            Entry {
                version,
                value,
                cost,
                last_used: tick,
            },
        );
    }

    /// `body` (the file at `path`, of `version`) in `encoding`, from the cache or freshly
    /// compressed and then cached. `None` when the coded body would not be smaller.
    pub async fn compressed(
        &self,
        path: &Path,
        encoding: Encoding,
        version: Version,
        body: Bytes,
    ) -> Option<Bytes> {
        if let Some(cached) = self.get(path, encoding, version) {
            return match cached {
                Cached::Body(b) => Some(b),
                Cached::NotWorthIt => None,
            };
        }
        let _permit = self.workers.acquire().await.ok()?;
        let input = body.clone();
        let compressed = tokio::task::spawn_blocking(move || encoding.compress(&input))
            .await
            .ok()?
            .ok()?;
        let value = if compressed.len() < body.len() {
            Cached::Body(Bytes::from(compressed))
        } else {
            Cached::NotWorthIt
        };
        self.insert(path, encoding, version, value.clone());
        match value {
            Cached::Body(b) => Some(b),
            Cached::NotWorthIt => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_honours_q_values_and_preference() {
        use Encoding::*;
        let n = |s: &str| negotiate(Some(s));
        assert_eq!(negotiate(None), None);
        assert_eq!(n(""), None);
        assert_eq!(n("gzip, deflate, br, zstd"), Some(Brotli));
        assert_eq!(n("gzip, zstd"), Some(Zstd));
        assert_eq!(n("gzip"), Some(Gzip));
        assert_eq!(n("x-gzip"), Some(Gzip));
        assert_eq!(n("deflate"), None);
        assert_eq!(n("br;q=0.5, gzip;q=0.8"), Some(Gzip));
        assert_eq!(n("br;q=0, gzip"), Some(Gzip));
        assert_eq!(n("BR;Q=0.9 , zstd;q=0.9"), Some(Brotli));
        assert_eq!(n("*"), Some(Brotli));
        assert_eq!(n("*;q=0.5, br;q=0"), Some(Zstd));
        assert_eq!(n("identity"), None);
        assert_eq!(n("gzip;q=0.5, identity"), None);
        assert_eq!(n("gzip, identity;q=0.5"), Some(Gzip));
        assert_eq!(n("br;q=0, zstd;q=0, gzip;q=0"), None);
        assert_eq!(n("gzip;q=2, br;q=abc"), None);
    }

    #[test]
    fn only_compressible_types_are_compressed() {
        for yes in [
            "text/html; charset=utf-8",
            "text/css",
            "application/javascript",
            "text/javascript; charset=utf-8",
            "application/json",
            "image/svg+xml",
            "application/xml",
            "application/wasm",
            "application/manifest+json",
        ] {
            assert!(compressible(yes), "{yes}");
        }
        for no in [
            "image/png",
            "image/jpeg",
            "application/octet-stream",
            "application/zip",
            "font/woff2",
            "video/mp4",
        ] {
            assert!(!compressible(no), "{no}");
        }
    }

    fn version(len: u64) -> Version {
        Version {
            modified: None,
            len,
        }
    }

    #[test]
    fn cache_evicts_least_recently_used_and_never_exceeds_its_bound() {
        let cache = StaticCache::new(3 * (1000 + ENTRY_OVERHEAD + 2));
        let body = |n: u8| Cached::Body(Bytes::from(vec![n; 1000]));
        for (i, p) in ["/a", "/b", "/c"].into_iter().enumerate() {
            cache.insert(Path::new(p), Encoding::Gzip, version(1), body(i as u8));
        }
        assert_eq!(cache.len(), 3);
        // Touch /a so /b is the least recently used.
        assert!(cache
            .get(Path::new("/a"), Encoding::Gzip, version(1))
            .is_some());
        cache.insert(Path::new("/d"), Encoding::Gzip, version(1), body(9));
        assert!(cache.size() <= cache.capacity());
        assert_eq!(cache.len(), 3);
        assert!(cache
            .get(Path::new("/b"), Encoding::Gzip, version(1))
            .is_none());
        assert!(cache
            .get(Path::new("/a"), Encoding::Gzip, version(1))
            .is_some());
        // Too big to ever fit: not stored, nothing else lost.
        cache.insert(
            Path::new("/huge"),
            Encoding::Gzip,
            version(1),
            Cached::Body(Bytes::from(vec![0; 10_000])),
        );
        assert_eq!(cache.len(), 3);
        assert!(cache.size() <= cache.capacity());
    }

    #[test]
    fn another_version_of_a_file_is_a_miss() {
        let cache = StaticCache::new(1 << 20);
        let p = Path::new("/x");
        cache.insert(p, Encoding::Brotli, version(5), Cached::NotWorthIt);
        assert_eq!(
            cache.get(p, Encoding::Brotli, version(5)),
            Some(Cached::NotWorthIt)
        );
        assert_eq!(cache.get(p, Encoding::Zstd, version(5)), None);
        assert_eq!(cache.get(p, Encoding::Brotli, version(6)), None);
        assert!(cache.is_empty());
        assert_eq!(cache.size(), 0);
    }

    #[test]
    fn a_zero_bound_caches_nothing() {
        let cache = StaticCache::new(0);
        cache.insert(
            Path::new("/x"),
            Encoding::Gzip,
            version(1),
            Cached::NotWorthIt,
        );
        assert!(cache.is_empty());
    }
}
