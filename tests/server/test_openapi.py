"""The API described and fuzzed: `GET /openapi.json` serves the shipped description, and a
bounded schemathesis pass (generated from that description, valid and invalid requests alike)
over every route against the real server gets no 5xx and only documented statuses, leaves the server healthy and holds no
KV pages afterwards. vLLM runs the same kind of pass in its CI.

`SGLANG_FUZZ_EXAMPLES` sets the examples per route (default 200)."""

import json
import os
import re
import time

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import content_type_conformance, not_a_server_error, status_code_conformance
from sglang_testing import ROOT, Server

SPEC = ROOT / "server" / "src" / "http" / "openapi.json"
EXAMPLES = int(os.environ.get("SGLANG_FUZZ_EXAMPLES", "200"))
# No 5xx; every status and content type the server answers is one the description documents.
# (The description is looser than the server's validation, e.g. it does not say which fields
# exclude each other, so schema-valid requests may still be 400s: positive_data_acceptance and
# response_schema_conformance are not run.)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance]

schema = schemathesis.openapi.from_path(SPEC)


@pytest.fixture(scope="module")
def fuzzed():
    # A short context bounds every generated request's work (prompt + output at most 64 tokens,
    # longer prompts are a 400), and a small fan-out cap bounds `n` and batched prompts.
    s = Server(
        "--context-length", "64",
        "--max-sequences-per-request", "4",
        "--admin-api-key", "admin-secret",
    )
    yield s
    s.stop()


def test_openapi_json_is_the_shipped_description(fuzzed):
    status, headers, body = fuzzed.request("GET", "/openapi.json")
    assert status == 200
    assert headers["content-type"].startswith("application/json")
    assert body == json.loads(SPEC.read_text())
    # Every route the description names answers something other than 404 (routes that the
    # router knows but the description does not are caught by the server's own unit test).
    for path, ops in body["paths"].items():
        concrete = re.sub(r"\{[^}]+\}", "resp_missing", path)
        for method in ops:
            if method == "parameters":
                continue
            status, _, _ = fuzzed.request(method.upper(), concrete, body={} if method == "post" else None)
            assert status != 404 or "{" in path, f"{method.upper()} {path} -> 404"


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_fuzzed_requests_get_no_server_error(case, fuzzed):
    case.call_and_validate(
        base_url=f"http://127.0.0.1:{fuzzed.port}",
        checks=CHECKS,
        timeout=60,
    )


def test_server_whole_after_fuzzing(fuzzed):
    status, _, _ = fuzzed.request("GET", "/health")
    assert status == 200
    # Every sequence has finished and released its pages: nothing runs, nothing waits, no
    # KV slot is held by a request, and flushing the radix cache empties the pool.
    deadline = time.time() + 10
    while True:
        _, _, metrics = fuzzed.request("GET", "/metrics")
        running = _gauge(metrics, "sglang_num_running_requests")
        queued = _gauge(metrics, "sglang_request_queue_length")
        if (running, queued) == (0, 0) or time.time() > deadline:
            break
        time.sleep(0.1)
    assert (running, queued) == (0, 0), metrics
    assert _gauge(metrics, "sglang_kv_cache_used_tokens") == 0, metrics
    admin = {"Authorization": "Bearer admin-secret"}
    status, _, _ = fuzzed.request("POST", "/flush_cache", headers=admin)
    assert status == 200
    _, _, metrics = fuzzed.request("GET", "/metrics")
    assert _gauge(metrics, "sglang_kv_cache_evictable_tokens") == 0, metrics
    status, _, body = fuzzed.post("/generate", {"text": "Hello", "sampling_params": {"max_new_tokens": 4, "temperature": 0}})
    assert status == 200 and body["meta_info"]["completion_tokens"] == 4, body


def _gauge(text, name):
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics:\n{text}")
