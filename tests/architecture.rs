//! The layers of `src/` (docs/ARCHITECTURE.md): every module imports only from layers below
//! its own, and the module graph has no cycle. Reads the `crate::…` paths (and `super::…`
//! paths that leave a top-level module) of every source file, comments and strings aside,
//! and fails naming the file and line of each offending import.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Each top-level module of `src/` and its layer; a module may import only from lower
/// layers (and from itself). Two modules on one layer never import each other.
const LAYERS: &[(&str, u32)] = &[
    ("kernel", 0), // crates/voxconv-kernel, re-exported
    ("proto", 1),
    ("tensor", 1),
    ("error", 2),
    ("wire", 3),
    ("model", 4),
    ("pool", 4),
    ("shm", 5),
    ("obs", 5),
    ("auth", 5),
    ("config", 6),
    ("engine", 7),
    ("service", 8),
    ("server", 9),
    ("client", 9),
    ("cli", 10),
];

/// One import of another top-level module.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Edge {
    file: String,
    line: usize,
    from: String,
    to: String,
}

/// The source without comments, string and char literals (each replaced by spaces, so line
/// numbers stay).
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    let blank = |s: &[u8], out: &mut String| {
        for &c in s {
            out.push(if c == b'\n' { '\n' } else { ' ' });
        }
    };
    while i < b.len() {
        let rest = &b[i..];
        if rest.starts_with(b"//") {
            let end = rest.iter().position(|&c| c == b'\n').unwrap_or(rest.len());
            blank(&rest[..end], &mut out);
            i += end;
        } else if rest.starts_with(b"/*") {
            let (mut depth, mut j) = (0usize, 0usize);
            while j < rest.len() {
                if rest[j..].starts_with(b"/*") {
                    depth += 1;
                    j += 2;
                } else if rest[j..].starts_with(b"*/") {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    j += 1;
                }
            }
            blank(&rest[..j], &mut out);
            i += j;
        } else if rest[0] == b'r' && (rest.get(1) == Some(&b'"') || rest.get(1) == Some(&b'#')) {
            // Raw string r"…" / r#"…"#.
            let hashes = rest[1..].iter().take_while(|&&c| c == b'#').count();
            if rest.get(1 + hashes) != Some(&b'"') {
                out.push('r');
                i += 1;
                continue;
            }
            let close: Vec<u8> = std::iter::once(b'"')
                .chain(std::iter::repeat_n(b'#', hashes))
                .collect();
            let start = 2 + hashes;
            let end = rest[start..]
                .windows(close.len())
                .position(|w| w == close.as_slice())
                .map_or(rest.len(), |p| start + p + close.len());
            blank(&rest[..end], &mut out);
            i += end;
        } else if rest[0] == b'"' {
            let mut j = 1;
            while j < rest.len() && rest[j] != b'"' {
                j += if rest[j] == b'\\' { 2 } else { 1 };
            }
            let end = (j + 1).min(rest.len());
            blank(&rest[..end], &mut out);
            i += end;
        } else if rest[0] == b'\'' {
            // A char literal ('x', '\n', '\u{..}'), not a lifetime ('a).
            let lit = if rest.get(1) == Some(&b'\\') {
                rest[2..].iter().position(|&c| c == b'\'').map(|p| p + 3)
            } else if rest.get(2) == Some(&b'\'') {
                Some(3)
            } else {
                None
            };
            match lit {
                Some(n) => {
                    blank(&rest[..n], &mut out);
                    i += n;
                }
                None => {
                    out.push('\'');
                    i += 1;
                }
            }
        } else {
            let ch = src[i..].chars().next().expect("in bounds");
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

fn ident_at(s: &str) -> Option<&str> {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    (end > 0).then(|| &s[..end])
}

/// The top-level modules a file's code names through `crate::` (or `super::` that climbs
/// out of its module), with line numbers. `depth` is how deep the file sits: 0 for
/// `src/x.rs` and `src/x/mod.rs`, 1 for `src/x/y.rs`, and so on.
fn imports(code: &str, depth: usize) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (n, line) in code.lines().enumerate() {
        let mut rest = line;
        while let Some(at) = rest.find(['c', 's']) {
            let s = &rest[at..];
            let boundary = rest[..at]
                .chars()
                .next_back()
                .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'));
            let mut tail = None;
            if boundary {
                if let Some(t) = s.strip_prefix("crate::") {
                    tail = Some(t);
                } else if s.starts_with("super::") {
                    let mut t = s;
                    let mut ups = 0;
                    while let Some(x) = t.strip_prefix("super::") {
                        t = x;
                        ups += 1;
                    }
                    if ups > depth {
                        tail = Some(t);
                    }
                }
            }
            match tail {
                Some(t) => {
                    let t = t.trim_start();
                    if let Some(group) = t.strip_prefix('{') {
                        // `crate::{a::x, b}`: the first name of each item at depth 1.
                        let mut depth = 0;
                        let mut item_start = true;
                        for (k, c) in group.char_indices() {
                            match c {
                                '{' => depth += 1,
                                '}' if depth == 0 => break,
                                '}' => depth -= 1,
                                ',' if depth == 0 => item_start = true,
                                c if item_start && depth == 0 && !c.is_whitespace() => {
                                    if let Some(id) = ident_at(&group[k..]) {
                                        found.push((n + 1, id.to_string()));
                                    }
                                    item_start = false;
                                }
                                _ => {}
                            }
                        }
                    } else if let Some(id) = ident_at(t) {
                        found.push((n + 1, id.to_string()));
                    }
                    rest = &s[1..];
                }
                None => rest = &s[1..],
            }
        }
    }
    found
}

/// The top-level module of `src/<path>` and how deep the file sits in it.
fn module_of(rel: &str) -> Option<(String, usize)> {
    let parts: Vec<&str> = rel.split('/').collect();
    match parts.as_slice() {
        [f] if *f == "lib.rs" || *f == "main.rs" => None,
        [f] => Some((f.trim_end_matches(".rs").to_string(), 0)),
        [m, rest @ ..] => {
            let depth = if rest.last() == Some(&"mod.rs") {
                rest.len() - 1
            } else {
                rest.len()
            };
            Some((m.to_string(), depth))
        }
        [] => None,
    }
}

fn edges(files: &[(String, String)]) -> Vec<Edge> {
    let mut out = Vec::new();
    for (rel, src) in files {
        let Some((from, depth)) = module_of(rel) else {
            continue;
        };
        for (line, to) in imports(&code_only(src), depth) {
            if to != from && to != "self" && to != "super" {
                out.push(Edge {
                    file: format!("src/{rel}"),
                    line,
                    from: from.clone(),
                    to,
                });
            }
        }
    }
    out
}

/// Every breach of the layer rules, one line each, naming file and line.
fn violations(files: &[(String, String)]) -> Vec<String> {
    let layer: BTreeMap<&str, u32> = LAYERS.iter().copied().collect();
    let mut bad = Vec::new();
    let mut modules = BTreeSet::new();
    for (rel, _) in files {
        if let Some((m, _)) = module_of(rel) {
            modules.insert(m);
        }
    }
    for m in &modules {
        if !layer.contains_key(m.as_str()) {
            bad.push(format!(
                "src/{m}: module {m} has no layer in tests/architecture.rs (add it to LAYERS)"
            ));
        }
    }
    let all = edges(files);
    for e in &all {
        let (Some(&lf), Some(&lt)) = (layer.get(e.from.as_str()), layer.get(e.to.as_str())) else {
            continue;
        };
        if lt >= lf {
            bad.push(format!(
                "{}:{}: {} (layer {lf}) imports {} (layer {lt}); a module imports only from \
                 lower layers",
                e.file, e.line, e.from, e.to
            ));
        }
    }
    // Cycles among modules (impossible while the layer rule holds; checked on its own so a
    // LAYERS table edited into a loop cannot hide one).
    let mut graph: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for e in &all {
        graph.entry(&e.from).or_default().insert(&e.to);
    }
    fn visit<'a>(
        n: &'a str,
        g: &BTreeMap<&'a str, BTreeSet<&'a str>>,
        state: &mut BTreeMap<&'a str, u8>,
        path: &mut Vec<&'a str>,
        cycles: &mut Vec<String>,
    ) {
        match state.get(n) {
            Some(2) => return,
            Some(1) => {
                let at = path.iter().position(|&p| p == n).unwrap_or(0);
                let mut c: Vec<&str> = path[at..].to_vec();
                c.push(n);
                cycles.push(format!("import cycle: {}", c.join(" -> ")));
                return;
            }
            _ => {}
        }
        state.insert(n, 1);
        path.push(n);
        for &m in g.get(n).into_iter().flatten() {
            visit(m, g, state, path, cycles);
        }
        path.pop();
        state.insert(n, 2);
    }
    let mut state = BTreeMap::new();
    for &n in graph.keys() {
        visit(n, &graph, &mut state, &mut Vec::new(), &mut bad);
    }
    bad
}

