#!/usr/bin/env bash
# The `cuda` feature on a machine without a GPU (CI's): nvcc (pinned PyPI wheels) builds the
# kernels, clippy is clean, and the cuda-built server refuses `--device cuda` with the reason
# while `--device auto` serves on the CPU. Builds into target/cuda so the default build stays.
# tests/kernels.rs checks every kernel on the CPU emulator here (and on the GPU where one is
# present); tests/cuda.rs runs its model-parity body on the emulator here (and on the GPU
# where one is).
# The kernels' static figures (ptxas registers, stack, spills; sm_90 occupancy) go into the log.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
NVCC="$(./scripts/cuda-toolchain.sh | tail -n1)"
export NVCC
export CARGO_TARGET_DIR="$root/target/cuda"
python="$(./scripts/venv.sh | tail -n1)"
./scripts/prepare-model.sh >&2
cargo clippy -p sglang -p sglang-server --features sglang/cuda --all-targets --release -- -D warnings
cargo test --release -p sglang --features cuda --test cuda --test kernels
echo "== kernels on sm_90: ptxas's registers, stack, spills; theoretical occupancy"
cargo test --release -p sglang --features cuda --test cuda kernel_resources_on_sm90 -- --nocapture \
    | grep -v "^test \|^running\|^$"
cargo build --release -p sglang-server --features sglang/cuda
SGLANG_SERVER_BIN="$CARGO_TARGET_DIR/release/sglang-server" "$python" -m pytest -q tests/cuda_build
