#!/usr/bin/env python3
"""sglang-router on loopback: three workers of the default model behind the router, a
multi-turn workload (each conversation has its own long prefix; every turn resends the whole
conversation plus a new question), run through `cache_aware` and `round_robin` and, for
reference, straight to a single server. Prints the workers' summed prefix-cache hit rate
(prompt tokens served from the radix cache, from their /metrics) and time to first token,
side by side, then the router's added latency per request at concurrency 1 (p50, a proxied
GET against the same GET sent to a worker directly).

Example: .venv/bin/python benches/router.py --conversations 16 --turns 4

(The conversation count should not be a multiple of the workers: round robin would then send
each conversation to the same worker every turn, by accident.)
"""

import argparse
import http.client
import json
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "lib"))
from sglang_testing import Router, Server  # noqa: E402


def ttft(target, ids, out_len):
    """Streams /generate over input ids; returns (seconds to the first token, output ids)."""
    c = http.client.HTTPConnection("127.0.0.1", target.port, timeout=300)
    body = {"input_ids": ids, "stream": True,
            "sampling_params": {"max_new_tokens": out_len, "temperature": 0, "ignore_eos": True}}
    t0 = time.perf_counter()
    c.request("POST", "/generate", body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200, r.read()
    first, out = None, []
    for line in r:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        if first is None:
            first = time.perf_counter() - t0
        out = json.loads(line[6:]).get("output_ids", out)
    c.close()
    return first, out


def workload(target, args, seed=0):
    """Runs every conversation turn by turn (`--concurrency` at a time); returns TTFTs."""
    rng = random.Random(seed)
    convs = [[rng.randrange(100, 49000) for _ in range(args.prefix_len)] for _ in range(args.conversations)]
    times = []
    for _ in range(args.turns):
        def turn(i):
            convs[i] += [rng.randrange(100, 49000) for _ in range(args.question_len)]
            t, out = ttft(target, convs[i], args.output_len)
            convs[i] += out
            return t
        with ThreadPoolExecutor(args.concurrency) as pool:
            times += list(pool.map(turn, range(args.conversations)))
    return times


def hits(workers):
    h = sum(w.metric("sglang_cache_hits_total") for w in workers)
    m = sum(w.metric("sglang_cache_misses_total") for w in workers)
    return h, m


def run(name, target, workers, args):
    for w in workers:
        w.post("/flush_cache", {})
    h0, m0 = hits(workers)
    times = workload(target, args)
    h1, m1 = hits(workers)
    rate = (h1 - h0) / max(1, (h1 - h0) + (m1 - m0))
    q = statistics.quantiles(times, n=10)
    return {"name": name, "hit_rate": rate, "ttft_p50": statistics.median(times), "ttft_p90": q[8]}


def p50_get(port, path, n):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        c.request("GET", path)
        r = c.getresponse()
        r.read()
        ts.append(time.perf_counter() - t0)
    c.close()
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--conversations", type=int, default=16)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--prefix-len", type=int, default=768)
    ap.add_argument("--question-len", type=int, default=24)
    ap.add_argument("--output-len", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=3)
    ap.add_argument("--overhead-requests", type=int, default=400)
    args = ap.parse_args()

    workers = [Server(wait=False) for _ in range(args.workers)]
    for w in workers:
        w.wait_ready()
    rows = []
    try:
        rows.append(run("single server (reference)", workers[0], workers[:1], args))
        for policy in ("cache_aware", "round_robin"):
            router = Router(workers, "--policy", policy)
            try:
                rows.append(run(f"router, {policy}", router, workers, args))
            finally:
                router.stop()
        router = Router(workers, "--policy", "round_robin")
        try:
            p50_get(router.port, "/get_model_info", 20)  # warm the pooled connections
            direct = p50_get(workers[0].port, "/get_model_info", args.overhead_requests)
            routed = p50_get(router.port, "/get_model_info", args.overhead_requests)
        finally:
            router.stop()
    finally:
        for w in workers:
            w.stop()

    print(f"\n{args.workers} workers, {args.conversations} conversations x {args.turns} turns, prefix "
          f"{args.prefix_len} tokens, +{args.question_len} per question, {args.output_len} out, "
          f"concurrency {args.concurrency}\n")
    print("| route | prefix-cache hit rate | TTFT p50 (ms) | TTFT p90 (ms) |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['hit_rate']:.1%} | {r['ttft_p50'] * 1e3:.1f} | {r['ttft_p90'] * 1e3:.1f} |")
    ca, rr = rows[1], rows[2]
    print(f"\ncache_aware / round_robin: hit rate {ca['hit_rate'] / max(rr['hit_rate'], 1e-9):.2f}x, "
          f"TTFT p50 {ca['ttft_p50'] / rr['ttft_p50']:.2f}x")
    print(f"router's added latency, concurrency 1, p50 of {args.overhead_requests} GETs: "
          f"{(routed - direct) * 1e3:.3f} ms (direct {direct * 1e3:.3f} ms, routed {routed * 1e3:.3f} ms; goal <= 1 ms)")


if __name__ == "__main__":
    main()
