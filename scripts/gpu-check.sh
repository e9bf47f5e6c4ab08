#!/usr/bin/env bash
# Runs on the GPU machine from a bundle made by scripts/gpu-bundle.sh (no Rust, no network
# there): every kernel against its reference (tests/kernels.rs, GPU only), model parity with
# the CPU backend (tests/cuda.rs: the default model's shape and a Llama-3-8B shape, random
# weights), a short decode benchmark (sglang-server bench), a cuda server answering one
# request; then one summary table: max relative error per kernel, parity, ms per decode step
# and achieved bandwidth. Logs go to $OUT (or /tmp).
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${OUT:-/tmp}"
# cuBLAS 13 from the toolkit, or from the CUDA wheels that come with PyTorch
for d in /usr/local/cuda/lib64 $(python3 -c 'import glob,site;print(" ".join(glob.glob(site.getsitepackages()[0]+"/nvidia/*/lib")))' 2>/dev/null); do
  [[ -d "$d" ]] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
gpu="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n1)"
echo "== $gpu"
echo "== kernels (tests/kernels.rs)"
SGLANG_KERNELS_NO_EMULATOR=1 timeout 300 "$here/kernels-test" --nocapture --test-threads=1 2>&1 | tee "$out/kernels.log"
echo "== model parity (tests/cuda.rs)"
SGLANG_CUDA_TEST_DUMMY="$here/model" timeout 300 "$here/cuda-test" --nocapture --test-threads=1 2>&1 | tee "$out/parity.log"
echo "== decode benchmark"
for m in model model-8b; do
  timeout 240 "$here/sglang-server" bench --model-path "$here/$m" --load-format dummy --device cuda \
    --prompt-lens 512 --batch 1,8 --decode-steps 64 --repeat 2 --json > "$out/bench-$m.json" 2> "$out/bench-$m.log" \
    || { echo "bench $m failed:"; tail -n 20 "$out/bench-$m.log"; }
done
echo "== server"
SGLANG_LOG_LEVEL=info "$here/sglang-server" --model-path "$here/model" --load-format dummy \
  --device cuda --port 30123 > "$out/server.log" 2>&1 &
pid=$!
for _ in $(seq 1 120); do
  curl -sf http://127.0.0.1:30123/health > /dev/null && break
  kill -0 "$pid" 2> /dev/null || break
  sleep 1
done
curl -s http://127.0.0.1:30123/generate -d '{"text": "Hello", "sampling_params": {"max_new_tokens": 8}}' | tee "$out/generate.json"; echo
curl -s http://127.0.0.1:30123/generate -d '{"text": "Hello", "sampling_params": {"max_new_tokens": 8, "temperature": 0.8, "top_p": 0.9, "seed": 1}, "return_logprob": true, "top_logprobs_num": 3}'; echo
curl -s http://127.0.0.1:30123/health; echo
kill "$pid" 2> /dev/null; wait "$pid"
tail -n 20 "$out/server.log"

echo
echo "== summary: $gpu"
python3 - "$out" "$gpu" <<'PY'
import json, re, sys, os
out, gpu = sys.argv[1], sys.argv[2]
worst = {}
for line in open(os.path.join(out, "kernels.log"), errors="replace"):
    f = line.split()
    if len(f) >= 4 and f[0].startswith("sg_") and " gpu " in line:
        m = re.search(r" gpu\s+(\S+)\s+(\S+)", line)
        if m:
            err, tol = float(m.group(1)), float(m.group(2))
            k = f[0]
            worst[k] = max(worst.get(k, (0.0, tol)), (err, tol))
print("| kernel | max rel err (GPU vs reference) | tolerance |\n|---|---:|---:|")
for k, (e, t) in sorted(worst.items()):
    print(f"| {k} | {e:.3e} | {t:.0e} |")
if not worst:
    print("| (no GPU kernel results: see kernels.log) | | |")
for line in open(os.path.join(out, "parity.log"), errors="replace"):
    if line.startswith("PARITY") or line.startswith("test result"):
        print(line.rstrip())
peak = None
for name, bw in (("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100-SXM4-80GB", 2.039e12), ("A100", 1.555e12)):
    if name in gpu:
        peak = bw
        break
print("\n| model (random weights) | batch | ms per decode step | tokens/s | weights read | achieved bandwidth |\n|---|---:|---:|---:|---:|---:|")
for m in ("model", "model-8b"):
    try:
        r = json.load(open(os.path.join(out, f"bench-{m}.json")))
    except Exception as e:
        print(f"| {m} | | bench failed ({e}) | | | |")
        continue
    wb = r["weight_bytes"]
    for b, tps in sorted(r["decode_tokens_per_s"].items(), key=lambda kv: int(kv[0])):
        steps = tps / int(b)
        bw = wb * steps
        ratio = f" ({bw / peak:.2f} of the {peak / 1e12:.2f} TB/s spec)" if peak else ""
        print(f"| {m} | {b} | {1000 / steps:.3f} | {tps:.1f} | {wb / 1e9:.2f} GB | {bw / 1e9:.0f} GB/s{ratio} |")
    for n, tps in r["prompt_tokens_per_s"].items():
        print(f"| {m} | prefill {n} | | {tps:.0f} | | |")
PY
