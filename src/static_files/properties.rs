//! Property tests (proptest) of the static path resolver, which reads request paths from
//! anyone: `safe_segments` never lets a dangerous segment through (and keeps plain ones),
//! and resolving random paths under a real site on disk, with symlinks out of it, into it
//! and in a loop, never yields a file outside the site.

use std::path::Path;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use super::*;

/// Pieces of request paths, many of them traversal attempts in their various spellings.
const PIECES: &[&str] = &[
    "",
    ".",
    "..",
    "...",
    "%2e%2e",
    "%2E%2e",
    ".%2e",
    "%2e.",
    "%2e",
    "..%2f..",
    "%2f",
    "%2F",
    "%5c",
    "\\",
    "..\\..",
    "%00",
    "%3a",
    "c:",
    "%252e%252e",
    "%",
    "%zz",
    "%ff",
    ".well-known",
    ".hidden",
    "%2ehidden",
    "a.txt",
    "sub",
    "b.txt",
    "index.html",
    "link-out",
    "dir-out",
    "inner.txt",
    "link-in",
    "up",
    "loop",
    "secret.txt",
    "www",
    "localhost",
    "other.test",
    "secret-other.txt",
    "etc",
    "passwd",
    "é",
    "%c3%a9",
];

/// A raw request path: pieces joined by `/`, or random text.
fn raw_path() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => (any::<bool>(), prop::collection::vec(prop::sample::select(PIECES), 0..8)).prop_map(
            |(absolute, pieces)| {
                let path = pieces.join("/");
                if absolute { format!("/{path}") } else { path }
            }
        ),
        1 => any::<String>(),
        1 => "[/.%2eEfF5cC0a\\\\:]{0,24}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// No segment that could leave the folder or name a hidden file gets through.
    #[test]
    fn accepted_segments_are_never_dangerous(raw in raw_path()) {
        if let Some(segments) = safe_segments(&raw) {
            for seg in &segments {
                prop_assert!(!seg.is_empty(), "{raw:?}: empty segment");
                prop_assert!(seg != "." && seg != "..", "{raw:?}: {seg:?}");
                prop_assert!(!seg.starts_with('.') || seg == ".well-known", "{raw:?}: {seg:?}");
                prop_assert!(!seg.contains(['/', '\\', '\0', ':']), "{raw:?}: {seg:?}");
            }
        }
    }

    /// Plain names are kept as they are, in order (the resolver does not refuse everything).
    #[test]
    fn plain_paths_are_kept(names in prop::collection::vec("[A-Za-z0-9_-][A-Za-z0-9_.-]{0,12}", 0..6)) {
        let raw = format!("/{}", names.join("/"));
        prop_assert_eq!(safe_segments(&raw), Some(names));
    }
}

/// A site for `localhost` inside `www/`, with secrets beside it and links leading out:
///
/// ```text
/// secret.txt                     SECRET
/// outside/inner.txt              SECRET
/// www/other.test/secret-other.txt  SECRET (another domain's folder)
/// www/localhost/
///   index.html a.txt .hidden sub/index.html sub/b.txt
///   link-out -> ../../secret.txt    dir-out -> ../../outside
///   link-in -> a.txt                sub/up -> ..        loop -> loop
/// ```
fn site() -> tempfile::TempDir {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let write = |p: &Path, s: &str| {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, s).unwrap();
    };
    write(&root.join("secret.txt"), "SECRET");
    write(&root.join("outside/inner.txt"), "SECRET");
    write(&root.join("www/other.test/secret-other.txt"), "SECRET");
    let site = root.join("www/localhost");
    write(&site.join("index.html"), "home");
    write(&site.join("a.txt"), "a");
    write(&site.join(".hidden"), "hidden");
    write(&site.join("sub/index.html"), "sub home");
    write(&site.join("sub/b.txt"), "b");
    symlink("../../secret.txt", site.join("link-out")).unwrap();
    symlink("../../outside", site.join("dir-out")).unwrap();
    symlink("a.txt", site.join("link-in")).unwrap();
    symlink("..", site.join("sub/up")).unwrap();
    symlink("loop", site.join("loop")).unwrap();
    dir
}

/// The file `segments` resolve to under `site`, if any.
fn resolved(rt: &tokio::runtime::Runtime, site: &Path, segments: &[String]) -> Option<PathBuf> {
    match rt.block_on(resolve(site, segments)) {
        Resolved::File { path, .. } => Some(path),
        Resolved::NotFound => None,
    }
}

/// Panics unless `file` lies inside `site` (after symlinks) and is not a secret.
fn inside(site: &Path, file: &Path, what: &str) -> Result<(), TestCaseError> {
    let site = std::fs::canonicalize(site).unwrap();
    let real = std::fs::canonicalize(file).unwrap();
    prop_assert!(
        real.starts_with(&site),
        "{what}: {} is outside",
        real.display()
    );
    let text = std::fs::read_to_string(&real).unwrap();
    prop_assert!(
        !text.contains("SECRET"),
        "{what}: served {}",
        real.display()
    );
    Ok(())
}

#[test]
fn resolving_random_paths_never_leaves_the_site() {
    let dir = site();
    let site = dir.path().join("www/localhost");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // The site works, so the properties below are not met by refusing everything.
    let seg = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    for (path, expect) in [
        (seg(&["a.txt"]), "a"),
        (seg(&["link-in"]), "a"),
        (seg(&["sub", "b.txt"]), "b"),
        (seg(&["sub", "up", "a.txt"]), "a"),
        (seg(&[]), "home"),
        (seg(&["sub"]), "sub home"),
    ] {
        let file = resolved(&rt, &site, &path).unwrap_or_else(|| panic!("{path:?} not found"));
        assert_eq!(std::fs::read_to_string(file).unwrap(), expect, "{path:?}");
    }
    for out in [&["link-out"][..], &["dir-out", "inner.txt"], &["loop"]] {
        assert_eq!(resolved(&rt, &site, &seg(out)), None, "{out:?}");
    }

    let mut runner = TestRunner::new(Config::with_cases(2048));
    // What a request does: the raw path through safe_segments, then resolve.
    runner
        .run(&raw_path(), |raw| {
            if let Some(segments) = safe_segments(&raw) {
                if let Some(file) = resolved(&rt, &site, &segments) {
                    inside(&site, &file, &raw)?;
                }
            }
            Ok(())
        })
        .unwrap();
    // And resolve on its own, given segments safe_segments would have refused (`..`,
    // hidden names, absolute paths): it still never yields a file outside the site.
    let unchecked = prop::collection::vec(
        prop_oneof![
            prop::sample::select(PIECES).prop_map(str::to_string),
            Just("/etc".to_string()),
            Just("../..".to_string()),
            Just("../other.test".to_string()),
        ],
        0..8,
    );
    runner
        .run(&unchecked, |segments| {
            if let Some(file) = resolved(&rt, &site, &segments) {
                inside(&site, &file, &format!("{segments:?}"))?;
            }
            Ok(())
        })
        .unwrap();
}
