//! Build script. With the `cuda` feature off (the default) it does nothing: a plain build
//! needs no CUDA toolkit.
//!
//! With `cuda` on, nvcc compiles every `csrc/*.cu` into one fatbin (SASS for sm_80 and sm_90a,
//! PTX for compute_80 so newer GPUs can JIT it) that the library embeds
//! (`include_bytes!` of `$OUT_DIR/sglang_kernels.fatbin`). nvcc is found at `$NVCC`, then
//! `$CUDA_HOME/bin/nvcc`, then the pinned PyPI toolchain of `scripts/cuda-toolchain.sh`
//! (`.venv-cuda`), then on `PATH`; without one the build fails saying how to get it.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets it"));
    let mut sources: Vec<PathBuf> = std::fs::read_dir(root.join("csrc"))
        .expect("csrc/ exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    println!("cargo:rerun-if-changed=csrc");
    for s in &sources {
        println!("cargo:rerun-if-changed={}", s.display());
    }
    let nvcc = find_nvcc(&root).unwrap_or_else(|| {
        panic!(
            "\n\nthe `cuda` feature needs nvcc (CUDA 13.0) and none was found.\n\
             Install the pinned PyPI toolchain with `scripts/cuda-toolchain.sh` (no GPU needed),\n\
             or set NVCC=/path/to/nvcc or CUDA_HOME.\n\n"
        )
    });
    // one translation unit: every .cu is included by a generated file, so the fatbin holds all
    let unit = out.join("sglang_kernels.cu");
    let body: String = sources
        .iter()
        .map(|s| format!("#include \"{}\"\n", s.display()))
        .collect();
    std::fs::write(&unit, body).expect("write the kernel unit");
    let fatbin = out.join("sglang_kernels.fatbin");
    // -Xptxas -v: registers, stack and spills per kernel and architecture, kept in
    // $OUT_DIR/ptxas-report.txt (scripts/test-cuda-build.sh prints it into the CI log);
    // any warning fails the build.
    let output = Command::new(&nvcc)
        .args([
            "-fatbin",
            "-O3",
            "-std=c++17",
            "-Werror",
            "all-warnings",
            "-Xptxas",
            "-v",
        ])
        .args(["-gencode", "arch=compute_80,code=sm_80"])
        .args(["-gencode", "arch=compute_90a,code=sm_90a"])
        .args(["-gencode", "arch=compute_80,code=compute_80"])
        .arg("-o")
        .arg(&fatbin)
        .arg(&unit)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
    let report = String::from_utf8_lossy(&output.stderr);
    std::fs::write(out.join("ptxas-report.txt"), report.as_bytes()).expect("write the report");
    assert!(
        output.status.success(),
        "nvcc failed on csrc/*.cu ({}):\n{report}",
        output.status
    );
    for line in report.lines() {
        if line.contains("spill") && !line.contains(" 0 bytes spill stores, 0 bytes spill loads") {
            println!("cargo:warning=register spills: {}", line.trim());
        }
    }
}

fn find_nvcc(root: &Path) -> Option<PathBuf> {
    let exists = |p: PathBuf| p.is_file().then_some(p);
    if let Some(p) = std::env::var_os("NVCC") {
        return exists(PathBuf::from(p));
    }
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        if let Some(p) = exists(PathBuf::from(home).join("bin/nvcc")) {
            return Some(p);
        }
    }
    let venv_lib = root.join(".venv-cuda/lib");
    if let Ok(entries) = std::fs::read_dir(&venv_lib) {
        for e in entries.flatten() {
            let p = e.path().join("site-packages/nvidia/cu13/bin/nvcc");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).find_map(|d| exists(d.join("nvcc"))))
}
