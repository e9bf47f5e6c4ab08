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
ROUTER_BINARY = Path(os.environ.get("SGLANG_ROUTER_BIN", ROOT / "target" / "release" / "sglang-router"))
MODEL = Path(os.environ.get("SGLANG_TEST_MODEL", ROOT / "models" / "SmolLM2-135M-Instruct"))


def auto_dtype():
    """What `--dtype auto` is on this CPU: bfloat16 where the server's kernels multiply bf16
    natively (AVX-512 BF16, unless SGLANG_CPU_ISA caps them lower), else float32."""
    flags = Path("/proc/cpuinfo").read_text().split()
    native = "avx512_bf16" in flags and os.environ.get("SGLANG_CPU_ISA", "") in ("", "avx512")
    return "bfloat16" if native else "float32"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args, env=None, wait=True, model=MODEL, nofile=None, port=None):
        """`nofile`: the server's open-file limit (soft and hard), to test descriptor
        exhaustion. `port`: a given one (a restart on the same address), else a free one."""
        self.port = port or free_port()
        self.log = tempfile.NamedTemporaryFile("w+", prefix="sglang-server-", suffix=".log", delete=False)
        full_env = dict(os.environ, SGLANG_LOG_LEVEL="info")
        full_env.pop("SGLANG_MODEL_PATH", None)
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            self.command(model, args),
            stdout=self.log, stderr=subprocess.STDOUT, env=full_env,
            preexec_fn=(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))) if nofile else None)
        if wait:
            self.wait_ready()

    def command(self, model, args):
        assert BINARY.exists(), f"build the server first: {BINARY}"
        return [str(BINARY), "--model-path", str(model), "--host", "127.0.0.1", "--port", str(self.port), *args]

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

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


class Router(Server):
    """The real sglang-router binary on a free loopback port in front of `workers` (Servers or
    URLs); ready once its /health is 200 (a worker is in its pool)."""

    def __init__(self, workers, *args, wait=True, env=None):
        """`workers`: None when `args` name them otherwise (--worker-dns)."""
        urls = [w if isinstance(w, str) else w.url for w in workers or []]
        given = ["--worker-urls", ",".join(urls)] if urls else []
        super().__init__(*given, *args, wait=wait, env=env)

    def command(self, model, args):
        assert ROUTER_BINARY.exists(), f"build the router first: {ROUTER_BINARY}"
        return [str(ROUTER_BINARY), "--host", "127.0.0.1", "--port", str(self.port), *args]

    def workers(self):
        """{url: {"healthy", "in_flight"}} as the router sees them."""
        _, _, body = self.request("GET", "/workers")
        return {w["url"]: w for w in body["workers"]}


def cli_generate(prompt, max_new_tokens, chat=False):
    """The CLI's greedy output (the reference the HTTP answers must equal)."""
    args = [str(BINARY), "generate", "--model-path", str(MODEL), "--prompt", prompt,
            "--max-new-tokens", str(max_new_tokens), "--json"]
    if chat:
        args.append("--chat")
    out = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ, SGLANG_LOG="warn"), check=True)
    return json.loads(out.stdout)


class Endpoint(Server):
    """A server this test did not start (in a container, a pod) at 127.0.0.1:`port`: the same
    request helpers, no process."""

    def __init__(self, port):  # noqa: super().__init__ starts a process; this one exists
        self.port = port
        self.proc = None

    def wait_ready(self, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if self.request("GET", "/health", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"nothing healthy at 127.0.0.1:{self.port} after {timeout} s")

    def logs(self):
        return ""

    def stop(self, *_args, **_kw):
        return None


def reference_greedy(prompt, steps, chat=False):
    """The numpy reference's (scripts/reference.py) greedy continuation of `prompt`."""
    with tempfile.TemporaryDirectory() as d:
        out = subprocess.run(
            [str(ROOT / ".venv" / "bin" / "python"), str(ROOT / "scripts" / "reference.py"), "--model", str(MODEL),
             "golden", "--prompts", json.dumps([{"text": prompt, "chat": chat}]), "--steps", str(steps),
             "--out-dir", d], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["results"][0]


def prometheus_value(config_file, target, query, minimum, timeout=60):
    """Runs Debian's Prometheus with deploy/'s `config_file` (alert rules loaded, scraping every
    second) pointed at `target` until `query` reaches `minimum`; returns the last value."""
    import urllib.parse
    import urllib.request

    import yaml

    d = Path(tempfile.mkdtemp())
    cfg = yaml.safe_load(Path(config_file).read_text())
    cfg["global"]["scrape_interval"] = "1s"
    cfg["scrape_configs"][0]["static_configs"][0]["targets"] = [target]
    cfg["rule_files"] = [str(ROOT / "deploy" / "monitoring" / "alerts.yml")]
    (d / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    prom = subprocess.Popen(["prometheus", f"--config.file={d / 'prometheus.yml'}", f"--storage.tsdb.path={d / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    value = 0.0
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and value < minimum:
            try:
                url = f"http://127.0.0.1:{port}/api/v1/query?query={urllib.parse.quote(query)}"
                with urllib.request.urlopen(url, timeout=5) as r:
                    res = json.loads(r.read())["data"]["result"]
                if res:
                    value = float(res[0]["value"][1])
            except OSError:
                pass
            time.sleep(0.5)
    finally:
        prom.terminate()
        prom.wait(10)
    return value
