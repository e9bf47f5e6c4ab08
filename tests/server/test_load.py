"""Concurrency: 64 concurrent streams equal their sequential outputs, a disconnect aborts and
returns the pages, a tiny KV pool still completes every request exactly, the queue limit
answers 429, the time limit aborts cleanly."""

import json
import socket
import threading
import time

from sglang_testing import Server

ADMIN = {"Authorization": "Bearer admin-secret"}


def chat_body(i, max_tokens=16, stream=False):
    return {"model": "m", "messages": [{"role": "user", "content": f"Give me fact number {i} about the ocean."}],
            "max_tokens": max_tokens, "temperature": 0, "stream": stream}


def streamed_text(server, body):
    text, done = "", False
    for ev in server.stream("/v1/chat/completions", body):
        if ev == "[DONE]":
            done = True
            break
        for c in ev["choices"]:
            text += c["delta"].get("content") or ""
    assert done
    return text


def test_64_concurrent_streams_equal_sequential(server):
    n = 64
    sequential = []
    for i in range(n):
        status, _, r = server.post("/v1/chat/completions", chat_body(i))
        assert status == 200
        sequential.append(r["choices"][0]["message"]["content"])
    results = [None] * n
    errors = []

    def run(i):
        try:
            results[i] = streamed_text(server, chat_body(i, stream=True))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results == sequential


def kv(server):
    _, _, info = server.request("GET", "/get_server_info", headers=ADMIN)
    return info["kv_cache"]


def test_disconnect_mid_stream_aborts_and_frees_pages(server):
    before = kv(server)
    aborted = server.metric("sglang_aborted_requests_total", {"reason": "client_disconnected"})
    body = {"text": "Write an endless list of numbers:", "stream": True,
            "sampling_params": {"max_new_tokens": 4000, "ignore_eos": True, "temperature": 0}}
    sock = socket.create_connection(("127.0.0.1", server.port))
    data = json.dumps(body).encode()
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    got = b""
    while got.count(b"data: ") < 5:
        got += sock.recv(65536)
    sock.close()  # the client goes away mid-stream
    deadline = time.time() + 20
    while time.time() < deadline:
        now = kv(server)
        if now["used_tokens"] == 0 and now["available_tokens"] == before["available_tokens"]:
            break
        time.sleep(0.1)
    assert now["used_tokens"] == 0, now
    assert now["available_tokens"] == before["available_tokens"], (before, now)
    assert server.metric("sglang_aborted_requests_total", {"reason": "client_disconnected"}) == aborted + 1


def test_tiny_kv_pool_completes_every_request_exactly(server):
    prompts = [f"Explain topic {i} in detail: " + "history, science, art, " * 6 for i in range(8)]
    bodies = [{"text": p, "sampling_params": {"max_new_tokens": 40, "temperature": 0, "ignore_eos": True}} for p in prompts]
    want = [server.post("/generate", b)[2]["output_ids"] for b in bodies]
    # 192 KV slots; eight requests of ~80 tokens each cannot all be resident
    tiny = Server("--max-total-tokens", "192", "--page-size", "4", "--admin-api-key", "admin-secret")
    try:
        got = [None] * len(bodies)

        def run(i):
            got[i] = tiny.post("/generate", bodies[i])[2]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [g["output_ids"] for g in got] == want
        _, _, info = tiny.request("GET", "/get_server_info", headers=ADMIN)
        assert info["stats"]["retractions"] > 0, "the pool was meant to run dry"
        assert info["kv_cache"]["used_tokens"] == 0
    finally:
        assert tiny.stop() == 0


def test_queue_full_is_429_and_timeouts_abort():
    s = Server("--max-running-requests", "1", "--max-queued-requests", "1", "--request-timeout", "2")
    try:
        long = {"text": "Count forever:", "sampling_params": {"max_new_tokens": 100000, "ignore_eos": True}}
        results = []

        def run():
            results.append(s.post("/generate", long))

        threads = [threading.Thread(target=run) for _ in range(5)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join()
        statuses = sorted(r[0] for r in results)
        assert 429 in statuses, statuses
        limited = next(r for r in results if r[0] == 429)
        assert limited[1].get("retry-after") == "1"
        assert limited[2]["error"]["type"] == "rate_limit_error"
        timed_out = [r for r in results if r[0] == 504]
        assert timed_out and timed_out[0][2]["error"]["type"] == "timeout"
        # the engine counts each abort when it next reads its messages: wait for all of them
        deadline = time.time() + 10
        while s.metric("sglang_aborted_requests_total", {"reason": "timeout"}) < len(timed_out) and time.time() < deadline:
            time.sleep(0.05)
        assert s.metric("sglang_aborted_requests_total", {"reason": "timeout"}) == len(timed_out)
        assert s.metric("sglang_request_queue_length") == 0
        # still serving
        ok = s.post("/generate", {"text": "Hi", "sampling_params": {"max_new_tokens": 2}})
        assert ok[0] == 200
    finally:
        assert s.stop() == 0


def stream_socket(server, body):
    sock = socket.create_connection(("127.0.0.1", server.port))
    data = json.dumps(body).encode()
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_a_client_leaving_a_queued_stream_frees_its_place_at_once():
    # the queued stream has sent nothing yet: only the connection's close says it is gone
    s = Server("--max-running-requests", "1")
    try:
        running = stream_socket(s, {"text": "Count:", "stream": True, "sampling_params": {
            "max_new_tokens": 100000, "ignore_eos": True, "temperature": 0}})
        running.recv(4096)

        def wait_for(name, value):
            deadline = time.time() + 10
            while s.metric(name) != value and time.time() < deadline:
                time.sleep(0.02)
            assert s.metric(name) == value, name

        wait_for("sglang_num_running_requests", 1)
        queued = stream_socket(s, {"text": "Other:", "stream": True, "sampling_params": {"max_new_tokens": 4}})
        wait_for("sglang_request_queue_length", 1)
        queued.close()
        wait_for("sglang_request_queue_length", 0)  # else the queued request outlived its client
        assert s.metric("sglang_aborted_requests_total", {"reason": "client_disconnected"}) == 1
        assert s.metric("sglang_num_running_requests") == 1, "the running stream goes on"
        running.close()
    finally:
        assert s.stop() == 0
