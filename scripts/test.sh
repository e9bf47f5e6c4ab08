#!/usr/bin/env bash
# Runs every test: prepares the Python venv and the default model if needed, then the Rust
# unit and integration tests (which call the numpy reference in scripts/reference.py), then
# the HTTP tests against the real server binary (pytest, the official OpenAI client).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
./scripts/prepare-model.sh >/dev/null
cargo build --release -p sglang-server
cargo test --release --workspace "$@"
.venv/bin/python -m pytest -q tests/server
