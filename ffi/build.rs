//! Gives libsglang.so a soname carrying the ABI major version (SGLANG_VERSION_MAJOR in
//! include/sglang.h), so an incompatible library is never picked up by an old program.
fn main() {
    let header = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../include/sglang.h");
    println!("cargo:rerun-if-changed={}", header.display());
    let text = std::fs::read_to_string(&header).expect("include/sglang.h");
    let major = text
        .lines()
        .find_map(|l| l.strip_prefix("#define SGLANG_VERSION_MAJOR "))
        .map(|v| v.trim().to_string())
        .expect("SGLANG_VERSION_MAJOR in include/sglang.h");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libsglang.so.{major}");
    }
    println!("cargo:rustc-env=SGLANG_ABI_MAJOR={major}");
}