fn read_tree(dir: &Path, base: &Path, out: &mut Vec<(String, String)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            read_tree(&path, base, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let rel = path
                .strip_prefix(base)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            out.push((rel, std::fs::read_to_string(&path).unwrap()));
        }
    }
}

fn source_files() -> Vec<(String, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    read_tree(&src, &src, &mut files);
    files.sort();
    files
}

#[test]
fn every_import_points_down_and_there_is_no_cycle() {
    let files = source_files();
    assert!(files.len() > 30, "read {} files", files.len());
    let e = edges(&files);
    // The reader sees the real imports (a reader that saw none would pass anything).
    assert!(e.iter().any(|e| e.from == "service" && e.to == "engine"));
    assert!(e.iter().any(|e| e.from == "engine" && e.to == "pool"));
    assert!(e.iter().any(|e| e.from == "client" && e.to == "wire"));
    let bad = violations(&files);
    assert!(bad.is_empty(), "layer rules broken:\n{}", bad.join("\n"));
}

#[test]
fn the_client_never_imports_the_server_side() {
    for e in edges(&source_files()) {
        if e.from == "client" {
            assert!(
                !["server", "service", "engine"].contains(&e.to.as_str()),
                "{}:{}: the client imports {}",
                e.file,
                e.line,
                e.to
            );
        }
    }
}

