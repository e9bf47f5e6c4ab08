#!/usr/bin/env python3
"""Perplexity of the default model beside llama.cpp's, on the same file and the same tokens.

The text is tests/data/perplexity.txt (public domain: the Gettysburg Address, the opening of
the Declaration of Independence, the first lines of Pride and Prejudice and of A Tale of Two
Cities). It is tokenized once (llama.cpp's tokenizer of the file; the same ids go to both
programs) and cut into chunks of --ctx tokens; in each chunk every token after the first is
scored from the ones before it, as `llama-perplexity` does with its whole window (it scores
only the second half; this scores all but the first token), and the perplexity is
exp(mean negative log-likelihood). Ours: the server's prompt logprobs (`/generate` with
`return_logprob`, `logprob_start_len` 0, no new tokens). llama.cpp: `Llama.eval` with
`logits_all`, log-softmax in numpy. Formats: bf16 (ours from the safetensors, llama.cpp from
the BF16 GGUF of the same values), q8_0, q4_1 (the shipped file), q4_k_m (llama.cpp's own
quantizer). Goal (issue 20): ours within 1 % of llama.cpp's on the same file.

  .venv/bin/python benches/perplexity.py [--formats bf16,q8_0,q4_1,q4_k_m] [--ctx 256]

Needs llama-cpp-python in ./.venv-bench (benches/vs_llamacpp.py builds it).
"""

import argparse
import http.client
import json
import math
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benches"))
import vs_llamacpp as v  # noqa: E402

TEXT = ROOT / "tests" / "data" / "perplexity.txt"

LLAMA_WORKER = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
path, ctx, text = sys.argv[1], int(sys.argv[2]), open(sys.argv[3]).read()
llm = Llama(model_path=path, n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True, n_threads=2,
            verbose=False)
ids = llm.tokenize(text.encode(), add_bos=False, special=False)
nll, n = 0.0, 0
for start in range(0, len(ids) - 1, ctx):
    chunk = ids[start:start + ctx]
    if len(chunk) < 2:
        break
    llm.reset()
    llm.eval(chunk)
    scores = np.asarray(llm.scores[:len(chunk)], dtype=np.float64)
    logp = scores - scores.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll -= sum(logp[i, chunk[i + 1]] for i in range(len(chunk) - 1))
    n += len(chunk) - 1
print(json.dumps({"ids": ids, "nll": nll, "n": n}))
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ours_nll(model, ids, ctx):
    port = free_port()
    binary = ROOT / "target" / "release" / "sglang-server"
    proc = subprocess.Popen([str(binary), "--model-path", str(model), "--host", "127.0.0.1", "--port", str(port),
                             "--threads", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline or proc.poll() is not None:
                sys.exit(f"our server did not start on {model}")
            time.sleep(0.2)
        nll, n = 0.0, 0
        for start in range(0, len(ids) - 1, ctx):
            chunk = ids[start:start + ctx]
            if len(chunk) < 2:
                break
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            body = {"input_ids": chunk, "return_logprob": True, "logprob_start_len": 0,
                    "sampling_params": {"max_new_tokens": 0}}
            c.request("POST", "/generate", json.dumps(body), {"Content-Type": "application/json"})
            r = c.getresponse()
            data = json.loads(r.read())
            if r.status != 200:
                sys.exit(f"our server: {r.status} {data}")
            lps = data["meta_info"]["input_token_logprobs"]
            assert [t[1] for t in lps] == chunk, "the server scored other tokens"
            nll -= sum(t[0] for t in lps[1:])
            n += len(chunk) - 1
        return nll, n
    finally:
        proc.terminate()
        proc.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--formats", default="bf16,q8_0,q4_1,q4_k_m")
    ap.add_argument("--ctx", type=int, default=256)
    args = ap.parse_args()
    py = v.ensure_llama_cpp()
    print(f"CPU: {v.cpu_name()}; text {TEXT.name}, chunks of {args.ctx} tokens\n")
    print("| format | file | tokens scored | ours | llama.cpp | ours / llama.cpp |")
    print("|---|---|---:|---:|---:|---:|")
    for fmt in (f.strip().upper() for f in args.formats.split(",")):
        gguf = v.ensure_q4_k_m(py, 2) if fmt == "Q4_K_M" else v.ensure_gguf(fmt)
        out = subprocess.run([str(py), "-c", LLAMA_WORKER, str(gguf), str(args.ctx), str(TEXT)],
                             capture_output=True, text=True, check=True)
        theirs = json.loads(out.stdout.strip().splitlines()[-1])
        model = ROOT / "models" / "SmolLM2-135M-Instruct" if fmt == "BF16" else v.gguf_model_dir(gguf)
        nll, n = ours_nll(model, theirs["ids"], args.ctx)
        assert n == theirs["n"]
        a, b = math.exp(nll / n), math.exp(theirs["nll"] / n)
        print(f"| {fmt} | {gguf.name} | {n} | {a:.3f} | {b:.3f} | {a / b:.4f} |", flush=True)


if __name__ == "__main__":
    main()
