//! Keeps the code's shape and `docs/architecture.md` in step.
//!
//! The module graph is read from the sources: each top-level module of the
//! library (declared in `src/lib.rs`, as `src/NAME.rs` and/or `src/NAME/`)
//! imports the other top-level modules it names through `crate::NAME`, in
//! `use` statements (groups such as `crate::{a, b::{c, d}}` included) or
//! inline paths. Lines that start with `//` are skipped, so doc links do not
//! count; references inside a module's `#[cfg(test)]` code do count.
//!
//! Three checks: the graph has no cycle; no source file is longer than
//! [`MAX_LINES`]; and the table between the `module-graph` markers in
//! `docs/architecture.md` is the graph. When the table is stale the failure
//! prints the block to paste in its place.
//!
//! Only `std`: this reads files, it does not parse Rust.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// The longest a file under `src/` may be.
const MAX_LINES: usize = 600;

const BEGIN: &str = "<!-- module-graph:begin -->";
const END: &str = "<!-- module-graph:end -->";
const DOC: &str = "docs/architecture.md";

type Graph = BTreeMap<String, BTreeSet<String>>;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.rs` file under `dir`, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The top-level modules `src/lib.rs` declares (`mod x;`, `pub mod x;`,
/// `pub(crate) mod x;`).
fn declared_modules(lib_rs: &str) -> BTreeSet<String> {
    lib_rs
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with("//"))
        .filter_map(|l| {
            let l = if l.starts_with("pub") {
                l.split_once(' ')?.1.trim_start()
            } else {
                l
            };
            let name = l.strip_prefix("mod ")?.strip_suffix(';')?.trim();
            Some(name.to_string())
        })
        .collect()
}

/// The files of module `name`: `src/NAME.rs` and everything under `src/NAME/`.
fn module_files(src: &Path, name: &str) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let file = src.join(format!("{name}.rs"));
    if file.is_file() {
        files.push(file);
    }
    let dir = src.join(name);
    if dir.is_dir() {
        files.extend(rust_files(&dir));
    }
    assert!(
        !files.is_empty(),
        "src/lib.rs declares `mod {name}` but there is no src/{name}.rs or src/{name}/"
    );
    files
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

fn leading_ident(s: &str) -> &str {
    let s = s.trim_start();
    &s[..s.find(|c: char| !is_ident(c)).unwrap_or(s.len())]
}

/// The first path segment of every `crate::` path in `code` (comment
/// lines skipped): `crate::a::b` gives `a`, `crate::{a, b::{c, d}}` gives
/// `a` and `b`. `$crate::` counts; `pub(crate)` and `my_crate::` do not.
fn crate_references(code: &str) -> BTreeSet<String> {
    let text: String = code
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut found = BTreeSet::new();
    let mut at = 0;
    while let Some(i) = text[at..].find("crate::") {
        let start = at + i;
        at = start + "crate::".len();
        if text[..start].chars().next_back().is_some_and(is_ident) {
            continue;
        }
        let rest = text[at..].trim_start();
        match rest.strip_prefix('{') {
            Some(group) => found.extend(group_heads(group)),
            None => {
                found.insert(leading_ident(rest).to_string());
            }
        }
    }
    found.retain(|n| !n.is_empty() && n != "self");
    found
}

/// The first segment of each item of a `{...}` group, given the text just
/// after its `{`. Nested groups are skipped over, whatever their depth.
fn group_heads(group: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let mut depth = 0usize;
    let mut item_start = 0;
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                heads.push(leading_ident(&group[item_start..i]).to_string());
                break;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                heads.push(leading_ident(&group[item_start..i]).to_string());
                item_start = i + 1;
            }
            _ => {}
        }
    }
    heads
}

/// Each top-level module and the other top-level modules it references.
fn module_graph() -> Graph {
    let src = root().join("src");
    let modules = declared_modules(&read(&src.join("lib.rs")));
    modules
        .iter()
        .map(|m| {
            let mut imports = BTreeSet::new();
            for file in module_files(&src, m) {
                imports.extend(crate_references(&read(&file)));
            }
            imports.retain(|i| i != m && modules.contains(i));
            (m.clone(), imports)
        })
        .collect()
}

/// Every cycle a depth-first walk meets, each as `a -> b -> ... -> a`.
fn cycles(graph: &Graph) -> Vec<String> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }
    fn walk<'a>(
        node: &'a str,
        graph: &'a Graph,
        marks: &mut BTreeMap<&'a str, Mark>,
        path: &mut Vec<&'a str>,
        found: &mut Vec<String>,
    ) {
        marks.insert(node, Mark::OnPath);
        path.push(node);
        for next in &graph[node] {
            match marks[next.as_str()] {
                Mark::New => walk(next, graph, marks, path, found),
                Mark::OnPath => {
                    let from = path.iter().position(|p| p == next).unwrap();
                    let mut cycle = path[from..].to_vec();
                    cycle.push(next);
                    found.push(cycle.join(" -> "));
                }
                Mark::Done => {}
            }
        }
        path.pop();
        marks.insert(node, Mark::Done);
    }
    let mut marks: BTreeMap<&str, Mark> = graph.keys().map(|k| (k.as_str(), Mark::New)).collect();
    let mut found = Vec::new();
    for node in graph.keys() {
        if marks[node.as_str()] == Mark::New {
            walk(node, graph, &mut marks, &mut Vec::new(), &mut found);
        }
    }
    found
}

/// The table rows for `graph`: module, then its imports or `-`.
fn rows(graph: &Graph) -> Vec<(String, String)> {
    graph
        .iter()
        .map(|(m, imports)| {
            let list = if imports.is_empty() {
                "-".to_string()
            } else {
                imports.iter().cloned().collect::<Vec<_>>().join(", ")
            };
            (m.clone(), list)
        })
        .collect()
}

/// The whole block, markers included, as it belongs in the doc.
fn render_block(graph: &Graph) -> String {
    let mut out = format!("{BEGIN}\n| module | imports |\n|---|---|\n");
    for (m, list) in rows(graph) {
        out.push_str(&format!("| {m} | {list} |\n"));
    }
    out.push_str(END);
    out
}

/// The rows of the doc's table (header and separator left out), or why
/// there is no table to read.
fn doc_rows(doc: &str) -> Result<Vec<(String, String)>, String> {
    let lines: Vec<&str> = doc.lines().collect();
    let begin = lines.iter().position(|l| l.trim() == BEGIN);
    let end = lines.iter().position(|l| l.trim() == END);
    let (begin, end) = match (begin, end) {
        (Some(b), Some(e)) if b < e => (b, e),
        _ => return Err(format!("no `{BEGIN}` ... `{END}` block")),
    };
    let mut rows = Vec::new();
    let mut header = false;
    for line in &lines[begin + 1..end] {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let cells: Vec<&str> = line
            .strip_prefix('|')
            .and_then(|l| l.strip_suffix('|'))
            .ok_or_else(|| format!("not a table row: {line}"))?
            .split('|')
            .map(str::trim)
            .collect();
        if cells.len() != 2 {
            return Err(format!(
                "a row needs 2 cells, this has {}: {line}",
                cells.len()
            ));
        }
        if cells
            .iter()
            .all(|c| !c.is_empty() && c.chars().all(|ch| "-: ".contains(ch)))
        {
            continue;
        }
        if !header {
            if cells != ["module", "imports"] {
                return Err(format!("the header must be `| module | imports |`: {line}"));
            }
            header = true;
            continue;
        }
        rows.push((cells[0].to_string(), cells[1].to_string()));
    }
    Ok(rows)
}

#[test]
fn module_graph_has_no_cycle() {
    let graph = module_graph();
    let found = cycles(&graph);
    assert!(
        found.is_empty(),
        "the top-level modules import each other in a cycle:\n  {}\n\
         (an edge is any `crate::NAME` in a module's files, test code included)",
        found.join("\n  ")
    );
}

#[test]
fn no_source_file_is_too_long() {
    let root = root();
    let mut problems = Vec::new();
    for path in rust_files(&root.join("src")) {
        let rel = path
            .strip_prefix(&root)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        let n = read(&path).lines().count();
        if n > MAX_LINES {
            problems.push(format!("{rel}: {n} lines (at most {MAX_LINES})"));
        }
    }
    assert!(
        problems.is_empty(),
        "source file lengths (at most {MAX_LINES} lines under src/):\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn architecture_doc_shows_the_module_graph() {
    let graph = module_graph();
    let want = rows(&graph);
    let doc = read(&root().join(DOC));
    let fix = format!(
        "replace the block in {DOC} (markers included) with:\n\n{}\n",
        render_block(&graph)
    );
    let have = match doc_rows(&doc) {
        Ok(rows) => rows,
        Err(why) => panic!("{DOC}: {why}\n{fix}"),
    };
    if have == want {
        return;
    }
    let have_map: BTreeMap<_, _> = have.iter().cloned().collect();
    let want_map: BTreeMap<_, _> = want.iter().cloned().collect();
    let mut diffs = Vec::new();
    for (m, list) in &want_map {
        match have_map.get(m) {
            None => diffs.push(format!("{m}: no row; the code says `{list}`")),
            Some(doc_list) if doc_list != list => diffs.push(format!(
                "{m}: the doc says `{doc_list}`, the code says `{list}`"
            )),
            Some(_) => {}
        }
    }
    for m in have_map.keys().filter(|m| !want_map.contains_key(*m)) {
        diffs.push(format!("{m}: a row, but no such top-level module"));
    }
    if diffs.is_empty() {
        diffs.push("rows out of order or repeated (sort them by module)".to_string());
    }
    panic!(
        "{DOC}: the module graph table is not the code's:\n  {}\n{fix}",
        diffs.join("\n  ")
    );
}

#[test]
fn references_are_read_from_paths_and_groups() {
    let code = "use crate::{a, b::{c, d::{e}}, self};\n\
                // use crate::commented;\n\
                /// [`crate::doc_link`]\n\
                pub(crate) fn f() { crate::g::h(); my_crate::no(); }\n\
                use crate::{\n    i::J,\n    k,\n};\n\
                macro_rules! m { () => { $crate::l::x!() }; }\n";
    let found: Vec<String> = crate_references(code).into_iter().collect();
    assert_eq!(found, ["a", "b", "g", "i", "k", "l"]);
    assert_eq!(
        declared_modules("//! doc\npub mod a;\nmod b;\npub(crate) mod c;\n#[cfg(x)]\nmod d { }\n"),
        ["a", "b", "c"].map(String::from).into_iter().collect()
    );
    let mut g = Graph::new();
    g.insert("a".into(), ["b".to_string()].into());
    g.insert("b".into(), ["c".to_string()].into());
    g.insert("c".into(), ["a".to_string()].into());
    assert_eq!(cycles(&g), ["a -> b -> c -> a"]);
}
