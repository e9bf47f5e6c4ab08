#!/usr/bin/env bash
# Runs on the GPU machine from a bundle made by scripts/gpu-bundle.sh (no Rust, no network
# there): every kernel against its reference and timed at issue 14's anchor shapes
# (tests/kernels.rs, GPU only), model parity with the CPU backend (tests/cuda.rs: the default
# model's shape and a Llama-3-8B shape, random weights), a decode benchmark (sglang-server
# bench: the default model's shape, and Llama-3-8B's with all 32 layers at batch 1, 8 and 64,
# with CUDA graphs and without) beside its PyTorch peer (torch_decode_peer.py: the same shapes,
# a static KV cache, the step captured in a CUDA graph), a cuda server answering one request;
# the card's copy bandwidth measured with torch in the same run; compute-sanitizer (memcheck,
# racecheck, synccheck) on the kernel tests where the machine has it; then one summary table:
# error per kernel, parity, ms per decode step against the weight-read floor and the peer,
# achieved bandwidth as a fraction of the measured copy bandwidth. Every phase has its own timeout and prints its
# time as it ends (the whole run fits in 8 minutes). Logs go to $OUT (or /tmp).
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${OUT:-/tmp}"
# cuBLAS 13 from the toolkit, or from the CUDA wheels that come with PyTorch
for d in /usr/local/cuda/lib64 $(python3 -c 'import glob,site;print(" ".join(glob.glob(site.getsitepackages()[0]+"/nvidia/*/lib")))' 2>/dev/null); do
  [[ -d "$d" ]] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
t0=$SECONDS
phase() { echo "== $* (at $((SECONDS - t0)) s)"; }
gpu="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n1)"
phase "$gpu"
ld_path="${LD_LIBRARY_PATH:-}"
cublas="$(for d in ${ld_path//:/ }; do ls "$d"/libcublas.so.13* 2>/dev/null; done | head -n1)"
echo "libcublas: ${cublas:-not found in LD_LIBRARY_PATH (ldconfig: $(ldconfig -p 2>/dev/null | grep -m1 -o 'libcublas.so.13[^ ]*'))}"
phase "copy bandwidth (torch, device to device, 1 GiB)"
timeout 30 python3 - > "$out/copy-bw.txt" 2> "$out/copy-bw.log" <<'PY'
import torch
n = 1 << 30
a = torch.empty(n, dtype=torch.uint8, device="cuda")
b = torch.empty_like(a)
for _ in range(3):
    b.copy_(a)
torch.cuda.synchronize()
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
start.record()
for _ in range(20):
    b.copy_(a)
end.record()
torch.cuda.synchronize()
s = start.elapsed_time(end) / 1e3 / 20
print(2 * n / s)  # bytes read + written per second
PY
if [[ -s "$out/copy-bw.txt" ]]; then
  python3 -c 'import sys; print(f"{float(sys.argv[1]) / 1e12:.3f} TB/s (read + write)")' "$(cat "$out/copy-bw.txt")"
else
  echo "not measured:"; tail -n 3 "$out/copy-bw.log"
fi
phase "kernels (tests/kernels.rs)"
# (with the timings at issue 14's anchor shapes, as fractions of the copy bandwidth above)
SGLANG_COPY_BW="$(cat "$out/copy-bw.txt" 2> /dev/null)" SGLANG_KERNELS_NO_EMULATOR=1 timeout 90 \
  "$here/kernels-test" --nocapture --test-threads=1 2>&1 | tee "$out/kernels.log"
# a first run: synchronise after every launch, so that a faulting kernel is named
phase "model parity (tests/cuda.rs, SGLANG_CUDA_SYNC_LAUNCHES=1)"
SGLANG_KERNELS_NO_EMULATOR=1 SGLANG_CUDA_SYNC_LAUNCHES=1 SGLANG_CUDA_TEST_DUMMY="$here/model" timeout 90 "$here/cuda-test" --nocapture --test-threads=1 2>&1 | tee "$out/parity.log"
if command -v compute-sanitizer > /dev/null; then
  for tool in memcheck racecheck synccheck; do
    phase "compute-sanitizer --tool $tool (tests/kernels.rs)"
    SGLANG_KERNELS_NO_EMULATOR=1 timeout 20 compute-sanitizer --tool "$tool" --error-exitcode 9 \
      "$here/kernels-test" --test-threads=1 --skip kernel_timings > "$out/sanitizer-$tool.log" 2>&1
    echo "exit $? (0 clean, 9 errors, 124 timed out)"; grep -m5 "ERROR SUMMARY\|=========  [A-Z]" "$out/sanitizer-$tool.log"
  done
else
  phase "compute-sanitizer: not on this machine"
