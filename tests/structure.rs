//! The module structure: no module of `src/` imports another that imports it back,
//! directly or around a circle, so every module can be read (and changed) knowing only
//! the ones below it. Read from the source, as `use crate::…` and `crate::…` paths.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Each top-level module of the library and the modules it names.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut modules: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n != "bin") {
                    stack.push(path);
                }
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let relative = path.strip_prefix(&src).unwrap();
            let top = relative
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_string();
            if top == "lib" || top == "main" {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let named = modules.entry(top.clone()).or_default();
            for (at, _) in text.match_indices("crate::") {
                let rest = &text[at + "crate::".len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                if !name.is_empty() && name != top {
                    named.insert(name);
                }
            }
        }
    }
    modules
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let modules = imports();
    assert!(modules.len() > 10, "the source was not found: {modules:?}");
    for start in modules.keys() {
        // Every module reachable from `start`; `start` must not be among them.
        let mut seen = BTreeSet::new();
        let mut todo: Vec<&String> = modules[start].iter().collect();
        while let Some(next) = todo.pop() {
            if !seen.insert(next.clone()) {
                continue;
            }
            if let Some(more) = modules.get(next) {
                todo.extend(more.iter());
            }
        }
        assert!(
            !seen.contains(start),
            "module {start} imports itself around a circle; imports: {modules:#?}"
        );
    }
}

#[test]
fn config_depends_on_nothing_above_it() {
    let modules = imports();
    let allowed: BTreeSet<&str> = [
        "budget",
        "logging",
        "protocol",
        "proxy",
        "static_files",
        "version",
        "compression",
        "frame",
    ]
    .into();
    for name in &modules["config"] {
        assert!(allowed.contains(name.as_str()), "config imports {name}");
    }
}
