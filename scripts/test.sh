#!/usr/bin/env bash
# Runs every test: installs the system packages the tests use (Go, libclang, valgrind) if
# missing, prepares the Python venv and the default model if needed, builds the server and
# libsglang, then runs the Rust unit and integration tests (which call the numpy reference in
# scripts/reference.py and build the C, C++ and Go examples of the C ABI), then the HTTP
# tests against the real server binary (pytest, the official OpenAI client) and the
# deployment tests (linters, schemas, live Prometheus and nginx, backup and restore).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
./scripts/system-deps.sh
./scripts/prepare-model.sh >/dev/null
cargo build --release -p sglang-server -p sglang-router -p sglang-ffi
cargo test --release --workspace "$@"
PATH="$PATH:/usr/sbin" .venv/bin/python -m pytest -q tests/server tests/router tests/deploy
