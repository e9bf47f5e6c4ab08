#!/usr/bin/env bash
# Installs the system packages the tests need beyond Rust and Python, when they are missing:
# Go (cgo example of the C ABI), libclang (bindgen checks include/sglang.h), valgrind (leak
# check of the C example), Prometheus with promtool and nginx (deployment tests), podman with
# runc, catatonit and mmdebstrap (the container tests build and run the images; mmdebstrap makes
# the Debian base image where no registry answers). gcc/g++ are
# on every machine of this project. Uses apt-get; as a non-root user it prints what to
# install instead.
set -euo pipefail
need=()
command -v go >/dev/null 2>&1 || need+=(golang-go)
command -v valgrind >/dev/null 2>&1 || need+=(valgrind)
command -v gcc >/dev/null 2>&1 || need+=(gcc)
command -v g++ >/dev/null 2>&1 || need+=(g++)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || need+=(nginx-light)
command -v podman >/dev/null 2>&1 || need+=(podman)
command -v runc >/dev/null 2>&1 || need+=(runc)
command -v catatonit >/dev/null 2>&1 || need+=(catatonit)
command -v mmdebstrap >/dev/null 2>&1 || need+=(mmdebstrap)
if ! ls /usr/lib/llvm-*/lib/libclang.so* /usr/lib/x86_64-linux-gnu/libclang*.so* >/dev/null 2>&1; then
  need+=(libclang-dev)
fi
if [[ ${#need[@]} -eq 0 ]]; then
  exit 0
fi
echo "installing system packages: ${need[*]}" >&2
if [[ $(id -u) -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then
    sudo apt-get update -q && sudo apt-get install -y -q "${need[@]}"
  else
    echo "error: please install ${need[*]} (apt-get install ${need[*]})" >&2
    exit 1
  fi
else
  apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >&2
fi
