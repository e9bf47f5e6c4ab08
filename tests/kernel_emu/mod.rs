//! Builds `csrc/*.cu` against `cuda_emu.h` with the system C++ compiler into a shared
//! library exporting `sg_emu_launch(name, grid, block, shared, args)` (cuLaunchKernel's
//! argument convention), once per test process. Used by tests/kernels.rs (each kernel alone)
//! and tests/cuda_emulated.rs (the CUDA backend through `SGLANG_CUDA_EMULATOR`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The emulation library's path (built on first use).
pub fn library() -> &'static Path {
    static LIB: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    LIB.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let dir = tempfile::tempdir().unwrap().keep();
        let mut sources: Vec<PathBuf> = std::fs::read_dir(root.join("csrc"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "cu"))
            .collect();
        sources.sort();
        let mut unit = format!(
            "#include \"{}\"\n",
            root.join("tests/kernel_emu/cuda_emu.h").display()
        );
        let mut kernels = Vec::new();
        for s in &sources {
            unit += &format!("#include \"{}\"\n", s.display());
            let text = std::fs::read_to_string(s).unwrap();
            let mut rest = text.as_str();
            while let Some(i) = rest.find("extern \"C\" __global__ void ") {
                rest = &rest[i + 27..];
                if let Some(after) = rest.strip_prefix("__launch_bounds__(") {
                    rest =
                        after[after.find(')').expect("__launch_bounds__(...)") + 1..].trim_start();
                }
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                kernels.push(name);
            }
        }
        assert!(!kernels.is_empty(), "no kernels found in csrc/");
        unit += "extern \"C\" int sg_emu_launch(const char* name, unsigned gx, unsigned gy, \
                 unsigned gz, unsigned bx, size_t smem, void** args) {\n";
        for k in &kernels {
            unit += &format!(
                "  if (!std::strcmp(name, \"{k}\")) return sg_emu::launch({k}, dim3{{gx, gy, gz}}, \
                 dim3{{bx, 1, 1}}, smem, args);\n"
            );
        }
        unit += "  std::fprintf(stderr, \"emulator: no kernel %s\\n\", name);\n  return -2;\n}\n";
        let src = dir.join("emu.cpp");
        std::fs::write(&src, unit).unwrap();
        let lib = dir.join("libsg_emu.so");
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let status = std::process::Command::new(&cxx)
            .args([
                "-std=c++17",
                "-O2",
                "-g",
                "-fPIC",
                "-shared",
                "-Wall",
                "-Wno-unknown-pragmas",
            ])
            .arg("-o")
            .arg(&lib)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| panic!("cannot run the C++ compiler `{cxx}`: {e}"));
        assert!(status.success(), "the emulator build of csrc/*.cu failed");
        lib
    })
}