fi
phase "decode benchmark"
# per-phase limits (30 + 90 + 90 + 3 x 20 + 30 + 75 + 50 + 30 s) keep the run under 8 minutes
for m in model model-8b; do
  limit=30; batch=1,8; [[ "$m" == model-8b ]] && limit=75 && batch=1,8,64
  timeout "$limit" "$here/sglang-server" bench --model-path "$here/$m" --load-format dummy --device cuda \
    --prompt-lens 512 --batch "$batch" --decode-context 512 --decode-steps 64 --repeat 2 --json \
    > "$out/bench-$m.json" 2> "$out/bench-$m.log" \
    || { echo "bench $m failed:"; tail -n 20 "$out/bench-$m.log"; }
done
phase "PyTorch peer (torch_decode_peer.py, model-8b, CUDA graph)"
timeout 50 python3 "$here/torch_decode_peer.py" "$here/model-8b/config.json" --batch 1,8,64 \
  --context 512 --steps 64 > "$out/torch-peer.json" 2> "$out/torch-peer.log" \
  || { echo "PyTorch peer failed:"; tail -n 20 "$out/torch-peer.log"; }
phase "server"
SGLANG_LOG_LEVEL=info "$here/sglang-server" --model-path "$here/model" --load-format dummy \
  --device cuda --port 30123 > "$out/server.log" 2>&1 &
pid=$!
for _ in $(seq 1 40); do
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
phase "summary: $gpu"
python3 - "$out" "$gpu" <<'PY'
import json, re, sys, os
out, gpu = sys.argv[1], sys.argv[2]
try:
    copy_bw = float(open(os.path.join(out, "copy-bw.txt")).read().split()[0])
except Exception:
    copy_bw = None
worst = {}
for line in open(os.path.join(out, "kernels.log"), errors="replace"):
    f = line.split()
    if len(f) >= 4 and f[0].startswith("sg_") and " gpu " in line:
        m = re.search(r" gpu\s+(\S+)\s+(\S+)", line)
        if m:
            err, tol = float(m.group(1)), float(m.group(2))
            k = f[0]
            worst[k] = max(worst.get(k, (0.0, tol)), (err, tol))
print("| kernel | worst error (GPU vs reference: relative, or half bf16 ulps) | tolerance |\n|---|---:|---:|")
for k, (e, t) in sorted(worst.items()):
    print(f"| {k} | {e:.3e} | {t:.0e} |")
if not worst:
    print("| (no GPU kernel results: see kernels.log) | | |")
timings = False
for line in open(os.path.join(out, "kernels.log"), errors="replace"):
    if line.startswith("## kernel timings"):
        timings = True
        print()
    if timings:
        if not line.strip():
            break
        print(line.rstrip())
print()
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
        if copy_bw:
            ratio += f" ({bw / copy_bw:.2f} of the measured copy bandwidth, {copy_bw / 1e12:.2f} TB/s)"
        print(f"| {m} | {b} | {1000 / steps:.3f} | {tps:.1f} | {wb / 1e9:.2f} GB | {bw / 1e9:.0f} GB/s{ratio} |")
    for n, tps in r["prompt_tokens_per_s"].items():
        print(f"| {m} | prefill {n} | | {tps:.0f} | | |")
# issue 15: graphs against eager steps, the weight-read floor and the PyTorch peer
try:
    r = json.load(open(os.path.join(out, "bench-model-8b.json")))
    peer = json.load(open(os.path.join(out, "torch-peer.json")))
except Exception as e:
    print(f"\n(graphs against the peer: not measured: {e})")
else:
    wb = r["weight_bytes"]
    floor = f"{wb / copy_bw * 1e3:.3f} ms" if copy_bw else "(no copy bandwidth)"
    print(f"\nLlama-3-8B shape, 32 layers, 512-token context; weight-read floor at batch 1: {floor}"
          f" ({wb / 1e9:.2f} GB / measured copy bandwidth); peer: PyTorch {peer.get('torch')}"
          f" (SDPA GQA: {peer.get('sdpa_gqa')}), static KV cache, CUDA graph")
    print("| batch | ours, graphs + overlap (ms/step) | graphs, no overlap | eager | PyTorch peer | peer / ours | floor / ours |\n|---:|---:|---:|---:|---:|---:|---:|")
    eager = r.get("decode_tokens_per_s_eager", {})
    serial = r.get("decode_tokens_per_s_no_overlap", {})
    ms_of = lambda d, b: f"{1000 * int(b) / d[b]:.3f}" if b in d else "-"
    for b, tps in sorted(r["decode_tokens_per_s"].items(), key=lambda kv: int(kv[0])):
        ms = 1000 * int(b) / tps
        p = peer["ms_per_step"].get(b)
        ratio = f"{p / ms:.2f}" if p else "-"
        fl = f"{wb / copy_bw * 1e3 / ms:.2f}" if copy_bw and b == "1" else ""
        print(f"| {b} | {ms:.3f} | {ms_of(serial, b)} | {ms_of(eager, b)} | {p if p is None else round(p, 3)} | {ratio} | {fl} |")
PY
