#!/usr/bin/env bash
# Prepares gpu-bundle/ (git-ignored) for the GPU machine, which has the CUDA 13.0 driver and
# Python but no Rust and no network: the per-kernel and model parity tests and a cuda-built
# server, the default model's config and tokenizer (its weights exceed what can be carried:
# the checks run on deterministic random weights), a Llama-3-8B-shaped config for the decode
# benchmark with its PyTorch peer, and gpu-check.sh to run there (it must finish within 8 minutes):
#   device run: bash gpu-bundle/gpu-check.sh     (carry: gpu-bundle)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
NVCC="$(./scripts/cuda-toolchain.sh | tail -n1)"
export NVCC CARGO_TARGET_DIR="$root/target/cuda"
./scripts/prepare-model.sh >&2
bundle="$root/gpu-bundle"
rm -rf "$bundle" && mkdir -p "$bundle/model"
# the test executables (tests/cuda.rs, tests/kernels.rs), by name
test_bin() {
  cargo test --release -p sglang --features cuda --test "$1" --no-run --message-format=json 2>/dev/null \
    | "$root/.venv/bin/python" -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == sys.argv[1] and m.get("executable"):
        print(m["executable"])' "$1" | tail -n1
}
cargo build --release -p sglang-server --features sglang/cuda
cp "$(test_bin cuda)" "$bundle/cuda-test"
cp "$(test_bin kernels)" "$bundle/kernels-test"
cp "$CARGO_TARGET_DIR/release/sglang-server" "$bundle/"
cp models/SmolLM2-135M-Instruct/{config.json,generation_config.json,tokenizer.json,tokenizer_config.json} "$bundle/model/"
# a Llama-3-8B-shaped model, all 32 layers (random weights), for the decode benchmark and its
# PyTorch peer (scripts/torch_decode_peer.py)
mkdir -p "$bundle/model-8b"
cat > "$bundle/model-8b/config.json" <<'JSON'
{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
 "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
 "num_hidden_layers": 32, "vocab_size": 128256, "max_position_embeddings": 8192,
 "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": false,
 "torch_dtype": "bfloat16", "bos_token_id": 128000, "eos_token_id": 128001}
JSON
cp scripts/gpu-check.sh scripts/torch_decode_peer.py "$bundle/"
strip --strip-debug "$bundle/cuda-test" "$bundle/kernels-test" "$bundle/sglang-server"
du -sh "$bundle"
