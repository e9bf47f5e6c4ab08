#!/usr/bin/env bash
# Builds the CPU image (default: localhost/sglang-rs:cpu) from this checkout's release binary and
# prepared default model, with deploy/Dockerfile.cpu-prebuilt, using podman (or docker:
# CONTAINER_ENGINE=docker). Works on a machine without a registry: when the Debian base image is
# neither present nor pullable, it is made from Debian's packages with mmdebstrap and imported
# as localhost/debian:bookworm-slim. Builds the binary and prepares the model first if needed.
#   scripts/container-image.sh [TAG]
# Prints the image tag on the last line.
#
# Container limits: engines default to open-file limits (around a million) that a sandboxed or
# hardened host may refuse to grant; every build and run here passes limits no higher than this
# shell's own (CONTAINER_ULIMITS overrides, e.g. "--ulimit nofile=4096:4096").
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tag="${1:-localhost/sglang-rs:cpu}"
engine="${CONTAINER_ENGINE:-$(command -v podman >/dev/null 2>&1 && echo podman || echo docker)}"
base="debian:bookworm-slim"
bin="$root/target/release/sglang-server"
router="$root/target/release/sglang-router"
model="$root/models/SmolLM2-135M-Instruct"

cap() { local v="$1" max="$2"; [[ "$v" == unlimited || "$v" -gt "$max" ]] && v="$max"; echo "$v"; }
nofile="$(cap "$(ulimit -Hn)" 16384)"
nproc="$(cap "$(ulimit -Hu)" 16384)"
read -r -a ulimits <<< "${CONTAINER_ULIMITS:---ulimit nofile=$nofile:$nofile --ulimit nproc=$nproc:$nproc}"

[[ -x "$bin" && -x "$router" ]] || (cd "$root" && cargo build --release -p sglang-server -p sglang-router)
[[ -f "$model/model.safetensors" ]] || "$root/scripts/prepare-model.sh" >&2

# The base image: local, else from the registry, else from Debian's packages.
from="$base"
if ! "$engine" image inspect "$base" >/dev/null 2>&1; then
  if ! "$engine" pull -q "docker.io/library/$base" >&2 2>/dev/null; then
    echo "no registry answers: making $base from Debian's packages (mmdebstrap)" >&2
    command -v mmdebstrap >/dev/null 2>&1 || { echo "error: install mmdebstrap" >&2; exit 1; }
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    mmdebstrap --quiet --variant=minbase bookworm "$tmp/rootfs.tar" >&2
    "$engine" import "$tmp/rootfs.tar" "localhost/$base" >&2
    from="localhost/$base"
  fi
fi

# The build context: only the binaries (debug info stripped) and the model (hard links when the
# file system allows).
ctx="$root/target/container-context"
rm -rf "$ctx"
mkdir -p "$ctx/models"
objcopy --strip-debug "$bin" "$ctx/sglang-server"
objcopy --strip-debug "$router" "$ctx/sglang-router"
cp -al "$model" "$ctx/models/" 2>/dev/null || cp -a "$model" "$ctx/models/"

format=()
[[ "$(basename "$engine")" == podman ]] && format=(--format docker) # keeps HEALTHCHECK
"$engine" build "${format[@]}" "${ulimits[@]}" --build-arg "BASE_IMAGE=$from" \
  -f "$root/deploy/Dockerfile.cpu-prebuilt" -t "$tag" "$ctx" >&2
rm -rf "$ctx"
echo "$tag"
