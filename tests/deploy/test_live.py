"""Against the live server: every metric name the dashboards, alert rules and HPA use is
exported; a real Prometheus scrapes it; nginx balances two replicas and survives one stopping;
the tensor-parallel head and worker of the swarm stack and of the Kubernetes StatefulSets,
started with exactly their environment and command, form a group."""

import json
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from sglang_testing import ROOT, Server, free_port, prometheus_value

DEPLOY = ROOT / "deploy"
# Registered only by a backend with a GPU (checked in src/metrics.rs tests); this server has none.
GPU_ONLY = {"sglang_gpu_utilization_percent"}


def used_metric_names():
    exprs = []
    dash = json.loads((DEPLOY / "monitoring" / "grafana" / "dashboards" / "sglang.json").read_text())
    exprs += [t["expr"] for p in dash["panels"] for t in p["targets"]]
    rules = yaml.safe_load((DEPLOY / "monitoring" / "alerts.yml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    hpa = yaml.safe_load((DEPLOY / "k8s" / "hpa.yaml").read_text())
    exprs += [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    return {n for e in exprs for n in re.findall(r"\bsglang_[a-z_]+", e)}


def exported(server):
    _, _, text = server.request("GET", "/metrics")
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line.startswith("sglang_")}


def test_every_used_metric_is_exported():
    s = Server()
    try:
        s.post("/generate", {"text": "Hi", "sampling_params": {"max_new_tokens": 2}})
        s.post("/generate", {"text": "Hi", "sampling_params": {"max_new_tokens": 2}})
        names = used_metric_names()
        assert len(names) >= 15, names
        have = exported(s)
        missing = names - have - GPU_ONLY
        assert not missing, f"used in deploy/ but not exported: {sorted(missing)}"
        assert s.request("GET", "/health")[2]["checks"]["gpu"]["gpu_available"] is False
    finally:
        s.stop()


def test_prometheus_scrapes_the_server():
    s = Server()
    try:
        for _ in range(3):
            assert s.post("/generate", {"text": "Hello", "sampling_params": {"max_new_tokens": 2}})[0] == 200
        query = 'sum(sglang_requests_total{job="sglang",endpoint="/generate"})'
        value = prometheus_value(DEPLOY / "monitoring" / "prometheus.yml", f"127.0.0.1:{s.port}", query, 3)
        assert value >= 3, value
    finally:
        s.stop()


def generate_count(server):
    return server.metric("sglang_requests_total", {"endpoint": "/generate", "status": "200"})


def test_nginx_balances_two_replicas_and_survives_one_stopping():
    a, b = Server(), Server()
    nginx = None
    try:
        d = Path(tempfile.mkdtemp())
        shutil.copy(DEPLOY / "nginx" / "nginx.conf", d / "nginx.conf")
        port = free_port()
        conf = (d / "nginx.conf").read_text().replace("listen 8080;", f"listen 127.0.0.1:{port};")
        conf = conf.replace("pid /tmp/nginx.pid;", f"pid {d}/nginx.pid;")
        for tmp in ["client-body", "proxy", "fastcgi", "uwsgi", "scgi"]:
            conf = conf.replace(f"/tmp/nginx-{tmp}", f"{d}/{tmp}")
        (d / "nginx.conf").write_text(conf)
        (d / "upstream.conf").write_text(f"server 127.0.0.1:{a.port} max_fails=2 fail_timeout=10s;\n"
                                         f"server 127.0.0.1:{b.port} max_fails=2 fail_timeout=10s;\n")
        nginx = subprocess.Popen(["nginx", "-c", str(d / "nginx.conf"), "-g", "daemon off;"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        body = json.dumps({"text": "Hello", "sampling_params": {"max_new_tokens": 2}}).encode()

        def via_nginx():
            req = urllib.request.Request(f"http://127.0.0.1:{port}/generate", data=body, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())

        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/nginx-health", timeout=2)
                break
            except OSError:
                time.sleep(0.1)
        for _ in range(12):
            status, r = via_nginx()
            assert status == 200 and len(r["output_ids"]) == 2
        assert generate_count(a) > 0 and generate_count(b) > 0, "both replicas served"
        assert b.stop() == 0
        for _ in range(8):
            status, r = via_nginx()
            assert status == 200 and len(r["output_ids"]) == 2
    finally:
        if nginx:
            nginx.send_signal(signal.SIGQUIT)
            nginx.wait(10)
        a.stop()
        b.stop()


def group_env(env, model, port):
    """A deploy file's environment, pointed at this machine."""
    env = {k: str(v) for k, v in env.items()}
    env.update(SGLANG_MODEL_PATH=str(model), SGLANG_MASTER_ADDR="127.0.0.1", SGLANG_MASTER_PORT=str(port),
               SGLANG_PORT=str(free_port()), SGLANG_HOST="127.0.0.1")
    return env


def start_group(head_env, worker_cmd, worker_env):
    import os
    from sglang_testing import BINARY, MODEL
    port = free_port()
    wenv = dict(os.environ, **group_env(worker_env, MODEL, port))
    wenv["PATH"] = f"{BINARY.parent}:{wenv['PATH']}"
    worker = subprocess.Popen(worker_cmd, env=wenv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    henv = group_env(head_env, MODEL, port)
    head_args = ["--world-size", henv.pop("SGLANG_WORLD_SIZE"), "--rank", henv.pop("SGLANG_RANK"),
                 "--master-port", henv.pop("SGLANG_MASTER_PORT"), "--master-addr", henv.pop("SGLANG_MASTER_ADDR")]
    head = Server(*head_args, env={k: v for k, v in henv.items() if k not in ("SGLANG_HOST", "SGLANG_PORT")})
    return head, worker


def check_group(head, worker, world):
    try:
        _, _, h = head.request("GET", "/health")
        assert h["checks"]["parallel"] == {"tp_size": world, "ranks_ready": world, "error": None}
        _, _, r = head.post("/generate", {"text": "Hello", "sampling_params": {"max_new_tokens": 4}})
        assert r["meta_info"]["completion_tokens"] == 4
        assert head.stop() == 0
        out, _ = worker.communicate(timeout=30)
        assert worker.returncode == 0, out
    finally:
        head.stop()
        if worker.poll() is None:
            worker.kill()


def test_swarm_stack_head_and_worker_form_a_group():
    from sglang_testing import BINARY
    services = yaml.safe_load((DEPLOY / "docker-stack.yml").read_text())["services"]
    head_env = services["sglang-head"]["environment"]
    worker_env = dict(services["sglang-worker"]["environment"])
    # swarm fills the template with the task slot: 1 for the first (only) worker replica
    worker_env["SGLANG_RANK"] = worker_env["SGLANG_RANK"].replace("{{.Task.Slot}}", "1")
    head, worker = start_group(head_env, [str(BINARY)], worker_env)
    check_group(head, worker, int(head_env["SGLANG_WORLD_SIZE"]))


def test_kubernetes_statefulsets_form_a_group():
    def load(name):
        return yaml.safe_load((DEPLOY / "k8s" / "tensor-parallel" / name).read_text())

    def container(name):
        return load(name)["spec"]["template"]["spec"]["containers"][0]

    def env(c):
        return {e["name"]: e["value"] for e in c["env"] if "value" in e}

    # the launch script from the ConfigMap, where the pods mount it
    script_dir = Path(tempfile.mkdtemp())
    (script_dir / "launch.sh").write_text(load("launch.yaml")["data"]["launch.sh"])
    head_c, worker_c = container("head.yaml"), container("worker.yaml")
    assert head_c["command"][-1] == "head" and worker_c["command"][-1] == "worker"
    cmd = [a.replace("/etc/sglang", str(script_dir)) for a in worker_c["command"]]
    worker_env = env(worker_c)
    worker_env["HOSTNAME"] = "sglang-tp-worker-0"  # pod 0 of the worker StatefulSet: rank 1
    head_env = dict(env(head_c), SGLANG_RANK="0")  # what launch.sh sets for the head
    head, worker = start_group(head_env, cmd, worker_env)
    check_group(head, worker, int(head_env["SGLANG_WORLD_SIZE"]))
