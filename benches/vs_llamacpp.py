#!/usr/bin/env python3
"""This engine beside llama.cpp on the same machine, model and file (CPU, 2 threads).

llama.cpp comes from PyPI's llama-cpp-python (which builds llama.cpp from source, natively
tuned) in ./.venv-bench. Formats (--formats): bf16 (ours from the safetensors with the default
`--dtype auto`, llama.cpp from a BF16 GGUF of the same values written by scripts/make_gguf.py;
on CPUs with AVX-512 BF16 both round the activations entering each product to bf16), bf16f32
(the same, ours with `--dtype float32`: f32 activations, exact against the f32 reference),
and q8_0, q4_0 (GGUF files
written by scripts/make_gguf.py), q4_1 (the shipped file) and q4_k_m (made by llama.cpp's own
quantizer from the BF16 GGUF, as users make it), which both programs read from the very same
GGUF file. Each round runs both programs, in alternating order, each in a fresh process; the table shows medians of
decode tokens/s at batch 1, prompt processing at 128 and 512 tokens, peak resident memory,
the ratios ours / llama.cpp, and the memory-bandwidth floor measured in the same run.

  .venv/bin/python benches/vs_llamacpp.py [--rounds 3] [--threads 2] [--formats bf16,bf16f32,q8_0,q4_1,q4_0,q4_k_m]

The first run builds llama-cpp-python (about 15 minutes on 2 cores).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_VENV = ROOT / ".venv-bench"
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
PINS = ["numpy==2.4.6", "typing_extensions==4.16.0", "diskcache==5.6.3", "Jinja2==3.1.6", "MarkupSafe==3.0.4"]

LLAMA_WORKER = r"""
import json, resource, sys, time
import llama_cpp.llama_cpp as llama_cpp  # the module llama_cpp.Llama calls
from llama_cpp import Llama
path, threads, ctx, steps, repack = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
if repack == "0":  # llama.cpp's --no-repack: no extra (repacked) weight buffers
    default_params = llama_cpp.llama_model_default_params
    def no_repack():
        p = default_params()
        p.use_extra_bufts = False
        return p
    llama_cpp.llama_model_default_params = no_repack
llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=1024, n_batch=512,
            n_ubatch=512, verbose=False)
vocab = llm.n_vocab()
def prompt(n, salt):
    return [100 + (i * 7919 + salt * 31) % (vocab - 200) for i in range(n)]
pp = {}
for n in (128, 512):
    best = 0.0
    for k in range(3):
        llm.reset()
        t = time.perf_counter(); llm.eval(prompt(n, 7 + k)); best = max(best, n / (time.perf_counter() - t))
    pp[str(n)] = best
best = 0.0
for k in range(3):
    llm.reset(); llm.eval(prompt(ctx, 100 * k))
    toks = prompt(steps, 999 + k)
    t = time.perf_counter()
    for tok in toks:
        llm.eval([tok])
    best = max(best, steps / (time.perf_counter() - t))
