//! The C ABI as its users meet it: the header compiles as C99, C11 and C++17 with warnings as
//! errors; the C, C++ and Go examples build against libsglang.so, run, and print exactly the
//! engine's greedy output; the C example runs under valgrind without leaks from the library.
//!
//! Needs the built library (`cargo build --release -p sglang-ffi`, done by scripts/test.sh),
//! gcc, g++, Go and valgrind (scripts/system-deps.sh installs them).

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A directory holding libsglang.so under both its file name and its soname.
fn lib_dir() -> tempfile::TempDir {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap(); // target/<profile>/deps/..
    let so = profile_dir.join("libsglang.so");
    assert!(
        so.exists(),
        "{} is missing: run `cargo build --release -p sglang-ffi` first",
        so.display()
    );
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(&so, dir.path().join("libsglang.so")).unwrap();
    std::os::unix::fs::symlink(&so, dir.path().join("libsglang.so.1")).unwrap();
    dir
}

fn model() -> PathBuf {
    let m = root().join("models/SmolLM2-135M-Instruct");
    assert!(
        m.join("model.safetensors").exists(),
        "prepare the default model first"
    );
    m
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn header_compiles_as_c99_c11_and_cpp17() {
    let dir = tempfile::tempdir().unwrap();
    let c = dir.path().join("t.c");
    std::fs::write(&c, "#include \"sglang.h\"\nint main(void) { sglang_engine_params p = sglang_engine_default_params(); return (int)p.struct_size == 0; }\n").unwrap();
    let cpp = dir.path().join("t.cpp");
    std::fs::write(&cpp, "#include \"sglang.h\"\nint main() { sglang_request_params p = sglang_request_default_params(); return p.struct_size == 0; }\n").unwrap();
    let inc = root().join("include");
    for std in ["-std=c99", "-std=c11"] {
        run(Command::new("gcc")
            .args([
                std,
                "-Wall",
                "-Wextra",
                "-Werror",
                "-pedantic",
                "-fsyntax-only",
            ])
            .arg("-I")
            .arg(&inc)
            .arg(&c));
    }
    run(Command::new("g++")
        .args([
            "-std=c++17",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-pedantic",
            "-fsyntax-only",
        ])
        .arg("-I")
        .arg(&inc)
        .arg(&cpp));
}

/// TOKENS, the blocking text and the streamed text an example printed.
fn parse(out: &str) -> (Vec<u32>, String, String) {
    let tokens = out
        .lines()
        .find_map(|l| l.strip_prefix("TOKENS"))
        .expect("TOKENS line")
        .split_whitespace()
        .map(|t| t.parse().unwrap())
        .collect();
    let between = |a: &str, b: &str| {
        let start = out.find(a).expect(a) + a.len() + 1;
        let end = out.rfind(b).expect(b) - 1;
        out[start..end].to_string()
    };
    (
        tokens,
        between("TEXT_BEGIN", "TEXT_END"),
        between("STREAM_BEGIN", "STREAM_END"),
    )
}

const PROMPT: &str = "The three primary colors are";
const MAX_NEW: usize = 24;

fn engine_greedy() -> (Vec<u32>, String) {
    let mut cfg = engine::config::EngineConfig::new(model());
    cfg.max_total_tokens = Some(4096);
    let e = engine::engine::EngineHandle::start(cfg).unwrap();
    let out = e
        .generate_text(PROMPT, engine::sampling::SamplingParams::greedy(MAX_NEW))
        .unwrap();
    e.shutdown_and_join();
    (out.token_ids, out.text)
}

#[test]
fn c_cpp_and_go_examples_print_the_engine_output() {
    let (want_tokens, want_text) = engine_greedy();
    let lib = lib_dir();
    let work = tempfile::tempdir().unwrap();
    let inc = root().join("include");
    let ex = root().join("ffi/examples");
    let link = |cmd: &mut Command| {
        cmd.arg("-L")
            .arg(lib.path())
            .arg("-lsglang")
            .arg(format!("-Wl,-rpath,{}", lib.path().display()));
    };

    let c_bin = work.path().join("c_example");
    let mut cc = Command::new("gcc");
    cc.args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic", "-g"])
        .arg("-I")
        .arg(&inc)
        .arg(ex.join("c/main.c"))
        .arg("-o")
        .arg(&c_bin);
    link(&mut cc);
    run(&mut cc);

    let cpp_bin = work.path().join("cpp_example");
    let mut cxx = Command::new("g++");
    cxx.args(["-std=c++17", "-Wall", "-Wextra", "-Werror"])
        .arg("-I")
        .arg(&inc)
        .arg("-I")
        .arg(ex.join("cpp"))
        .arg(ex.join("cpp/main.cpp"))
        .arg("-o")
        .arg(&cpp_bin);
    link(&mut cxx);
    run(&mut cxx);

    let go_bin = work.path().join("go_example");
    run(Command::new("go")
        .current_dir(ex.join("go"))
        .args(["build", "-o"])
        .arg(&go_bin)
        .arg(".")
        .env("CGO_ENABLED", "1")
        .env("CGO_CFLAGS", format!("-I{}", inc.display()))
        .env(
            "CGO_LDFLAGS",
            format!(
                "-L{} -Wl,-rpath,{}",
                lib.path().display(),
                lib.path().display()
            ),
        )
        .env("GOCACHE", work.path().join("gocache"))
        .env("GOPATH", work.path().join("gopath"))
        .env("GOFLAGS", "-mod=mod")
        .env("GOTOOLCHAIN", "local"));

    for bin in [&c_bin, &cpp_bin, &go_bin] {
        let out = run(Command::new(bin)
            .arg(model())
            .arg(PROMPT)
            .arg(MAX_NEW.to_string()));
        let (tokens, text, streamed) = parse(&out);
        assert_eq!(tokens, want_tokens, "{}", bin.display());
        assert_eq!(text, want_text, "{}", bin.display());
        assert_eq!(streamed, want_text, "{}", bin.display());
    }
}

#[test]
fn c_example_has_no_leaks_under_valgrind() {
    let lib = lib_dir();
    let work = tempfile::tempdir().unwrap();
    let bin = work.path().join("c_example");
    compile_c_against(&lib, &root().join("ffi/examples/c/main.c"), &bin, &[]);
    let out = Command::new("valgrind")
        .args([
            "--leak-check=full",
            "--show-leak-kinds=definite,indirect",
            "--errors-for-leak-kinds=definite,indirect",
            "--error-exitcode=99",
        ])
        .arg(&bin)
        .arg(model())
        .arg("Hello")
        .arg("3")
        .output()
        .expect("valgrind (apt-get install valgrind)");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "valgrind reported errors or leaks:\n{log}"
    );
    assert!(
        log.contains("definitely lost: 0 bytes") || log.contains("All heap blocks were freed"),
        "{log}"
    );
    assert!(
        log.contains("indirectly lost: 0 bytes") || log.contains("All heap blocks were freed"),
        "{log}"
    );
}

