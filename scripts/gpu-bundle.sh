#!/usr/bin/env bash
# Prepares gpu-bundle/ (git-ignored) for the GPU machine, which has the CUDA 13.0 driver and
# Python but no Rust and no network: the CUDA parity test and a cuda-built server, the default
# model's config and tokenizer (its weights exceed what can be carried: the check runs on
# deterministic random weights), and gpu-check.sh to run there:
#   device run: bash gpu-bundle/gpu-check.sh     (carry: gpu-bundle)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
NVCC="$(./scripts/cuda-toolchain.sh | tail -n1)"
export NVCC CARGO_TARGET_DIR="$root/target/cuda"
./scripts/prepare-model.sh >&2
bundle="$root/gpu-bundle"
rm -rf "$bundle" && mkdir -p "$bundle/model"
test_bin="$(cargo test --release -p sglang --features cuda --test cuda --no-run --message-format=json 2>/dev/null \
  | "$root/.venv/bin/python" -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "cuda" and m.get("executable"):
        print(m["executable"])' | tail -n1)"
cargo build --release -p sglang-server --features sglang/cuda
cp "$test_bin" "$bundle/cuda-test"
cp "$CARGO_TARGET_DIR/release/sglang-server" "$bundle/"
cp models/SmolLM2-135M-Instruct/{config.json,generation_config.json,tokenizer.json,tokenizer_config.json} "$bundle/model/"
cp scripts/gpu-check.sh "$bundle/"
strip --strip-debug "$bundle/cuda-test" "$bundle/sglang-server"
du -sh "$bundle"
