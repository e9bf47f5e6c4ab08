#!/usr/bin/env bash
# Installs nvcc (CUDA 13.0, pinned PyPI wheels of scripts/requirements-cuda.txt) into
# ./.venv-cuda (idempotent) and prints how to use it. The last line is the nvcc path:
#   export NVCC="$(scripts/cuda-toolchain.sh | tail -n1)"
#   cargo build --release --features sglang/cuda
# No GPU or driver is needed to build; build.rs also finds .venv-cuda by itself.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv-cuda"
"$root/scripts/venv.sh" "$venv" "$root/scripts/requirements-cuda.txt" > /dev/null
nvcc="$(ls "$venv"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc 2>/dev/null | head -n1)"
if [[ ! -x "$nvcc" ]]; then
  echo "nvcc not found under $venv after installing scripts/requirements-cuda.txt" >&2
  exit 1
fi
"$nvcc" --version | tail -n2 >&2
echo "use it with: export NVCC=$nvcc; cargo build --release --features sglang/cuda" >&2
echo "$nvcc"
