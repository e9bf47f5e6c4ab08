"""Bad input, keys, health, metrics, start-up and SIGTERM under load."""

import json
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from sglang_testing import Server, auto_dtype

BAD = [
    # (path, raw body, status, field named in the error)
    ("/generate", "{not json", 400, "body"),
    ("/generate", "", 400, "body"),
    ("/generate", json.dumps({"text": "hi", "sampling_params": {"temperature": "hot"}}), 400, "sampling_params.temperature"),
    ("/generate", json.dumps({"text": "hi", "sampling_params": {"top_p": 1.5}}), 400, "top_p"),
    ("/generate", json.dumps({"text": "hi", "sampling_params": {"top_k": -7}}), 400, "top_k"),
    ("/generate", json.dumps({"text": "hi", "sampling_params": {"tempreature": 0.5}}), 400, "sampling_params"),
    ("/generate", json.dumps({"input_ids": [1, -5]}), 400, "input_ids"),
    ("/generate", json.dumps({"input_ids": [1, 999999]}), 400, "input_ids"),
    ("/generate", json.dumps({"text": 5}), 400, "text"),
    ("/generate", json.dumps({}), 400, "text"),
    ("/generate", json.dumps({"text": "word " * 9000}), 400, "input_ids"),
    ("/generate", json.dumps({"text": "hi", "return_logprob": True, "logprob_start_len": "a"}), 400, "logprob_start_len"),
    ("/generate", json.dumps({"text": "hi", "return_logprob": True, "logprob_start_len": 7}), 400, "logprob_start_len"),
    ("/v1/completions", json.dumps({"model": "m"}), 400, "prompt"),
    ("/v1/completions", json.dumps({"model": "m", "prompt": "x", "max_tokens": -1}), 400, "max_tokens"),
    ("/v1/completions", json.dumps({"model": "m", "prompt": "x", "stop": 7}), 400, "stop"),
    ("/v1/completions", json.dumps({"model": "m", "prompt": "x", "logprobs": 50}), 400, "logprobs"),
    ("/v1/chat/completions", json.dumps({"model": "m"}), 400, "messages"),
    ("/v1/chat/completions", json.dumps({"model": "m", "messages": []}), 400, "messages"),
    ("/v1/chat/completions", json.dumps({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}), 400, "messages[0].role"),
    ("/v1/chat/completions", json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": -2}), 400, "temperature"),
    ("/v1/chat/completions", json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 0}), 400, "n"),
    ("/v1/chat/completions", json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}), 400, "tools"),
    ("/tokenize", json.dumps({}), 400, "prompt"),
    ("/detokenize", json.dumps({"tokens": "abc"}), 400, "tokens"),
]


def test_bad_input_table(server):
    for path, raw, status, field in BAD:
        got, _, body = server.request("POST", path, raw=raw)
        assert got == status, (path, raw[:80], got, body)
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert field in (err["param"] or "") or field in err["message"], (path, raw[:80], err)
    # a prompt longer than the context names the limit
    _, _, body = server.request("POST", "/generate", raw=json.dumps({"text": "word " * 9000}))
    assert "context length" in body["error"]["message"]
    # too large: refused from the Content-Length, before the body is read
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 9437184\r\n\r\n{\"text\": \"")
    reply = sock.recv(65536).decode()
    sock.close()
    assert reply.startswith("HTTP/1.1 413"), reply
    assert "larger than the limit" in reply
    # a body over the limit without a Content-Length (chunked) is cut off too
    chunk = b"x" * (1024 * 1024)
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    try:
        for _ in range(10):
            sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
    except OSError:
        pass
    reply = sock.recv(65536).decode()
    sock.close()
    assert reply.startswith("HTTP/1.1 413"), reply[:200]
    # wrong method, unknown route
    assert server.request("GET", "/generate")[0] == 405
    assert server.request("GET", "/nope")[0] == 404
    # the server keeps serving, and probes are fine
    status, _, r = server.post("/generate", {"text": "Hi", "sampling_params": {"max_new_tokens": 2}})
    assert status == 200 and len(r["output_ids"]) == 2
    assert server.request("GET", "/health")[0] == 200


