"""Helpers for the Python tests: the real sglang-server binary on a free loopback port with the
default model, and small HTTP helpers built on the standard library (so a test controls
sockets exactly, e.g. to disconnect mid-stream)."""

import http.client
import json
import os
import resource
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BINARY = Path(os.environ.get("SGLANG_SERVER_BIN", ROOT / "target" / "release" / "sglang-server"))
MODEL = Path(os.environ.get("SGLANG_TEST_MODEL", ROOT / "models" / "SmolLM2-135M-Instruct"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args, env=None, wait=True, model=MODEL, nofile=None):
        """`nofile`: the server's open-file limit (soft and hard), to test descriptor
        exhaustion."""
        assert BINARY.exists(), f"build the server first: {BINARY}"
        self.port = free_port()
        self.log = tempfile.NamedTemporaryFile("w+", prefix="sglang-server-", suffix=".log", delete=False)
        full_env = dict(os.environ, SGLANG_LOG_LEVEL="info")
        full_env.pop("SGLANG_MODEL_PATH", None)
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [str(BINARY), "--model-path", str(model), "--host", "127.0.0.1", "--port", str(self.port), *args],
            stdout=self.log, stderr=subprocess.STDOUT, env=full_env,
            preexec_fn=(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))) if nofile else None)
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                status, _, _ = self.request("GET", "/health", timeout=2)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready:\n{self.logs()}")

    def logs(self):
        self.log.flush()
        return Path(self.log.name).read_text()

    def conn(self, timeout=120):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method, path, body=None, headers=None, timeout=120, raw=None):
        c = self.conn(timeout)
        data = raw if raw is not None else (json.dumps(body) if body is not None else None)
        h = {"Content-Type": "application/json"}
        h.update(headers or {})
        c.request(method, path, body=data, headers=h)
        r = c.getresponse()
        text = r.read().decode()
        c.close()
        try:
            payload = json.loads(text)
        except ValueError:
            payload = text
        return r.status, {k.lower(): v for k, v in r.getheaders()}, payload

    def post(self, path, body, **kw):
        return self.request("POST", path, body, **kw)

    def stream(self, path, body, headers=None):
        """Yields the decoded `data:` payloads of an SSE response (strings for [DONE])."""
        c = self.conn()
        h = {"Content-Type": "application/json"}
        h.update(headers or {})
        c.request("POST", path, body=json.dumps(body), headers=h)
        r = c.getresponse()
        assert r.status == 200, r.read()
        buf = b""
        try:
            while True:
                line = r.fp.readline()
                if not line:
                    return
                line = line.strip()
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].decode()
                if data == "[DONE]":
                    yield data
                    return
                yield json.loads(data)
        finally:
            c.close()

    def metric(self, name, labels=None):
        _, _, text = self.request("GET", "/metrics")
        total = 0.0
        for line in text.splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            head, value = line.rsplit(" ", 1)
            if head.split("{")[0] != name:
                continue
            if labels and not all(f'{k}="{v}"' in head for k, v in labels.items()):
                continue
            total += float(value)
        return total

    def stop(self, sig=signal.SIGTERM, timeout=60):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def cli_generate(prompt, max_new_tokens, chat=False):
    """The CLI's greedy output (the reference the HTTP answers must equal)."""
    args = [str(BINARY), "generate", "--model-path", str(MODEL), "--prompt", prompt,
            "--max-new-tokens", str(max_new_tokens), "--json"]
    if chat:
        args.append("--chat")
    out = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ, SGLANG_LOG="warn"), check=True)
    return json.loads(out.stdout)
