"""sglang-router in front of three real sglang-server workers on loopback: routing by prefix
affinity, pass-through of every API (the official OpenAI client, streams), keys, retries before
the first byte, kill -9 under load, ejection and re-admission, SIGTERM drain."""

import http.server
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from sglang_testing import ROUTER_BINARY, Router, Server

PROBE = ["--health-check-interval-secs", "0.5", "--health-check-timeout-secs", "2"]


@pytest.fixture(scope="module")
def workers():
    ws = [Server(wait=False) for _ in range(3)]
    for w in ws:
        w.wait_ready()
    yield ws
    for w in ws:
        w.stop()


def generate(target, text, n=8, stream=False):
    return target.post("/generate", {"text": text, "stream": stream,
                                     "sampling_params": {"max_new_tokens": n, "temperature": 0}})


def conversation_turns(router, conversations, turns, model="m"):
    """Chat conversations, one turn after another, each turn extending the last; returns the
    workers' summed (hits, misses) of prompt tokens over the run."""
    history = {c: [{"role": "system", "content": f"You are assistant number {c}. " + "Be brief. " * 20}]
               for c in range(conversations)}
    for t in range(turns):
        for c in range(conversations):
            history[c].append({"role": "user", "content": f"Question {t} of conversation {c}: name a colour."})
            status, _, body = router.post("/v1/chat/completions", {
                "model": model, "messages": history[c], "max_tokens": 4, "temperature": 0})
            assert status == 200, body
            history[c].append({"role": "assistant", "content": body["choices"][0]["message"]["content"]})


def cache_counts(workers):
    return (sum(w.metric("sglang_cache_hits_total") for w in workers),
            sum(w.metric("sglang_cache_misses_total") for w in workers))


def flush(workers):
    for w in workers:
        assert w.post("/flush_cache", {})[0] == 200


def test_routes_every_api_and_answers_its_own(workers):
    router = Router(workers)
    try:
        status, _, health = router.request("GET", "/health")
        assert status == 200 and health["healthy_workers"] == 3 and health["policy"] == "cache_aware"
        # the same greedy answer as a worker gives directly
        direct = generate(workers[0], "The capital of France is")
        routed = generate(router, "The capital of France is")
        assert routed[0] == 200 and routed[2]["text"] == direct[2]["text"]
        # the official client, a streamed chat completion passed through
        client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="none")
        assert [m.id for m in client.models.list().data] == [m.id for m in openai.OpenAI(
            base_url=f"{workers[0].url}/v1", api_key="none").models.list().data]
        chunks = list(client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Say hi"}], max_tokens=6, stream=True))
        assert chunks[-1].choices[0].finish_reason in ("length", "stop")
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text
        # a worker's validation error comes back as the worker said it
        status, _, body = router.post("/v1/chat/completions", {"model": "m", "messages": []})
        assert status == 400 and "messages" in body["error"]["message"] + (body["error"]["param"] or "")
        # the router's metrics
        assert router.metric("sglang_router_requests_total") >= 3
        assert router.metric("sglang_router_worker_healthy") == 3
    finally:
        router.stop()


def test_cache_aware_keeps_conversations_on_their_worker(workers):
    hit_rate = {}
    for policy in ("round_robin", "cache_aware"):
        flush(workers)
        router = Router(workers, "--policy", policy)
        try:
            h0, m0 = cache_counts(workers)
            # 4 conversations over 3 workers: round robin moves each conversation every turn
            conversation_turns(router, conversations=4, turns=3)
            h1, m1 = cache_counts(workers)
            hit_rate[policy] = (h1 - h0) / max(1, (h1 - h0) + (m1 - m0))
            if policy == "cache_aware":
                # every turn after a conversation's first followed its prefix
                assert router.metric("sglang_router_cache_aware_hits_total") == 8
        finally:
            router.stop()
    print("prefix-cache hit rate", hit_rate)
    assert hit_rate["cache_aware"] > hit_rate["round_robin"] + 0.2, hit_rate


class RefusingWorker(http.server.ThreadingHTTPServer):
    """Healthy to probes, but drops every request's connection before answering."""

    def __init__(self):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def do_POST(self):
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True

            def log_message(self, *a):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


def test_a_failure_before_the_first_byte_is_retried_elsewhere_and_ejects(workers):
    bad = RefusingWorker()
    router = Router([bad.url, workers[0]], "--policy", "round_robin", "--health-check-interval-secs", "60")
    try:
        assert router.workers()[bad.url]["healthy"]
        for i in range(4):
            status, _, body = generate(router, f"Count to {i}:")
            assert status == 200, body
        assert router.metric("sglang_router_retries_total") >= 1
        assert router.metric("sglang_router_errors_total", {"worker": bad.url, "kind": "connect"}) >= 1
        assert not router.workers()[bad.url]["healthy"]
        assert router.metric("sglang_router_worker_ejections_total", {"worker": bad.url}) == 1
    finally:
        router.stop()
        bad.shutdown()


def test_keys_the_routers_own_and_the_workers(workers):
    keyed = Server("--api-key", "worker-secret")
    router = Router([keyed], "--api-key", "router-secret", "--worker-api-key", "worker-secret")
    try:
        assert generate(router, "Hi")[0] == 401
        ok = router.post("/generate", {"text": "Hi", "sampling_params": {"max_new_tokens": 2}},
                         headers={"Authorization": "Bearer router-secret"})
        assert ok[0] == 200, ok
        # the anthropic client's header works too; /health and /metrics stay open to probes
        assert router.post("/generate", {"text": "Hi", "sampling_params": {"max_new_tokens": 2}},
                           headers={"x-api-key": "router-secret"})[0] == 200
        assert router.request("GET", "/health")[0] == 200
    finally:
        router.stop()
        keyed.stop()
    # without a key of its own the router passes the client's through
    router = Router([workers[0]])
    try:
        assert router.post("/generate", {"text": "Hi", "sampling_params": {"max_new_tokens": 2}},
                           headers={"Authorization": "Bearer anything"})[0] == 200
    finally:
        router.stop()


def test_kill_9_under_load_fails_no_request_and_the_worker_comes_back(workers):
    router = Router(workers, "--policy", "round_robin", *PROBE)
    victim = workers[2]
    try:
        stop = threading.Event()
        failures, done = [], []

        def client(i):
            while not stop.is_set():
                status, _, body = generate(router, f"Story {i}-{len(done)}: once upon a time", n=24)
                (done if status == 200 else failures).append((status, body))

        with ThreadPoolExecutor(6) as pool:
            for i in range(6):
                pool.submit(client, i)
            time.sleep(3)
            killed_at = time.time()
            victim.proc.send_signal(signal.SIGKILL)
            victim.proc.wait()
            while router.workers()[victim.url]["healthy"]:
                assert time.time() - killed_at < 2 * 0.5 + 2, "not ejected within two probe intervals"
                time.sleep(0.05)
            time.sleep(3)
            stop.set()
        assert not failures, failures[:3]
        assert len(done) > 6
        # a worker restarted on the same address is re-admitted by the probes
        workers[2] = Server(port=victim.port)
        deadline = time.time() + 10
        while not router.workers()[victim.url]["healthy"]:
            assert time.time() < deadline, "not re-admitted"
            time.sleep(0.1)
        assert router.metric("sglang_router_worker_ejections_total", {"worker": victim.url}) >= 1
    finally:
        router.stop()


def test_a_stream_cut_by_its_worker_ends_with_an_error_event(workers):
    victim = workers[1]
    router = Router([victim], *PROBE)
    try:
        client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="none", max_retries=0)
        stream = client.completions.create(model="m", prompt="Write a long story:", max_tokens=400,
                                           temperature=0, stream=True)
        first = next(iter(stream))
        assert first.choices[0].text is not None
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait()
        # the official client turns the router's error event into an exception
        with pytest.raises(openai.APIError, match="not retried"):
            for _ in stream:
                pass
        assert router.metric("sglang_router_errors_total", {"kind": "stream"}) == 1
    finally:
        router.stop()
        workers[1] = Server(port=victim.port)


