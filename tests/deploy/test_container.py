"""The deployment kit's containers, built and run for real with podman, the way an operator
would: the CPU image (the host's release build and model, deploy/Dockerfile.cpu-prebuilt, built
by scripts/container-image.sh), the Kubernetes pod spec (`podman kube play` of
deploy/k8s/deployment.yaml) and the compose service (podman-compose of deploy/docker-compose.yml
with deploy/docker-compose.cpu.yml).

No registry is needed: without one, the Debian base image is made from Debian's packages
(mmdebstrap). Every podman call gets open-file and process limits no higher than this machine's
(a sandbox may refuse the engine's defaults) through a containers.conf of the test's own, and
the runc runtime where installed. The tests skip, saying why, only where podman cannot run at
all; scripts/system-deps.sh installs podman, runc, catatonit and mmdebstrap as root."""

import json
import os
import resource
import shutil
import subprocess
import threading
import time

import pytest
import yaml

from sglang_testing import MODEL, ROOT, Endpoint, free_port, prometheus_value, reference_greedy

DEPLOY = ROOT / "deploy"
TAG = "localhost/sglang-rs:cpu-test"
PROMPT = "What are the three primary colors? Answer briefly."
STEPS = 16


def podman(env, *args, check=True, timeout=180):
    out = subprocess.run(["podman", *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert out.returncode == 0, f"podman {' '.join(map(str, args))} -> {out.returncode}:\n{out.stdout}\n{out.stderr}"
    return out


def exec_in(env, name, script):
    return podman(env, "exec", name, "sh", "-c", script, check=False)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (scripts/system-deps.sh installs it when run as root)")
    limit = lambda r: min(resource.getrlimit(r)[1] if resource.getrlimit(r)[1] > 0 else 16384, 16384)  # noqa: E731
    nofile, nproc = limit(resource.RLIMIT_NOFILE), limit(resource.RLIMIT_NPROC)
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text(
        "[containers]\n"
        f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
        "[engine]\n" + ('runtime = "runc"\n' if shutil.which("runc") else ""))
    e = dict(os.environ, CONTAINERS_CONF=str(conf), CONTAINER_ENGINE="podman",
             CONTAINER_ULIMITS=f"--ulimit nofile={nofile}:{nofile} --ulimit nproc={nproc}:{nproc}")
    info = subprocess.run(["podman", "info"], env=e, capture_output=True, text=True)
    if info.returncode != 0:
        pytest.skip(f"podman cannot run here: {info.stderr.strip()[-400:]}")
    return e


@pytest.fixture(scope="module")
def image(env):
    t0 = time.time()
    out = subprocess.run([ROOT / "scripts" / "container-image.sh", TAG], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.strip().splitlines()[-1] == TAG
    size = int(podman(env, "image", "inspect", TAG, "--format", "{{.Size}}").stdout)
    base = podman(env, "image", "inspect", "debian:bookworm-slim", "--format", "{{.Size}}", check=False)
    if base.returncode != 0:
        base = podman(env, "image", "inspect", "localhost/debian:bookworm-slim", "--format", "{{.Size}}")
    added = podman(env, "run", "--rm", "--entrypoint", "du", TAG, "-sb", "/usr/local/bin/sglang-server",
                   "/models").stdout.split()
    floor = int(base.stdout) + int(added[0]) + int(added[2])
    print(f"\nimage {TAG}: {size / 1e6:.1f} MB; base + binary + model {floor / 1e6:.1f} MB "
          f"(ratio {size / floor:.3f}, goal <= 1.10); built in {time.time() - t0:.1f} s")
    assert size <= 1.10 * floor, (size, floor)
    yield TAG
    podman(env, "rmi", "-f", TAG, check=False)


@pytest.fixture(scope="module")
def reference():
    return reference_greedy(PROMPT, STEPS, chat=True)


def chat_greedy(ep):
    status, _, body = ep.post("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}],
                                                        "max_tokens": STEPS, "temperature": 0})
    assert status == 200, body
    return body["choices"][0]["message"]["content"]


def test_cpu_image_runs_hardened_answers_and_drains(env, image, reference):
    port = free_port()
    name = f"sglang-test-{port}"
    t0 = time.time()
    podman(env, "run", "-d", "--name", name, "--read-only", "--cap-drop=ALL", "--security-opt", "no-new-privileges",
           "-p", f"127.0.0.1:{port}:30000", image)
    try:
        ep = Endpoint(port)
        ep.wait_ready(60)
        print(f"\nready {time.time() - t0:.2f} s after `podman run` (goal <= 10 s)")
        assert chat_greedy(ep) == reference["greedy_text"]
        assert podman(env, "healthcheck", "run", name, check=False).returncode == 0
        assert exec_in(env, name, "id -u; id -g").stdout.split() == ["1000", "1000"]
        status = exec_in(env, name, "cat /proc/1/status").stdout
        assert "CapEff:\t0000000000000000" in status and "NoNewPrivs:\t1" in status, status
        assert exec_in(env, name, "touch /usr/local/bin/x").returncode != 0, "root filesystem is writable"

        # SIGTERM (podman stop) while a stream runs: the stream completes, the exit status is 0
        events, started = [], threading.Event()

        def stream():
            body = {"text": "Tell me a long story.", "stream": True,
                    "sampling_params": {"max_new_tokens": 64, "temperature": 0, "ignore_eos": True}}
            for ev in ep.stream("/generate", body):
                events.append(ev)
                started.set()

        t = threading.Thread(target=stream)
        t.start()
        assert started.wait(30)
        stop = podman(env, "stop", "-t", "60", name)
        t.join(60)
        assert stop.returncode == 0
        assert events[-1] == "[DONE]", events[-3:]
        assert events[-2]["meta_info"]["completion_tokens"] == 64, events[-2]
        assert podman(env, "inspect", name, "--format", "{{.State.ExitCode}}").stdout.strip() == "0"
    finally:
        podman(env, "rm", "-f", name, check=False)


def test_kubernetes_pod_spec_played(env, image, tmp_path):
    """deploy/k8s/deployment.yaml through `podman kube play`, with only what a test must change
    overridden: the image, one replica, a host port, the model volume (a host path instead of
    the PVC), no GPU, and two variables to see that the environment configures the server."""
    manifest = yaml.safe_load((DEPLOY / "k8s" / "deployment.yaml").read_text())
    port = free_port()
    manifest["metadata"]["name"] = f"sglang-kube-{port}"
    manifest["spec"]["replicas"] = 1
    pod = manifest["spec"]["template"]["spec"]
    c = pod["containers"][0]
    c["image"] = image
    c["resources"]["limits"].pop("nvidia.com/gpu")
    named_ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for p in c["ports"]:
        p["hostPort"] = port
    env_vars = {v["name"]: v for v in c["env"]}
    env_vars["SGLANG_MAX_RUNNING_REQUESTS"]["value"] = "7"
    c["env"].append({"name": "SGLANG_SERVED_MODEL_NAME", "value": "kube-played"})
    (models,) = [v for v in pod["volumes"] if v["name"] == "models"]
    models.pop("persistentVolumeClaim")
    models["hostPath"] = {"path": str(MODEL.parent), "type": "Directory"}
    played = tmp_path / "deployment.yaml"
    played.write_text(yaml.safe_dump(manifest))

    t0 = time.time()
    podman(env, "kube", "play", played)
    name = f"sglang-kube-{port}-pod-0-{c['name']}"
    try:
        ep = Endpoint(port)
        # the probes, as the kubelet would run them: httpGet on the named port, success 200-399
        startup = c["startupProbe"]
        ep.wait_ready(startup["periodSeconds"] * startup["failureThreshold"])
        print(f"\npod ready {time.time() - t0:.2f} s after `podman kube play`")
        for kind in ["startupProbe", "livenessProbe", "readinessProbe"]:
            probe = c[kind]["httpGet"]
            assert named_ports[probe["port"]] == 30000
            status, _, body = ep.request("GET", probe["path"], timeout=c[kind]["timeoutSeconds"])
            assert 200 <= status < 400, (kind, status, body)
        # the security context
        sc, psc = c["securityContext"], pod["securityContext"]
        ids = exec_in(env, name, "id -u; id -g").stdout.split()
        assert ids == [str(psc["runAsUser"]), str(psc["runAsGroup"])], ids
        status = exec_in(env, name, "cat /proc/1/status").stdout
        assert "CapEff:\t0000000000000000" in status, status  # capabilities: drop ALL
        assert "NoNewPrivs:\t1" in status, status  # allowPrivilegeEscalation: false
        assert sc["readOnlyRootFilesystem"] and exec_in(env, name, "touch /usr/local/bin/x").returncode != 0
        assert exec_in(env, name, "touch /models/x").returncode != 0, "the model volume is writable"
        assert exec_in(env, name, "touch /tmp/x").returncode == 0, "the /tmp emptyDir is not writable"
        # the environment configures the server
        _, _, models_list = ep.request("GET", "/v1/models")
        assert [m["id"] for m in models_list["data"]] == ["kube-played"]
        _, _, info = ep.request("GET", "/get_server_info")
        assert info["max_running_requests"] == 7, info
        assert info["model_path"] == env_vars["SGLANG_MODEL_PATH"]["value"], info
    finally:
        down = podman(env, "kube", "down", played, check=False)
    assert down.returncode == 0, down.stderr
    assert podman(env, "pod", "exists", f"sglang-kube-{port}-pod-0", check=False).returncode != 0


def test_compose_cpu_service(env, image, reference, tmp_path):
    """The `sglang` service of deploy/docker-compose.yml + docker-compose.cpu.yml under
    podman-compose, with the image and a loopback port overridden; Prometheus (Debian's, as
    its image cannot be had here) scrapes the container with the compose stack's own config."""
    port = free_port()
    project = f"sglang-test-{port}"
    override = tmp_path / "compose.test.yml"
    override.write_text(f'services:\n  sglang:\n    image: {image}\n    ports: !override\n'
                        f'      - "127.0.0.1:{port}:30000"\n')
    compose = [str(ROOT / ".venv" / "bin" / "podman-compose"), "-p", project, "-f", DEPLOY / "docker-compose.yml",
               "-f", DEPLOY / "docker-compose.cpu.yml", "-f", override]
    cenv = dict(env, GRAFANA_ADMIN_PASSWORD="unused-in-this-test")
    cenv.pop("SGLANG_API_KEY", None)
    cenv.pop("SGLANG_ADMIN_API_KEY", None)

    def run(*args):
        return subprocess.run([*map(str, compose), *args], env=cenv, capture_output=True, text=True, timeout=180)

    up = run("up", "-d", "sglang")
    name = f"{project}_sglang_1"
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        ep = Endpoint(port)
        ep.wait_ready(60)
        assert chat_greedy(ep) == reference["greedy_text"]
        assert podman(env, "healthcheck", "run", name, check=False).returncode == 0
        inspect = json.loads(podman(env, "inspect", name).stdout)[0]
        assert inspect["HostConfig"]["ReadonlyRootfs"] is True
        cfg_env = dict(v.split("=", 1) for v in inspect["Config"]["Env"])
        assert cfg_env["SGLANG_DEVICE"] == "cpu" and cfg_env["SGLANG_MAX_QUEUED_REQUESTS"] == "1024"
        # the log file lands in the sglang-logs volume, written by the non-root user
        assert exec_in(env, name, "test -s /var/log/sglang/sglang-server.log").returncode == 0
        query = 'sum(sglang_requests_total{job="sglang",endpoint="/v1/chat/completions"})'
        value = prometheus_value(DEPLOY / "monitoring" / "prometheus.compose.yml", f"127.0.0.1:{port}", query, 1)
        assert value >= 1, value
    finally:
        down = run("down", "-v")
    assert down.returncode == 0, down.stdout + down.stderr
    assert podman(env, "container", "exists", name, check=False).returncode != 0
