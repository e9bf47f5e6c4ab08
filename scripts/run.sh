#!/usr/bin/env bash
# The main job on a fresh machine: prepare the default model, build, and generate from a prompt
# through the chat template. Extra arguments go to `sglang-server generate`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
./scripts/prepare-model.sh >/dev/null
cargo build --release -p sglang-server
if [[ $# -eq 0 ]]; then
  set -- --chat --prompt "Explain in two sentences why the sky is blue."
fi
exec ./target/release/sglang-server generate --model-path models/SmolLM2-135M-Instruct "$@"
