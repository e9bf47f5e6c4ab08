#!/usr/bin/env bash
# Runs on the GPU machine from a bundle made by scripts/gpu-bundle.sh: CUDA parity with the
# CPU backend (tests/cuda.rs on random weights of the default model's shape), then a cuda
# server start, one generation, and its /health GPU check.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# cuBLAS 13 from the toolkit, or from the CUDA wheels that come with PyTorch
for d in /usr/local/cuda/lib64 $(python3 -c 'import glob,site;print(" ".join(glob.glob(site.getsitepackages()[0]+"/nvidia/*/lib")))' 2>/dev/null); do
  [[ -d "$d" ]] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
echo "== parity (tests/cuda.rs)"
SGLANG_CUDA_TEST_DUMMY="$here/model" "$here/cuda-test" --nocapture --test-threads=1
echo "== server"
SGLANG_LOG_LEVEL=info "$here/sglang-server" --model-path "$here/model" --load-format dummy \
  --device cuda --port 30123 > "${OUT:-/tmp}/server.log" 2>&1 &
pid=$!
for _ in $(seq 1 120); do
  curl -sf http://127.0.0.1:30123/health > /dev/null && break
  kill -0 "$pid" 2> /dev/null || break
  sleep 1
done
curl -s http://127.0.0.1:30123/generate -d '{"text": "Hello", "sampling_params": {"max_new_tokens": 8}}'; echo
curl -s http://127.0.0.1:30123/health; echo
kill "$pid" 2> /dev/null; wait "$pid"
tail -n 20 "${OUT:-/tmp}/server.log"