print(json.dumps({"prompt_tokens_per_s": pp, "decode_tokens_per_s": {"1": best},
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def log(msg):
    print(f"[vs_llamacpp] {msg}", file=sys.stderr, flush=True)


def ensure_llama_cpp():
    py = BENCH_VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
    ok = subprocess.run([str(py), "-c", "import llama_cpp"], capture_output=True).returncode == 0
    if not ok:
        log(f"building {LLAMA_CPP_PYTHON} into {BENCH_VENV} (llama.cpp from source; ~15 min on 2 cores)")
        subprocess.run([str(py), "-m", "pip", "install", "--quiet", LLAMA_CPP_PYTHON, *PINS], check=True)
    return py


def ensure_gguf(ty="BF16"):
    path = ROOT / "models" / ".cache" / f"SmolLM2-135M-Instruct.{ty}.gguf"
    if not path.exists():
        log(f"writing the {ty} GGUF of the prepared model")
        subprocess.run([str(ROOT / ".venv" / "bin" / "python"), str(ROOT / "scripts" / "make_gguf.py"), "--type", ty],
                       check=True)
    return path


QUANTIZE_WORKER = r"""
import ctypes, sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
params.nthread = int(sys.argv[3])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)))
"""


def ensure_q4_k_m(py, threads):
    """The Q4_K_M file as users make it: llama.cpp's own quantizer (llama-quantize's
    `llama_model_quantize`) run on the BF16 GGUF of the prepared model."""
    path = ROOT / "models" / ".cache" / "SmolLM2-135M-Instruct.Q4_K_M-llama-quantize.gguf"
    if not path.exists():
        log("quantizing the BF16 GGUF to Q4_K_M with llama.cpp")
        part = path.with_suffix(".part")
        subprocess.run([str(py), "-c", QUANTIZE_WORKER, str(ensure_gguf("BF16")), str(part), str(threads)],
                       check=True, capture_output=True)
        part.rename(path)
    return path


def gguf_model_dir(gguf_path):
    """A model directory with the prepared model's config and tokenizer and one GGUF file."""
    import tempfile
    d = Path(tempfile.mkdtemp(prefix="vs-llamacpp-"))
    src = ROOT / "models" / "SmolLM2-135M-Instruct"
    for f in ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]:
        (d / f).symlink_to(src / f)
    (d / gguf_path.name).symlink_to(gguf_path)
    return d


def run_child(cmd, may_fail=False):
    """Runs a benchmark process; returns its JSON and its peak resident memory (rusage), or
    None when it failed and `may_fail`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        if may_fail:
            log(f"{cmd[0]} failed (exit status {out.returncode}): {out.stderr.strip()[-300:]}")
            return None
        sys.exit(f"{cmd[0]} failed (exit status {out.returncode}):\n{out.stderr}")
    data = json.loads(out.stdout.strip().splitlines()[-1])
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # RUSAGE_CHILDREN is the maximum over children so far; the child's own figure is exact
    data.setdefault("peak_rss_bytes", max(before, after) * 1024)
    return data


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode-steps", type=int, default=128)
    ap.add_argument("--decode-context", type=int, default=32)
    ap.add_argument("--formats", default="bf16,bf16f32,q8_0,q4_1,q4_0,q4_k_m")
    args = ap.parse_args()
    py = ensure_llama_cpp()
    ours_bin = ROOT / "target" / "release" / "sglang-server"
    if not ours_bin.exists():
        subprocess.run(["cargo", "build", "--release", "-p", "sglang-server"], cwd=ROOT, check=True)
    print(f"CPU: {cpu_name()}; {args.threads} threads, {args.rounds} rounds (medians)")
    for fmt in args.formats.split(","):
        compare(fmt.strip().upper(), py, ours_bin, args)


def cpu_name():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def compare(fmt, py, ours_bin, args):
    bf16 = fmt in ("BF16", "BF16F32")
    gguf_path = ensure_q4_k_m(py, args.threads) if fmt == "Q4_K_M" else ensure_gguf("BF16" if bf16 else fmt)
    model = ROOT / "models" / "SmolLM2-135M-Instruct" if bf16 else gguf_model_dir(gguf_path)
    ours_cmd = [str(ours_bin), "bench", "--json", "--threads", str(args.threads), "--prompt-lens", "128,512",
                "--batch", "1", "--decode-steps", str(args.decode_steps), "--decode-context", str(args.decode_context),
                "--bandwidth", "--model-path", str(model)]
    if fmt == "BF16F32":
        ours_cmd += ["--dtype", "float32"]
    llama_cmd = [str(py), "-c", LLAMA_WORKER, str(gguf_path), str(args.threads), str(args.decode_context),
                 str(args.decode_steps), "1"]
    # llama.cpp repacks weights for its wide kernels where it can; on some CPUs that crashes
    # (the Xeon with AMX, Q8_0 and Q4_1). Then it runs without repacking, and the table says so.
    repack_note = ""
    log(f"{fmt}: does llama.cpp run with weight repacking here?")
    if run_child(llama_cmd, may_fail=True) is None:
        llama_cmd[-1] = "0"
        repack_note = " llama.cpp ran with weight repacking off (`use_extra_bufts = false`, its `--no-repack`): it crashed with it on this CPU."
    runs = {"ours": [], "llama.cpp": []}
    for r in range(args.rounds):
        order = [("ours", ours_cmd), ("llama.cpp", llama_cmd)]
        if r % 2:
            order.reverse()
        for name, cmd in order:
            log(f"{fmt} round {r + 1}/{args.rounds}: {name}")
            runs[name].append(run_child(cmd))

    def med(name, key, sub):
        return statistics.median(run[key][sub] for run in runs[name])

    bw = statistics.median(run["bandwidth_bytes_per_s"] for run in runs["ours"])
    weights = runs["ours"][0]["weight_bytes"]
    floor = bw / weights
    kernels = runs["ours"][0].get("kernels", "?")
    rows = [
        ("decode, batch 1 (tokens/s)", med("ours", "decode_tokens_per_s", "1"), med("llama.cpp", "decode_tokens_per_s", "1")),
        ("prompt processing, 128 tokens (tokens/s)", med("ours", "prompt_tokens_per_s", "128"), med("llama.cpp", "prompt_tokens_per_s", "128")),
        ("prompt processing, 512 tokens (tokens/s)", med("ours", "prompt_tokens_per_s", "512"), med("llama.cpp", "prompt_tokens_per_s", "512")),
    ]
    mem_ours = statistics.median(r["peak_rss_bytes"] for r in runs["ours"]) / 1e6
    mem_llama = statistics.median(r["peak_rss_bytes"] for r in runs["llama.cpp"]) / 1e6
    source = 'ours: safetensors; llama.cpp: ' + gguf_path.name if bf16 else gguf_path.name
    if fmt == "BF16F32":
        source += "; ours with --dtype float32"
    print(f"\n### {fmt} ({source})")
    print(f"our kernels: {kernels}; weights {weights / 1e6:.1f} MB per decode step; streaming read bandwidth "
          f"{bw / 1e9:.1f} GB/s -> decode floor {floor:.1f} tokens/s.{repack_note}\n")
    print("| metric | ours | llama.cpp | ours / llama.cpp |")
    print("|---|---:|---:|---:|")
    for name, a, b in rows:
        print(f"| {name} | {a:.1f} | {b:.1f} | {a / b:.2f} |")
    print(f"| peak resident memory (MB) | {mem_ours:.0f} | {mem_llama:.0f} | {mem_ours / mem_llama:.2f} |")
    print(f"| decode batch 1 / bandwidth floor | {rows[0][1] / floor:.2f} | {rows[0][2] / floor:.2f} | |", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