def test_keys():
    s = Server("--api-key", "user-key", "--admin-api-key", "admin-key")
    try:
        body = {"text": "Hi", "sampling_params": {"max_new_tokens": 1}}
        assert s.post("/generate", body)[0] == 401
        assert s.post("/generate", body, headers={"Authorization": "Bearer wrong"})[0] == 401
        assert s.post("/generate", body, headers={"Authorization": "Bearer user-key"})[0] == 200
        assert s.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})[0] == 401
        assert s.request("GET", "/config", headers={"Authorization": "Bearer user-key"})[0] == 401
        status, _, cfg = s.request("GET", "/config", headers={"Authorization": "Bearer admin-key"})
        assert status == 200
        assert s.post("/flush_cache", {}, headers={"Authorization": "Bearer user-key"})[0] == 401
        for path in ["/health", "/health_generate", "/metrics"]:
            assert s.request("GET", path)[0] == 200, path
        assert "user-key" not in json.dumps(cfg) and "admin-key" not in json.dumps(cfg)
        assert "user-key" not in s.logs() and "admin-key" not in s.logs()
    finally:
        s.stop()


def test_empty_keys_in_the_environment_mean_no_key():
    # compose passes `SGLANG_API_KEY: ${SGLANG_API_KEY:-}`: empty when the operator sets none
    s = Server(env={"SGLANG_API_KEY": "", "SGLANG_ADMIN_API_KEY": ""})
    try:
        body = {"text": "Hi", "sampling_params": {"max_new_tokens": 1}}
        assert s.post("/generate", body)[0] == 200
        # as without the variables: no key at all, admin routes open too
        assert s.request("GET", "/config")[0] == 200
    finally:
        s.stop()


def test_health_and_metrics(server):
    status, _, h = server.request("GET", "/health")
    assert status == 200 and h["status"] in ("healthy", "degraded")
    assert {"status", "timestamp", "uptime", "version", "checks"} <= set(h)
    assert set(h["checks"]) == {"basic", "memory", "gpu", "model", "performance", "parallel"}
    assert h["checks"]["gpu"]["status"] == "not available"
    status, _, g = server.request("GET", "/health_generate")
    assert status == 200 and g["status"] == "healthy"
    _, headers, text = server.request("GET", "/metrics")
    assert headers["content-type"].startswith("text/plain")
    for name in ["sglang_requests_total", "sglang_request_duration_seconds", "sglang_time_to_first_token_seconds",
                 "sglang_inter_token_latency_seconds", "sglang_queue_time_seconds", "sglang_prompt_tokens_total",
                 "sglang_generation_tokens_total", "sglang_cache_hits_total", "sglang_cache_misses_total",
                 "sglang_request_queue_length", "sglang_num_running_requests", "sglang_kv_cache_size_bytes",
                 "sglang_kv_cache_used_tokens", "sglang_kv_cache_evictable_tokens", "sglang_kv_cache_available_tokens",
                 "sglang_memory_usage_bytes", "sglang_aborted_requests_total", "sglang_cuda_graph_replays_total"]:
        assert f"# TYPE {name} " in text, name
    assert 'sglang_requests_total{endpoint="/health",status="200"}' in text


def test_starting_then_healthy():
    # a dummy-weight model big enough that loading takes a moment
    d = Path(tempfile.mkdtemp())
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 1024, "intermediate_size": 4096,
        "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 4, "vocab_size": 49152,
        "max_position_embeddings": 2048, "tie_word_embeddings": True}))
    src = Path(__file__).resolve().parents[2] / "models" / "SmolLM2-135M-Instruct"
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        (d / f).write_text((src / f).read_text())
    s = Server("--load-format", "dummy", "--max-total-tokens", "1024", model=d, wait=False)
    try:
        seen = set()
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                status, _, h = s.request("GET", "/health", timeout=2)
            except OSError:
                time.sleep(0.02)
                continue
            seen.add((status, h["status"]))
            if status == 200:
                break
            code = s.request("POST", "/generate", raw='{"text": "x"}')[0]
            # 200 only when loading finished between the two requests
            assert code == 503 or s.request("GET", "/health", timeout=2)[0] == 200, code
            time.sleep(0.02)
        assert (503, "starting") in seen, seen
        assert any(st == 200 for st, _ in seen), seen
    finally:
        s.stop()


