"""A server built with the `cuda` feature, on a machine without a GPU: `--device cuda` stops
start-up with the reason, `--device auto` serves on the CPU (run by scripts/test-cuda-build.sh
with SGLANG_SERVER_BIN pointing at that build)."""

import subprocess

from sglang_testing import BINARY, MODEL, Server, free_port


def test_device_cuda_without_a_driver_is_refused_with_the_reason():
    out = subprocess.run([str(BINARY), "--model-path", str(MODEL), "--port", str(free_port()), "--device", "cuda"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "--device cuda" in out.stderr and "libcuda" in out.stderr, out.stderr


def test_auto_serves_on_the_cpu():
    s = Server("--device", "auto", "--admin-api-key", "a")
    try:
        _, _, info = s.request("GET", "/get_server_info", headers={"Authorization": "Bearer a"})
        assert info["cuda_build"] is True, "SGLANG_SERVER_BIN must point at a cuda build"
        assert info["backend"] == "cpu"
        _, _, r = s.post("/generate", {"text": "Hello", "sampling_params": {"max_new_tokens": 4}})
        assert r["meta_info"]["completion_tokens"] == 4
        _, _, h = s.request("GET", "/health")
        assert h["checks"]["gpu"]["gpu_available"] is False
    finally:
        s.stop()
