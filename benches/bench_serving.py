#!/usr/bin/env python3
"""Serving load generator in the style of `sglang.bench_serving`.

Sends requests to a running sglang-server (or one it launches with --launch) over the native
streaming API with exact prompt and output lengths (random token ids, `ignore_eos`), with
Poisson arrivals at --request-rate or at a fixed --max-concurrency, optionally all sharing a
common prefix (--shared-prefix-len, the radix cache's workload). Prints request throughput,
input and output tokens/s, TTFT, inter-token latency and end-to-end latency percentiles, and
the server's own overhead per generated token as a fraction of the model step time (from the
engine's step counters, at concurrency 1).

Examples:
  .venv/bin/python benches/bench_serving.py --launch --num-prompts 64 --request-rate 4
  .venv/bin/python benches/bench_serving.py --base-url http://127.0.0.1:30000 --max-concurrency 16
  .venv/bin/python benches/bench_serving.py --launch --overhead-only --overhead-requests 16 \
      --overhead-output-len 128
"""

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent


async def post_stream(host, port, path, body, headers):
    """POSTs JSON and yields (arrival time, payload) for each SSE `data:` line."""
    reader, writer = await asyncio.open_connection(host, port)
    data = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    for k, v in headers.items():
        head += f"{k}: {v}\r\n"
    writer.write(head.encode() + b"\r\n" + data)
    await writer.drain()
    status = await reader.readline()
    if b" 200 " not in status:
        rest = await reader.read(4096)
        writer.close()
        raise RuntimeError(f"{status.decode().strip()}: {rest[-300:]!r}")
    try:
        while True:
            line = await reader.readline()
            if not line:
                return
            line = line.strip()
            if line.startswith(b"data: "):
                payload = line[6:]
                if payload == b"[DONE]":
                    return
                yield time.perf_counter(), json.loads(payload)
    finally:
        writer.close()


async def get_json(host, port, path, headers):
    reader, writer = await asyncio.open_connection(host, port)
    head = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
    for k, v in headers.items():
        head += f"{k}: {v}\r\n"
    writer.write(head.encode() + b"\r\n")
    raw = await reader.read()
    writer.close()
    # the server answers JSON with a Content-Length (no chunked encoding)
    return json.loads(raw.split(b"\r\n\r\n", 1)[1])


class Result:
    def __init__(self):
        self.ok = False
        self.error = None
        self.ttft = None
        self.itl = []
        self.latency = None
        self.input_len = 0
        self.output_len = 0


async def one_request(host, port, headers, ids, out_len):
    r = Result()
    r.input_len = len(ids)
    body = {"input_ids": ids, "stream": True,
            "sampling_params": {"max_new_tokens": out_len, "ignore_eos": True, "temperature": 0}}
    start = time.perf_counter()
    last, seen = start, 0
    try:
        async for t, ev in post_stream(host, port, "/generate", body, headers):
            n = len(ev.get("output_ids", []))
            if n > seen:
                if seen == 0:
                    r.ttft = t - start
                else:
                    # several tokens in one event share the gap
                    r.itl.extend([(t - last) / (n - seen)] * (n - seen))
                seen, last = n, t
        r.output_len = seen
        r.latency = time.perf_counter() - start
        r.ok = seen == out_len
        if not r.ok:
            r.error = f"got {seen} of {out_len} tokens"
    except Exception as e:  # noqa: BLE001 - reported in the summary
        r.error = str(e)
    return r


def percentiles(xs, ps=(50, 90, 99)):
    if not xs:
        return {p: float("nan") for p in ps}
    s = sorted(xs)
    return {p: s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))] for p in ps}


def make_prompts(args, vocab=49152):
    rng = random.Random(args.seed)
    prefix = [rng.randrange(100, vocab) for _ in range(args.shared_prefix_len)]
    prompts = []
    for _ in range(args.num_prompts):
        lo = max(1, int(args.input_len * (1 - args.range_ratio)))
        hi = max(lo, int(args.input_len * (1 + args.range_ratio)))
        n = rng.randint(lo, hi)
        olo = max(1, int(args.output_len * (1 - args.range_ratio)))
        ohi = max(olo, int(args.output_len * (1 + args.range_ratio)))
        prompts.append((prefix + [rng.randrange(100, vocab) for _ in range(n)], rng.randint(olo, ohi)))
    return prompts


async def run_load(args, host, port, headers, prompts):
    rng = random.Random(args.seed + 1)
    sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None

    async def guarded(ids, out_len):
        if sem is None:
            return await one_request(host, port, headers, ids, out_len)
        async with sem:
            return await one_request(host, port, headers, ids, out_len)

    tasks = []
    start = time.perf_counter()
    for ids, out_len in prompts:
        tasks.append(asyncio.create_task(guarded(ids, out_len)))
        if args.request_rate != float("inf"):
            await asyncio.sleep(rng.expovariate(args.request_rate))
    results = await asyncio.gather(*tasks)
    return results, time.perf_counter() - start


def summarize(results, duration):
    ok = [r for r in results if r.ok]
    out = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "input_tok_s": sum(r.input_len for r in ok) / duration,
        "output_tok_s": sum(r.output_len for r in ok) / duration,
        "ttft_ms": {k: v * 1000 for k, v in percentiles([r.ttft for r in ok if r.ttft is not None]).items()},
        "itl_ms": {k: v * 1000 for k, v in percentiles([x for r in ok for x in r.itl]).items()},
        "e2e_ms": {k: v * 1000 for k, v in percentiles([r.latency for r in ok]).items()},
        "mean_ttft_ms": 1000 * sum(r.ttft for r in ok) / max(1, len(ok)),
        "mean_itl_ms": 1000 * sum(x for r in ok for x in r.itl) / max(1, sum(len(r.itl) for r in ok)),
        "errors": sorted({r.error for r in results if r.error})[:5],
    }
    return out