def test_sigterm_under_load_drains_and_exits_zero():
    # a drain window well past the work (800 tokens), so a busy machine does not cut it short
    s = Server("--shutdown-timeout", "300")
    results = {i: [] for i in range(4)}

    def run(i):
        for event in s.stream("/generate", {"text": f"Story {i}:", "stream": True,
                                            "sampling_params": {"max_new_tokens": 200, "ignore_eos": True}}):
            results[i].append(event)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    # all in flight (each has streamed a token), however fast the machine
    deadline = time.time() + 60
    while not all(results.values()) and time.time() < deadline:
        time.sleep(0.01)
    assert all(results.values())
    s.proc.send_signal(signal.SIGTERM)
    deadline = time.time() + 10
    while s.request("GET", "/health")[2]["status"] != "draining" and time.time() < deadline:
        time.sleep(0.01)
    status, _, body = s.post("/generate", {"text": "late", "sampling_params": {"max_new_tokens": 2}})
    assert status == 503 and body["error"]["type"] == "service_unavailable"
    assert s.request("GET", "/health")[2]["status"] == "draining"
    for t in threads:
        t.join()
    code = s.proc.wait(60)
    assert code == 0, s.logs()
    for i, events in results.items():
        assert events[-1] == "[DONE]", i
        assert events[-2]["meta_info"]["finish_reason"]["type"] == "length", i
        assert len(events[-2]["output_ids"]) == 200


def test_invalid_options_stop_start_up_naming_them():
    from sglang_testing import BINARY, MODEL
    import os
    import subprocess
    cases = [
        (["--port", "99999"], {}, "--port"),
        (["--page-size", "0"], {}, "page-size"),
        (["--mem-fraction-static", "2"], {}, "mem-fraction-static"),
        ([], {"SGLANG_PORT": "abc"}, "--port"),
        ([], {"SGLANG_ENABLE_RADIX_CACHE": "maybe"}, "SGLANG_ENABLE_RADIX_CACHE"),
        (["--model-path", "/nonexistent"], {}, "model-path"),
        (["--log-level", "loud"], {}, "log-level"),
        # 9 query heads and 3 KV heads: 4 ranks can neither split nor replicate them evenly
        (["--tp-size", "4"], {}, "tp-size"),
        ([], {"SGLANG_TP_SIZE": "0"}, "tp-size"),
        ([], {"SGLANG_WORLD_SIZE": "2", "SGLANG_RANK": "1"}, "master-addr"),
        (["--rank", "3"], {}, "rank"),
        (["--world-size", "2", "--tp-size", "3", "--master-addr", "h"], {}, "tp-size"),
        (["--dist-timeout", "0"], {}, "dist-timeout"),
        (["--api-key", ""], {}, "api-key"),
        (["--admin-api-key="], {"SGLANG_ADMIN_API_KEY": ""}, "admin-api-key"),
        (["--quantization", "q3_k"], {}, "--quantization"),
        (["--kv-cache-dtype", "fp8"], {}, "--kv-cache-dtype"),
        ([], {"SGLANG_QUANTIZATION": "q8_0", "SGLANG_TP_SIZE": "3"}, "quantization"),
    ]
    for args, env, needle in cases:
        out = subprocess.run([str(BINARY), "--model-path", str(MODEL), *args], capture_output=True, text=True,
                             env=dict(os.environ, **env), timeout=30)
        assert out.returncode != 0, args
        assert needle in out.stderr, (args, env, out.stderr)


