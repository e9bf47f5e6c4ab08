//! The engine crate's floors import only the floors below them (src/lib.rs and ARCHITECTURE.md
//! list them). A `crate::` path that points sideways or up fails here, naming the file and line.

use std::path::{Path, PathBuf};

/// Each floor and the floors it may use, bottom to top.
const FLOORS: &[(&str, &[&str])] = &[
    ("quant", &[]),
    // the configuration names a block format (`--quantization`)
    ("config", &["quant"]),
    ("loader", &["quant"]),
    ("tokenizer", &[]),
    ("sampling", &[]),
    ("batch", &[]),
    ("kv", &[]),
    ("sys", &[]),
    ("gpu", &[]),
    ("metrics", &[]),
    ("parallel", &["config"]),
    ("constraint", &["tokenizer"]),
    (
        "backend",
        &["config", "quant", "loader", "sampling", "batch", "parallel"],
    ),
    (
        "model",
        &["config", "loader", "batch", "parallel", "backend"],
    ),
    ("scheduler", &["batch", "kv"]),
    (
        "runner",
        &[
            "config", "loader", "sampling", "batch", "parallel", "backend", "model", "sys",
        ],
    ),
    ("bench", &["sampling", "batch", "kv", "backend", "runner"]),
    (
        "engine",
        &[
            "config",
            "tokenizer",
            "sampling",
            "batch",
            "kv",
            "metrics",
            "constraint",
            "backend",
            "scheduler",
            "runner",
        ],
    ),
];

fn rust_files(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            rust_files(&entry.unwrap().path(), out);
        }
    } else if path.extension().is_some_and(|e| e == "rs") {
        out.push(path.to_path_buf());
    }
}

/// Every `crate::<module>` a line of code names (comments are skipped).
fn crate_paths(line: &str) -> Vec<&str> {
    let code = line.split("//").next().unwrap_or("");
    let mut found = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let after = &rest[at + "crate::".len()..];
        let end = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        found.push(&after[..end]);
        rest = &after[end..];
    }
    found
}

#[test]
fn every_floor_imports_only_floors_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut violations = Vec::new();
    let mut checked = 0;
    for (floor, allowed) in FLOORS {
        let mut files = Vec::new();
        let dir = src.join(floor);
        if dir.is_dir() {
            rust_files(&dir, &mut files);
        } else {
            files.push(src.join(format!("{floor}.rs")));
        }
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            checked += 1;
            for (n, line) in text.lines().enumerate() {
                for module in crate_paths(line) {
                    if module != *floor && !allowed.contains(&module) {
                        violations.push(format!(
                            "{}:{}: `{floor}` uses `crate::{module}`",
                            file.display(),
                            n + 1
                        ));
                    }
                }
            }
        }
    }
    assert!(
        checked > 30,
        "only {checked} files found under {}",
        src.display()
    );
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

#[test]
fn every_module_of_the_crate_has_a_floor() {
    let lib =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).unwrap();
    for line in lib.lines() {
        if let Some(name) = line.strip_prefix("pub mod ") {
            let name = name.trim_end_matches(';');
            assert!(
                FLOORS.iter().any(|(f, _)| *f == name),
                "src/lib.rs declares `{name}`, which has no floor in tests/layers.rs"
            );
        }
    }
}

#[test]
fn the_checker_sees_crate_paths() {
    assert_eq!(
        crate_paths("use crate::runner::{self, ModelRunner}; // crate::nope"),
        vec!["runner"]
    );
    assert_eq!(
        crate_paths("let x = crate::sys::MemInfo::read(); crate::kv::PagePool::new(1, 1)"),
        vec!["sys", "kv"]
    );
}