#[test]
fn a_planted_upward_import_is_caught_with_file_and_line() {
    let files =
        vec![
        (
            "tensor/mod.rs".to_string(),
            "//! Tensors.\n\nuse crate::kernel::Conv3dShape;\nuse crate::service::ServiceError;\n"
                .to_string(),
        ),
        ("service/mod.rs".into(), "use crate::tensor::DType;\n".into()),
    ];
    let bad = violations(&files);
    assert_eq!(bad.len(), 2, "{bad:?}");
    assert!(
        bad[0].starts_with("src/tensor/mod.rs:4: tensor (layer 1) imports service (layer 8)"),
        "{bad:?}"
    );
    // service already imports tensor, so the planted edge also closes a cycle.
    assert_eq!(bad[1], "import cycle: service -> tensor -> service");
}

#[test]
fn grouped_super_and_inline_paths_count_and_comments_and_strings_do_not() {
    let src = r#"
//! Mentions crate::cli in a doc comment.
/* and crate::server in a block comment */
use crate::{kernel::Conv3dShape, server::Thing};
fn f() -> &'static str { let _ = crate::cli::run; "crate::engine in a string" }
fn g() { let _ = super::service::x; let c = 'c'; }
"#;
    let files = vec![("wire/mod.rs".to_string(), src.to_string())];
    let mut got: Vec<(usize, String)> = imports(&code_only(src), 0);
    got.sort();
    assert_eq!(
        got,
        vec![
            (4, "kernel".to_string()),
            (4, "server".into()),
            (5, "cli".into()),
            (6, "service".into())
        ]
    );
    let bad = violations(&files);
    assert_eq!(
        bad.len(),
        3,
        "server, cli and service are above wire: {bad:?}"
    );
    // `super::` inside a module stays inside it.
    assert!(imports("use super::slabs;", 1).is_empty());
    assert_eq!(imports("use super::super::pool::Pool;", 1)[0].1, "pool");
}

#[test]
fn a_cycle_and_an_unlisted_module_are_caught() {
    let files = vec![
        (
            "model/mod.rs".to_string(),
            "use crate::pool::Pool;\n".to_string(),
        ),
        ("pool.rs".into(), "use crate::model::Model;\n".into()),
        ("newthing.rs".into(), "use crate::kernel::X;\n".into()),
    ];
    let bad = violations(&files);
    assert!(
        bad.iter()
            .any(|b| b.starts_with("import cycle: model -> pool -> model")),
        "{bad:?}"
    );
    assert!(
        bad.iter()
            .any(|b| b.contains("module newthing has no layer")),
        "{bad:?}"
    );
    // Same layer, both ways: each import is also a breach.
    assert!(bad
        .iter()
        .any(|b| b.starts_with("src/pool.rs:1: pool (layer 4) imports model")));
}