def test_quantization_while_loading():
    """--quantization q4_1 and q4_k on the bf16 safetensors: the server says so, holds about a
    third of the weight bytes, and still answers the golden prompt with its capital."""
    body = {"text": "The capital of France is", "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
    sizes = {}
    for q in (None, "q4_1", "q4_k"):
        s = Server("--admin-api-key", "a", *(["--quantization", q] if q else []))
        try:
            _, _, info = s.request("GET", "/get_server_info", headers={"Authorization": "Bearer a"})
            assert info["quantization"] == q, info
            sizes[q] = info["weight_bytes"]
            _, _, r = s.post("/generate", body)
            assert "Paris" in r["text"], (q, r)
        finally:
            s.stop()
    # Q4_1: 20 bytes per 32 values against 64 for bf16
    assert 0.30 < sizes["q4_1"] / sizes[None] < 0.33, sizes
    # q4_k: Q5_0 (22 bytes per 32) for the 576-wide rows, Q4_K (144 per 256) for down_proj
    assert 0.31 < sizes["q4_k"] / sizes[None] < 0.35, sizes


def test_bf16_kv_cache_halves_the_pool_bytes_and_serves():
    """--kv-cache-dtype bf16: the same tokens in half the bytes, the setting shown in /config,
    and the golden prompt still answered (the numpy comparison is tests/golden.rs)."""
    body = {"text": "The capital of France is", "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
    size = {}
    for dtype in ("auto", "bf16"):
        s = Server("--admin-api-key", "a", "--max-total-tokens", "2048", "--kv-cache-dtype", dtype)
        try:
            _, _, cfg = s.request("GET", "/config", headers={"Authorization": "Bearer a"})
            assert cfg["kv_cache_dtype"] == dtype
            size[dtype] = s.metric("sglang_kv_cache_size_bytes")
            _, _, r = s.post("/generate", body)
            assert "Paris" in r["text"], (dtype, r)
        finally:
            s.stop()
    assert size["auto"] == 2 * size["bf16"] > 0, size


def test_bf16_activations_serve_and_are_reported():
    """--dtype bfloat16 and float32: the setting in /config and /get_server_info, the kernels
    that run it, and the golden prompt still answered through the official OpenAI client (the
    numpy comparison is tests/golden.rs)."""
    import openai

    for dtype, kernels in (("bfloat16", "bf16 x bf16 activations"), ("float32", "(f32/bf16/f16)")):
        s = Server("--admin-api-key", "a", "--dtype", dtype)
        try:
            _, _, cfg = s.request("GET", "/config", headers={"Authorization": "Bearer a"})
            assert cfg["dtype"] == dtype, cfg
            _, _, info = s.request("GET", "/get_server_info", headers={"Authorization": "Bearer a"})
            assert info["dtype"] == dtype, info
            assert kernels in info["cpu_kernels"] and ("bf16 x bf16" in info["cpu_kernels"]) == (dtype == "bfloat16"), info["cpu_kernels"]
            client = openai.OpenAI(base_url=s.url + "/v1", api_key="none")
            r = client.completions.create(model="default", prompt="The capital of France is",
                                          max_tokens=4, temperature=0)
            assert "Paris" in r.choices[0].text, r
        finally:
            s.stop()


def test_auto_dtype_is_bf16_where_the_cpu_multiplies_bf16(server):
    """--dtype auto (the default): /config says auto, /get_server_info says what it stands for
    here: bfloat16 where the kernels have AVX-512 BF16 (`vdpbf16ps`), else float32."""
    auth = {"Authorization": "Bearer admin-secret"}
    _, _, cfg = server.request("GET", "/config", headers=auth)
    assert cfg["dtype"] == "auto", cfg
    _, _, info = server.request("GET", "/get_server_info", headers=auth)
    assert info["dtype"] == auto_dtype(), (info["dtype"], info["cpu_kernels"])
    assert ("vdpbf16ps" in info["cpu_kernels"]) == (auto_dtype() == "bfloat16"), info["cpu_kernels"]


def test_radix_cache_off_by_variable():
    s = Server("--admin-api-key", "a", env={"SGLANG_ENABLE_RADIX_CACHE": "false"})
    try:
        _, _, cfg = s.request("GET", "/config", headers={"Authorization": "Bearer a"})
        assert cfg["enable_radix_cache"] is False
        body = {"text": "shared words " * 40 + "end", "sampling_params": {"max_new_tokens": 2}}
        s.post("/generate", body)
        _, _, r = s.post("/generate", body)
        assert r["meta_info"]["cached_tokens"] == 0
    finally:
        s.stop()



def test_a_bare_gguf_file_serves_alone():
    """`--model-path FILE.gguf` with nothing beside the file: configuration, tokenizer and chat
    template come from the GGUF's metadata, and the official OpenAI client gets the same
    greedy answer as from the same file inside the Hugging Face directory."""
    import openai

    from sglang_testing import MODEL

    gguf = MODEL / "SmolLM2-135M-Instruct.Q4_1.gguf"
    answers = {}
    with tempfile.TemporaryDirectory() as bare, tempfile.TemporaryDirectory() as beside:
        (Path(bare) / gguf.name).symlink_to(gguf)
        for f in ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", gguf.name]:
            (Path(beside) / f).symlink_to(MODEL / f)
        for name, model in [("bare", Path(bare) / gguf.name), ("beside", Path(beside))]:
            s = Server(model=model)
            try:
                client = openai.OpenAI(base_url=f"http://127.0.0.1:{s.port}/v1", api_key="none")
                r = client.chat.completions.create(
                    model="default", temperature=0, max_tokens=24,
                    messages=[{"role": "user", "content": "Name a primary color."}])
                answers[name] = (r.choices[0].message.content, r.choices[0].finish_reason,
                                 r.usage.prompt_tokens)
            finally:
                s.stop()
    assert answers["bare"] == answers["beside"], answers
    assert answers["bare"][0].strip(), answers