async def overhead(args, host, port, headers):
    """ITL at concurrency 1 against the engine's own mean step time over the same requests."""
    info0 = await get_json(host, port, "/get_server_info", headers)
    rng = random.Random(args.seed + 2)
    results = []
    for _ in range(args.overhead_requests):
        ids = [rng.randrange(100, 49000) for _ in range(32)]
        results.append(await one_request(host, port, headers, ids, args.overhead_output_len))
    info1 = await get_json(host, port, "/get_server_info", headers)
    # decode-only steps: their forward time is the model's share of an inter-token gap
    steps = info1["stats"]["decode_steps"] - info0["stats"]["decode_steps"]
    fwd = info1["stats"]["decode_forward_seconds"] - info0["stats"]["decode_forward_seconds"]
    itls = [x for r in results for x in r.itl]
    itl = sum(itls) / max(1, len(itls))
    step = fwd / max(1, steps)
    return {"mean_itl_ms": itl * 1000, "mean_step_ms": step * 1000, "overhead_per_token_ms": (itl - step) * 1000,
            "overhead_fraction_of_step": (itl - step) / step if step > 0 else float("nan")}


def print_table(args, s, ovh):
    print(f"\n| metric | value |\n|---|---:|")
    cfg = (f"{args.num_prompts} prompts, input {args.input_len}±{int(args.range_ratio*100)}%, "
           f"output {args.output_len}±{int(args.range_ratio*100)}%, shared prefix {args.shared_prefix_len}, "
           f"rate {args.request_rate}, max concurrency {args.max_concurrency or 'none'}")
    print(f"| workload | {cfg} |")
    print(f"| completed / failed | {s['completed']} / {s['failed']} |")
    print(f"| duration (s) | {s['duration_s']:.2f} |")
    print(f"| request throughput (req/s) | {s['request_throughput']:.2f} |")
    print(f"| input tokens/s | {s['input_tok_s']:.1f} |")
    print(f"| output tokens/s | {s['output_tok_s']:.1f} |")
    for name in ("ttft_ms", "itl_ms", "e2e_ms"):
        p = s[name]
        print(f"| {name.replace('_ms', '')} p50 / p90 / p99 (ms) | {p[50]:.1f} / {p[90]:.1f} / {p[99]:.1f} |")
    if ovh:
        print(f"| concurrency 1: mean ITL / model step (ms) | {ovh['mean_itl_ms']:.2f} / {ovh['mean_step_ms']:.2f} |")
        print(f"| server overhead per token (fraction of step) | {ovh['overhead_per_token_ms']:.2f} ms ({ovh['overhead_fraction_of_step']:.1%}) |")
    if s["errors"]:
        print("errors:", s["errors"])


def launch(args):
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    binary = ROOT / "target" / "release" / "sglang-server"
    cmd = [str(binary), "--port", str(port), "--admin-api-key", "bench", *args.server_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as c:
                c.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if b" 200 " in c.recv(100):
                    return proc, f"http://127.0.0.1:{port}", "bench"
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    sys.exit("the server did not become healthy")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:30000")
    ap.add_argument("--launch", action="store_true", help="start target/release/sglang-server with the default model")
    ap.add_argument("--server-args", nargs=argparse.REMAINDER, default=[], help="extra arguments for --launch")
    ap.add_argument("--admin-api-key", default=os.environ.get("SGLANG_ADMIN_API_KEY"))
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--range-ratio", type=float, default=0.5, help="lengths uniform in len*(1±ratio)")
    ap.add_argument("--shared-prefix-len", type=int, default=0)
    ap.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson arrivals per second")
    ap.add_argument("--max-concurrency", type=int, default=0)
    ap.add_argument("--no-overhead", action="store_true")
    ap.add_argument("--overhead-only", action="store_true", help="skip the load, measure the overhead only")
    ap.add_argument("--overhead-requests", type=int, default=4, help="requests of the concurrency-1 overhead run")
    ap.add_argument("--overhead-output-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    proc = None
    if args.launch:
        proc, args.base_url, args.admin_api_key = launch(args)
    u = urlparse(args.base_url)
    host, port = u.hostname, u.port or 80
    headers = {"Authorization": f"Bearer {args.admin_api_key}"} if args.admin_api_key else {}
    try:
        if args.overhead_only:
            # one short request first, so the measured ones find the server warm
            asyncio.run(one_request(host, port, headers, [100 + i for i in range(32)], 16))
            ovh = asyncio.run(overhead(args, host, port, headers))
            print(f"\n| concurrency 1, {args.overhead_requests} x {args.overhead_output_len} tokens | value |\n|---|---:|")
            print(f"| mean ITL / model step (ms) | {ovh['mean_itl_ms']:.3f} / {ovh['mean_step_ms']:.3f} |")
            print(f"| server overhead per token (fraction of step) | {ovh['overhead_per_token_ms']:.3f} ms ({ovh['overhead_fraction_of_step']:.1%}) |")
            return
        results, duration = asyncio.run(run_load(args, host, port, headers, make_prompts(args)))
        s = summarize(results, duration)
        ovh = None if args.no_overhead else asyncio.run(overhead(args, host, port, headers))
        print_table(args, s, ovh)
    finally:
        if proc:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)


if __name__ == "__main__":
    main()