def test_sigterm_drains_in_flight_requests(workers):
    router = Router(workers[:1])
    result = {}

    def slow():
        result["r"] = generate(router, "Tell me about the sea", n=64)

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.3)
    router.proc.send_signal(signal.SIGTERM)
    time.sleep(0.1)
    # draining: not healthy, takes nothing new (or is already gone)
    try:
        assert router.request("GET", "/health", timeout=5)[0] == 503
    except OSError:
        pass
    t.join(60)
    assert result["r"][0] == 200 and result["r"][2]["text"]
    assert router.proc.wait(30) == 0


def test_bad_flags_are_clear_errors():
    for args, needle in [([], "--worker-urls"), (["--worker-urls", "https://x:1"], "only http://"),
                         (["--worker-urls", "a:1", "--cache-threshold", "2"], "--cache-threshold"),
                         (["--worker-dns", "svc"], "NAME:PORT")]:
        out = subprocess.run([str(ROUTER_BINARY), *args], capture_output=True, text=True, timeout=30)
        assert out.returncode != 0 and needle in out.stderr, (args, out.stderr)


def test_the_inference_gateway_metric_contract(workers):
    """What the Gateway API Inference Extension's endpoint picker reads from a model server:
    queued and running requests (gauges) and KV-cache utilisation as a ratio from 0 to 1."""
    w = workers[0]
    seen = {"running": 0.0, "ratio": 0.0}
    events = w.stream("/generate", {"text": "Tell me a long story about the sea", "stream": True,
                                    "sampling_params": {"max_new_tokens": 200, "temperature": 0,
                                                        "ignore_eos": True}})
    for i, _ in enumerate(events):
        if i in (20, 60):
            seen["running"] = max(seen["running"], w.metric("sglang_num_running_requests"))
            seen["ratio"] = max(seen["ratio"], w.metric("sglang_kv_cache_usage_ratio"))
    _, _, text = w.request("GET", "/metrics")
    assert "# TYPE sglang_kv_cache_usage_ratio gauge" in text
    assert "# TYPE sglang_request_queue_length gauge" in text
    assert seen["running"] == 1 and 0 < seen["ratio"] <= 1, seen
    deadline = time.time() + 5
    while w.metric("sglang_kv_cache_usage_ratio") != 0 or w.metric("sglang_num_running_requests") != 0:
        assert time.time() < deadline, "the gauges stay up after the request finished"
        time.sleep(0.05)


def test_workers_found_by_dns(workers):
    """--worker-dns NAME:PORT: the name's addresses are the workers (here localhost; an IPv6
    address of it has no server, so it never joins the pool)."""
    w = workers[0]
    router = Router(None, "--worker-dns", f"localhost:{w.port}", "--dns-refresh-secs", "0.5")
    try:
        assert router.workers()[f"http://127.0.0.1:{w.port}"]["healthy"]
        assert generate(router, "Hello")[0] == 200
    finally:
        router.stop()
