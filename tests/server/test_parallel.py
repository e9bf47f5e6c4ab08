"""Tensor parallelism through the server: ranks as threads (--tp-size), and ranks as processes
(rank 0 serves HTTP, rank 1 is a second sglang-server that joins it over TCP). Same answers as
one rank; a rank that dies or never arrives makes rank 0 report unhealthy and exit with the
reason; a clean stop ends every process."""

import os
import signal
import subprocess
import tempfile
import time

import pytest

from sglang_testing import BINARY, MODEL, Server, auto_dtype, free_port

BODY = {"text": "The three primary colors are", "sampling_params": {"max_new_tokens": 24, "temperature": 0}}


def start_rank(rank, port, *extra):
    log = tempfile.NamedTemporaryFile("w+", prefix=f"sglang-rank{rank}-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [str(BINARY), "--model-path", str(MODEL), "--world-size", "2", "--rank", str(rank),
         "--master-addr", "127.0.0.1", "--master-port", str(port), *extra],
        stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, SGLANG_LOG_LEVEL="info"))
    return proc, log


def read(log):
    log.flush()
    with open(log.name) as f:
        return f.read()


def group(*extra):
    port = free_port()
    worker, wlog = start_rank(1, port, *extra)
    head = Server("--world-size", "2", "--rank", "0", "--master-addr", "127.0.0.1",
                  "--master-port", str(port), "--admin-api-key", "a", *extra)
    return head, worker, wlog


# f32 inputs on every side: ranks sum the row-parallel products in parts, which moves the
# logits by ~1e-6, and bf16 inputs (`auto` on CPUs with AVX-512 BF16) would round that into
# ~1e-2 and could part the texts at a near tie
F32 = ("--dtype", "float32")


@pytest.fixture(scope="module")
def one_rank():
    s = Server(*F32)
    yield s
    s.stop()


def answers_like_one_rank(reference, s, ranks):
    """`s` (admin key "a") gives `reference`'s greedy answer and reports `ranks` ready ranks."""
    _, _, want = reference.post("/generate", BODY)
    _, _, got = s.post("/generate", BODY)
    assert got["text"] == want["text"]
    _, _, health = s.request("GET", "/health")
    assert health["checks"]["parallel"] == {"tp_size": ranks, "ranks_ready": ranks, "error": None}
    _, _, info = s.request("GET", "/get_server_info", headers={"Authorization": "Bearer a"})
    assert info["tensor_parallel"]["ranks"] == ranks
    metrics = s.request("GET", "/metrics")[2]
    assert f"sglang_tp_ranks {ranks}" in metrics and f"sglang_tp_ranks_ready {ranks}" in metrics
    return info


def test_three_thread_ranks_answer_like_one(one_rank):
    s = Server("--tp-size", "3", "--admin-api-key", "a", *F32)
    try:
        assert answers_like_one_rank(one_rank, s, 3)["tp_size"] == 3
    finally:
        s.stop()


def test_two_processes_answer_like_one_and_stop_together(one_rank):
    head, worker, wlog = group(*F32)
    try:
        assert answers_like_one_rank(one_rank, head, 2)["world_size"] == 2
        assert head.stop() == 0
        assert worker.wait(30) == 0, read(wlog)
        assert "rank 0 stopped the group" in read(wlog)
    finally:
        head.stop()
        if worker.poll() is None:
            worker.kill()


def test_a_rank_that_dies_makes_rank_0_unhealthy_then_exit():
    head, worker, wlog = group()
    try:
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
        deadline = time.time() + 20
        seen = None
        while time.time() < deadline and head.proc.poll() is None:
            try:
                status, _, h = head.request("GET", "/health", timeout=2)
                if status == 503:
                    seen = h
            except OSError:
                pass
            time.sleep(0.2)
        assert seen is not None and seen["status"] == "unhealthy", seen
        assert "rank 1" in seen["checks"]["parallel"]["error"]
        assert head.proc.wait(20) == 1
        assert "the engine failed" in head.logs() and "rank 1" in head.logs()
    finally:
        head.stop()
        if worker.poll() is None:
            worker.kill()


def test_a_rank_that_never_arrives_is_named_and_rank_0_exits():
    port = free_port()
    started = time.time()
    out = subprocess.run(
        [str(BINARY), "--model-path", str(MODEL), "--port", str(free_port()), "--world-size", "2",
         "--rank", "0", "--master-addr", "127.0.0.1", "--master-port", str(port), "--dist-timeout", "2"],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "rank(s) 1 did not join within 2s" in out.stderr, out.stderr
    assert time.time() - started < 30


def refused_rank_1(rank_1_args, reason):
    """Starts rank 1 with `rank_1_args` and rank 0 with the default model: rank 0 must refuse
    rank 1 naming it and `reason`, and both must exit 1."""
    port = free_port()
    worker = subprocess.Popen(
        [str(BINARY), *rank_1_args, "--world-size", "2", "--rank", "1", "--master-addr", "127.0.0.1",
         "--master-port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = subprocess.run(
        [str(BINARY), "--model-path", str(MODEL), "--port", str(free_port()), "--world-size", "2",
         "--rank", "0", "--master-addr", "127.0.0.1", "--master-port", str(port), "--dist-timeout", "20"],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "rank 1" in out.stderr and reason in out.stderr, out.stderr
    _, werr = worker.communicate(timeout=30)
    assert worker.returncode == 1 and "refused" in werr, werr


def test_a_rank_with_another_model_shape_is_refused(tmp_path):
    import json
    import shutil
    other = tmp_path / "other"
    other.mkdir()
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(MODEL / f, other / f)
    cfg = json.loads((MODEL / "config.json").read_text())
    cfg["num_hidden_layers"] = 2
    (other / "config.json").write_text(json.dumps(cfg))
    refused_rank_1(["--model-path", str(other), "--load-format", "dummy"], "different model")


def test_a_rank_with_other_numerics_is_refused():
    # the same model, but rank 1's products take other inputs than rank 0's `auto` (bf16 where
    # f32, or f32 where bf16): the ranks' partial sums would not add up to one model's, so
    # rank 0 refuses it by name
    other = "float32" if auto_dtype() == "bfloat16" else "bfloat16"
    refused_rank_1(["--model-path", str(MODEL), "--dtype", other], "--dtype")
