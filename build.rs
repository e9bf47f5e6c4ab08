//! Build script. With the `cuda` feature off (the default) it does nothing: a plain build
//! needs no CUDA toolkit. The CUDA kernels (csrc/*.cu compiled by nvcc into one embedded
//! fatbin) are the CUDA backend issue's work; until they land, `--features cuda` builds the
//! same CPU-only engine and `--device cuda` reports that the backend is not part of the build.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
}
