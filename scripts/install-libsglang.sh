#!/usr/bin/env bash
# Installs the C ABI under PREFIX (default /usr/local) the way a C program expects to find it:
#   PREFIX/include/sglang.h
#   PREFIX/lib/libsglang.so.MAJOR.MINOR.PATCH, with the links libsglang.so.MAJOR (the soname a
#     program records) and libsglang.so (what -lsglang finds)
#   PREFIX/lib/libsglang.a, one relocatable object whose only global symbols are sglang_*: the
#     Rust standard library, oniguruma (whose GNU-regex names clash with glibc's) and every
#     other dependency inside are made local, so nothing collides with the program's own
#   PREFIX/lib/pkgconfig/sglang.pc (`pkg-config --libs [--static] sglang`)
# It installs what `cargo build --release -p sglang-ffi` built (or $SGLANG_LIB_DIR); it does
# not build, so that a test running under cargo can call it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
prefix="${1:-/usr/local}"
src="${SGLANG_LIB_DIR:-$root/target/release}"
for f in libsglang.so libsglang.a; do
    [[ -f "$src/$f" ]] || { echo "$src/$f is missing: run 'cargo build --release -p sglang-ffi' first" >&2; exit 1; }
done
header="$root/include/sglang.h"
version() { sed -n "s/^#define SGLANG_VERSION_$1 \([0-9]*\)$/\1/p" "$header"; }
major="$(version MAJOR)" minor="$(version MINOR)" patch="$(version PATCH)"
full="$major.$minor.$patch"

mkdir -p "$prefix/include" "$prefix/lib/pkgconfig"
install -m 644 "$header" "$prefix/include/sglang.h"
install -m 755 "$src/libsglang.so" "$prefix/lib/libsglang.so.$full"
ln -sf "libsglang.so.$full" "$prefix/lib/libsglang.so.$major"
ln -sf "libsglang.so.$major" "$prefix/lib/libsglang.so"

# The static library: link every member into one object (ld -r), keep sglang_* global, make
# the rest local. gcc-ar names gcc's own LTO plugin: plain ar may load an LLVM plugin from
# bfd-plugins that cannot read Rust's objects.
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
ld -r --whole-archive "$src/libsglang.a" -o "$work/all.o"
objcopy --wildcard --keep-global-symbol='sglang_*' "$work/all.o" "$work/sglang.o"
ar=ar
command -v gcc-ar >/dev/null && ar=gcc-ar
rm -f "$work/libsglang.a"
"$ar" rcs "$work/libsglang.a" "$work/sglang.o"
install -m 644 "$work/libsglang.a" "$prefix/lib/libsglang.a"

# What the static library needs from the system (rustc's native-static-libs for this target,
# and the C++ runtime for the tokenizer's suffix-array code).
cat >"$prefix/lib/pkgconfig/sglang.pc" <<EOF
prefix=$prefix
libdir=\${prefix}/lib
includedir=\${prefix}/include

Name: sglang
Description: the C ABI of the sglang inference engine
Version: $full
Cflags: -I\${includedir}
Libs: -L\${libdir} -lsglang
Libs.private: -lstdc++ -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc
EOF
echo "installed sglang $full under $prefix"