#[test]
fn abi_edges_hold_from_c() {
    let lib = lib_dir();
    let work = tempfile::tempdir().unwrap();
    let bin = work.path().join("abi_edges");
    let source = root().join("ffi/tests/abi_edges.c");
    compile_c_against(&lib, &source, &bin, &["-D_POSIX_C_SOURCE=200809L"]);
    let out = run(Command::new(&bin).arg(model()));
    assert!(!out.contains("FAILED"), "{out}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("ok: ")).count(),
        16,
        "{out}"
    );
}

/// Compiles one C11 source with warnings as errors, linked to the libsglang.so in `lib`.
fn compile_c_against(lib: &tempfile::TempDir, source: &Path, bin: &Path, extra: &[&str]) {
    run(Command::new("gcc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-g"])
        .args(extra)
        .arg("-I")
        .arg(root().join("include"))
        .arg(source)
        .arg("-o")
        .arg(bin)
        .arg("-L")
        .arg(lib.path())
        .arg("-lsglang")
        .arg(format!("-Wl,-rpath,{}", lib.path().display())));
}

/// Global symbols an object file defines (readelf, which needs no linker plugin).
fn defined_globals(object: &Path) -> Vec<String> {
    let out = run(Command::new("readelf").arg("-sW").arg(object));
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 8 && matches!(f[4], "GLOBAL" | "WEAK") && f[6] != "UND")
                .then(|| f[7].to_string())
        })
        .collect()
}

/// The README's install step and build line: a program linked with `-lsglang` against the
/// installed tree starts (its `libsglang.so.1` exists), and the installed static library
/// exports only `sglang_*`, so a program defining names that oniguruma also defines links.
#[test]
fn installed_library_links_dynamically_and_statically() {
    let work = tempfile::tempdir().unwrap();
    let prefix = work.path().join("prefix");
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    run(Command::new(root().join("scripts/install-libsglang.sh"))
        .arg(&prefix)
        .env("SGLANG_LIB_DIR", profile_dir));
    let (inc, lib) = (prefix.join("include"), prefix.join("lib"));
    assert!(lib.join("libsglang.so.1").exists());

    let bin = work.path().join("c_example");
    run(Command::new("gcc")
        .arg(root().join("ffi/examples/c/main.c"))
        .arg(format!("-I{}", inc.display()))
        .arg(format!("-L{}", lib.display()))
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-lsglang")
        .arg("-o")
        .arg(&bin));
    let (tokens, text, _) = parse(&run(Command::new(&bin).arg(model()).arg("Hi").arg("3")));
    assert_eq!(tokens.len(), 3, "{text}");

    let extract = work.path().join("extract");
    std::fs::create_dir(&extract).unwrap();
    run(Command::new("ar")
        .current_dir(&extract)
        .arg("x")
        .arg(lib.join("libsglang.a")));
    let members: Vec<_> = std::fs::read_dir(&extract)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(members.len(), 1, "{members:?}");
    let globals = defined_globals(&members[0]);
    assert!(globals.contains(&"sglang_generate".to_string()));
    let foreign: Vec<_> = globals
        .iter()
        .filter(|s| !s.starts_with("sglang_"))
        .collect();
    assert!(
        foreign.is_empty(),
        "{} foreign globals: {:?}",
        foreign.len(),
        &foreign[..foreign.len().min(20)]
    );

    let clash = work.path().join("clash.c");
    std::fs::write(
        &clash,
        "#include <stdio.h>\n#include \"sglang.h\"\n\
         int onig_new(void) { return 42; }\nint re_search(void) { return 7; }\n\
         int main(void) { printf(\"%d %d %u\\n\", onig_new(), re_search(), sglang_abi_version()); return 0; }\n",
    )
    .unwrap();
    let static_bin = work.path().join("clash");
    run(Command::new("gcc")
        .arg(&clash)
        .arg(format!("-I{}", inc.display()))
        .arg(lib.join("libsglang.a"))
        .args([
            "-lstdc++",
            "-lgcc_s",
            "-lutil",
            "-lrt",
            "-lpthread",
            "-lm",
            "-ldl",
        ])
        .arg("-o")
        .arg(&static_bin));
    let out = run(&mut Command::new(&static_bin));
    assert!(out.starts_with("42 7 "), "{out}");
}
