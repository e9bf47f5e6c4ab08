#!/usr/bin/env bash
# The main job on a fresh machine: prepare the default model, build, and serve it over HTTP
# (SGLang's native API and the OpenAI API) on $SGLANG_HOST:$SGLANG_PORT (default
# 127.0.0.1:30000). Extra arguments go to `sglang-server`, e.g. --port 8000 --api-key KEY.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
./scripts/prepare-model.sh >/dev/null
cargo build --release -p sglang-server
exec ./target/release/sglang-server --model-path "${SGLANG_MODEL_PATH:-models/SmolLM2-135M-Instruct}" "$@"
